"""A worker child process that hosts user code (a TorchServe handler, a Triton python model).

Why a process: user code may hold the GIL for seconds, leak memory, or call `os._exit`; in a
child it can do none of that to the server. The parent detects the child's death, fails only
the batch that was in flight with `WorkerDiedError`, and starts a fresh child.

Interface (stable; other backends build on it)::

    worker = ProcessWorker("my_pkg.my_mod:build", {"model_dir": "/m"}, name="resnet/1")
    await worker.start()                 # spawns the child, waits until `build(**kw)` returned
    result = await worker.execute(batch) # runs `obj.execute(batch)` in the child
    await worker.stop()                  # calls `obj.finalize()` if it has one, then exits

- `factory` is "module:callable". In the child, the callable is called with `init_kwargs`
  and must return an object with `execute(payload) -> result`; `finalize()` is optional.
  Payloads and results cross the boundary by pickle, so keep them plain (lists, dicts,
  bytes, numpy arrays, tensors).
- One call runs at a time per worker (a worker is one model instance); callers queue on an
  internal lock. Put a batcher in front to get parallelism across workers.
- An exception raised by `execute` comes back as `WorkerCallError` carrying the remote type,
  message and traceback; the child keeps running.
- If the child exits (crash, `os._exit`, OOM kill) during a call, that call raises
  `WorkerDiedError` and a new child is started in the background; `restarts` counts them.
- If `call_timeout` passes, the child is killed, the call raises `WorkerTimeoutError` and the
  child is restarted.
- With `restart=False` nothing restarts the child by itself; `on_death` (if given) is called
  when a started child dies unasked, so that its owner restarts it (`start()`) when it likes.
- If the factory raises, `start()` (or the next `execute`) raises `WorkerInitError`.
- Streaming: while `execute` runs in the child, user code may call `emit_partial(value)`
  (this module, or worker_child) any number of times; each value reaches the parent, in order and before
  the final result, through `execute(payload, on_partial=callback)`'s callback.

Messages are small frozen dataclasses (worker_child.py: `ExecuteMsg`, `ResultMsg`, ...);
the child never receives method names to dispatch on.
"""

from __future__ import annotations

import asyncio
import atexit
import contextlib
import logging
import multiprocessing as mp
import threading
import time
import weakref
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from modelport.serving.worker_child import (
    ExecuteMsg,
    InitFailedMsg,
    PartialMsg,
    ReadyMsg,
    ResultMsg,
    ShutdownMsg,
    child_main,
    emit_partial,
)

__all__ = [
    "ProcessWorker",
    "WorkerError",
    "WorkerCallError",
    "WorkerDiedError",
    "WorkerInitError",
    "WorkerTimeoutError",
    "WorkerStoppedError",
    "emit_partial",
]

logger = logging.getLogger("modelport.serving.worker")


class WorkerError(RuntimeError):
    """Base class of every error a ProcessWorker raises."""


class WorkerCallError(WorkerError):
    """User code raised inside the child; the child is still alive."""

    def __init__(self, worker: str, exc_type: str, message: str, tb: str) -> None:
        super().__init__(f"{exc_type}: {message}")
        self.worker = worker
        self.exc_type = exc_type
        self.remote_message = message
        self.remote_traceback = tb


class WorkerDiedError(WorkerError):
    """The child process exited while a call was in flight (`exit_code`: its exit code, as
    multiprocessing gives it, negative for a signal; None when unknown)."""

    def __init__(self, message: str, exit_code: int | None = None) -> None:
        super().__init__(message)
        self.exit_code = exit_code


class WorkerInitError(WorkerError):
    """The factory failed in the child (import error, bad weights, ...)."""


class WorkerTimeoutError(WorkerError):
    """A call ran longer than call_timeout; the child was killed and is being restarted."""


class WorkerStoppedError(WorkerError):
    """The worker was stopped (or is stopping) and takes no more calls."""


# ---- parent side -----------------------------------------------------------------------------


@dataclass
class _Incarnation:
    """One child process and its pipe; replaced wholesale on restart."""

    proc: Any
    conn: Any
    ready: asyncio.Future
    pending: dict[int, asyncio.Future] = field(default_factory=dict)
    on_partial: dict[int, Callable[[Any], None]] = field(default_factory=dict)
    dead: bool = False
    killed_for_timeout: bool = False


_LIVE: weakref.WeakSet[ProcessWorker] = weakref.WeakSet()


@atexit.register
def _kill_children_at_exit() -> None:
    """Kill children a parent forgot to stop.

    Registered after multiprocessing's own exit hook, so it runs first: that hook joins
    non-daemonic children, which would wait forever for a child blocked on its pipe.
    """
    for worker in list(_LIVE):
        inc = worker._inc
        if inc is not None and inc.proc.is_alive():
            with contextlib.suppress(Exception):
                inc.proc.kill()
                inc.proc.join(5)


