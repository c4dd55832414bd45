"""The loader's hook: which quantization a model gets, and the three points where it acts.

``resolve_quantization`` decides once, from the user's ``quantization=`` and the checkpoint
(config.json ``quantization_config``, or a GGUF file's tensor types), and fails early with a
message naming the alternative. The returned ``QuantPlan`` then (1) transforms the built
model's linear layers, (2) supplies the weight stream when the format needs a special one
(GGUF raw blocks), and (3) repacks for the kernels after loading.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from modelport.config import ModelConfig
from modelport.quantization.base import QuantizationConfig
from modelport.quantization.compressed_tensors import QUANT_METHOD, is_compressed_tensors, parse
from modelport.quantization.gguf_types import GGUF_LINEAR, kept_on_cpu_by_default

logger = logging.getLogger(__name__)

# user-facing names (--quantization) -> what they load
SUPPORTED_METHODS = ("awq", "gptq", "fp8", "bitsandbytes", "gguf", QUANT_METHOD)
_ALIASES = {"nf4": "bitsandbytes", "bnb": "bitsandbytes", "awq_marlin": "awq",
            "gptq_marlin": "gptq", "compressed_tensors": QUANT_METHOD}


def checkpoint_method(model_config: ModelConfig) -> str | None:
    """The method a checkpoint's config.json declares (None: not a quantized checkpoint).
    A compressed-tensors checkpoint of FP8 weights only is "fp8" (fp8.py's path), one with
    integer weight-only groups "compressed-tensors" (compressed_tensors_int.py); any other
    compressed-tensors scheme raises ValueError naming what is not supported."""
    qc = model_config.hf_config.get("quantization_config")
    if not isinstance(qc, dict):
        return None
    if is_compressed_tensors(qc):
        return QUANT_METHOD if parse(qc).int_groups else "fp8"
    method = str(qc.get("quant_method", "")).lower()
    return _ALIASES.get(method, method) or None


def _normalize(requested: str | None) -> str | None:
    if requested is None:
        return None
    name = _ALIASES.get(requested.lower(), requested.lower())
    if name not in SUPPORTED_METHODS:
        raise ValueError(
            f"unknown quantization {requested!r}; supported: {', '.join(SUPPORTED_METHODS)}"
        )
    return name


def _config_for(method: str, src: Any, model_config: ModelConfig, online: bool,
                stacked: Any, dummy: bool = False) -> QuantizationConfig:
    qc = model_config.hf_config.get("quantization_config") or {}
    if method == "gguf" and dummy:  # random weights, every linear layer in one GGML type
        from modelport.quantization.gguf import GGUFDummyConfig

        return GGUFDummyConfig.from_env()
    if method == "gguf":
        from modelport.loader.gguf import open_gguf_tensors
        from modelport.quantization.gguf import gguf_quant_config

        return gguf_quant_config(open_gguf_tensors(src.path), stacked,
                                 model_config.hf_config.get("model_type", "llama"))
    if method == QUANT_METHOD:
        from modelport.quantization.compressed_tensors_int import CompressedTensorsConfig

        return CompressedTensorsConfig.from_hf(qc, stacked)
    if method == "awq":
        from modelport.quantization.awq import AWQConfig

        return AWQConfig.from_hf(qc)
    if method == "gptq":
        from modelport.quantization.gptq import GPTQConfig

        return GPTQConfig.from_hf(qc)
    if method == "fp8":
        from modelport.quantization.fp8 import CompressedTensorsFP8Config, FP8Config

        if online:
            return FP8Config(online=True)
        if is_compressed_tensors(qc):
            return CompressedTensorsFP8Config.from_hf(qc, stacked)
        return FP8Config.from_hf(qc)
    from modelport.quantization.nf4 import NF4Config

    return NF4Config.from_hf(qc)


def auto_keep_gguf(src: Any, device: torch.device | str) -> bool:
    """Whether a GGUF file loaded without ``quantization=`` keeps its blocks quantized.

    Yes on an x86 CPU with AVX2/AVX-512 when every linear weight is a type the kept path
    holds (Q4_0/Q4_1/Q4_K run torch's int4 GEMM; Q2_K/Q3_K (16-wide groups, which that GEMM
    does not take), Q5_0/Q5_1/Q5_K/Q6_K/Q8_0, and a fused layer with one of them, its int8
    GEMM on rows requantized to 8 bits), as llama.cpp runs a file at its own size (or, for
    Q2_K / Q3_K, at 1 byte a weight). On the 2-core box (bench/README.md): the embedded Q4_1
    model decodes 2.5x faster single stream than dequantized to fp32, with the same greedy
    tokens; a Q8_0 copy 1.35x faster at +0.7 % perplexity, a Q4_1 + Q8_0 mix 1.47x at
    +0.7 %; an 8B Q4_K_M file holds ~7.5 GiB instead of ~30 GiB of fp32. Otherwise (float
    GGUF files, other types, CPUs without AVX2, a GPU, where the bf16 path is the fast one)
    the file is dequantized.
    ``quantization="gguf"`` / ``"none"`` choose explicitly.
    """
    if src.kind != "gguf" or torch.device(device).type != "cpu":
        return False
    if torch.backends.cpu.get_cpu_capability() not in ("AVX2", "AVX512"):
        return False
    from modelport.loader.gguf import open_gguf_tensors

    return kept_on_cpu_by_default([t.tensor_type.name for t in open_gguf_tensors(src.path).tensors
                                   if GGUF_LINEAR.match(t.name)])


def resolve_quantization(
    requested: str | None, src: Any, model_config: ModelConfig, device: torch.device | str,
    load_format: str = "auto",
) -> QuantPlan | None:
    """The plan for this model, or None when it loads unquantized.

    ``requested`` None: what the checkpoint declares; a GGUF file is kept quantized where
    ``auto_keep_gguf`` says so. "none": load a GGUF file's weights as floats (an error for a
    quantized HF checkpoint). With load_format="dummy" any method may be requested for a float
    config (benchmarks: random weights packed in that format, default bits / group size).
    """
    try:
        declared = checkpoint_method(model_config)
    except ValueError as e:  # an unsupported compressed-tensors scheme: before anything is built
        raise ValueError(f"{src.path}: {e}") from None
    if requested is not None and requested.lower() == "none":
        if declared is not None:
            raise ValueError(
                f"{src.path} is a {declared} checkpoint: quantization='none' only loads a GGUF "
                "file as floats; drop it to run the checkpoint quantized"
            )
        return None
    method = _normalize(requested)
    if method == QUANT_METHOD:  # "the checkpoint's own compressed-tensors config"
        if not is_compressed_tensors(model_config.hf_config.get("quantization_config")):
            raise ValueError(
                f"{src.path} has no compressed-tensors quantization_config: "
                f"quantization={requested!r} loads a compressed-tensors checkpoint as its "
                "config.json describes it; drop --quantization"
                + (f" (it is a {declared} checkpoint)" if declared else "")
            )
        method = declared
    if declared is not None and declared not in SUPPORTED_METHODS:
        raise ValueError(
            f"{src.path}: quantization_config.quant_method {declared!r} is not supported; "
            f"supported: {', '.join(SUPPORTED_METHODS)}"
        )
    if method is None and declared is None:
        if load_format == "dummy" or not auto_keep_gguf(src, device):
            return None
        logger.info("%s: Q4 GGUF blocks kept quantized for the CPU int4 kernel "
                    "(quantization='none' loads them as floats)", src.path.name)
        method = "gguf"
    if src.kind == "gguf" and method not in (None, "gguf"):
        raise ValueError(
            f"{src.path.name} is a GGUF file: use --quantization gguf to keep its blocks "
            f"quantized (or --quantization none to dequantize); {method!r} applies to HF "
            "checkpoints"
        )
    if method == "gguf" and src.kind != "gguf" and load_format != "dummy":
        raise ValueError("--quantization gguf needs a .gguf file")
    online = False
    if method is not None and declared is not None and method != declared:
        raise ValueError(
            f"{src.path} is a {declared} checkpoint but quantization={requested!r} was "
            f"requested; drop --quantization (it is detected) or pass {declared}"
        )
    if method is not None and declared is None and src.kind == "hf":
        if method == "fp8":
            online = True
        elif load_format != "dummy":
            raise ValueError(
                f"{src.path} has no quantization_config, so it is not a {method} checkpoint; "
                f"make one with `modelport quantize --method {method}` or use "
                "--quantization fp8 to quantize at load time"
            )
    from modelport.models.moe_config import MOE_ARCHITECTURES
    from modelport.models.registry import get_model_class

    moe = model_config.architecture in MOE_ARCHITECTURES
    if moe and torch.device(device).type != "cpu":
        _check_moe_device(model_config.architecture, method or declared, src, device)
    stacked = getattr(get_model_class(model_config.architecture), "stacked_params", ())
    config = _config_for(method or declared, src, model_config, online, stacked,  # type: ignore[arg-type]
                         dummy=load_format == "dummy")
    config.check_device(torch.device(device))
    return QuantPlan(config, src, online, auto=requested is None and declared is None)


# restacked for the grouped kernels on CUDA (compressed-tensors: integer weight-only experts,
# a GroupQuant each like AWQ / GPTQ, or FP8 ones)
MOE_CUDA_METHODS = ("fp8", "awq", "gptq", QUANT_METHOD)


def _check_moe_device(arch: str, method: str | None, src: Any, device: torch.device | str) -> None:
    """Quantized MoE experts off the CPU: FP8, AWQ, GPTQ and compressed-tensors (FP8 or
    integer weight-only) run the grouped kernels on CUDA (layers/moe_quant.py); the rest are
    refused, naming what works."""
    dev = torch.device(device).type
    if dev == "cuda" and method in MOE_CUDA_METHODS:
        return
    alt = ("--quantization none to load the GGUF file's experts dequantized"
           if src.kind == "gguf" else
           "an FP8, AWQ, GPTQ or compressed-tensors W4A16 / W8A16 checkpoint, --quantization "
           "fp8 on the unquantized checkpoint, or the unquantized checkpoint")
    where = ("FP8, AWQ, GPTQ and compressed-tensors experts run on CUDA" if dev == "cuda"
             else "quantized experts run on CPU, and FP8 / AWQ / GPTQ / compressed-tensors "
             "ones on CUDA")
    raise ValueError(
        f"{arch}: quantized ({method}) MoE experts are not supported on {dev.upper()} "
        f"({where}); use --device cpu, or on {dev.upper()} {alt}")


@dataclass
class QuantPlan:
    config: QuantizationConfig
    src: Any
    online: bool = False
    # chosen without quantization= (a Q4 GGUF file on CPU): only a tied LM head is narrowed
    # to bf16 (its top logits refined from the fp32 embedding table); an untied one stays
    # fp32. quantization="gguf" narrows either.
    auto: bool = False

    @property
    def name(self) -> str:
        return self.config.name

    def prepare_model(self, model: nn.Module, dtype: torch.dtype, device: torch.device,
                      rank_slices: Any = None) -> None:
        """Swap every linear layer's weights for the format's parameters (before loading);
        ``rank_slices``: a tensor-parallel rank's (parallel/tp_quant_load.RankSlices)."""
        from modelport.quantization.apply import quantize_linear_layers

        quantize_linear_layers(model, self.config, dtype, device, rank_slices)

    def weights(self, hf_config: dict[str, Any]) -> tuple[Iterator[tuple[str, torch.Tensor]], int] | None:
        """A special weight stream, or None to use the loader's ordinary one."""
        if self.name == "bitsandbytes":
            from modelport import loader
            from modelport.quantization.nf4 import rename_stream

            stream, total = loader._weights_for(self.src)
            return rename_stream(stream), total
        if self.name != "gguf":
            return None
        from modelport.loader.gguf import hf_tensor_name, open_gguf_tensors
        from modelport.quantization.gguf import iter_gguf_kept

        reader = open_gguf_tensors(self.src.path)
        arch = hf_config["model_type"]  # stacked experts arrive one expert at a time
        total = sum(len(t.data) if "{e}" in hf_tensor_name(t.name, arch) else 1
                    for t in reader.tensors)
        return iter_gguf_kept(reader, hf_config, self.config.kept), total  # type: ignore[attr-defined]

    def load(self, cls: type[nn.Module], config: ModelConfig, load_format: str, seed: int,
             dtype: torch.dtype, device: torch.device,
             transform: Callable[[nn.Module], None] | None = None) -> nn.Module:
        """Build, transform, fill and repack; a failure leaves nothing half-loaded behind.

        ``transform`` (tensor-parallel sharding) runs after the weights are filled and before
        the repack. Inside ``sharded_at_build`` the parallel layers are built as the rank's
        slice and cut as the checkpoint streams in (parallel/tp_quant_load.py); a layer its
        method cannot cut there loads whole and the transform cuts it before repacking.
        """
        from modelport import loader
        from modelport.layers.linear import PARAMS_ON_META
        from modelport.parallel.moe_parallel import _BUILD_SHARD
        from modelport.parallel.tp_load import _materialize
        from modelport.parallel.tp_quant_load import RankSlices
        from modelport.quantization.apply import finish_loading

        shard = _BUILD_SHARD.get()
        rank_slices = None
        if shard is not None and shard[1] > 1 and load_format != "dummy":
            rank_slices = RankSlices(*shard)
        # a rank's linear weights start on meta: only what its slices need is allocated
        token = PARAMS_ON_META.set(True) if rank_slices is not None else None
        try:
            with loader._build_defaults(dtype, device):
                model = cls(config)
            self.prepare_model(model, dtype, device, rank_slices)
        finally:
            if token is not None:
                PARAMS_ON_META.reset(token)
        if rank_slices is not None:
            _materialize(model, device)  # the LM head, unquantized layers: whole, as allocated
        expected = {name for name, _ in model.named_parameters()}
        if load_format == "dummy":
            from modelport.quantization.dummy import init_dummy_quantized

            init_dummy_quantized(model, seed)
            if transform is not None:
                transform(model)
            finish_loading(model)
            return model.eval()
        from modelport.parallel.moe_parallel import other_ranks_experts

        # expert parallelism: another rank's experts are not even read (HF checkpoints)
        stream = (self.weights(config.hf_config)
                  or loader._weights_for(self.src, other_ranks_experts(model)))
        weights, total = stream
        with torch.no_grad():
            loaded = model.load_weights(
                loader._progress(weights, total, f"Loading {self.src.name} ({self.name})"))
        missing = sorted(expected - loaded)
        if missing:
            shown = ", ".join(missing[:5]) + (f" and {len(missing) - 5} more" if len(missing) > 5 else "")
            raise ValueError(f"{self.src.path}: checkpoint is missing weights for {shown}")
        if transform is not None:
            transform(model)
        finish_loading(model)
        if self.name == "gguf" and device.type == "cpu":
            narrow_lm_head(model, tied_only=self.auto)
        return model.eval()


