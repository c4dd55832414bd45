"""Triton paged-attention backend for CUDA: KV write, split-K decode with GQA, and prefill.

Same contract as ``reference_paged_attention`` (see layers/attention.py): flat batch, paged
cache [2, num_blocks, block_size, kv_heads, head_dim], new K/V already written into their
slots before attention runs, so every kernel reads the whole context from the cache alone.
That single rule is what makes chunked prefill and prefix-cache hits need no special path:
a chunk's queries simply see the cached blocks in front of them.

Why two attention kernels instead of one:
- Decode rows (query length 1) are memory-bound. One program per (request, KV head, split)
  loads each K/V tile once and serves all query heads of its GQA group with one small
  matrix product, so KV bytes are read once per KV head. Short batches split the context
  ("flash decoding") so that a single stream still fills the 132 SMs; the split of a
  (request, KV head) that finishes last merges them by their log-sum-exp (no second
  kernel: at batch 1 a launch costs about as much as the merge's work).
- Prefill rows are compute-bound: a flash-attention loop over (query block, head) work items
  built on the host once per step, so decode requests in a mixed batch cost no prefill
  programs.

With PDL the decode kernel reads the step's metadata and its first K/V tile (all but the
newest token, which the KV write just before it stores) before it waits for that write, so
those HBM reads overlap the kernels still running (the KV write and rotary let it be
scheduled before they wait themselves): 10.3 -> 9.6 us a layer at batch 1 and 1,024 tokens
(bench/results/2026-12-04-h200-attn-path-*.jsonl).

On decode-only steps the model's rotary embedding and the KV write move into the decode
kernel (``rope=`` of triton_paged_attention, called through ``Attention.forward_rope``):
every program rotates its query heads and the new key itself, and the split holding the
newest position stores the new K/V into the cache; the results are the same bits as the
rotary kernel + KV-write kernel + decode kernel chain. On by default;
MODELPORT_ROPE_IN_DECODE=0 turns it off (see ROPE_IN_DECODE).

From ORDERED_MIN_REQS decode requests on, the decode programs run longest context first (a
device-side sort of the step's lengths, once a step): with ragged contexts, programs handed
out in request order can leave a long one to start in the last wave and run on alone.

Numerical choices keep CUDA-graph replay and eager runs bit-identical: the split count
depends only on the padded batch bucket, never on the step's context lengths.

FP8 KV cache (``--kv-cache-dtype fp8``, torch.float8_e4m3fn): the write clamps K/V to the
e4m3 range (+-448) and casts with scale 1.0 (vLLM's default without calibrated scales), so
outliers saturate instead of turning into NaN; the attention kernels load fp8 tiles and
upcast them exactly: prefill to the query dtype, decode (which reads half the bytes and must
stay memory-bound) to fp16 with cheap integer ops, dot products in fp16 (see _kv_upcast).
Decode launch configs are per cache kind (DECODE_CONFIGS); on a 16-bit cache the kernels
compile to the same code as before fp8 support.
"""

from __future__ import annotations

import functools
import os
import re
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
import triton
import triton.language as tl

from modelport.layers import pdl
from modelport.layers.attention import FP8_E4M3_MAX, FP8_KV_DTYPES
from modelport.layers.fused_ops import _round

if TYPE_CHECKING:
    from modelport.layers.attention import AttentionMetadata

_LOG2E = 1.4426950408889634
_NEG_BIG = tl.constexpr(-1.0e30)  # finite "minus infinity": empty splits give no inf - inf = NaN


# ----------------------------------------------------------------------------------------
# KV write
# ----------------------------------------------------------------------------------------
@triton.jit
def _write_kv_kernel(
    k_ptr,
    v_ptr,
    cache_ptr,
    slot_ptr,
    stride_k,
    stride_v,
    half_stride,
    ROW: tl.constexpr,
    BLOCK: tl.constexpr,
    FP8_MAX: tl.constexpr,  # > 0: fp8 cache, saturate to +-FP8_MAX before the cast
    PDL: tl.constexpr = False,
):
    pdl.wait(PDL, trigger_first=True)  # attention starts reading the older context meanwhile
    t = tl.program_id(0)
    slot = tl.load(slot_ptr + t).to(tl.int64)
    offs = tl.arange(0, BLOCK)
    mask = (offs < ROW) & (slot >= 0)  # slot -1: a padded row of a CUDA graph, skip it
    k = tl.load(k_ptr + t.to(tl.int64) * stride_k + offs, mask=mask)
    v = tl.load(v_ptr + t.to(tl.int64) * stride_v + offs, mask=mask)
    if FP8_MAX > 0:
        k = tl.clamp(k.to(tl.float32), -FP8_MAX, FP8_MAX, propagate_nan=tl.PropagateNan.ALL)
        v = tl.clamp(v.to(tl.float32), -FP8_MAX, FP8_MAX, propagate_nan=tl.PropagateNan.ALL)
    dst = cache_ptr + slot * ROW + offs
    tl.store(dst, k.to(cache_ptr.dtype.element_ty), mask=mask)
    tl.store(dst + half_stride, v.to(cache_ptr.dtype.element_ty), mask=mask)


def write_kv_triton(
    kv_cache: torch.Tensor, k: torch.Tensor, v: torch.Tensor, slots: torch.Tensor
) -> None:
    """Store K/V rows [T, kv_heads, head_dim] at their slots; slot -1 rows are skipped.

    An fp8 cache gets K/V clamped to +-448 and cast (scale 1.0), like ``write_kv``.
    """
    t = k.shape[0]
    if t == 0:
        return
    _, nb, bs, h, d = kv_cache.shape
    row = h * d
    if k.stride(-1) != 1 or k.stride(-2) != d or v.stride(-1) != 1 or v.stride(-2) != d:
        k, v = k.contiguous(), v.contiguous()
    _write_kv_kernel[(t,)](
        k,
        v,
        kv_cache,
        slots,
        k.stride(0),
        v.stride(0),
        nb * bs * row,
        ROW=row,
        BLOCK=triton.next_power_of_2(row),
        FP8_MAX=FP8_E4M3_MAX if kv_cache.dtype in FP8_KV_DTYPES else 0.0,
        num_warps=4,
        **pdl.kernel_kwargs(),
    )


