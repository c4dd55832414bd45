"""tritonserver's command line under `modelport serve`: every flag parses, and each is
implemented, a no-op where modelport already does what it asks, or refused at start-up
naming what to do instead (src/modelport/entrypoints/kserve/triton_flags.py).
"""

from __future__ import annotations

import asyncio
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
import tritonclient.grpc as grpcclient

from helpers.server_proc import free_port
from modelport.entrypoints.cli import build_parser
from modelport.entrypoints.kserve import triton_flags
from modelport.entrypoints.kserve.embedded import EmbeddedServer
from modelport.entrypoints.kserve.grpc_server import GrpcServer
from modelport.repository.manager import RepositoryManager
from modelport.repository.resolve import resolve_config

FIXTURES = Path(__file__).parent / "fixtures" / "repositories"
VALID_OK = FIXTURES / "invalid" / "valid_ok"

# every flag of the brief, with a value tritonserver takes
FLAG_VALUES = [
    ("--http-port", "8000"),
    ("--strict-model-config", "false"),
    ("--disable-auto-complete-config",),
    ("--backend-config", "python,shm-default-byte-size=16777216"),
    ("--allow-http", "true"),
    ("--allow-grpc", "false"),
    ("--allow-metrics", "false"),
    ("--allow-gpu-metrics", "false"),
    ("--allow-cpu-metrics", "false"),
    ("--http-address", "0.0.0.0"),
    ("--grpc-address", "0.0.0.0"),
    ("--metrics-address", "0.0.0.0"),
    ("--pinned-memory-pool-byte-size", "268435456"),
    ("--cuda-memory-pool-byte-size", "0:67108864"),
    ("--min-supported-compute-capability", "6.0"),
    ("--exit-timeout-secs", "30"),
    ("--id", "triton"),
    ("--http-thread-count", "8"),
    ("--grpc-infer-allocation-pool-size", "8"),
    ("--buffer-manager-thread-count", "0"),
    ("--model-load-thread-count", "4"),
    ("--model-namespacing", "false"),
    ("--backend-directory", "/opt/tritonserver/backends"),
    ("--repoagent-directory", "/opt/tritonserver/repoagents"),
    ("--model-config-name", "h100"),
    ("--grpc-use-ssl", "false"),
    ("--grpc-use-ssl-mutual", "false"),
    ("--grpc-server-cert", "server.crt"),
    ("--grpc-server-key", "server.key"),
    ("--grpc-root-cert", "ca.crt"),
    ("--metrics-interval-ms", "2000"),
    ("--metrics-config", "summary_latencies=false"),
    ("--host-policy", "gpu0,numa-node=0"),
    ("--allow-sagemaker", "false"),
    ("--allow-vertex-ai", "false"),
    ("--http-header-forward-pattern", "azure.*"),
    ("--grpc-header-forward-pattern", "azure.*"),
    ("--reuse-grpc-port", "false"),
    ("--reuse-http-port", "false"),
    ("--grpc-keepalive-time", "7200000"),
    ("--grpc-keepalive-timeout", "20000"),
    ("--grpc-keepalive-permit-without-calls", "false"),
    ("--grpc-http2-max-pings-without-data", "2"),
    ("--grpc-http2-min-recv-ping-interval-without-data", "300000"),
    ("--grpc-http2-max-ping-strikes", "2"),
    ("--grpc-max-connection-age", "60000"),
    ("--grpc-max-connection-age-grace", "5000"),
    ("--grpc-restricted-protocol", "model-repository:admin-key=admin-value"),
    ("--http-restricted-api", "model-repository:admin-key=admin-value"),
]

