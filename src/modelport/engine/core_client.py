"""Run `EngineCore` in its own process and talk to it with typed msgspec messages over pipes.

Why a process: the HTTP server tokenizes, detokenizes and streams in Python; in the same
process that work would hold the GIL while the model should be stepping. The core process
runs a busy loop: take every pending message, step while any request has work, send the
outputs of each step back, and block on the pipe only when idle.

Why threads on the client side: a pipe write can block when the core is mid-step and the
pipe buffer is full, and a pipe read always blocks; a writer thread and a reader thread keep
both off the asyncio event loop. The reader thread learns of the core's death from EOF on
the pipe (the core's end is closed in this process), so a crash is reported to every
waiting request instead of hanging them.
"""

from __future__ import annotations

import contextlib
import logging
import multiprocessing as mp
import queue
import signal
import threading
import time
import traceback
import weakref
from collections.abc import Callable
from typing import Any

import msgspec

from modelport.engine.messages import (
    EngineCoreOutput,
    EngineCoreOutputs,
    EngineCoreRequest,
)

logger = logging.getLogger("modelport.engine.core_client")


# ---------------------------------------------------------------- messages to the core


class AddRequest(msgspec.Struct, tag="add"):
    request: EngineCoreRequest


class AbortRequests(msgspec.Struct, tag="abort"):
    request_ids: list[str]


class Shutdown(msgspec.Struct, tag="shutdown"):
    pass


ToCore = AddRequest | AbortRequests | Shutdown


# ---------------------------------------------------------------- messages from the core


class CoreReady(msgspec.Struct, tag="ready"):
    """Sent once the model is loaded and the KV cache allocated: what the core has."""

    num_kv_blocks: int
    block_size: int
    device: str
    load_seconds: float


class CoreStepOutputs(msgspec.Struct, tag="outputs"):
    outputs: EngineCoreOutputs


class CoreFailed(msgspec.Struct, tag="failed"):
    """The core hit an exception it cannot recover from (start-up or a step); it exits next."""

    message: str
    traceback: str


class CoreRejected(msgspec.Struct, tag="rejected"):
    """The core refused one request (invalid, or its queue is full); the core itself is fine."""

    request_id: str
    kind: str  # "invalid" | "queue_full"
    message: str


FromCore = CoreReady | CoreStepOutputs | CoreFailed | CoreRejected

_to_core_encoder = msgspec.msgpack.Encoder()
_to_core_decoder = msgspec.msgpack.Decoder(ToCore)
_from_core_encoder = msgspec.msgpack.Encoder()
_from_core_decoder = msgspec.msgpack.Decoder(FromCore)


class EngineDeadError(RuntimeError):
    """The engine core process is gone; every request in flight failed with it."""


# ---------------------------------------------------------------- the core process


def _describe_device(engine_config: Any) -> str:
    device = str(getattr(engine_config, "device", "unknown"))
    if device.startswith("cuda"):
        try:
            import torch

            return f"{device} ({torch.cuda.get_device_name(torch.device(device))})"
        except Exception:
            return device
    return device


def prepare_child_process() -> None:
    """For a process the server owns (the engine core, a tensor-parallel rank).

    Ctrl-C in a terminal reaches the whole process group, and a service manager's stop
    (systemd's default) signals every process of the service; the owner shuts its children
    down in order (requests answered first), so they ignore SIGINT and SIGTERM (an owner
    that is gone closes their pipe, and they exit on that). tqdm's loading bars would make a
    cross-process lock: a named semaphore that the resource tracker reports as leaked when
    the process ends before tqdm's finalizer runs; a thread lock is all one process needs.
    """
    from tqdm import tqdm

    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    tqdm.set_lock(threading.RLock())


