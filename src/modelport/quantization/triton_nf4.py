"""CUDA kernels (Triton) for bitsandbytes NF4 weights, kept at 4 bits on the GPU.

Stored per layer (``nf4.NF4LinearMethod`` on CUDA):

* ``packed`` uint8 [N, K / 2]: two codes a byte, the first (even input column) in the high
  nibble: bitsandbytes' own byte order, row by row;
* ``absmax`` float32 [N, K / QB]: one scale per block of QB input columns;
* ``table`` float32 [16]: the NF4 code book. w[n, k] = table[code] * absmax[n, k // QB].

Two kernels read it:

* ``gemv`` (1..GEMV_MAX_M rows of x: decode): a program owns BLOCK_N output rows and walks all
  of K, S quant blocks a step. Each code is looked up in the 64-byte table (an L1-resident
  gather), multiplied by its activation in fp32, summed per quant block and scaled once per
  block by absmax.
* ``dequant`` (more rows): the weight expanded to [N, K] in the activation dtype in a scratch
  tensor (table value x absmax in fp32, rounded once), then cuBLAS.

Checked against the reference dequantization in the Triton interpreter; the GPU tests are in
tests/test_quant_gpu.py.
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F

GEMV_MAX_M = 4  # rows of x served by the GEMV kernel; more rows: dequant + cuBLAS
GEMV_BLOCK_N = 32
DEQUANT_BLOCK_N = 32
MAX_QB = 256  # widest quant block the kernels take in one tile (bnb's default is 64)


def fits(k: int, qb: int) -> bool:
    """Whether the kernels take this layout: a power-of-two quant block of 16..MAX_QB
    columns that divides K."""
    return 16 <= qb <= MAX_QB and qb & (qb - 1) == 0 and k % qb == 0


def pack_rows(codes: torch.Tensor) -> torch.Tensor:
    """codes uint8 [N, K] (K even) -> [N, K / 2], the even column in the high nibble."""
    c = codes.to(torch.uint8)
    return ((c[:, 0::2] << 4) | c[:, 1::2]).contiguous()


def _steps(n_blocks: int) -> int:
    """Quant blocks a GEMV step takes: the largest of 4, 2, 1 dividing the row's count."""
    return next(s for s in (4, 2, 1) if n_blocks % s == 0)


