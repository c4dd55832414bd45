"""DynamicBatcher: real asyncio scheduling, no model involved."""

from __future__ import annotations

import asyncio
import time

import pytest

from modelport.serving.batcher import (
    BatcherConfig,
    DynamicBatcher,
    QueueFullError,
    QueuePolicy,
    RequestTimeoutError,
    TimeoutAction,
)


def run(coro):
    return asyncio.run(coro)


class Recorder:
    """An execute() that records batch shapes and echoes items (or fails on 'boom')."""

    def __init__(self, delay: float = 0.01) -> None:
        self.batches: list[list] = []
        self.delay = delay

    async def __call__(self, items):
        self.batches.append(list(items))
        await asyncio.sleep(self.delay)
        return [ValueError(f"bad {i}") if i == "boom" else i * 10 for i in items]


def test_batches_form_under_concurrency_and_respect_max():
    async def main():
        rec = Recorder()
        b = DynamicBatcher(BatcherConfig(max_batch_size=8, max_queue_delay_s=0.02), rec)
        b.start()
        results = await asyncio.gather(*(b.submit(i) for i in range(32)))
        await b.stop()
        return rec, results

    rec, results = run(main())
    assert results == [i * 10 for i in range(32)]
    sizes = [len(x) for x in rec.batches]
    assert max(sizes) > 1
    assert all(s <= 8 for s in sizes)
    assert sum(sizes) == 32


def test_rows_count_toward_max_batch_size():
    async def main():
        rec = Recorder()
        b = DynamicBatcher(BatcherConfig(max_batch_size=4, max_queue_delay_s=0.05), rec)
        b.start()
        await asyncio.gather(*(b.submit(i, batch_size=3) for i in range(4)))
        await b.stop()
        return rec

    rec = run(main())
    assert all(len(x) == 1 for x in rec.batches)  # 3 + 3 > 4: never two together


def test_lone_request_waits_about_max_queue_delay():
    async def main():
        rec = Recorder(delay=0)
        b = DynamicBatcher(BatcherConfig(max_batch_size=8, max_queue_delay_s=0.1), rec)
        b.start()
        t0 = time.monotonic()
        await b.submit(1)
        took = time.monotonic() - t0
        await b.stop()
        return took

    took = run(main())
    assert 0.09 <= took < 0.3


def test_preferred_batch_size_dispatches_without_waiting_for_delay():
    async def main():
        rec = Recorder(delay=0)
        cfg = BatcherConfig(max_batch_size=16, preferred_batch_sizes=(4,), max_queue_delay_s=5)
        b = DynamicBatcher(cfg, rec)
        b.start()
        t0 = time.monotonic()
        await asyncio.gather(*(b.submit(i) for i in range(4)))
        took = time.monotonic() - t0
        await b.stop()
        return took, rec

    took, rec = run(main())
    assert took < 1.0
    assert [len(x) for x in rec.batches] == [4]


def test_error_of_one_item_does_not_fail_others():
    async def main():
        rec = Recorder()
        b = DynamicBatcher(BatcherConfig(max_batch_size=8, max_queue_delay_s=0.02), rec)
        b.start()
        out = await asyncio.gather(
            b.submit(1), b.submit("boom"), b.submit(2), return_exceptions=True
        )
        await b.stop()
        return out, rec

    out, rec = run(main())
    assert out[0] == 10 and out[2] == 20
    assert isinstance(out[1], ValueError)
    assert len(rec.batches) == 1


def test_queue_full_rejects():
    async def main():
        rec = Recorder(delay=0.2)
        cfg = BatcherConfig(
            max_batch_size=1,
            max_queue_delay_s=0,
            default_policy=QueuePolicy(max_queue_size=2),
        )
        b = DynamicBatcher(cfg, rec)
        b.start()
        first = asyncio.create_task(b.submit(0))
        await asyncio.sleep(0.05)  # 0 is executing; the queue is empty
        queued = [asyncio.create_task(b.submit(i)) for i in (1, 2)]
        await asyncio.sleep(0)
        with pytest.raises(QueueFullError):
            await b.submit(3)
        done = await asyncio.gather(first, *queued)
        await b.stop()
        return done

    assert run(main()) == [0, 10, 20]


def test_timeout_reject_and_delay():
    async def main():
        rec = Recorder(delay=0.2)
        reject = BatcherConfig(max_batch_size=1, default_policy=QueuePolicy(timeout_s=0.05))
        b = DynamicBatcher(reject, rec)
        b.start()
        first = asyncio.create_task(b.submit(0))
        await asyncio.sleep(0.01)
        with pytest.raises(RequestTimeoutError):
            await b.submit(1)
        assert await first == 0
        await b.stop()

        delay = BatcherConfig(
            max_batch_size=1,
            default_policy=QueuePolicy(timeout_s=0.05, timeout_action=TimeoutAction.DELAY),
        )
        b = DynamicBatcher(delay, rec)
        b.start()
        first = asyncio.create_task(b.submit(0))
        await asyncio.sleep(0.01)
        assert await b.submit(1) == 10  # delayed, not rejected
        await first
        await b.stop()

    run(main())


def test_priorities_run_high_first():
    async def main():
        rec = Recorder(delay=0.05)
        cfg = BatcherConfig(max_batch_size=1, priority_levels=2, default_priority=2)
        b = DynamicBatcher(cfg, rec)
        b.start()
        blocker = asyncio.create_task(b.submit("x"))
        await asyncio.sleep(0.01)
        low = asyncio.create_task(b.submit("low", priority=2))
        await asyncio.sleep(0.001)
        high = asyncio.create_task(b.submit("high", priority=1))
        await asyncio.gather(blocker, low, high)
        await b.stop()
        return [x[0] for x in rec.batches]

    assert run(main()) == ["x", "high", "low"]


def test_preserve_ordering_across_instances():
    async def main():
        finished: list[int] = []

        async def execute(items):
            await asyncio.sleep(0.1 if items[0] == 0 else 0.0)
            return items

        cfg = BatcherConfig(max_batch_size=1, preserve_ordering=True)
        b = DynamicBatcher(cfg, execute, num_instances=2)
        b.start()

        async def one(i):
            await b.submit(i)
            finished.append(i)

        t0 = asyncio.create_task(one(0))
        await asyncio.sleep(0.01)
        await asyncio.gather(t0, one(1))
        await b.stop()
        return finished

    assert run(main()) == [0, 1]


def test_no_batching_runs_items_alone_and_concurrently_per_instance():
    async def main():
        rec = Recorder(delay=0.05)
        b = DynamicBatcher(BatcherConfig(max_batch_size=0), rec, num_instances=4)
        b.start()
        t0 = time.monotonic()
        await asyncio.gather(*(b.submit(i, batch_size=5) for i in range(4)))
        took = time.monotonic() - t0
        await b.stop()
        return rec, took

    rec, took = run(main())
    assert [len(x) for x in rec.batches] == [1, 1, 1, 1]
    assert took < 0.15  # four instances ran at once