def run_engine_core(engine_config: Any, in_conn: Any, out_conn: Any, log_level: int = 20) -> None:
    """Entry point of the core process: load, report ready, then the busy loop until shutdown."""
    prepare_child_process()
    logging.basicConfig(
        level=log_level, format="%(asctime)s %(levelname)s %(name)s [core]: %(message)s"
    )
    from modelport.engine.core import EngineCore

    def send(msg: FromCore) -> None:
        out_conn.send_bytes(_from_core_encoder.encode(msg))

    t0 = time.monotonic()
    try:
        core = EngineCore(engine_config)
    except BaseException as e:  # report why, then exit: the parent turns this into an error
        with contextlib.suppress(Exception):
            send(CoreFailed(message=f"{type(e).__name__}: {e}", traceback=traceback.format_exc()))
        return
    send(
        CoreReady(
            num_kv_blocks=int(core.num_kv_blocks),
            block_size=int(core.block_size),
            device=_describe_device(engine_config),
            load_seconds=time.monotonic() - t0,
        )
    )
    try:
        _busy_loop(core, in_conn, send)
    except (EOFError, OSError, BrokenPipeError):
        return  # the parent went away: nothing left to serve
    except BaseException as e:
        with contextlib.suppress(Exception):
            send(CoreFailed(message=f"{type(e).__name__}: {e}", traceback=traceback.format_exc()))
    finally:
        with contextlib.suppress(Exception):
            core.shutdown()


def _busy_loop(core: Any, in_conn: Any, send: Callable[[FromCore], None]) -> None:
    aborted: list[EngineCoreOutput] = []
    while True:
        idle = not core.has_unfinished_requests()
        handled = False
        # Block only when idle; otherwise take what is queued and go on stepping.
        while in_conn.poll(None if idle and not handled else 0):
            msg = _to_core_decoder.decode(in_conn.recv_bytes())
            handled = True
            if isinstance(msg, AddRequest):
                try:
                    core.add_request(msg.request)
                except Exception as e:  # one bad request must not take the core down
                    kind = "queue_full" if type(e).__name__ == "QueueFullError" else "invalid"
                    send(CoreRejected(request_id=msg.request.request_id, kind=kind, message=str(e)))
            elif isinstance(msg, AbortRequests):
                aborted.extend(core.abort_requests(msg.request_ids) or [])
            else:
                return
        if core.has_unfinished_requests():
            out = core.step()
            out.outputs = aborted + out.outputs
            out.stats = core.get_stats()
            send(CoreStepOutputs(outputs=out))
        elif handled:
            # e.g. an abort emptied the engine: publish it and the idle stats right away
            send(
                CoreStepOutputs(outputs=EngineCoreOutputs(outputs=aborted, stats=core.get_stats()))
            )
        aborted = []


# ---------------------------------------------------------------- the client


