"""GPTQ (Frantar et al., 2022), written from the paper: quantize one column at a time and push
each column's rounding error onto the columns not yet quantized, weighted by the inverse
Hessian of the layer's reconstruction loss (H = 2 X^T X), via its Cholesky factor.

Options as in the paper / AutoGPTQ: group-wise scales (computed when a group starts, from the
already error-corrected weights), act-order (columns in decreasing Hessian diagonal order, the
group index of each input recorded in g_idx), dampening of H's diagonal, lazy block updates.
"""

from __future__ import annotations

import torch

from modelport.quantization.tools.rtn import group_params, quantize_codes


def gptq_quantize(
    w: torch.Tensor,
    hessian: torch.Tensor,
    bits: int,
    group_size: int,
    sym: bool,
    act_order: bool,
    damp: float = 0.01,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """w [N, K], hessian [K, K] (sum x x^T) -> codes [N, K], zeros [N, G], scales [N, G], g_idx [K]."""
    n, k = w.shape
    g = k if group_size == -1 else group_size
    if k % g:
        raise ValueError(f"input size {k} is not a multiple of group_size {g}")
    W = w.double().clone()
    H = hessian.double().clone()
    dead = torch.diag(H) == 0
    H[dead, dead] = 1
    W[:, dead] = 0
    perm = torch.argsort(torch.diag(H), descending=True) if act_order else torch.arange(k)
    W, H = W[:, perm], H[perm][:, perm]
    H += damp * torch.mean(torch.diag(H)) * torch.eye(k, dtype=H.dtype)
    L = torch.linalg.cholesky(H)
    Hinv = torch.linalg.cholesky(torch.cholesky_inverse(L), upper=True)

    block = g if (g >= 128 or 128 % g) else 128
    codes = torch.zeros(n, k, dtype=torch.uint8)
    scales = torch.zeros(n, k // g, dtype=torch.float64)
    zeros = torch.zeros(n, k // g, dtype=torch.float64)
    for i1 in range(0, k, block):
        i2 = min(i1 + block, k)
        W1 = W[:, i1:i2].clone()
        Err = torch.zeros_like(W1)
        Hinv1 = Hinv[i1:i2, i1:i2]
        for i in range(i2 - i1):
            col = i1 + i
            if col % g == 0:  # group starts inside this block (block is a multiple of g)
                s, z = group_params(W1[:, i : i + g], bits, sym)
                scales[:, col // g], zeros[:, col // g] = s, z
            s, z = scales[:, col // g], zeros[:, col // g]
            q = quantize_codes(W1[:, i], s, z, bits)
            codes[:, col] = q.to(torch.uint8)
            err = (W1[:, i] - (q - z) * s) / Hinv1[i, i]
            W1[:, i:] -= err[:, None] * Hinv1[i, i:][None, :]
            Err[:, i] = err
        W[:, i2:] -= Err @ Hinv[i1:i2, i2:]

    out = torch.empty_like(codes)
    out[:, perm] = codes
    g_idx = torch.empty(k, dtype=torch.int32)
    g_idx[perm] = (torch.arange(k) // g).to(torch.int32)
    return out, zeros.to(torch.int32), scales.float(), g_idx
