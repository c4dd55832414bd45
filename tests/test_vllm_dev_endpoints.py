"""vLLM's small server endpoints: GET /tokenizer_info (--enable-tokenizer-info-endpoint) and
the dev-mode routes (VLLM_SERVER_DEV_MODE=1 / MODELPORT_SERVER_DEV_MODE=1): POST
/reset_prefix_cache, /reset_mm_cache, /reset_encoder_cache and GET /server_info. Without the
flag / variable they are 404s; the standalone server and `modelport serve` mount them through
the same routes.mount. CPU, a tiny model, two data-parallel replicas."""

from __future__ import annotations

import logging

import pytest
from fastapi import FastAPI
from starlette.testclient import TestClient

from helpers.openai_http import in_process
from helpers.tiny_models import CHAT_TEMPLATE, make_tiny_llama_dir

DEV_ROUTES = [("POST", "/reset_prefix_cache"), ("POST", "/reset_mm_cache"),
              ("POST", "/reset_encoder_cache"), ("GET", "/server_info")]
INFO_PATHS = ("/tokenizer_info", "/get_tokenizer_info")
DEV_VARS = ("VLLM_SERVER_DEV_MODE", "MODELPORT_SERVER_DEV_MODE")


def _bare_app(tokenizer_info: bool = False) -> TestClient:
    """routes.mount with no engine loaded (the wiring every server uses)."""
    from modelport.entrypoints.openai.errors import install_error_handlers
    from modelport.entrypoints.openai.routes import OPENAI_PATHS, ServerState, mount

    app = FastAPI()
    install_error_handlers(app, OPENAI_PATHS)
    mount(app, ServerState(version="test", enable_tokenizer_info_endpoint=tokenizer_info))
    return TestClient(app)


def _status(client: TestClient, method: str, path: str) -> tuple[int, dict]:
    r = client.request(method, path)
    return r.status_code, r.json()


def test_routes_exist_only_with_the_flag_and_the_variable(monkeypatch) -> None:
    for var in DEV_VARS:
        monkeypatch.delenv(var, raising=False)
    client = _bare_app()
    for method, path in [*DEV_ROUTES, *(("GET", p) for p in INFO_PATHS)]:
        code, body = _status(client, method, path)
        assert code == 404 and body["error"]["type"] == "not_found_error", (path, body)
    monkeypatch.setenv("VLLM_SERVER_DEV_MODE", "0")  # vLLM's off
    for method, path in DEV_ROUTES:
        assert _status(_bare_app(), method, path)[0] == 404
    # mounted: the model is still loading (503), not a 404
    for var in DEV_VARS:
        monkeypatch.setenv(var, "1")
        client = _bare_app(tokenizer_info=True)
        for method, path in [*DEV_ROUTES, *(("GET", p) for p in INFO_PATHS)]:
            code, body = _status(client, method, path)
            assert code == 503 and "loading" in body["error"]["message"], (path, body)
        monkeypatch.delenv(var)


def test_modelport_serve_mounts_them_too(monkeypatch, tmp_path) -> None:
    """The unified `modelport serve` app (its OpenAI frontend's build), before any load."""
    import asyncio

    from modelport.entrypoints.cli import build_parser
    from modelport.entrypoints.cli_serve import take_model_tag
    from modelport.entrypoints.openai import frontend

    monkeypatch.setenv("MODELPORT_SERVER_DEV_MODE", "1")
    monkeypatch.delenv("VLLM_SERVER_DEV_MODE", raising=False)
    model = make_tiny_llama_dir(tmp_path / "m")
    for flag, info_code in (("--enable-tokenizer-info-endpoint", 503),
                            ("--no-enable-tokenizer-info-endpoint", 404)):
        args = build_parser().parse_args(["serve", "--model", str(model), flag])
        take_model_tag(args)
        app = FastAPI()
        asyncio.run(frontend.build(args, app))
        client = TestClient(app)
        assert client.get("/tokenizer_info").status_code == info_code
        assert client.get("/server_info").status_code == 503  # mounted, nothing loaded


# ---------------------------------------------------------------- a served model


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return make_tiny_llama_dir(tmp_path_factory.mktemp("dev") / "m", tie_word_embeddings=True)


@pytest.fixture(scope="module")
def client(model_dir):
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("VLLM_SERVER_DEV_MODE", "1")
        mp.delenv("MODELPORT_SERVER_DEV_MODE", raising=False)
        with in_process([
            "--model", str(model_dir), "--served-model-name", "tiny", "--max-model-len", "128",
            "--kv-cache-memory", "2MiB", "--block-size", "4", "--enforce-eager",
            "--data-parallel-size", "2", "--enable-prompt-tokens-details",
            "--enable-tokenizer-info-endpoint"]) as c:
            yield c