class EngineCoreClient:
    """Owns the core process; thread-safe `add_request` / `abort`; outputs go to a callback.

    `on_message` is called from the reader thread with each CoreStepOutputs / CoreRejected, and with an
    EngineDeadError once if the core dies. Callers that live on an event loop hop over with
    `loop.call_soon_threadsafe` (AsyncLLM does).
    """

    def __init__(
        self,
        engine_config: Any,
        on_message: Callable[[CoreStepOutputs | CoreRejected | EngineDeadError], None],
        *,
        startup_timeout: float = 600.0,
    ) -> None:
        self.engine_config = engine_config
        self._on_message = on_message
        ctx = mp.get_context("spawn")
        core_in_recv, self._in_send = ctx.Pipe(duplex=False)
        self._out_recv, core_out_send = ctx.Pipe(duplex=False)
        self._proc = ctx.Process(
            target=run_engine_core,
            args=(
                engine_config,
                core_in_recv,
                core_out_send,
                logging.getLogger().getEffectiveLevel(),
            ),
            name="modelport-engine-core",
            # not daemonic: a core may start processes of its own (tensor-parallel workers);
            # the finalizer below still kills it if this process exits without shutdown()
            daemon=False,
        )
        self._proc.start()
        self._finalizer = weakref.finalize(self, _kill_process, self._proc)
        # Close our copies of the core's ends so EOF reaches us when the core exits.
        core_in_recv.close()
        core_out_send.close()
        self.dead: EngineDeadError | None = None
        self._closing = False  # shutdown() asked the core to stop: its exit is no death
        self.ready = self._wait_ready(startup_timeout)
        self._outbox: queue.SimpleQueue[bytes | None] = queue.SimpleQueue()
        self._writer = threading.Thread(target=self._write_loop, name="core-writer", daemon=True)
        self._reader = threading.Thread(target=self._read_loop, name="core-reader", daemon=True)
        self._writer.start()
        self._reader.start()

    # -- start-up (blocking: call from a worker thread when on an event loop)

    def _wait_ready(self, timeout: float) -> CoreReady:
        deadline = time.monotonic() + timeout
        while not self._out_recv.poll(0.2):
            if not self._proc.is_alive():
                raise RuntimeError(
                    f"engine core process exited during start-up (exit code {self._proc.exitcode})"
                )
            if time.monotonic() > deadline:
                self._kill()
                raise RuntimeError(f"engine core did not start within {timeout:.0f}s")
        try:
            msg = _from_core_decoder.decode(self._out_recv.recv_bytes())
        except EOFError:
            self._proc.join(5)
            raise RuntimeError(
                f"engine core process exited during start-up (exit code {self._proc.exitcode})"
            ) from None
        if isinstance(msg, CoreFailed):
            self._proc.join(5)
            raise RuntimeError(f"engine core failed to start: {msg.message}\n{msg.traceback}")
        if not isinstance(msg, CoreReady):
            self._kill()
            raise RuntimeError(f"engine core sent {type(msg).__name__} before ready")
        return msg

    # -- threads

    def _write_loop(self) -> None:
        while True:
            data = self._outbox.get()
            if data is None:
                return
            try:
                self._in_send.send_bytes(data)
            except (OSError, BrokenPipeError, ValueError):
                return  # the reader reports the death

    def _read_loop(self) -> None:
        reason = "engine core process exited"
        while True:
            try:
                msg = _from_core_decoder.decode(self._out_recv.recv_bytes())
            except (EOFError, OSError):
                break
            except msgspec.DecodeError as e:
                reason = f"bad message from engine core: {e}"
                self._kill()
                break
            if isinstance(msg, (CoreStepOutputs, CoreRejected)):
                self._on_message(msg)
            elif isinstance(msg, CoreFailed):
                reason = f"engine core failed: {msg.message}"
                logger.error("engine core failed: %s\n%s", msg.message, msg.traceback)
        self._proc.join(5)
        if self._proc.exitcode not in (None, 0):
            reason += f" (exit code {self._proc.exitcode})"
        self.dead = EngineDeadError("engine core shut down" if self._closing else reason)
        if not self._closing:
            self._on_message(self.dead)

    # -- API

    def add_request(self, request: EngineCoreRequest) -> None:
        self._send(AddRequest(request=request))

    def abort_requests(self, request_ids: list[str]) -> None:
        if request_ids:
            self._send(AbortRequests(request_ids=list(request_ids)))

    def _send(self, msg: ToCore) -> None:
        if self.dead is not None:
            raise self.dead
        self._outbox.put(_to_core_encoder.encode(msg))

    @property
    def is_alive(self) -> bool:
        return self.dead is None and self._proc.is_alive()

    @property
    def pid(self) -> int | None:
        return self._proc.pid

    def shutdown(self, timeout: float = 5.0) -> None:
        """Ask the core to stop, then make sure it has: join, terminate, kill."""
        self._closing = True
        if self._proc.is_alive():
            with contextlib.suppress(Exception):
                self._outbox.put(_to_core_encoder.encode(Shutdown()))
            self._proc.join(timeout)
        self._kill()
        self._outbox.put(None)
        with contextlib.suppress(Exception):
            self._in_send.close()

    def _kill(self) -> None:
        _kill_process(self._proc)


def _kill_process(proc: Any) -> None:
    if proc.is_alive():  # SIGKILL: the core ignores SIGTERM (prepare_child_process)
        proc.kill()
        proc.join(2)
