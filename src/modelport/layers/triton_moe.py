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

import functools
import os

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
                gate_up: tuple, down: tuple, block_n: int, num_warps: int,
                elsewhere: bool = False) -> torch.Tensor:
    """The two launches of every grouped GEMM kernel (bf16, FP8, integer codes): gate/up with
    SiLU into [M, inter], then down times the routing weights into [M, hidden], summed over
    each token's k experts. ``gate_up`` / ``down``: (the weight tensors the kernel reads
    after its input, their strides, extra constexprs) of each launch, in the kernel's order.
    ``elsewhere`` (expert parallelism): id ``num_experts`` marks an assignment to another
    rank's expert; its blocks are skipped and its rows add zero."""
    t, k = ids.shape
    x = x.contiguous()
    m, bm, sorted_rows, block_expert, row_weights, precision = routing_plan(
        x, weights, ids, num_experts + elsewhere)
    if elsewhere:  # the kernels skip a block whose expert is -1
        block_expert = torch.where(block_expert == num_experts, -1, block_expert)
    nb = block_expert.numel()
    a = x
    for (tensors, strides, extra), n, kk, gated in ((gate_up, inter, hidden, True),
                                                   (down, hidden, inter, False)):
        # rows of skipped blocks are never written: zeros where they reach the sum
        new = torch.zeros if elsewhere and not gated else torch.empty
        out = new((m, n), dtype=x.dtype, device=x.device)
        kernel[(nb, triton.cdiv(n, block_n))](
            a, *tensors, out, sorted_rows, block_expert, row_weights, n, kk, m,
            a.stride(0), *strides, out.stride(0),
            TOP_K=k if gated else 1, GATED=gated, MUL_WEIGHT=not gated, PRECISION=precision,
            BLOCK_M=bm, BLOCK_N=block_n, num_warps=num_warps, **extra)
        a = out
    return a.view(t, k, hidden).sum(dim=1)


def fused_experts(x: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor,
                  weights: torch.Tensor, ids: torch.Tensor,
                  block_n: int = 64, block_k: int = 64, num_warps: int = 4,
                  elsewhere: bool = False) -> torch.Tensor:
    """The routed experts' weighted sum for x [T, H] (w13 [E, 2I, H], w2 [E, H, I]).
    ``elsewhere`` (expert parallelism): id E marks an assignment to another rank's expert,
    at weight 0; the grouped GEMM skips it, the few-token GEMVs run expert 0 for it (each
    reads every id; a weight of 0 adds nothing)."""
    e, two_i, h = w13.shape
    w13, w2 = w13.contiguous(), w2.contiguous()
    if moe_gemv_applies(*ids.shape):
        if elsewhere:
            ids = torch.where(ids == e, 0, ids)
        return small_batch_experts(x, w13, w2, weights, ids)
    tile = {"BLOCK_K": block_k}
    return grouped_mlp(moe_gemm_kernel, x, weights, ids, e, two_i // 2, h,
                       ((w13,), (w13.stride(0), w13.stride(1)), tile),
                       ((w2,), (w2.stride(0), w2.stride(1)), tile), block_n, num_warps,
                       elsewhere)


