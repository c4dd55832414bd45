"""The planner's core: one validated request in, one Plan (pure arithmetic) out."""

from __future__ import annotations

from dataclasses import dataclass

from modelport.config import (
    ModelConfig,
    auto_dtype,
    default_max_num_batched_tokens,
    dtype_bytes,
    is_large_gpu,
)
from modelport.layers.rotary import default_max_model_len, max_model_len_limit
from modelport.models.moe_config import moe_spec
from modelport.planner import gguf_mix
from modelport.planner.errors import PlanError
from modelport.planner.gguf_mix import LinearTensor, kept_bytes
from modelport.planner.hardware import Device
from modelport.planner.memory import KVCapacity, MemoryBudget, kv_capacity, memory_budget
from modelport.planner.model_source import ModelSource
from modelport.planner.notes import plan_notes
from modelport.planner.parallel import resolve_parallelism, valid_tp_degrees
from modelport.planner.roofline import Roofline, roofline
from modelport.planner.tensors import decoder_tensors, tp_share
from modelport.planner.weights import (
    CHECKPOINT_DENSE_DTYPE,
    INT_WEIGHT_ONLY,
    QUANTIZATIONS,
    WeightFormat,
    WeightReport,
    estimate_weights,
    measured_weights,
    tensor_bytes,
)
from modelport.quantization.loading import MOE_CUDA_METHODS

_CANON = {
    "bf16": "bfloat16",
    "bfloat16": "bfloat16",
    "fp16": "float16",
    "float16": "float16",
    "half": "float16",
    "fp32": "float32",
    "float32": "float32",
    "float": "float32",
}
KV_DTYPES = ("auto", "fp8", "fp8_e4m3", *_CANON)  # what CacheConfig accepts
DTYPES = ("auto", *_CANON)

# "gguf": keep a .gguf file's own blocks in memory (the engine's --quantization gguf). Without
# it the engine's loader dequantizes a GGUF file to the compute dtype, so the model occupies
# its dense size although its file is small.
KEEP_GGUF = "gguf"


def resolve_dtype(dtype: str, device: Device, checkpoint_dtype: str) -> str:
    """The engine's dtype rule (config.auto_dtype), with the planner's own dtype names."""
    if dtype != "auto":
        return _CANON[dtype]
    return auto_dtype(not device.is_cpu, checkpoint_dtype)


def _max_len_limit(config: ModelConfig) -> int:
    """The engine's limit on max_model_len (yarn / dynamic rope scaling reach past
    max_position_embeddings: layers/rotary.py)."""
    try:
        return max_model_len_limit(config)
    except ValueError as e:  # a yarn / dynamic config the engine would refuse
        raise PlanError("--model", f"the model's rope scaling: {e}") from None


def engine_max_num_batched_tokens(device: Device) -> int:
    """`modelport serve`'s default per-step token budget on this device (EngineArgs')."""
    return default_max_num_batched_tokens(
        not device.is_cpu, large_gpu=not device.is_cpu and is_large_gpu(device.memory_bytes, device.name))


