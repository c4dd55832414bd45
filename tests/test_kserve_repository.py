"""Model control: explicit load / unload over HTTP and gRPC, poll mode, and `modelport serve`."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import tritonclient.grpc as grpcclient
import tritonclient.http as httpclient
from tritonclient.utils import InferenceServerException

from helpers.server_proc import free_port as _free_port
from modelport.entrypoints.kserve.embedded import EmbeddedServer
from modelport.repository.manager import RepositoryManager
from modelport.repository.tensors import InferRequest, InferTensor

MAIN = Path(__file__).parent / "fixtures" / "repositories" / "main"


def python_repo(root: Path, *names: str) -> Path:
    repo = root / "models"
    repo.mkdir(parents=True, exist_ok=True)
    for name in names:
        shutil.copytree(MAIN / name, repo / name)
    return repo


def add_sub_inputs(m=httpclient):
    a = np.arange(4, dtype=np.float32)
    inputs = []
    for name in ("INPUT0", "INPUT1"):
        t = m.InferInput(name, [4], "FP32")
        t.set_data_from_numpy(a)
        inputs.append(t)
    return inputs


@pytest.fixture(scope="module")
def explicit_server(tmp_path_factory):
    repo = python_repo(tmp_path_factory.mktemp("explicit"), "add_sub", "bytes_echo")
    srv = EmbeddedServer([repo], control_mode="explicit", load_models=["add_sub"]).start()
    yield srv
    srv.stop()


def test_explicit_mode_loads_only_what_was_asked(explicit_server):
    c = httpclient.InferenceServerClient(explicit_server.http_url)
    index = {r["name"]: r for r in c.get_model_repository_index()}
    assert index["add_sub"]["state"] == "READY"
    assert "state" not in index["bytes_echo"]  # known, never loaded
    assert not c.is_model_ready("bytes_echo")


def test_load_and_unload_over_http_and_grpc(explicit_server):
    h = httpclient.InferenceServerClient(explicit_server.http_url)
    g = grpcclient.InferenceServerClient(explicit_server.grpc_url)
    h.load_model("bytes_echo")
    assert h.is_model_ready("bytes_echo")
    g.unload_model("bytes_echo")
    assert not g.is_model_ready("bytes_echo")
    index = {r.name: r for r in g.get_model_repository_index().models}
    assert index["bytes_echo"].state == "UNAVAILABLE" and index["bytes_echo"].reason == "unloaded"
    with pytest.raises(InferenceServerException, match="has no available versions"):
        t = httpclient.InferInput("IN", [1, 1], "BYTES")
        t.set_data_from_numpy(np.array([[b"x"]], dtype=np.object_))
        h.infer("bytes_echo", [t])
    g.load_model("bytes_echo")
    assert h.is_model_ready("bytes_echo")
    with pytest.raises(InferenceServerException, match="no version is available"):
        h.load_model("not_in_repository")


def test_load_with_config_override(explicit_server):
    h = httpclient.InferenceServerClient(explicit_server.http_url)
    cfg = h.get_model_config("add_sub")
    cfg["instance_group"] = [{"count": 2, "kind": "KIND_CPU"}]
    h.load_model("add_sub", config=json.dumps(cfg))
    assert explicit_server.manager.get("add_sub").backend.num_instances == 2
    r = h.infer("add_sub", add_sub_inputs())
    np.testing.assert_allclose(r.as_numpy("OUTPUT0"), np.arange(4) * 2)
    bad = dict(cfg, max_batch_size=-1)
    with pytest.raises(InferenceServerException, match="must be non-negative"):
        h.load_model("add_sub", config=json.dumps(bad))
    assert h.is_model_ready("add_sub")  # a failed reload keeps the old version serving


def test_ensembles_follow_their_steps_on_unload(tmp_path):
    """Triton's dependency tracking: unloading a step unloads the ensembles that call it (they
    would say ready while every request fails); unload_dependents on an ensemble also unloads
    the models it was loaded with, except one another loaded ensemble still calls."""
    from modelport.repository import testing

    parts = ("llama_tokenizer", "llama_model", "llama_detokenizer")
    repo = python_repo(tmp_path, "nested_ensemble", "llama_ensemble", "bytes_echo", *parts)
    testing.build_seed_model(repo / "llama_model" / "1" / "model.pt")
    srv = EmbeddedServer([repo], control_mode="explicit").start()
    try:
        c = httpclient.InferenceServerClient(srv.http_url)
        everything = ("nested_ensemble", "llama_ensemble", "bytes_echo", *parts)
        c.load_model("nested_ensemble")  # loads its steps, and theirs
        assert all(c.is_model_ready(m) for m in everything)
        c.unload_model("llama_model")
        ready = {m for m in everything if c.is_model_ready(m)}
        assert ready == {"bytes_echo", "llama_tokenizer", "llama_detokenizer"}
        index = {r["name"]: r for r in c.get_model_repository_index()}
        assert index["nested_ensemble"]["state"] == "UNAVAILABLE"

        c.load_model("nested_ensemble")
        c.unload_model("llama_ensemble", unload_dependents=True)
        # its own steps go; nested_ensemble, which called it, goes with it
        assert {m for m in everything if c.is_model_ready(m)} == {"bytes_echo"}

        c.load_model("nested_ensemble")
        c.load_model("llama_ensemble")
        c.unload_model("nested_ensemble", unload_dependents=True)
        assert not any(c.is_model_ready(m) for m in everything)
    finally:
        srv.stop()


def test_poll_mode_picks_up_new_changed_and_removed_models(tmp_path):
    repo = python_repo(tmp_path, "add_sub")

    async def main():
        manager = RepositoryManager([repo], control_mode="poll", poll_secs=3600)
        await manager.start()
        try:
            assert manager.is_ready("add_sub")
            first = manager.get("add_sub")
            shutil.copytree(MAIN / "bytes_echo", repo / "bytes_echo")
            await manager.poll_once()
            assert manager.is_ready("bytes_echo")
            assert manager.get("add_sub") is first  # unchanged: not reloaded
            cfg = repo / "add_sub" / "config.pbtxt"
            cfg.write_text(
                cfg.read_text().replace("{ kind: KIND_CPU }", "{ count: 2 kind: KIND_CPU }")
            )
            os.utime(cfg, (time.time() + 5, time.time() + 5))
            await manager.poll_once()
            assert manager.get("add_sub").backend.num_instances == 2
            shutil.rmtree(repo / "bytes_echo")
            await manager.poll_once()
            assert not manager.is_ready("bytes_echo")
            x = np.ones(4, dtype=np.float32)
            resp = await manager.infer(
                InferRequest(
                    "add_sub",
                    inputs={
                        "INPUT0": InferTensor("INPUT0", "FP32", x),
                        "INPUT1": InferTensor("INPUT1", "FP32", x),
                    },
                )
            )
            np.testing.assert_allclose(resp.outputs["OUTPUT0"].data, x * 2)
            with pytest.raises(
                Exception, match="not allowed if polling is enabled \\(model control mode is 'poll'"
            ):
                await manager.request_load("add_sub")
        finally:
            await manager.stop()

    asyncio.run(main())


def test_modelport_serve_end_to_end(tmp_path):
    repo = python_repo(tmp_path, "add_sub")
    http_port, grpc_port, metrics_port = _free_port(), _free_port(), _free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "modelport", "serve", "--model-repository", str(repo),
         "--port", str(http_port), "--grpc-port", str(grpc_port),
         "--metrics-port", str(metrics_port), "--log-level", "warning"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
    )  # fmt: skip
    try:
        h = httpclient.InferenceServerClient(f"127.0.0.1:{http_port}")
        deadline = time.time() + 60
        while True:
            try:
                if h.is_server_ready():
                    break
            except Exception:
                pass
            assert proc.poll() is None, proc.stdout.read().decode()
            assert time.time() < deadline, "server did not become ready"
            time.sleep(0.2)
        r = h.infer("add_sub", add_sub_inputs())
        np.testing.assert_allclose(r.as_numpy("OUTPUT0"), np.arange(4) * 2)
        g = grpcclient.InferenceServerClient(f"127.0.0.1:{grpc_port}")
        r = g.infer("add_sub", add_sub_inputs(grpcclient))
        np.testing.assert_allclose(r.as_numpy("OUTPUT1"), np.zeros(4))
        import urllib.request

        text = urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics").read().decode()
        assert 'nv_inference_request_success{model="add_sub",version="1"} 2' in text
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    assert proc.returncode is not None