# ----------------------------------------------------------------------------------------
# Few tokens (decode): routing and the experts in three launches
# ----------------------------------------------------------------------------------------
# At one token a step the layer above is ~40 small launches (softmax, top-k, the
# renormalization, align's sort / scatter / cumsum / searchsorted, the two grouped GEMMs
# with 16-row blocks holding one real row, the k-sum): on an H100, Qwen1.5-MoE-A2.7B's shape
# ran 1,349 kernels a decode step for 4.66 ms of ITL while its 2.7B active weights need
# ~1.6 ms of reads. Below MOE_GEMV_MAX (token, expert) assignments the layer instead runs
# ``route_topk`` (softmax, top-k and renormalization in one program per token) and two
# CUDA-core GEMVs that read each assignment's expert id themselves: gate/up with SiLU for
# every assignment, then down, weighted and summed over each token's k experts in the same
# program. Expert weights are read once per assignment (when two tokens share an expert the
# second read mostly hits L2), which is what a few tokens over many experts read anyway.
# MODELPORT_MOE_GEMV_MAX=0 turns it off. 4-bit / 8-bit integer experts (AWQ, GPTQ) have the
# same two GEMVs (triton_moe_quant.small_batch_experts_int): one H100, Qwen1.5-MoE-A2.7B's
# shape with AWQ experts, single stream ITL 17.54 ms with the grouped GEMM vs 3.70 ms
# (bench/results/2026-12-06-h100-s33-moe-w3-awq-gemv-int-ab.jsonl); MODELPORT_MOE_GEMV_INT=0
# keeps the grouped GEMM for them.
MOE_GEMV_MAX = int(os.environ.get("MODELPORT_MOE_GEMV_MAX", "32"))
MOE_GEMV_INT = os.environ.get("MODELPORT_MOE_GEMV_INT", "1") == "1"


def moe_gemv_applies(tokens: int, top_k: int, integer: bool = False) -> bool:
    """Whether ``tokens`` x ``top_k`` assignments take the few-token path (``integer``: for
    experts in integer codes, unless MODELPORT_MOE_GEMV_INT=0)."""
    return 0 < tokens * top_k <= MOE_GEMV_MAX and (MOE_GEMV_INT or not integer)


@triton.jit
def route_topk_kernel(
    logits_ptr, weights_ptr, ids_ptr, E, stride_l,
    TOP_K: tl.constexpr, KP: tl.constexpr, BLOCK_E: tl.constexpr, RENORM: tl.constexpr,
):
    """softmax over E in float32, the TOP_K largest (descending; among equal values the
    lowest expert), optionally divided by their sum: what ``fused_moe.route`` computes."""
    t = tl.program_id(0)
    offs = tl.arange(0, BLOCK_E)
    ok = offs < E
    lg = tl.load(logits_ptr + t * stride_l + offs, mask=ok, other=float("-inf")).to(tl.float32)
    p = tl.exp(lg - tl.max(lg, 0))
    p = tl.where(ok, p, 0.0)
    p = p / tl.sum(p, 0)
    slots = tl.arange(0, KP)
    vals = tl.zeros([KP], dtype=tl.float32)
    idx = tl.zeros([KP], dtype=tl.int32)
    for j in tl.static_range(TOP_K):
        best = tl.max(tl.where(ok, p, -1.0), 0)
        e = tl.min(tl.where(ok & (p == best), offs, BLOCK_E), 0)
        vals = tl.where(slots == j, best, vals)
        idx = tl.where(slots == j, e, idx)
        ok = ok & (offs != e)
    if RENORM:
        vals = vals / tl.sum(vals, 0)
    tl.store(weights_ptr + t * TOP_K + slots, vals, mask=slots < TOP_K)
    tl.store(ids_ptr + t * TOP_K + slots, idx, mask=slots < TOP_K)


def route_topk(router_logits: torch.Tensor, top_k: int, renormalize: bool
               ) -> tuple[torch.Tensor, torch.Tensor]:
    """``fused_moe.route`` in one launch: (weights [T, k] float32, ids [T, k] int32)."""
    t, e = router_logits.shape
    weights = torch.empty((t, top_k), dtype=torch.float32, device=router_logits.device)
    ids = torch.empty((t, top_k), dtype=torch.int32, device=router_logits.device)
    if t:
        route_topk_kernel[(t,)](
            router_logits, weights, ids, e, router_logits.stride(0), TOP_K=top_k,
            KP=triton.next_power_of_2(top_k), BLOCK_E=triton.next_power_of_2(e),
            RENORM=renormalize, num_warps=1 if e <= 256 else 4,
        )  # fmt: skip
    return weights, ids