# tritonserver's own defaults: never refused
TRITON_DEFAULTS = [
    "--allow-http=true", "--allow-grpc=true", "--allow-metrics=true",
    "--allow-gpu-metrics=true", "--allow-cpu-metrics=true", "--allow-sagemaker=false",
    "--allow-vertex-ai=false", "--strict-model-config=false", "--model-namespacing=false",
    "--grpc-use-ssl=false", "--grpc-use-ssl-mutual=false", "--reuse-grpc-port=false",
    "--reuse-http-port=false", "--exit-timeout-secs=30", "--id=triton",
    "--http-port=8000", "--http-address=0.0.0.0", "--grpc-address=0.0.0.0",
    "--metrics-address=0.0.0.0", "--http-thread-count=8",
    "--grpc-infer-allocation-pool-size=8", "--buffer-manager-thread-count=0",
    "--model-load-thread-count=4", "--pinned-memory-pool-byte-size=268435456",
    "--cuda-memory-pool-byte-size=0:67108864", "--min-supported-compute-capability=6.0",
    "--backend-directory=/opt/tritonserver/backends",
    "--repoagent-directory=/opt/tritonserver/repoagents", "--metrics-interval-ms=2000",
    "--metrics-config=counter_latencies=true", "--metrics-config=summary_latencies=false",
    "--metrics-config=histogram_latencies=false",
    "--metrics-config=summary_quantiles=0.5:0.05,0.9:0.01,0.95:0.001,0.99:0.001",
    "--backend-config=default-max-batch-size=4",
    "--grpc-keepalive-time=7200000", "--grpc-keepalive-timeout=20000",
    "--grpc-keepalive-permit-without-calls=false", "--grpc-http2-max-pings-without-data=2",
    "--grpc-http2-min-recv-ping-interval-without-data=300000",
    "--grpc-http2-max-ping-strikes=2",
]  # fmt: skip


def parse(*argv: str):
    return build_parser().parse_args(["serve", "--model-repository", "/models", *argv])


@pytest.mark.parametrize("flag_value", FLAG_VALUES, ids=lambda fv: fv[0])
def test_every_tritonserver_flag_parses(flag_value):
    parse(*flag_value)
    flag, *value = flag_value
    if value:
        parse(f"{flag}={value[0]}")  # tritonserver's usual spelling


@pytest.mark.parametrize("flag", sorted({f for f, *_ in FLAG_VALUES}))
def test_help_says_what_each_flag_does(flag):
    action = next(a for a in build_parser()._subparsers._group_actions[0].choices["serve"]
                  ._actions if flag in a.option_strings)  # fmt: skip
    assert action.help.startswith("[")  # [implemented] / [no-op] / [refused ...]


def test_tritons_defaults_are_never_refused(monkeypatch):
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    args = parse(*TRITON_DEFAULTS)
    assert triton_flags.refusals(args) == []
    triton_flags.check(args)


@pytest.mark.parametrize(
    "argv,words",
    [
        (["--allow-sagemaker"], "no SageMaker endpoint"),
        (["--allow-vertex-ai=true"], "no Vertex AI endpoint"),
        (["--grpc-use-ssl=true"], "terminate TLS in a proxy"),
        (["--grpc-use-ssl-mutual", "1"], "terminate mutual TLS"),
        (["--model-namespacing=true"], "unique name across the --model-repository"),
        (["--host-policy", "gpu0,numa-node=0"], "numactl / taskset"),
        (["--backend-directory", "/my/backends"], "backends are built in"),
        (["--repoagent-directory", "/my/agents"], "no repository agents"),
        (["--reuse-http-port=true"], "without SO_REUSEPORT"),
        (["--http-header-forward-pattern", "x-.*"], "no request headers"),
        (["--grpc-header-forward-pattern", "x-.*"], "no request headers"),
        (["--http-restricted-api", "model-repository:k=v"], "proxy in front of the HTTP"),
        (["--grpc-restricted-protocol", "health:k=v"], "proxy in front of the gRPC"),
        (["--backend-config", "python,stub-timeout-seconds=5"], "accepted: python,shm-"),
        (["--backend-config", "tensorflow,version=2"], "take no setting"),
        (["--backend-config", "default-max-batch-size=8"], "max_batch_size in the model"),
        (["--metrics-config", "summary_latencies=true"], "no summaries or histograms"),
        (["--metrics-config", "bogus=1"], "KEY one of counter_latencies"),
    ],
)
def test_refused_flags_stop_start_up_naming_what_to_do(argv, words):
    with pytest.raises(SystemExit) as info:
        triton_flags.check(parse(*argv))
    message = str(info.value.code)
    assert message.startswith("modelport serve: unsupported flags:")
    assert argv[0].split("=")[0] in message and words in message


