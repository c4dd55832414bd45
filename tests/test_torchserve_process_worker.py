"""ProcessWorker: a real child process per worker; crashes fail one call and restart it."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from modelport.serving.process_worker import (
    ProcessWorker,
    WorkerCallError,
    WorkerDiedError,
    WorkerInitError,
    WorkerTimeoutError,
)

FIXTURES = Path(__file__).parent / "fixtures" / "torchserve"


@pytest.fixture(autouse=True)
def _fixtures_on_path(monkeypatch):
    monkeypatch.syspath_prepend(str(FIXTURES))  # spawn children inherit sys.path


def test_execute_error_restart_and_timeout():
    async def main():
        w = ProcessWorker("pw_targets:Echo", {"scale": 3}, name="echo", call_timeout=3)
        await w.start()
        try:
            assert w.alive
            assert await w.execute([1, 2]) == [3, 6]
            # user code raising comes back typed; the child survives and keeps its state
            with pytest.raises(WorkerCallError) as ei:
                await w.execute("raise")
            assert ei.value.exc_type == "ValueError" and "bad payload" in str(ei.value)
            assert await w.execute("calls") == 3
            pid = await w.execute("pid")
            # a dying child fails only the call in flight, and is restarted
            assert w.down_since is None
            with pytest.raises(WorkerDiedError, match="exit code 3"):
                await w.execute("die")
            # noted down from its death until the new child is ready (health checks)
            assert w.down_since is not None and not w.alive
            assert await w.execute([5]) == [15]
            assert w.restarts == 1 and w.down_since is None
            assert await w.execute("pid") != pid
            assert await w.execute("calls") == 3  # a fresh object
            # a call past the timeout kills and restarts the child
            with pytest.raises(WorkerTimeoutError):
                await w.execute("sleep")
            assert await w.execute([1]) == [3]
            assert w.restarts == 2
        finally:
            await w.stop()
        assert not w.alive

    asyncio.run(main())


def test_concurrent_calls_are_serialized():
    async def main():
        w = ProcessWorker("pw_targets:Echo", {}, name="echo2")
        await w.start()
        try:
            outs = await asyncio.gather(*(w.execute([i]) for i in range(8)))
            assert outs == [[i] for i in range(8)]
            assert await w.execute("calls") == 9
            grandchild = await w.execute("grandchild")
            assert isinstance(grandchild, int) and grandchild != w.pid
            # the child's own SIGTERM immunity is not inherited: Pool.terminate() (at the end
            # of `with Pool()`) ends its workers with SIGTERM and would otherwise wait forever
            assert await w.execute("grandchild-sigterm") == 0
        finally:
            await w.stop()

    asyncio.run(main())


def test_factory_failure_is_init_error():
    async def main():
        w = ProcessWorker("pw_targets:broken", {}, name="broken")
        with pytest.raises(WorkerInitError, match="cannot load weights"):
            await w.start()
        await w.stop()
        bad = ProcessWorker("no_such_module_xyz:thing", {}, name="missing")
        with pytest.raises(WorkerInitError, match="ModuleNotFoundError"):
            await bad.start()
        await bad.stop()

    asyncio.run(main())


def test_partial_results_arrive_in_order_before_the_result():
    from modelport.serving.process_worker import emit_partial

    with pytest.raises(RuntimeError, match="outside"):
        emit_partial(1)  # only inside a worker's execute

    async def main():
        w = ProcessWorker("pw_targets:Echo", {}, name="streamer")
        await w.start()
        try:
            seen: list = []
            result = await w.execute("stream:5", on_partial=seen.append)
            assert (seen, result) == ([0, 1, 2, 3, 4], "done")
            assert await w.execute([1]) == [1]  # no stale partials afterwards
        finally:
            await w.stop()

    asyncio.run(main())


def test_a_parent_that_forgets_stop_still_exits(tmp_path):
    import os
    import subprocess
    import sys

    script = tmp_path / "forget.py"
    script.write_text(
        "import asyncio, sys\n"
        f"sys.path.insert(0, {str(FIXTURES)!r})\n"
        "from modelport.serving.process_worker import ProcessWorker\n"
        "async def main():\n"
        "    w = ProcessWorker('pw_targets:Echo', {}, name='forgotten')\n"
        "    await w.start()\n"
        "    print(w.pid, flush=True)\n"
        "if __name__ == '__main__':\n"
        "    asyncio.run(main())\n"
    )
    out = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    with pytest.raises(ProcessLookupError):
        os.kill(int(out.stdout.strip()), 0)
