"""`modelport serve --start` / `--stop`: TorchServe's way of running the server in the background.

`--start` launches `modelport serve` (the same arguments, less --start) as a process of its own
session, its output appended to $LOG_LOCATION/modelport_serve.log (./logs/ by default, where
TorchServe writes its logs), notes its pid in a pid file and returns once the server listens
and says it is ready (/ping, /health or /v2/health/ready answers 200: its models are loaded),
or reports the log's tail when it dies during start-up. A second --start refuses while that
one runs. `--start --foreground` serves in this process (the pid file is
still written, so --stop from another terminal stops it). `--stop` sends SIGTERM to the pid
of the pid file and waits for the orderly shutdown. Without --start / --stop, `modelport
serve` serves in the foreground and writes no pid file.

The pid file is $MODELPORT_PID_FILE, else .modelport_serve.<uid>.pid in the temp dir
(TorchServe's is .model_server.pid there). Stdlib only: this runs before any frontend loads.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

PID_FILE_ENV = "MODELPORT_PID_FILE"
# set by --start for the server it launches: where it announces its URL once it listens
READY_FILE_ENV = "MODELPORT_SERVE_READY_FILE"
LOG_NAME = "modelport_serve.log"
STOP_TIMEOUT_S = 60.0


def add_args(g: argparse._ArgumentGroup) -> None:
    mode = g.add_mutually_exclusive_group()
    mode.add_argument(
        "--start",
        dest="ts_start",
        action="store_true",
        help="start the server in the background (as `torchserve --start`): returns once it "
        "says it is ready (its models loaded); its output goes to "
        "$LOG_LOCATION/modelport_serve.log (./logs/)",
    )
    mode.add_argument(
        "--stop",
        dest="ts_stop",
        action="store_true",
        help="stop the server that --start launched (as `torchserve --stop`)",
    )
    g.add_argument(
        "--foreground",
        dest="ts_foreground",
        action="store_true",
        help="with --start: serve in this process, attached to the terminal (without --start "
        "modelport serve always runs in the foreground)",
    )
    g.add_argument(
        "--start-timeout",
        dest="ts_start_timeout",
        metavar="SECONDS",
        type=float,
        default=300.0,
        help="seconds --start waits for the server to answer (default 300); past them it "
        "keeps starting in the background and --start exits 1",
    )
    g.add_argument(
        "--log-config",
        dest="ts_log_config",
        metavar="FILE",
        help="TorchServe's log4j2 XML file: not read by modelport (refused; see --log-level)",
    )
    g.add_argument(
        "--cpp-log-config",
        dest="ts_cpp_log_config",
        metavar="FILE",
        help="TorchServe's C++ backend log config: modelport has no C++ backend (refused)",
    )
    g.add_argument(
        "--plugins-path",
        "--ppath",
        dest="ts_plugins_path",
        metavar="PATH",
        help="TorchServe's Java plugin jars: they do not run in modelport (refused)",
    )


def refuse_unsupported(args: argparse.Namespace) -> None:
    """TorchServe flags whose behaviour modelport cannot give: a clear error, never ignored."""
    if getattr(args, "ts_log_config", None):
        raise SystemExit(
            "--log-config takes a log4j2 XML file, which modelport does not read: use "
            "--log-level debug|info|warning|error; the server's log is its stdout/stderr "
            f"(with --start: $LOG_LOCATION/{LOG_NAME}, ./logs/ by default)"
        )
    if getattr(args, "ts_cpp_log_config", None):
        raise SystemExit(
            "--cpp-log-config configures TorchServe's C++ backend, which modelport does not "
            "have (Python handlers only): leave it out; --log-level sets modelport's logging"
        )
    if getattr(args, "ts_plugins_path", None):
        raise SystemExit(
            "--plugins-path adds Java plugin jars to TorchServe's frontend; modelport's "
            "frontend is Python and loads no plugins: leave it out"
        )
    if getattr(args, "ts_foreground", False) and getattr(args, "ts_stop", False):
        raise SystemExit("--foreground goes with --start, not --stop")


def pid_file() -> Path:
    given = os.environ.get(PID_FILE_ENV)
    if given:
        return Path(given)
    uid = os.getuid() if hasattr(os, "getuid") else 0
    return Path(tempfile.gettempdir()) / f".modelport_serve.{uid}.pid"


def log_file() -> Path:
    return (Path(os.environ.get("LOG_LOCATION") or "logs") / LOG_NAME).absolute()


# ---- the pid file ---------------------------------------------------------------------------


def _read_pid(path: Path) -> int | None:
    try:
        return int(path.read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return None


def _alive(pid: int) -> bool:
    """Running and not a zombie (an exited child nobody reaped yet)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return True  # no /proc here: kill(0) said it exists
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


