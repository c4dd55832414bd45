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
  ("flash decoding") so that a single stream still fills the 132 SMs; a tiny second kernel
  merges the splits by their log-sum-exp.
- Prefill rows are compute-bound: a flash-attention loop over (query block, head) work items
  built on the host once per step, so decode requests in a mixed batch cost no prefill
  programs.

Numerical choices keep CUDA-graph replay and eager runs bit-identical: the split count
depends only on the padded batch bucket, never on the step's context lengths.

FP8 KV cache (``--kv-cache-dtype fp8``, torch.float8_e4m3fn): the write clamps K/V to the
e4m3 range (+-448) and casts with scale 1.0 (vLLM's default without calibrated scales), so
outliers saturate instead of turning into NaN; the attention kernels load fp8 tiles and
upcast them (exactly) to the query dtype before the dot products. Decode reads half the
bytes. On a 16-bit cache those casts are no-ops, so that path compiles to the same code.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
import triton
import triton.language as tl

from modelport.layers.attention import FP8_E4M3_MAX, FP8_KV_DTYPES

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
):
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
    )


# ----------------------------------------------------------------------------------------
# decode: one query per request, split-K over the paged context, GQA groups share KV loads
# ----------------------------------------------------------------------------------------
@triton.jit
def _decode_kernel(
    q_ptr,
    cache_ptr,
    out_ptr,
    part_o_ptr,
    part_lse_ptr,
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
    NUM_SPLITS: tl.constexpr,
    G: tl.constexpr,
    G_PAD: tl.constexpr,
    D: tl.constexpr,
    PAGE: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    req = tl.program_id(0)
    kvh = tl.program_id(1)
    split = tl.program_id(2)
    q_start = tl.load(qsl_ptr + req)
    q_len = tl.load(qsl_ptr + req + 1) - q_start
    seq_len = tl.load(seq_lens_ptr + req)
    is_decode = q_len == 1
    seq_len = tl.where(is_decode, seq_len, 0)  # prefill rows belong to the other kernel

    split_len = tl.cdiv(tl.cdiv(seq_len, NUM_SPLITS), BLOCK_N) * BLOCK_N
    lo = split * split_len
    hi = tl.minimum(lo + split_len, seq_len)

    offs_g = tl.arange(0, G_PAD)
    offs_d = tl.arange(0, D)
    heads = kvh * G + offs_g
    g_mask = offs_g < G
    q = tl.load(
        q_ptr + q_start.to(tl.int64) * stride_qt + heads[:, None] * stride_qh + offs_d[None, :],
        mask=g_mask[:, None] & is_decode,
        other=0.0,
    )
    m_i = tl.full([G_PAD], _NEG_BIG, tl.float32)
    l_i = tl.zeros([G_PAD], tl.float32)
    acc = tl.zeros([G_PAD, D], tl.float32)
    table = block_tables_ptr + req.to(tl.int64) * stride_bt
    kv_head_off = kvh * D
    for start in range(lo, hi, BLOCK_N):
        offs_n = start + tl.arange(0, BLOCK_N)
        n_mask = offs_n < hi
        page = tl.load(table + offs_n // PAGE, mask=n_mask, other=0).to(tl.int64)
        row = page * stride_blk + (offs_n % PAGE) * stride_slot + kv_head_off
        k = tl.load(cache_ptr + row[:, None] + offs_d[None, :], mask=n_mask[:, None], other=0.0)
        k = k.to(q.dtype)  # fp8 cache: exact upcast; 16-bit: a no-op
        s = tl.dot(q, tl.trans(k)) * sm_scale_log2
        s = tl.where(n_mask[None, :], s, float("-inf"))
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
    safe_l = tl.where(l_i > 0, l_i, 1.0)
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
        # partials laid out [num_reqs, num_heads, NUM_SPLITS, (D | 1)], float32
        n_heads = tl.num_programs(1) * G
        base = (req * n_heads + heads) * NUM_SPLITS + split
        lse = tl.where(l_i > 0, m_i + tl.math.log2(safe_l), _NEG_BIG)
        tl.store(part_lse_ptr + base, lse, mask=g_mask)
        tl.store(part_o_ptr + base[:, None] * D + offs_d[None, :], o, mask=g_mask[:, None])


@triton.jit
def _merge_splits_kernel(
    out_ptr,
    part_o_ptr,
    part_lse_ptr,
    qsl_ptr,
    stride_ot,
    stride_oh,
    NUM_SPLITS: tl.constexpr,
    S_PAD: tl.constexpr,
    D: tl.constexpr,
):
    req = tl.program_id(0)
    head = tl.program_id(1)
    q_start = tl.load(qsl_ptr + req)
    is_decode = (tl.load(qsl_ptr + req + 1) - q_start) == 1
    offs_s = tl.arange(0, S_PAD)
    offs_d = tl.arange(0, D)
    s_mask = offs_s < NUM_SPLITS
    base = (req * tl.num_programs(1) + head) * NUM_SPLITS
    lse = tl.load(part_lse_ptr + base + offs_s, mask=s_mask, other=_NEG_BIG)
    w = tl.math.exp2(lse - tl.max(lse, 0))
    w = tl.where(s_mask, w, 0.0)
    o = tl.load(
        part_o_ptr + (base + offs_s)[:, None] * D + offs_d[None, :], mask=s_mask[:, None], other=0.0
    )
    merged = tl.sum(o * w[:, None], 0) / tl.sum(w, 0)
    tl.store(
        out_ptr + q_start.to(tl.int64) * stride_ot + head * stride_oh + offs_d,
        merged.to(out_ptr.dtype.element_ty),
        mask=(offs_d < D) & is_decode,
    )


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
):
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
    for start in range(0, hi, BLOCK_N):
        offs_n = start + tl.arange(0, BLOCK_N)
        n_mask = offs_n < hi
        page = tl.load(table + offs_n // PAGE, mask=n_mask, other=0).to(tl.int64)
        row = page * stride_blk + (offs_n % PAGE) * stride_slot + kv_head_off
        k = tl.load(cache_ptr + row[:, None] + offs_d[None, :], mask=n_mask[:, None], other=0.0)
        k = k.to(q.dtype)  # fp8 cache: exact upcast; 16-bit: a no-op
        s = tl.dot(q, tl.trans(k)) * sm_scale_log2
        keep = n_mask[None, :] & (offs_n[None, :] <= q_pos[:, None])
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


def batch_bucket(num_reqs: int) -> int:
    """The CUDA-graph ladder bucket a decode batch is padded to (1, 2, 4, 8, then 16k)."""
    if num_reqs <= 8:
        return 1 << max(0, (num_reqs - 1).bit_length())
    return -(-num_reqs // 16) * 16


def decode_splits(num_reqs: int, num_kv_heads: int) -> int:
    """Context splits per decode request: enough programs to fill the GPU at small batches.

    Depends on the padded bucket only, so a batch run eagerly and the same batch replayed
    from its CUDA graph reduce in the same order and give identical bits.
    """
    want = -(-_TARGET_PROGRAMS // (batch_bucket(num_reqs) * num_kv_heads))
    return 1 << min(max(0, (want - 1).bit_length()), MAX_DECODE_SPLITS.bit_length() - 1)


@dataclass
class TritonPlan:
    """Per-step launch plan, built once from host metadata and shared by every layer."""

    has_decode: bool
    prefill_items: torch.Tensor | None  # [n_items, 2] int32 (request, first query row)
    splits: int


def build_plan(meta: AttentionMetadata, num_kv_heads: int) -> TritonPlan:
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
    return TritonPlan(has_decode, prefill, decode_splits(meta.num_reqs, num_kv_heads))


def get_plan(meta: AttentionMetadata, num_kv_heads: int) -> TritonPlan:
    plan = meta.backend_state.get("triton")
    if plan is None:
        plan = build_plan(meta, num_kv_heads)
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


def triton_paged_attention(
    q: torch.Tensor, kv_cache: torch.Tensor, meta: AttentionMetadata, scale: float
) -> torch.Tensor:
    """Drop-in replacement for reference_paged_attention on CUDA (q: [T, H, D])."""
    t, h, d = q.shape
    _, nb, page, kvh, _ = kv_cache.shape
    g = h // kvh
    out = torch.empty_like(q)
    plan = get_plan(meta, kvh)
    scale_log2 = scale * _LOG2E
    half = nb * page * kvh * d
    cache_strides = (half, page * kvh * d, kvh * d)
    bt = meta.block_tables
    n_reqs = meta.num_reqs
    if plan.has_decode:
        splits = plan.splits
        if splits > 1:
            part_o = torch.empty((n_reqs, h, splits, d), dtype=torch.float32, device=q.device)
            part_lse = torch.empty((n_reqs, h, splits), dtype=torch.float32, device=q.device)
        else:
            part_o = part_lse = out  # unused
        _decode_kernel[(n_reqs, kvh, splits)](
            q,
            kv_cache,
            out,
            part_o,
            part_lse,
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
            NUM_SPLITS=splits,
            G=g,
            G_PAD=max(16, triton.next_power_of_2(g)),
            D=d,
            PAGE=page,
            BLOCK_N=DECODE_BLOCK_N,
            num_warps=4,
            num_stages=2,
        )
        if splits > 1:
            _merge_splits_kernel[(n_reqs, h)](
                out,
                part_o,
                part_lse,
                meta.query_start_loc,
                out.stride(0),
                out.stride(1),
                NUM_SPLITS=splits,
                S_PAD=max(2, splits),
                D=d,
                num_warps=4,
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
            num_warps=4,
            num_stages=2,
        )
    return out
