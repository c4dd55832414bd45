"""What a vLLM client expects of the OpenAI server, on a tiny model served as vLLM users start it:
`modelport serve --model ./tiny` (a relative path, no --served-model-name), one engine slot and
a waiting queue of one.

- the `--model` string as given is a served name (vLLM's default), and so is the folder name;
- response_format json_object / json_schema constrain the output (structured outputs); tool
  choice "auto" (the default with tools) without --enable-auto-tool-choice is vLLM's 400, as
  is tool_choice without tools (tests/test_openai_tool_calls.py serves the tool calls); tool_choice
  "none" is served, with the tools rendered by a tool-aware chat template;
- a request wider (n) than --max-waiting-requests is served on an idle server, not 503 forever;
- a body that is not JSON is a 400 that says so, with the position.
"""

from __future__ import annotations

import time

import httpx
import openai
import pytest

from helpers.openai_http import error as _error
from helpers.server_proc import start_server, stop_server
from helpers.tiny_models import CHAT_TEMPLATE, make_tiny_llama_dir

TOOLS_TEMPLATE = (
    "{% if tools %}<|bos|>tools\n{% for t in tools %}{{ t['function']['name'] }}: "
    "{{ t['function']['description'] }}\n{% endfor %}<|eos|>\n{% endif %}" + CHAT_TEMPLATE
)
WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Weather now",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}},
    },
}
MESSAGES = [{"role": "user", "content": "hi"}]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    path = make_tiny_llama_dir(tmp_path_factory.mktemp("parity") / "tiny")
    (path / "chat_template.jinja").write_text(TOOLS_TEMPLATE)
    return path


@pytest.fixture(scope="module")
def base(model_dir, tmp_path_factory):
    log = tmp_path_factory.mktemp("paritysrv") / "server.log"
    argv = ["-m", "modelport.entrypoints.cli", "serve", "--model", "./tiny",
            "--max-model-len", "64", "--kv-cache-memory", "8MiB",
            "--max-num-seqs", "1", "--max-waiting-requests", "1",
            "--metrics-prefix", "vllm"]  # fmt: skip
    proc, url = start_server(argv, log, timeout=180, cwd=model_dir.parent)
    try:
        yield url
    finally:
        stop_server(proc)



def test_the_model_string_as_given_and_the_folder_name_are_both_served(base) -> None:
    client = openai.OpenAI(base_url=f"{base}/v1", api_key="x", max_retries=0, timeout=60)
    # listed once, as vLLM lists it; the folder name is an accepted alias
    assert [m.id for m in client.models.list().data] == ["./tiny"]
    # vLLM's root is the --model string as given (not the folder's name)
    assert httpx.get(f"{base}/v1/models").json()["data"][0]["root"] == "./tiny"
    for name in ("./tiny", "tiny"):
        r = client.completions.create(model=name, prompt="hello", max_tokens=2)
        assert r.model == "./tiny"  # like vLLM: the first served name, the --model string
    with pytest.raises(openai.NotFoundError):
        client.completions.create(model="tiny2", prompt="hello", max_tokens=2)
    assert client.models.retrieve("tiny").id == "tiny"


@pytest.mark.parametrize("path", ["/v1/chat/completions", "/v1/completions"])
@pytest.mark.parametrize(
    "fmt",
    [
        {"type": "json_object"},
        {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "object"}}},
    ],
)
def test_json_response_formats_are_served(base, path, fmt) -> None:
    pytest.importorskip("xgrammar")
    body = {"messages": MESSAGES} if "chat" in path else {"prompt": "hello"}
    r = httpx.post(f"{base}{path}", json={**body, "max_tokens": 1, "response_format": fmt},
                   timeout=60)
    assert r.status_code == 200, r.text
    choice = r.json()["choices"][0]
    text = choice["message"]["content"] if "chat" in path else choice["text"]
    assert text and set(text) <= set(" \t\r\n{"), text  # a JSON object's first byte


