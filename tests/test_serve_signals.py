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

from helpers.server_proc import descendants, free_port
from helpers.tiny_models import make_tiny_llama_dir

PYTHON_MODEL = """
import triton_python_backend_utils as pb_utils
class TritonPythonModel:
    def execute(self, requests):
        return [pb_utils.InferenceResponse([pb_utils.Tensor(
            "OUT", pb_utils.get_input_tensor_by_name(r, "IN").as_numpy() * 2)]) for r in requests]
"""
PYTHON_CONFIG = """
name: "double"
backend: "python"
input [ { name: "IN" data_type: TYPE_FP32 dims: [ -1 ] } ]
output [ { name: "OUT" data_type: TYPE_FP32 dims: [ -1 ] } ]
instance_group [ { count: 1 kind: KIND_CPU } ]
"""


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return make_tiny_llama_dir(tmp_path_factory.mktemp("sig") / "tiny")


@pytest.fixture(scope="module")
def repository(tmp_path_factory):
    repo = tmp_path_factory.mktemp("sigrepo")
    (repo / "double" / "1").mkdir(parents=True)
    (repo / "double" / "config.pbtxt").write_text(PYTHON_CONFIG)
    (repo / "double" / "1" / "model.py").write_text(PYTHON_MODEL)
    return repo


@pytest.mark.parametrize("sig, code", [(signal.SIGINT, 130), (signal.SIGTERM, -signal.SIGTERM)])
@pytest.mark.parametrize("frontend", ["openai", "kserve"])
def test_a_signal_to_the_whole_group_is_an_orderly_stop(model_dir, repository, tmp_path, frontend,
                                                        sig, code) -> None:
    port = free_port()
    log = tmp_path / "serve.log"
    cmd = [sys.executable, "-m", "modelport.entrypoints.cli", "serve", "--port", str(port)]
    if frontend == "openai":
        cmd += ["--model", str(model_dir), "--max-model-len", "64", "--kv-cache-memory", "8MiB"]
        ready = "/health"
    else:  # a python-backend model: its instance runs in a stub process
        cmd += ["--model-repository", str(repository), "--grpc-port", str(free_port()),
                "--metrics-port", str(free_port())]
        ready = "/v2/health/ready"
    with open(log, "wb") as f:
        # as from a terminal: SIGINT at its default even where this run's shell started it
        # ignored (a background job of a non-interactive shell), or Python never installs
        # its Ctrl-C handler in the server and a caught SIGINT ends it with 0
        proc = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, start_new_session=True,
                                preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    try:
        deadline = time.monotonic() + 180
        while True:
            assert proc.poll() is None and time.monotonic() < deadline, log.read_text()[-3000:]
            try:
                if httpx.get(f"http://127.0.0.1:{port}{ready}", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            time.sleep(0.3)
        children = descendants(proc.pid)  # engine core, or the model's stub
        assert children
        os.killpg(proc.pid, sig)  # as Ctrl-C in a terminal, or systemd's stop
        assert proc.wait(30) == code
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    text = log.read_text()
    for bad in ("Traceback", "engine core died", "leaked semaphore", "ERROR"):
        assert bad not in text, text[-3000:]
    deadline = time.monotonic() + 10  # none left behind (the resource tracker ends last)
    while any(_running(c) for c in children) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not [c for c in children if _running(c)]


def _running(pid: int) -> bool:
    """Not gone and not a zombie (an orphan exits to an init that may not reap it)."""
    try:
        state = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state != "Z"
