"""Grouped GEMM for mixture-of-experts on CUDA (Triton), safe inside CUDA-graph capture.

A step's T tokens pick k experts each: M = T * k (token, expert) assignments. ``align``
sorts the assignments by expert and pads each expert's run to a multiple of BLOCK_M, so a
block of BLOCK_M sorted rows belongs to one expert; the kernel's program for block b reads
that expert's weights once and multiplies them with the block's rows gathered from x.
Two launches do the whole layer:

1. gate/up (``GATED``): act[a] = silu(x[tok(a)] W_gate[e]^T) * (x[tok(a)] W_up[e]^T) for each
   assignment a of expert e; the two halves of w13 are multiplied in the same program so the
   [M, 2I] intermediate never exists;
2. down: y[a] = weight[a] * act[a] W_down[e]^T, then y.view(T, k, H).sum(1).

No shape depends on the routing: the padded length is bounded by cdiv(M, BLOCK_M) + min(E, M)
blocks (each non-empty expert wastes less than one block), blocks past the real end carry
expert -1 and return at once, padded rows hold the sentinel M and are masked. The sort,
counts and offsets are plain torch ops without a host sync, so a CUDA graph can capture it.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def block_rows(sorted_ptr, pid_m, num_rows, TOP_K: tl.constexpr, BLOCK_M: tl.constexpr):
    """The assignment rows of block pid_m, which are real (< num_rows), and the x row each
    reads (TOP_K: a row r reads x[r // TOP_K]; 1: the input is per assignment)."""
    rows = tl.load(sorted_ptr + pid_m * BLOCK_M + tl.arange(0, BLOCK_M))
    return rows, rows < num_rows, (rows // TOP_K).to(tl.int64)


@triton.jit
def store_rows(acc, acc_up, rows, row_ok, offs_n, n_ok, out_ptr, weight_ptr, stride_om,
               GATED: tl.constexpr, MUL_WEIGHT: tl.constexpr):
    """The epilogue of every grouped GEMM: silu(gate) * up (GATED), times the row's routing
    weight (MUL_WEIGHT), stored at the block's rows."""
    if GATED:
        acc = acc / (1.0 + tl.exp(-acc)) * acc_up
    if MUL_WEIGHT:
        acc = acc * tl.load(weight_ptr + rows, mask=row_ok, other=0.0)[:, None]
    out = out_ptr + rows[:, None].to(tl.int64) * stride_om + offs_n[None, :]
    tl.store(out, acc.to(out_ptr.dtype.element_ty), mask=row_ok[:, None] & n_ok[None, :])


@triton.jit
def moe_gemm_kernel(
    a_ptr, w_ptr, out_ptr, sorted_ptr, block_expert_ptr, weight_ptr,
    N, K, num_rows,
    stride_am, stride_we, stride_wn, stride_om,
    TOP_K: tl.constexpr,  # a row r of the block reads a[r // TOP_K] (1: a is per assignment)
    GATED: tl.constexpr,  # w holds [gate; up] (2N rows): out = silu(a W_g^T) * (a W_u^T)
    MUL_WEIGHT: tl.constexpr,  # scale row r of the result by weight[r]
    PRECISION: tl.constexpr,  # tl.dot input_precision: "ieee" keeps float32 models exact
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    expert = tl.load(block_expert_ptr + pid_m)
    if expert < 0:  # a block past the last expert's padded run
        return
    rows, row_ok, a_rows = block_rows(sorted_ptr, pid_m, num_rows, TOP_K, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_ok = offs_n < N
    offs_k = tl.arange(0, BLOCK_K)
    w_base = w_ptr + expert.to(tl.int64) * stride_we
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    acc_up = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        k_ok = (k0 + offs_k) < K
        a = tl.load(a_ptr + a_rows[:, None] * stride_am + (k0 + offs_k)[None, :],
                    mask=row_ok[:, None] & k_ok[None, :], other=0.0)
        w_mask = k_ok[:, None] & n_ok[None, :]
        w_off = offs_n[None, :].to(tl.int64) * stride_wn + (k0 + offs_k)[:, None]
        w = tl.load(w_base + w_off, mask=w_mask, other=0.0)  # [BLOCK_K, BLOCK_N]
        acc = tl.dot(a, w, acc, input_precision=PRECISION)
        if GATED:
            w_up = tl.load(w_base + N * stride_wn + w_off, mask=w_mask, other=0.0)
            acc_up = tl.dot(a, w_up, acc_up, input_precision=PRECISION)
    store_rows(acc, acc_up, rows, row_ok, offs_n, n_ok, out_ptr, weight_ptr, stride_om,
               GATED, MUL_WEIGHT)


def block_m_for(num_rows: int, num_experts: int) -> int:
    """Rows per block: 16 while experts see few rows each (decode), 64 once they see many."""
    return 16 if num_rows <= 32 * num_experts else 64


def align(ids: torch.Tensor, num_experts: int, block_m: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(sorted_rows [NB * block_m] int32, block_expert [NB] int32) for ids [T, k].

    sorted_rows lists assignment indices (t * k + j) grouped by expert, each group padded
    with the sentinel T * k to a multiple of block_m; block_expert[b] is the expert of block
    b, -1 past the end. NB is the worst case over all routings, fixed by T, k and E.
    """
    m = ids.numel()
    flat = ids.reshape(-1).long()
    counts = torch.zeros(num_experts, dtype=torch.long, device=ids.device)
    counts.scatter_add_(0, flat, torch.ones_like(flat))
    padded = (counts + block_m - 1) // block_m * block_m
    pad_end = torch.cumsum(padded, 0)
    pad_start = pad_end - padded
    count_start = torch.cumsum(counts, 0) - counts
    order = torch.argsort(flat, stable=True)
    expert_of = flat.index_select(0, order)
    rank = torch.arange(m, device=ids.device) - count_start.index_select(0, expert_of)
    dest = pad_start.index_select(0, expert_of) + rank
    num_blocks = triton.cdiv(m, block_m) + min(num_experts, m)
    sorted_rows = torch.full((num_blocks * block_m,), m, dtype=torch.int32, device=ids.device)
    sorted_rows.scatter_(0, dest, order.to(torch.int32))
    starts = torch.arange(num_blocks, device=ids.device) * block_m
    block_expert = torch.searchsorted(pad_end, starts, right=True)
    block_expert = torch.where(block_expert < num_experts, block_expert, -1).to(torch.int32)
    return sorted_rows, block_expert


def routing_plan(x: torch.Tensor, weights: torch.Tensor, ids: torch.Tensor, num_experts: int
                 ) -> tuple[int, int, torch.Tensor, torch.Tensor, torch.Tensor, str]:
    """What every grouped GEMM launch of a step shares: (assignments M, BLOCK_M, sorted rows,
    block experts, routing weights as float32 rows, tl.dot precision)."""
    m = ids.numel()
    bm = block_m_for(m, num_experts)
    sorted_rows, block_expert = align(ids, num_experts, bm)
    row_weights = weights.reshape(-1).float().contiguous()
    precision = "ieee" if x.dtype == torch.float32 else "tf32"  # tf32: unused for 16-bit
    return m, bm, sorted_rows, block_expert, row_weights, precision


def grouped_mlp(kernel, x: torch.Tensor, weights: torch.Tensor, ids: torch.Tensor,
                num_experts: int, inter: int, hidden: int,
                gate_up: tuple, down: tuple, block_n: int, num_warps: int) -> torch.Tensor:
    """The two launches of every grouped GEMM kernel (bf16, FP8, integer codes): gate/up with
    SiLU into [M, inter], then down times the routing weights into [M, hidden], summed over
    each token's k experts. ``gate_up`` / ``down``: (the weight tensors the kernel reads
    after its input, their strides, extra constexprs) of each launch, in the kernel's order."""
    t, k = ids.shape
    x = x.contiguous()
    m, bm, sorted_rows, block_expert, row_weights, precision = routing_plan(
        x, weights, ids, num_experts)
    nb = block_expert.numel()
    a = x
    for (tensors, strides, extra), n, kk, gated in ((gate_up, inter, hidden, True),
                                                   (down, hidden, inter, False)):
        out = torch.empty((m, n), dtype=x.dtype, device=x.device)
        kernel[(nb, triton.cdiv(n, block_n))](
            a, *tensors, out, sorted_rows, block_expert, row_weights, n, kk, m,
            a.stride(0), *strides, out.stride(0),
            TOP_K=k if gated else 1, GATED=gated, MUL_WEIGHT=not gated, PRECISION=precision,
            BLOCK_M=bm, BLOCK_N=block_n, num_warps=num_warps, **extra)
        a = out
    return a.view(t, k, hidden).sum(dim=1)


def fused_experts(x: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor,
                  weights: torch.Tensor, ids: torch.Tensor,
                  block_n: int = 64, block_k: int = 64, num_warps: int = 4) -> torch.Tensor:
    """The routed experts' weighted sum for x [T, H] (w13 [E, 2I, H], w2 [E, H, I])."""
    e, two_i, h = w13.shape
    w13, w2 = w13.contiguous(), w2.contiguous()
    tile = {"BLOCK_K": block_k}
    return grouped_mlp(moe_gemm_kernel, x, weights, ids, e, two_i // 2, h,
                       ((w13,), (w13.stride(0), w13.stride(1)), tile),
                       ((w2,), (w2.stride(0), w2.stride(1)), tile), block_n, num_warps)
