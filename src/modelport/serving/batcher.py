"""A generic asyncio dynamic batcher shared by Triton-style models and TorchServe models.

Why one batcher: both Triton's `dynamic_batching` and TorchServe's `batch_size` /
`max_batch_delay` are the same idea -- hold requests a short while so an instance sees
several at once -- and the subtle parts (delay accounting, priorities, queue limits and
timeouts, one request's failure never failing the others) should be written once.

Interface (stable; other frontends build on it)::

    cfg = BatcherConfig(max_batch_size=8, max_queue_delay_s=0.005)
    batcher = DynamicBatcher(cfg, execute, num_instances=2)
    batcher.start()                       # inside a running event loop
    result = await batcher.submit(item, batch_size=1, priority=None, timeout_s=None)
    await batcher.stop()                  # fails whatever is still queued

- `execute(items: list[Any]) -> Awaitable[list[Any | BaseException]]` gets the items of one
  batch in queue order and returns one entry per item; an entry that is an exception is
  raised from that item's `submit()` only. If `execute` itself raises, every item of that
  batch gets the exception. Up to `num_instances` calls of `execute` run concurrently.
- `batch_size` is how many rows an item carries (its first dimension). The sum over a
  batch never exceeds `max_batch_size`. `max_batch_size == 0` means "no batching": every
  item runs alone, whatever its size.
- A batch is sent as soon as it is full (max_batch_size rows, or the largest preferred
  batch size) or, short of that, as soon as its first items make any preferred batch size
  (the largest one formed goes; Triton's rule); else when its oldest item has waited
  `max_queue_delay_s`, whatever is pending. With a delay of zero, whatever is queued when an
  instance frees up goes out at once.
- Priorities: level 1 is the highest, `priority_levels` the lowest; 0 or None means
  `default_priority`. With `priority_levels == 0` there is a single level.
- Each level has a `QueuePolicy`: `max_queue_size` (0 = unbounded) rejects new items with
  `QueueFullError`; `timeout_s` bounds time in queue, after which the item is rejected with
  `RequestTimeoutError` (REJECT) or moved behind everything not yet timed out (DELAY).
  A per-request `timeout_s` replaces the policy's only if `allow_timeout_override`.
- `batch_key`: items whose keys differ never share a batch; the batch formed so far goes as
  soon as the next item's key differs (Triton's rule for inputs of different shapes).
- `preserve_ordering`: results are released in the order batches were formed, even when
  a later batch finishes first on another instance.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import itertools
import time
from collections import deque
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

__all__ = [
    "BatcherConfig",
    "BatcherError",
    "BatcherStoppedError",
    "DynamicBatcher",
    "QueueFullError",
    "QueuePolicy",
    "RequestTimeoutError",
    "TimeoutAction",
]


def settle(future: asyncio.Future, result: Any) -> None:
    """Answer a submit once: its result, or the exception that failed it."""
    if future.done():
        return
    if isinstance(result, BaseException):
        future.set_exception(result)
    else:
        future.set_result(result)

class BatcherError(RuntimeError):
    """Base class of errors raised by `DynamicBatcher.submit`."""


class QueueFullError(BatcherError):
    """The item's priority queue already holds max_queue_size items."""


class RequestTimeoutError(BatcherError):
    """The item waited in the queue past its timeout (policy action REJECT)."""


class BatcherStoppedError(BatcherError):
    """The batcher was stopped before the item ran."""


class TimeoutAction(enum.Enum):
    REJECT = "REJECT"
    DELAY = "DELAY"


@dataclass(frozen=True)
class QueuePolicy:
    """Limits of one priority level's queue (Triton's ModelQueuePolicy)."""

    max_queue_size: int = 0  # 0: unbounded
    timeout_s: float | None = None  # None: items never time out in the queue
    timeout_action: TimeoutAction = TimeoutAction.REJECT
    allow_timeout_override: bool = False

    def __post_init__(self) -> None:
        if self.max_queue_size < 0:
            raise ValueError(f"max_queue_size must be >= 0, got {self.max_queue_size}")
        if self.timeout_s is not None and self.timeout_s < 0:
            raise ValueError(f"timeout_s must be >= 0, got {self.timeout_s}")


