"""Weight-only quantized variants of the MoE grouped GEMM (layers/triton_moe.py) on CUDA.

The routing, ``align`` and the two launches (gate/up with SiLU, then down with the routing
weights) are those of the bf16 ``fused_experts``; only the weight tile differs. Each program
loads its expert's quantized [BLOCK_K, BLOCK_N] tile, expands it in registers to the
activation dtype and feeds the same ``tl.dot``, so the weights are read at their stored
width and no dequantized copy ever exists:

* FP8 (``moe_gemm_fp8_kernel``): E4M3 weights [E, N, K] with one fp32 scale per expert and
  output channel [E, N]. E4M3 -> bf16/fp16 is exact, so the scale is applied once per output
  column to the fp32 accumulator in the epilogue (gate and up halves with their own scales).
* Integer groups (``moe_gemm_wint_kernel``, AWQ / GPTQ as ``GroupQuant``): codes packed
  along K into int32 words [E, N, K * BITS / 32] (first code in the low bits, BITS 4 or 8),
  and fp32 scales and zeros [E, N, K / GROUP]: w = code * scale + zero. A K tile never spans
  two groups (GROUP % BLOCK_K == 0), so each tile reads one scale and zero per column.

Both keep the bf16 path's properties: no host sync, every shape fixed by the token count,
so the step is captured in CUDA graphs as it is.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from modelport.layers.triton_moe import (
    block_rows,
    grouped_mlp,
    moe_gemv_applies,
    small_batch_experts,
    store_rows,
)

# Launch configs: the largest K tile and fewest warps that compile for sm_90 without register
# spills (tests/test_moe_quantized_cuda.py checks it); 64-deep tiles spill in the gated launch,
# and the expanded integer codes need 8 warps. Not yet timed on a GPU.
FP8_BLOCK_K, FP8_WARPS = 32, 4
INT_BLOCK_K, INT_WARPS = 32, 8


@triton.jit
def moe_gemm_fp8_kernel(
    a_ptr,
    w_ptr,
    s_ptr,
    out_ptr,
    sorted_ptr,
    block_expert_ptr,
    weight_ptr,
    N,
    K,
    num_rows,
    stride_am,
    stride_we,
    stride_wn,
    stride_se,
    stride_om,
    TOP_K: tl.constexpr,
    GATED: tl.constexpr,
    MUL_WEIGHT: tl.constexpr,
    PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    expert = tl.load(block_expert_ptr + pid_m)
    if expert < 0:
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
        a = tl.load(
            a_ptr + a_rows[:, None] * stride_am + (k0 + offs_k)[None, :],
            mask=row_ok[:, None] & k_ok[None, :],
            other=0.0,
        )
        w_mask = k_ok[:, None] & n_ok[None, :]
        w_off = offs_n[None, :].to(tl.int64) * stride_wn + (k0 + offs_k)[:, None]
        w = tl.load(w_base + w_off, mask=w_mask, other=0.0).to(a.dtype)
        acc = tl.dot(a, w, acc, input_precision=PRECISION)
        if GATED:
            w_up = tl.load(w_base + N * stride_wn + w_off, mask=w_mask, other=0.0).to(a.dtype)
            acc_up = tl.dot(a, w_up, acc_up, input_precision=PRECISION)
    s_base = s_ptr + expert.to(tl.int64) * stride_se
    acc = acc * tl.load(s_base + offs_n, mask=n_ok, other=0.0)[None, :]
    if GATED:
        acc_up = acc_up * tl.load(s_base + N + offs_n, mask=n_ok, other=0.0)[None, :]
    store_rows(acc, acc_up, rows, row_ok, offs_n, n_ok, out_ptr, weight_ptr, stride_om,
               GATED, MUL_WEIGHT)


@triton.jit
def _int_tile(
    base,
    offs_n,
    k,
    s_base,
    z_base,
    g,
    stride_wn,
    stride_sn,
    w_mask,
    n_ok,
    BITS: tl.constexpr,
    dtype: tl.constexpr,
):
    # [BLOCK_K, BLOCK_N] of code * scale + zero for inputs k (one group g) and columns offs_n
    per: tl.constexpr = 32 // BITS
    words = tl.load(
        base + offs_n[None, :].to(tl.int64) * stride_wn + (k // per)[:, None], mask=w_mask, other=0
    )
    codes = (words >> ((k % per) * BITS)[:, None]) & ((1 << BITS) - 1)
    s = tl.load(s_base + offs_n.to(tl.int64) * stride_sn + g, mask=n_ok, other=0.0)
    z = tl.load(z_base + offs_n.to(tl.int64) * stride_sn + g, mask=n_ok, other=0.0)
    return (codes.to(tl.float32) * s[None, :] + z[None, :]).to(dtype)


@triton.jit
def moe_gemm_wint_kernel(
    a_ptr,
    w_ptr,
    s_ptr,
    z_ptr,
    out_ptr,
    sorted_ptr,
    block_expert_ptr,
    weight_ptr,
    N,
    K,
    num_rows,
    stride_am,
    stride_we,
    stride_wn,
    stride_se,
    stride_sn,
    stride_om,
    TOP_K: tl.constexpr,
    GATED: tl.constexpr,
    MUL_WEIGHT: tl.constexpr,
    PRECISION: tl.constexpr,
    BITS: tl.constexpr,
    GROUP: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    expert = tl.load(block_expert_ptr + pid_m)
    if expert < 0:
        return
    rows, row_ok, a_rows = block_rows(sorted_ptr, pid_m, num_rows, TOP_K, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_ok = offs_n < N
    offs_k = tl.arange(0, BLOCK_K)
    w_base = w_ptr + expert.to(tl.int64) * stride_we
    s_base = s_ptr + expert.to(tl.int64) * stride_se
    z_base = z_ptr + expert.to(tl.int64) * stride_se
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    acc_up = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        k = k0 + offs_k
        k_ok = k < K
        a = tl.load(
            a_ptr + a_rows[:, None] * stride_am + k[None, :],
            mask=row_ok[:, None] & k_ok[None, :],
            other=0.0,
        )
        w_mask = k_ok[:, None] & n_ok[None, :]
        g = k0 // GROUP
        w = _int_tile(
            w_base, offs_n, k, s_base, z_base, g, stride_wn, stride_sn, w_mask, n_ok, BITS, a.dtype
        )
        acc = tl.dot(a, w, acc, input_precision=PRECISION)
        if GATED:
            w_up = _int_tile(
                w_base + N * stride_wn,
                offs_n,
                k,
                s_base + N * stride_sn,
                z_base + N * stride_sn,
                g,
                stride_wn,
                stride_sn,
                w_mask,
                n_ok,
                BITS,
                a.dtype,
            )
            acc_up = tl.dot(a, w_up, acc_up, input_precision=PRECISION)
    store_rows(acc, acc_up, rows, row_ok, offs_n, n_ok, out_ptr, weight_ptr, stride_om,
               GATED, MUL_WEIGHT)


def fused_experts_fp8(
    x: torch.Tensor,
    w13: torch.Tensor,
    s13: torch.Tensor,
    w2: torch.Tensor,
    s2: torch.Tensor,
    weights: torch.Tensor,
    ids: torch.Tensor,
    block_n: int = 64,
    block_k: int = FP8_BLOCK_K,
    num_warps: int = FP8_WARPS,
) -> torch.Tensor:
    """fused_experts with E4M3 weights w13 [E, 2I, H], w2 [E, H, I] and fp32 per-channel
    scales s13 [E, 2I], s2 [E, H]."""
    e, two_i, h = w13.shape
    if moe_gemv_applies(*ids.shape):
        return small_batch_experts(x, w13, w2, weights, ids, s13, s2)
    tile = {"BLOCK_K": block_k}
    return grouped_mlp(
        moe_gemm_fp8_kernel, x, weights, ids, e, two_i // 2, h,
        ((w13, s13), (w13.stride(0), w13.stride(1), s13.stride(0)), tile),
        ((w2, s2), (w2.stride(0), w2.stride(1), s2.stride(0)), tile),
        block_n, num_warps,
    )  # fmt: skip


def int_block_k(group: int, k: int, bits: int, block_k: int = INT_BLOCK_K) -> int:
    """The K tile for a group size: the largest of block_k, 32, 16 that divides the group
    (and K), holding whole words; ValueError if none does."""
    per = 32 // bits
    for bk in (block_k, 32, 16):
        if group % bk == 0 and k % bk == 0 and bk % per == 0:
            return bk
    raise ValueError(f"quantized MoE experts on CUDA: group size {group} is not a multiple of 16")


def fused_experts_wint(
    x: torch.Tensor,
    q13: torch.Tensor,
    s13: torch.Tensor,
    z13: torch.Tensor,
    q2: torch.Tensor,
    s2: torch.Tensor,
    z2: torch.Tensor,
    bits: int,
    group13: int,
    group2: int,
    weights: torch.Tensor,
    ids: torch.Tensor,
    block_n: int = 64,
    block_k: int = INT_BLOCK_K,
    num_warps: int = INT_WARPS,
) -> torch.Tensor:
    """fused_experts with packed integer codes q13 [E, 2I, H*bits/32], q2 [E, H, I*bits/32]
    and fp32 scales / zeros s13, z13 [E, 2I, H/group13], s2, z2 [E, H, I/group2]."""
    if moe_gemv_applies(*ids.shape, integer=True):
        return small_batch_experts_int(x, q13, s13, z13, q2, s2, z2, bits, group13, group2,
                                       weights, ids)
    e, two_i, _ = q13.shape
    i, h = two_i // 2, q2.shape[1]
    return grouped_mlp(
        moe_gemm_wint_kernel, x, weights, ids, e, i, h,
        ((q13, s13, z13), (q13.stride(0), q13.stride(1), s13.stride(0), s13.stride(1)),
         {"BITS": bits, "GROUP": group13, "BLOCK_K": int_block_k(group13, h, bits, block_k)}),
        ((q2, s2, z2), (q2.stride(0), q2.stride(1), s2.stride(0), s2.stride(1)),
         {"BITS": bits, "GROUP": group2, "BLOCK_K": int_block_k(group2, i, bits, block_k)}),
        block_n, num_warps,
    )  # fmt: skip


# -- few tokens: integer codes (AWQ / GPTQ) in two GEMV launches ----------------------------------
# The counterparts of triton_moe's few-token GEMVs for packed codes: w = code * scale + zero
# per group, so a K step inside one group adds scale * sum(code * x) + zero * sum(x) to each
# output row (BLOCK_K divides the group: ``int_block_k``).


@triton.jit
def _int_dot(q_rows, s_rows, z_rows, kk, k_ok, n_ok, xv, g, BITS: tl.constexpr):
    """sum over this K step of (code * scale + zero) * x for each row: [BLOCK_N] float32."""
    per: tl.constexpr = 32 // BITS
    words = tl.load(q_rows + (kk // per)[None, :], mask=n_ok[:, None] & k_ok[None, :], other=0)
    codes = ((words >> ((kk % per) * BITS)[None, :]) & ((1 << BITS) - 1)).to(tl.float32)
    s = tl.load(s_rows + g, mask=n_ok, other=0.0)
    z = tl.load(z_rows + g, mask=n_ok, other=0.0)
    return s * tl.sum(codes * xv[None, :], 1) + z * tl.sum(xv, 0)


@triton.jit
def moe_gemv_int_gate_up_kernel(
    x_ptr, q_ptr, s_ptr, z_ptr, ids_ptr, act_ptr, INTER, HIDDEN,
    stride_xm, stride_qe, stride_qn, stride_se, stride_sn, stride_am,
    TOP_K: tl.constexpr, BITS: tl.constexpr, GROUP: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """act[a] = silu(x Wg[e]^T) * (x Wu[e]^T) for assignment a (token a // TOP_K, expert
    ids[a]) with W = code * scale + zero: q [E, 2I, H*BITS/32], s / z [E, 2I, H/GROUP]."""
    a = tl.program_id(0)
    offs_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    n_ok = offs_n < INTER
    e = tl.load(ids_ptr + a).to(tl.int64)
    x_row = x_ptr + (a // TOP_K).to(tl.int64) * stride_xm
    rows = offs_n.to(tl.int64)
    q_g = q_ptr + e * stride_qe + rows[:, None] * stride_qn
    q_u = q_g + INTER * stride_qn
    s_g = s_ptr + e * stride_se + rows * stride_sn
    z_g = z_ptr + e * stride_se + rows * stride_sn
    s_u = s_g + INTER * stride_sn
    z_u = z_g + INTER * stride_sn
    offs_k = tl.arange(0, BLOCK_K)
    acc_g = tl.zeros([BLOCK_N], dtype=tl.float32)
    acc_u = tl.zeros([BLOCK_N], dtype=tl.float32)
    for k0 in range(0, HIDDEN, BLOCK_K):
        kk = k0 + offs_k
        k_ok = kk < HIDDEN
        xv = tl.load(x_row + kk, mask=k_ok, other=0.0).to(tl.float32)
        g = k0 // GROUP
        acc_g += _int_dot(q_g, s_g, z_g, kk, k_ok, n_ok, xv, g, BITS)
        acc_u += _int_dot(q_u, s_u, z_u, kk, k_ok, n_ok, xv, g, BITS)
    h = acc_g / (1.0 + tl.exp(-acc_g)) * acc_u
    tl.store(act_ptr + a * stride_am + offs_n, h.to(act_ptr.dtype.element_ty), mask=n_ok)


@triton.jit
def moe_gemv_int_down_kernel(
    act_ptr, q_ptr, s_ptr, z_ptr, ids_ptr, rw_ptr, y_ptr, HIDDEN, INTER,
    stride_am, stride_qe, stride_qn, stride_se, stride_sn, stride_ym,
    TOP_K: tl.constexpr, BITS: tl.constexpr, GROUP: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """y[t] = sum_j rw[t, j] * act[t * TOP_K + j] W2[ids[t, j]]^T (integer codes as above)."""
    t = tl.program_id(0)
    offs_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    n_ok = offs_n < HIDDEN
    rows = offs_n.to(tl.int64)
    offs_k = tl.arange(0, BLOCK_K)
    out = tl.zeros([BLOCK_N], dtype=tl.float32)
    for j in tl.static_range(TOP_K):
        a = t * TOP_K + j
        e = tl.load(ids_ptr + a).to(tl.int64)
        a_row = act_ptr + a.to(tl.int64) * stride_am
        q_rows = q_ptr + e * stride_qe + rows[:, None] * stride_qn
        s_rows = s_ptr + e * stride_se + rows * stride_sn
        z_rows = z_ptr + e * stride_se + rows * stride_sn
        acc = tl.zeros([BLOCK_N], dtype=tl.float32)
        for k0 in range(0, INTER, BLOCK_K):
            kk = k0 + offs_k
            k_ok = kk < INTER
            av = tl.load(a_row + kk, mask=k_ok, other=0.0).to(tl.float32)
            acc += _int_dot(q_rows, s_rows, z_rows, kk, k_ok, n_ok, av, k0 // GROUP, BITS)
        out += tl.load(rw_ptr + a) * acc
    tl.store(y_ptr + t * stride_ym + offs_n, out.to(y_ptr.dtype.element_ty), mask=n_ok)


INT_GEMV_BLOCK_N, INT_GEMV_BLOCK_K, INT_GEMV_WARPS = 8, 128, 4


def small_batch_experts_int(
    x: torch.Tensor, q13: torch.Tensor, s13: torch.Tensor, z13: torch.Tensor,
    q2: torch.Tensor, s2: torch.Tensor, z2: torch.Tensor, bits: int, group13: int,
    group2: int, weights: torch.Tensor, ids: torch.Tensor, block_n: int = INT_GEMV_BLOCK_N,
    block_k: int = INT_GEMV_BLOCK_K, num_warps: int = INT_GEMV_WARPS,
) -> torch.Tensor:
    """``fused_experts_wint`` for a few tokens: the two GEMV launches (see above)."""
    t, k = ids.shape
    e, two_i, _ = q13.shape
    inter, h = two_i // 2, q2.shape[1]
    x = x.contiguous()
    ids = ids.contiguous()
    rw = weights.reshape(-1).float().contiguous()
    act = torch.empty((t * k, inter), dtype=x.dtype, device=x.device)
    y = torch.empty((t, h), dtype=x.dtype, device=x.device)
    bk13 = int_block_k(group13, h, bits, block_k)
    bk2 = int_block_k(group2, inter, bits, block_k)
    moe_gemv_int_gate_up_kernel[(t * k, triton.cdiv(inter, block_n))](
        x, q13, s13, z13, ids, act, inter, h, x.stride(0), q13.stride(0), q13.stride(1),
        s13.stride(0), s13.stride(1), act.stride(0), TOP_K=k, BITS=bits, GROUP=group13,
        BLOCK_N=block_n, BLOCK_K=bk13, num_warps=num_warps,
    )  # fmt: skip
    moe_gemv_int_down_kernel[(t, triton.cdiv(h, block_n))](
        act, q2, s2, z2, ids, rw, y, h, inter, act.stride(0), q2.stride(0), q2.stride(1),
        s2.stride(0), s2.stride(1), y.stride(0), TOP_K=k, BITS=bits, GROUP=group2,
        BLOCK_N=block_n, BLOCK_K=bk2, num_warps=num_warps,
    )  # fmt: skip
    return y