def _is_modelport(pid: int) -> bool:
    """Whether pid still is a modelport server, not another process that got its pid."""
    try:
        cmd = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except OSError:
        return True  # no /proc: trust the pid file
    return any(b"modelport" in c for c in cmd) and b"serve" in cmd


def running_pid(path: Path) -> int | None:
    """The pid of the server the pid file names, if it still runs; a stale file is removed."""
    if not path.exists():
        return None
    pid = _read_pid(path)
    if pid is not None and _alive(pid) and _is_modelport(pid):
        return pid
    print("Removing orphan pid file.")
    with contextlib.suppress(OSError):
        path.unlink()
    return None


def _claim(path: Path) -> int | None:
    """Create the pid file (atomically: of two racing --start one wins); its fd, or None."""
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        return os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
    except FileExistsError:
        return None


def _release(path: Path, pid: int) -> None:
    """Remove the pid file if it still names pid."""
    if _read_pid(path) == pid:
        with contextlib.suppress(OSError):
            path.unlink()


def _already_running(pid: int) -> int:
    print(
        f"modelport serve is already running (pid {pid}), please use `modelport serve --stop` "
        "to stop it.",
        file=sys.stderr,
    )
    return 1


@contextlib.contextmanager
def owned_pid_file(args: argparse.Namespace) -> Iterator[None]:
    """Around serving in this process: with --start --foreground, write our pid to the pid
    file (refusing when a server runs already); in the server --start launched, the file
    names us already. Either way it goes when we exit."""
    path = pid_file()
    mine = os.getpid()
    if getattr(args, "ts_start", False):  # --start --foreground
        pid = running_pid(path)
        if pid is not None:
            raise SystemExit(_already_running(pid))
        fd = _claim(path)
        if fd is None:
            raise SystemExit(_already_running(_read_pid(path) or 0))
        os.write(fd, f"{mine}\n".encode())
        os.close(fd)
    elif not os.environ.get(READY_FILE_ENV):
        yield  # plain `modelport serve`: no pid file
        return
    try:
        yield
    finally:
        _release(path, mine)


# ---- --start --------------------------------------------------------------------------------


def _child_argv(argv: list[str]) -> list[str]:
    """The arguments of the server to launch: ours, less --start (or its abbreviation)."""
    out = []
    for i, a in enumerate(argv):
        if a == "--":
            return out + argv[i:]
        if a.startswith("--sta") and "--start".startswith(a):
            continue
        out.append(a)
    return out


def _tail(log: Path, offset: int, lines: int = 40) -> str:
    try:
        with open(log, "rb") as f:
            f.seek(offset)
            text = f.read().decode(errors="replace")
    except OSError:
        return ""
    return "\n".join(text.rstrip().splitlines()[-lines:])


# where each frontend says it is ready: TorchServe's /ping, the OpenAI server's /health
# (503 while its model loads), KServe's /v2/health/ready
READY_PATHS = ("/ping", "/health", "/v2/health/ready")


def _status(url: str) -> int | None:
    """The HTTP status of GET url; None when nothing answers."""
    try:
        with urllib.request.urlopen(url, timeout=5) as r:
            return r.status
    except urllib.error.HTTPError as e:
        return e.code
    except (OSError, ValueError):
        return None


def _answers(url: str) -> bool:
    """Whether the server is up and done loading: a 200 on any frontend's ready path, or
    TorchServe's /ping answering otherwise than 404 / 503 (an unhealthy model's 500: the
    server is up, as TorchServe's --start would say)."""
    statuses = [_status(url + p) for p in READY_PATHS]
    return 200 in statuses or statuses[0] not in (None, 404, 503)


