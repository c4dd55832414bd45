"""The child side of ProcessWorker: the typed messages and the child's main loop.

Kept apart from process_worker.py so the parent's logic reads on its own; user code in a
worker imports `emit_partial` from either module.
"""

from __future__ import annotations

import contextlib
import importlib
import multiprocessing.util as mp_util
import os
import signal
import sys
import traceback
from dataclasses import dataclass
from typing import Any

# ---- messages (parent <-> child) -------------------------------------------------------------


@dataclass(frozen=True)
class ExecuteMsg:
    seq: int
    payload: Any


@dataclass(frozen=True)
class PartialMsg:
    seq: int
    value: Any


@dataclass(frozen=True)
class ShutdownMsg:
    pass


@dataclass(frozen=True)
class ReadyMsg:
    pid: int


@dataclass(frozen=True)
class InitFailedMsg:
    exc_type: str
    message: str
    traceback: str


@dataclass(frozen=True)
class ResultMsg:
    seq: int
    value: Any = None
    exc_type: str | None = None  # set when execute raised
    message: str = ""
    traceback: str = ""


# ---- child side ------------------------------------------------------------------------------


def _resolve(factory: str) -> Any:
    module_name, sep, attr = factory.partition(":")
    if not sep or not module_name or not attr:
        raise ValueError(f"factory must be 'module:callable', got {factory!r}")
    obj: Any = importlib.import_module(module_name)
    for part in attr.split("."):
        obj = getattr(obj, part)
    return obj


# The call running in this process, when this process is a worker child (one at a time).
_current_call: tuple[Any, int] | None = None


def emit_partial(value: Any) -> None:
    """Send an intermediate result of the running `execute` call to the parent.

    Only meaningful inside a worker child during `execute`; raises RuntimeError elsewhere.
    """
    if _current_call is None:
        raise RuntimeError("emit_partial() called outside a ProcessWorker execute call")
    conn, seq = _current_call
    conn.send(PartialMsg(seq, value))


def _ignore_signal(signum: int, frame: Any) -> None:
    """SIGTERM in a worker child: nothing (its parent ends it); see child_main."""


def child_main(conn: Any, factory: str, init_kwargs: dict, env: dict[str, str]) -> None:
    global _current_call
    # Ctrl-C (and a service manager's SIGTERM) reach the whole process group; the parent
    # decides when a child stops, and ends it with a message or SIGKILL. SIGTERM gets a
    # handler that does nothing rather than SIG_IGN: an ignored signal stays ignored across
    # exec, so the processes a handler spawns (a multiprocessing Pool's workers, which
    # Pool.terminate() ends with SIGTERM and then joins) would never end
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, _ignore_signal)
    os.environ.update(env)
    try:
        target = _resolve(factory)(**init_kwargs)
    except BaseException as e:  # noqa: BLE001 - everything goes back to the parent
        conn.send(InitFailedMsg(type(e).__name__, str(e), traceback.format_exc()))
        return
    conn.send(ReadyMsg(os.getpid()))
    while True:
        try:
            msg = conn.recv()
        except (EOFError, OSError):
            return  # parent went away
        if isinstance(msg, ShutdownMsg):
            finalize = getattr(target, "finalize", None)
            if callable(finalize):
                with contextlib.suppress(Exception):
                    finalize()
            # skip interpreter teardown: with torch loaded it takes seconds and does nothing
            # the user's finalize() did not already do
            with contextlib.suppress(Exception):
                # multiprocessing's own exit hook: unlinks semaphores (tqdm makes one) so the
                # resource tracker has nothing to warn about
                mp_util._exit_function()
            for stream in (sys.stdout, sys.stderr):
                with contextlib.suppress(Exception):
                    stream.flush()
            os._exit(0)
        _current_call = (conn, msg.seq)
        try:
            result = ResultMsg(msg.seq, target.execute(msg.payload))
        except BaseException as e:  # noqa: BLE001
            result = ResultMsg(msg.seq, None, type(e).__name__, str(e), traceback.format_exc())
        finally:
            _current_call = None
        try:
            conn.send(result)
        except Exception as e:  # the result did not pickle
            conn.send(ResultMsg(msg.seq, None, type(e).__name__, f"result not sendable: {e}", ""))