@triton.jit
def moe_gemv_gate_up_kernel(
    x_ptr, w_ptr, s_ptr, ids_ptr, act_ptr, INTER, HIDDEN,
    stride_xm, stride_we, stride_wn, stride_se, stride_am,
    TOP_K: tl.constexpr, HAS_SCALE: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """act[a] = silu(x[a // TOP_K] Wg[e]^T) * (x[a // TOP_K] Wu[e]^T), e = ids[a]: program
    (a, n) computes BLOCK_N columns of assignment a (w: [E, 2I, HIDDEN], gate rows first;
    HAS_SCALE: FP8 codes times a float32 scale per row, s [E, 2I])."""
    a = tl.program_id(0)
    offs_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    n_ok = offs_n < INTER
    e = tl.load(ids_ptr + a).to(tl.int64)
    x_row = x_ptr + (a // TOP_K).to(tl.int64) * stride_xm
    w_g = w_ptr + e * stride_we + offs_n.to(tl.int64)[:, None] * stride_wn
    w_u = w_g + INTER * stride_wn
    offs_k = tl.arange(0, BLOCK_K)
    acc_g = tl.zeros([BLOCK_N, BLOCK_K], dtype=tl.float32)
    acc_u = tl.zeros([BLOCK_N, BLOCK_K], dtype=tl.float32)
    for k0 in range(0, HIDDEN, BLOCK_K):
        kk = k0 + offs_k
        k_ok = kk < HIDDEN
        xv = tl.load(x_row + kk, mask=k_ok, other=0.0).to(tl.float32)[None, :]
        m = n_ok[:, None] & k_ok[None, :]
        acc_g += tl.load(w_g + kk[None, :], mask=m, other=0.0).to(tl.float32) * xv
        acc_u += tl.load(w_u + kk[None, :], mask=m, other=0.0).to(tl.float32) * xv
    g = tl.sum(acc_g, 1)
    u = tl.sum(acc_u, 1)
    if HAS_SCALE:
        g *= tl.load(s_ptr + e * stride_se + offs_n, mask=n_ok, other=0.0)
        u *= tl.load(s_ptr + e * stride_se + INTER + offs_n, mask=n_ok, other=0.0)
    h = g / (1.0 + tl.exp(-g)) * u
    tl.store(act_ptr + a * stride_am + offs_n, h.to(act_ptr.dtype.element_ty), mask=n_ok)


@triton.jit
def moe_gemv_down_kernel(
    act_ptr, w_ptr, s_ptr, ids_ptr, rw_ptr, y_ptr, HIDDEN, INTER,
    stride_am, stride_we, stride_wn, stride_se, stride_ym,
    TOP_K: tl.constexpr, HAS_SCALE: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """y[t] = sum_j rw[t, j] * act[t * TOP_K + j] W2[ids[t, j]]^T, float32 throughout, one
    rounding at the store: program (t, n) computes BLOCK_N outputs of token t."""
    t = tl.program_id(0)
    offs_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    n_ok = offs_n < HIDDEN
    offs_k = tl.arange(0, BLOCK_K)
    out = tl.zeros([BLOCK_N], dtype=tl.float32)
    for j in tl.static_range(TOP_K):
        a = t * TOP_K + j
        e = tl.load(ids_ptr + a).to(tl.int64)
        a_row = act_ptr + a.to(tl.int64) * stride_am
        w_rows = w_ptr + e * stride_we + offs_n.to(tl.int64)[:, None] * stride_wn
        acc = tl.zeros([BLOCK_N, BLOCK_K], dtype=tl.float32)
        for k0 in range(0, INTER, BLOCK_K):
            kk = k0 + offs_k
            k_ok = kk < INTER
            av = tl.load(a_row + kk, mask=k_ok, other=0.0).to(tl.float32)[None, :]
            w = tl.load(w_rows + kk[None, :], mask=n_ok[:, None] & k_ok[None, :], other=0.0)
            acc += w.to(tl.float32) * av
        part = tl.sum(acc, 1)
        if HAS_SCALE:
            part *= tl.load(s_ptr + e * stride_se + offs_n, mask=n_ok, other=0.0)
        out += tl.load(rw_ptr + a) * part
    tl.store(y_ptr + t * stride_ym + offs_n, out.to(y_ptr.dtype.element_ty), mask=n_ok)


# (BLOCK_N, BLOCK_K, num_warps): autotuned per (hidden, intermediate, TOP_K, scaled) at the
# first call (the decode graphs run each batch size eagerly before capturing it); none of
# them spills registers on sm_90 with bf16 or FP8 weights (tests/test_moe_few_tokens.py)
MOE_GEMV_CONFIGS = ((4, 512, 4), (8, 256, 4), (8, 512, 4), (16, 128, 4), (16, 256, 8),
                    (32, 128, 8))


@functools.cache
def _gemv_tuned(down: bool):  # noqa: ANN202
    configs = [triton.Config({"BLOCK_N": bn, "BLOCK_K": bk}, num_warps=w, num_stages=2)
               for bn, bk, w in MOE_GEMV_CONFIGS]
    kernel = moe_gemv_down_kernel if down else moe_gemv_gate_up_kernel
    key = ["HIDDEN", "INTER", "TOP_K", "HAS_SCALE"]
    return triton.autotune(configs=configs, key=key, cache_results=True)(kernel)


def small_batch_experts(x: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor,
                        weights: torch.Tensor, ids: torch.Tensor,
                        s13: torch.Tensor | None = None, s2: torch.Tensor | None = None,
                        config: tuple[int, int, int] | None = None) -> torch.Tensor:
    """The routed experts' weighted sum for a few tokens x [T, H] in two launches (w13
    [E, 2I, H], w2 [E, H, I]; FP8 codes with s13 [E, 2I], s2 [E, H] per-row scales).
    ``config`` (BLOCK_N, BLOCK_K, warps): that launch config instead of the autotuned one."""
    t, k = ids.shape
    e, two_i, h = w13.shape
    inter = two_i // 2
    x = x.contiguous()
    ids = ids.contiguous()
    rw = weights.reshape(-1).float().contiguous()
    scaled = s13 is not None
    act = torch.empty((t * k, inter), dtype=x.dtype, device=x.device)
    y = torch.empty((t, h), dtype=x.dtype, device=x.device)
    s13_, s2_ = (s13, s2) if scaled else (w13, w2)  # unread without HAS_SCALE
    gu_args = (x, w13, s13_, ids, act, inter, h, x.stride(0), w13.stride(0), w13.stride(1),
               s13_.stride(0), act.stride(0))
    dn_args = (act, w2, s2_, ids, rw, y, h, inter, act.stride(0), w2.stride(0), w2.stride(1),
               s2_.stride(0), y.stride(0))
    if config is None and os.environ.get("TRITON_INTERPRET") == "1":
        config = (8, 256, 4)  # nothing to time in the interpreter (CPU tests)
    if config is None:
        _gemv_tuned(False)[lambda c: (t * k, triton.cdiv(inter, c["BLOCK_N"]))](
            *gu_args, TOP_K=k, HAS_SCALE=scaled)
        _gemv_tuned(True)[lambda c: (t, triton.cdiv(h, c["BLOCK_N"]))](
            *dn_args, TOP_K=k, HAS_SCALE=scaled)
    else:
        bn, bk, w = config
        meta = {"TOP_K": k, "HAS_SCALE": scaled, "BLOCK_N": bn, "BLOCK_K": bk, "num_warps": w}
        moe_gemv_gate_up_kernel[(t * k, triton.cdiv(inter, bn))](*gu_args, **meta)
        moe_gemv_down_kernel[(t, triton.cdiv(h, bn))](*dn_args, **meta)
    return y