NARROW_CPU_LM_HEAD = True  # a switch for benchmarks and tests comparing both heads


def narrow_lm_head(model: nn.Module, tied_only: bool = False) -> None:
    """Give a kept-GGUF model on CPU a bf16 copy of its fp32 LM head.

    With the linear layers in 4-bit blocks, the fp32 head is the largest read of a decode step
    (SmolLM2-135M: 113 MB of 180 MB); bf16 halves it and runs on the CPU's bf16 matmul. The
    head's values come from the file's 8-bit (Q8_0) or 4-bit embedding blocks, whose precision
    bf16's 8-bit mantissa about matches. A head tied to the embedding keeps the embedding's
    fp32 table (needed for lookups anyway) as ``exact_weight``: each row's top logits are
    recomputed from it (see LMHead), so greedy answers stay those of the fp32 head (the plain
    bf16 head changed the embedded model's answer to the README's chat example).
    ``tied_only``: leave an untied head (which has no fp32 copy to refine from) in fp32.
    """
    head = getattr(model, "lm_head", None)
    w = getattr(head, "weight", None)
    if not (isinstance(w, torch.Tensor) and w.dtype == torch.float32 and NARROW_CPU_LM_HEAD):
        return
    embed = getattr(getattr(model, "model", None), "embed_tokens", None)
    tied = embed is not None and getattr(embed, "weight", None) is w
    if tied_only and not tied:
        return
    head.weight = nn.Parameter(w.detach().to(torch.bfloat16), requires_grad=False)
    if tied:
        head.exact_weight = w.detach()  # a plain tensor (shares storage): not a parameter

