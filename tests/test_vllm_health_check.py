"""ENABLE_VLLM_HEALTH_CHECK of a repository written for Triton's vLLM backend: once the
engine's core process has died, requests are answered UNAVAILABLE and, in explicit model
control mode (which Triton's docs ask for), the model unloads (not ready, then unknown);
without the parameter the model stays loaded and each request fails on its own."""

from __future__ import annotations

import json
import time

import httpx
import pytest

from helpers.tiny_models import make_tiny_llama_dir
from modelport.entrypoints.kserve.embedded import EmbeddedServer

CONFIG = 'backend: "vllm"\ninstance_group [ { count: 1, kind: KIND_MODEL } ]\n'
CHECK = 'parameters { key: "ENABLE_VLLM_HEALTH_CHECK" value: { string_value: "true" } }\n'


def _repo(root, models: dict[str, str]):
    weights = make_tiny_llama_dir(root / "weights")
    engine = {"model": str(weights), "enforce_eager": True, "max_model_len": 128,
              "kv_cache_memory_bytes": 4 << 20}
    repo = root / "models"
    for name, cfg in models.items():
        (repo / name / "1").mkdir(parents=True)
        (repo / name / "config.pbtxt").write_text(cfg)
        (repo / name / "1" / "model.json").write_text(json.dumps(engine))
    return repo


@pytest.fixture(scope="module")
def srv(tmp_path_factory):
    repo = _repo(tmp_path_factory.mktemp("health"), {
        "checked": CONFIG + CHECK, "unchecked": CONFIG, "bystander": CONFIG + CHECK})
    srv = EmbeddedServer([repo], control_mode="explicit", load_models=["*"]).start()
    yield srv
    srv.stop()


def _generate(srv, model: str) -> httpx.Response:
    return httpx.post(f"http://{srv.http_url}/v2/models/{model}/generate",
                      json={"text_input": "Hi", "parameters": {"max_tokens": 2}}, timeout=30)


def _ready(srv, model: str) -> bool:
    return httpx.get(f"http://{srv.http_url}/v2/models/{model}/ready").status_code == 200


def _kill_core(srv, model: str) -> None:
    llm = srv.manager.get(model).backend.llm
    llm.client._proc.kill()
    deadline = time.monotonic() + 20
    while llm.dead_reason is None:  # the client notices the core's end on its own
        assert time.monotonic() < deadline, "the engine did not notice its core's death"
        time.sleep(0.05)


def test_a_dead_engine_unloads_the_model_and_others_serve(srv) -> None:
    assert _generate(srv, "checked").status_code == 200 and _ready(srv, "checked")
    _kill_core(srv, "checked")
    r = _generate(srv, "checked")
    assert r.status_code == 503, r.text
    assert r.json() == {"error": "Model is unavailable due to unhealthy vLLM engine"}
    deadline = time.monotonic() + 20
    while _ready(srv, "checked"):
        assert time.monotonic() < deadline, "the model was not unloaded"
        time.sleep(0.05)
    r = _generate(srv, "checked")
    assert r.status_code == 503, r.text
    assert "Request for unknown model: 'checked' has no available versions" in r.text
    index = {m["name"]: m for m in httpx.post(f"http://{srv.http_url}/v2/repository/index",
                                              json={}).json()}
    assert index["checked"]["state"] == "UNAVAILABLE"
    # loading it again starts a new engine
    r = httpx.post(f"http://{srv.http_url}/v2/repository/models/checked/load", timeout=60)
    assert r.status_code == 200, r.text
    assert _generate(srv, "checked").status_code == 200 and _ready(srv, "checked")
    # the other models' engines are their own
    r = _generate(srv, "bystander")
    assert r.status_code == 200 and r.json()["text_output"].startswith("Hi"), r.text
    assert _ready(srv, "bystander")


def test_without_the_check_the_model_stays_and_requests_fail_alone(srv) -> None:
    assert _generate(srv, "unchecked").status_code == 200
    _kill_core(srv, "unchecked")
    for _ in range(2):
        r = _generate(srv, "unchecked")
        assert r.status_code == 500 and "EngineDeadError" in r.text, r.text
    assert _ready(srv, "unchecked")


def test_without_explicit_mode_the_model_stays_and_answers_unavailable(tmp_path,
                                                                       caplog) -> None:
    """Model control mode none refuses unloads (Triton's too): the model stays loaded and
    every request gets the same UNAVAILABLE answer; the refused unload is logged."""
    srv = EmbeddedServer([_repo(tmp_path, {"alone": CONFIG + CHECK})]).start()
    try:
        assert _generate(srv, "alone").status_code == 200
        _kill_core(srv, "alone")
        for _ in range(2):
            r = _generate(srv, "alone")
            assert r.status_code == 503, r.text
            assert r.json() == {"error": "Model is unavailable due to unhealthy vLLM engine"}
        assert "explicit model load / unload is not allowed" in caplog.text
    finally:
        srv.stop()