def test_text_response_format_is_served(base) -> None:
    client = openai.OpenAI(base_url=f"{base}/v1", api_key="x", max_retries=0, timeout=60)
    r = client.chat.completions.create(
        model="tiny", messages=MESSAGES, max_tokens=2, response_format={"type": "text"}
    )
    assert r.choices[0].message.content is not None
    with pytest.raises(openai.BadRequestError):  # a json_schema format needs its schema
        client.chat.completions.create(
            model="tiny", messages=MESSAGES, max_tokens=2,
            response_format={"type": "json_schema", "json_schema": {"name": "x"}},
        )  # fmt: skip


AUTO_NEEDS_FLAGS = (
    '"auto" tool choice requires --enable-auto-tool-choice and --tool-call-parser to be set'
)


@pytest.mark.parametrize(
    ("extra", "said"),
    [
        ({"tools": [WEATHER]}, AUTO_NEEDS_FLAGS),  # "auto" is the default when tools are given
        ({"tools": [WEATHER], "tool_choice": "auto"}, AUTO_NEEDS_FLAGS),
        ({"tool_choice": "required"}, "When using `tool_choice`, `tools` must be set."),
        ({"tool_choice": "auto"}, "When using `tool_choice`, `tools` must be set."),
    ],
)
def test_tool_choices_vllm_refuses_are_400s_in_its_words(base, extra, said) -> None:
    r = httpx.post(f"{base}/v1/chat/completions",
                   json={"messages": MESSAGES, "max_tokens": 2, **extra})  # fmt: skip
    err = _error(r)
    assert err["param"] == "tool_choice"
    assert err["message"] == said


def test_tool_choice_none_renders_the_tools_into_the_chat_template(base, model_dir) -> None:
    from modelport.frontend.tokenizer import load_tokenizer
    from modelport.loader import resolve_model

    tok = load_tokenizer(resolve_model(str(model_dir)))
    with_tools = tok.apply_chat_template(MESSAGES, tools=[WEATHER])
    assert "get_weather: Weather now" in with_tools
    expected = len(tok.encode(with_tools, add_special_tokens=False))
    plain = len(tok.encode(tok.apply_chat_template(MESSAGES), add_special_tokens=False))
    assert expected > plain

    url = f"{base}/v1/chat/completions"
    body = {"messages": MESSAGES, "max_tokens": 1, "tools": [WEATHER], "tool_choice": "none"}
    r = httpx.post(url, json=body, timeout=60)
    assert r.status_code == 200, r.text
    assert r.json()["usage"]["prompt_tokens"] == expected
    r = httpx.post(url, json={"messages": MESSAGES, "max_tokens": 1}, timeout=60)
    assert r.json()["usage"]["prompt_tokens"] == plain


def test_n_above_the_waiting_limit_is_served_when_the_queue_is_empty(base) -> None:
    # --max-num-seqs 1 --max-waiting-requests 1: n=2 leaves one sequence waiting beyond the
    # limit of one; retrying can never help, so the idle server must take it
    body = {"prompt": "hello", "max_tokens": 3, "ignore_eos": True, "n": 2}
    r = httpx.post(f"{base}/v1/completions", json=body, timeout=60)
    assert r.status_code == 200, r.text
    assert sorted(c["index"] for c in r.json()["choices"]) == [0, 1]
    assert r.json()["usage"]["completion_tokens"] == 6
    chat = {"messages": MESSAGES, "max_tokens": 2, "ignore_eos": True, "n": 3}
    r = httpx.post(f"{base}/v1/chat/completions", json=chat, timeout=60)
    assert r.status_code == 200, r.text
    assert len(r.json()["choices"]) == 3


