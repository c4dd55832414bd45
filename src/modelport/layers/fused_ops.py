"""Fused small ops for CUDA: residual-add + RMSNorm, rotary embedding, SiLU-and-multiply.

Each replaces three to six elementwise launches (and their round trips through memory)
with one Triton kernel. The kernels reproduce eager PyTorch's rounding on purpose: every
intermediate that torch would round to the model dtype (bf16 / fp16) is rounded here too,
so a fused model produces the same tokens as the unfused one and as HF transformers.

They are applied as a transformation of the built model (``fuse_small_ops``), which swaps
the classes of the norm / rotary / activation modules for subclasses that call the kernels
on CUDA and fall back to the parent's code elsewhere; model files stay plain torch.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import nn

from modelport.layers import pdl
from modelport.layers.activation import SiluAndMul
from modelport.layers.layernorm import RMSNorm
from modelport.layers.rotary import RotaryEmbedding


# ----------------------------------------------------------------------------------------
# kernels
# ----------------------------------------------------------------------------------------
@triton.jit
def _round(x, dt: tl.constexpr):
    """x (float32) rounded to dt and back, as torch rounds each op's result.

    bf16 rounds to nearest-even with integer ops: the compiler may fold a plain
    fp32 -> bf16 -> fp32 cast pair away (seen on the H200), which would skip the rounding.
    """
    if dt == tl.bfloat16:
        u = x.to(tl.uint32, bitcast=True)
        u = (u + 0x7FFF + ((u >> 16) & 1)) & 0xFFFF0000
        return u.to(tl.float32, bitcast=True)
    else:
        return x.to(dt).to(tl.float32)


@triton.jit
def _rmsnorm_kernel(
    x_ptr,
    res_ptr,
    w_ptr,
    out_ptr,
    res_out_ptr,
    stride_x,
    stride_r,
    stride_o,
    stride_ro,
    n_cols,
    eps,
    HAS_RES: tl.constexpr,
    BLOCK: tl.constexpr,
    PDL: tl.constexpr = False,
):
    row = tl.program_id(0).to(tl.int64)
    offs = tl.arange(0, BLOCK)
    mask = offs < n_cols
    dt = out_ptr.dtype.element_ty
    w = tl.load(w_ptr + offs, mask=mask, other=0.0).to(tl.float32)  # a weight: before the wait
    pdl.wait(PDL)
    x = tl.load(x_ptr + row * stride_x + offs, mask=mask, other=0.0).to(tl.float32)
    if HAS_RES:
        r = tl.load(res_ptr + row * stride_r + offs, mask=mask, other=0.0).to(tl.float32)
        x = (x + r).to(dt)  # torch adds in the model dtype
        tl.store(res_out_ptr + row * stride_ro + offs, x, mask=mask)
        x = x.to(tl.float32)
    var = tl.sum(x * x, 0) / n_cols
    y = _round(x * (1.0 / tl.sqrt(var + eps)), dt)
    tl.store(out_ptr + row * stride_o + offs, (w * y).to(dt), mask=mask)


@triton.jit
def _rotary_kernel(
    q_ptr,
    k_ptr,
    cos_sin_ptr,
    pos_ptr,
    stride_q,
    stride_k,
    stride_cs,
    NQ: tl.constexpr,
    NK: tl.constexpr,
    NQ_PAD: tl.constexpr,
    NK_PAD: tl.constexpr,
    HALF: tl.constexpr,
    PDL: tl.constexpr = False,
):
    pdl.wait(PDL, trigger_first=True)  # the KV write after this one waits for it anyway
    t = tl.program_id(0).to(tl.int64)
    pos = tl.load(pos_ptr + t).to(tl.int64)
    j = tl.arange(0, HALF)
    c = tl.load(cos_sin_ptr + pos * stride_cs + j).to(tl.float32)
    s = tl.load(cos_sin_ptr + pos * stride_cs + HALF + j).to(tl.float32)
    dt = q_ptr.dtype.element_ty
    # queries: [NQ_PAD, HALF] tiles of the two halves of each head
    hq = tl.arange(0, NQ_PAD)
    mq = (hq < NQ)[:, None]
    p1 = q_ptr + t * stride_q + hq[:, None] * (2 * HALF) + j[None, :]
    x1 = tl.load(p1, mask=mq, other=0.0).to(tl.float32)
    x2 = tl.load(p1 + HALF, mask=mq, other=0.0).to(tl.float32)
    a = _round(x1 * c[None, :], dt)
    b = _round(x2 * s[None, :], dt)
    e = _round(x2 * c[None, :], dt)
    f = _round(x1 * s[None, :], dt)
    tl.store(p1, (a - b).to(dt), mask=mq)
    tl.store(p1 + HALF, (e + f).to(dt), mask=mq)
    hk = tl.arange(0, NK_PAD)
    mk = (hk < NK)[:, None]
    p2 = k_ptr + t * stride_k + hk[:, None] * (2 * HALF) + j[None, :]
    y1 = tl.load(p2, mask=mk, other=0.0).to(tl.float32)
    y2 = tl.load(p2 + HALF, mask=mk, other=0.0).to(tl.float32)
    a = _round(y1 * c[None, :], dt)
    b = _round(y2 * s[None, :], dt)
    e = _round(y2 * c[None, :], dt)
    f = _round(y1 * s[None, :], dt)
    tl.store(p2, (a - b).to(dt), mask=mk)
    tl.store(p2 + HALF, (e + f).to(dt), mask=mk)


@triton.jit
def _silu_and_mul_kernel(x_ptr, out_ptr, stride_x, stride_o, n_cols, BLOCK: tl.constexpr,
                         PDL: tl.constexpr = False):
    pdl.wait(PDL)
    row = tl.program_id(0).to(tl.int64)
    offs = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n_cols
    dt = out_ptr.dtype.element_ty
    g = tl.load(x_ptr + row * stride_x + offs, mask=mask, other=0.0).to(tl.float32)
    u = tl.load(x_ptr + row * stride_x + n_cols + offs, mask=mask, other=0.0).to(tl.float32)
    act = _round(g / (1.0 + tl.exp(-g)), dt)
    tl.store(out_ptr + row * stride_o + offs, (act * u).to(dt), mask=mask)


# ----------------------------------------------------------------------------------------
# functions
# ----------------------------------------------------------------------------------------
def rms_norm(
    x: torch.Tensor, weight: torch.Tensor, eps: float, residual: torch.Tensor | None = None
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """norm(x) or (norm(x + residual), x + residual), as RMSNorm.forward, in one pass."""
    n_rows, n = x.shape
    out = torch.empty_like(x)
    res_out = torch.empty_like(x) if residual is not None else out
    res = residual if residual is not None else x
    block = triton.next_power_of_2(n)
    if n_rows:
        _rmsnorm_kernel[(n_rows,)](
            x,
            res,
            weight,
            out,
            res_out,
            x.stride(0),
            res.stride(0),
            out.stride(0),
            res_out.stride(0),
            n,
            eps,
            HAS_RES=residual is not None,
            BLOCK=block,
            num_warps=min(16, max(1, block // 512)),
            **pdl.kernel_kwargs(),
        )
    return out if residual is None else (out, res_out)


def apply_rotary_(
    positions: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    cos_sin: torch.Tensor,
    head_dim: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotate q [T, H*D] and k [T, KH*D] in place (neox layout, full rotary dim)."""
    t = q.shape[0]
    nq, nk = q.shape[1] // head_dim, k.shape[1] // head_dim
    if t:
        _rotary_kernel[(t,)](
            q,
            k,
            cos_sin,
            positions,
            q.stride(0),
            k.stride(0),
            cos_sin.stride(0),
            NQ=nq,
            NK=nk,
            NQ_PAD=triton.next_power_of_2(nq),
            NK_PAD=triton.next_power_of_2(nk),
            HALF=head_dim // 2,
            num_warps=4,
            **pdl.kernel_kwargs(),
        )
    return q, k


