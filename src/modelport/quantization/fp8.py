"""FP8 E4M3 weights: checkpoints (per-tensor or per-channel scales) and online from bf16/fp32.

Checkpoint layout per linear layer: ``weight`` float8_e4m3fn [N, K], ``weight_scale`` float32
(a scalar per tensor, or one per output channel), optionally ``input_scale`` (static
activation scheme; we always compute dynamic per-token scales, which is at least as exact).
A fused q/k/v or gate/up layer keeps one scale per output channel, so shards with different
per-tensor scales fuse without requantizing.

Run: on GPUs with FP8 tensor cores (compute capability >= 8.9: Ada, Hopper, Blackwell)
``torch._scaled_mm`` with per-token activation and per-channel weight scales. On older GPUs
loading fails with the alternatives named. On CPU, a weight-only fallback (dequantize to the
activation dtype per call) keeps the memory saving and the numerics; it is not fast.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from modelport.quantization.base import LinearMethod, QuantizationConfig, new_param, shard_slice

logger = logging.getLogger(__name__)

FP8 = torch.float8_e4m3fn
FP8_MAX = float(torch.finfo(FP8).max)  # 448
MIN_CAPABILITY = (8, 9)


def fp8_supported(capability: tuple[int, int]) -> bool:
    return tuple(capability) >= MIN_CAPABILITY


def quantize_fp8_per_channel(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """w [N, K] -> (fp8 weight [N, K], float32 scale [N]) with w ~= q * scale[:, None]."""
    scale = (w.float().abs().amax(dim=1) / FP8_MAX).clamp(min=1e-12)
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
            logger.warning("FP8 on CPU: weight-only fallback (dequantize per matmul), not fast")

    def linear_method(self, prefix: str, layer: nn.Module) -> LinearMethod | None:
        return FP8LinearMethod(self)


class FP8LinearMethod(LinearMethod):
    def __init__(self, config: FP8Config) -> None:
        self.config = config

    def create_weights(self, layer: nn.Module, input_size: int, output_sizes: Sequence[int],
                       params_dtype: torch.dtype) -> None:
        n = sum(output_sizes)
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
        if self.config.online:
            q, scale = quantize_fp8_per_channel(layer.weight.data)
        else:
            q, scale = layer.weight.data, layer.weight_scale.data
            if (scale < 0).any():
                raise ValueError("FP8 checkpoint: some output channels received no weight_scale")
        for name in ("weight", "weight_scale", "input_scale"):
            layer._parameters.pop(name, None)
        layer.register_buffer("fp8_weight", q.contiguous())
        layer.register_buffer("fp8_scale", scale.float().contiguous())

    def apply(self, layer: nn.Module, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        if x.is_cuda:
            return fp8_scaled_mm(x, layer.fp8_weight, layer.fp8_scale, bias)
        w = layer.fp8_weight.to(x.dtype) * layer.fp8_scale.to(x.dtype)[:, None]
        return F.linear(x, w, bias)


def fp8_scaled_mm(x: torch.Tensor, w: torch.Tensor, w_scale: torch.Tensor,
                  bias: torch.Tensor | None) -> torch.Tensor:
    """Dynamic per-token FP8 activations x per-channel FP8 weights on FP8 tensor cores."""
    shape = x.shape
    x2 = x.reshape(-1, shape[-1])
    x_scale = (x2.abs().amax(dim=1, keepdim=True).float() / FP8_MAX).clamp(min=1e-12)
    xq = (x2 / x_scale).clamp(-FP8_MAX, FP8_MAX).to(FP8)
    out_dtype = x.dtype if x.dtype in (torch.bfloat16, torch.float16) else torch.bfloat16
    y = torch._scaled_mm(xq, w.t(), scale_a=x_scale, scale_b=w_scale[None, :],
                         out_dtype=out_dtype, bias=bias.to(out_dtype) if bias is not None else None)
    return y.to(x.dtype).reshape(*shape[:-1], w.shape[0])


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
