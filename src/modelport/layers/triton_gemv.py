"""Skinny matrix products (a few rows of activations x a weight matrix) for CUDA decode.

At batch 1-4 a decode step is a stream of weight bytes: every linear layer reads its whole
matrix to produce a handful of outputs. cuBLAS picks GEMM tilings that leave part of the
memory bandwidth unused at these shapes (BENCH.md: ~70% of the floor for a graph-captured
8B step). This kernel is a plain streaming GEMV: each program owns a few output rows,
walks the reduction dimension in wide, contiguous chunks of those rows, and keeps a float32
accumulator per activation row. The kernel takes M <= MAX_ROWS; the module swap
(``use_gemv_for_decode``, on by default on CUDA) routes only single-row calls here
(DECODE_ROWS): at 2-4 rows cuBLAS is faster (bench/results/2026-11-29-h200-kernels.jsonl),
at one row, inside a CUDA graph with PDL, this kernel is (W3 ITL 4.58 vs 4.70 ms on the H200,
bench/results/2026-12-04-h200-w3-pdl.jsonl). ``MODELPORT_TRITON_GEMV=0`` keeps cuBLAS.

With PDL each program reads its first weight block before waiting for the previous kernel.
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from modelport.layers import pdl

MAX_ROWS = 4
DECODE_ROWS = 1  # rows the module swap sends here; more go to cuBLAS


@triton.jit
def _gemv_block(w, x_ptr, kk, k_mask, stride_xm, acc0, acc1, acc2, acc3, M: tl.constexpr):
    """Add one [BLOCK_N, BLOCK_K] weight block (fp32) times each x row's slice kk."""
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
    return acc0, acc1, acc2, acc3


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
    PDL: tl.constexpr = False,
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
    # software-pipelined by hand (registers hold the next weight block while the current one
    # is multiplied); the first block is read before the PDL wait: no kernel writes weights
    k_cur = 0
    w_cur = tl.load(w_rows + offs_k[None, :], mask=n_mask[:, None] & (offs_k < K)[None, :],
                    other=0.0)
    pdl.wait(PDL)
    for k0 in range(BLOCK_K, K, BLOCK_K):
        kk = k0 + offs_k
        w_nxt = tl.load(w_rows + kk[None, :], mask=n_mask[:, None] & (kk < K)[None, :],
                        other=0.0)
        kc = k_cur + offs_k
        acc0, acc1, acc2, acc3 = _gemv_block(w_cur.to(tl.float32), x_ptr, kc, kc < K,
                                             stride_xm, acc0, acc1, acc2, acc3, M)
        w_cur = w_nxt
        k_cur = k0
    kc = k_cur + offs_k
    acc0, acc1, acc2, acc3 = _gemv_block(w_cur.to(tl.float32), x_ptr, kc, kc < K, stride_xm,
                                         acc0, acc1, acc2, acc3, M)
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


def applies(x: torch.Tensor, weight: torch.Tensor, max_rows: int = MAX_ROWS) -> bool:
    return (
        x.is_cuda
        and x.dim() == 2
        and 0 < x.shape[0] <= max_rows
        and x.stride(-1) == 1
        and weight.dim() == 2
        and weight.stride(-1) == 1
        and weight.dtype == x.dtype
        and x.dtype in (torch.bfloat16, torch.float16)
    )


# (BLOCK_N, BLOCK_K, num_warps, num_stages; the loop is pipelined by hand, so 1 stage):
# the 4x512 / 8x512 / 16x256 rows led on some of
# the Llama-3.1-8B shapes at one row (bench/results/2026-11-29-h200-kernels.jsonl, within a
# few % of each other); autotuned per (N, K, M) at the first call, cached on disk.
GEMV_CONFIGS = ((4, 512, 4, 1), (8, 512, 4, 1), (16, 256, 4, 1), (8, 1024, 4, 1),
                (4, 1024, 4, 1), (16, 512, 8, 1), (8, 256, 2, 1))


@functools.cache
def _tuned():  # noqa: ANN202
    configs = [triton.Config({"BLOCK_N": bn, "BLOCK_K": bk}, num_warps=w, num_stages=st)
               for bn, bk, w, st in GEMV_CONFIGS]
    return triton.autotune(configs=configs, key=["N", "K", "M"], cache_results=True)(_gemv_kernel)


def gemv(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    block_n: int | None = None,
    block_k: int = 512,
) -> torch.Tensor:
    """x [M <= 4, K] @ weight[N, K]^T (+ bias) -> [M, N], float32 accumulation.

    block_n None: the autotuned launch config; else this block shape (4 warps)."""
    m, k = x.shape
    n = weight.shape[0]
    y = torch.empty((m, n), dtype=x.dtype, device=x.device)
    args = (x, weight, bias if bias is not None else weight, y, n, k, x.stride(0),
            weight.stride(0), y.stride(0))
    meta = {"M": m, "HAS_BIAS": bias is not None, **pdl.kernel_kwargs()}
    if block_n is None:
        _tuned()[lambda c: (triton.cdiv(n, c["BLOCK_N"]),)](*args, **meta)
    else:
        _gemv_kernel[(triton.cdiv(n, block_n),)](*args, BLOCK_N=block_n, BLOCK_K=block_k,
                                                  num_warps=4, num_stages=1, **meta)
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
            if self.quant_method is None and applies(x, self.weight, DECODE_ROWS):
                return gemv(x, self.weight, self.bias)
            return base.forward(self, x)

        _GEMV_CLASSES[base] = type(f"Gemv{base.__name__}", (base,), {"forward": forward})
    return _GEMV_CLASSES[base]
