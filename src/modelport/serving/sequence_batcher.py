"""An asyncio sequence batcher for stateful models (Triton's `sequence_batching`).

Why a second batcher: a stateful model keeps per-sequence state inside an instance, so every
request of one sequence (one correlation id) must go to the same instance, in order, one at
a time -- the dynamic batcher's "any free instance, any order" would break it.

Model: each instance has `slots_per_instance` sequence slots. A request with START binds its
correlation id to a free slot (the lowest slot number, the least busy instance on a tie), or
waits in the backlog with the rest of its sequence until a slot frees up. The slot is freed
once the sequence's END request has been taken into a batch, or by the reaper when the
sequence was idle (no request arrived or ran) for `idle_timeout_s`; a later request of a
released sequence without START fails with `SequenceNotStartedError`. A START for an id
that is already active continues in the same slot (the model sees START again and resets),
as Triton does.

Strategies (Triton's names)::

    direct: one execution per instance at a time takes the next request of every slot that
            has one; the batch is slots [0, highest occupied slot] in slot order, a slot
            without a request getting a null entry (`SeqEntry.item is None`, ready=False).
    oldest: the batch is the oldest pending requests of up to `max_batch_size` sequences of
            the instance's slots (`max_candidate_sequences`), no null entries.

Waiting for a fuller batch (model_config.proto's rules, as Triton's scheduler applies them):
direct waits only when both `max_queue_delay_s` and `minimum_slot_utilization` are set: until
slots-with-a-request / slots_per_instance reaches the utilization, or the oldest request has
waited the delay. oldest waits up to `max_queue_delay_s` for `max_batch_size` (or a preferred
batch size) requests. `preserve_ordering` (oldest): results are handed back in the order
the requests arrived, across sequences and instances.

Interface::

    batcher = SequenceBatcher(cfg, execute, num_instances)
    batcher.start()                                # inside a running event loop
    result = await batcher.submit(item, corrid, start=True, end=False)
    await batcher.stop()

- `execute(instance, entries: list[SeqEntry]) -> Awaitable[list[Any]]` runs one batch on
  that instance and returns one result per entry (an exception fails only that entry's
  submit; the results of null entries are dropped). Up to one execute per instance runs.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections import deque
from collections.abc import Awaitable, Callable, Hashable
from dataclasses import dataclass, field
from typing import Any

from modelport.serving.batcher import BatcherStoppedError, settle

__all__ = [
    "SeqEntry",
    "SequenceBatcher",
    "SequenceBatcherConfig",
    "SequenceNotStartedError",
]


class SequenceNotStartedError(RuntimeError):
    """A request of a sequence that is not active (never started, ended, or released)."""


@dataclass(frozen=True)
class SequenceBatcherConfig:
    slots_per_instance: int = 1
    idle_timeout_s: float = 1.0
    oldest: bool = False  # False: Triton's direct strategy
    max_batch_size: int = 1  # oldest: the most requests in one batch
    max_queue_delay_s: float = 0.0
    preferred_batch_sizes: tuple[int, ...] = ()
    minimum_slot_utilization: float = 0.0  # direct
    preserve_ordering: bool = False  # oldest

    def __post_init__(self) -> None:
        if self.slots_per_instance < 1:
            raise ValueError(f"slots_per_instance must be >= 1, got {self.slots_per_instance}")
        if self.idle_timeout_s <= 0:
            raise ValueError(f"idle_timeout_s must be > 0, got {self.idle_timeout_s}")


@dataclass(frozen=True)
class SeqEntry:
    """One row of a batch: a request of the sequence in `slot`, or a null (not ready) one."""

    item: Any  # None: an empty slot (direct strategy)
    slot: int
    corrid: Hashable  # 0 for a null entry
    start: bool = False
    end: bool = False

    @property
    def ready(self) -> bool:
        return self.item is not None


@dataclass(eq=False)
class _Pending:
    item: Any
    start: bool
    end: bool
    enqueued: float
    future: asyncio.Future


@dataclass(eq=False)
class _Seq:
    corrid: Hashable
    queue: deque[_Pending] = field(default_factory=deque)
    instance: int = -1  # -1: in the backlog
    slot: int = -1
    last: float = 0.0
    running: int = 0  # requests of it in a running batch


_Taken = tuple[_Pending, _Seq]
Execute = Callable[[int, list[SeqEntry]], Awaitable[list[Any]]]


class SequenceBatcher:
    def __init__(
        self,
        config: SequenceBatcherConfig,
        execute: Execute,
        num_instances: int = 1,
        on_release: Callable[[Hashable], None] | None = None,
    ) -> None:
        """on_release(corrid): called when an active sequence is dropped without its END
        request running (idle release, or its END request cancelled)."""
        if num_instances < 1:
            raise ValueError(f"num_instances must be >= 1, got {num_instances}")
        self.config = config
        self._execute = execute
        self._on_release = on_release
        self._slots: list[list[_Seq | None]] = [
            [None] * config.slots_per_instance for _ in range(num_instances)
        ]
        self._active: dict[Hashable, _Seq] = {}  # corrid -> its in-flight sequence
        self._backlog: deque[_Seq] = deque()
        self._wake = [asyncio.Event() for _ in range(num_instances)]
        self._tasks: list[asyncio.Task] = []
        self._stopped = False
        self.batches_executed = 0
        self.released_idle = 0
        # preserve_ordering: done when the last request submitted so far was answered
        self._order_tail: asyncio.Future | None = None

    # -- public --

    def start(self) -> None:
        if self._tasks:
            return
        self._stopped = False
        loop = asyncio.get_running_loop()
        self._tasks = [loop.create_task(self._run(i)) for i in range(len(self._slots))]
        self._tasks.append(loop.create_task(self._reaper()))

    async def stop(self) -> None:
        """Stop accepting requests, fail the queued ones, wait for running batches."""
        self._stopped = True
        for t in self._tasks:
            t.cancel()
        for t in self._tasks:
            with contextlib.suppress(BaseException):
                await t
        self._tasks = []
        seqs = [s for row in self._slots for s in row if s is not None]
        for seq in [*seqs, *self._backlog]:
            for p in seq.queue:
                if not p.future.done():
                    p.future.set_exception(BatcherStoppedError("the model is being unloaded"))
            seq.queue.clear()
        self._slots = [[None] * len(row) for row in self._slots]
        self._backlog.clear()
        self._active.clear()

    @property
    def active_sequences(self) -> int:
        return len(self._active)

    def slot_of(self, corrid: Hashable) -> tuple[int, int] | None:
        """(instance, slot) of an active sequence; None if it is not active or backlogged."""
        seq = self._active.get(corrid)
        if seq is None or seq.instance < 0:
            return None
        return seq.instance, seq.slot

    async def submit(self, item: Any, corrid: Hashable, start: bool, end: bool) -> Any:
        if self._stopped:
            raise BatcherStoppedError("the model is being unloaded")
        seq = self._active.get(corrid)
        if seq is None:
            if not start:
                raise SequenceNotStartedError(str(corrid))
            seq = _Seq(corrid)
            self._assign(seq)
            self._active[corrid] = seq
        now = time.monotonic()
        seq.last = now
        fut = asyncio.get_running_loop().create_future()
        pending = _Pending(item, start, end, now, fut)
        seq.queue.append(pending)
        if end:  # a later request of this id must start a new sequence
            self._active.pop(corrid, None)
        if seq.instance >= 0:
            self._wake[seq.instance].set()
        if self.config.preserve_ordering:
            return await self._in_order(fut, seq, pending)
        return await self._wait(fut, seq, pending)

    async def _in_order(self, fut: asyncio.Future, seq: _Seq, pending: _Pending) -> Any:
        """Answer after every request submitted before this one was answered."""
        loop = asyncio.get_running_loop()
        before, mine = self._order_tail, loop.create_future()
        self._order_tail = mine

        def release(_: Any = None) -> None:
            if not mine.done():
                mine.set_result(None)

        try:
            try:
                result = await self._wait(fut, seq, pending)
            except asyncio.CancelledError:
                raise
            except BaseException:
                if before is not None and not before.done():
                    await asyncio.shield(before)
                raise
            if before is not None and not before.done():
                await asyncio.shield(before)
            return result
        finally:
            if before is None or before.done():
                release()
            else:  # cancelled while waiting: the ones after still wait for `before`
                before.add_done_callback(release)

    async def _wait(self, fut: asyncio.Future, seq: _Seq, pending: _Pending) -> Any:
        end = pending.end
        try:
            return await fut
        except asyncio.CancelledError:
            if pending in seq.queue:
                seq.queue.remove(pending)
                if end and seq.instance >= 0 and not seq.queue and not seq.running:
                    self._free(seq)  # its END will never run: give the slot back
                    if self._on_release is not None and self._active.get(seq.corrid) is None:
                        self._on_release(seq.corrid)
            raise

    # -- slots --

    def _assign(self, seq: _Seq) -> bool:
        best: tuple[int, int, int] | None = None  # (slot, busy slots, instance)
        for inst, row in enumerate(self._slots):
            busy = sum(s is not None for s in row)
            for slot, s in enumerate(row):
                if s is None:
                    key = (slot, busy, inst)
                    if best is None or key < best:
                        best = key
                    break
        if best is None:
            self._backlog.append(seq)
            return False
        slot, _, inst = best
        self._slots[inst][slot] = seq
        seq.instance, seq.slot = inst, slot
        return True

    def _free(self, seq: _Seq) -> None:
        """Give `seq`'s slot to the oldest backlogged sequence (or leave it empty)."""
        inst, slot = seq.instance, seq.slot
        if inst < 0 or self._slots[inst][slot] is not seq:
            return
        self._slots[inst][slot] = None
        seq.instance = seq.slot = -1
        while self._backlog:
            nxt = self._backlog.popleft()
            if not nxt.queue and self._active.get(nxt.corrid) is not nxt:
                continue  # abandoned while waiting (its requests were cancelled)
            self._slots[inst][slot] = nxt
            nxt.instance, nxt.slot = inst, slot
            nxt.last = time.monotonic()
            self._wake[inst].set()
            return

    # -- batches --

    def _heads(self, inst: int) -> list[_Seq]:
        return [s for s in self._slots[inst] if s is not None and s.queue]

    def _due(self, inst: int, heads: list[_Seq]) -> float | None:
        """None when a batch should go now, else the time to wait for more requests."""
        cfg = self.config
        if not cfg.max_queue_delay_s:
            return None
        if cfg.oldest:
            full = len(heads) >= cfg.max_batch_size or (
                cfg.preferred_batch_sizes and len(heads) in cfg.preferred_batch_sizes
            )
        else:
            # Triton: max_queue_delay_microseconds is ignored unless minimum_slot_utilization
            # is set; then a batch goes once that share of the instance's slots has a request
            if not cfg.minimum_slot_utilization:
                return None
            full = len(heads) / cfg.slots_per_instance >= cfg.minimum_slot_utilization
        if full:
            return None
        wait = min(s.queue[0].enqueued for s in heads) + cfg.max_queue_delay_s - time.monotonic()
        return wait if wait > 0 else None

    def _form(self, inst: int, heads: list[_Seq]) -> tuple[list[SeqEntry], list[_Taken | None]]:
        row = self._slots[inst]
        if self.config.oldest:
            heads = sorted(heads, key=lambda s: s.queue[0].enqueued)
            chosen = heads[: max(self.config.max_batch_size, 1)]
            slots = sorted(s.slot for s in chosen)
        else:
            top = max(i for i, s in enumerate(row) if s is not None)
            slots = list(range(top + 1))
        entries: list[SeqEntry] = []
        taken: list[_Taken | None] = []
        ended: list[_Seq] = []
        for slot in slots:
            seq = row[slot]
            if seq is None or not seq.queue:
                entries.append(SeqEntry(None, slot, 0))
                taken.append(None)
                continue
            p = seq.queue.popleft()
            seq.running += 1
            entries.append(SeqEntry(p.item, slot, seq.corrid, p.start, p.end))
            taken.append((p, seq))
            if p.end and not seq.queue:
                ended.append(seq)
        for seq in ended:
            self._free(seq)
        return entries, taken

    async def _run(self, inst: int) -> None:
        wake = self._wake[inst]
        while True:
            wake.clear()
            heads = self._heads(inst)
            if not heads:
                await wake.wait()
                continue
            wait = self._due(inst, heads)
            if wait is not None:
                with contextlib.suppress(asyncio.TimeoutError):
                    await asyncio.wait_for(wake.wait(), wait)
                continue
            entries, taken = self._form(inst, heads)
            try:
                results = await self._execute(inst, entries)
                if len(results) != len(entries):
                    raise RuntimeError(
                        f"execute returned {len(results)} results for a batch of {len(entries)}"
                    )
            except asyncio.CancelledError:
                for t in taken:
                    if t is not None and not t[0].future.done():
                        t[0].future.set_exception(
                            BatcherStoppedError("the model is being unloaded")
                        )
                raise
            except Exception as e:  # the whole batch failed
                results = [e] * len(entries)
            finally:
                self.batches_executed += 1
            now = time.monotonic()
            for t, r in zip(taken, results):
                if t is None:
                    continue
                p, seq = t
                seq.running -= 1
                seq.last = now
                settle(p.future, r)

    # -- idle sequences --

    async def _reaper(self) -> None:
        timeout = self.config.idle_timeout_s
        while True:
            now = time.monotonic()
            nearest = timeout
            for row in self._slots:
                for seq in list(row):
                    if seq is None or seq.queue or seq.running:
                        continue
                    idle = now - seq.last
                    if idle >= timeout:
                        if self._active.get(seq.corrid) is seq:
                            del self._active[seq.corrid]
                            if self._on_release is not None:
                                self._on_release(seq.corrid)
                        self.released_idle += 1
                        self._free(seq)
                    else:
                        nearest = min(nearest, timeout - idle)
            await asyncio.sleep(max(nearest, 0.001) + 0.001)