@pytest.mark.parametrize(
    ("raw", "where"),
    [
        (b'{"prompt": "x",, "max_tokens": 2}', "line 1 column 16 (char 15)"),
        (b'{\n  "prompt": "x",\n  "n": \n}', "line 4 column 1 (char 27)"),
        (b"{not json", "line 1 column 2 (char 1)"),
    ],
)
def test_a_body_that_is_not_json_is_a_400_that_says_so(base, raw, where) -> None:
    r = httpx.post(f"{base}/v1/completions", content=raw,
                   headers={"content-type": "application/json"})  # fmt: skip
    err = _error(r)
    assert err["message"].startswith("the request body is not valid JSON: ")
    assert err["message"].endswith(where)
    assert err["param"] is None and err["type"] == "invalid_request_error"


@pytest.mark.parametrize("path", ["/v1/completions", "/v1/chat/completions"])
def test_a_missing_body_is_a_400_that_says_so(base, path) -> None:
    err = _error(httpx.post(f"{base}{path}", headers={"content-type": "application/json"}))
    assert err["message"] == "the request body is missing: send a JSON object"
    assert err["param"] is None and err["type"] == "invalid_request_error"


def test_metrics_prefix_vllm_gives_vllms_series_names(base) -> None:
    r = httpx.post(f"{base}/v1/completions", json={"model": "tiny", "prompt": "hi", "max_tokens": 2})
    assert r.status_code == 200
    text = httpx.get(f"{base}/metrics").text
    for name in ("vllm:num_requests_running", "vllm:kv_cache_usage_perc",
                 "vllm:time_to_first_token_seconds_bucket", "vllm:generation_tokens_total",
                 "vllm:request_success_total"):
        assert name in text, name
    assert "modelport:" not in text


def test_metrics_request_time_per_output_token(base) -> None:
    """vLLM's per-request TPOT histogram (the vllm:time_per_output_token_seconds of old):
    (last token - first token) / (tokens - 1) of each finished request, 0 for one token."""
    import re

    def tpot() -> tuple[float, float]:
        text = httpx.get(f"{base}/metrics").text
        got = {}
        for part in ("count", "sum"):
            m = re.search(rf'^vllm:request_time_per_output_token_seconds_{part}'
                          rf'{{engine="0",model_name="./tiny"}} (\S+)$', text, re.M)
            assert m, part
            got[part] = float(m[1])
        return got["count"], got["sum"]

    count, total = tpot()
    body = {"model": "tiny", "prompt": "hi", "max_tokens": 1}
    assert httpx.post(f"{base}/v1/completions", json=body, timeout=60).status_code == 200
    count1, total1 = tpot()
    assert (count1, total1) == (count + 1, total)  # one token: observed as 0
    start = time.monotonic()
    body = {"model": "tiny", "prompt": "hi", "max_tokens": 6, "ignore_eos": True}
    assert httpx.post(f"{base}/v1/completions", json=body, timeout=60).status_code == 200
    elapsed = time.monotonic() - start
    count2, total2 = tpot()
    assert count2 == count1 + 1 and 0 < total2 - total1 <= elapsed / 5


def test_metrics_request_phase_times(base) -> None:
    """vLLM's request_prefill / decode / inference_time_seconds of each finished request."""
    import re

    def sums() -> dict[str, tuple[float, float]]:
        text = httpx.get(f"{base}/metrics").text
        got = {}
        for phase in ("prefill", "decode", "inference"):
            stem = f"vllm:request_{phase}_time_seconds"
            vals = [float(re.search(rf'^{stem}_{part}{{engine="0",model_name="./tiny"}} (\S+)$',
                                    text, re.M)[1]) for part in ("count", "sum")]
            got[phase] = (vals[0], vals[1])
        return got

    before = sums()
    start = time.monotonic()
    body = {"model": "tiny", "prompt": "hi", "max_tokens": 6, "ignore_eos": True}
    assert httpx.post(f"{base}/v1/completions", json=body, timeout=60).status_code == 200
    elapsed = time.monotonic() - start
    after = sums()
    delta = {k: (after[k][0] - before[k][0], after[k][1] - before[k][1]) for k in after}
    assert all(n == 1 for n, _ in delta.values()), delta
    assert 0 < delta["prefill"][1] and 0 < delta["decode"][1], delta
    assert delta["inference"][1] == pytest.approx(delta["prefill"][1] + delta["decode"][1])
    assert delta["inference"][1] <= elapsed