def test_every_refusal_is_named_at_once():
    with pytest.raises(SystemExit) as info:
        triton_flags.check(parse("--allow-sagemaker", "--grpc-use-ssl=1"))
    assert "--allow-sagemaker" in info.value.code and "--grpc-use-ssl" in info.value.code


def test_allow_http_false_is_refused_beside_http_only_frontends():
    args = parse("--allow-http=false")
    # the OpenAI frontend rides along for the repository's llm models: /v1 is off too
    args.serve_frontends = ("modelport.entrypoints.openai.frontend",
                            "modelport.entrypoints.kserve.frontend")  # fmt: skip
    assert triton_flags.refusals(args) == []
    args.model = "SmolLM2-135M-Instruct"  # asked for in its own right
    (why,) = triton_flags.refusals(args)
    assert "the openai frontend only speaks HTTP" in why
    args.model = None
    args.serve_frontends += ("modelport.entrypoints.torchserve.frontend",)
    (why,) = triton_flags.refusals(args)
    assert "the torchserve frontend only speaks HTTP" in why


def test_http_port_is_the_shared_port():
    args = parse("--http-port", "9123")
    assert args.port == 9123 and args.port_given
    assert parse().port == 8000 and not parse().port_given


def test_grpc_channel_arguments():
    opts = dict(triton_flags.grpc_options(parse(
        "--grpc-keepalive-time=1000", "--grpc-keepalive-permit-without-calls",
        "--grpc-http2-max-ping-strikes=0", "--reuse-grpc-port=true")))  # fmt: skip
    assert opts == {
        "grpc.keepalive_time_ms": 1000,
        "grpc.keepalive_permit_without_calls": 1,
        "grpc.http2.max_ping_strikes": 0,
        "grpc.so_reuseport": 1,
    }
    assert dict(triton_flags.grpc_options(parse())) == {"grpc.so_reuseport": 0}


@pytest.mark.parametrize("reuse", [False, True])
def test_reuse_grpc_port(reuse):
    async def main():
        opts = [("grpc.so_reuseport", int(reuse))]
        first = GrpcServer(None, "127.0.0.1", 0, "v", options=opts)  # type: ignore[arg-type]
        await first.start()
        second = GrpcServer(None, "127.0.0.1", first.port, "v", options=opts)  # type: ignore[arg-type]
        try:
            if reuse:
                await second.start()
                assert second.port == first.port
            else:
                with pytest.raises(OSError, match="cannot bind gRPC"):
                    await second.start()
        finally:
            await second.stop()
            await first.stop()

    asyncio.run(main())


# -- implemented flags on a running server --


@pytest.fixture
def repo(tmp_path) -> Path:
    root = tmp_path / "model_repository"
    shutil.copytree(VALID_OK, root / "valid_ok")
    return root


def test_id_addresses_exit_timeout_and_endpoints_off(repo):
    flags = {
        "id": "triton",
        "http_address": "127.0.0.2",
        "allow_grpc": False,
        "exit_timeout_secs": 7,
        "metrics_config": ["counter_latencies=false"],
    }
    srv = EmbeddedServer([repo], triton_flags=flags).start()
    try:
        assert srv.http_url.startswith("127.0.0.2:")
        meta = httpx.get(f"http://{srv.http_url}/v2").json()
        assert meta["name"] == "triton"
        with pytest.raises(httpx.ConnectError):  # bound on --http-address only
            httpx.get(f"http://127.0.0.1:{srv.http_port}/v2")
        assert srv.service.grpc is None
        assert srv._uvicorn.config.timeout_graceful_shutdown == 7
        # metrics bind --http-address too (Triton's default --metrics-address)
        assert srv.service.metrics.host == "127.0.0.2"
        text = httpx.get(srv.metrics_url).text
        assert "nv_inference_request_success" in text and "_duration_us" not in text
    finally:
        srv.stop()


def test_grpc_id_grpc_address_and_metrics_off(repo):
    flags = {"id": "my-server", "grpc_address": "127.0.0.3", "allow_metrics": False}
    srv = EmbeddedServer([repo], triton_flags=flags).start()
    try:
        assert srv.service.metrics is None
        assert srv.service.grpc.host == "127.0.0.3"
        g = grpcclient.InferenceServerClient(f"127.0.0.3:{srv.service.grpc.port}")
        assert g.get_server_metadata().name == "my-server"
        assert httpx.get(f"http://{srv.http_url}/v2").json()["name"] == "my-server"
    finally:
        srv.stop()