@dataclass(frozen=True)
class BatcherConfig:
    max_batch_size: int = 0  # 0: no batching, one item per execute call
    preferred_batch_sizes: tuple[int, ...] = ()
    max_queue_delay_s: float = 0.0
    preserve_ordering: bool = False
    priority_levels: int = 0  # 0: one level
    default_priority: int = 0
    default_policy: QueuePolicy = field(default_factory=QueuePolicy)
    priority_policies: Mapping[int, QueuePolicy] = field(default_factory=dict)
    # items whose keys differ never share a batch (Triton: requests whose variable-size
    # inputs differ in shape); the batch so far goes when the next item's key differs
    batch_key: Callable[[Any], Any] | None = None

    def __post_init__(self) -> None:
        if self.max_batch_size < 0:
            raise ValueError(f"max_batch_size must be >= 0, got {self.max_batch_size}")
        if self.max_queue_delay_s < 0:
            raise ValueError(f"max_queue_delay_s must be >= 0, got {self.max_queue_delay_s}")
        for p in self.preferred_batch_sizes:
            if p <= 0 or (self.max_batch_size and p > self.max_batch_size):
                raise ValueError(
                    f"preferred batch size {p} must be in [1, max_batch_size={self.max_batch_size}]"
                )
        if self.priority_levels < 0:
            raise ValueError(f"priority_levels must be >= 0, got {self.priority_levels}")
        if self.priority_levels and not 0 <= self.default_priority <= self.priority_levels:
            raise ValueError(
                f"default_priority {self.default_priority} must be in [1, {self.priority_levels}]"
            )
        for level in self.priority_policies:
            if not 1 <= level <= max(self.priority_levels, 1):
                raise ValueError(
                    f"priority queue policy for level {level} outside [1, {self.priority_levels}]"
                )

    def policy(self, level: int) -> QueuePolicy:
        return self.priority_policies.get(level, self.default_policy)


@dataclass(eq=False, repr=False)  # identity semantics; a repr would print whole tensors
class _Pending:
    item: Any
    batch_size: int
    level: int
    enqueued: float
    deadline: float | None
    future: asyncio.Future
    seq: int
    delay_on_timeout: bool = False


Execute = Callable[[list[Any]], Awaitable[list[Any]]]