def test_metrics_prefix_is_checked() -> None:
    from modelport.entrypoints.openai.metrics import ServerMetrics

    with pytest.raises(ValueError, match="metrics prefix must be one of"):
        ServerMetrics("m", prefix="tgi")


def test_metrics_series_exist_before_the_first_request() -> None:
    """vLLM makes its series at start-up: a fresh server scrapes as zeros, not "no data"."""
    from modelport.engine.messages import SchedulerStats
    from modelport.entrypoints.openai.metrics import ServerMetrics

    text = ServerMetrics("m", prefix="vllm").render().decode()
    for line in ('vllm:num_requests_running{engine="0",model_name="m"} 0.0',
                 'vllm:num_requests_waiting{engine="0",model_name="m"} 0.0',
                 'vllm:kv_cache_usage_perc{engine="0",model_name="m"} 0.0',
                 'vllm:prompt_tokens_total{engine="0",model_name="m"} 0.0',
                 'vllm:generation_tokens_total{engine="0",model_name="m"} 0.0',
                 'vllm:num_preemptions_total{engine="0",model_name="m"} 0.0',
                 'vllm:prefix_cache_queries_total{engine="0",model_name="m"} 0.0',
                 'vllm:prefix_cache_hits_total{engine="0",model_name="m"} 0.0',
                 'vllm:time_to_first_token_seconds_count{engine="0",model_name="m"} 0.0',
                 'vllm:inter_token_latency_seconds_count{engine="0",model_name="m"} 0.0',
                 'vllm:e2e_request_latency_seconds_count{engine="0",model_name="m"} 0.0',
                 'vllm:request_queue_time_seconds_count{engine="0",model_name="m"} 0.0',
                 'vllm:request_time_per_output_token_seconds_count{engine="0",model_name="m"} 0.0',
                 'vllm:request_prefill_time_seconds_count{engine="0",model_name="m"} 0.0',
                 'vllm:request_decode_time_seconds_count{engine="0",model_name="m"} 0.0',
                 'vllm:request_inference_time_seconds_count{engine="0",model_name="m"} 0.0',
                 'vllm:request_params_n_count{engine="0",model_name="m"} 0.0',
                 'vllm:request_max_num_generation_tokens_count{engine="0",model_name="m"} 0.0',
                 'vllm:iteration_tokens_total_count{engine="0",model_name="m"} 0.0'):
        assert line in text, line
    assert not any(ln.startswith("vllm:spec_decode") for ln in text.splitlines())
    assert "lora_requests_info" not in text  # only with --enable-lora
    m = ServerMetrics("m", prefix="vllm", max_loras=3)
    m.observe_stats(SchedulerStats(running_lora_adapters=["a", "b"], waiting_lora_adapters=["c"]))
    text = m.render().decode()
    assert 'vllm:lora_requests_info{max_lora="3",running_lora_adapters="",' in text
    assert ('vllm:lora_requests_info{max_lora="3",running_lora_adapters="a,b",'
            'waiting_lora_adapters="c"}') in text


