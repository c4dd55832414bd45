"""REPORT_CUSTOM_METRICS of the `vllm` backend: the engine's `vllm:` series on the Triton
metrics endpoint, labelled model / version, counting what the requests really did; a model
without the parameter reports none of them."""

from __future__ import annotations

import json
import re
from types import SimpleNamespace

import httpx
import pytest
from tritonclient.grpc import model_config_pb2 as mc

from helpers.tiny_models import make_tiny_llama_dir
from modelport.entrypoints.kserve.embedded import EmbeddedServer
from modelport.repository import custom_metrics as cm
from modelport.repository.backends import vllm as vllm_backend
from modelport.repository.backends.vllm_metrics import TritonVllmMetrics

CONFIG = 'backend: "vllm"\ninstance_group [ { count: 1, kind: KIND_MODEL } ]\n'
REPORT = 'parameters { key: "REPORT_CUSTOM_METRICS" value: { string_value: "%s" } }\n'
FAMILIES = ("vllm:prompt_tokens_total", "vllm:generation_tokens_total",
            "vllm:time_to_first_token_seconds", "vllm:time_per_output_token_seconds",
            "vllm:e2e_request_latency_seconds", "vllm:request_prompt_tokens",
            "vllm:request_generation_tokens", "vllm:request_params_n")
LABELS = '{model="reported",version="1"}'
SAMPLE = re.compile(r'^(vllm:[a-zA-Z0-9_:]+)\{([^}]*)\} (\S+)$')


@pytest.fixture(scope="module")
def srv(tmp_path_factory):
    root = tmp_path_factory.mktemp("vllm_metrics_repo")
    weights = make_tiny_llama_dir(root / "weights")
    repo = root / "models"
    engine = {"model": str(weights), "enforce_eager": True, "max_model_len": 128,
              "kv_cache_memory_bytes": 8 << 20}
    for name, cfg in (("reported", CONFIG + REPORT % "True"), ("plain", CONFIG)):
        (repo / name / "1").mkdir(parents=True)
        (repo / name / "config.pbtxt").write_text(cfg)
        (repo / name / "1" / "model.json").write_text(json.dumps(engine))
    server = EmbeddedServer([repo], control_mode="explicit",
                            load_models=["reported", "plain"]).start()
    yield server
    server.stop()


def scrape(srv) -> dict[tuple[str, str], float]:
    """Every vllm: sample as (name, labels) -> value."""
    text = httpx.get(srv.metrics_url).text
    out = {}
    for line in text.splitlines():
        m = SAMPLE.match(line)
        if m:
            out[(m[1], m[2])] = float(m[3])
    return out


def generate(srv, model: str, prompt: str, max_tokens: int, stream: bool = False) -> tuple:
    """(prompt tokens, generated tokens) of one request, as the backend reports them."""
    body = {"text_input": prompt, "exclude_input_in_output": True,
            "return_num_input_tokens": True, "return_num_output_tokens": True,
            "parameters": {"max_tokens": max_tokens, "temperature": 0, "ignore_eos": True}}
    base = f"http://{srv.http_url}/v2/models/{model}"
    if not stream:
        r = httpx.post(f"{base}/generate", json=body, timeout=60)
        assert r.status_code == 200, r.text
        return r.json()["num_input_tokens"], r.json()["num_output_tokens"]
    body["stream"] = True
    with httpx.stream("POST", f"{base}/generate_stream", json=body, timeout=60) as r:
        assert r.status_code == 200
        events = [json.loads(line[6:]) for line in r.iter_lines() if line.startswith("data: ")]
    return events[0]["num_input_tokens"], sum(e["num_output_tokens"] for e in events)


def test_series_count_what_the_requests_did(srv) -> None:
    before = scrape(srv)
    # a fresh model shows its series at zero, as Triton's MetricFamily series do
    assert before[("vllm:prompt_tokens_total", LABELS[1:-1])] == 0
    assert before[("vllm:request_params_n_count", LABELS[1:-1])] == 0
    done = [generate(srv, "reported", "hello there", 5),
            generate(srv, "reported", "abc", 7, stream=True),
            generate(srv, "reported", "the quick brown fox", 1)]
    generate(srv, "plain", "not counted", 4)
    prompt, gen = sum(p for p, _ in done), sum(g for _, g in done)
    assert [g for _, g in done] == [5, 7, 1] and prompt >= len("hello there") + 3 + 19
    got = {name: v for (name, labels), v in scrape(srv).items() if labels == LABELS[1:-1]}
    assert got["vllm:prompt_tokens_total"] == prompt
    assert got["vllm:generation_tokens_total"] == gen
    for family in ("vllm:time_to_first_token_seconds", "vllm:e2e_request_latency_seconds",
                   "vllm:request_prompt_tokens", "vllm:request_generation_tokens",
                   "vllm:request_params_n"):
        assert got[f"{family}_count"] == len(done), family
        assert got[f"{family}_sum"] > 0, family
    assert got["vllm:request_prompt_tokens_sum"] == prompt
    assert got["vllm:request_generation_tokens_sum"] == gen
    assert got["vllm:request_params_n_sum"] == len(done)
    # one inter-token time per token after each request's first
    assert got["vllm:time_per_output_token_seconds_count"] == gen - len(done)
    assert got["vllm:e2e_request_latency_seconds_sum"] >= got[
        "vllm:time_to_first_token_seconds_sum"]


