"""Starting python-backend processes without multiprocessing's spawn.

Why not `multiprocessing` spawn: it re-imports the parent's `__main__` in every child, which
breaks (or recurses) when the server is embedded in a script without a main guard, a
notebook, or `python -` from stdin. A plain `python -m` child over a socketpair carrying a
multiprocessing Connection needs none of that. The parent's import path travels in
PYTHONPATH, as spawn would have sent it.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from multiprocessing.connection import Connection
from typing import Any

ENTRY = "modelport.repository.python_stub_main"


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in sys.path if p)
    env.setdefault("PYTHONUNBUFFERED", "1")
    return env


class StubProcess:
    """A child process with the part of multiprocessing.Process's interface we use."""

    def __init__(self, popen: subprocess.Popen) -> None:
        self._popen = popen

    @property
    def pid(self) -> int:
        return self._popen.pid

    @property
    def exitcode(self) -> int | None:
        return self._popen.poll()

    def is_alive(self) -> bool:
        return self._popen.poll() is None

    def join(self, timeout: float | None = None) -> None:
        try:
            self._popen.wait(timeout)
        except subprocess.TimeoutExpired:
            pass

    def kill(self) -> None:
        if self._popen.poll() is None:
            self._popen.kill()


def start_stub(init: tuple, name: str) -> tuple[StubProcess, Connection]:
    """Start an instance process; `init` is child_main's arguments after the connection."""
    parent_sock, child_sock = socket.socketpair()
    try:
        popen = subprocess.Popen(
            [sys.executable, "-m", ENTRY, str(child_sock.fileno()), name],
            pass_fds=(child_sock.fileno(),),
            env=_env(),
        )
    finally:
        child_sock.close()
    conn = Connection(parent_sock.detach())
    conn.send(init)
    return StubProcess(popen), conn


def run_auto_complete(model_file: str, version_dir: str, config: dict[str, Any]) -> dict | None:
    """Run model.py's auto_complete_config in a throwaway child; raises RuntimeError on failure."""
    request = json.dumps({"model_file": model_file, "version_dir": version_dir, "config": config})
    done = subprocess.run(
        [sys.executable, "-m", ENTRY, "--auto-complete"],
        input=request.encode(),
        capture_output=True,
        env=_env(),
        timeout=300,
    )
    if done.returncode != 0:
        lines = done.stderr.decode(errors="replace").strip().splitlines()
        raise RuntimeError(lines[-1] if lines else f"exit code {done.returncode}")
    return json.loads(done.stdout.decode().strip().splitlines()[-1])