def test_metrics_series_carry_vllms_engine_label(base) -> None:
    """vLLM v1 labels every per-engine series `model_name` and `engine` (the engine core's
    index: "0" for one engine), request_success's also `finished_reason`; the info series
    (cache_config_info) and the server-wide request_rejected are not per engine."""
    import re

    body = {"model": "tiny", "prompt": "hi", "max_tokens": 3, "ignore_eos": True}
    assert httpx.post(f"{base}/v1/completions", json=body, timeout=60).status_code == 200
    text = httpx.get(f"{base}/metrics").text
    samples = re.findall(r"^(vllm:\w+)\{([^}]*)\} \S+$", text, re.M)
    assert len({name for name, _ in samples}) > 40, samples
    for name, labels in samples:
        if name.startswith(("vllm:cache_config_info", "vllm:request_rejected")):
            assert "engine=" not in labels, (name, labels)
        else:
            # the exposition sorts the labels: engine, (finished_reason, le, ...) model_name
            assert labels.startswith('engine="0",') and 'model_name="./tiny"' in labels, (
                name, labels)
    assert re.search(r'^vllm:request_success_total\{engine="0",finished_reason="length",'
                     r'model_name="\./tiny"\} [1-9]', text, re.M)


def test_metrics_per_engine_series_of_data_parallel_replicas() -> None:
    """--data-parallel-size 2: both engines' series exist from the start; each engine's
    counters grow from its own stats, each request's series land under the engine given;
    lora_requests_info shows the whole server's adapters (the merged stats)."""
    from modelport.engine.messages import SchedulerStats
    from modelport.entrypoints.openai.metrics import ServerMetrics

    m = ServerMetrics("m", prefix="vllm", num_engines=2, max_loras=2)
    text = m.render().decode()
    for e in ("0", "1"):
        for line in (f'vllm:num_requests_running{{engine="{e}",model_name="m"}} 0.0',
                     f'vllm:prompt_tokens_total{{engine="{e}",model_name="m"}} 0.0',
                     f'vllm:generation_tokens_total{{engine="{e}",model_name="m"}} 0.0',
                     f'vllm:e2e_request_latency_seconds_count{{engine="{e}",model_name="m"}} 0.0',
                     f'vllm:request_success_total{{engine="{e}",finished_reason="stop",'
                     f'model_name="m"}} 0.0'):
            assert line in text, line
    merged = SchedulerStats(running_lora_adapters=["a", "b"])
    m.observe_stats(SchedulerStats(num_running=2, prefix_cache_queries=10, prefix_cache_hits=4,
                                   running_lora_adapters=["a"]), 0, merged)
    m.observe_stats(SchedulerStats(num_running=1, prefix_cache_queries=6, num_preemptions=1,
                                   running_lora_adapters=["b"]), 1, merged)
    m.observe_stats(SchedulerStats(num_running=1, prefix_cache_queries=16, prefix_cache_hits=4,
                                   running_lora_adapters=["a"]), 0, merged)
    m.observe_step_tokens(7, engine=1)
    m.observe_first_token(0.1, 0.01, engine=1)
    m.observe_tokens(3, None, engine=1)
    m.observe_finished("length", 0.5, 5, 3, 0.2, 0.1, engine=1)
    m.observe_request(1, 3, 3, engine=1)
    text = m.render().decode()
    for line in ('vllm:num_requests_running{engine="0",model_name="m"} 1.0',
                 'vllm:num_requests_running{engine="1",model_name="m"} 1.0',
                 'vllm:prefix_cache_queries_total{engine="0",model_name="m"} 16.0',
                 'vllm:prefix_cache_queries_total{engine="1",model_name="m"} 6.0',
                 'vllm:prefix_cache_hits_total{engine="0",model_name="m"} 4.0',
                 'vllm:num_preemptions_total{engine="0",model_name="m"} 0.0',
                 'vllm:num_preemptions_total{engine="1",model_name="m"} 1.0',
                 'vllm:prefix_cache_hit_rate{engine="0",model_name="m"} 0.25',
                 'vllm:iteration_tokens_total_count{engine="0",model_name="m"} 0.0',
                 'vllm:iteration_tokens_total_count{engine="1",model_name="m"} 1.0',
                 'vllm:prompt_tokens_total{engine="0",model_name="m"} 0.0',
                 'vllm:prompt_tokens_total{engine="1",model_name="m"} 5.0',
                 'vllm:generation_tokens_total{engine="0",model_name="m"} 0.0',
                 'vllm:generation_tokens_total{engine="1",model_name="m"} 3.0',
                 'vllm:time_to_first_token_seconds_count{engine="1",model_name="m"} 1.0',
                 'vllm:request_params_n_count{engine="1",model_name="m"} 1.0',
                 'vllm:request_params_n_count{engine="0",model_name="m"} 0.0',
                 'vllm:request_success_total{engine="1",finished_reason="length",'
                 'model_name="m"} 1.0',
                 'vllm:request_success_total{engine="0",finished_reason="length",'
                 'model_name="m"} 0.0',
                 'vllm:lora_requests_info{max_lora="2",running_lora_adapters="a,b",'
                 'waiting_lora_adapters=""}'):
        assert line in text, line
    assert 'running_lora_adapters="a",' not in text  # not one replica's view
    with pytest.raises(ValueError, match="num_engines must be >= 1"):
        ServerMetrics("m", num_engines=0)