# ----------------------------------------------------------------------------------------
# fp8 (e4m3) -> fp16 upcasts for the decode kernel
# ----------------------------------------------------------------------------------------
# The plain ``.to(bfloat16)`` of an e4m3 tile costs, on sm90, one cvt.f16x2.e4m3x2 per pair
# plus two scalar cvt.bf16.f16 (conversions: 16/clk/SM in NVIDIA's throughput tables, integer
# ops 64); worse, Triton moves that upcast behind the shared-memory -> dot-operand load, and
# for V (the dot's B operand runs along tokens, not along the contiguous head_dim) an 8-bit
# operand is gathered byte by byte (LDS.U8 + PRMT). Offline sm90 SASS of the loop: 57
# warp-instructions per KV token (bf16 cache: 26), while at 4.8 TB/s an SM can issue only ~55
# in the time one token's fp8 K and V (256 B per KV head) arrive: issue-bound, not memory-bound,
# hence slower than bf16 although it reads half the bytes.
#
# So the decode kernel can do its fp8 dot products in fp16, with these upcasts (the CVT codes
# of DecodeConfig.k_cvt / v_cvt):
#   1  cvt.rn.f16x2.e4m3x2 (``.to(float16)``, exact); Triton converts after the dot-operand
#      load, like code 0.
#   2  bit trick (below), pure inline PTX: Triton also hoists it behind the dot-operand load;
#      good for K (read as fp8 through ldmatrix), bad for V (byte gathers).
#   3  the bit trick in plain Triton integer ops (what the interpreter runs for 2 and 4).
#   4  the bit trick as inline PTX marked impure, which Triton does not move: the upcast runs
#      on the loaded tile with 128-bit shared loads and fp16 reaches the dot through
#      shared memory and ldmatrix(.trans), like a bf16 tile. 33-35 warp-instructions a token.
#   5  cvt.rn.f16x2.e4m3x2 as impure inline PTX (exact, converted on the loaded tile like 4).
# Bit trick: e4m3 and fp16 differ only in exponent width and bias, so the sign at bit 15 and
# the 7 exponent+mantissa bits at bits 13..7 make an fp16 of exactly value * 2**-8,
# subnormals included (e4m3 subnormals land on fp16 subnormals). The kernel folds the 2**8
# back into the softmax scale (K) and the output normalization (V). NaN codes (0x7f/0xff,
# never written by the saturating KV write) read as +-480 instead of NaN.
_FP8_F16_UNSCALE = tl.constexpr(256.0)

# per 4 codes in $2 (one byte each): prmt puts code i in the low byte of a 16-bit half and
# its sign replicated in the high byte; << 7 moves the 7 low bits to 13..7 and a sign copy
# to 15; the mask keeps bits 15 and 13..7 (dropping the second sign copy at 14 and what the
# shift carried over from the neighbouring half).
_E4M3_F16_SCALED_PTX = tl.constexpr("""
        {
        .reg .b32 a<2>;
        prmt.b32 a0, $2, 0, 0x9180;
        prmt.b32 a1, $2, 0, 0xB3A2;
        shl.b32 a0, a0, 7;
        shl.b32 a1, a1, 7;
        and.b32 $0, a0, 0xBF80BF80;
        and.b32 $1, a1, 0xBF80BF80;
        }
        """)
_E4M3_F16_PTX = tl.constexpr("""
        {
        .reg .b16 lo, hi;
        mov.b32 {lo, hi}, $2;
        cvt.rn.f16x2.e4m3x2 $0, lo;
        cvt.rn.f16x2.e4m3x2 $1, hi;
        }
        """)


@triton.jit
def _e4m3_to_f16_scaled_int(x):
    """The bit trick in integer ops: sign-extend the byte, shift by 7, mask."""
    h = x.to(tl.int8, bitcast=True).to(tl.int32)
    return ((h << 7) & 0xBF80).to(tl.int16).to(tl.float16, bitcast=True)


@triton.jit
def _kv_upcast(x, CVT: tl.constexpr):
    """fp8 e4m3 tile -> fp16 by CVT code (see above): exact for 1 and 5, * 2**-8 for 2-4."""
    bits = x.to(tl.uint8, bitcast=True)
    if CVT == 1:
        y = x.to(tl.float16)
    elif CVT == 2:
        y = tl.inline_asm_elementwise(
            _E4M3_F16_SCALED_PTX, "=r,=r,r", [bits], dtype=tl.float16, is_pure=True, pack=4
        )
    elif CVT == 4:
        y = tl.inline_asm_elementwise(
            _E4M3_F16_SCALED_PTX, "=r,=r,r", [bits], dtype=tl.float16, is_pure=False, pack=4
        )
    elif CVT == 5:
        y = tl.inline_asm_elementwise(
            _E4M3_F16_PTX, "=r,=r,r", [bits], dtype=tl.float16, is_pure=False, pack=4
        )
    else:
        y = _e4m3_to_f16_scaled_int(x)
    return y


# ----------------------------------------------------------------------------------------
# decode: one query per request, split-K over the paged context, GQA groups share KV loads
# ----------------------------------------------------------------------------------------
@triton.jit
def _soft_cap(s, SOFTCAP: tl.constexpr):
    """Scores s (log2 domain: score * log2(e)) capped as SOFTCAP * tanh(score / SOFTCAP),
    with tanh(y) = 1 - 2 / (e^(2y) + 1) (exact limits +-1 where e^(2y) over/underflows);
    with y = score / SOFTCAP, e^(2y) = 2^(2 s / SOFTCAP)."""
    t = 1.0 - 2.0 / (tl.math.exp2(s * (2.0 / SOFTCAP)) + 1.0)
    return t * (SOFTCAP * 1.4426950408889634)


@triton.jit
def _decode_tile(qk, qk_scale, k, v, n_mask, m_i, l_i, acc, q_dtype: tl.constexpr,
                 K_CVT: tl.constexpr, V_CVT: tl.constexpr, SOFTCAP: tl.constexpr = None):
    """Online-softmax update of one [BLOCK_N] tile of cached K/V (masked rows: -inf)."""
    if K_CVT == 0:
        k = k.to(q_dtype)  # fp8 cache: exact upcast; 16-bit: a no-op
    else:
        k = _kv_upcast(k, K_CVT)
    s = tl.dot(qk, tl.trans(k)) * qk_scale
    if SOFTCAP is not None:
        s = _soft_cap(s, SOFTCAP)
    s = tl.where(n_mask[None, :], s, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(s, 1))
    p = tl.math.exp2(s - m_new[:, None])
    alpha = tl.math.exp2(m_i - m_new)
    l_i = l_i * alpha + tl.sum(p, 1)
    if V_CVT == 0:
        v = v.to(q_dtype)
    else:
        v = _kv_upcast(v, V_CVT)
    acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
    return m_new, l_i, acc