def start_background(args: argparse.Namespace) -> int:
    path = pid_file()
    pid = running_pid(path)
    if pid is not None:
        return _already_running(pid)
    fd = _claim(path)
    if fd is None:  # another --start got there first
        return _already_running(_read_pid(path) or 0)
    argv = getattr(args, "argv", None)
    if argv is None:
        argv = sys.argv[1:]
    log = log_file()
    ready_dir = Path(tempfile.mkdtemp(prefix="modelport-start-"))
    ready = ready_dir / "ready.json"
    env = dict(os.environ, PYTHONUNBUFFERED="1", **{READY_FILE_ENV: str(ready)})
    env[PID_FILE_ENV] = str(path.absolute())  # the server removes it when it exits
    try:
        log.parent.mkdir(parents=True, exist_ok=True)
        with open(log, "ab") as out:
            offset = out.tell()
            proc = subprocess.Popen(
                [sys.executable, "-m", "modelport", *_child_argv(argv)],
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                env=env,
                start_new_session=True,  # a terminal's Ctrl-C or hang-up does not reach it
            )
    except BaseException:
        os.close(fd)
        path.unlink()
        raise
    os.write(fd, f"{proc.pid}\n".encode())
    os.close(fd)
    print(f"modelport serve starting (pid {proc.pid}), logs in {log}", flush=True)
    try:
        return _wait_started(proc, path, ready, log, offset, args.ts_start_timeout)
    finally:
        with contextlib.suppress(OSError):
            ready.unlink()
        with contextlib.suppress(OSError):
            ready_dir.rmdir()


def _wait_started(
    proc: subprocess.Popen, path: Path, ready: Path, log: Path, offset: int, timeout: float
) -> int:
    deadline = time.monotonic() + timeout
    url = None
    while time.monotonic() < deadline:
        rc = proc.poll()
        if rc is not None:
            _release(path, proc.pid)
            print(
                f"modelport serve failed to start (exit code {rc}); the end of {log}:\n"
                f"{_tail(log, offset)}",
                file=sys.stderr,
            )
            return 1
        if url is None and ready.exists():
            with contextlib.suppress(OSError, ValueError):
                url = json.loads(ready.read_text())["url"]
        if url is not None and _answers(url):
            print(f"modelport serve has started (pid {proc.pid}) on {url}")
            return 0
        time.sleep(0.1)
    print(
        f"modelport serve did not answer within {timeout:g} s; it goes on starting in the "
        f"background (pid {proc.pid}): see {log}; `modelport serve --stop` stops it",
        file=sys.stderr,
    )
    return 1


def announce_when_started(server: Any, host: str, port: int) -> Any:
    """In the server --start launched: a coroutine that writes its URL to the ready file once
    uvicorn listens (the frontends have started by then: models loaded); else None."""
    ready = os.environ.get(READY_FILE_ENV)
    if not ready:
        return None

    async def announce() -> None:
        import asyncio

        while not server.started:
            await asyncio.sleep(0.05)
        h, p = host, port
        with contextlib.suppress(Exception):  # the port really bound (--port 0)
            h, p = server.servers[0].sockets[0].getsockname()[:2]
        if h in ("0.0.0.0", ""):
            h = "127.0.0.1"
        elif h == "::":
            h = "::1"
        url = f"http://[{h}]:{p}" if ":" in h else f"http://{h}:{p}"
        tmp = Path(f"{ready}.tmp")
        tmp.write_text(json.dumps({"url": url, "pid": os.getpid()}))
        tmp.replace(ready)

    return announce()


# ---- --stop ---------------------------------------------------------------------------------


def stop(args: argparse.Namespace) -> int:
    path = pid_file()
    pid = running_pid(path)
    if pid is None:
        print("modelport serve is not currently running.")
        return 0
    try:
        os.kill(pid, signal.SIGTERM)  # the server shuts down in order on SIGTERM
    except ProcessLookupError:
        _release(path, pid)
        print("modelport serve already stopped.")
        return 0
    deadline = time.monotonic() + STOP_TIMEOUT_S
    while _alive(pid) and time.monotonic() < deadline:
        time.sleep(0.1)
    if _alive(pid):
        print(
            f"modelport serve (pid {pid}) did not stop within {STOP_TIMEOUT_S:g} s: killing it",
            file=sys.stderr,
        )
        with contextlib.suppress(OSError):
            if os.getpgid(pid) == pid:  # the server --start launched: its workers go too
                os.killpg(pid, signal.SIGKILL)
            else:
                os.kill(pid, signal.SIGKILL)
    _release(path, pid)
    print("modelport serve has stopped.")
    return 0