class DynamicBatcher:
    """Groups submitted items into batches for up to `num_instances` concurrent executes."""

    def __init__(self, config: BatcherConfig, execute: Execute, num_instances: int = 1) -> None:
        if num_instances < 1:
            raise ValueError(f"num_instances must be >= 1, got {num_instances}")
        self.config = config
        self._execute = execute
        self._num_instances = num_instances
        levels = max(config.priority_levels, 1)
        self._queues: dict[int, deque[_Pending]] = {lvl: deque() for lvl in range(1, levels + 1)}
        self._delayed: deque[_Pending] = deque()
        self._wakeup = asyncio.Event()
        self._free = asyncio.Semaphore(num_instances)
        self._seq = itertools.count()
        self._task: asyncio.Task | None = None
        self._running: set[asyncio.Task] = set()
        self._last_release: asyncio.Future | None = None
        self._stopped = False
        self.batches_executed = 0

    # -- public --

    @property
    def queued(self) -> int:
        return sum(len(q) for q in self._queues.values()) + len(self._delayed)

    @property
    def in_flight(self) -> int:
        return len(self._running)

    def start(self) -> None:
        if self._task is None:
            self._stopped = False
            self._task = asyncio.get_running_loop().create_task(self._run())

    async def stop(self) -> None:
        """Stop forming batches, fail queued items, and wait for running batches."""
        self._stopped = True
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(BaseException):
                await self._task
            self._task = None
        for p in self._drain_all():
            if not p.future.done():
                p.future.set_exception(BatcherStoppedError("the model is being unloaded"))
        if self._running:
            await asyncio.gather(*self._running, return_exceptions=True)

    async def submit(
        self,
        item: Any,
        batch_size: int = 1,
        priority: int | None = None,
        timeout_s: float | None = None,
    ) -> Any:
        """Queue `item` and return its result (or raise its error) once its batch ran."""
        if self._stopped:
            raise BatcherStoppedError("the model is being unloaded")
        cfg = self.config
        if cfg.max_batch_size and batch_size > cfg.max_batch_size:
            raise ValueError(f"batch size {batch_size} exceeds max_batch_size {cfg.max_batch_size}")
        level = self._level(priority)
        policy = cfg.policy(level)
        queue = self._queues[level]
        if policy.max_queue_size and len(queue) >= policy.max_queue_size:
            raise QueueFullError("Exceeds maximum queue size")
        timeout = policy.timeout_s
        if timeout_s is not None and (policy.allow_timeout_override or timeout is None):
            timeout = timeout_s
        now = time.monotonic()
        fut = asyncio.get_running_loop().create_future()
        pending = _Pending(
            item=item,
            batch_size=max(batch_size, 1),
            level=level,
            enqueued=now,
            deadline=None if timeout is None else now + timeout,
            future=fut,
            seq=next(self._seq),
        )
        pending.delay_on_timeout = policy.timeout_action is TimeoutAction.DELAY
        queue.append(pending)
        self._wakeup.set()
        try:
            return await fut
        except asyncio.CancelledError:
            self._discard(pending)
            raise

    # -- scheduling --

    def _level(self, priority: int | None) -> int:
        levels = self.config.priority_levels
        if not levels:
            return 1
        if not priority:
            return self.config.default_priority or levels
        if not 1 <= priority <= levels:
            raise ValueError(f"priority {priority} outside [1, {levels}]")
        return priority

    def _discard(self, pending: _Pending) -> None:
        self._take([pending])

    def _take(self, batch: list[_Pending]) -> None:
        """Remove `batch` from the queues by identity, in one pass per queue."""
        chosen = {id(p) for p in batch}
        for q in (*self._queues.values(), self._delayed):
            if any(id(p) in chosen for p in q):
                kept = [p for p in q if id(p) not in chosen]
                q.clear()
                q.extend(kept)

    def _drain_all(self) -> list[_Pending]:
        out: list[_Pending] = []
        for q in (*self._queues.values(), self._delayed):
            out.extend(q)
            q.clear()
        return out

    def _expire(self, now: float) -> float | None:
        """Apply timeouts; return the nearest future deadline (for the wake-up timer)."""
        nearest: float | None = None
        for q in self._queues.values():
            keep: deque[_Pending] = deque()
            for p in q:
                if p.future.done():
                    continue
                if p.deadline is not None and p.deadline <= now:
                    if p.delay_on_timeout:  # DELAY: behind everything that has not timed out
                        p.deadline = None
                        self._delayed.append(p)
                    else:
                        p.future.set_exception(RequestTimeoutError("Request timeout expired"))
                    continue
                if p.deadline is not None:
                    nearest = p.deadline if nearest is None else min(nearest, p.deadline)
                keep.append(p)
            q.clear()
            q.extend(keep)
        return nearest

    def _ordered(self) -> list[_Pending]:
        out: list[_Pending] = []
        for level in sorted(self._queues):
            out.extend(p for p in self._queues[level] if not p.future.done())
        out.extend(p for p in self._delayed if not p.future.done())
        return out

    def _candidate(self, ordered: list[_Pending]) -> tuple[list[_Pending], bool, int]:
        """Items of the next batch, whether it is full, and how many of its first items make
        the largest preferred batch size it passed (0: none).

        Triton's rule: the batch grows up to the largest preferred size (max_batch_size
        without one) and goes at once when it gets there; short of it, a preferred size
        already formed goes at once too, else everything pending waits the queue delay.
        """
        cfg = self.config
        if not cfg.max_batch_size:
            return ordered[:1], True, 0
        preferred = set(cfg.preferred_batch_sizes)
        target = max(preferred) if preferred else cfg.max_batch_size
        batch: list[_Pending] = []
        rows = 0
        cut = 0
        key = cfg.batch_key
        first = key(ordered[0].item) if key is not None else None
        for p in ordered:
            if rows + p.batch_size > cfg.max_batch_size:
                return batch, True, cut  # the next item would not fit: nothing to wait for
            if key is not None and batch and key(p.item) != first:
                return batch, True, cut  # the next item cannot join this batch
            batch.append(p)
            rows += p.batch_size
            if rows in preferred:
                cut = len(batch)
            if rows >= target:
                return batch, True, cut
        return batch, False, cut

    async def _run(self) -> None:
        cfg = self.config
        while True:
            await self._free.acquire()
            batch: list[_Pending] = []
            while not batch:
                self._wakeup.clear()
                now = time.monotonic()
                nearest = self._expire(now)
                ordered = self._ordered()
                if not ordered:
                    await self._sleep(None if nearest is None else nearest - now)
                    continue
                candidate, full, cut = self._candidate(ordered)
                oldest = min(p.enqueued for p in candidate)
                due = oldest + cfg.max_queue_delay_s
                if full or due <= now or not cfg.max_batch_size:
                    batch = candidate
                    break
                if cut:  # a preferred size formed: it goes now, the rest keeps waiting
                    batch = candidate[:cut]
                    break
                wait = due - now if nearest is None else min(due, nearest) - now
                await self._sleep(wait)
            self._take(batch)
            self._launch(batch)

    async def _sleep(self, seconds: float | None) -> None:
        if seconds is None:
            await self._wakeup.wait()
            return
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(self._wakeup.wait(), max(seconds, 0.0))

    def _launch(self, batch: list[_Pending]) -> None:
        previous = self._last_release
        release: asyncio.Future = asyncio.get_running_loop().create_future()
        if self.config.preserve_ordering:
            self._last_release = release
        task = asyncio.get_running_loop().create_task(self._run_batch(batch, previous, release))
        self._running.add(task)
        task.add_done_callback(self._running.discard)

    async def _run_batch(
        self, batch: list[_Pending], previous: asyncio.Future | None, release: asyncio.Future
    ) -> None:
        try:
            try:
                results = await self._execute([p.item for p in batch])
                if len(results) != len(batch):
                    raise RuntimeError(
                        f"execute returned {len(results)} results for a batch of {len(batch)}"
                    )
            except Exception as e:  # the whole batch failed
                results = [e] * len(batch)
            finally:
                self._free.release()
                self.batches_executed += 1
            if previous is not None:
                await asyncio.shield(previous)
            for p, r in zip(batch, results):
                settle(p.future, r)
        finally:
            if not release.done():
                release.set_result(None)