def test_default_server_name_is_unchanged(repo):
    srv = EmbeddedServer([repo]).start()
    try:
        assert httpx.get(f"http://{srv.http_url}/v2").json()["name"] == "modelport"
        assert "nv_inference_request_duration_us" in httpx.get(srv.metrics_url).text
    finally:
        srv.stop()


def test_model_config_name_picks_configs_name_pbtxt(repo):
    (repo / "valid_ok" / "configs").mkdir()
    custom = (repo / "valid_ok" / "config.pbtxt").read_text() + "max_batch_size: 8\n"
    (repo / "valid_ok" / "configs" / "big.pbtxt").write_text(custom)

    async def max_batch(name: str) -> int:
        cfg = await resolve_config(repo / "valid_ok", None, 0, config_name=name)
        return cfg.max_batch_size

    assert asyncio.run(max_batch("big")) == 8
    assert asyncio.run(max_batch("")) == 0
    assert asyncio.run(max_batch("missing")) == 0  # Triton falls back to config.pbtxt


def test_disable_auto_complete_config_leaves_the_config_as_written():
    path = FIXTURES / "main" / "autocomplete_py"

    async def inputs(auto: bool) -> list[str]:
        cfg = await resolve_config(path, None, 0, auto_complete=auto)
        return [i.name for i in cfg.input]

    assert asyncio.run(inputs(True)) == ["X"]
    assert asyncio.run(inputs(False)) == []
    assert not triton_flags.auto_complete(parse("--disable-auto-complete-config"))
    assert not triton_flags.auto_complete(parse("--strict-model-config=true"))
    assert triton_flags.auto_complete(parse("--strict-model-config=false"))


def test_model_load_thread_count_bounds_concurrent_loads(repo):
    for i in range(5):
        shutil.copytree(VALID_OK, repo / f"m{i}")

    async def main(threads):
        manager = RepositoryManager([repo], load_threads=threads)
        manager.discover()
        running = peak = 0

        async def fake_load(name):
            nonlocal running, peak
            running += 1
            peak = max(peak, running)
            await asyncio.sleep(0.02)
            running -= 1

        manager._load_logged = fake_load
        await manager.load_many(list(manager.entries))
        return peak

    assert asyncio.run(main(2)) == 2
    assert asyncio.run(main(None)) == 6


def test_allow_http_false_serves_grpc_only(repo, tmp_path):
    grpc_port, http_port = free_port(), free_port()
    argv = [sys.executable, "-m", "modelport", "serve", "--model-repository", str(repo),
            "--allow-http=false", "--http-port", str(http_port), "--grpc-port", str(grpc_port),
            "--allow-metrics", "false"]  # fmt: skip
    log = tmp_path / "serve.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT,
                                env=dict(os.environ, PYTHONUNBUFFERED="1"))  # fmt: skip
    try:
        g = grpcclient.InferenceServerClient(f"127.0.0.1:{grpc_port}")
        deadline = time.monotonic() + 120
        while True:
            assert proc.poll() is None, log.read_text()
            try:
                if g.is_server_ready():
                    break
            except Exception:
                pass
            assert time.monotonic() < deadline, log.read_text()
            time.sleep(0.2)
        with socket.socket() as s:
            assert s.connect_ex(("127.0.0.1", http_port)) != 0  # nothing listens
    finally:
        proc.send_signal(signal.SIGTERM)  # uvicorn re-raises it once shut down
        assert proc.wait(60) in (0, -signal.SIGTERM), log.read_text()
    text = log.read_text()
    assert "serving on http" not in text and "Application shutdown complete" in text, text


def test_modelport_serve_stops_on_a_refused_flag(repo):
    argv = [sys.executable, "-m", "modelport", "serve", "--model-repository", str(repo),
            "--allow-sagemaker", "true", "--grpc-port", str(free_port())]  # fmt: skip
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert (
        "modelport serve: unsupported flags:\n  --allow-sagemaker=true: modelport has no "
        "SageMaker endpoint" in proc.stderr
    )
    assert "Traceback" not in proc.stderr