@dataclass(frozen=True)
class PlanRequest:
    """Everything `modelport plan` was asked; validated so each error names its flag."""

    model: ModelSource
    device: Device
    num_gpus: int = 1
    tensor_parallel_size: int | None = None  # None: all GPUs in one replica
    max_model_len: int | None = None  # None: the engine's default (max_position_embeddings)
    max_num_seqs: int = 256
    dtype: str = "auto"
    kv_cache_dtype: str = "auto"
    quantization: str | None = None
    group_size: int = 128
    gpu_memory_utilization: float = 0.90
    kv_cache_memory: int | None = None  # CPU KV budget in bytes
    block_size: int = 16
    max_num_batched_tokens: int | None = None
    enable_expert_parallel: bool = False  # MoE: the TP ranks share out whole experts

    def __post_init__(self) -> None:
        for flag, v in (
            ("--max-model-len", self.max_model_len),
            ("--max-num-seqs", self.max_num_seqs),
            ("--kv-cache-memory", self.kv_cache_memory),
            ("--max-num-batched-tokens", self.max_num_batched_tokens),
            ("--group-size", self.group_size),
        ):
            if v is not None and v <= 0:
                raise PlanError(flag, f"must be > 0, got {v}")
        if self.block_size <= 0 or self.block_size & (self.block_size - 1):
            raise PlanError(
                "--block-size", f"must be a positive power of two, got {self.block_size}"
            )
        if not 0.0 < self.gpu_memory_utilization <= 1.0:
            raise PlanError(
                "--gpu-memory-utilization", f"must be in (0, 1], got {self.gpu_memory_utilization}"
            )
        if self.dtype not in DTYPES:
            raise PlanError("--dtype", f"unknown dtype {self.dtype!r} (one of {', '.join(DTYPES)})")
        if self.kv_cache_dtype not in KV_DTYPES:
            raise PlanError(
                "--kv-cache-dtype",
                f"unknown KV cache dtype {self.kv_cache_dtype!r} (one of {', '.join(KV_DTYPES)})",
            )
        known = (*QUANTIZATIONS, KEEP_GGUF)
        if self.quantization is not None and self.quantization not in known:
            raise PlanError(
                "--quantization",
                f"unknown method {self.quantization!r} (one of {', '.join(known)})",
            )
        own = self.model.quantization
        if self.quantization == KEEP_GGUF and self.model.kind != "gguf":
            raise PlanError(
                "--quantization",
                "gguf keeps a .gguf file's blocks; for a preset or HF model name the GGUF type, "
                "e.g. gguf-q4_k_m",
            )
        if self.quantization == KEEP_GGUF and self.model.gguf_moe and not self.device.is_cpu:
            raise PlanError(
                "--quantization",
                f"gguf cannot keep the blocks of {self.model.name} on {self.device.name}: "
                "mixture-of-experts GGUF files keep their blocks on CPU only (on a GPU they "
                "load dequantized to the model dtype); drop --quantization",
            )
        if own and self.quantization not in (None, own, KEEP_GGUF):
            raise PlanError(
                "--quantization",
                f"{self.model.name} is already {own}; it cannot be planned as {self.quantization}",
            )
        limit = _max_len_limit(self.model.config)
        if self.max_model_len is not None and self.max_model_len > limit:
            max_pos = self.model.config.max_position_embeddings
            raise PlanError(
                "--max-model-len",
                f"{self.max_model_len} is larger than the model's "
                f"max_position_embeddings ({limit})" if limit == max_pos else
                f"{self.max_model_len} is larger than the {limit} positions the model's rope "
                f"scaling reaches (max_position_embeddings {max_pos})",
            )
        if self.device.is_cpu and (self.num_gpus > 1 or (self.tensor_parallel_size or 1) > 1):
            raise PlanError(
                "--num-gpus",
                "CPU plans cover one process on one host (its ranks would share the same RAM); "
                "plan one replica and multiply",
            )
        resolve_parallelism(self.model.config, self.num_gpus, self.tensor_parallel_size,
                            self.enable_expert_parallel)

    @property
    def effective_quantization(self) -> str | None:
        """The storage format of the weights (a .gguf file's own type even when dequantized)."""
        if self.quantization == KEEP_GGUF:
            return self.model.quantization
        return self.quantization or self.model.quantization

    @property
    def keeps_quantized(self) -> bool:
        """Whether the weights stay quantized in memory (GGUF files only with --quantization)."""
        q = self.effective_quantization
        if q is None:
            return False
        if not q.startswith("gguf-") or self.model.kind != "gguf" or self.quantization:
            return True
        # no flag: the engine keeps a Q4-Q8 file's blocks on an x86 CPU with AVX2 or AVX-512
        # (loading.auto_keep_gguf; the planner assumes such a CPU) and dequantizes anything
        # else (float files, a GPU)
        return self.device.is_cpu and self.model.gguf_cpu_keepable


@dataclass(frozen=True)
class Plan:
    request: PlanRequest
    dtype: str  # resolved compute dtype
    tp: int
    replicas: int
    max_model_len: int
    max_num_batched_tokens: int
    weights: WeightReport  # as stored (file / checkpoint format)
    resident_per_gpu: int  # what one rank holds in memory
    budget: MemoryBudget
    kv: KVCapacity
    roofline: Roofline | None
    valid_tp: list[int]
    weights_fit: bool
    engine_starts: bool  # weights fit and one max_model_len sequence fits in the KV cache
    fits: bool  # and max_num_seqs full-length sequences fit at once
    reason: str  # one sentence behind the verdict
    notes: tuple[str, ...] = ()  # how the model was sized where that is not the obvious way


def _kv_dtype(req: PlanRequest, act: str) -> tuple[str, int]:
    kd = req.kv_cache_dtype
    if kd == "auto":
        return act, dtype_bytes(act)
    if kd.startswith("fp8"):
        return "fp8" if kd == "fp8" else kd, 1
    return _CANON[kd], dtype_bytes(_CANON[kd])


