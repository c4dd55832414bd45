"""Skinny matrix products (a few rows of activations x a weight matrix) for CUDA decode.

At batch 1-4 a decode step is a stream of weight bytes: every linear layer reads its whole
matrix to produce a handful of outputs. cuBLAS picks GEMM tilings that leave part of the
memory bandwidth unused at these shapes (BENCH.md: ~70% of the floor for a graph-captured
8B step). This kernel is a plain streaming GEMV: each program owns a few output rows,
walks the reduction dimension in wide, contiguous chunks of those rows, and keeps a float32
accumulator per activation row. It is used only for M <= MAX_ROWS; anything larger goes
to cuBLAS, which is compute-efficient there.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

MAX_ROWS = 4


@triton.jit
def _gemv_kernel(
    x_ptr,
    w_ptr,
    b_ptr,
    y_ptr,
    N,
    K,
    stride_xm,
    stride_wn,
    stride_ym,
    M: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    pid = tl.program_id(0)
    offs_n = pid * BLOCK_N + tl.arange(0, BLOCK_N)
    n_mask = offs_n < N
    offs_k = tl.arange(0, BLOCK_K)
    w_rows = w_ptr + offs_n.to(tl.int64)[:, None] * stride_wn
    acc0 = tl.zeros([BLOCK_N], tl.float32)
    acc1 = tl.zeros([BLOCK_N], tl.float32)
    acc2 = tl.zeros([BLOCK_N], tl.float32)
    acc3 = tl.zeros([BLOCK_N], tl.float32)
    for k0 in range(0, K, BLOCK_K):
        kk = k0 + offs_k
        k_mask = kk < K
        w = tl.load(w_rows + kk[None, :], mask=n_mask[:, None] & k_mask[None, :], other=0.0).to(
            tl.float32
        )
        x0 = tl.load(x_ptr + kk, mask=k_mask, other=0.0).to(tl.float32)
        acc0 += tl.sum(w * x0[None, :], 1)
        if M > 1:
            x1 = tl.load(x_ptr + stride_xm + kk, mask=k_mask, other=0.0).to(tl.float32)
            acc1 += tl.sum(w * x1[None, :], 1)
        if M > 2:
            x2 = tl.load(x_ptr + 2 * stride_xm + kk, mask=k_mask, other=0.0).to(tl.float32)
            acc2 += tl.sum(w * x2[None, :], 1)
        if M > 3:
            x3 = tl.load(x_ptr + 3 * stride_xm + kk, mask=k_mask, other=0.0).to(tl.float32)
            acc3 += tl.sum(w * x3[None, :], 1)
    if HAS_BIAS:
        bias = tl.load(b_ptr + offs_n, mask=n_mask, other=0.0).to(tl.float32)
        acc0 += bias
        acc1 += bias
        acc2 += bias
        acc3 += bias
    dt = y_ptr.dtype.element_ty
    tl.store(y_ptr + offs_n, acc0.to(dt), mask=n_mask)
    if M > 1:
        tl.store(y_ptr + stride_ym + offs_n, acc1.to(dt), mask=n_mask)
    if M > 2:
        tl.store(y_ptr + 2 * stride_ym + offs_n, acc2.to(dt), mask=n_mask)
    if M > 3:
        tl.store(y_ptr + 3 * stride_ym + offs_n, acc3.to(dt), mask=n_mask)


def applies(x: torch.Tensor, weight: torch.Tensor) -> bool:
    return (
        x.is_cuda
        and x.dim() == 2
        and 0 < x.shape[0] <= MAX_ROWS
        and x.stride(-1) == 1
        and weight.dim() == 2
        and weight.stride(-1) == 1
        and weight.dtype == x.dtype
        and x.dtype in (torch.bfloat16, torch.float16)
    )


def gemv(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    block_n: int = 8,
    block_k: int = 512,
) -> torch.Tensor:
    """x [M <= 4, K] @ weight[N, K]^T (+ bias) -> [M, N], float32 accumulation."""
    m, k = x.shape
    n = weight.shape[0]
    y = torch.empty((m, n), dtype=x.dtype, device=x.device)
    _gemv_kernel[(triton.cdiv(n, block_n),)](
        x,
        weight,
        bias if bias is not None else weight,
        y,
        n,
        k,
        x.stride(0),
        weight.stride(0),
        y.stride(0),
        M=m,
        HAS_BIAS=bias is not None,
        BLOCK_N=block_n,
        BLOCK_K=block_k,
        num_warps=4,
        num_stages=3,
    )
    return y


def use_gemv_for_decode(model: torch.nn.Module) -> int:
    """Route small-batch calls of the model's plain linear layers through gemv(); returns
    how many modules now do. Quantized or other linear variants are left as they are."""
    from modelport.layers.linear import Linear, MergedLinear, QKVLinear

    n = 0
    for mod in model.modules():
        cls = type(mod)
        if cls in (Linear, MergedLinear, QKVLinear) and getattr(mod, "weight", None) is not None:
            mod.__class__ = _gemv_class(cls)
            n += 1
    return n


_GEMV_CLASSES: dict[type, type] = {}


def _gemv_class(base: type) -> type:
    if base not in _GEMV_CLASSES:

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            if applies(x, self.weight):
                return gemv(x, self.weight, self.bias)
            return base.forward(self, x)

        _GEMV_CLASSES[base] = type(f"Gemv{base.__name__}", (base,), {"forward": forward})
    return _GEMV_CLASSES[base]
