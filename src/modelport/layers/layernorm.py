"""RMSNorm, computed in float32 like HF Llama so low-precision runs keep the same statistics;
LayerNorm with a bias (StarCoder2) with the same residual-add call."""

from __future__ import annotations

import torch
from torch import nn

from modelport.layers import cpu_fast


class ResidualNorm(nn.Module):
    """A norm (``_norm``) with an optional fused residual add: ``forward(x, residual)``
    returns ``(norm(x + residual), x + residual)``."""

    def _norm(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def forward(
        self, x: torch.Tensor, residual: torch.Tensor | None = None
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        if residual is None:
            return self._norm(x)
        x = x + residual
        return self._norm(x), x


class RMSNorm(ResidualNorm):
    """RMS normalisation with an optional fused residual add.

    ``forward(x, residual)`` returns ``(norm(x + residual), x + residual)``: decoder layers
    pass the running residual through here, which saves one elementwise pass per norm.
    """

    def __init__(self, hidden_size: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.empty(hidden_size), requires_grad=False)

    def _norm(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        if (dtype == torch.float32 and not x.is_cuda and cpu_fast.ENABLED
                and self.weight.dtype == torch.float32):
            # one op instead of seven: torch's CPU rms_norm runs the same fp32 steps
            # (pow, mean, + eps, rsqrt, x * r, * weight), so the result is bitwise equal
            return torch.rms_norm(x, self.weight.shape, self.weight, self.eps)
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * xf.to(dtype)



class LayerNorm(ResidualNorm):
    """LayerNorm with weight and bias (StarCoder2), as torch's (statistics in float32 for
    16-bit inputs, like HF's nn.LayerNorm), with RMSNorm's call: ``forward(x, residual)``
    returns ``(norm(x + residual), x + residual)``."""

    def __init__(self, hidden_size: int, eps: float = 1e-5) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.empty(hidden_size), requires_grad=False)
        self.bias = nn.Parameter(torch.empty(hidden_size), requires_grad=False)

    def _norm(self, x: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.layer_norm(x, self.weight.shape, self.weight, self.bias,
                                              self.eps)