def _kept_gguf_float_tensors(model: ModelConfig, fmt: WeightFormat, scale: float, act: str,
                             on_cpu: bool, tp: int, narrow_untied: bool,
                             file_bytes: dict[str, int]) -> int:
    """What a kept GGUF model holds beyond its file's blocks, per rank: the engine keeps only
    the linear layers in blocks; the embedding table is dequantized to the compute dtype, and
    the LM head too, where on CPU an fp32 head becomes a bf16 copy when it is tied to the
    embedding, and when untied if --quantization gguf asked for the kept path (the default
    keeps an untied head in fp32: quantization/loading.py narrow_lm_head). The blocks
    replaced count at their bytes in the file (``file_bytes``, by tensor name) when known,
    else at the estimate's bytes times ``scale`` (measured file bytes over the estimate)."""
    head_bytes = 2 if on_cpu and dtype_bytes(act) == 4 else dtype_bytes(act)
    extra = 0.0
    for t in decoder_tensors(model):
        if t.kind not in ("embed", "output"):
            continue
        share = tp_share(t, model, tp)
        stored = file_bytes.get(t.name)
        extra -= (stored if stored is not None else tensor_bytes(t, fmt, model)[0] * scale) * share
        own = dtype_bytes(act) if t.kind == "embed" or not narrow_untied else head_bytes
        extra += t.numel * own * share
        if t.kind == "embed" and model.tie_word_embeddings and head_bytes != dtype_bytes(act):
            extra += t.numel * head_bytes * share  # the narrowed copy of a tied head
    return int(extra)