@triton.jit
def _rope(row_ptr, offs_d, cos, sin, mask, dt: tl.constexpr, D: tl.constexpr):
    """Rotary (neox halves, full head) of the rows at row_ptr (+ offs_d), rounded as the
    rotary kernel and torch round it: x*cos and partner*sin each to dt, then their sum."""
    x = tl.load(row_ptr + offs_d, mask=mask, other=0.0).to(tl.float32)
    y = tl.load(row_ptr + (offs_d + D // 2) % D, mask=mask, other=0.0).to(tl.float32)
    sign = tl.where(offs_d < D // 2, -1.0, 1.0)
    return (_round(x * cos, dt) + sign * _round(y * sin, dt)).to(dt)


@triton.jit
def _decode_kernel(
    q_ptr,
    cache_ptr,
    out_ptr,
    part_o_ptr,
    part_lse_ptr,
    cnt_ptr,
    block_tables_ptr,
    seq_lens_ptr,
    qsl_ptr,
    order_ptr,
    k_new_ptr,
    v_new_ptr,
    pos_ptr,
    cos_sin_ptr,
    slot_ptr,
    stride_kt,
    stride_vt,
    stride_cs,
    sm_scale_log2,
    stride_qt,
    stride_qh,
    stride_ot,
    stride_oh,
    stride_bt,
    half_stride,
    stride_blk,
    stride_slot,
    NUM_SPLITS: tl.constexpr,
    S_PAD: tl.constexpr,
    G: tl.constexpr,
    G_PAD: tl.constexpr,
    D: tl.constexpr,
    PAGE: tl.constexpr,
    BLOCK_N: tl.constexpr,
    K_CVT: tl.constexpr = 0,  # 0: K.to(q dtype); 1-5: fp8 K -> fp16 via _kv_upcast
    V_CVT: tl.constexpr = 0,  # the same for V
    PDL: tl.constexpr = False,
    ORDERED: tl.constexpr = False,  # grid (KV heads, requests longest first via order_ptr)
    ROPE: tl.constexpr = False,  # q, k_new, v_new raw: rotate here and store the new K/V
    WINDOW: tl.constexpr = None,  # an int: only the last WINDOW positions are attended
    SOFTCAP: tl.constexpr = None,  # a float: scores capped to SOFTCAP * tanh(score / SOFTCAP)
):
    # Before the PDL wait: the step's metadata and the first tile of the context except its
    # newest token (no kernel of this forward writes those; the KV write before this kernel
    # stores the newest token only), so the HBM reads overlap the kernels still running.
    if ORDERED:
        kvh = tl.program_id(0)
        req = tl.load(order_ptr + tl.program_id(1)).to(tl.int32)
        n_kvh = tl.num_programs(0)
    else:
        req = tl.program_id(0)
        kvh = tl.program_id(1)
        n_kvh = tl.num_programs(1)
    split = tl.program_id(2)
    q_start = tl.load(qsl_ptr + req)
    q_len = tl.load(qsl_ptr + req + 1) - q_start
    seq_len = tl.load(seq_lens_ptr + req)
    is_decode = q_len == 1
    seq_len = tl.where(is_decode, seq_len, 0)  # prefill rows belong to the other kernel

    if WINDOW is not None:  # the splits share the window's positions [ctx_lo, seq_len)
        ctx_lo = tl.maximum(seq_len - WINDOW, 0)
        split_len = tl.cdiv(tl.cdiv(seq_len - ctx_lo, NUM_SPLITS), BLOCK_N) * BLOCK_N
        lo = ctx_lo + split * split_len
    else:
        split_len = tl.cdiv(tl.cdiv(seq_len, NUM_SPLITS), BLOCK_N) * BLOCK_N
        lo = split * split_len
    hi = tl.minimum(lo + split_len, seq_len)

    offs_g = tl.arange(0, G_PAD)
    offs_d = tl.arange(0, D)
    heads = kvh * G + offs_g
    g_mask = offs_g < G
    table = block_tables_ptr + req.to(tl.int64) * stride_bt
    kv_head_off = kvh * D
    offs_n = lo + tl.arange(0, BLOCK_N)
    n_mask = offs_n < hi
    page = tl.load(table + offs_n // PAGE, mask=n_mask, other=0).to(tl.int64)
    row0 = page * stride_blk + (offs_n % PAGE) * stride_slot + kv_head_off
    old = (n_mask & (offs_n < seq_len - 1))[:, None]
    k0 = tl.load(cache_ptr + row0[:, None] + offs_d[None, :], mask=old, other=0.0)
    v0 = tl.load(cache_ptr + half_stride + row0[:, None] + offs_d[None, :], mask=old, other=0.0)
    newest = (n_mask & (offs_n == seq_len - 1))[:, None]
    q_row = q_ptr + q_start.to(tl.int64) * stride_qt + heads[:, None] * stride_qh
    if ROPE:  # the step's position and its cos / sin rows: metadata, read before the wait
        tok = q_start.to(tl.int64)
        cs_row = cos_sin_ptr + tl.load(pos_ptr + tok).to(tl.int64) * stride_cs
        cos = tl.load(cs_row + offs_d % (D // 2)).to(tl.float32)
        sin = tl.load(cs_row + D // 2 + offs_d % (D // 2)).to(tl.float32)
        slot = tl.load(slot_ptr + tok)
        pdl.wait(PDL)
        q = _rope(q_row, offs_d, cos, sin, g_mask[:, None] & is_decode, q_ptr.dtype.element_ty, D)
        k_new = _rope(k_new_ptr + tok * stride_kt + kv_head_off, offs_d, cos, sin, is_decode,
                      cache_ptr.dtype.element_ty, D)
        v_new = tl.load(v_new_ptr + tok * stride_vt + kv_head_off + offs_d, mask=is_decode)
        # the split holding the newest position stores it (slot -1: a padded graph row)
        own = is_decode & (seq_len - 1 >= lo) & (seq_len - 1 < hi) & (slot >= 0)
        dst = cache_ptr + slot.to(tl.int64) * stride_slot + kv_head_off + offs_d
        tl.store(dst, k_new, mask=own)
        tl.store(dst + half_stride, v_new.to(cache_ptr.dtype.element_ty), mask=own)
        tl.debug_barrier()  # a later tile of this program reads it back from the cache
        k0 = tl.where(newest, k_new[None, :], k0)
        v0 = tl.where(newest, v_new[None, :].to(cache_ptr.dtype.element_ty), v0)
    else:
        pdl.wait(PDL)
        k0 = tl.where(newest, tl.load(cache_ptr + row0[:, None] + offs_d[None, :], mask=newest,
                                      other=0.0), k0)
        v0 = tl.where(newest, tl.load(cache_ptr + half_stride + row0[:, None] + offs_d[None, :],
                                      mask=newest, other=0.0), v0)
        q = tl.load(q_row + offs_d[None, :], mask=g_mask[:, None] & is_decode, other=0.0)
    m_i = tl.full([G_PAD], _NEG_BIG, tl.float32)
    l_i = tl.zeros([G_PAD], tl.float32)
    acc = tl.zeros([G_PAD, D], tl.float32)
    if K_CVT == 0:
        qk = q
        qk_scale = sm_scale_log2
    else:  # fp16 dot with fp8 K: q in fp16 (exact in its normal range; clamp: no inf)
        qk = tl.clamp(q.to(tl.float32), -65504.0, 65504.0, propagate_nan=tl.PropagateNan.ALL)
        qk = qk.to(tl.float16)
        if K_CVT == 1 or K_CVT == 5:
            qk_scale = sm_scale_log2
        else:
            qk_scale = sm_scale_log2 * _FP8_F16_UNSCALE
    m_i, l_i, acc = _decode_tile(qk, qk_scale, k0, v0, n_mask, m_i, l_i, acc, q.dtype, K_CVT,
                                 V_CVT, SOFTCAP)
    for start in range(lo + BLOCK_N, hi, BLOCK_N):
        offs_n = start + tl.arange(0, BLOCK_N)
        n_mask = offs_n < hi
        page = tl.load(table + offs_n // PAGE, mask=n_mask, other=0).to(tl.int64)
        row = page * stride_blk + (offs_n % PAGE) * stride_slot + kv_head_off
        k = tl.load(cache_ptr + row[:, None] + offs_d[None, :], mask=n_mask[:, None], other=0.0)
        v = tl.load(
            cache_ptr + half_stride + row[:, None] + offs_d[None, :],
            mask=n_mask[:, None],
            other=0.0,
        )
        m_i, l_i, acc = _decode_tile(qk, qk_scale, k, v, n_mask, m_i, l_i, acc, q.dtype, K_CVT,
                                     V_CVT, SOFTCAP)
    safe_l = tl.where(l_i > 0, l_i, 1.0)
    if V_CVT >= 2 and V_CVT <= 4:  # V was read as value * 2**-8
        o = acc / safe_l[:, None] * _FP8_F16_UNSCALE
    else:
        o = acc / safe_l[:, None]
    if NUM_SPLITS == 1:
        tl.store(
            out_ptr
            + q_start.to(tl.int64) * stride_ot
            + heads[:, None] * stride_oh
            + offs_d[None, :],
            o.to(out_ptr.dtype.element_ty),
            mask=g_mask[:, None] & is_decode,
        )
    else:
        # partials laid out [num_reqs, num_heads, NUM_SPLITS, (D | 1)], float32; the split
        # that finishes last for this (request, KV head) merges them (one launch, no merge
        # kernel) and resets the arrival counter for the next launch / CUDA-graph replay
        n_heads = n_kvh * G
        head0 = (req * n_heads + heads) * NUM_SPLITS
        lse = tl.where(l_i > 0, m_i + tl.math.log2(safe_l), _NEG_BIG)
        tl.store(part_lse_ptr + head0 + split, lse, mask=g_mask)
        tl.store(part_o_ptr + (head0 + split)[:, None] * D + offs_d[None, :], o,
                 mask=g_mask[:, None])
        tl.debug_barrier()  # every thread's partials are written before the release below
        counter = cnt_ptr + req * n_kvh + kvh
        if tl.atomic_add(counter, 1, sem="acq_rel") == NUM_SPLITS - 1:
            # merged = sum_s 2**(lse_s - max) * o_s / sum_s 2**(lse_s - max), splits in order
            # (the same bits whichever split arrives last)
            offs_s = tl.arange(0, S_PAD)
            lses = tl.load(part_lse_ptr + head0[:, None] + offs_s[None, :],
                           mask=g_mask[:, None] & (offs_s < NUM_SPLITS)[None, :],
                           other=_NEG_BIG, cache_modifier=".cg")
            top = tl.max(lses, 1)
            den = tl.zeros([G_PAD], tl.float32)
            num = tl.zeros([G_PAD, D], tl.float32)
            for sp in tl.static_range(NUM_SPLITS):
                w = tl.math.exp2(tl.load(part_lse_ptr + head0 + sp, mask=g_mask, other=_NEG_BIG,
                                         cache_modifier=".cg") - top)
                part = tl.load(part_o_ptr + (head0 + sp)[:, None] * D + offs_d[None, :],
                               mask=g_mask[:, None], other=0.0, cache_modifier=".cg")
                den += w
                num += part * w[:, None]
            tl.store(
                out_ptr
                + q_start.to(tl.int64) * stride_ot
                + heads[:, None] * stride_oh
                + offs_d[None, :],
                (num / den[:, None]).to(out_ptr.dtype.element_ty),
                mask=g_mask[:, None] & is_decode,
            )
            tl.atomic_xchg(counter, 0, sem="relaxed")


# ----------------------------------------------------------------------------------------
# prefill / chunked prefill / prefix hits: flash attention over (query block, head) items
# ----------------------------------------------------------------------------------------
@triton.jit
def _prefill_kernel(
    q_ptr,
    cache_ptr,
    out_ptr,
    items_ptr,
    block_tables_ptr,
    seq_lens_ptr,
    qsl_ptr,
    sm_scale_log2,
    stride_qt,
    stride_qh,
    stride_ot,
    stride_oh,
    stride_bt,
    half_stride,
    stride_blk,
    stride_slot,
    G: tl.constexpr,
    D: tl.constexpr,
    PAGE: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    PDL: tl.constexpr = False,
    WINDOW: tl.constexpr = None,  # an int: query p sees keys > p - WINDOW only (sliding)
    SOFTCAP: tl.constexpr = None,  # a float: scores capped to SOFTCAP * tanh(score / SOFTCAP)
):
    pdl.wait(PDL)
    item = tl.program_id(0)
    head = tl.program_id(1)
    req = tl.load(items_ptr + 2 * item)
    q0 = tl.load(items_ptr + 2 * item + 1)
    q_start = tl.load(qsl_ptr + req)
    q_len = tl.load(qsl_ptr + req + 1) - q_start
    seq_len = tl.load(seq_lens_ptr + req)
    ctx_before = seq_len - q_len  # cached tokens in front of this step's queries

    offs_m = q0 + tl.arange(0, BLOCK_M)
    m_mask = offs_m < q_len
    q_pos = ctx_before + offs_m
    offs_d = tl.arange(0, D)
    q = tl.load(
        q_ptr
        + (q_start + offs_m).to(tl.int64)[:, None] * stride_qt
        + head * stride_qh
        + offs_d[None, :],
        mask=m_mask[:, None],
        other=0.0,
    )
    m_i = tl.full([BLOCK_M], _NEG_BIG, tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, D], tl.float32)
    table = block_tables_ptr + req.to(tl.int64) * stride_bt
    kv_head_off = (head // G) * D
    hi = tl.minimum(seq_len, ctx_before + q0 + BLOCK_M)  # causal: nothing past the last query
    if WINDOW is not None:  # nothing before the first query's window
        lo = tl.maximum(ctx_before + q0 - WINDOW + 1, 0)
    else:
        lo = 0
    for start in range(lo, hi, BLOCK_N):
        offs_n = start + tl.arange(0, BLOCK_N)
        n_mask = offs_n < hi
        page = tl.load(table + offs_n // PAGE, mask=n_mask, other=0).to(tl.int64)
        row = page * stride_blk + (offs_n % PAGE) * stride_slot + kv_head_off
        k = tl.load(cache_ptr + row[:, None] + offs_d[None, :], mask=n_mask[:, None], other=0.0)
        k = k.to(q.dtype)  # fp8 cache: exact upcast; 16-bit: a no-op
        s = tl.dot(q, tl.trans(k)) * sm_scale_log2
        if SOFTCAP is not None:
            s = _soft_cap(s, SOFTCAP)
        keep = n_mask[None, :] & (offs_n[None, :] <= q_pos[:, None])
        if WINDOW is not None:
            keep = keep & (offs_n[None, :] > q_pos[:, None] - WINDOW)
        s = tl.where(keep, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        p = tl.math.exp2(s - m_new[:, None])
        alpha = tl.math.exp2(m_i - m_new)
        l_i = l_i * alpha + tl.sum(p, 1)
        v = tl.load(
            cache_ptr + half_stride + row[:, None] + offs_d[None, :],
            mask=n_mask[:, None],
            other=0.0,
        ).to(q.dtype)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
        m_i = m_new
    o = acc / tl.where(l_i > 0, l_i, 1.0)[:, None]
    tl.store(
        out_ptr
        + (q_start + offs_m).to(tl.int64)[:, None] * stride_ot
        + head * stride_oh
        + offs_d[None, :],
        o.to(out_ptr.dtype.element_ty),
        mask=m_mask[:, None],
    )


# ----------------------------------------------------------------------------------------
# host side
# ----------------------------------------------------------------------------------------
PREFILL_BLOCK_M = 64
DECODE_BLOCK_N = 64
MAX_DECODE_SPLITS = 16
_TARGET_PROGRAMS = 2 * 132  # two waves on an H200; a fixed number keeps results portable
# From this many requests the decode programs start with the longest contexts (a sort a step):
# with ragged lengths, a long context left to the last wave otherwise runs on alone.
ORDERED_MIN_REQS = 16
# Decode-only steps: the decode kernel applies the rotary embedding and stores the new K/V
# itself (two kernels fewer a layer; same bits as the separate kernels). On unless
# MODELPORT_ROPE_IN_DECODE=0.
ROPE_IN_DECODE = os.environ.get("MODELPORT_ROPE_IN_DECODE", "1") != "0"
SPLIT_COUNTERS = 4096  # > batch x KV heads of any split launch (that is < DecodeConfig.programs)
_INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"  # no inline asm in the interpreter


@dataclass(frozen=True)
class DecodeConfig:
    """Launch parameters of the decode kernel for one cache kind (see DECODE_CONFIGS).

    k_cvt / v_cvt: how fp8 K / V tiles are upcast, the CVT codes of ``_kv_upcast`` (0: to
    the query dtype; 1-5: to fp16, dot products in fp16); 16-bit caches always run 0.
    programs: the context is split until a batch has about this many programs.
    maxnreg: registers a thread may use (0: the compiler's choice). An SM holds 65,536; the
    shipped tiles compile (offline, sm_90) to 128 a thread for 16-bit with the rotary inside
    and for fp8 (4 programs an SM), 96 for 16-bit without it (5): a cap buys programs an SM,
    and bytes in flight, for spills.
    """

    block_n: int = DECODE_BLOCK_N
    num_warps: int = 4
    num_stages: int = 2
    k_cvt: int = 0
    v_cvt: int = 0
    programs: int = _TARGET_PROGRAMS
    maxnreg: int = 0

    @property
    def name(self) -> str:
        return (
            f"n{self.block_n}w{self.num_warps}s{self.num_stages}"
            f"k{self.k_cvt}v{self.v_cvt}p{self.programs}"
        ) + (f"r{self.maxnreg}" if self.maxnreg else "")

    @classmethod
    def parse(cls, name: str) -> DecodeConfig:
        """Inverse of ``name``: e.g. "n64w4s2k2v4p264", "n32w4s3k0v0p264r96"."""
        m = re.fullmatch(r"n(\d+)w(\d+)s(\d+)k([0-5])v([0-5])p(\d+)(?:r(\d+))?", name.strip())
        if m is None:
            raise ValueError(f"bad decode config {name!r} (want e.g. n64w4s2k2v4p264)")
        return cls(*(int(g or 0) for g in m.groups()))


# Decode launch configs by cache kind: ((smallest batch bucket, config), ...) ascending; a
# batch takes the last entry whose bucket <= its own. Only the kind and the padded bucket
# decide, so an eager batch and its CUDA-graph replay run the same code and give the same
# bits. Both entries are the fastest of `python bench/gpu/kernel_bench.py decode-sweep` on
# the H200 (bench/results/2026-11-29-h200-decode-sweep.jsonl, CUDA-graph replay, batch
# 64/128/256 x 1,152 tokens): 16-bit n64w4s3 277 us at 256 rows (n64w4s2, with which the
# bench/README.md W1/W3 runs were measured: 302 us); fp8 n64w4s2k1v5 206 us (k2v4, the W1
# FP8-KV run: 209 us; the first fp8 kernel: 288 us).
# MODELPORT_DECODE_CONFIG="fp8:n64w4s2k2v4p264,16bit:n64w4s2k0v0p264" replaces a kind's
# entries with one config (for trying a config without editing this).
DECODE_CONFIGS: dict[str, tuple[tuple[int, DecodeConfig], ...]] = {
    # batch 1: one 128-row tile a program, 16 splits, 8 warps: 9.8 -> 6.4 us a layer at 1,024
    # tokens (bench/gpu/fusion_bench.py attn, 2026-12-04-h200-attn-b1-configs.jsonl)
    "16bit": ((1, DecodeConfig(block_n=128, num_warps=8, programs=128)),
              (2, DecodeConfig(num_stages=3)),
              # W1-like ragged contexts (100-1,100 tokens): 32-row tiles from 128 rows, 191 ->
              # 158 us a layer at 256 rows, 97 -> 84 at 128 (at 64 rows 64-row tiles stay
              # best: 50 vs 68; kernel_bench.py decode-ragged); W1 9,996 -> 10,153 tok/s
              # (bench/results/2026-12-04-h200-w1-piecewise-n32.jsonl)
              (128, DecodeConfig(block_n=32, num_stages=3))),
    # fp8, ragged contexts (DECODE_RAGGED_ALL=1, 2026-12-04-h200-decode-ragged-all.jsonl):
    # at 64 rows 128-row tiles, 3 stages: 46.8 -> 38.7 us a layer; at 128 and 256 rows the
    # 64-row tile stays best (61.2 vs 75.2, 114.2 vs 146.3). Buckets between: not measured.
    "fp8": ((1, DecodeConfig(k_cvt=1, v_cvt=5)),
            (64, DecodeConfig(block_n=128, num_stages=3, k_cvt=1, v_cvt=5)),
            (80, DecodeConfig(k_cvt=1, v_cvt=5))),
}

# What the decode-sweep benchmark times, per kind. Offline sm90 compile (loop body per KV
# token, warp-instructions; bf16 default: 26): fp8 as shipped (k0v0) 57; k2v4 35; k4v4 33;
# k1v4 31; k5v5 25 (but its cvt instructions issue at a quarter of the ALU rate).
DECODE_CANDIDATES: dict[str, tuple[DecodeConfig, ...]] = {
    "16bit": (
        DecodeConfig(),
        DecodeConfig(num_stages=3),
        DecodeConfig(block_n=32),
        DecodeConfig(block_n=128, num_warps=8),
        DecodeConfig(block_n=128),
        DecodeConfig(programs=4 * 132),
        DecodeConfig(block_n=128, num_warps=8, programs=128),
        # register caps (bench/gpu/kernel_regs.py decode, 2026-12-05; an SM holds 65,536
        # registers): the shipped 32-row tile with the rotary inside (the engine's
        # decode-only steps) takes 128 a thread, 4 programs an SM; without it 96 (5). r96
        # gives the rotary variant 5 (24 bytes of spill a thread), r80 either 6 (56-104)
        DecodeConfig(block_n=32, num_stages=3, maxnreg=96),
        DecodeConfig(block_n=32, num_stages=3, maxnreg=80),
    ),
    "fp8": (
        DecodeConfig(),  # the upcast 3351eba shipped: cvt chain to the query dtype
        DecodeConfig(k_cvt=2, v_cvt=2),
        DecodeConfig(k_cvt=2, v_cvt=4),
        DecodeConfig(k_cvt=4, v_cvt=4),
        DecodeConfig(k_cvt=5, v_cvt=5),
        DecodeConfig(k_cvt=1, v_cvt=4),
        DecodeConfig(k_cvt=5, v_cvt=4),
        DecodeConfig(k_cvt=1, v_cvt=5),
        DecodeConfig(k_cvt=2, v_cvt=5),
        DecodeConfig(k_cvt=3, v_cvt=3),
        DecodeConfig(k_cvt=2, v_cvt=4, num_stages=3),
        DecodeConfig(k_cvt=4, v_cvt=4, num_stages=1),
        DecodeConfig(k_cvt=2, v_cvt=4, block_n=32),
        DecodeConfig(k_cvt=2, v_cvt=4, block_n=128),
        DecodeConfig(k_cvt=2, v_cvt=4, block_n=128, num_warps=8),
        DecodeConfig(k_cvt=5, v_cvt=5, block_n=128),
        DecodeConfig(k_cvt=5, v_cvt=5, block_n=128, num_warps=8),
        DecodeConfig(k_cvt=2, v_cvt=4, programs=4 * 132),
        DecodeConfig(k_cvt=5, v_cvt=5, programs=4 * 132),
        # around the shipped k1v5: wider tiles (more fp8 bytes in flight a program), stages
        DecodeConfig(k_cvt=1, v_cvt=5, block_n=128),
        DecodeConfig(k_cvt=1, v_cvt=5, block_n=128, num_warps=8),
        DecodeConfig(k_cvt=1, v_cvt=5, num_stages=3),
        DecodeConfig(k_cvt=1, v_cvt=5, block_n=128, num_stages=3),
        DecodeConfig(k_cvt=1, v_cvt=5, num_warps=8),
        DecodeConfig(k_cvt=1, v_cvt=5, block_n=32),
        DecodeConfig(k_cvt=1, v_cvt=5, num_stages=4),
        # shared memory bounds the programs an SM holds (34 KB each for 64-row tiles and 2
        # stages: 6 a SM, offline sm_90 compile): one stage (17 KB) or fewer warps a program
        DecodeConfig(k_cvt=1, v_cvt=5, num_stages=1),
        DecodeConfig(k_cvt=1, v_cvt=5, num_warps=2),
        DecodeConfig(k_cvt=1, v_cvt=5, block_n=32, num_warps=2),
        # registers bound the shipped fp8 tile at 4 programs an SM (128 a thread; shared
        # memory would allow 6): caps trade spills for programs (offline sm_90 compile:
        # r96 5 programs, 184 bytes of spill a thread; r80 6, 336); 3 stages take 144 a
        # thread (3 programs), r128 keeps them at 4 without a spill
        DecodeConfig(k_cvt=1, v_cvt=5, maxnreg=96),
        DecodeConfig(k_cvt=1, v_cvt=5, maxnreg=80),
        DecodeConfig(k_cvt=1, v_cvt=5, num_stages=3, maxnreg=128),
    ),
}


def _apply_env_configs(spec: str | None) -> None:
    """MODELPORT_DECODE_CONFIG items "kind:name" replace all of a kind's entries with one
    config; "kind@bucket:name" replaces (or adds) only the entry from that batch bucket."""
    for item in filter(None, (spec or "").split(",")):
        head, _, name = item.partition(":")
        kind, _, at = head.strip().partition("@")
        if kind not in DECODE_CONFIGS:
            raise ValueError(f"MODELPORT_DECODE_CONFIG: unknown cache kind {kind!r}")
        cfg = DecodeConfig.parse(name)
        if not at:
            DECODE_CONFIGS[kind] = ((1, cfg),)
            continue
        if not at.isdigit() or int(at) < 1:
            raise ValueError(f"MODELPORT_DECODE_CONFIG: bad batch bucket {at!r} in {item!r}")
        entries = dict(DECODE_CONFIGS[kind])
        entries[int(at)] = cfg
        DECODE_CONFIGS[kind] = tuple(sorted(entries.items()))


_apply_env_configs(os.environ.get("MODELPORT_DECODE_CONFIG"))


def cache_kind(kv_dtype: torch.dtype | None) -> str:
    return "fp8" if kv_dtype in FP8_KV_DTYPES else "16bit"


def decode_config(num_reqs: int, kv_dtype: torch.dtype | None = None) -> DecodeConfig:
    """The decode launch config for this batch (by its padded bucket) and cache dtype."""
    bucket = batch_bucket(num_reqs)
    cfg = None
    for min_bucket, c in DECODE_CONFIGS[cache_kind(kv_dtype)]:
        if cfg is None or min_bucket <= bucket:
            cfg = c
    assert cfg is not None
    return cfg


def batch_bucket(num_reqs: int) -> int:
    """The CUDA-graph ladder bucket a decode batch is padded to (1, 2, 4, 8, then 16k)."""
    if num_reqs <= 8:
        return 1 << max(0, (num_reqs - 1).bit_length())
    return -(-num_reqs // 16) * 16


def decode_splits(num_reqs: int, num_kv_heads: int, programs: int = _TARGET_PROGRAMS) -> int:
    """Context splits per decode request: enough programs to fill the GPU at small batches.

    Depends on the padded bucket only, so a batch run eagerly and the same batch replayed
    from its CUDA graph reduce in the same order and give identical bits.
    """
    want = -(-programs // (batch_bucket(num_reqs) * num_kv_heads))
    return 1 << min(max(0, (want - 1).bit_length()), MAX_DECODE_SPLITS.bit_length() - 1)


@functools.cache
def split_counters(device: torch.device) -> torch.Tensor:
    """Arrival counters of the split decode kernel, one per (request, KV head): zero between
    launches (the last split of each resets its own). Splits > 1 only while batch x KV heads
    is below the target program count, so a fixed size covers every such batch."""
    return torch.zeros((SPLIT_COUNTERS,), dtype=torch.int32, device=device)


@dataclass
class TritonPlan:
    """Per-step launch plan, built once from host metadata and shared by every layer."""

    has_decode: bool
    prefill_items: torch.Tensor | None  # [n_items, 2] int32 (request, first query row)
    splits: int
    decode_cfg: DecodeConfig
    order: torch.Tensor | None = None  # requests by context length, longest first (device)


def build_plan(
    meta: AttentionMetadata, num_kv_heads: int, kv_dtype: torch.dtype | None = None
) -> TritonPlan:
    qsl = meta.query_start_loc_cpu
    items: list[int] = []
    has_decode = False
    for i in range(len(qsl) - 1):
        n = qsl[i + 1] - qsl[i]
        if n == 1:
            has_decode = True
        elif n > 1:
            for q0 in range(0, n, PREFILL_BLOCK_M):
                items += (i, q0)
    prefill = None
    if items:
        prefill = torch.tensor(items, dtype=torch.int32).view(-1, 2)
        prefill = prefill.pin_memory() if meta.seq_lens.is_cuda else prefill
        prefill = prefill.to(meta.seq_lens.device, non_blocking=True)
    cfg = decode_config(meta.num_reqs, kv_dtype)
    splits = decode_splits(meta.num_reqs, num_kv_heads, cfg.programs)
    order = None
    if has_decode and meta.num_reqs >= ORDERED_MIN_REQS:
        # on the device (a CUDA graph replays it with each step's lengths): one sort a step,
        # shared by every layer
        order = torch.argsort(meta.seq_lens[: meta.num_reqs], descending=True)
    return TritonPlan(has_decode, prefill, splits, cfg, order)


def get_plan(
    meta: AttentionMetadata, num_kv_heads: int, kv_dtype: torch.dtype | None = None
) -> TritonPlan:
    plan = meta.backend_state.get("triton")
    if plan is None:
        plan = build_plan(meta, num_kv_heads, kv_dtype)
        meta.backend_state["triton"] = plan
    return plan


def supports(q: torch.Tensor, kv_cache: torch.Tensor, head_dim: int) -> bool:
    """Whether these kernels handle this layer: CUDA, 16-bit queries, a cache of the query
    dtype or fp8 e4m3, power-of-two head_dim >= 16."""
    return (
        q.is_cuda
        and q.dtype in (torch.float16, torch.bfloat16)
        and (kv_cache.dtype == q.dtype or kv_cache.dtype in FP8_KV_DTYPES)
        and head_dim >= 16
        and head_dim & (head_dim - 1) == 0
        and kv_cache.is_contiguous()
    )


def rope_fits(q: torch.Tensor, kv_cache: torch.Tensor, meta: AttentionMetadata,
              rotary: torch.nn.Module) -> bool:
    """Whether triton_paged_attention can take this step's rotary and KV write (``rope=``,
    with rotary.cos_sin_cache): ROPE_IN_DECODE is on (MODELPORT_ROPE_IN_DECODE=0 turns it
    off), every request decodes one token, the cache has the query dtype, and the rotary
    covers the whole head with a table of [cos | sin] rows in the query dtype."""
    if not ROPE_IN_DECODE or meta.max_query_len != 1 or kv_cache.dtype != q.dtype:
        return False
    cos_sin = getattr(rotary, "cos_sin_cache", None)
    return (
        getattr(rotary, "rotary_dim", 0) == q.shape[-1]
        and cos_sin is not None
        and cos_sin.dtype == q.dtype
        and cos_sin.shape[-1] == q.shape[-1]
        and cos_sin.stride(-1) == 1
    )


def triton_paged_attention(
    q: torch.Tensor,
    kv_cache: torch.Tensor,
    meta: AttentionMetadata,
    scale: float,
    rope: tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor] | None = None,
    out: torch.Tensor | None = None,
    sliding_window: int | None = None,
    soft_cap: float | None = None,
) -> torch.Tensor:
    """Drop-in replacement for reference_paged_attention on CUDA (q: [T, H, D]).

    rope=(k, v, positions, cos_sin) (a decode-only step, see rope_fits): q and k are not
    rotated yet and k / v not yet in the cache; the decode kernel rotates q and k and stores
    k and v at meta.slot_mapping itself (what the rotary and KV-write kernels would do).
    out: a [T, H, D] buffer to write into (piecewise CUDA graphs) instead of a new tensor.
    sliding_window / soft_cap: as reference_paged_attention's; constexprs of the kernels (one
    compiled variant per value; None: the plain kernels, unchanged)."""
    t, h, d = q.shape
    extra = {}
    if sliding_window is not None:
        extra["WINDOW"] = int(sliding_window)
    if soft_cap is not None:
        extra["SOFTCAP"] = float(soft_cap)
    _, nb, page, kvh, _ = kv_cache.shape
    g = h // kvh
    if out is None:
        out = torch.empty_like(q)
    elif out.shape != q.shape or out.dtype != q.dtype or out.stride(-1) != 1:
        raise ValueError(f"out {tuple(out.shape)} {out.dtype} does not fit q {tuple(q.shape)}")
    plan = get_plan(meta, kvh, kv_cache.dtype)
    if rope is not None:
        k_new, v_new, positions, cos_sin = rope
        assert plan.prefill_items is None and k_new.stride(-1) == 1 and v_new.stride(-1) == 1
        assert k_new.stride(-2) == d and v_new.stride(-2) == d and q.stride(-1) == 1
        rope_args = (k_new, v_new, positions, cos_sin, meta.slot_mapping, k_new.stride(0),
                     v_new.stride(0), cos_sin.stride(0))
    else:
        rope_args = (q, q, meta.seq_lens, q, meta.seq_lens, 0, 0, 0)  # unused
    scale_log2 = scale * _LOG2E
    half = nb * page * kvh * d
    cache_strides = (half, page * kvh * d, kvh * d)
    bt = meta.block_tables
    n_reqs = meta.num_reqs
    if plan.has_decode:
        splits, cfg = plan.splits, plan.decode_cfg
        k_cvt = v_cvt = 0
        if kv_cache.dtype in FP8_KV_DTYPES:
            k_cvt, v_cvt = cfg.k_cvt, cfg.v_cvt
            if _INTERPRET:  # no inline asm there: the same bits in plain Triton ops
                k_cvt, v_cvt = ({2: 3, 4: 3, 5: 1}.get(c, c) for c in (k_cvt, v_cvt))
        if splits > 1:
            part_o = torch.empty((n_reqs, h, splits, d), dtype=torch.float32, device=q.device)
            part_lse = torch.empty((n_reqs, h, splits), dtype=torch.float32, device=q.device)
            counters = split_counters(q.device)
            assert n_reqs * kvh <= counters.numel(), "split decode batches are small"
        else:
            part_o = part_lse = counters = out  # unused
        ordered = plan.order is not None
        grid = (kvh, n_reqs, splits) if ordered else (n_reqs, kvh, splits)
        _decode_kernel[grid](
            q,
            kv_cache,
            out,
            part_o,
            part_lse,
            counters,
            bt,
            meta.seq_lens,
            meta.query_start_loc,
            plan.order if ordered else meta.seq_lens,
            *rope_args,
            scale_log2,
            q.stride(0),
            q.stride(1),
            out.stride(0),
            out.stride(1),
            bt.stride(0),
            *cache_strides,
            NUM_SPLITS=splits,
            S_PAD=max(2, splits),
            G=g,
            G_PAD=max(16, triton.next_power_of_2(g)),
            D=d,
            PAGE=page,
            BLOCK_N=cfg.block_n,
            K_CVT=k_cvt,
            V_CVT=v_cvt,
            ORDERED=ordered,
            ROPE=rope is not None,
            **extra,
            num_warps=cfg.num_warps,
            num_stages=cfg.num_stages,
            **({"maxnreg": cfg.maxnreg} if cfg.maxnreg else {}),
            **pdl.kernel_kwargs(),
        )
    if plan.prefill_items is not None:
        items = plan.prefill_items
        _prefill_kernel[(items.shape[0], h)](
            q,
            kv_cache,
            out,
            items,
            bt,
            meta.seq_lens,
            meta.query_start_loc,
            scale_log2,
            q.stride(0),
            q.stride(1),
            out.stride(0),
            out.stride(1),
            bt.stride(0),
            *cache_strides,
            G=g,
            D=d,
            PAGE=page,
            BLOCK_M=PREFILL_BLOCK_M,
            BLOCK_N=64,
            **extra,
            num_warps=4,
            num_stages=2,
            **pdl.kernel_kwargs(),
        )
    return out