def test_metrics_iteration_tokens_per_engine_step(base) -> None:
    """vLLM's iteration_tokens_total: one observation per engine step, of the tokens it ran
    (here: the prompt's prefill step, then one decode token a step)."""
    import re

    def series() -> dict[str, float]:
        text = httpx.get(f"{base}/metrics").text
        return {m[1] + (m[2] or ""): float(m[3]) for m in re.finditer(
            r'^vllm:iteration_tokens_total_(count|sum|bucket)\{engine="0",(le="1\.0",)?'
            r'model_name="[^"]*"\} (\S+)$', text, re.M)}

    before = series()
    body = {"model": "tiny", "prompt": "one two three four", "max_tokens": 6, "ignore_eos": True}
    r = httpx.post(f"{base}/v1/completions", json=body, timeout=60)
    assert r.status_code == 200, r.text
    prompt = r.json()["usage"]["prompt_tokens"]
    after = series()
    one = 'bucketle="1.0",'
    # 1 prefill step + 5 one-token decode steps (the prefill gives the first token)
    assert after["count"] - before["count"] == 6
    assert after["sum"] - before["sum"] == prompt + 5
    assert after[one] - before[one] == 5


def test_metrics_request_params_and_cache_config_info(base) -> None:
    """vLLM's request_params_n / request_params_max_tokens / request_max_num_generation_tokens
    of each finished request, and cache_config_info (the KV cache's settings as labels)."""
    import re

    def hist(stem: str) -> tuple[float, float]:
        text = httpx.get(f"{base}/metrics").text
        vals = [float(re.search(
            rf'^vllm:{stem}_{part}{{engine="0",model_name="./tiny"}} (\S+)$', text, re.M)[1])
            for part in ("count", "sum")]
        return vals[0], vals[1]

    before = {s: hist(s) for s in ("request_params_n", "request_params_max_tokens",
                                   "request_max_num_generation_tokens")}
    body = {"model": "tiny", "prompt": "hi", "max_tokens": 5, "n": 2, "ignore_eos": True}
    assert httpx.post(f"{base}/v1/completions", json=body, timeout=60).status_code == 200
    after = {s: hist(s) for s in before}
    assert after["request_params_n"] == (before["request_params_n"][0] + 1,
                                         before["request_params_n"][1] + 2)
    assert after["request_params_max_tokens"] == (before["request_params_max_tokens"][0] + 1,
                                                  before["request_params_max_tokens"][1] + 5)
    count, total = after["request_max_num_generation_tokens"]
    assert (count, total) == (before["request_max_num_generation_tokens"][0] + 1,
                              before["request_max_num_generation_tokens"][1] + 5)
    text = httpx.get(f"{base}/metrics").text
    (info,) = [ln for ln in text.splitlines() if ln.startswith("vllm:cache_config_info{")]
    assert 'block_size="' in info and 'enable_prefix_caching="' in info and info.endswith(" 1.0")
    assert re.search(r'num_gpu_blocks="\d+"', info), info