def _estimated_gguf_linear(model: ModelConfig, fmt: WeightFormat) -> list[LinearTensor]:
    """The linear weights of a GGUF file of fmt's type, as gguf_mix predicts them."""
    out = []
    for t in decoder_tensors(model):
        if t.kind == "linear":
            q = gguf_mix.tensor_type(t, fmt.gguf_file_type, model.num_hidden_layers,
                                     model.tie_word_embeddings,
                                     model.num_attention_heads // model.num_key_value_heads)
            out.append(LinearTensor(t.name, q.name, t.shape[0], t.shape[1],
                                    gguf_mix.type_bytes(t.numel, q)))
    return out


def make_plan(req: PlanRequest) -> Plan:
    model, device = req.model.config, req.device
    tp, replicas = resolve_parallelism(model, req.num_gpus, req.tensor_parallel_size,
                                       req.enable_expert_parallel)
    act = resolve_dtype(req.dtype, device, model.torch_dtype)
    quant = req.effective_quantization
    # experts restacked for the grouped GEMM on a GPU: these formats' only
    if (quant is not None and moe_spec(model) is not None and not device.is_cpu
            and (req.quantization or not req.model.gguf_moe)
            and quant not in (*MOE_CUDA_METHODS, *INT_WEIGHT_ONLY)):
        raise PlanError("--quantization", f"{model.architecture} (mixture of experts): "
                        f"quantized ({quant}) experts run on CPU only (on {device.name}: "
                        "fp8, awq, gptq, w4a16 or w8a16 experts); otherwise it loads "
                        "unquantized")
    # a GGUF type without mixing rules here (IQ*, Q2_K_S, ...) is measured from its file; the
    # estimate then only lends its TP proportions
    known = quant if quant is None or quant in QUANTIZATIONS else "gguf-q4_k_m"
    stored_dtype = CHECKPOINT_DENSE_DTYPE.get(known or "", act)
    # the checkpoint's own group where its config says it (compressed-tensors)
    group = req.model.group_size if req.model.group_size and known == req.model.quantization \
        else req.group_size
    fmt = WeightFormat(dtype=stored_dtype, quantization=known, group_size=group)
    weights = estimate = estimate_weights(model, fmt, tp)
    if req.model.weight_bytes is not None and quant is not None:
        weights = measured_weights(
            weights,
            req.model.weight_bytes,
            req.model.storage or {},
            f"measured from {req.model.path}",
            num_params=req.model.num_params,
        )
    # in memory: unquantized tensors in the compute dtype; a GGUF file's blocks only when kept
    if quant is None or not req.keeps_quantized:
        dense = estimate_weights(model, WeightFormat(dtype=act), tp)
        resident = dense.per_gpu_bytes
        if req.model.num_params:  # a GGUF file dequantized: every tensor it holds
            resident = int(req.model.num_params * dtype_bytes(act)
                           * dense.per_gpu_bytes / dense.total_bytes)
    elif known.startswith("gguf-"):
        resident = weights.per_gpu_bytes + _kept_gguf_float_tensors(
            model, fmt, weights.total_bytes / estimate.total_bytes, act, device.is_cpu, tp,
            narrow_untied=req.quantization is not None, file_bytes=dict(req.model.gguf_tables))
        # the kernels' own layouts (CPU int4 / int8, CUDA Triton), not the file's blocks; a
        # rank holds 1/tp of each (the few replicated KV rows of a large TP are not counted)
        linear = req.model.gguf_linear or _estimated_gguf_linear(model, fmt)
        delta = kept_bytes(linear, device.is_cpu) - sum(t.n_bytes for t in linear)
        resident += delta // tp
    else:
        in_memory = WeightFormat(dtype=act, quantization=known, group_size=group)
        resident = estimate_weights(model, in_memory, tp).per_gpu_bytes
    max_len = req.max_model_len or default_max_model_len(model)  # as the engine's default
    batched = req.max_num_batched_tokens or engine_max_num_batched_tokens(device)
    budget = memory_budget(
        device,
        model,
        resident,
        act_bytes=dtype_bytes(act),
        tp=tp,
        gpu_memory_utilization=req.gpu_memory_utilization,
        max_num_batched_tokens=batched,
        max_num_seqs=req.max_num_seqs,
        kv_cache_memory=req.kv_cache_memory,
        max_model_len=max_len,
    )
    kv_name, kv_bytes = _kv_dtype(req, act)
    kv = kv_capacity(
        model,
        budget.kv_bytes,
        kv_dtype=kv_name,
        kv_dtype_bytes=kv_bytes,
        tp=tp,
        block_size=req.block_size,
        max_model_len=max_len,
        max_num_seqs=req.max_num_seqs,
    )
    weights_fit = budget.ram_left_bytes >= 0 if budget.kv_from_flag else budget.kv_bytes > 0
    starts = weights_fit and kv.holds_one_sequence
    fits = starts and kv.full_length_seqs >= req.max_num_seqs
    gib = 2**30
    if not weights_fit:
        if budget.kv_from_flag:
            reason = (
                f"weights {resident / gib:.2f} GiB + KV cache {budget.kv_bytes / gib:.2f} GiB "
                f"+ activations exceed the {device.memory_bytes / gib:.1f} GiB of RAM"
            )
        else:
            reason = (
                f"weights need {resident / gib:.2f} GiB per GPU, more than the "
                f"{budget.usable_bytes / gib:.2f} GiB that gpu_memory_utilization "
                f"{req.gpu_memory_utilization} leaves after activations"
            )
    elif not starts:
        reason = (
            f"the KV cache holds {kv.tokens} tokens, fewer than one max_model_len "
            f"sequence ({max_len}); the engine would refuse to start"
        )
    elif not fits:
        reason = (
            f"KV for {req.max_num_seqs} x {max_len} tokens needs "
            f"{kv.demand_bytes_per_gpu / gib:.1f} GiB {'of RAM' if device.is_cpu else 'per GPU'} but "
            f"{max(budget.kv_bytes, 0) / gib:.1f} GiB is available: only "
            f"{kv.full_length_seqs} full-length sequences fit at once (the engine starts; "
            f"more requests wait or are preempted)"
        )
    else:
        reason = (
            f"{kv.full_length_seqs} full-length sequences fit in the KV cache "
            f"(>= max_num_seqs {req.max_num_seqs})"
        )
    batch = min(req.max_num_seqs, kv.full_length_seqs) if starts else 0
    rl = roofline(
        model,
        weights_per_gpu=resident,
        kv_bytes_per_token_per_gpu=kv.bytes_per_token_per_gpu,
        bandwidth_bytes_s=device.bandwidth_bytes_s,
        flops=device.flops,
        tp=tp,
        replicas=replicas,
        batch=batch,
        max_model_len=max_len,
    )
    return Plan(
        req,
        act,
        tp,
        replicas,
        max_len,
        batched,
        weights,
        resident,
        budget,
        kv,
        rl,
        valid_tp_degrees(model, req.enable_expert_parallel),
        weights_fit,
        starts,
        fits,
        reason,
        plan_notes(req.model, act, req.keeps_quantized),
    )
