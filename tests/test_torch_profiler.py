"""vLLM's torch-profiler workflow (engine/torch_profiler.py) on CPU with a tiny model:
MODELPORT_TORCH_PROFILER_DIR / VLLM_TORCH_PROFILER_DIR, LLM.start_profile / stop_profile (one
trace per tensor-parallel rank), the server's POST /start_profile and /stop_profile (404
without the variable, 400 for a start while running or a stop while not; every
data-parallel replica writes its trace) and `modelport bench serve --profile`."""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import httpx
import pytest

from helpers.server_proc import start_server, stop_server
from helpers.tiny_models import make_tiny_llama_dir

LLM_KW = dict(max_model_len=128, kv_cache_memory=2 << 20, block_size=4, enforce_eager=True)
PROMPTS = [[5, 17, 42, 99, 3, 250, 7, 8], [200, 201, 2, 77]]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return make_tiny_llama_dir(tmp_path_factory.mktemp("prof") / "m", tie_word_embeddings=True)


def traces(where: Path) -> dict[str, list]:
    """Each trace file's name -> its events (the file must be gzipped JSON)."""
    out = {}
    for f in sorted(where.glob("*.pt.trace.json.gz")):
        with gzip.open(f, "rt") as fh:
            out[f.name] = json.load(fh)["traceEvents"]
    return out


def _generate(llm) -> None:
    from modelport import SamplingParams

    sp = SamplingParams(max_tokens=4, temperature=0, ignore_eos=True)
    outs = llm.generate([{"prompt_token_ids": p} for p in PROMPTS], sp, use_tqdm=False)
    assert all(len(o.outputs[0].token_ids) == 4 for o in outs)


# ---------------------------------------------------------------- offline LLM


def test_llm_start_generate_stop_writes_a_trace(model_dir, tmp_path, monkeypatch) -> None:
    from modelport import LLM
    from modelport.engine.torch_profiler import TorchProfilerError

    monkeypatch.setenv("VLLM_TORCH_PROFILER_DIR", str(tmp_path / "prof"))
    monkeypatch.setenv("VLLM_TORCH_PROFILER_WITH_STACK", "0")  # faster on CPU
    monkeypatch.delenv("MODELPORT_TORCH_PROFILER_DIR", raising=False)
    llm = LLM(str(model_dir), **LLM_KW)
    with pytest.raises(TorchProfilerError, match="not running"):
        llm.stop_profile()
    llm.start_profile()
    with pytest.raises(TorchProfilerError, match="already running"):
        llm.start_profile()
    _generate(llm)
    llm.stop_profile()
    got = traces(tmp_path / "prof")
    assert len(got) == 1, got.keys()
    (name, events), = got.items()
    assert "_dp0_tp0_" in name and len(events) > 10
    assert any(e.get("cat") == "cpu_op" for e in events)
    # a second profile: a second file; the engine generates on between profiles
    _generate(llm)
    llm.start_profile()
    _generate(llm)
    llm.stop_profile()
    assert len(traces(tmp_path / "prof")) == 2


def test_llm_without_the_variable_refuses(model_dir, monkeypatch) -> None:
    from modelport import LLM

    for var in ("VLLM_TORCH_PROFILER_DIR", "MODELPORT_TORCH_PROFILER_DIR"):
        monkeypatch.delenv(var, raising=False)
    llm = LLM(str(model_dir), **LLM_KW)
    with pytest.raises(RuntimeError, match="VLLM_TORCH_PROFILER_DIR"):
        llm.start_profile()
    with pytest.raises(RuntimeError, match="MODELPORT_TORCH_PROFILER_DIR"):
        llm.stop_profile()
    _generate(llm)  # still serves


