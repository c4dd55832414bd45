"""Weight memory of a model in a given storage format, in total and per tensor-parallel rank.

Quantized formats are counted by what they really store, not by a nominal bit width:
  awq   4-bit weights packed in int32 + per-group fp16 scales + per-group packed 4-bit zeros
  gptq  the same plus an int32 g_idx per input feature (act-order checkpoints carry it)
  fp8   one byte per weight + a per-output-channel fp32 scale
  w4a16 / w8a16  compressed-tensors integer weight-only (pack-quantized): 4 or 8 bits a
        weight packed in int32 + a bf16 scale per group (group_size -1: per output channel)
        + the [out, in] shape; symmetric, so no zeros (an asymmetric file is measured)
  gguf-<type>  llama.cpp's per-tensor mix (see gguf_mix) with its block scales
Embeddings, lm head and norms are not quantized: they take WeightFormat.dtype, which is 16-bit
in the checkpoints (fp16 for awq/gptq, bf16 for fp8, as `modelport quantize` and the public
tools write them) and the compute dtype once loaded.
"""

from __future__ import annotations

from dataclasses import dataclass

from modelport.config import ModelConfig, dtype_bytes
from modelport.planner import gguf_mix
from modelport.planner.tensors import TensorSpec, decoder_tensors, tp_share

# dtype of the unquantized tensors inside a checkpoint of each method
CHECKPOINT_DENSE_DTYPE = {"awq": "float16", "gptq": "float16", "fp8": "bfloat16",
                          "w4a16": "bfloat16", "w8a16": "bfloat16"}
INT_WEIGHT_ONLY = {"w4a16": 4, "w8a16": 8}  # compressed-tensors' pack-quantized, by bits
QUANTIZATIONS = ("awq", "gptq", "fp8", *INT_WEIGHT_ONLY,
                 *(f"gguf-{ft}" for ft in gguf_mix.FILE_TYPES))
_PACK = 8  # 4-bit values per int32


@dataclass(frozen=True)
class WeightFormat:
    """How weights sit in memory: a dense dtype, optionally a quantization method."""

    dtype: str = "bf16"  # dtype of unquantized tensors and of activations
    quantization: str | None = None  # None or one of QUANTIZATIONS
    # awq / gptq / w4a16 / w8a16 quantization group along the input features (-1 for
    # w4a16 / w8a16: one scale per output channel)
    group_size: int = 128

    def __post_init__(self) -> None:
        dtype_bytes(self.dtype)  # raises on an unknown dtype
        if self.quantization is not None and self.quantization not in QUANTIZATIONS:
            raise ValueError(f"unknown quantization {self.quantization!r}")
        if self.group_size <= 0 and not (self.group_size == -1
                                         and self.quantization in INT_WEIGHT_ONLY):
            raise ValueError(f"group_size must be > 0, got {self.group_size}")

    @property
    def gguf_file_type(self) -> str | None:
        q = self.quantization
        return q[len("gguf-") :] if q and q.startswith("gguf-") else None


def _int4_bytes(t: TensorSpec, group: int, with_g_idx: bool) -> int:
    out_f, in_f = t.shape
    groups = -(-in_f // group)
    packed_out = -(-out_f // _PACK)
    qweight = in_f * packed_out * 4
    qzeros = groups * packed_out * 4
    scales = groups * out_f * 2
    g_idx = in_f * 4 if with_g_idx else 0
    return qweight + qzeros + scales + g_idx


def _packed_int_bytes(t: TensorSpec, group: int, bits: int) -> int:
    """compressed-tensors pack-quantized: weight_packed int32 [out, ceil(in * bits / 32)],
    weight_scale bf16 [out, groups], weight_shape int64 [2]."""
    out_f, in_f = t.shape
    groups = 1 if group == -1 else -(-in_f // group)
    return out_f * -(-in_f * bits // 32) * 4 + out_f * groups * 2 + 16


def tensor_bytes(t: TensorSpec, fmt: WeightFormat, model: ModelConfig) -> tuple[int, str]:
    """(bytes, storage label) of one tensor in format fmt."""
    dense = dtype_bytes(fmt.dtype)
    ft = fmt.gguf_file_type
    if ft is not None:
        qtype = gguf_mix.tensor_type(t, ft, model.num_hidden_layers, model.tie_word_embeddings,
                                     model.num_attention_heads // model.num_key_value_heads)
        return gguf_mix.type_bytes(t.numel, qtype), qtype.name
    if t.kind != "linear" or fmt.quantization is None:
        return t.numel * dense, fmt.dtype
    if fmt.quantization == "fp8":
        return t.numel + 4 * t.shape[0], "fp8"
    bits = INT_WEIGHT_ONLY.get(fmt.quantization)
    if bits is not None:
        how = "channel" if fmt.group_size == -1 else f"g{fmt.group_size}"
        return _packed_int_bytes(t, fmt.group_size, bits), f"int{bits}-{how}"
    label = f"int4-g{fmt.group_size}"
    return _int4_bytes(t, fmt.group_size, fmt.quantization == "gptq"), label


@dataclass(frozen=True)
class WeightReport:
    """Weight memory of one model in one format (the engine's 'model weights' line)."""

    num_params: int
    total_bytes: int  # whole model
    per_gpu_bytes: int  # one TP rank
    bits_per_weight: float  # total_bytes * 8 / num_params, every scale and zero included
    linear_bits_per_weight: float  # the same over the linear layers only
    storage: dict[str, int]  # storage label -> number of tensors
    source: str  # "estimate" or where measured bytes came from

    @property
    def total_gib(self) -> float:
        return self.total_bytes / 2**30

    @property
    def per_gpu_gib(self) -> float:
        return self.per_gpu_bytes / 2**30


def estimate_weights(model: ModelConfig, fmt: WeightFormat, tp: int = 1) -> WeightReport:
    """Weight bytes from the architecture alone (no file needed)."""
    total = per_gpu = 0.0
    lin_bytes = lin_params = 0
    params = 0
    storage: dict[str, int] = {}
    for t in decoder_tensors(model):
        nbytes, label = tensor_bytes(t, fmt, model)
        total += nbytes
        per_gpu += nbytes * tp_share(t, model, tp)
        params += t.numel
        storage[label] = storage.get(label, 0) + 1
        if t.kind == "linear":
            lin_bytes += nbytes
            lin_params += t.numel
    return WeightReport(
        num_params=params,
        total_bytes=int(total),
        per_gpu_bytes=int(per_gpu),
        bits_per_weight=total * 8 / params,
        linear_bits_per_weight=lin_bytes * 8 / lin_params,
        storage=storage,
        source="estimate",
    )


def measured_weights(
    estimate: WeightReport, measured_total: int, storage: dict[str, int], source: str,
    num_params: int | None = None,
) -> WeightReport:
    """Replace the estimate's totals by bytes read from a real file (and its parameter count
    when the file tells it, as a .gguf file's tensors do); TP shares keep the estimate's
    proportions (a rank holds the same fraction of the model either way)."""
    ratio = estimate.per_gpu_bytes / estimate.total_bytes
    params = num_params or estimate.num_params
    return WeightReport(
        num_params=params,
        total_bytes=measured_total,
        per_gpu_bytes=int(measured_total * ratio),
        bits_per_weight=measured_total * 8 / params,
        linear_bits_per_weight=estimate.linear_bits_per_weight,
        storage=storage,
        source=source,
    )