def test_exposition_is_tritons(srv) -> None:
    """Counters under the name given, histograms with le buckets ending at +Inf, labels
    model and version; the token-count buckets stop at max_model_len (1-2-5 steps)."""
    text = httpx.get(srv.metrics_url).text
    for family in FAMILIES:
        kind = "counter" if family.endswith("_total") else "histogram"
        assert f"# TYPE {family} {kind}\n" in text
    assert re.search(r'^vllm:prompt_tokens_total\{model="reported",version="1"\} \d+$', text,
                     re.M)
    les = re.findall(r'^vllm:request_prompt_tokens_bucket\{model="reported",version="1",'
                     r'le="([^"]+)"\}', text, re.M)
    assert les == ["1", "2", "5", "10", "20", "50", "100", "+Inf"]
    count = re.search(r'^vllm:e2e_request_latency_seconds_count\{[^}]*\} (\d+)$', text, re.M)
    inf = re.search(r'^vllm:e2e_request_latency_seconds_bucket\{[^}]*le="\+Inf"\} (\d+)$',
                    text, re.M)
    assert count and inf and count[1] == inf[1]


def test_model_without_the_parameter_reports_nothing(srv) -> None:
    assert not [key for key in scrape(srv) if 'model="plain"' in key[1]]
    # and the server's own families are there for both
    text = httpx.get(srv.metrics_url).text
    assert 'nv_inference_request_success{model="plain",version="1"} 1' in text


def test_unload_takes_the_series_away(srv) -> None:
    r = httpx.post(f"http://{srv.http_url}/v2/repository/models/reported/unload", timeout=60)
    assert r.status_code == 200, r.text
    assert not [key for key in scrape(srv) if 'model="reported"' in key[1]]


# -- the parameter's parsing, without an engine


def _ctx(tmp_path, params: dict[str, str], engine: dict | None = None):
    cfg = mc.ModelConfig(name="m", backend="vllm")
    for k, v in params.items():
        cfg.parameters[k].string_value = v
    (tmp_path / "1").mkdir(exist_ok=True)
    (tmp_path / "1" / "model.json").write_text(json.dumps({"model": "x", **(engine or {})}))
    return SimpleNamespace(config=cfg, version_dir=tmp_path / "1")


@pytest.mark.parametrize("key", ["REPORT_CUSTOM_METRICS", "ENABLE_VLLM_HEALTH_CHECK"])
@pytest.mark.parametrize("value,on", [("true", True), ("TRUE", True), (" true", False),
                                      ("false", False), ("yes", False), ("1", False),
                                      ("on", False), ("", False)])
def test_only_true_turns_it_on_as_in_triton(tmp_path, caplog, key, value, on) -> None:
    """Triton's backend compares the lower-cased value with "true": "yes" / "1" / "on" are
    off there, so they are off here, with a warning (Triton says nothing)."""
    assert vllm_backend._switch(_ctx(tmp_path, {key: value}), key, "off") is on
    warned = key in caplog.text
    assert warned == (value.lower() not in ("true", "false"))
    assert vllm_backend._switch(_ctx(tmp_path, {}), key, "off") is False


@pytest.mark.parametrize("given,off", [(True, True), ("true", True), (False, False),
                                       ("false", False), (None, False)])
def test_disable_log_stats_in_model_json_turns_it_off(tmp_path, given, off) -> None:
    engine = {} if given is None else {"disable_log_stats": given}
    *_, no_stats = vllm_backend._engine_args(_ctx(tmp_path, {}, engine))
    assert no_stats is off


def test_a_family_of_another_kind_is_refused_and_nothing_is_held() -> None:
    """A python model that made vllm:request_params_n a gauge first: Triton's MetricFamily
    fails the same way; the families made before it hold no series of this model."""
    reg = cm.CustomMetrics()
    reg.family_new("vllm:request_params_n", "a gauge", cm.GAUGE)
    with pytest.raises(cm.CustomMetricError, match="different type"):
        TritonVllmMetrics(reg, "m", 1, 64)
    assert not [line for line in reg.render() if not line.startswith("#")]