def test_tensor_parallel_ranks_write_one_trace_each(model_dir, tmp_path, monkeypatch) -> None:
    """Our own variable name; rank 1 (a child process) writes its own trace, and
    stop_profile returns only once it is written."""
    from modelport import LLM

    monkeypatch.setenv("MODELPORT_TORCH_PROFILER_DIR", str(tmp_path / "tp"))
    monkeypatch.setenv("MODELPORT_TORCH_PROFILER_WITH_STACK", "0")
    tp = LLM(str(model_dir), tensor_parallel_size=2, **LLM_KW)
    try:
        tp.start_profile()
        _generate(tp)
        tp.stop_profile()
        got = traces(tmp_path / "tp")
        assert sorted(n.split("_pid")[0].rsplit("_", 1)[1] for n in got) == ["tp0", "tp1"]
        assert all(len(ev) > 10 for ev in got.values())
    finally:
        tp.llm_engine.core.shutdown()


def test_settings_from_the_environment(monkeypatch, tmp_path) -> None:
    from modelport.engine.torch_profiler import ProfilerSettings

    for name in ("DIR", "RECORD_SHAPES", "WITH_STACK", "WITH_MEMORY", "WITH_FLOPS"):
        for prefix in ("VLLM_", "MODELPORT_"):
            monkeypatch.delenv(f"{prefix}TORCH_PROFILER_{name}", raising=False)
    assert ProfilerSettings.from_env() is None
    monkeypatch.setenv("VLLM_TORCH_PROFILER_DIR", "rel/prof")
    monkeypatch.chdir(tmp_path)
    s = ProfilerSettings.from_env()
    assert s == ProfilerSettings(dir=str(tmp_path / "rel" / "prof"))  # vLLM's defaults
    assert s.with_stack and not (s.record_shapes or s.with_memory or s.with_flops)
    monkeypatch.setenv("MODELPORT_TORCH_PROFILER_DIR", str(tmp_path / "ours"))  # ours first
    monkeypatch.setenv("VLLM_TORCH_PROFILER_WITH_STACK", "0")
    monkeypatch.setenv("VLLM_TORCH_PROFILER_RECORD_SHAPES", "1")
    monkeypatch.setenv("VLLM_TORCH_PROFILER_WITH_MEMORY", "true")
    monkeypatch.setenv("VLLM_TORCH_PROFILER_WITH_FLOPS", "1")
    assert ProfilerSettings.from_env() == ProfilerSettings(
        dir=str(tmp_path / "ours"), record_shapes=True, with_stack=False, with_memory=True,
        with_flops=True)


# ---------------------------------------------------------------- the server


def test_routes_exist_only_with_the_variable(monkeypatch, tmp_path) -> None:
    """The app wiring every server uses (routes.mount: the standalone server and `modelport
    serve` alike), with no engine loaded yet: 404 without the variable, mounted with it."""
    from fastapi import FastAPI
    from starlette.testclient import TestClient

    from modelport.entrypoints.openai.errors import install_error_handlers
    from modelport.entrypoints.openai.routes import OPENAI_PATHS, ServerState, mount

    def app_client() -> TestClient:
        app = FastAPI()
        install_error_handlers(app, OPENAI_PATHS)
        mount(app, ServerState(version="test"))
        return TestClient(app)

    for var in ("VLLM_TORCH_PROFILER_DIR", "MODELPORT_TORCH_PROFILER_DIR"):
        monkeypatch.delenv(var, raising=False)
    client = app_client()
    for path in ("/start_profile", "/stop_profile"):
        r = client.post(path)
        assert r.status_code == 404 and r.json()["error"]["type"] == "not_found_error", r.text
    monkeypatch.setenv("VLLM_TORCH_PROFILER_DIR", str(tmp_path))
    client = app_client()
    for path in ("/start_profile", "/stop_profile"):
        r = client.post(path)  # mounted: the model is still loading
        assert r.status_code == 503 and "loading" in r.json()["error"]["message"], r.text


def _complete(url: str) -> httpx.Response:
    body = {"model": "tiny", "prompt": "hello profiled world", "max_tokens": 4,
            "temperature": 0, "ignore_eos": True}  # fmt: skip
    return httpx.post(f"{url}/v1/completions", json=body, timeout=60)