def silu_and_mul(x: torch.Tensor) -> torch.Tensor:
    """silu(x[:, :n]) * x[:, n:] for x = [gate | up]."""
    n_rows, two_n = x.shape
    n = two_n // 2
    out = torch.empty((n_rows, n), dtype=x.dtype, device=x.device)
    block = 1024
    if n_rows:
        _silu_and_mul_kernel[(n_rows, triton.cdiv(n, block))](
            x,
            out,
            x.stride(0),
            out.stride(0),
            n,
            BLOCK=block,
            num_warps=4,
            **pdl.kernel_kwargs(),
        )
    return out


# ----------------------------------------------------------------------------------------
# module transformation
# ----------------------------------------------------------------------------------------
def _fusable(x: torch.Tensor) -> bool:
    return (
        x.is_cuda
        and x.dtype in (torch.bfloat16, torch.float16)
        and x.dim() == 2
        and x.stride(-1) == 1
    )


class FusedRMSNorm(RMSNorm):
    def forward(self, x, residual=None):  # type: ignore[override]
        ok = _fusable(x) and (residual is None or _fusable(residual))
        if not ok or self.weight.dtype != x.dtype:
            return super().forward(x, residual)
        return rms_norm(x, self.weight, self.eps, residual)


class FusedSiluAndMul(SiluAndMul):
    def forward(self, x):  # type: ignore[override]
        if not _fusable(x):
            return super().forward(x)
        return silu_and_mul(x)


class FusedRotaryEmbedding(RotaryEmbedding):
    def forward(self, positions, q, k):  # type: ignore[override]
        hd = self.head_dim
        ok = (
            _fusable(q)
            and _fusable(k)
            and self.rotary_dim == hd
            and hd % 2 == 0
            and (hd // 2) & (hd // 2 - 1) == 0
            and self.cos_sin_cache.dtype == q.dtype
            and q.dtype == k.dtype
            and positions.is_cuda
        )
        if not ok:
            return super().forward(positions, q, k)
        return apply_rotary_(positions, q, k, self.cos_sin_cache, hd)


_SWAPS: dict[type, type] = {
    RMSNorm: FusedRMSNorm,
    SiluAndMul: FusedSiluAndMul,
    RotaryEmbedding: FusedRotaryEmbedding,
}


def fuse_small_ops(model: nn.Module) -> int:
    """Swap norm / rotary / activation modules for their fused subclasses; returns the count.

    Only exact classes are swapped, so a model-specific subclass keeps its own code.
    """
    n = 0
    for mod in model.modules():
        fused = _SWAPS.get(type(mod))
        if fused is not None:
            mod.__class__ = fused
            n += 1
    return n
