"""Decode steps replayed from CUDA graphs.

A decode step of an 8B model is ~500 small kernel launches; launched from Python they take
longer than the GPU needs to run them. Capturing the whole forward once per batch size and
replaying it turns the step into one launch. The price is static shapes: inputs live in
fixed device buffers, a batch is padded up to the next captured size (the ladder
1, 2, 4, 8, 16, 32, 48, ...), and padded rows must be harmless. They are: their slot is -1
(the KV write skips it) and their context length is 0 (attention reads nothing and writes
zeros), so a pad never touches a real request's cache or output.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from modelport.layers.attention import AttentionMetadata, ForwardContext, forward_context
from modelport.layers.triton_attention import batch_bucket

logger = logging.getLogger(__name__)


def capture_sizes(max_batch: int) -> list[int]:
    """The batch-size ladder up to (the bucket of) max_batch, ascending."""
    top = batch_bucket(max_batch)
    sizes = [s for s in (1, 2, 4, 8) if s <= top]
    sizes += list(range(16, top + 1, 16))
    return sizes


@dataclass
class DecodeInputs:
    """Host-side view of one decode batch (numpy views of pinned buffers), rows [0, n)."""

    n: int
    input_ids: np.ndarray
    positions: np.ndarray
    slots: np.ndarray
    seq_lens: np.ndarray
    block_tables: np.ndarray


@dataclass
class _Staging:
    ids: torch.Tensor
    pos: torch.Tensor
    slots: torch.Tensor
    lens: torch.Tensor
    tables: torch.Tensor


class DecodeGraphs:
    """Static buffers, the captured graphs, and replay for pure-decode batches."""

    def __init__(
        self,
        model: nn.Module,
        kv_caches: list[torch.Tensor],
        max_batch: int,
        max_blocks_per_seq: int,
        block_size: int,
        device: torch.device,
    ) -> None:
        self.model = model
        self.kv_caches = kv_caches
        self.block_size = block_size
        self.device = device
        self.sizes = capture_sizes(max_batch)
        self.max_batch = self.sizes[-1]
        b, w = self.max_batch, max_blocks_per_seq

        def pinned(*shape, dtype):
            return torch.zeros(shape, dtype=dtype, pin_memory=True)

        # host staging (pinned, so the copies below are truly asynchronous). Two sets used in
        # turn: with async scheduling the host fills step N+1's inputs while the copy of step
        # N's may still be queued behind step N-1 on the device.
        self._staging = [
            _Staging(pinned(b, dtype=torch.int64), pinned(b, dtype=torch.int64),
                     pinned(b, dtype=torch.int64), pinned(b, dtype=torch.int32),
                     pinned(b, w, dtype=torch.int32))
            for _ in range(2)
        ]
        self._cur = 0
        # device buffers the graphs read
        self.ids = torch.zeros(b, dtype=torch.int64, device=device)
        self.pos = torch.zeros(b, dtype=torch.int64, device=device)
        self.slots = torch.full((b,), -1, dtype=torch.int64, device=device)
        self.seq_lens = torch.zeros(b, dtype=torch.int32, device=device)
        self.tables = torch.zeros(b, w, dtype=torch.int32, device=device)
        self.qsl = torch.arange(b + 1, dtype=torch.int32, device=device)
        self.graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self.outputs: dict[int, torch.Tensor] = {}

    def host_inputs(self, n: int) -> DecodeInputs:
        """Numpy views to fill rows [0, n) of the next batch (pads are set by replay())."""
        self._cur ^= 1
        h = self._staging[self._cur]
        return DecodeInputs(
            n,
            h.ids.numpy()[:n],
            h.pos.numpy()[:n],
            h.slots.numpy()[:n],
            h.lens.numpy()[:n],
            h.tables.numpy()[:n],
        )

    def _meta(self, b: int) -> AttentionMetadata:
        return AttentionMetadata(
            slot_mapping=self.slots[:b],
            query_start_loc=self.qsl[: b + 1],
            seq_lens=self.seq_lens[:b],
            block_tables=self.tables[:b],
            max_query_len=1,
            max_seq_len=self.tables.shape[1] * self.block_size,
            query_start_loc_cpu=list(range(b + 1)),
            seq_lens_cpu=[1] * b,  # only the count matters to the kernels' launch plan
            block_size=self.block_size,
        )

    def _forward(self, b: int) -> torch.Tensor:
        with forward_context(ForwardContext(self._meta(b), self.kv_caches)):
            return self.model(self.ids[:b], self.pos[:b])

    @torch.inference_mode()
    def capture(self) -> float:
        """Capture every ladder size (largest first, sharing one memory pool)."""
        t0 = time.perf_counter()
        self.slots.fill_(-1)  # buffers hold pads only: warm-up runs write no KV
        self.seq_lens.zero_()
        pool = torch.cuda.graph_pool_handle()
        for b in reversed(self.sizes):
            self._forward(b)  # warm-up: compiles kernels, settles allocator state
            torch.cuda.synchronize(self.device)
            g = torch.cuda.CUDAGraph()
            with torch.cuda.graph(g, pool=pool):
                self.outputs[b] = self._forward(b)
            self.graphs[b] = g
        torch.cuda.synchronize(self.device)
        took = time.perf_counter() - t0
        logger.info(
            "captured %d CUDA graphs for decode batches %s in %.1f s",
            len(self.sizes),
            self.sizes,
            took,
        )
        return took

    def replay(self, n: int, fill: Callable[[torch.Tensor], None] | None = None) -> torch.Tensor:
        """Run the batch staged through host_inputs(n); returns hidden states [n, hidden].

        fill(ids), if given, patches the device input ids before the replay (the placeholder
        tokens of async scheduling, which only the device knows yet).
        """
        b = batch_bucket(n)
        h = self._staging[self._cur]
        if n < b:  # pads: no KV write, no context
            h.ids[n:b] = 0
            h.pos[n:b] = 0
            h.slots[n:b] = -1
            h.lens[n:b] = 0
        self.ids[:b].copy_(h.ids[:b], non_blocking=True)
        self.pos[:b].copy_(h.pos[:b], non_blocking=True)
        self.slots[:b].copy_(h.slots[:b], non_blocking=True)
        self.seq_lens[:b].copy_(h.lens[:b], non_blocking=True)
        self.tables[:b].copy_(h.tables[:b], non_blocking=True)
        if fill is not None:
            fill(self.ids[:n])
        self.graphs[b].replay()
        return self.outputs[b][:n]
