"""Prefill and mixed steps replayed from CUDA graphs cut at attention (on by default on CUDA
with the decode graphs; MODELPORT_PIECEWISE_GRAPHS=0 or enforce_eager turns them off).

A 1,024-token prefill of an 8B model is ~320 launches from Python (193 Triton kernels, 129
cuBLAS calls) at ~20-30 us of host time each on the H200 machine (bench/gpu/launch_cost.py);
their host time (14-39 ms, bench/README.md eighth round) can exceed the ~22 ms the device
needs, and then TTFT follows the host. Attention is the one part of such a step whose launch
depends on the step's shape beyond its token count (a Triton launch plan per request and
query block), so everything else is captured per token bucket: for each layer, one graph
from the previous attention to this layer's KV write (norms, projections, rotary, KV write
at a static slot buffer, SiLU), then this layer's attention launched eagerly from the step's
metadata into one static output buffer the next graph reads. A step of n tokens pads to its
bucket: pad tokens have slot -1 (no KV write) and lie outside every request's query range
(attention never reads or writes them), and the caller uses rows [0, n) only. Graphs replay
in capture order and share one memory pool. Measured (ninth round): the W3 prefill step's
host time 15-39 ms -> 3-5 ms, TTFT 22.8-23.9 ms.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import nn

from modelport.layers.attention import AttentionMetadata, ForwardContext, forward_context

logger = logging.getLogger(__name__)

ENABLED = os.environ.get("MODELPORT_PIECEWISE_GRAPHS", "1") != "0"
BUCKETS = (16, 32, 64, 128, 256, 512, 1024, 2048)  # token counts captured (those <= max_num_batched_tokens)


def token_buckets(max_tokens: int) -> list[int]:
    """The captured token counts for a step budget of max_tokens, ascending; steps of more
    tokens than the largest run eagerly."""
    return [b for b in BUCKETS if b <= max_tokens]


def bucket_for(n: int, buckets: list[int]) -> int | None:
    """The smallest bucket holding n tokens (None: run eagerly)."""
    for b in buckets:
        if n <= b:
            return b
    return None


@dataclass
class _Pieces:
    """One bucket's graphs: graphs[i] ends with layer i's KV write, ops[i] is layer i's
    attention (module, its static query view, its KV cache); the last graph ends with the
    model's output."""

    graphs: list[torch.cuda.CUDAGraph] = field(default_factory=list)
    ops: list[tuple[nn.Module, torch.Tensor, torch.Tensor]] = field(default_factory=list)
    output: torch.Tensor | None = None


class _Recorder:
    """Set on the forward context during capture: Attention.forward hands each layer's
    attention call here instead of running it (see ``split``)."""

    def __init__(self, pool, attn_out: torch.Tensor) -> None:
        self.pool = pool
        self.attn_out = attn_out  # [tokens, heads, head_dim] static, shared by all layers
        self.pieces = _Pieces()
        self._graph: torch.cuda.CUDAGraph | None = None

    def begin(self) -> None:
        self._graph = torch.cuda.CUDAGraph()
        self._graph.capture_begin(pool=self.pool)

    def end(self) -> None:
        assert self._graph is not None
        self._graph.capture_end()
        self.pieces.graphs.append(self._graph)
        self._graph = None

    def split(self, attn: nn.Module, q: torch.Tensor, kv_cache: torch.Tensor) -> torch.Tensor:
        """Close the current graph before attention, record the call, open the next graph;
        the layer goes on with the static output buffer (written at replay)."""
        self.end()
        self.pieces.ops.append((attn, q, kv_cache))
        self.begin()
        return self.attn_out[: q.shape[0]]


