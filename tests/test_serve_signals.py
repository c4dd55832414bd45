"""Stopping `modelport serve` the way terminals and service managers do: the signal reaches
every process of the group, engine core included. The server shuts down in order: no
traceback, no engine-death report, no leaked semaphore, every process gone."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import httpx
import pytest

from helpers.server_proc import free_port
from helpers.tiny_models import make_tiny_llama_dir


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return make_tiny_llama_dir(tmp_path_factory.mktemp("sig") / "tiny")


@pytest.mark.parametrize("sig, code", [(signal.SIGINT, 130), (signal.SIGTERM, -signal.SIGTERM)])
def test_a_signal_to_the_whole_group_is_an_orderly_stop(model_dir, tmp_path, sig, code) -> None:
    port = free_port()
    log = tmp_path / "serve.log"
    cmd = [sys.executable, "-m", "modelport.entrypoints.cli", "serve", "--model", str(model_dir),
           "--max-model-len", "64", "--kv-cache-memory", "8MiB", "--port", str(port)]
    with open(log, "wb") as f:
        proc = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.monotonic() + 180
        while True:
            assert proc.poll() is None and time.monotonic() < deadline, log.read_text()[-3000:]
            try:
                if httpx.get(f"http://127.0.0.1:{port}/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            time.sleep(0.3)
        core = int(log.read_text().split("engine core pid ")[1].split(")")[0])
        os.killpg(proc.pid, sig)  # as Ctrl-C in a terminal, or systemd's stop
        assert proc.wait(30) == code
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    text = log.read_text()
    for bad in ("Traceback", "engine core died", "leaked semaphore", "ERROR"):
        assert bad not in text, text[-3000:]
    time.sleep(0.5)
    with pytest.raises(ProcessLookupError):  # the engine core is gone too
        os.kill(core, 0)
