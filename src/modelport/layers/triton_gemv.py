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
Launch configs include per-lane accumulation (LANE_ACC, reduce once after the loop); with
them autotuned, W3 ITL went from 4.50 to 4.33-4.36 ms on the H200 (same code otherwise,
bench/results/2026-12-04-h200-w3-fused-decode.jsonl, the MODELPORT_FUSED_DECODE=0 rows).
The norm / SiLU-GLU / residual fusions (``norm=``, ``silu=``, ``glu=``, ``residual=``) serve
the opt-in fused decode layer (layers/fused_decode.py), measured slower, off by default.
"""

from __future__ import annotations

import functools
import os

import torch
import triton
import triton.language as tl

from modelport.layers import pdl
from modelport.layers.fused_ops import _round

MAX_ROWS = 4
DECODE_ROWS = 1  # rows the module swap sends here; more go to cuBLAS


@triton.jit
def _x(ptr, kk, k_mask, EVEN: tl.constexpr):
    if EVEN:
        return tl.load(ptr + kk).to(tl.float32)
    else:
        return tl.load(ptr + kk, mask=k_mask, other=0.0).to(tl.float32)


@triton.jit
def _w(w_rows, kk, n_mask, K, EVEN: tl.constexpr):
    if EVEN:
        return tl.load(w_rows + kk[None, :])
    else:
        return tl.load(w_rows + kk[None, :], mask=n_mask[:, None] & (kk < K)[None, :], other=0.0)


@triton.jit
def _acc(acc, w, x, LANE_ACC: tl.constexpr):
    if LANE_ACC:  # per-lane partial sums, reduced once after the loop
        return acc + w.to(tl.float32) * x[None, :]
    else:  # reduced across the block's threads every K step
        return acc + tl.sum(w.to(tl.float32) * x[None, :], 1)


@triton.jit
def _step(w, w2, x_ptr, aux_ptr, kk, k_mask, K, rstd, stride_xm, acc0, acc1, acc2, acc3,
          M: tl.constexpr, PRO: tl.constexpr, GLU: tl.constexpr, EVEN: tl.constexpr,
          LANE_ACC: tl.constexpr, dt: tl.constexpr):
    """Add one [BLOCK_N, BLOCK_K] weight block (and its GLU partner w2) times each x row's
    slice kk. Row 0's slice goes through the prologue PRO first:
    0: x itself; 1: RMSNorm(x) * aux, rounded as torch rounds it (rstd known);
    2: silu(x[:K]) * x[K:] (x is the [gate | up] row)."""
    if PRO == 0:
        x0 = _x(x_ptr, kk, k_mask, EVEN)
    elif PRO == 1:
        h = _x(x_ptr, kk, k_mask, EVEN)
        x0 = _round(_x(aux_ptr, kk, k_mask, EVEN) * _round(h * rstd, dt), dt)
    else:
        g = _x(x_ptr, kk, k_mask, EVEN)
        x0 = _round(_round(g / (1.0 + tl.exp(-g)), dt) * _x(x_ptr + K, kk, k_mask, EVEN), dt)
    acc0 = _acc(acc0, w, x0, LANE_ACC)
    if GLU:
        acc1 = _acc(acc1, w2, x0, LANE_ACC)
    elif M > 1:
        acc1 = _acc(acc1, w, _x(x_ptr + stride_xm, kk, k_mask, EVEN), LANE_ACC)
    if M > 2:
        acc2 = _acc(acc2, w, _x(x_ptr + 2 * stride_xm, kk, k_mask, EVEN), LANE_ACC)
    if M > 3:
        acc3 = _acc(acc3, w, _x(x_ptr + 3 * stride_xm, kk, k_mask, EVEN), LANE_ACC)
    return acc0, acc1, acc2, acc3


@triton.jit
def _sum(acc, b_ptr, offs_n, n_mask, HAS_BIAS: tl.constexpr, LANE_ACC: tl.constexpr):
    if LANE_ACC:
        y = tl.sum(acc, 1)
    else:
        y = acc
    if HAS_BIAS:
        y += tl.load(b_ptr + offs_n, mask=n_mask, other=0.0).to(tl.float32)
    return y


@triton.jit
def _gemv_kernel(
    x_ptr,
    w_ptr,
    b_ptr,
    y_ptr,
    aux_ptr,
    res_ptr,
    N,
    K,
    stride_xm,
    stride_wn,
    stride_ym,
    eps,
    M: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    PDL: tl.constexpr = False,
    EVEN: tl.constexpr = False,  # N % BLOCK_N == 0 and K % BLOCK_K == 0: no masks
    LANE_ACC: tl.constexpr = False,
    PRO: tl.constexpr = 0,  # x prologue, see _step (1, 2 take M == 1)
    GLU: tl.constexpr = False,  # W is [gate; up] (2N rows): y = silu(gate x) * (up x), M == 1
    HAS_RES: tl.constexpr = False,  # add a residual row to the output (M == 1)
):
    pid = tl.program_id(0)
    dt: tl.constexpr = y_ptr.dtype.element_ty
    offs_n = pid * BLOCK_N + tl.arange(0, BLOCK_N)
    n_mask = offs_n < N
    offs_k = tl.arange(0, BLOCK_K)
    w_rows = w_ptr + offs_n.to(tl.int64)[:, None] * stride_wn
    w_rows2 = w_ptr + (offs_n.to(tl.int64) + N)[:, None] * stride_wn  # GLU: up rows
    if LANE_ACC:
        acc0 = tl.zeros([BLOCK_N, BLOCK_K], tl.float32)
    else:
        acc0 = tl.zeros([BLOCK_N], tl.float32)
    acc1 = acc0
    acc2 = acc0
    acc3 = acc0
    # software-pipelined by hand (registers hold the next weight block while the current one
    # is multiplied); the first block is read before the PDL wait: no kernel writes weights
    k_cur = 0
    w_cur = _w(w_rows, offs_k, n_mask, K, EVEN)
    w2_cur = w_cur
    if GLU:
        w2_cur = _w(w_rows2, offs_k, n_mask, K, EVEN)
    pdl.wait(PDL)
    rstd = 1.0
    if PRO == 1:  # the row's 1/rms first: every program reads the (L2-resident) row once
        ss = tl.zeros([BLOCK_K], tl.float32)
        for k0 in range(0, K, BLOCK_K):
            h = _x(x_ptr, k0 + offs_k, k0 + offs_k < K, EVEN)
            ss += h * h
        rstd = 1.0 / tl.sqrt(tl.sum(ss, 0) / K + eps)
    for k0 in range(BLOCK_K, K, BLOCK_K):
        w_nxt = _w(w_rows, k0 + offs_k, n_mask, K, EVEN)
        w2_nxt = w_nxt
        if GLU:
            w2_nxt = _w(w_rows2, k0 + offs_k, n_mask, K, EVEN)
        kc = k_cur + offs_k
        acc0, acc1, acc2, acc3 = _step(w_cur, w2_cur, x_ptr, aux_ptr, kc, kc < K, K, rstd,
                                       stride_xm, acc0, acc1, acc2, acc3, M, PRO, GLU, EVEN,
                                       LANE_ACC, dt)
        w_cur = w_nxt
        w2_cur = w2_nxt
        k_cur = k0
    kc = k_cur + offs_k
    acc0, acc1, acc2, acc3 = _step(w_cur, w2_cur, x_ptr, aux_ptr, kc, kc < K, K, rstd,
                                   stride_xm, acc0, acc1, acc2, acc3, M, PRO, GLU, EVEN,
                                   LANE_ACC, dt)
    y = _sum(acc0, b_ptr, offs_n, n_mask, HAS_BIAS, LANE_ACC)
    if GLU:  # gate and up rounded as stored, then silu(gate) and the product, as torch
        g = _round(y, dt)
        u = _round(_sum(acc1, b_ptr + N, offs_n, n_mask, HAS_BIAS, LANE_ACC), dt)
        y = _round(g / (1.0 + tl.exp(-g)), dt) * u
    if HAS_RES:  # residual stream: round(round(W x + b) + residual), as torch would
        y = _round(y, dt) + tl.load(res_ptr + offs_n, mask=n_mask, other=0.0).to(tl.float32)
    tl.store(y_ptr + offs_n, y.to(dt), mask=n_mask)
    if M > 1:
        y = _sum(acc1, b_ptr, offs_n, n_mask, HAS_BIAS, LANE_ACC)
        tl.store(y_ptr + stride_ym + offs_n, y.to(dt), mask=n_mask)
    if M > 2:
        y = _sum(acc2, b_ptr, offs_n, n_mask, HAS_BIAS, LANE_ACC)
        tl.store(y_ptr + 2 * stride_ym + offs_n, y.to(dt), mask=n_mask)
    if M > 3:
        y = _sum(acc3, b_ptr, offs_n, n_mask, HAS_BIAS, LANE_ACC)
        tl.store(y_ptr + 3 * stride_ym + offs_n, y.to(dt), mask=n_mask)


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


# (BLOCK_N, BLOCK_K, num_warps, LANE_ACC; the loop is pipelined by hand, so 1 stage):
# the 4x512 / 8x512 / 16x256 rows led on some of the Llama-3.1-8B shapes at one row
# (bench/results/2026-11-29-h200-kernels.jsonl, within a few % of each other). LANE_ACC keeps
# [BLOCK_N, BLOCK_K] partial sums per thread and reduces once after the loop (half the
# instructions per K step on sm_90); autotuned per (N, K, M, prologue, GLU, residual) at the
# first call, cached on disk.
GEMV_CONFIGS = tuple((bn, bk, w, lane) for lane in (False, True)
                     for bn, bk, w in ((4, 512, 4), (8, 512, 4), (16, 256, 4), (8, 1024, 4)))


def _even(a: dict) -> bool:
    return a["N"] % a["BLOCK_N"] == 0 and a["K"] % a["BLOCK_K"] == 0


@functools.cache
def _tuned():  # noqa: ANN202
    configs = [triton.Config({"BLOCK_N": bn, "BLOCK_K": bk, "LANE_ACC": lane}, num_warps=w,
                             num_stages=1)
               for bn, bk, w, lane in GEMV_CONFIGS]
    even = triton.heuristics({"EVEN": _even})
    return triton.autotune(configs=configs, key=["N", "K", "M", "PRO", "GLU", "HAS_RES"],
                           cache_results=True)(even(_gemv_kernel))


def gemv(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    block_n: int | None = None,
    block_k: int = 512,
    *,
    lane_acc: bool = False,
    norm: tuple[torch.Tensor, float] | None = None,
    silu: bool = False,
    glu: bool = False,
    residual: torch.Tensor | None = None,
) -> torch.Tensor:
    """x [M <= 4, K] @ weight[N, K]^T (+ bias) -> [M, N], float32 accumulation.

    block_n None: the autotuned launch config; else this block shape (4 warps, lane_acc).
    One-row fusions of a decoder layer (each rounds as the unfused torch ops would):
    ``norm=(w, eps)``: multiply RMSNorm(x) * w instead of x;
    ``silu``: x is [gate | up] ([1, 2K]) and silu(gate) * up is multiplied; ``glu``: weight is
    [gate; up] ([2N, K]) and the output is silu(gate x) * (up x); ``residual`` [1, N]: return
    W x + b + residual (the new residual stream)."""
    m, k = x.shape
    if silu:
        k //= 2
    n = weight.shape[0] // 2 if glu else weight.shape[0]
    if weight.shape[1] != k:
        raise ValueError(f"gemv: x has {k} features, the weight {weight.shape[1]}")
    if (norm is not None or silu or glu or residual is not None) and m != 1:
        raise ValueError("gemv: the norm / silu / glu / residual fusions take one row")
    if norm is not None and silu:
        raise ValueError("gemv: norm and silu prologues are exclusive")
    y = torch.empty((m, n), dtype=x.dtype, device=x.device)
    aux, eps = norm if norm is not None else (weight, 0.0)
    pro = 1 if norm is not None else 2 if silu else 0
    args = (x, weight, bias if bias is not None else weight, y, aux,
            residual if residual is not None else y, n, k, x.stride(0), weight.stride(0),
            y.stride(0), eps)
    meta = {"M": m, "HAS_BIAS": bias is not None, "PRO": pro, "GLU": glu,
            "HAS_RES": residual is not None, **pdl.kernel_kwargs()}
    if block_n is None:
        _tuned()[lambda c: (triton.cdiv(n, c["BLOCK_N"]),)](*args, **meta)
    else:
        _gemv_kernel[(triton.cdiv(n, block_n),)](
            *args, BLOCK_N=block_n, BLOCK_K=block_k, num_warps=4, num_stages=1,
            EVEN=_even({"N": n, "K": k, "BLOCK_N": block_n, "BLOCK_K": block_k}),
            LANE_ACC=lane_acc, **meta)
    return y


def use_gemv_for_decode(model: torch.nn.Module) -> int:
    """Route small-batch calls of the model's plain linear layers through gemv(); returns
    how many modules now do. Quantized or other linear variants are left as they are.

    MoE routers and shared-expert gates (``GateLinear``, 1 to a few hundred outputs) too:
    cuBLAS took ~9 us a layer for each at one row (a GEMM tile for the router, a dot kernel
    plus a reduction for the 1-output gate; Qwen1.5-MoE-A2.7B's shape on an H100,
    bench/results/2026-12-06-h100-s32-moe-w3-bf16-gemv-ab.jsonl). MODELPORT_GEMV_GATES=0
    leaves them on cuBLAS."""
    from modelport.layers.fused_moe import GateLinear
    from modelport.layers.linear import Linear, MergedLinear, QKVLinear

    classes: tuple[type, ...] = (Linear, MergedLinear, QKVLinear)
    if os.environ.get("MODELPORT_GEMV_GATES", "1") != "0":
        classes += (GateLinear,)
    n = 0
    for mod in model.modules():
        cls = type(mod)
        if cls in classes and getattr(mod, "weight", None) is not None:
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