class PiecewiseGraphs:
    """Static inputs, per-bucket pieces, and replay of prefill / mixed steps (tp = 1)."""

    def __init__(self, model: nn.Module, kv_caches: list[torch.Tensor], max_tokens: int,
                 num_heads: int, head_dim: int, dtype: torch.dtype, block_size: int,
                 device: torch.device) -> None:
        self.model = model
        self.kv_caches = kv_caches
        self.buckets = token_buckets(max_tokens)
        self.block_size = block_size
        self.device = device
        top = self.buckets[-1] if self.buckets else 0
        # per bucket, contiguous rows: input ids, positions, KV slots (pads: 0, 0, -1), so a
        # step's inputs go over in one asynchronous copy of contiguous pinned memory
        self.inputs = {b: torch.zeros((3, b), dtype=torch.int64, device=device)
                       for b in self.buckets}
        self._staging = [torch.zeros(3 * top, dtype=torch.int64, pin_memory=True)
                         for _ in range(2)]  # used in turn (async scheduling: see DecodeGraphs)
        self._cur = 0
        self.attn_out = torch.zeros((top, num_heads, head_dim), dtype=dtype, device=device)
        self.pieces: dict[int, _Pieces] = {}

    @property
    def max_tokens(self) -> int:
        return self.buckets[-1] if self.buckets else 0

    def _static_meta(self, b: int) -> AttentionMetadata:
        """A one-request prefill of b tokens whose KV writes all go to slot -1 (skipped)."""
        return AttentionMetadata(
            slot_mapping=self.inputs[b][2],
            query_start_loc=torch.tensor([0, b], dtype=torch.int32, device=self.device),
            seq_lens=torch.tensor([b], dtype=torch.int32, device=self.device),
            block_tables=torch.zeros((1, -(-b // self.block_size)), dtype=torch.int32,
                                     device=self.device),
            max_query_len=b,
            max_seq_len=b,
            query_start_loc_cpu=[0, b],
            seq_lens_cpu=[b],
            block_size=self.block_size,
        )

    @torch.inference_mode()
    def capture(self) -> bool:
        """Capture every bucket, largest first, in one memory pool. Each bucket first runs
        eagerly (compiles and autotunes its kernels, picks the attention backend). False
        (logged; the caller runs those steps eagerly) when a layer's attention is not the
        Triton kernel or does not go through the split (a model with its own attention)."""
        from modelport.layers import triton_attention as ta
        from modelport.layers.attention import Attention

        n_attn = sum(isinstance(m, Attention) for m in self.model.modules())
        t0 = time.perf_counter()
        mem0 = torch.cuda.memory_reserved(self.device)
        for buf in self.inputs.values():
            buf[2].fill_(-1)
        pool = torch.cuda.graph_pool_handle()
        stream = torch.cuda.Stream(self.device)
        stream.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(stream):
            for b in reversed(self.buckets):
                ids, pos = self.inputs[b][0], self.inputs[b][1]
                with forward_context(ForwardContext(self._static_meta(b), self.kv_caches)):
                    self.model(ids, pos)
                torch.cuda.synchronize(self.device)
                rec = _Recorder(pool, self.attn_out)
                with forward_context(ForwardContext(self._static_meta(b), self.kv_caches,
                                                    piecewise=rec)):
                    rec.begin()
                    out = self.model(ids, pos)
                    rec.end()
                rec.pieces.output = out
                ops = rec.pieces.ops
                if (len(ops) != n_attn or n_attn == 0
                        or any(m.backend is not ta.triton_paged_attention for m, _, _ in ops)):
                    torch.cuda.current_stream(self.device).wait_stream(stream)
                    self.pieces.clear()
                    logger.info("piecewise CUDA graphs off: %d of the model's %d attention "
                                "layers split on the Triton kernel", len(ops), n_attn)
                    return False
                self.pieces[b] = rec.pieces
        torch.cuda.current_stream(self.device).wait_stream(stream)
        torch.cuda.synchronize(self.device)
        logger.info("captured piecewise CUDA graphs for prefill / mixed steps of %s tokens "
                    "in %.1f s (%.0f MiB)", self.buckets, time.perf_counter() - t0,
                    (torch.cuda.memory_reserved(self.device) - mem0) / 2**20)
        return True

    def slot_view(self, n: int) -> torch.Tensor:
        """The device slot row a step of n tokens replays with ([n]; filled by ``replay``)."""
        b = bucket_for(n, self.buckets)
        assert b is not None, "the caller checks n <= max_tokens"
        return self.inputs[b][2, :n]

    def replay(self, meta: AttentionMetadata, input_ids: list[int], positions: list[int],
               slots: list[int], fill: Callable[[torch.Tensor], None] | None = None,
               ) -> torch.Tensor:
        """Hidden states [n, hidden] of a step of n <= max_tokens tokens (meta: the step's
        real attention metadata; fill: see DecodeGraphs.replay)."""
        from modelport.layers import triton_attention as ta

        n = len(input_ids)
        b = bucket_for(n, self.buckets)
        assert b is not None, "the caller checks n <= max_tokens"
        self._cur ^= 1
        host = self._staging[self._cur][: 3 * b].view(3, b)
        h = host.numpy()
        h[0, :n], h[1, :n], h[2, :n] = input_ids, positions, slots
        h[0, n:], h[1, n:], h[2, n:] = 0, 0, -1
        dev = self.inputs[b]
        dev.copy_(host, non_blocking=True)
        if fill is not None:
            fill(dev[0, :n])
        pieces = self.pieces[b]
        for i, graph in enumerate(pieces.graphs):
            graph.replay()
            if i < len(pieces.ops):
                attn, q, kv_cache = pieces.ops[i]
                ta.triton_paged_attention(q[:n], kv_cache, meta, attn.scale,
                                          out=self.attn_out[:n], **attn.backend_kwargs)
        assert pieces.output is not None
        return pieces.output[:n]
