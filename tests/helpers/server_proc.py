"""Start a real server process for a test and wait until it answers (one place for all tests)."""

from __future__ import annotations

import contextlib
import os
import random
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx


def _ephemeral_low() -> int:
    try:  # Linux: "32768 60999"
        return int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return 32768


_PORTS = random.Random(os.getpid() ^ time.time_ns())


def free_port() -> int:
    """A port free now, taken below the kernel's ephemeral range: a port bind(0) gives is
    free only until another test's outgoing connection (or another server's bind(0)) takes
    it as its own local port, which happened between this check and a server's bind."""
    low = _ephemeral_low()
    for _ in range(500):
        port = _PORTS.randrange(min(20000, low - 1000), low)
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    raise RuntimeError(f"no free port below {low}")


def start_server(
    argv: list[str],
    log: Path,
    timeout: float = 240.0,
    ready_path: str = "/health",
    on_status: Callable[[int | None], None] | None = None,
    cwd: Path | None = None,
) -> tuple[subprocess.Popen, str]:
    """Run `python ARGV --host 127.0.0.1 --port P` (in `cwd`) until GET ready_path is 200.

    on_status sees every probe's status code (None: no answer yet), e.g. to check for 503
    while loading. The server's output goes to `log`, quoted when it fails to come up.
    """
    port = free_port()
    cmd = [sys.executable, *argv, "--host", "127.0.0.1", "--port", str(port)]
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    with open(log, "wb") as f:
        proc = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, env=env, cwd=cwd)
    base = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited ({proc.returncode}):\n{log.read_text()[-4000:]}")
        try:
            status: int | None = httpx.get(f"{base}{ready_path}", timeout=2).status_code
        except httpx.HTTPError:
            status = None
        if on_status is not None:
            on_status(status)
        if status == 200:
            return proc, base
        time.sleep(0.2)
    proc.kill()
    raise RuntimeError(f"server not ready in {timeout}s:\n{log.read_text()[-4000:]}")


def stop_server(proc: subprocess.Popen) -> None:
    proc.terminate()
    try:
        proc.wait(20)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(5)


@contextlib.contextmanager
def serving(argv: list[str], log: Path, **kw: Any) -> Iterator[str]:
    """A server for a `with` block (a module fixture's body): its base URL, then stopped; a
    log that reports an internal error fails the test module afterwards."""
    proc, url = start_server(argv, log, **kw)
    try:
        yield url
    finally:
        stop_server(proc)
    assert "internal error" not in log.read_text(), log.read_text()[-4000:]


def descendants(pid: int) -> set[int]:
    """Every descendant of pid (from /proc)."""
    kids: dict[int, list[int]] = {}
    for d in os.listdir("/proc"):
        if d.isdigit():
            try:
                ppid = int(open(f"/proc/{d}/stat").read().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            kids.setdefault(ppid, []).append(int(d))
    out, todo = set(), [pid]
    while todo:
        for k in kids.get(todo.pop(), []):
            out.add(k)
            todo.append(k)
    return out