class ProcessWorker:
    """A restartable child process running `factory(**init_kwargs).execute(payload)`."""

    def __init__(
        self,
        factory: str,
        init_kwargs: dict | None = None,
        name: str = "worker",
        *,
        env: dict[str, str] | None = None,
        start_timeout: float = 300.0,
        call_timeout: float | None = None,
        restart: bool = True,
        on_death: Callable[[], None] | None = None,
    ) -> None:
        self.factory = factory
        self.init_kwargs = dict(init_kwargs or {})
        self.name = name
        self.env = dict(env or {})
        self.start_timeout = start_timeout
        self.call_timeout = call_timeout
        self.restart = restart
        # called on the event loop when a child that had started dies without being asked
        # to (after its in-flight call failed); for owners that restart it themselves
        # (restart=False), with their own policy
        self.on_death = on_death
        self.restarts = 0
        # when (time.monotonic()) the child stopped serving without being asked to (it died
        # or a restart failed to initialize); None while it serves. For health checks that
        # forgive a worker some time to come back (TorchServe's maxRetryTimeoutInSec)
        self.down_since: float | None = None
        self._ctx = mp.get_context("spawn")
        self._inc: _Incarnation | None = None
        self._lock = asyncio.Lock()
        self._spawn_lock = asyncio.Lock()
        self._seq = 0
        self._stopping = False
        self._restart_task: asyncio.Task | None = None

    # -- state --

    @property
    def alive(self) -> bool:
        inc = self._inc
        return (
            inc is not None
            and not inc.dead
            and not self._stopping
            and inc.ready.done()
            and not inc.ready.exception()
            and inc.proc.is_alive()
        )

    @property
    def pid(self) -> int | None:
        return self._inc.proc.pid if self._inc is not None else None

    @property
    def busy(self) -> bool:
        return self._lock.locked()

    # -- lifecycle --

    async def start(self) -> None:
        """Spawn the child and wait until the factory returned (raises WorkerInitError)."""
        self._stopping = False
        await self._ensure_started()

    async def _ensure_started(self) -> None:
        async with self._spawn_lock:
            if self._stopping:
                raise WorkerStoppedError(f"worker {self.name} is stopped")
            if self.alive:
                return
            inc = self._spawn()
            try:
                await asyncio.wait_for(asyncio.shield(inc.ready), self.start_timeout)
            except asyncio.TimeoutError:
                self._kill(inc)
                raise WorkerInitError(
                    f"worker {self.name} did not start within {self.start_timeout:.0f}s"
                ) from None

    def _spawn(self) -> _Incarnation:
        loop = asyncio.get_running_loop()
        parent_conn, child_conn = self._ctx.Pipe(duplex=True)
        proc = self._ctx.Process(
            target=child_main,
            args=(child_conn, self.factory, self.init_kwargs, self.env),
            name=f"modelport-worker-{self.name}",
            # not daemonic: user code may start processes of its own (DataLoader workers,
            # tokenizer pools); _kill_children_at_exit replaces what daemon=True gave
            daemon=False,
        )
        proc.start()
        child_conn.close()  # so that recv() sees EOF when the child dies
        inc = _Incarnation(proc=proc, conn=parent_conn, ready=loop.create_future())
        self._inc = inc
        _LIVE.add(self)
        threading.Thread(
            target=self._reader, args=(inc, loop), name=f"{self.name}-reader", daemon=True
        ).start()
        return inc

    def _reader(self, inc: _Incarnation, loop: asyncio.AbstractEventLoop) -> None:
        """Blocks on the pipe in a thread so the event loop never does."""
        while True:
            try:
                msg = inc.conn.recv()
            except (EOFError, OSError):
                break
            except Exception as e:  # a message that did not unpickle
                msg = ResultMsg(-1, None, type(e).__name__, f"undecodable result: {e}", "")
            with contextlib.suppress(RuntimeError):  # loop closed
                loop.call_soon_threadsafe(self._on_message, inc, msg)
        inc.proc.join(5)
        with contextlib.suppress(RuntimeError):
            loop.call_soon_threadsafe(self._on_exit, inc)

    def _on_message(self, inc: _Incarnation, msg: Any) -> None:
        if isinstance(msg, ReadyMsg):
            if not inc.ready.done():
                inc.ready.set_result(msg.pid)
                self.down_since = None
        elif isinstance(msg, InitFailedMsg):
            if not inc.ready.done():
                inc.ready.set_exception(
                    WorkerInitError(
                        f"worker {self.name} failed to initialize: {msg.exc_type}: {msg.message}"
                        f"\n{msg.traceback}"
                    )
                )
        elif isinstance(msg, PartialMsg):
            callback = inc.on_partial.get(msg.seq)
            if callback is not None:
                try:
                    callback(msg.value)
                except Exception:  # a consumer's bug must not kill the reader
                    logger.exception("on_partial callback of worker %s failed", self.name)
        elif isinstance(msg, ResultMsg):
            inc.on_partial.pop(msg.seq, None)
            fut = inc.pending.pop(msg.seq, None)
            if fut is None and msg.seq == -1 and inc.pending:
                fut = inc.pending.pop(next(iter(inc.pending)))
            if fut is None or fut.done():
                return
            if msg.exc_type is None:
                fut.set_result(msg.value)
            else:
                fut.set_exception(
                    WorkerCallError(self.name, msg.exc_type, msg.message, msg.traceback)
                )

    def _on_exit(self, inc: _Incarnation) -> None:
        inc.dead = True
        if self._inc is inc and not self._stopping and self.down_since is None:
            self.down_since = time.monotonic()
        code = inc.proc.exitcode
        if not inc.ready.done():
            inc.ready.set_exception(
                WorkerInitError(f"worker {self.name} exited with code {code} while starting")
            )
        for fut in inc.pending.values():
            if fut.done():
                continue
            if inc.killed_for_timeout:
                fut.set_exception(
                    WorkerTimeoutError(
                        f"worker {self.name} exceeded the {self.call_timeout}s response "
                        "timeout and was restarted"
                    )
                )
            else:
                fut.set_exception(
                    WorkerDiedError(
                        f"worker {self.name} (pid {inc.proc.pid}) died with exit code {code} "
                        "while running this batch; it is being restarted",
                        exit_code=code,
                    )
                )
        inc.pending.clear()
        inc.on_partial.clear()
        with contextlib.suppress(Exception):
            inc.conn.close()
        was_ready = inc.ready.done() and inc.ready.exception() is None
        if self._inc is inc and was_ready and not self._stopping and self.on_death is not None:
            try:
                self.on_death()
            except Exception:  # an owner's bug must not keep the worker from restarting
                logger.exception("on_death callback of worker %s failed", self.name)
        if self._inc is inc and was_ready and self.restart and not self._stopping:
            self.restarts += 1
            self._restart_task = asyncio.get_running_loop().create_task(self._restart())

    async def _restart(self) -> None:
        with contextlib.suppress(WorkerError):
            await self._ensure_started()

    # -- calls --

    async def execute(self, payload: Any, on_partial: Callable[[Any], None] | None = None) -> Any:
        """Run `execute(payload)` in the child and return its result (see module docstring).

        `on_partial` is called on the event loop with each value the child emits with
        `emit_partial` during this call.
        """
        async with self._lock:
            if self._stopping:
                raise WorkerStoppedError(f"worker {self.name} is stopped")
            await self._ensure_started()
            inc = self._inc
            assert inc is not None
            self._seq += 1
            seq = self._seq
            fut: asyncio.Future = asyncio.get_running_loop().create_future()
            inc.pending[seq] = fut
            if on_partial is not None:
                inc.on_partial[seq] = on_partial
            try:
                inc.conn.send(ExecuteMsg(seq, payload))
            except (OSError, EOFError, BrokenPipeError) as e:
                inc.pending.pop(seq, None)
                raise WorkerDiedError(f"worker {self.name} is gone: {e}") from e
            try:
                return await asyncio.wait_for(asyncio.shield(fut), self.call_timeout)
            except asyncio.TimeoutError:
                inc.killed_for_timeout = True
                self._kill(inc)
                return await fut  # _on_exit fails it with WorkerTimeoutError

    async def stop(self, timeout: float = 10.0) -> None:
        """Ask the child to finalize and exit; kill it if it does not within `timeout`."""
        self._stopping = True
        if self._restart_task is not None:
            self._restart_task.cancel()
            with contextlib.suppress(BaseException):
                await self._restart_task
        inc = self._inc
        if inc is None:
            return
        with contextlib.suppress(Exception):
            inc.conn.send(ShutdownMsg())
        deadline = time.monotonic() + timeout
        while inc.proc.is_alive() and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        if inc.proc.is_alive():
            self._kill(inc)
        for fut in inc.pending.values():
            if not fut.done():
                fut.set_exception(WorkerStoppedError(f"worker {self.name} was stopped"))
        inc.pending.clear()

    def _kill(self, inc: _Incarnation) -> None:
        with contextlib.suppress(Exception):
            inc.proc.kill()