def test_server_start_complete_stop_every_replica(model_dir, tmp_path, monkeypatch) -> None:
    """`modelport serve` with two data-parallel replicas: each core writes its own trace;
    a double start / a stop while stopped are 400s and the server serves on; then
    `modelport bench serve --profile` wraps its timed run in the two calls."""
    prof = tmp_path / "prof"
    monkeypatch.setenv("VLLM_TORCH_PROFILER_DIR", str(prof))
    monkeypatch.setenv("VLLM_TORCH_PROFILER_WITH_STACK", "0")
    monkeypatch.delenv("MODELPORT_TORCH_PROFILER_DIR", raising=False)
    log = tmp_path / "server.log"
    argv = ["-m", "modelport.entrypoints.cli", "serve", "--model", str(model_dir),
            "--served-model-name", "tiny", "--max-model-len", "128", "--kv-cache-memory", "2MiB",
            "--block-size", "4", "--enforce-eager", "--data-parallel-size", "2"]  # fmt: skip
    proc, url = start_server(argv, log, timeout=180)
    try:
        r = httpx.post(f"{url}/stop_profile", timeout=30)
        assert r.status_code == 400 and "not running" in r.json()["error"]["message"], r.text
        assert httpx.post(f"{url}/start_profile", timeout=30).status_code == 200
        r = httpx.post(f"{url}/start_profile", timeout=30)
        assert r.status_code == 400, r.text
        err = r.json()["error"]
        assert err["type"] == "invalid_request_error" and "already running" in err["message"]
        for _ in range(2):  # one request for each replica
            assert _complete(url).status_code == 200
        assert httpx.post(f"{url}/stop_profile", timeout=60).status_code == 200
        got = traces(prof)
        assert sorted(n.split("_tp")[0].rsplit("_", 1)[1] for n in got) == ["dp0", "dp1"]
        assert all(events for events in got.values())
        assert _complete(url).status_code == 200  # serves on, profiler stopped
        assert str(prof) in log.read_text()

        # vllm bench serve --profile: start after the warm-up, stop after the timed run
        from modelport.entrypoints import cli

        rc = cli.main(["bench", "serve", "--base-url", url, "--num-prompts", "2",
                       "--input-len", "4", "--output-len", "2", "--token-range", "3", "250",
                       "--ignore-eos", "--profile"])
        assert rc == 0
        assert len(traces(prof)) == 4
        r = httpx.post(f"{url}/stop_profile", timeout=30)  # bench stopped it
        assert r.status_code == 400
    finally:
        stop_server(proc)
    assert "internal error" not in log.read_text()


@pytest.mark.gpu
def test_cuda_trace_holds_the_kernels_of_the_steps(model_dir, tmp_path, monkeypatch) -> None:
    """On CUDA (graphs and the Triton kernels): the trace records GPU kernels as well as the
    host's ops, and the engine generates the same tokens with the profiler on."""
    from modelport import LLM, SamplingParams

    monkeypatch.setenv("MODELPORT_TORCH_PROFILER_DIR", str(tmp_path / "prof"))
    monkeypatch.setenv("VLLM_TORCH_PROFILER_WITH_STACK", "0")
    llm = LLM(str(model_dir), device="cuda", dtype="bfloat16", kv_cache_memory=64 << 20,
              max_model_len=128, block_size=16)
    sp = SamplingParams(max_tokens=6, temperature=0, ignore_eos=True)
    plain = [o.outputs[0].token_ids for o in llm.generate(
        [{"prompt_token_ids": p} for p in PROMPTS], sp, use_tqdm=False)]
    llm.start_profile()
    profiled = [o.outputs[0].token_ids for o in llm.generate(
        [{"prompt_token_ids": p} for p in PROMPTS], sp, use_tqdm=False)]
    llm.stop_profile()
    assert profiled == plain
    (events,) = traces(tmp_path / "prof").values()
    assert any(e.get("cat") == "kernel" for e in events), {e.get("cat") for e in events}
    assert any(e.get("cat") == "cpu_op" for e in events)
