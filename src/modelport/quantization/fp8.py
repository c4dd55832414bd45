"""FP8 E4M3 weights: checkpoints (per-tensor or per-channel scales) and online from bf16/fp32.

Checkpoint layout per linear layer: ``weight`` float8_e4m3fn [N, K], ``weight_scale`` float32
(a scalar per tensor, or one per output channel), optionally ``input_scale`` (static
activation scheme; we always compute dynamic per-token scales, which is at least as exact).
A fused q/k/v or gate/up layer keeps one scale per output channel, so shards with different
per-tensor scales fuse without requantizing. The same tensors come in two config.json forms:
quant_method "fp8" (vLLM's; every linear layer) and compressed-tensors (llm-compressor's
FP8_DYNAMIC / FP8 schemes, ``CompressedTensorsFP8Config``: per-module ``targets`` /
``ignore``), which is what ``modelport quantize --method fp8`` writes.

Run, on GPUs with FP8 tensor cores (compute capability >= 8.9: Ada, Hopper, Blackwell), from
the one stored weight (E4M3 [N, K] row-major, fp32 scale per channel), by the number of rows M
(thresholds measured on an H200, see ``W8A16_MAX_M``):

* one row (decode of a single sequence): a Triton W8A16 GEMV (weights upcast in registers,
  bf16/fp16 activations as they are, scale and bias in the epilogue): half the bytes of bf16,
  no activation quantization (``triton_fp8.w8a16_linear``);
* 2 .. ``TRITON_W8A8_MAX_M`` rows (batched decode): dynamic per-token FP8 activations from one
  fused Triton kernel, then the Triton FP8 x FP8 GEMM (``triton_fp8.w8a8_linear``), which also
  takes any K and N;
* more rows (prefill): the same fused quantization, then ``torch._scaled_mm`` (rowwise:
  scale_a [M, 1], scale_b [1, N], the weight's ``.t()`` view as the column-major operand, fast
  accumulation), where K and N are multiples of 16 (otherwise the Triton GEMM).

Every path captures in a CUDA graph once its kernels are compiled and autotuned for that row
bucket (the decode graphs run each batch size eagerly before capturing it).

Without Triton the activations are quantized by torch ops and every batch takes
``_scaled_mm``. On older GPUs loading fails with the alternatives named. A CPU has no FP8
matmul: each weight row (E4M3 x its scale) is requantized once to int8 for torch's int8 GEMM
(``kernels.CpuInt8Kernel``; MODELPORT_FP8_CPU_INT8=0 keeps the FP8 bytes and dequantizes them
per call instead: exact, not fast).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from modelport.quantization import triton_fp8
from modelport.quantization.base import (
    Cut,
    LinearMethod,
    QuantizationConfig,
    TPShard,
    input_cut,
    new_param,
    output_cut,
    shard_slice,
)
from modelport.quantization.compressed_tensors import (
    CompressedTensorsFP8,
    checkpoint_names,
    fp8_dynamic_dict,
    fused_parts_differ,
    parse_fp8,
)

logger = logging.getLogger(__name__)

FP8 = torch.float8_e4m3fn
FP8_MAX = float(torch.finfo(FP8).max)  # 448
MIN_CAPABILITY = (8, 9)
# fp32(1/448): per-token scales are amax * FP8_INV_MAX (rounded to fp32 where used), the same
# value on CPU, on CUDA and in the fused Triton quantizer (see quantize_fp8_per_token_torch)
FP8_INV_MAX = 1.0 / FP8_MAX
# Dispatch by rows M. bench/quant_gpu_linear.py on one H200 (torch 2.11 + CUDA 13.0, Triton
# 3.6): linear-layer time of one Llama-3.1-8B decode step (all 32 layers' projections), ms:
#   rows                          1      4     16     64    256   2048
#   bf16                      3.706  3.790  3.873  4.030  6.505 43.771
#   W8A16 Triton GEMV/tc      2.458  4.665  4.614  6.055 14.032      -
#   quant + Triton W8A8 GEMM  2.884  2.904  2.976  3.168  4.903 26.957
#   quant + _scaled_mm        4.320  3.739  3.624  3.697  4.550 25.394
# W8A16 wins at one row only; the Triton GEMM from 2 rows up to 64 (the last point where
# it leads; 128 is taken as the crossover, between the 64 and 256 points); _scaled_mm above.
W8A16_MAX_M = 1
# MODELPORT_FP8_TRITON_MAX_M=256 also sends full W1 decode batches (256 rows) to the Triton
# GEMM (an A/B knob: at 256 rows both paths are ~1.5 ms above what the weight reads and the
# FP8 tensor-core rate allow, and W8A8_CONFIGS now has 64-row weight tiles for more programs)
TRITON_W8A8_MAX_M = int(os.environ.get("MODELPORT_FP8_TRITON_MAX_M", "128"))
# MODELPORT_FP8_SPLIT_K=1 lets that GEMM split K over 2-4 programs a tile on the narrow layers
# (triton_fp8.SPLIT_K; opt-in until timed on a GPU)
# _scaled_mm without periodic fp32 promotion of the tensor-core accumulator (what inference
# FP8 GEMMs use; measurably faster on Hopper)
FAST_ACCUM = True


def fp8_supported(capability: tuple[int, int]) -> bool:
    return tuple(capability) >= MIN_CAPABILITY


def fp8_channel_scale(w: torch.Tensor) -> torch.Tensor:
    """float32 [N]: the per-output-channel scale of w [N, K] that ``quantize_fp8_per_channel``
    uses."""
    return (w.float().abs().amax(dim=1) / FP8_MAX).clamp(min=1e-12)


def quantize_fp8_per_channel(w: torch.Tensor, scale: torch.Tensor | None = None
                             ) -> tuple[torch.Tensor, torch.Tensor]:
    """w [N, K] -> (fp8 weight [N, K], float32 scale [N]) with w ~= q * scale[:, None];
    ``scale``: the one of the whole rows when w holds some of their columns."""
    if scale is None:
        scale = fp8_channel_scale(w)
    q = (w.float() / scale[:, None]).clamp(-FP8_MAX, FP8_MAX).to(FP8)
    return q, scale


@dataclass
class FP8Config(QuantizationConfig):
    online: bool = False  # quantize float checkpoint weights at load time
    activation_scheme: str = "dynamic"
    name: str = field(default="fp8", init=False)

    @classmethod
    def from_hf(cls, qc: dict[str, Any]) -> FP8Config:
        scheme = str(qc.get("activation_scheme", "dynamic"))
        if scheme not in ("dynamic", "static"):
            raise ValueError(f"FP8: unknown activation_scheme {scheme!r}")
        if qc.get("weight_block_size"):
            raise ValueError(
                "FP8 checkpoints with block-wise weight scales (weight_block_size) are not "
                "supported; per-tensor and per-channel scales are"
            )
        return cls(online=False, activation_scheme=scheme)

    def hf_dict(self) -> dict[str, Any]:
        return {"quant_method": "fp8", "activation_scheme": "dynamic"}

    def check_device(self, device: torch.device) -> None:
        if device.type == "cuda":
            cap = torch.cuda.get_device_capability(device)
            if not fp8_supported(cap):
                raise ValueError(
                    f"FP8 needs a GPU with compute capability >= 8.9 (Ada/Hopper); this GPU is "
                    f"{cap[0]}.{cap[1]}. Use a 4-bit AWQ/GPTQ checkpoint or run unquantized "
                    "(--dtype bfloat16) instead"
                )
        elif device.type == "cpu":
            logger.info("FP8 on CPU: no FP8 matmul; the weights run torch's int8 GEMM, each row "
                        "requantized to int8 (MODELPORT_FP8_CPU_INT8=0: exact, dequantized per call)")

    def linear_method(self, prefix: str, layer: nn.Module) -> LinearMethod | None:
        return FP8LinearMethod(self)


@dataclass
class CompressedTensorsFP8Config(FP8Config):
    """An FP8 checkpoint in the compressed-tensors layout (compressed_tensors.py): the same
    tensors as quant_method "fp8" (``weight`` E4M3, ``weight_scale`` per channel [out, 1] or per
    tensor, ``input_scale`` for static activations), but quantized per module: ``ignore`` and
    each group's ``targets`` say which layers, matched on the checkpoint's module names (a
    fused qkv_proj / gate_up_proj layer through the model's loading table). The writer's form
    (``scheme`` None) is the FP8_DYNAMIC scheme with ``ignore`` as given."""

    scheme: CompressedTensorsFP8 | None = None
    ignore: tuple[str, ...] = ("lm_head",)
    stacked: tuple[Any, ...] = ()

    @classmethod
    def from_hf(cls, qc: dict[str, Any], stacked: Sequence[Any] = ()) -> CompressedTensorsFP8Config:
        scheme = parse_fp8(qc)
        return cls(online=False, scheme=scheme, ignore=scheme.ignore, stacked=tuple(stacked))

    def hf_dict(self) -> dict[str, Any]:
        return fp8_dynamic_dict(self.ignore)

    def use_stacked_params(self, stacked_params: Sequence[Any]) -> None:
        self.stacked = tuple(stacked_params)

    def linear_method(self, prefix: str, layer: nn.Module) -> LinearMethod | None:
        if self.scheme is None:
            return FP8LinearMethod(self)
        names = checkpoint_names(prefix, self.stacked)
        kinds = {n: (None if (g := self.scheme.group_for(n)) is None else g.static_input)
                 for n in names}
        if len(set(kinds.values())) > 1:
            raise fused_parts_differ(prefix, {
                n: "float" if k is None else "static" if k else "dynamic"
                for n, k in kinds.items()}, " with --quantization fp8")
        static = kinds[names[0]]
        if static is None:
            return None  # ignored (or in no group): its float weight is in the file
        return FP8LinearMethod(FP8Config(activation_scheme="static" if static else "dynamic"))


class FP8LinearMethod(LinearMethod):
    def __init__(self, config: FP8Config) -> None:
        self.config = config
        self.params_dtype = torch.float32

    def create_weights(self, layer: nn.Module, input_size: int, output_sizes: Sequence[int],
                       params_dtype: torch.dtype) -> None:
        n = sum(output_sizes)
        self.params_dtype = params_dtype
        if self.config.online:
            new_param(layer, "weight", torch.empty(n, input_size, dtype=params_dtype), output_dim=0)
            return
        new_param(layer, "weight", torch.empty(n, input_size, dtype=FP8), output_dim=0,
                  loader=lambda p, t, shard_id=None: _load_fp8_weight(layer, p, t, shard_id))
        new_param(layer, "weight_scale", torch.full((n,), -1.0, dtype=torch.float32),
                  loader=lambda p, t, shard_id=None: _load_scale(layer, p, t, shard_id))
        if self.config.activation_scheme == "static":
            new_param(layer, "input_scale", torch.zeros(len(output_sizes)),
                      loader=lambda p, t, shard_id=None: None)  # dynamic scales are used

    def process_weights_after_loading(self, layer: nn.Module) -> None:
        if self.config.online:  # a row slice brings its whole rows' scales (slice_cuts)
            q, scale = quantize_fp8_per_channel(layer.weight.data,
                                                layer.__dict__.pop("fp8_row_scale", None))
        else:
            q, scale = layer.weight.data, layer.weight_scale.data
            if (scale < 0).any():
                raise ValueError("FP8 checkpoint: some output channels received no weight_scale")
        spec: TPShard | None = getattr(layer, "tp_cut", None)
        if spec is not None:
            q, scale = _shard_fp8(q, scale, spec)
            layer.tp_cut = None
        for name in ("weight", "weight_scale", "input_scale"):
            layer._parameters.pop(name, None)
        if (q.device.type == "cpu" and os.environ.get("MODELPORT_FP8_CPU_INT8", "1") != "0"
                and not getattr(layer, "keep_for_stacking", False)):  # MoE experts: E4M3 kept
            from modelport.quantization.kernels import CpuInt8Kernel

            layer.fp8_int8 = CpuInt8Kernel(q.float() * scale.float()[:, None])
            return
        layer.register_buffer("fp8_weight", q.contiguous())
        layer.register_buffer("fp8_scale", scale.float().contiguous())

    def shard(self, layer: nn.Module, spec: TPShard) -> None:
        """Scales are per output channel (per-tensor ones are broadcast at load), so a slice
        is the slice of the weight and, for output rows, of the scale; no requantization."""
        if hasattr(layer, "fp8_weight"):  # already repacked: cut the buffers in place
            q, scale = _shard_fp8(layer.fp8_weight, layer.fp8_scale, spec)
            layer.fp8_weight, layer.fp8_scale = q.contiguous(), scale.contiguous()
            return
        layer.tp_cut = spec

    def slice_cuts(self, layer: nn.Module, spec: TPShard) -> dict[str, Cut] | None:
        """Output rows: the weight's rows and their per-channel scales (a per-tensor scale as
        is); input columns: the weight's columns. Online, a row slice keeps the scales of the
        whole rows (computed as each tensor streams in), so its codes are the whole's."""
        if spec.dim == 0:
            rows = output_cut(spec, 0)

            def scale(t: torch.Tensor, shard_id: str | None) -> torch.Tensor:
                return t if t.numel() == 1 else rows(t.reshape(-1), shard_id)

            return {"weight": rows} if self.config.online else {"weight": rows,
                                                                "weight_scale": scale}
        columns = input_cut(spec.start, spec.length, spec.input_size, 1)
        if not self.config.online:
            return {"weight": columns}

        def online(t: torch.Tensor, shard_id: str | None) -> torch.Tensor:
            # on the layer's device, as the whole weight's scales are computed there
            layer.fp8_row_scale = fp8_channel_scale(t.to(layer.quant_device, self.params_dtype))
            return columns(t, shard_id)

        return {"weight": online}

    def apply(self, layer: nn.Module, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        if x.is_cuda:
            return fp8_linear(x, layer.fp8_weight, layer.fp8_scale, bias)
        if hasattr(layer, "fp8_int8"):
            y = layer.fp8_int8(x)
            return y + bias if bias is not None else y
        w = layer.fp8_weight.to(x.dtype) * layer.fp8_scale.to(x.dtype)[:, None]
        return F.linear(x, w, bias)


def _shard_fp8(q: torch.Tensor, scale: torch.Tensor, spec: TPShard) -> tuple[torch.Tensor, torch.Tensor]:
    index = spec.index.to(q.device)
    if spec.dim == 0:  # gathered as bytes: index_select need not support float8 on every device
        rows = q.view(torch.uint8).index_select(0, index).view(q.dtype) if q.dtype == FP8 else q[index]
        return rows, scale.index_select(0, index)
    return q[:, spec.start : spec.start + spec.length], scale


def quantize_fp8_per_token_torch(x2: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Reference (and no-Triton) dynamic per-token quantization: x2 [M, K] -> (E4M3, [M, 1]).

    The scale is amax * fp32(1/448), a multiply on every device (``amax / 448`` would be a
    correctly rounded division on CPU but a multiply by the reciprocal on CUDA, one ulp apart
    for some rows); the fused Triton kernel computes the same scales and codes bit for bit.
    """
    x_scale = (x2.abs().amax(dim=1, keepdim=True).float() * FP8_INV_MAX).clamp(min=1e-12)
    return (x2 / x_scale).clamp(-FP8_MAX, FP8_MAX).to(FP8), x_scale


def quantize_fp8_per_token(x2: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """x2 [M, K] -> (E4M3 [M, K], fp32 scales [M, 1]): one fused kernel on CUDA with Triton."""
    if x2.is_cuda and triton_fp8.available():
        return triton_fp8.quantize_per_token(x2)
    return quantize_fp8_per_token_torch(x2)


def _rows(x: torch.Tensor) -> torch.Tensor:
    x2 = x.reshape(-1, x.shape[-1])  # a view for the usual contiguous activations
    return x2 if x2.stride(-1) == 1 else x2.contiguous()


def fp8_linear(
    x: torch.Tensor, w: torch.Tensor, w_scale: torch.Tensor, bias: torch.Tensor | None
) -> torch.Tensor:
    """y = x (w * w_scale)^T + bias on CUDA, by batch size (see the module docstring)."""
    n, k = w.shape
    m = x.numel() // k if k else 0
    if triton_fp8.available() and x.dtype in (torch.bfloat16, torch.float16):
        if m <= W8A16_MAX_M:
            y = triton_fp8.w8a16_linear(_rows(x), w, w_scale, bias)
            return y.reshape(*x.shape[:-1], n)
        if m <= TRITON_W8A8_MAX_M or k % 16 or n % 16:  # _scaled_mm needs K, N multiples of 16
            return fp8_triton_mm(x, w, w_scale, bias)
    elif k % 16 or n % 16:
        wd = w.to(x.dtype) * w_scale.to(x.dtype).reshape(-1, 1)
        return F.linear(x, wd, bias)
    return fp8_scaled_mm(x, w, w_scale, bias)


def fp8_triton_mm(
    x: torch.Tensor, w: torch.Tensor, w_scale: torch.Tensor, bias: torch.Tensor | None
) -> torch.Tensor:
    """Fused per-token quantization + the Triton FP8 GEMM (bf16/fp16 x; any K and N)."""
    n = w.shape[0]
    xq, x_scale = triton_fp8.quantize_per_token(_rows(x))
    y = triton_fp8.w8a8_linear(xq, x_scale, w, w_scale, bias, x.dtype)
    return y.reshape(*x.shape[:-1], n)


def fp8_scaled_mm(
    x: torch.Tensor,
    w: torch.Tensor,
    w_scale: torch.Tensor,
    bias: torch.Tensor | None,
    fast_accum: bool = FAST_ACCUM,
) -> torch.Tensor:
    """Dynamic per-token FP8 activations x per-channel FP8 weights on FP8 tensor cores.

    ``w`` [N, K] E4M3 row-major (``w.t()`` is the column-major operand ``_scaled_mm`` wants:
    a view); ``w_scale`` fp32 [N] (or one per-tensor value). K and N multiples of 16.
    """
    n = w.shape[0]
    x2 = _rows(x)
    if x2.shape[0] == 0:
        return x.new_empty(*x.shape[:-1], n)
    xq, x_scale = quantize_fp8_per_token(x2)
    out_dtype = x.dtype if x.dtype in (torch.bfloat16, torch.float16) else torch.bfloat16
    if w_scale.dtype != torch.float32:
        w_scale = w_scale.float()
    # rowwise scaling takes scale_b as [1, N] with unit stride: a view of the stored [N] scales
    scale_b = w_scale.reshape(1, -1) if w_scale.numel() == n else w_scale.reshape(1, 1).repeat(1, n)
    if bias is not None and bias.dtype != out_dtype:
        bias = bias.to(out_dtype)
    y = torch._scaled_mm(
        xq,
        w.t(),
        scale_a=x_scale,
        scale_b=scale_b,
        out_dtype=out_dtype,
        bias=bias,
        use_fast_accum=fast_accum,
    )
    if y.dtype != x.dtype:
        y = y.to(x.dtype)
    return y.reshape(*x.shape[:-1], n)


def _load_fp8_weight(layer: nn.Module, param: nn.Parameter, loaded: torch.Tensor,
                     shard_id: str | None) -> None:
    if loaded.dtype != FP8:
        raise ValueError(f"FP8 checkpoint weight has dtype {loaded.dtype}, expected float8_e4m3fn")
    sl = shard_slice(layer, shard_id)
    dst = param.data if sl is None else param.data.narrow(0, *sl)
    if dst.shape != loaded.shape:
        raise ValueError(f"FP8 weight shape {tuple(loaded.shape)}, expected {tuple(dst.shape)}")
    dst.copy_(loaded)


def _load_scale(layer: nn.Module, param: nn.Parameter, loaded: torch.Tensor,
                shard_id: str | None) -> None:
    sl = shard_slice(layer, shard_id)
    dst = param.data if sl is None else param.data.narrow(0, *sl)
    flat = loaded.float().reshape(-1)
    if flat.numel() == 1:
        dst.fill_(flat.item())  # per-tensor scale: the same for every channel of this shard
    elif flat.numel() == dst.numel():
        dst.copy_(flat)
    else:
        raise ValueError(
            f"FP8 weight_scale has {flat.numel()} values; expected 1 (per tensor) or "
            f"{dst.numel()} (per channel)"
        )
