"""Start-up failures: Triton's --exit-on-error and --strict-readiness.

The repository holds `valid_ok` (a python model) and `gpu_model`, whose instance group asks
for GPU 0; with CUDA_VISIBLE_DEVICES="" no GPU is visible, so it fails to load on any
machine, the user's report exactly.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import httpx
import pytest
import tritonclient.grpc as grpcclient
import tritonclient.http as httpclient

from helpers.server_proc import free_port, start_server, stop_server
from modelport.entrypoints import cli
from modelport.entrypoints.kserve.embedded import EmbeddedServer
from modelport.entrypoints.kserve.frontend import StartupFailed
from modelport.repository.manager import RepositoryManager

INVALID = Path(__file__).parent / "fixtures" / "repositories" / "invalid"
GPU_MODEL = """
name: "gpu_model"
backend: "onnxruntime"
input [{ name: "X" data_type: TYPE_FP32 dims: [ 4 ] }]
output [{ name: "Y" data_type: TYPE_FP32 dims: [ 4 ] }]
instance_group [{ kind: KIND_GPU, gpus: [ 0 ] }]
"""
NO_GPU = "has kind KIND_GPU but no GPU is available"


@pytest.fixture
def repo(tmp_path, monkeypatch) -> Path:
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")  # read when the manager is built
    root = tmp_path / "model_repository"
    shutil.copytree(INVALID / "valid_ok", root / "valid_ok")
    (root / "gpu_model" / "1").mkdir(parents=True)
    (root / "gpu_model" / "config.pbtxt").write_text(GPU_MODEL)
    return root


def serve_argv(repo: Path, *flags: str) -> list[str]:
    return ["-m", "modelport", "serve", "--model-repository", str(repo),
            "--grpc-port", str(free_port()), "--metrics-port", str(free_port()), *flags]  # fmt: skip


# -- --exit-on-error --


def test_serve_exits_when_a_model_fails_at_startup(repo, tmp_path):
    argv = serve_argv(repo, "--host", "127.0.0.1", "--port", str(free_port()))
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    proc = subprocess.run(
        [sys.executable, *argv], env=env, capture_output=True, text=True, timeout=120
    )
    out = proc.stdout + proc.stderr
    assert proc.returncode == 1, out
    assert "1 model failed to load at start-up" in proc.stderr, out
    assert f"gpu_model: model 'gpu_model': instance group 'gpu_model_0' {NO_GPU}" in proc.stderr
    assert "--exit-on-error=false" in proc.stderr
    # the log line names the model and the reason too
    assert "ERROR modelport.repository: failed to load 'gpu_model'" in out, out
    assert "Traceback" not in out, out


def test_embedded_server_start_raises_naming_the_failed_model(repo):
    with pytest.raises(StartupFailed) as info:
        EmbeddedServer([repo]).start()
    assert list(info.value.failures) == ["gpu_model"]
    assert NO_GPU in info.value.failures["gpu_model"]
    # On a CPU-only box the error names the kind that works there.
    assert "kind: KIND_CPU, or KIND_AUTO, runs it on the CPU" in info.value.failures["gpu_model"]
    assert info.value.code.startswith("modelport serve: 1 model failed to load at start-up")


# -- --strict-readiness, over HTTP and gRPC --


@pytest.mark.parametrize("strict", [True, False])
def test_server_readiness_with_a_failed_model(repo, strict):
    srv = EmbeddedServer([repo], exit_on_error=False, strict_readiness=strict).start()
    try:
        h = httpclient.InferenceServerClient(srv.http_url)
        g = grpcclient.InferenceServerClient(srv.grpc_url)
        ready = httpx.get(f"http://{srv.http_url}/v2/health/ready")
        assert ready.status_code == (400 if strict else 200)
        assert h.is_server_ready() is (not strict)
        assert g.is_server_ready() is (not strict)
        assert h.is_server_live() and g.is_server_live()
        # per-model readiness does not depend on the flag
        assert httpx.get(f"http://{srv.http_url}/v2/models/valid_ok/ready").status_code == 200
        assert httpx.get(f"http://{srv.http_url}/v2/models/gpu_model/ready").status_code == 400
        assert g.is_model_ready("valid_ok") and not g.is_model_ready("gpu_model")
    finally:
        srv.stop()


def test_strict_server_is_ready_when_every_model_loaded(repo):
    shutil.rmtree(repo / "gpu_model")
    srv = EmbeddedServer([repo]).start()
    try:
        assert httpx.get(f"http://{srv.http_url}/v2/health/ready").status_code == 200
        assert grpcclient.InferenceServerClient(srv.grpc_url).is_server_ready()
    finally:
        srv.stop()


@pytest.mark.parametrize(
    "flags,ready",
    [(("--exit-on-error=false",), 400),
     (("--exit-on-error", "false", "--strict-readiness=false"), 200)],
)  # fmt: skip
def test_serve_flags_reach_http_and_grpc_readiness(repo, tmp_path, flags, ready):
    argv = serve_argv(repo, *flags)
    grpc_port = argv[argv.index("--grpc-port") + 1]
    proc, base = start_server(argv, tmp_path / "serve.log", timeout=120,
                              ready_path="/v2/models/valid_ok/ready")  # fmt: skip
    try:
        assert httpx.get(f"{base}/v2/health/ready").status_code == ready
        g = grpcclient.InferenceServerClient(f"127.0.0.1:{grpc_port}")
        assert g.is_server_ready() is (ready == 200)
        assert not g.is_model_ready("gpu_model")
        assert httpx.get(f"{base}/v2/health/live").status_code == 200
    finally:
        stop_server(proc)
    assert NO_GPU in (tmp_path / "serve.log").read_text()


# -- the manager's readiness rules --


async def _manager(repo: Path, **kw) -> RepositoryManager:
    manager = RepositoryManager([repo], **kw)
    await manager.start()
    return manager


def test_explicit_mode_counts_the_models_it_tried_to_load(repo):
    import asyncio

    async def main():
        m = await _manager(repo, control_mode="explicit", startup_models=["valid_ok"])
        try:
            assert m.startup_failures == {} and m.server_ready()  # gpu_model never asked for
            with pytest.raises(Exception, match=NO_GPU):
                await m.request_load("gpu_model")
            assert not m.server_ready()  # like Triton: a failed later load counts too
            assert NO_GPU in m.unready_models()["gpu_model"]
            await m.request_unload("gpu_model")
            assert m.server_ready()  # unloaded on purpose: no longer waited for
            m.strict_readiness = False
            with pytest.raises(Exception, match=NO_GPU):
                await m.request_load("gpu_model")
            assert m.server_ready()
        finally:
            await m.stop()
        assert not m.server_ready()  # stopping: never ready

    asyncio.run(main())


def test_startup_model_missing_from_the_repository(repo):
    import asyncio

    async def main():
        m = await _manager(repo, control_mode="explicit", startup_models=["valid_ok", "nope"])
        try:
            assert list(m.startup_failures) == ["nope"]
            assert "no version is available" in m.startup_failures["nope"]
            assert not m.server_ready() and list(m.unready_models()) == ["nope"]
        finally:
            await m.stop()

    asyncio.run(main())


def test_poll_mode_removed_failed_model_no_longer_blocks_readiness(repo):
    import asyncio

    async def main():
        m = await _manager(repo, control_mode="poll", poll_secs=3600)
        try:
            assert list(m.startup_failures) == ["gpu_model"] and not m.server_ready()
            shutil.rmtree(repo / "gpu_model")
            await m.poll_once()
            assert m.server_ready()
        finally:
            await m.stop()

    asyncio.run(main())


# -- flag parsing --


@pytest.mark.parametrize(
    "argv,exit_on_error,strict",
    [([], True, True),
     (["--exit-on-error=false"], False, True),
     (["--exit-on-error", "false"], False, True),
     (["--exit-on-error=0", "--strict-readiness=OFF"], False, False),
     (["--strict-readiness", "--exit-on-error=true"], True, True),
     (["--strict-readiness=false", "--exit-on-error"], True, False)],
)  # fmt: skip
def test_triton_style_boolean_flags(argv, exit_on_error, strict):
    args = cli.build_parser().parse_args(["serve", "--model-repository", "/r", *argv])
    assert (args.exit_on_error, args.strict_readiness) == (exit_on_error, strict)


def test_bad_boolean_flag_value_is_a_usage_error(capsys):
    with pytest.raises(SystemExit) as info:
        cli.build_parser().parse_args(
            ["serve", "--model-repository", "/r", "--exit-on-error=maybe"]
        )
    assert info.value.code == 2
    assert "expected a boolean" in capsys.readouterr().err