@functools.cache
def _kernels():  # noqa: ANN202 - built lazily so importing this module never needs triton
    import triton
    import triton.language as tl

    @triton.jit
    def gemv(x_ptr, w_ptr, am_ptr, t_ptr, y_ptr, N, stride_xm, stride_ym,
             K: tl.constexpr, QB: tl.constexpr, S: tl.constexpr, M: tl.constexpr,
             MP: tl.constexpr, BLOCK_N: tl.constexpr):
        HB: tl.constexpr = QB // 2  # bytes of one quant block
        SB: tl.constexpr = S * HB  # bytes a row a step
        NQ: tl.constexpr = K // QB
        rn = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
        nmask = rn < N
        rj = tl.arange(0, SB)
        rs = tl.arange(0, S)
        rm = tl.arange(0, MP)
        w_rows = w_ptr + rn.to(tl.int64)[:, None] * (K // 2)
        am_rows = am_ptr + rn.to(tl.int64)[:, None] * NQ
        acc = tl.zeros([MP, BLOCK_N], dtype=tl.float32)
        for g in range(0, NQ // S):
            b = tl.load(w_rows + g * SB + rj[None, :], mask=nmask[:, None], other=0).to(tl.int32)
            hi = tl.load(t_ptr + (b >> 4))  # [BLOCK_N, SB] values of the even columns
            lo = tl.load(t_ptr + (b & 15))  # and of the odd ones
            am = tl.load(am_rows + g * S + rs[None, :], mask=nmask[:, None], other=0.0)
            k0 = g * S * QB
            for m in tl.static_range(M):
                xe = tl.load(x_ptr + m * stride_xm + k0 + 2 * rj).to(tl.float32)
                xo = tl.load(x_ptr + m * stride_xm + k0 + 2 * rj + 1).to(tl.float32)
                p = hi * xe[None, :] + lo * xo[None, :]
                p = tl.sum(tl.reshape(p, (BLOCK_N, S, HB)), axis=2)  # per quant block
                p = tl.sum(p * am, axis=1)
                acc = tl.where(rm[:, None] == m, acc + p[None, :], acc)
        out = y_ptr + rm[:, None] * stride_ym + rn[None, :]
        tl.store(out, acc.to(y_ptr.dtype.element_ty), mask=(rm[:, None] < M) & nmask[None, :])

    @triton.jit
    def dequant(w_ptr, am_ptr, t_ptr, out_ptr, N, K: tl.constexpr, QB: tl.constexpr,
                BLOCK_N: tl.constexpr):
        """One [BLOCK_N, QB] tile a program: one quant block of BLOCK_N rows."""
        HB: tl.constexpr = QB // 2
        rn = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
        g = tl.program_id(1)
        nmask = rn < N
        rj = tl.arange(0, HB)
        rows = rn.to(tl.int64)[:, None]
        b = tl.load(w_ptr + rows * (K // 2) + g * HB + rj[None, :], mask=nmask[:, None],
                    other=0).to(tl.int32)
        am = tl.load(am_ptr + rn.to(tl.int64) * (K // QB) + g, mask=nmask, other=0.0)[:, None]
        dt = out_ptr.dtype.element_ty
        out = out_ptr + rows * K + g * QB + 2 * rj[None, :]
        tl.store(out, (tl.load(t_ptr + (b >> 4)) * am).to(dt), mask=nmask[:, None])
        tl.store(out + 1, (tl.load(t_ptr + (b & 15)) * am).to(dt), mask=nmask[:, None])

    return gemv, dequant


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def gemv(x2: torch.Tensor, packed: torch.Tensor, absmax: torch.Tensor,
         table: torch.Tensor) -> torch.Tensor:
    """x2 [m <= GEMV_MAX_M, K] contiguous -> y [m, N] in x2's dtype."""
    m, k = x2.shape
    n = packed.shape[0]
    qb = k // absmax.shape[1]
    y = torch.empty((m, n), dtype=x2.dtype, device=x2.device)
    _kernels()[0][(_cdiv(n, GEMV_BLOCK_N),)](
        x2, packed, absmax, table, y, n, x2.stride(0), y.stride(0), K=k, QB=qb,
        S=_steps(k // qb), M=m, MP=max(2, 1 << (m - 1).bit_length()), BLOCK_N=GEMV_BLOCK_N,
        num_warps=4,
    )  # fmt: skip
    return y


def dequantize(packed: torch.Tensor, absmax: torch.Tensor, table: torch.Tensor,
               dtype: torch.dtype) -> torch.Tensor:
    """The weight [N, K] in dtype: a scratch tensor, one launch."""
    n, k = packed.shape[0], packed.shape[1] * 2
    qb = k // absmax.shape[1]
    w = torch.empty((n, k), dtype=dtype, device=packed.device)
    _kernels()[1][(_cdiv(n, DEQUANT_BLOCK_N), k // qb)](
        packed, absmax, table, w, n, K=k, QB=qb, BLOCK_N=DEQUANT_BLOCK_N, num_warps=4)
    return w


def linear(x: torch.Tensor, packed: torch.Tensor, absmax: torch.Tensor, table: torch.Tensor,
           bias: torch.Tensor | None) -> torch.Tensor:
    """y = x W^T + bias for an NF4 weight kept packed (see the module docstring)."""
    k = packed.shape[1] * 2
    x2 = x.reshape(-1, k)
    if 0 < x2.shape[0] <= GEMV_MAX_M:
        y = gemv(x2.contiguous(), packed, absmax, table)
        if bias is not None:
            y = y + bias
    else:
        y = F.linear(x2, dequantize(packed, absmax, table, x.dtype), bias)
    return y.reshape(*x.shape[:-1], packed.shape[0])
