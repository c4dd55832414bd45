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
  and fp32 scales and zeros [E, N, K / GROUP]: w = code * scale + zero. Each K step loads
  its [BLOCK_N, BLOCK_K * BITS / 32] words once (contiguous along K, as stored), turns code
  j of every word into a float without a conversion instruction (``triton_kernels.magic``:
  the code OR-ed into a float's mantissa gives the exact C + code), applies scale and zero
  in one fp32 FMA (the zero shifted by C * scale) and puts the codes back in their natural
  k order with ``tl.join`` (so the activation tile is the plain contiguous one) before the
  tile meets ``tl.dot`` in the activation dtype. A step lies inside one group (GROUP %
  BLOCK_K == 0: one scale and zero per column) or holds whole groups (BLOCK_K % GROUP == 0:
  [BLOCK_N, groups]). GPTQ act-order experts (``perm13``) gather the gate/up activation
  columns through a per-expert permutation.
  The first version (one word load per code, an int -> float conversion per code, 32-deep
  steps on 8 warps) ran 17x slower than bf16 (session 33, bench/README.md).

Both keep the bf16 path's properties: no host sync, every shape fixed by the token count,
so the step is captured in CUDA graphs as it is.
"""

from __future__ import annotations

import functools
import os

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
from modelport.quantization.triton_gemm import MAG_128, MAG_2048, MAG_32768
from modelport.quantization.triton_kernels import magic

# moe_gemm_fp8_kernel's (BLOCK_N, BLOCK_K, warps, stages) launch configs, none spilling on
# sm_90 (tests/test_moe_quantized_cuda.py). One H100, one Qwen1.5-MoE layer's routed experts
# (bench/gpu/moe_layer_bench.py --grouped --kinds fp8,
# bench/results/2026-12-06-h100-s33-moe-layer-grouped-fp8.jsonl), us at 256 / 1,024 tokens:
# n64k32w4 (the first) 431.5 / 621.1, n64k64w4 414.5 / 527.3, n64k128w4 376.0 / 628.8,
# n128k64w8 405.8 / 575.0, n64k128w8 381.0 / 654.6 (bf16 488.3 / 548.2). Prefill's 1,024
# tokens pick n64k64w4 (MoE single stream TTFT 18.9 vs 20.0 ms with n64k32w4);
# MODELPORT_MOE_FP8_CONFIG=NAME launches another.
FP8_GEMM_CONFIGS = {
    "n64k32w4": (64, 32, 4, 3),
    "n64k64w4": (64, 64, 4, 3),
    "n64k128w4": (64, 128, 4, 3),
    "n128k64w8": (128, 64, 8, 3),
    "n64k128w8": (64, 128, 8, 3),
}
# moe_gemm_wint_kernel: (BLOCK_N, BLOCK_K, warps, stages) launch configs, none spilling on
# sm_90 (tests/test_moe_wint_grouped.py). One H100, the routed experts of one Qwen1.5-MoE
# layer, 4-bit group 128 (bench/gpu/moe_layer_bench.py --grouped,
# bench/results/2026-12-06-h100-s33-moe-layer-grouped.jsonl), us at 256 / 1,024 tokens:
# n64k128w4 427 / 568, n64k64w4 465 / 553, n128k64w8 490 / 676, n64k128w8 501 / 633 (bf16
# 508 / 560; the first kernel, which loaded each word once per code, 8,669 / 9,643).
# Prefill's 1,024 tokens pick n64k64w4; MODELPORT_MOE_WINT_CONFIG=NAME launches another.
INT_GEMM_CONFIGS = {
    "n64k128w4": (64, 128, 4, 3),
    "n64k64w4": (64, 64, 4, 3),
    "n128k64w8": (128, 64, 8, 3),
    "n64k128w8": (64, 128, 8, 3),
}


def _launch_config(knob: str, configs: dict, default: str) -> tuple[int, int, int, int]:
    name = os.environ.get(knob, default)
    if name not in configs:
        raise ValueError(f"{knob}={name!r}: expected one of {', '.join(configs)}")
    return configs[name]


INT_GEMM_CONFIG = _launch_config("MODELPORT_MOE_WINT_CONFIG", INT_GEMM_CONFIGS, "n64k64w4")
FP8_GEMM_CONFIG = _launch_config("MODELPORT_MOE_FP8_CONFIG", FP8_GEMM_CONFIGS, "n64k64w4")


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
def _affine(f, s, z, C: tl.constexpr, EXACT: tl.constexpr):
    # code * scale + zero from f = C + code: one FFMA with the zero shifted by C * scale
    # (rounded once a group: |C * scale| * 2**-24, far below a 16-bit weight's rounding);
    # EXACT (float32 activations) subtracts C first, as a float32 weight needs
    if EXACT:
        return (f - C) * s + z
    else:
        return f * s + (z - C * s)


@triton.jit
def _int_codes_tile(
    base,
    offs_n,
    n_ok,
    k0,
    s_base,
    z_base,
    stride_wn,
    stride_sn,
    mag_a,
    mag_b,
    BITS: tl.constexpr,
    GROUP: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    dtype: tl.constexpr,
):
    # [BLOCK_K, BLOCK_N] of code * scale + zero for inputs k0 .. k0 + BLOCK_K, columns offs_n
    PER: tl.constexpr = 32 // BITS
    KW: tl.constexpr = BLOCK_K // PER
    GPS: tl.constexpr = BLOCK_K // GROUP if BLOCK_K > GROUP else 1  # groups a step
    WPG: tl.constexpr = KW // GPS  # words a group (of this step)
    # each word once, contiguous along K; code j of word w is input k0 + w * PER + j
    words = tl.load(
        base + offs_n[:, None] * stride_wn + (k0 // PER + tl.arange(0, KW))[None, :],
        mask=n_ok[:, None],
        other=0,
    )
    words = tl.reshape(words.to(tl.uint32, bitcast=True), (BLOCK_N, GPS, WPG))
    if GPS == 1:
        s = tl.load(s_base + offs_n * stride_sn + k0 // GROUP, mask=n_ok, other=0.0)[:, None]
        z = tl.load(z_base + offs_n * stride_sn + k0 // GROUP, mask=n_ok, other=0.0)[:, None]
    else:
        sz_off = offs_n[:, None] * stride_sn + (k0 // GROUP + tl.arange(0, GPS))[None, :]
        s = tl.load(s_base + sz_off, mask=n_ok[:, None], other=0.0)
        z = tl.load(z_base + sz_off, mask=n_ok[:, None], other=0.0)
    s = s[:, :, None]
    z = z[:, :, None]
    # magic(): code j as the exact float C + code (one LOP3, a shift per pair of codes)
    EXACT: tl.constexpr = dtype == tl.float32
    if BITS == 4:  # C = 128 for even codes, 2048 for odd ones
        c0 = _affine(magic(words, 0, BITS, mag_a, mag_b), s, z, 128.0, EXACT)
        c1 = _affine(magic(words, 1, BITS, mag_a, mag_b), s, z, 2048.0, EXACT)
        c2 = _affine(magic(words, 2, BITS, mag_a, mag_b), s, z, 128.0, EXACT)
        c3 = _affine(magic(words, 3, BITS, mag_a, mag_b), s, z, 2048.0, EXACT)
        c4 = _affine(magic(words, 4, BITS, mag_a, mag_b), s, z, 128.0, EXACT)
        c5 = _affine(magic(words, 5, BITS, mag_a, mag_b), s, z, 2048.0, EXACT)
        c6 = _affine(magic(words, 6, BITS, mag_a, mag_b), s, z, 128.0, EXACT)
        c7 = _affine(magic(words, 7, BITS, mag_a, mag_b), s, z, 2048.0, EXACT)
        # code j = 4 * j2 + 2 * j1 + j0 to index j: tl.join adds a minor dimension of 2
        # (held in registers), so the last join is j0's
        w = tl.join(tl.join(tl.join(c0, c4), tl.join(c2, c6)),
                    tl.join(tl.join(c1, c5), tl.join(c3, c7)))
    else:  # bytes: C = 32768
        c0 = _affine(magic(words, 0, BITS, mag_a, mag_b), s, z, 32768.0, EXACT)
        c1 = _affine(magic(words, 1, BITS, mag_a, mag_b), s, z, 32768.0, EXACT)
        c2 = _affine(magic(words, 2, BITS, mag_a, mag_b), s, z, 32768.0, EXACT)
        c3 = _affine(magic(words, 3, BITS, mag_a, mag_b), s, z, 32768.0, EXACT)
        w = tl.join(tl.join(c0, c2), tl.join(c1, c3))
    return tl.trans(tl.reshape(w, (BLOCK_N, BLOCK_K)).to(dtype))


@triton.jit
def moe_gemm_wint_kernel(
    a_ptr,
    w_ptr,
    s_ptr,
    z_ptr,
    perm_ptr,
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
    mag_a,  # magic()'s exponents, arguments so that the compiler keeps the bit tricks
    mag_b,
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
    HAS_PERM: tl.constexpr = False,
):
    # K % BLOCK_K == 0, BLOCK_K holds whole words and whole groups or part of one
    # (int_gemm_block_k): no mask along K. HAS_PERM (GPTQ act-order): the expert's weight
    # columns are sorted by group; perm_ptr [E, K] int32 names the activation column that
    # each weight column multiplies
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
    a_base = a_ptr + a_rows[:, None] * stride_am + offs_k[None, :]
    p_base = perm_ptr + expert.to(tl.int64) * K + offs_k
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    acc_up = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        if HAS_PERM:
            cols = tl.load(p_base + k0)
            a = tl.load(a_ptr + a_rows[:, None] * stride_am + cols[None, :],
                        mask=row_ok[:, None], other=0.0)
        else:
            a = tl.load(a_base + k0, mask=row_ok[:, None], other=0.0)
        w = _int_codes_tile(w_base, offs_n, n_ok, k0, s_base, z_base, stride_wn, stride_sn,
                            mag_a, mag_b, BITS, GROUP, BLOCK_N, BLOCK_K, a.dtype)
        acc = tl.dot(a, w, acc, input_precision=PRECISION)
        if GATED:
            w_up = _int_codes_tile(w_base + N * stride_wn, offs_n, n_ok, k0,
                                   s_base + N * stride_sn, z_base + N * stride_sn, stride_wn,
                                   stride_sn, mag_a, mag_b, BITS, GROUP, BLOCK_N, BLOCK_K,
                                   a.dtype)
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
    block_n: int | None = None,
    block_k: int | None = None,
    num_warps: int | None = None,
    num_stages: int | None = None,
    elsewhere: bool = False,
) -> torch.Tensor:
    """fused_experts with E4M3 weights w13 [E, 2I, H], w2 [E, H, I] and fp32 per-channel
    scales s13 [E, 2I], s2 [E, H]. The launch config defaults to FP8_GEMM_CONFIG.
    ``elsewhere``: as in triton_moe.fused_experts (id E: another rank's expert, weight 0)."""
    e, two_i, h = w13.shape
    if moe_gemv_applies(*ids.shape):
        if elsewhere:  # the GEMVs read every id: expert 0 at weight 0 adds nothing
            ids = torch.where(ids == e, 0, ids)
        return small_batch_experts(x, w13, w2, weights, ids, s13, s2)
    bn, bk, warps, stages = FP8_GEMM_CONFIG
    tile = {"BLOCK_K": block_k or bk, "num_stages": num_stages or stages}
    return grouped_mlp(
        moe_gemm_fp8_kernel, x, weights, ids, e, two_i // 2, h,
        ((w13, s13), (w13.stride(0), w13.stride(1), s13.stride(0)), tile),
        ((w2, s2), (w2.stride(0), w2.stride(1), s2.stride(0)), tile),
        block_n or bn, num_warps or warps, elsewhere,
    )  # fmt: skip


def int_gemm_block_k(group: int, k: int, bits: int, block_k: int) -> int:
    """``moe_gemm_wint_kernel``'s K step: the largest power of two up to block_k (at least 16)
    that divides K, holds whole words and either lies inside one group or holds whole
    groups; ValueError if none does."""
    per = 32 // bits
    bk = block_k
    while bk >= 16:
        whole_groups = bk % group == 0 and group % per == 0
        if k % bk == 0 and bk % per == 0 and (group % bk == 0 or whole_groups):
            return bk
        bk //= 2
    raise ValueError(f"quantized MoE experts on CUDA: no K step for group size {group} and "
                     f"K = {k} (K must be a multiple of 16)")


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
    block_n: int | None = None,
    block_k: int | None = None,
    num_warps: int | None = None,
    num_stages: int | None = None,
    perm13: torch.Tensor | None = None,
    elsewhere: bool = False,
) -> torch.Tensor:
    """fused_experts with packed integer codes q13 [E, 2I, H*bits/32], q2 [E, H, I*bits/32]
    and fp32 scales / zeros s13, z13 [E, 2I, H/group13], s2, z2 [E, H, I/group2]. The launch
    config defaults to INT_GEMM_CONFIG. ``perm13`` (int32 [E, H], GPTQ act-order): q13's
    column c of expert e multiplies x[:, perm13[e, c]]. ``elsewhere``: as in
    triton_moe.fused_experts (id E: another rank's expert, weight 0)."""
    e, two_i, _ = q13.shape
    if moe_gemv_applies(*ids.shape, integer=True):
        if elsewhere:  # the GEMVs read every id: expert 0 at weight 0 adds nothing
            ids = torch.where(ids == e, 0, ids)
        return small_batch_experts_int(x, q13, s13, z13, q2, s2, z2, bits, group13, group2,
                                       weights, ids, perm13=perm13)
    i, h = two_i // 2, q2.shape[1]
    bn, bk, warps, stages = INT_GEMM_CONFIG
    bn, bk = block_n or bn, block_k or bk
    meta = {"BITS": bits, "num_stages": num_stages or stages}
    mags = (MAG_2048, MAG_128) if bits == 4 else (MAG_32768, 0)
    return grouped_mlp(
        moe_gemm_wint_kernel, x, weights, ids, e, i, h,
        ((q13, s13, z13, q13 if perm13 is None else perm13),
         (q13.stride(0), q13.stride(1), s13.stride(0), s13.stride(1), *mags),
         {**meta, "GROUP": group13, "BLOCK_K": int_gemm_block_k(group13, h, bits, bk),
          "HAS_PERM": perm13 is not None}),
        ((q2, s2, z2, q2), (q2.stride(0), q2.stride(1), s2.stride(0), s2.stride(1), *mags),
         {**meta, "GROUP": group2, "BLOCK_K": int_gemm_block_k(group2, i, bits, bk)}),
        bn, num_warps or warps, elsewhere,
    )  # fmt: skip


# -- few tokens: integer codes (AWQ / GPTQ) in two GEMV launches ----------------------------------
# The counterparts of triton_moe's few-token GEMVs for packed codes. A program loads its rows'
# words once ([BLOCK_N, BLOCK_K / PER] int32, contiguous along K) and turns code j of every
# word into the exact float C + code with one shift and one LOP3 (``triton_kernels.magic``:
# C = 2048 / 128 for odd / even 4-bit codes, 32768 for bytes), so no code takes an int -> float
# conversion; sum(C * x) is taken off per word. With w = code * scale + zero per group, each
# group then adds scale * sum(code * x) + zero * sum(x) to an output row. A K step holds whole
# groups or lies inside one (``int_gemv_block_k``).
# The first version converted every code (and loaded each word once per code): 87 us for the
# routed experts of one Qwen1.5-MoE layer at one token on an H100, against 38 us for bf16.


@triton.jit
def _int_words_dot(q_rows, s_rows, z_rows, x_row, p_row, w0, KW, NG, n_ok, mag_a, mag_b,
                   BITS: tl.constexpr, GROUP: tl.constexpr, BLOCK_N: tl.constexpr,
                   BLOCK_K: tl.constexpr, HAS_PERM: tl.constexpr):
    """sum over the K step of words [w0, w0 + BLOCK_K / PER) of (code * scale + zero) * x for
    each of the BLOCK_N rows (q_rows [BLOCK_N, 1] word pointers, s_rows / z_rows [BLOCK_N]
    group pointers, x_row the activation row; HAS_PERM: input k is x[p_row[k]], GPTQ
    act-order): [BLOCK_N] float32."""
    PER: tl.constexpr = 32 // BITS
    WK: tl.constexpr = BLOCK_K // PER
    offs_w = w0 + tl.arange(0, WK)
    w_ok = offs_w < KW
    words = tl.load(q_rows + offs_w[None, :], mask=n_ok[:, None] & w_ok[None, :], other=0)
    words = words.to(tl.uint32, bitcast=True)  # logical shifts: a rotate is one SHF
    xk = x_row + offs_w * PER
    # float32 activations (EXACT) take C off every code first (exact), as float32 results
    # need; for 16-bit ones the per-word correction below rounds far below their precision
    EXACT: tl.constexpr = x_row.dtype.element_ty == tl.float32
    for j in tl.static_range(PER):
        f = magic(words, j, BITS, mag_a, mag_b)
        if EXACT:
            f -= 32768.0 if BITS == 8 else (2048.0 if j % 2 == 1 else 128.0)
        if HAS_PERM:
            col = tl.load(p_row + offs_w * PER + j, mask=w_ok, other=0)
            x = tl.load(x_row + col, mask=w_ok, other=0.0).to(tl.float32)
        else:
            x = tl.load(xk + j, mask=w_ok, other=0.0).to(tl.float32)
        if j == 0:  # C = 32768 (bytes) or 128 (nibble 0)
            p = f * x[None, :]
            if BITS == 8:
                xa = x
                xb = tl.zeros_like(x)
            else:
                xa = tl.zeros_like(x)
                xb = x
        elif BITS == 8 or j % 2 == 1:  # C = 32768 (bytes) or 2048 (odd nibbles)
            p += f * x[None, :]
            xa += x
        else:  # C = 128 (even nibbles)
            p += f * x[None, :]
            xb += x
    if EXACT:
        pw = p
    elif BITS == 4:
        pw = p - (xa * 2048.0 + xb * 128.0)[None, :]
    else:
        pw = p - (xa * 32768.0)[None, :]
    xs = xa + xb
    if BLOCK_K <= GROUP:  # the step lies inside group g
        g = (w0 * PER) // GROUP
        s = tl.load(s_rows + g, mask=n_ok, other=0.0)
        z = tl.load(z_rows + g, mask=n_ok, other=0.0)
        return s * tl.sum(pw, 1) + z * tl.sum(xs, 0)
    NGS: tl.constexpr = BLOCK_K // GROUP
    pg = tl.sum(tl.reshape(pw, (BLOCK_N, NGS, WK // NGS)), 2)
    xg = tl.sum(tl.reshape(xs, (NGS, WK // NGS)), 1)
    g = (w0 * PER) // GROUP + tl.arange(0, NGS)
    m = n_ok[:, None] & (g < NG)[None, :]
    s = tl.load(s_rows[:, None] + g[None, :], mask=m, other=0.0)
    z = tl.load(z_rows[:, None] + g[None, :], mask=m, other=0.0)
    return tl.sum(s * pg + z * xg[None, :], 1)


@triton.jit
def moe_gemv_int_gate_up_kernel(
    x_ptr, q_ptr, s_ptr, z_ptr, perm_ptr, ids_ptr, act_ptr, INTER, HIDDEN,
    stride_xm, stride_qe, stride_qn, stride_se, stride_sn, stride_am, mag_a, mag_b,
    TOP_K: tl.constexpr, BITS: tl.constexpr, GROUP: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, HAS_PERM: tl.constexpr = False,
):
    """act[a] = silu(x Wg[e]^T) * (x Wu[e]^T) for assignment a (token a // TOP_K, expert
    ids[a]) with W = code * scale + zero: q [E, 2I, H*BITS/32], s / z [E, 2I, H/GROUP]
    (HAS_PERM: W's column c multiplies x[perm[e, c]], perm int32 [E, H])."""
    PER: tl.constexpr = 32 // BITS
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
    kw = HIDDEN // PER
    ng = tl.cdiv(HIDDEN, GROUP)
    acc_g = tl.zeros([BLOCK_N], dtype=tl.float32)
    acc_u = tl.zeros([BLOCK_N], dtype=tl.float32)
    p_row = perm_ptr + e * HIDDEN
    for w0 in range(0, kw, BLOCK_K // PER):
        acc_g += _int_words_dot(q_g, s_g, z_g, x_row, p_row, w0, kw, ng, n_ok, mag_a, mag_b,
                                BITS, GROUP, BLOCK_N, BLOCK_K, HAS_PERM)
        acc_u += _int_words_dot(q_u, s_u, z_u, x_row, p_row, w0, kw, ng, n_ok, mag_a, mag_b,
                                BITS, GROUP, BLOCK_N, BLOCK_K, HAS_PERM)
    h = acc_g / (1.0 + tl.exp(-acc_g)) * acc_u
    tl.store(act_ptr + a * stride_am + offs_n, h.to(act_ptr.dtype.element_ty), mask=n_ok)


@triton.jit
def moe_gemv_int_down_kernel(
    act_ptr, q_ptr, s_ptr, z_ptr, ids_ptr, rw_ptr, y_ptr, HIDDEN, INTER,
    stride_am, stride_qe, stride_qn, stride_se, stride_sn, stride_ym, mag_a, mag_b,
    TOP_K: tl.constexpr, BITS: tl.constexpr, GROUP: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """y[t] = sum_j rw[t, j] * act[t * TOP_K + j] W2[ids[t, j]]^T (integer codes as above)."""
    PER: tl.constexpr = 32 // BITS
    t = tl.program_id(0)
    offs_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    n_ok = offs_n < HIDDEN
    rows = offs_n.to(tl.int64)
    kw = INTER // PER
    ng = tl.cdiv(INTER, GROUP)
    out = tl.zeros([BLOCK_N], dtype=tl.float32)
    for j in tl.static_range(TOP_K):
        a = t * TOP_K + j
        e = tl.load(ids_ptr + a).to(tl.int64)
        a_row = act_ptr + a.to(tl.int64) * stride_am
        q_rows = q_ptr + e * stride_qe + rows[:, None] * stride_qn
        s_rows = s_ptr + e * stride_se + rows * stride_sn
        z_rows = z_ptr + e * stride_se + rows * stride_sn
        acc = tl.zeros([BLOCK_N], dtype=tl.float32)
        for w0 in range(0, kw, BLOCK_K // PER):
            acc += _int_words_dot(q_rows, s_rows, z_rows, a_row, a_row, w0, kw, ng, n_ok, mag_a,
                                  mag_b, BITS, GROUP, BLOCK_N, BLOCK_K, False)
        out += tl.load(rw_ptr + a) * acc
    tl.store(y_ptr + t * stride_ym + offs_n, out.to(y_ptr.dtype.element_ty), mask=n_ok)


# (BLOCK_N, BLOCK_K in codes, num_warps): autotuned per shape, bits and group at the first
# call, among those whose K step holds whole groups or lies inside one (``int_gemv_block_k``
# adds a fallback where none does, e.g. GPTQ's group -1 over K = 1,408)
INT_GEMV_CONFIGS = ((4, 1024, 4), (8, 512, 4), (8, 1024, 4), (16, 256, 4), (16, 512, 4),
                    (16, 512, 8), (32, 256, 8))


def int_gemv_block_k(group: int, bits: int, block_k: int) -> bool:
    """Whether a K step of block_k codes suits groups of ``group``: whole words, and whole
    groups a step or a step inside one group."""
    return block_k % (32 // bits) == 0 and (block_k % group == 0 or group % block_k == 0)


def _int_gemv_step(group: int, bits: int, block_k: int) -> int:
    """block_k where it suits the group, else the largest of 128 .. 8 that does."""
    return next(b for b in (block_k, 128, 64, 32, 16, 8) if int_gemv_block_k(group, bits, b))


def _int_gemv_prune(configs, named_args, **kwargs):  # noqa: ANN001, ANN202
    bits, group = kwargs["BITS"], kwargs["GROUP"]
    keep = [c for c in configs if int_gemv_block_k(group, bits, c.kwargs["BLOCK_K"])]
    if keep:
        return keep
    bk = _int_gemv_step(group, bits, 128)
    return [triton.Config({"BLOCK_N": 8, "BLOCK_K": bk}, num_warps=4, num_stages=2)]


@functools.cache
def _int_gemv_tuned(down: bool):  # noqa: ANN202
    configs = [triton.Config({"BLOCK_N": bn, "BLOCK_K": bk}, num_warps=w, num_stages=2)
               for bn, bk, w in INT_GEMV_CONFIGS]
    kernel = moe_gemv_int_down_kernel if down else moe_gemv_int_gate_up_kernel
    key = ["HIDDEN", "INTER", "TOP_K", "BITS", "GROUP"]
    return triton.autotune(configs=configs, key=key, cache_results=True,
                           prune_configs_by={"early_config_prune": _int_gemv_prune})(kernel)


def small_batch_experts_int(
    x: torch.Tensor, q13: torch.Tensor, s13: torch.Tensor, z13: torch.Tensor,
    q2: torch.Tensor, s2: torch.Tensor, z2: torch.Tensor, bits: int, group13: int,
    group2: int, weights: torch.Tensor, ids: torch.Tensor,
    config: tuple[int, int, int] | None = None, perm13: torch.Tensor | None = None,
) -> torch.Tensor:
    """``fused_experts_wint`` for a few tokens: the two GEMV launches (see above).
    ``config`` (BLOCK_N, BLOCK_K, warps): that launch config instead of the autotuned one;
    ``perm13``: as in ``fused_experts_wint``."""
    t, k = ids.shape
    e, two_i, _ = q13.shape
    inter, h = two_i // 2, q2.shape[1]
    x = x.contiguous()
    ids = ids.contiguous()
    rw = weights.reshape(-1).float().contiguous()
    act = torch.empty((t * k, inter), dtype=x.dtype, device=x.device)
    y = torch.empty((t, h), dtype=x.dtype, device=x.device)
    mags = (MAG_2048, MAG_128) if bits == 4 else (MAG_32768, 0)
    gu_args = (x, q13, s13, z13, q13 if perm13 is None else perm13, ids, act, inter, h,
               x.stride(0), q13.stride(0), q13.stride(1), s13.stride(0), s13.stride(1),
               act.stride(0), *mags)
    dn_args = (act, q2, s2, z2, ids, rw, y, h, inter, act.stride(0), q2.stride(0), q2.stride(1),
               s2.stride(0), s2.stride(1), y.stride(0), *mags)
    gu_meta = {"TOP_K": k, "BITS": bits, "GROUP": group13, "HAS_PERM": perm13 is not None}
    dn_meta = {"TOP_K": k, "BITS": bits, "GROUP": group2}
    if config is None and os.environ.get("TRITON_INTERPRET") == "1":
        config = (8, 256, 4)  # nothing to time in the interpreter (CPU tests)
    if config is None:
        _int_gemv_tuned(False)[lambda c: (t * k, triton.cdiv(inter, c["BLOCK_N"]))](
            *gu_args, **gu_meta)
        _int_gemv_tuned(True)[lambda c: (t, triton.cdiv(h, c["BLOCK_N"]))](*dn_args, **dn_meta)
        return y
    bn, bk, w = config
    for kernel, args, meta, grid in (
            (moe_gemv_int_gate_up_kernel, gu_args, gu_meta, (t * k, triton.cdiv(inter, bn))),
            (moe_gemv_int_down_kernel, dn_args, dn_meta, (t, triton.cdiv(h, bn)))):
        # the config's K step, or a fallback where it does not suit the group (see above)
        kernel[grid](*args, **meta, BLOCK_N=bn, BLOCK_K=_int_gemv_step(meta["GROUP"], bits, bk),
                     num_warps=w)
    return y