def test_tokenizer_info_is_the_tokenizers_config(client, model_dir) -> None:
    from transformers import AutoTokenizer

    hf = AutoTokenizer.from_pretrained(str(model_dir))
    r = client.get("/tokenizer_info")
    assert r.status_code == 200, r.text
    info = r.json()
    assert info["tokenizer_class"] == type(hf).__name__
    assert info["model_max_length"] == hf.model_max_length
    assert info["eos_token"] == hf.eos_token == "<|eos|>"
    assert info["bos_token"] == hf.bos_token and info["pad_token"] == hf.pad_token
    assert info["chat_template"] == hf.chat_template == CHAT_TEMPLATE
    # added_tokens_decoder: id -> the token's text (AddedToken made JSON, as vLLM's)
    assert info["added_tokens_decoder"][str(hf.eos_token_id)] == "<|eos|>"
    assert "vocab_file" not in info and "merges_file" not in info
    assert client.get("/get_tokenizer_info").json() == info


def _cached(client: TestClient, prompt: str) -> int:
    r = client.post("/v1/completions", json={"model": "tiny", "prompt": prompt,
                                               "max_tokens": 2, "temperature": 0})
    assert r.status_code == 200, r.text
    usage = r.json()["usage"]
    return (usage.get("prompt_tokens_details") or {}).get("cached_tokens", 0)


def test_reset_prefix_cache_on_every_replica(client, caplog) -> None:
    prompt = "A prompt long enough to fill several KV cache blocks."  # a token per byte
    # two replicas, each request to the one with the fewest in flight (a tie: the one given
    # fewer so far): each pair of requests is one on each replica
    for _ in range(2):
        _cached(client, prompt)
    hits = [_cached(client, prompt) for _ in range(2)]
    assert hits[0] >= 40 and hits == [hits[0]] * 2, hits  # full blocks of 4, on both
    with caplog.at_level(logging.INFO, logger="modelport.openai"):
        r = client.post("/reset_prefix_cache")
    assert r.status_code == 200 and r.content == b""  # vLLM's: 200, an empty body
    assert "failed to reset" not in caplog.text
    assert [_cached(client, prompt) for _ in range(2)] == [0, 0]  # forgotten on both
    assert [_cached(client, prompt) for _ in range(2)] == hits  # and cached anew
    # reset_external: no connector-managed cache here (accepted); reset_running_requests:
    # requests in flight are not preempted here (a 400)
    assert client.post("/reset_prefix_cache?reset_external=true").status_code == 200
    assert [_cached(client, prompt) for _ in range(2)] == [0, 0]
    r = client.post("/reset_prefix_cache?reset_running_requests=true")
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert err["type"] == "invalid_request_error" and err["param"] == "reset_running_requests"


def test_reset_while_a_request_runs_resets_nothing_there(client, caplog) -> None:
    """As vLLM's engine: a replica whose blocks a running request holds resets nothing (200
    all the same, the failure logged); once it finished, a reset goes through."""
    body = {"model": "tiny", "prompt": "keep running", "max_tokens": 100, "temperature": 0,
            "ignore_eos": True, "stream": True}
    with client.stream("POST", "/v1/completions", json=body) as stream:
        lines = stream.iter_lines()
        assert next(line for line in lines if line.startswith("data: "))  # it runs
        with caplog.at_level(logging.INFO, logger="modelport.openai"):
            r = client.post("/reset_prefix_cache")
        assert r.status_code == 200 and r.content == b""
        assert "failed to reset the prefix cache on data-parallel replica(s)" in caplog.text
        assert sum(1 for _ in lines) > 10  # the request finishes unharmed
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="modelport.openai"):
        assert client.post("/reset_prefix_cache").status_code == 200
    assert "failed to reset" not in caplog.text
    assert client.get("/health").status_code == 200


def test_mm_and_encoder_cache_resets_are_no_ops(client) -> None:
    for path in ("/reset_mm_cache", "/reset_encoder_cache"):
        r = client.post(path)
        assert r.status_code == 200 and r.content == b"", path


def test_server_info(client, model_dir, monkeypatch) -> None:
    r = client.get("/server_info")
    assert r.status_code == 200, r.text
    info = r.json()
    assert info["model"]["served_model_names"] == ["tiny"]
    assert info["model"]["model"] == str(model_dir)
    assert info["model"]["max_model_len"] == 128
    assert info["model"]["architecture"] == "LlamaForCausalLM"
    cfg = info["engine_config"]
    assert cfg["scheduler_config"]["max_model_len"] == 128
    assert cfg["cache_config"]["block_size"] == 4 == info["kv_cache"]["block_size"]
    assert cfg["parallel_config"]["data_parallel_size"] == 2
    assert cfg["model_config"]["num_hidden_layers"] == 2 and "hf_config" not in cfg["model_config"]
    assert info["kv_cache"]["num_blocks"] > 0
    # the VLLM_* / MODELPORT_* environment, as it is now; names holding KEY never shown
    monkeypatch.setenv("VLLM_SERVER_DEV_MODE", "1")
    monkeypatch.setenv("VLLM_API_KEY", "secret")
    env = client.get("/server_info").json()["env"]
    assert env["VLLM_SERVER_DEV_MODE"] == "1" and "VLLM_API_KEY" not in env
