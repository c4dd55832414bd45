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


async def until(cond, timeout: float = 10.0) -> None:
    """Yield to the loop until cond() holds (the state a test needs, not a fixed sleep)."""
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, "timed out"
        await asyncio.sleep(0.001)


class Recorder:
    """An execute() that records batch shapes and echoes items (or fails on 'boom').

    With `hold` (an asyncio.Event) every batch also waits for the test to set it, so a
    test decides when the instance frees up instead of racing a fixed execution time."""

    def __init__(self, delay: float = 0.01, hold: asyncio.Event | None = None) -> None:
        self.batches: list[list] = []
        self.delay = delay
        self.hold = hold

    async def __call__(self, items):
        self.batches.append(list(items))
        await asyncio.sleep(self.delay)
        if self.hold is not None:
            await self.hold.wait()
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
        b = DynamicBatcher(BatcherConfig(max_batch_size=8, max_queue_delay_s=0.3), rec)
        b.start()
        t0 = time.monotonic()
        await b.submit(1)
        took = time.monotonic() - t0
        await b.stop()
        return took

    took = run(main())
    # it waits the delay for company, then goes alone (the bound leaves room for a loaded box)
    assert 0.29 <= took < 0.9


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
    assert took < 2.5  # far below the 5 s delay
    assert [len(x) for x in rec.batches] == [4]


def test_any_preferred_size_formed_goes_at_once_the_rest_waits_the_delay():
    """Triton: preferred [8, 16, 32] with 8, 16 or 10 queued sends 8, 16, then 8 at once; the
    two left over go when their delay ends, since no preferred size can form from them."""

    async def main():
        rec = Recorder(delay=0)
        cfg = BatcherConfig(
            max_batch_size=64, preferred_batch_sizes=(8, 16, 32), max_queue_delay_s=0.6
        )
        b = DynamicBatcher(cfg, rec)
        b.start()
        took = []
        for n in (8, 16, 10):
            t0 = time.monotonic()
            # queued in one go: the batcher sees them together
            await asyncio.gather(*(b.submit(i) for i in range(n)))
            took.append(time.monotonic() - t0)
        await b.stop()
        return took, rec

    took, rec = run(main())
    assert [len(x) for x in rec.batches] == [8, 16, 8, 2]
    assert took[0] < 0.4 and took[1] < 0.4  # not the 0.6 s delay
    assert took[2] >= 0.59  # the last two waited for company


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
        # 0 holds the only instance until the test lets it go, well after 1's 0.05 s timeout
        rec = Recorder(delay=0, hold=asyncio.Event())
        reject = BatcherConfig(max_batch_size=1, default_policy=QueuePolicy(timeout_s=0.05))
        b = DynamicBatcher(reject, rec)
        b.start()
        first = asyncio.create_task(b.submit(0))
        await until(lambda: len(rec.batches) == 1)  # 0 is executing
        second = asyncio.create_task(b.submit(1))
        await asyncio.sleep(0.15)  # at least 3x 1's timeout in the queue
        rec.hold.set()
        with pytest.raises(RequestTimeoutError):
            await second
        assert await first == 0
        await b.stop()

        delay = BatcherConfig(
            max_batch_size=1,
            default_policy=QueuePolicy(timeout_s=0.05, timeout_action=TimeoutAction.DELAY),
        )
        rec = Recorder(delay=0, hold=asyncio.Event())
        b = DynamicBatcher(delay, rec)
        b.start()
        first = asyncio.create_task(b.submit(0))
        await until(lambda: len(rec.batches) == 1)
        second = asyncio.create_task(b.submit(1))
        await asyncio.sleep(0.15)
        rec.hold.set()
        assert await second == 10  # delayed, not rejected
        assert await first == 0
        await b.stop()

    run(main())


def test_priorities_run_high_first():
    async def main():
        rec = Recorder(delay=0, hold=asyncio.Event())
        cfg = BatcherConfig(max_batch_size=1, priority_levels=2, default_priority=2)
        b = DynamicBatcher(cfg, rec)
        b.start()
        blocker = asyncio.create_task(b.submit("x"))
        await until(lambda: len(rec.batches) == 1)  # x holds the instance
        low = asyncio.create_task(b.submit("low", priority=2))
        await until(lambda: b.queued == 1)
        high = asyncio.create_task(b.submit("high", priority=1))
        await until(lambda: b.queued == 2)  # low queued first, high later
        rec.hold.set()
        await asyncio.gather(blocker, low, high)
        await b.stop()
        return [x[0] for x in rec.batches]

    assert run(main()) == ["x", "high", "low"]


def test_preserve_ordering_across_instances():
    async def main():
        finished: list[int] = []
        one_ran = asyncio.Event()

        async def execute(items):
            if items[0] == 0:
                await one_ran.wait()  # 0 finishes only after 1 finished on the other instance
            else:
                one_ran.set()
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
        # every execute waits until all four are executing: this only completes if the four
        # instances run at once (one at a time would block the first one forever)
        all_in = asyncio.Event()
        rec = Recorder(delay=0, hold=all_in)
        b = DynamicBatcher(BatcherConfig(max_batch_size=0), rec, num_instances=4)
        b.start()
        submits = asyncio.gather(*(b.submit(i, batch_size=5) for i in range(4)))
        await until(lambda: len(rec.batches) == 4)  # four instances ran at once
        all_in.set()
        await asyncio.wait_for(submits, 10)
        await b.stop()
        return rec

    rec = run(main())
    assert [len(x) for x in rec.batches] == [1, 1, 1, 1]


def test_items_of_different_keys_never_share_a_batch():
    """batch_key (Triton: variable-size inputs of different shapes): the batch so far goes as
    soon as the next item's key differs, without waiting the delay."""

    async def main():
        rec = Recorder(delay=0)
        cfg = BatcherConfig(max_batch_size=8, max_queue_delay_s=1, batch_key=lambda i: i % 2)
        b = DynamicBatcher(cfg, rec)
        b.start()
        t0 = time.monotonic()
        out = await asyncio.gather(*(b.submit(i) for i in (1, 3, 2, 4, 6, 5)), b.submit(7))
        took = time.monotonic() - t0
        await b.stop()
        return out, rec, took

    out, rec, took = run(main())
    assert out == [10, 30, 20, 40, 60, 50, 70]
    # every batch holds one key; those cut by a different key went at once, the last waited
    assert rec.batches == [[1, 3], [2, 4, 6], [5, 7]]
    assert took >= 0.95


def test_repository_batch_key_is_the_shapes_of_inputs_not_ragged():
    from types import SimpleNamespace

    import numpy as np
    from tritonclient.grpc import model_config_pb2 as mc

    from modelport.repository.model import batcher_config

    cfg = mc.ModelConfig(name="m", max_batch_size=8)
    cfg.input.add(name="X", data_type=mc.TYPE_FP32, dims=[-1])
    cfg.input.add(name="R", data_type=mc.TYPE_FP32, dims=[-1], allow_ragged_batch=True)
    cfg.dynamic_batching.SetInParent()
    key = batcher_config(cfg).batch_key

    def item(x: int, r: int):
        tensors = {"X": np.zeros((1, x)), "R": np.zeros((1, r))}
        inputs = {n: SimpleNamespace(data=a) for n, a in tensors.items()}
        return SimpleNamespace(request=SimpleNamespace(inputs=inputs))

    assert key(item(3, 1)) == key(item(3, 7))  # R is ragged: its length does not matter
    assert key(item(3, 1)) != key(item(4, 1))
