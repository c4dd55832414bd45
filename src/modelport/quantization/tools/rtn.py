"""Round-to-nearest group quantization: the building block AWQ and GPTQ refine.

Asymmetric: per group, scale = (max - min) / (2**b - 1) and an integer zero so that min and max
are representable. Symmetric: the zero is fixed at 2**(b-1) and scale = 2 absmax / (2**b - 1),
the convention of the GPTQ paper's reference quantizer (so "sym" checkpoints store zero 8).
"""

from __future__ import annotations

import torch


def group_params(w: torch.Tensor, bits: int, sym: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Scale and integer zero for each row of ``w`` [R, g] (one group per row)."""
    maxq = (1 << bits) - 1
    wmin = w.min(dim=1).values.clamp(max=0)
    wmax = w.max(dim=1).values.clamp(min=0)
    if sym:
        amax = torch.maximum(wmax, -wmin)
        scale = (2 * amax / maxq).clamp(min=1e-10)
        zero = torch.full_like(scale, (maxq + 1) // 2)
    else:
        scale = ((wmax - wmin) / maxq).clamp(min=1e-10)
        zero = torch.round(-wmin / scale).clamp(0, maxq)
    return scale, zero


def quantize_codes(w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, bits: int) -> torch.Tensor:
    """Codes for w with per-row (broadcast) scale/zero: clamp(round(w / s) + z)."""
    return torch.clamp(torch.round(w / scale) + zero, 0, (1 << bits) - 1)


def rtn_quantize(
    w: torch.Tensor, bits: int, group_size: int, sym: bool = False
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """w [N, K] -> (codes uint8 [N, K], zeros int [N, G], scales float [N, G])."""
    n, k = w.shape
    g = k if group_size == -1 else group_size
    if k % g:
        raise ValueError(f"input size {k} is not a multiple of group_size {g}")
    wg = w.float().reshape(n * (k // g), g)
    scale, zero = group_params(wg, bits, sym)
    codes = quantize_codes(wg, scale[:, None], zero[:, None], bits)
    return (codes.reshape(n, k).to(torch.uint8), zero.reshape(n, k // g).to(torch.int32),
            scale.reshape(n, k // g))


def dequantize_codes(codes: torch.Tensor, zeros: torch.Tensor, scales: torch.Tensor,
                     g_idx: torch.Tensor) -> torch.Tensor:
    return (codes.float() - zeros.float()[:, g_idx]) * scales.float()[:, g_idx]
