"""Paged attention: the forward context, the metadata contract and the torch reference backend.

KV cache layout, per layer: a tensor [2, num_blocks, block_size, num_kv_heads, head_dim]
(index 0 = K, 1 = V). A token at position p of a request lives in slot
block_table[p // block_size] * block_size + p % block_size of the flattened
[num_blocks * block_size] view.

The batch is flat: all scheduled tokens of all requests concatenated in request order.
Request i owns query rows query_start_loc[i]:query_start_loc[i+1] and its context is
positions 0 .. seq_lens[i]-1, of which the last (query_len) are the new tokens.

An fp8 cache (torch.float8_e4m3fn, ``--kv-cache-dtype fp8``) stores K/V clamped to the e4m3
range (+-448) and cast with scale 1.0; readers upcast to the query dtype (exact). The Triton
kernels do the same, so CPU and GPU agree.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from modelport.config import DUMMY_ATTENTION_SCORES
from modelport.layers import cpu_fast


@dataclass
class AttentionMetadata:
    slot_mapping: torch.Tensor  # [num_tokens] int64: flat cache slot of each new token
    query_start_loc: torch.Tensor  # [num_reqs + 1] int32 (device)
    seq_lens: torch.Tensor  # [num_reqs] int32 (device): context length incl. new tokens
    block_tables: torch.Tensor  # [num_reqs, max_blocks] int32 (device), padded with 0
    max_query_len: int
    max_seq_len: int
    # host copies for backends that loop in Python (the reference backend)
    query_start_loc_cpu: list[int]
    seq_lens_cpu: list[int]
    block_size: int
    # per-step scratch of a fast backend (e.g. its launch plan), built by the first layer
    # and reused by the others; never read by the reference backend
    backend_state: dict = field(default_factory=dict)

    @property
    def num_reqs(self) -> int:
        return len(self.seq_lens_cpu)

    @property
    def is_pure_decode(self) -> bool:
        return self.max_query_len == 1


@dataclass
class ForwardContext:
    attn_metadata: AttentionMetadata | None
    kv_caches: list[torch.Tensor]  # one per layer, see module docstring
    # set while piecewise CUDA graphs are captured (runner/piecewise_graphs.py): attention
    # calls are recorded there instead of run
    piecewise: Any = None


_CONTEXT: ForwardContext | None = None


@contextlib.contextmanager
def forward_context(ctx: ForwardContext) -> Iterator[ForwardContext]:
    """Make ctx visible to attention layers for one forward pass; nesting is a bug."""
    global _CONTEXT
    if _CONTEXT is not None:
        raise RuntimeError("forward_context is already set: nested model forwards are not allowed")
    _CONTEXT = ctx
    try:
        yield ctx
    finally:
        _CONTEXT = None


def get_forward_context() -> ForwardContext:
    if _CONTEXT is None:
        raise RuntimeError("attention called outside forward_context()")
    return _CONTEXT


FP8_KV_DTYPES = (torch.float8_e4m3fn,)
FP8_E4M3_MAX = 448.0  # torch.finfo(torch.float8_e4m3fn).max


def to_cache_dtype(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """K or V as the cache stores it: fp8 saturates to +-448 (scale 1.0) instead of NaN."""
    if dtype in FP8_KV_DTYPES:
        return x.float().clamp(-FP8_E4M3_MAX, FP8_E4M3_MAX).to(dtype)
    return x.to(dtype)


def _bytes(t: torch.Tensor) -> torch.Tensor:
    """fp8 tensors as uint8 for index ops that lack fp8 kernels (CPU index_copy_), else t."""
    return t.view(torch.uint8) if t.dtype in FP8_KV_DTYPES else t


def write_kv(kv_cache: torch.Tensor, k: torch.Tensor, v: torch.Tensor, slots: torch.Tensor) -> None:
    """Store new K/V rows ([T, kv_heads, head_dim]) into their cache slots."""
    _, nb, bs, h, d = kv_cache.shape
    if not kv_cache.is_cuda and cpu_fast.ENABLED and k.dtype == kv_cache.dtype == v.dtype:
        flat = kv_cache.view(2, nb * bs, h, d)  # same dtype: no casts, no byte views
        flat[0].index_copy_(0, slots, k)
        flat[1].index_copy_(0, slots, v)
        return
    flat = _bytes(kv_cache.view(2, nb * bs, h, d))
    flat[0].index_copy_(0, slots, _bytes(to_cache_dtype(k, kv_cache.dtype)))
    flat[1].index_copy_(0, slots, _bytes(to_cache_dtype(v, kv_cache.dtype)))


def gather_kv(
    kv_cache: torch.Tensor, block_ids: torch.Tensor, seq_len: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """K and V of positions [0, seq_len) of one request: each [seq_len, kv_heads, head_dim]."""
    n_blocks = (seq_len + kv_cache.shape[2] - 1) // kv_cache.shape[2]
    ids = block_ids[:n_blocks]
    raw = _bytes(kv_cache)
    if not kv_cache.is_cuda and cpu_fast.ENABLED:  # K and V blocks in one gather
        kv = raw.index_select(1, ids).flatten(1, 2)[:, :seq_len].view(kv_cache.dtype)
        return kv[0], kv[1]
    k = raw[0].index_select(0, ids).flatten(0, 1)[:seq_len].view(kv_cache.dtype)
    v = raw[1].index_select(0, ids).flatten(0, 1)[:seq_len].view(kv_cache.dtype)
    return k, v


def reference_paged_attention(
    q: torch.Tensor,
    kv_cache: torch.Tensor,
    meta: AttentionMetadata,
    scale: float,
    sliding_window: int | None = None,
    soft_cap: float | None = None,
) -> torch.Tensor:
    """Causal attention of each request's new queries over its cached context.

    q: [num_tokens, num_heads, head_dim] -> [num_tokens, num_heads, head_dim].
    Correct on any device: one batched SDPA call for a decode-only batch, otherwise one call
    per request (the fast kernels replace this on CUDA).
    sliding_window: a query at position p sees keys at positions > p - sliding_window (HF's
    rule); soft_cap: scores become soft_cap * tanh(scores / soft_cap) before the mask.
    """
    if sliding_window is not None or soft_cap is not None:
        return _windowed_attention(q, kv_cache, meta, scale, sliding_window, soft_cap)
    if meta.is_pure_decode and meta.num_reqs > 1:
        return _batched_decode_attention(q, kv_cache, meta, scale)
    if meta.num_reqs == 1 and q.shape[0] == 1 and not q.is_cuda and cpu_fast.ENABLED:
        # one decode token (CPU, batch 1): no output buffer, no mask, no per-request loop;
        # when the request's blocks are consecutive (checked once per step) its K/V are read
        # in place, a view with the layout the gather would have copied into
        seq_len = meta.seq_lens_cpu[0]
        n_blocks = (seq_len + kv_cache.shape[2] - 1) // kv_cache.shape[2]
        first = meta.backend_state.get("cpu_first_block", ())
        if first == ():
            ids = meta.block_tables[0, :n_blocks].tolist()
            first = ids[0] if ids == list(range(ids[0], ids[0] + n_blocks)) else None
            meta.backend_state["cpu_first_block"] = first
        if first is not None:
            raw = _bytes(kv_cache)
            kv = raw[:, first : first + n_blocks].flatten(1, 2)[:, :seq_len].view(kv_cache.dtype)
            k, v = kv[0], kv[1]
        else:
            k, v = gather_kv(kv_cache, meta.block_tables[0], seq_len)
        o = grouped_attention(q.transpose(0, 1).unsqueeze(0),
                              k.transpose(0, 1).unsqueeze(0).to(q.dtype),
                              v.transpose(0, 1).unsqueeze(0).to(q.dtype), None, scale)
        return o.squeeze(0).transpose(0, 1)
    out = torch.empty_like(q)
    qsl = meta.query_start_loc_cpu
    for i, seq_len in enumerate(meta.seq_lens_cpu):
        s, e = qsl[i], qsl[i + 1]
        if e > s:
            out[s:e] = request_attention(q[s:e], kv_cache, meta.block_tables[i], seq_len, scale)
    return out


def request_attention(
    q: torch.Tensor, kv_cache: torch.Tensor, block_ids: torch.Tensor, seq_len: int,
    scale: float, window: int | None = None, soft_cap: float | None = None,
) -> torch.Tensor:
    """Causal attention of one request's n new queries ([n, heads, head_dim], the last n of
    its seq_len positions) over its cached context; with a sliding window only the keys its
    first query can still see are read (older blocks stay allocated)."""
    n = q.shape[0]
    lo = max(0, seq_len - n - window + 1) if window is not None else 0
    k, v = gather_kv(kv_cache, block_ids, seq_len)
    if lo:
        k, v = k[lo:], v[lo:]
    mask = None
    if n > 1 or window is not None:
        # query j sits at position seq_len - n + j and sees keys <= that position
        qpos = torch.arange(seq_len - n, seq_len, device=q.device).unsqueeze(1)
        kpos = torch.arange(lo, seq_len, device=q.device).unsqueeze(0)
        mask = kpos <= qpos  # [n, S - lo]
        if window is not None:
            mask = mask & (kpos > qpos - window)
        mask = mask[None, None, None]
    o = grouped_attention(q.transpose(0, 1).unsqueeze(0),
                          k.transpose(0, 1).unsqueeze(0).to(q.dtype),
                          v.transpose(0, 1).unsqueeze(0).to(q.dtype), mask, scale, soft_cap)
    return o.squeeze(0).transpose(0, 1)


def grouped_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None, scale: float,
    soft_cap: float | None = None,
) -> torch.Tensor:
    """Attention with grouped KV heads as batched matmuls, without repeating K/V.

    q [B, H, n, D], k/v [B, KH, S, D], mask broadcastable to [B, KH, H/KH, n, S] (True = see).
    (Plain matmuls: on CPU, SDPA's GQA path is several times slower for short queries.)
    soft_cap: scores -> soft_cap * tanh(scores / soft_cap) before masking (Gemma 2).
    """
    b, h, n, d = q.shape
    kh, s_len = k.shape[1], k.shape[2]
    g = h // kh
    scores = torch.matmul(q.reshape(b, kh, g * n, d), k.transpose(-1, -2)) * scale
    if soft_cap is not None:
        scores = torch.tanh(scores / soft_cap) * soft_cap
    scores = scores.view(b, kh, g, n, s_len)
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf"))
    probs = scores.softmax(dim=-1).view(b, kh, g * n, s_len)
    return torch.matmul(probs, v).view(b, h, n, d)


def _windowed_attention(
    q: torch.Tensor, kv_cache: torch.Tensor, meta: AttentionMetadata, scale: float,
    window: int | None, soft_cap: float | None,
) -> torch.Tensor:
    """reference_paged_attention with a sliding window and / or score soft-capping: one
    call per request (request_attention)."""
    out = torch.empty_like(q)
    qsl = meta.query_start_loc_cpu
    for i, seq_len in enumerate(meta.seq_lens_cpu):
        s, e = qsl[i], qsl[i + 1]
        if e > s:
            out[s:e] = request_attention(q[s:e], kv_cache, meta.block_tables[i], seq_len,
                                         scale, window, soft_cap)
    return out


def _batched_decode_attention(
    q: torch.Tensor, kv_cache: torch.Tensor, meta: AttentionMetadata, scale: float
) -> torch.Tensor:
    """All requests have one query: gather every context padded to the longest and mask."""
    b, h, d = q.shape
    bs = kv_cache.shape[2]
    max_len = meta.max_seq_len
    n_blocks = (max_len + bs - 1) // bs
    tables = meta.block_tables[:, :n_blocks].long()
    raw = _bytes(kv_cache)
    k = raw[0][tables].flatten(1, 2)[:, :max_len].view(kv_cache.dtype)
    v = raw[1][tables].flatten(1, 2)[:, :max_len].view(kv_cache.dtype)
    k = k.transpose(1, 2).to(q.dtype)  # [B, KH, L, D]
    v = v.transpose(1, 2).to(q.dtype)
    lens = meta.seq_lens.to(q.device).long()
    mask = torch.arange(max_len, device=q.device).unsqueeze(0) < lens.unsqueeze(1)  # [B, L]
    o = grouped_attention(q.unsqueeze(2), k, v, mask[:, None, None, None, :], scale)
    return o.squeeze(2)


class Attention(nn.Module):
    """Attention over the paged KV cache of one layer.

    Model code calls it like single-device attention on flat [T, heads*dim] tensors; the
    metadata and the layer's cache come from the forward context.
    """

    def __init__(
        self, num_heads: int, head_dim: int, num_kv_heads: int, layer_idx: int, scale: float,
        sliding_window: int | None = None, logits_soft_cap: float | None = None,
    ) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.head_dim = head_dim
        self.num_kv_heads = num_kv_heads
        self.layer_idx = layer_idx
        self.scale = scale
        if sliding_window is not None and sliding_window < 1:
            raise ValueError(f"sliding_window must be >= 1, got {sliding_window}")
        if logits_soft_cap is not None and logits_soft_cap <= 0:
            raise ValueError(f"logits_soft_cap must be > 0, got {logits_soft_cap}")
        # a query at position p sees keys at positions > p - sliding_window (None: all);
        # scores are capped to logits_soft_cap * tanh(score / logits_soft_cap) (None: not)
        self.sliding_window = sliding_window
        self.logits_soft_cap = logits_soft_cap
        # what every backend call gets besides (q, cache, meta, scale): empty for plain
        # layers, so backends pinned by tests with the four-argument signature still work
        self.backend_kwargs: dict[str, Any] = {}
        if sliding_window is not None:
            self.backend_kwargs["sliding_window"] = int(sliding_window)
        if logits_soft_cap is not None:
            self.backend_kwargs["soft_cap"] = float(logits_soft_cap)
        # None: chosen at the first call (Triton kernels on CUDA where they apply, else the
        # reference). Tests may pin reference_paged_attention here.
        self.backend: Callable | None = None
        self._write: Callable = write_kv
        # the backend's test for taking the rotary into attention (forward_rope), if it can
        self._rope_fits: Callable | None = None

    def forward_rope(self, positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor,
                     v: torch.Tensor, rotary: nn.Module) -> torch.Tensor:
        """rotary(positions, q, k), then attention; the Triton backend takes the rotary into
        its decode kernel on decode-only steps (same bits, two kernels fewer)."""
        ctx = get_forward_context()
        meta = ctx.attn_metadata
        if meta is not None and self._rope_fits is not None:
            t = q.shape[0]
            q3 = q.view(t, self.num_heads, self.head_dim)
            kv_cache = ctx.kv_caches[self.layer_idx]
            if self._rope_fits(q3, kv_cache, meta, rotary):
                assert self.backend is not None
                o = self.backend(
                    q3, kv_cache, meta, self.scale,
                    rope=(k.view(t, self.num_kv_heads, self.head_dim),
                          v.view(t, self.num_kv_heads, self.head_dim), positions,
                          rotary.cos_sin_cache),
                    **self.backend_kwargs,
                )
                return o.reshape(t, self.num_heads * self.head_dim)
        q, k = rotary(positions, q, k)
        return self.forward(q, k, v)

    def _dummy_attention(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """Causal attention of t tokens as one sequence (window and soft-cap included), in
        query chunks whose scores stay near DUMMY_ATTENTION_SCORES elements: the runner's profiling
        forward measures the step's peak memory here, and the paged kernels of a real step
        never hold a [heads, t, t] score tensor (at a 16,384-token budget one is 32 GiB in
        float32, all of it taken from the KV cache)."""
        t = q.shape[0]
        qh, kh, vh = (x.transpose(0, 1).unsqueeze(0) for x in (q, k, v))
        pos = torch.arange(t, device=q.device)
        rows = max(1, DUMMY_ATTENTION_SCORES // (self.num_heads * t))
        out = torch.empty_like(q)
        for c0 in range(0, t, rows):
            c1 = min(t, c0 + rows)
            qp, kp = pos[c0:c1, None], pos[None, :c1]
            mask = kp <= qp
            if self.sliding_window is not None:
                mask = mask & (kp > qp - self.sliding_window)
            o = grouped_attention(qh[:, :, c0:c1], kh[:, :, :c1], vh[:, :, :c1], mask,
                                  self.scale, self.logits_soft_cap)
            out[c0:c1] = o.squeeze(0).transpose(0, 1)
        return out

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        ctx = get_forward_context()
        t = q.shape[0]
        q = q.view(t, self.num_heads, self.head_dim)
        k = k.view(t, self.num_kv_heads, self.head_dim)
        v = v.view(t, self.num_kv_heads, self.head_dim)
        meta = ctx.attn_metadata
        if meta is None:  # profiling / dummy run without a cache
            return self._dummy_attention(q, k, v).reshape(t, self.num_heads * self.head_dim)
        kv_cache = ctx.kv_caches[self.layer_idx]
        if self.backend is None:
            self.backend, self._write, self._rope_fits = _select_backend(q, kv_cache,
                                                                          self.head_dim)
        self._write(kv_cache, k, v, meta.slot_mapping)
        if ctx.piecewise is not None:  # capturing: the graph ends here, attention runs eagerly
            o = ctx.piecewise.split(self, q, kv_cache)
        else:
            o = self.backend(q, kv_cache, meta, self.scale, **self.backend_kwargs)
        return o.reshape(t, self.num_heads * self.head_dim)


def _select_backend(
    q: torch.Tensor, kv_cache: torch.Tensor, head_dim: int
) -> tuple[Callable, Callable, Callable | None]:
    """(attention, kv write, rotary-in-attention test or None) for this layer: Triton
    kernels on CUDA when they apply.

    Imported lazily so CPU start-up never pays for (or needs) Triton.
    """
    if q.is_cuda:
        try:
            from modelport.layers import triton_attention as ta
        except ImportError:  # pragma: no cover - CUDA builds of torch ship Triton
            return reference_paged_attention, write_kv, None
        if ta.supports(q, kv_cache, head_dim):
            ta.split_counters(q.device)  # allocated now, not inside a CUDA-graph capture
            return ta.triton_paged_attention, ta.write_kv_triton, ta.rope_fits
    return reference_paged_attention, write_kv, None


def build_single_sequence_metadata(
    num_tokens: int, block_size: int, device: torch.device | str = "cpu"
) -> AttentionMetadata:
    """Metadata for one request prefilling num_tokens tokens into blocks 0..n-1 (tests, warm-up)."""
    n_blocks = (num_tokens + block_size - 1) // block_size
    return AttentionMetadata(
        slot_mapping=torch.arange(num_tokens, device=device, dtype=torch.int64),
        query_start_loc=torch.tensor([0, num_tokens], device=device, dtype=torch.int32),
        seq_lens=torch.tensor([num_tokens], device=device, dtype=torch.int32),
        block_tables=torch.arange(n_blocks, device=device, dtype=torch.int32).unsqueeze(0),
        max_query_len=num_tokens,
        max_seq_len=num_tokens,
        query_start_loc_cpu=[0, num_tokens],
        seq_lens_cpu=[num_tokens],
        block_size=block_size,
    )
