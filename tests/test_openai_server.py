"""The OpenAI-compatible server end to end: `modelport serve` with the embedded default model on
CPU, on 127.0.0.1, driven by the real `openai` client and raw httpx (for SSE framing and
disconnects). One module-scoped server; generations stay short because CPU decode is slow.
"""

from __future__ import annotations

import asyncio
import json
import re
import subprocess
import sys
import time

import httpx
import openai
import pytest

from helpers.server_proc import start_server, stop_server

MAX_MODEL_LEN = 256
PROMPT = "The capital of France is"


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    log = tmp_path_factory.mktemp("srv") / "server.log"
    argv = ["-m", "modelport.entrypoints.cli", "serve", "--max-model-len", str(MAX_MODEL_LEN)]
    proc, base = start_server(argv, log)
    yield base, log
    stop_server(proc)
    assert proc.returncode is not None


@pytest.fixture(scope="module")
def base(server) -> str:
    return server[0]


@pytest.fixture(scope="module")
def client(base) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{base}/v1", api_key="unused", max_retries=0, timeout=120)


@pytest.fixture(scope="module")
def model(client) -> str:
    return client.models.list().data[0].id


def sse_events(base: str, path: str, body: dict) -> list[str]:
    """Raw `data:` payloads of one streamed response, in order."""
    events = []
    with httpx.stream("POST", f"{base}{path}", json=body, timeout=120) as r:
        assert r.status_code == 200, r.read()
        assert r.headers["content-type"].startswith("text/event-stream")
        for line in r.iter_lines():
            if line.startswith("data: "):
                events.append(line[6:])
            else:
                assert line == "", f"unexpected SSE line {line!r}"
    return events


def metric(base: str, name: str, labels: str = "") -> float:
    text = httpx.get(f"{base}/metrics").text
    pat = re.compile(rf"^{re.escape(name)}\{{([^}}]*)\}} (\S+)$", re.M)
    for found, value in pat.findall(text):
        if labels in found:
            return float(value)
    raise AssertionError(f"{name}{{{labels}}} not in /metrics")


# ---------------------------------------------------------------- basics


def test_startup_log_health_version_models(server, client, model) -> None:
    base, log = server
    assert httpx.get(f"{base}/health").status_code == 200
    assert httpx.get(f"{base}/version").json()["version"]
    cards = client.models.list().data
    assert cards[0].id == model and cards[0].max_model_len == MAX_MODEL_LEN
    assert client.models.retrieve(model).id == model
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("no-such-model")
    text = log.read_text()
    assert "loaded " in text and " on cpu" in text
    assert re.search(r"KV cache: \d+ blocks x \d+ tokens = \d+ tokens", text)
    assert "http://127.0.0.1:" in text


def test_completion_usage_is_exact(base, client, model) -> None:
    n_prompt = httpx.post(f"{base}/tokenize", json={"prompt": PROMPT}).json()["count"]
    r = client.completions.create(
        model=model, prompt=PROMPT, max_tokens=6, temperature=0, extra_body={"ignore_eos": True}
    )
    assert r.object == "text_completion" and len(r.choices) == 1
    assert r.choices[0].finish_reason == "length" and r.choices[0].text
    assert r.usage.prompt_tokens == n_prompt
    assert r.usage.completion_tokens == 6
    assert r.usage.total_tokens == n_prompt + 6


def test_stream_concatenates_to_non_stream_text(base, model) -> None:
    body = {"model": model, "prompt": PROMPT, "max_tokens": 8, "temperature": 0.9, "seed": 7}
    full = httpx.post(f"{base}/v1/completions", json=body, timeout=120).json()
    events = sse_events(base, "/v1/completions", {**body, "stream": True})
    assert events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    text = "".join(c["choices"][0]["text"] for c in chunks if c["choices"])
    assert text == full["choices"][0]["text"]
    reasons = [c["choices"][0]["finish_reason"] for c in chunks if c["choices"]]
    assert [r for r in reasons if r is not None] == [full["choices"][0]["finish_reason"]]
    assert reasons[-1] is not None


def run_all(base: str, *calls):
    """Run async calls (each takes an AsyncOpenAI client) concurrently: the engine batches them,
    so a test costs about one generation's wall time on a slow CPU."""

    async def main() -> list:
        async with openai.AsyncOpenAI(
            base_url=f"{base}/v1", api_key="x", max_retries=0, timeout=180
        ) as c:
            return await asyncio.gather(*(call(c) for call in calls))

    return asyncio.run(main())


def test_seed_reproducibility(base, model) -> None:
    def sample(seed: int):
        async def call(c):
            r = await c.completions.create(
                model=model, prompt=PROMPT, max_tokens=8, temperature=1.0, seed=seed
            )
            return r.choices[0].text

        return call

    a, b, c1, c2 = run_all(base, sample(1234), sample(1234), sample(1), sample(2))
    assert a == b
    assert len({a, c1, c2}) > 1, "different seeds should not all give the same text"


def test_n2_and_token_id_prompts(base, model) -> None:
    ids = httpx.post(f"{base}/tokenize", json={"prompt": PROMPT}).json()["tokens"]
    r, r2, r3, r4 = run_all(
        base,
        lambda c: c.completions.create(
            model=model, prompt=PROMPT, n=2, max_tokens=4, temperature=1.0, seed=3,
            extra_body={"ignore_eos": True},
        ),
        lambda c: c.completions.create(
            model=model, prompt=[ids, ids[:3]], max_tokens=3, temperature=0
        ),
        # a token-id prompt and its text give the same greedy continuation
        lambda c: c.completions.create(model=model, prompt=ids, max_tokens=5, temperature=0),
        lambda c: c.completions.create(model=model, prompt=PROMPT, max_tokens=5, temperature=0),
    )  # fmt: skip
    assert sorted(c.index for c in r.choices) == [0, 1]
    assert r.usage.completion_tokens == 8
    assert sorted(c.index for c in r2.choices) == [0, 1]
    assert r2.usage.prompt_tokens == len(ids) + 3
    assert r3.choices[0].text == r4.choices[0].text


def test_streamed_n2_sends_one_choice_a_chunk(base, model) -> None:
    """vLLM and OpenAI stream n > 1 as one choice per chunk (a client reading
    chunk.choices[0] must see every choice), and the texts equal the seeded answer."""
    seeded = {"model": model, "n": 2, "max_tokens": 5, "temperature": 1.0, "seed": 7,
              "ignore_eos": True}  # fmt: skip
    for path, body in (
        ("/v1/completions", {**seeded, "prompt": PROMPT}),
        ("/v1/chat/completions", {**seeded, "messages": [{"role": "user", "content": "Hi"}]}),
    ):
        whole = httpx.post(f"{base}{path}", json=body, timeout=120).json()["choices"]
        texts = {0: "", 1: ""}
        with httpx.stream("POST", f"{base}{path}", json={**body, "stream": True},
                          timeout=120) as r:  # fmt: skip
            for line in r.iter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                choices = json.loads(line[6:])["choices"]
                assert len(choices) == 1, line
                c = choices[0]
                texts[c["index"]] += c["text"] if "text" in c else c["delta"].get("content") or ""
        expect = {c["index"]: c.get("text", (c.get("message") or {}).get("content")) for c in whole}
        assert texts == expect


def test_stop_string_cuts_text_stream_and_not(base, client, model) -> None:
    free = (
        client.completions.create(
            model=model,
            prompt=PROMPT,
            max_tokens=12,
            temperature=0,
            extra_body={"ignore_eos": True},
        )
        .choices[0]
        .text
    )
    assert len(free) > 6
    stop = free[3:6]
    expect = free[: free.index(stop)]

    async def streamed(c) -> str:
        stream = await c.completions.create(
            model=model, prompt=PROMPT, max_tokens=12, temperature=0, stop=stop, stream=True,
            extra_body={"ignore_eos": True},
        )  # fmt: skip
        return "".join([ch.choices[0].text async for ch in stream if ch.choices])

    r, text = run_all(
        base,
        lambda c: c.completions.create(
            model=model, prompt=PROMPT, max_tokens=12, temperature=0, stop=[stop],
            extra_body={"ignore_eos": True},
        ),
        streamed,
    )  # fmt: skip
    assert r.choices[0].text == expect
    assert r.choices[0].finish_reason == "stop"
    assert r.choices[0].stop_reason == stop
    assert text == expect


def test_logprobs_and_echo(base, model) -> None:
    r, e = run_all(
        base,
        lambda c: c.completions.create(
            model=model, prompt=PROMPT, max_tokens=4, temperature=0, logprobs=2
        ),
        lambda c: c.completions.create(
            model=model, prompt=PROMPT, max_tokens=3, temperature=0, echo=True
        ),
    )
    lp = r.choices[0].logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == 4
    assert "".join(lp.tokens) == r.choices[0].text
    for chosen, top in zip(lp.token_logprobs, lp.top_logprobs, strict=True):
        assert chosen <= 0.0 and 1 <= len(top) <= 3
        assert max(top.values()) == pytest.approx(chosen, abs=1e-4)  # greedy picks the best
    assert e.choices[0].text.startswith(PROMPT) and len(e.choices[0].text) > len(PROMPT)


def test_echo_logprobs_list_each_prompt_token_among_its_top(client, model) -> None:
    """vLLM's echo with logprobs=k: every prompt token but the first has its own logprob in
    top_logprobs beside the k best (k + 1 entries, as for generated tokens); it was left out."""
    r = client.completions.create(
        model=model, prompt="Hello world of", max_tokens=1, temperature=0, echo=True, logprobs=1
    )
    lp = r.choices[0].logprobs
    assert lp.token_logprobs[0] is None and lp.top_logprobs[0] is None
    n_prompt = r.usage.prompt_tokens
    assert n_prompt >= 3
    for tok, chosen, top in zip(lp.tokens[1:], lp.token_logprobs[1:], lp.top_logprobs[1:],
                                strict=True):  # fmt: skip
        assert top[tok] == pytest.approx(chosen) and 1 <= len(top) <= 2


def test_chat_stream_and_not(base, model) -> None:
    # a prompt whose first 6 greedy tokens lead their runner-up by >= 1.8 nats: the three
    # requests are batched, and "Say hello." had a 0.005-nat near-tie that batching flipped
    messages = [{"role": "user", "content": "What color is the sky on a clear day?"}]

    async def streamed(c):
        stream = await c.chat.completions.create(
            model=model, messages=messages, max_tokens=6, temperature=0, stream=True,
            stream_options={"include_usage": True},
        )  # fmt: skip
        parts, finish, usage, roles = [], [], None, []
        async for chunk in stream:
            if chunk.usage:
                usage = chunk.usage
            for ch in chunk.choices:
                parts.append(ch.delta.content or "")
                roles += [ch.delta.role] if ch.delta.role else []
                if ch.finish_reason:
                    finish.append(ch.finish_reason)
        return "".join(parts), finish, usage, roles

    r, (text, finish, usage, roles), lp = run_all(
        base,
        lambda c: c.chat.completions.create(
            model=model, messages=messages, max_tokens=6, temperature=0
        ),
        streamed,
        lambda c: c.chat.completions.create(
            model=model, messages=messages, max_tokens=3, temperature=0, logprobs=True,
            top_logprobs=2,
        ),
    )  # fmt: skip
    assert r.choices[0].message.role == "assistant" and r.choices[0].message.content
    assert r.usage.completion_tokens <= 6 and r.usage.prompt_tokens > 3
    assert text == r.choices[0].message.content
    assert finish == [r.choices[0].finish_reason] and roles == ["assistant"]
    assert usage.completion_tokens == r.usage.completion_tokens
    content = lp.choices[0].logprobs.content
    assert 1 <= len(content) <= 3 and all(len(t.top_logprobs) == 2 for t in content)
    assert content[0].logprob == pytest.approx(content[0].top_logprobs[0].logprob, abs=1e-4)


def test_tokenize_detokenize_roundtrip(base) -> None:
    t = httpx.post(f"{base}/tokenize", json={"prompt": PROMPT, "add_special_tokens": False}).json()
    assert t["count"] == len(t["tokens"]) and t["max_model_len"] == MAX_MODEL_LEN
    d = httpx.post(f"{base}/detokenize", json={"tokens": t["tokens"]}).json()
    assert d["prompt"] == PROMPT


# ---------------------------------------------------------------- errors


def _assert_error(r: httpx.Response, status: int) -> dict:
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) >= {"message", "type", "param", "code"} and err["message"]
    return err


def test_errors_have_openai_shape_and_server_keeps_serving(base, client, model) -> None:
    url = f"{base}/v1/completions"
    _assert_error(httpx.post(url, json={"prompt": "x", "temperature": -1}), 400)
    _assert_error(httpx.post(url, json={"prompt": "x", "n": 0}), 400)
    _assert_error(
        httpx.post(url, content=b"{not json", headers={"content-type": "application/json"}), 400
    )
    _assert_error(httpx.post(url, json={"prompt": [10**9]}), 400)
    _assert_error(httpx.post(url, json={"prompt": "x", "stop": 5}), 400)
    for stop in ("", ["done", ""]):  # vLLM refuses an empty stop string (it matches at once)
        err = _assert_error(httpx.post(url, json={"prompt": "x", "stop": stop}), 400)
        assert err["message"] == "stop cannot contain an empty string."
    err = _assert_error(
        httpx.post(url, json={"prompt": "x", "stream_options": {"include_usage": True}}), 400
    )
    assert err["param"] == "stream_options"
    err = _assert_error(httpx.post(url, json={"prompt": "x", "logit_bias": {"five": 1.0}}), 400)
    assert err["param"] == "logit_bias"
    err = _assert_error(
        httpx.post(url, json={"prompt": "x", "max_tokens": 2, "min_tokens": 3}), 400
    )
    assert "min_tokens" in err["message"]
    err = _assert_error(httpx.post(url, json={"model": "nope", "prompt": "x"}), 404)
    assert err["code"] == "model_not_found"
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="nope", messages=[{"role": "user", "content": "x"}])
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(model=model, messages=[], max_tokens=2)
    _assert_error(httpx.get(f"{base}/v1/nothing-here"), 404)
    # still serving
    ok = client.completions.create(model=model, prompt=PROMPT, max_tokens=2, temperature=0)
    assert ok.choices[0].text


def test_context_length_message_names_both_numbers(base) -> None:
    n_prompt = httpx.post(f"{base}/tokenize", json={"prompt": PROMPT}).json()["count"]
    body = {"prompt": PROMPT, "max_tokens": MAX_MODEL_LEN}
    err = _assert_error(httpx.post(f"{base}/v1/completions", json=body), 400)
    # vLLM's words: the request's max_tokens, max_model_len and the prompt's tokens
    assert f"is too large: {MAX_MODEL_LEN}." in err["message"]
    assert f"({MAX_MODEL_LEN} > {MAX_MODEL_LEN} - {n_prompt})" in err["message"]


# ---------------------------------------------------------------- load


def test_64_concurrent_streams_complete_with_correct_usage(base, model) -> None:
    async def one(c: openai.AsyncOpenAI, i: int) -> tuple[str, int, int]:
        stream = await c.completions.create(
            model=model, prompt=f"{PROMPT} {i}", max_tokens=3, temperature=0.5, seed=i,
            stream=True, stream_options={"include_usage": True}, extra_body={"ignore_eos": True},
        )  # fmt: skip
        text, usage, finishes = "", None, 0
        async for chunk in stream:
            if chunk.usage:
                usage = chunk.usage
            for ch in chunk.choices:
                text += ch.text
                finishes += ch.finish_reason is not None
        assert finishes == 1
        return text, usage.completion_tokens, usage.prompt_tokens

    async def main() -> list:
        async with openai.AsyncOpenAI(
            base_url=f"{base}/v1", api_key="x", max_retries=0, timeout=180
        ) as c:
            return await asyncio.gather(*(one(c, i) for i in range(64)))

    results = asyncio.run(main())
    assert len(results) == 64
    assert all(n == 3 for _, n, _ in results)
    for i, (_, _, n_prompt) in enumerate(results[:3]):
        want = httpx.post(f"{base}/tokenize", json={"prompt": f"{PROMPT} {i}"}).json()["count"]
        assert n_prompt == want


def test_disconnected_stream_is_aborted(base, model) -> None:
    before = metric(base, "modelport:request_success_total", 'finished_reason="abort"')
    body = {"model": model, "prompt": PROMPT, "max_tokens": 200, "ignore_eos": True, "stream": True}
    with httpx.stream("POST", f"{base}/v1/completions", json=body, timeout=60) as r:
        got = 0
        for line in r.iter_lines():
            got += line.startswith("data: ")
            if got >= 2:
                break
    assert metric(base, "modelport:num_requests_running") >= 0
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline:
        if (
            metric(base, "modelport:request_success_total", 'finished_reason="abort"') > before
            and metric(base, "modelport:num_requests_running") == 0
            and metric(base, "modelport:kv_cache_usage_perc") == 0
        ):
            break
        time.sleep(0.1)
    else:
        raise AssertionError("the disconnected request was not aborted")
    # and a non-streaming request whose client times out is aborted too
    before = metric(base, "modelport:request_success_total", 'finished_reason="abort"')
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(f"{base}/v1/completions", json={**body, "stream": False}, timeout=1.5)
    deadline = time.monotonic() + 15
    while metric(base, "modelport:request_success_total", 'finished_reason="abort"') <= before:
        assert time.monotonic() < deadline, "the dropped non-streaming request was not aborted"
        time.sleep(0.1)
    while metric(base, "modelport:num_requests_running") != 0:
        assert time.monotonic() < deadline
        time.sleep(0.1)


def test_metrics_exposed(base) -> None:
    text = httpx.get(f"{base}/metrics").text
    for name in (
        "modelport:time_to_first_token_seconds_bucket",
        "modelport:inter_token_latency_seconds_bucket",
        "modelport:e2e_request_latency_seconds_bucket",
        "modelport:request_queue_time_seconds_bucket",
        "modelport:num_requests_running",
        "modelport:num_requests_waiting",
        "modelport:kv_cache_usage_perc",
        "modelport:prefix_cache_hit_rate",
        "modelport:num_preemptions_total",
        "modelport:prompt_tokens_total",
        "modelport:generation_tokens_total",
    ):
        assert name in text, name
    assert metric(base, "modelport:request_success_total", 'finished_reason="length"') > 0
    assert metric(base, "modelport:generation_tokens_total") > 0
    assert metric(base, "modelport:time_to_first_token_seconds_count") > 0


def _bench(base: str, *extra: str) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "modelport.entrypoints.cli", "bench", "serve", "--base-url", base,
           *extra]  # fmt: skip
    return subprocess.run(cmd, capture_output=True, text=True, timeout=180)


def test_bench_serve_reports_throughput_and_latencies(base, model) -> None:
    r = _bench(base, "--num-prompts", "4", "--input-len", "8", "--output-len", "3",
               "--request-rate", "50", "--max-concurrency", "4", "--ignore-eos")
    assert r.returncode == 0, r.stdout + r.stderr
    result = json.loads(r.stdout)
    assert result["model"] == model and result["completed"] == 4 and result["failed"] == 0
    assert result["total_input_tokens"] == 32 and result["total_output_tokens"] == 12
    assert result["request_throughput"] > 0 and result["output_throughput"] > 0
    assert 0 < result["median_ttft_ms"] <= result["p99_ttft_ms"]
    assert result["mean_tpot_ms"] > 0 and result["mean_itl_ms"] > 0 and result["std_e2el_ms"] >= 0
    assert result["num_warmups"] == 1 and "ttfts" not in result


def test_bench_serve_takes_vllm_bench_serve_flags(base, model, tmp_path) -> None:
    """A `vllm bench serve` command line: random dataset flags, percentiles, goodput, metadata,
    --save-result into --result-dir / --result-filename, --save-detailed's per-request lists."""
    host, port = base.removeprefix("http://").split(":")
    r = _bench("", "--host", host, "--port", port, "--backend", "vllm",
               "--endpoint", "/v1/completions", "--dataset-name", "random",
               "--random-input-len", "6", "--random-output-len", "2", "--random-range-ratio", "0.5",
               "--random-prefix-len", "3", "--num-prompts", "3", "--num-warmups", "0",
               "--ignore-eos", "--percentile-metrics", "ttft,e2el", "--metric-percentiles", "50,90",
               "--goodput", "ttft:100000", "e2el:0.001", "--metadata", "run=a", "x=1",
               "--save-result", "--save-detailed", "--result-dir", str(tmp_path / "res"),
               "--result-filename", "out.json", "--disable-tqdm")
    assert r.returncode == 0, r.stdout + r.stderr
    result = json.loads(r.stdout)
    assert json.loads((tmp_path / "res" / "out.json").read_text()) == result
    assert result["completed"] == 3 and result["backend"] == "vllm" and result["run"] == "a"
    assert {"p50_ttft_ms", "p90_ttft_ms", "p50_e2el_ms", "std_ttft_ms"} <= set(result)
    assert not any(k.endswith("_itl_ms") or k.endswith("_tpot_ms") for k in result)
    # every request meets a huge TTFT limit, none a 1-microsecond end-to-end one
    assert result["request_goodput"] == 0.0
    # prompts: 3 shared prefix tokens + 3..9 of their own; outputs 1..3 (exact: ignore_eos)
    assert all(6 <= n <= 12 for n in result["input_lens"]), result["input_lens"]
    assert all(1 <= n <= 3 for n in result["output_lens"])
    assert result["output_lens"] == [len(i) + 1 for i in result["itls"]]
    assert all(0 < t for t in result["ttfts"]) and result["errors"] == ["", "", ""]
    assert result["start_times"] == sorted(result["start_times"])
    assert all(isinstance(t, str) for t in result["generated_texts"])


def test_bench_serve_chat_backend_and_sharegpt(base, model, tmp_path) -> None:
    # random token ids become text through the server's /detokenize for the chat endpoint
    r = _bench(base, "--backend", "openai-chat", "--num-prompts", "2", "--input-len", "5",
               "--output-len", "2", "--ignore-eos", "--num-warmups", "0")
    assert r.returncode == 0, r.stdout + r.stderr
    result = json.loads(r.stdout)
    assert result["completed"] == 2 and result["total_output_tokens"] == 4
    assert result["mean_ttft_ms"] > 0
    # vLLM's ShareGPT JSON: the first turn is the prompt, the second's length the output's
    data = [{"conversations": [{"from": "human", "value": "Tell me about the sea and its tides."},
                               {"from": "gpt", "value": "The sea rises and falls twice a day."}]},
            {"conversations": [{"from": "human", "value": "hi"}]},  # one turn: skipped
            {"conversations": [{"from": "human", "value": "Name three colours of the sky."},
                               {"from": "gpt", "value": "Blue, grey and orange at dusk."}]}]
    path = tmp_path / "sharegpt.json"
    path.write_text(json.dumps(data))
    r = _bench(base, "--dataset-name", "sharegpt", "--dataset-path", str(path),
               "--num-prompts", "4", "--num-warmups", "0", "--ignore-eos", "--save-detailed")
    assert r.returncode == 0, r.stdout + r.stderr
    result = json.loads(r.stdout)
    assert result["completed"] == 4  # two conversations, oversampled to four prompts: a b a b
    lens = result["output_lens"]
    assert lens[:2] == lens[2:] and result["input_lens"][:2] == result["input_lens"][2:]
    counts = {httpx.post(f"{base}/tokenize", json={"prompt": t["conversations"][1]["value"],
                                                    "add_special_tokens": False}).json()["count"]
              for t in (data[0], data[2])}
    assert set(result["output_lens"]) == counts
    r = _bench(base, "--dataset-name", "sharegpt", "--num-prompts", "1")
    assert r.returncode == 1 and "needs --dataset-path" in r.stderr


def test_bench_serve_stops_when_the_warmup_fails(base, model, capsys) -> None:
    # a prompt longer than the server's max_model_len: the warm-up's 400 ends the run at once
    r = _bench(base, "--num-prompts", "50", "--input-len", "100000", "--output-len", "2")
    assert r.returncode == 1 and r.stdout == ""
    assert "1 of 1 warm-up requests failed: HTTP 400" in r.stderr
    # the refused options and an absent server: `modelport bench serve`'s main in this process
    # (a child imports torch for each, 3 s of CPU; the child's exit status is main's return)
    from modelport.entrypoints import cli

    for bad, why in ((["--percentile-metrics", "ttft,foo"], "unknown foo"),
                     (["--metric-percentiles", "0"], "must lie in (0, 100]"),
                     (["--goodput", "itl:5"], "expected ttft:MS"),
                     (["--burstiness", "0"], "--burstiness must be > 0"),
                     (["--base-url", "http://127.0.0.1:9", "--ready-check-timeout-sec", "1"],
                      "was not ready within 1 s")):
        rc = cli.main(["bench", "serve", "--base-url", base, *bad])
        err = capsys.readouterr().err
        assert rc == 1 and why in err, err


def test_chat_stream_chunks_name_the_role_once(base, model) -> None:
    body = {"model": model, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 4,
            "temperature": 0, "stream": True}
    with httpx.stream("POST", f"{base}/v1/chat/completions", json=body, timeout=120) as r:
        chunks = [json.loads(line[6:]) for line in r.iter_lines()
                  if line.startswith("data: ") and line != "data: [DONE]"]
    deltas = [c["choices"][0]["delta"] for c in chunks if c["choices"]]
    assert deltas[0].get("role") == "assistant"
    assert all("role" not in d for d in deltas[1:])  # never "role": null


@pytest.mark.parametrize("entry", [["modelport.entrypoints.cli", "serve"],
                                   ["modelport.entrypoints.openai.api_server"]])
def test_a_model_that_fails_to_load_ends_serve_with_status_1(tmp_path, entry) -> None:
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama"}))
    cmd = [sys.executable, "-m", *entry, "--model", str(tmp_path), "--device", "cpu",
           "--port", "8093"]  # fmt: skip
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert r.returncode == 1, r.stdout + r.stderr
    assert "failed to load the model: ValueError: config.json has no 'architectures'" in r.stderr


@pytest.mark.parametrize("entry", [["modelport.entrypoints.cli", "serve"],
                                   ["modelport.entrypoints.openai.api_server"]])
def test_a_model_that_is_not_there_ends_serve_before_it_listens(tmp_path, entry) -> None:
    cmd = [sys.executable, "-m", *entry, "--model", str(tmp_path / "nope"), "--port", "8094"]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert r.returncode == 1, r.stdout + r.stderr
    assert "modelport serve: model " in r.stderr and "nope' not found" in r.stderr
    assert "Uvicorn running" not in r.stderr and "Traceback" not in r.stderr


def test_lone_surrogate_text_is_a_400_naming_the_field(base, model) -> None:
    # "\udcff" is valid JSON but not Unicode text: no tokenizer takes it (it was a 500)
    cases = {
        "/v1/chat/completions": ('{"model": "%s", "max_tokens": 2, "messages": '
                                 '[{"role": "user", "content": "hi \\udcff"}]}', "messages.0.content"),
        "/v1/completions": ('{"model": "%s", "max_tokens": 2, "prompt": ["ok", "\\ud800"]}',
                            "prompt.1"),
        "/tokenize": ('{"model": "%s", "prompt": "\\udfff"}', "prompt"),
    }
    for path, (raw, where) in cases.items():
        r = httpx.post(base + path, content=(raw % model).encode(),
                       headers={"content-type": "application/json"}, timeout=60)
        assert r.status_code == 400, (path, r.text)
        err = r.json()["error"]
        assert where in err["message"] and "surrogate" in err["message"], err
    # a surrogate pair (an emoji) is fine, and the server still answers
    emoji = '{"model": "MODEL", "max_tokens": 2, "messages": [{"role": "user", "content": ' \
        '"\\ud83d\\ude00"}]}'
    ok = httpx.post(base + "/v1/chat/completions", timeout=120,
                    content=emoji.replace("MODEL", model).encode(),
                    headers={"content-type": "application/json"})
    assert ok.status_code == 200, ok.text


def test_long_prompt_encoded_off_the_loop_counts_as_the_tokenizer_does(base, model) -> None:
    """A prompt long enough for the tokenizer thread (AsyncLLM.encode_async), over the
    context limit: refused with the exact token count /tokenize gives (on the loop)."""
    text = "A long day of testing, one line after another. " * 200  # ~9,600 characters
    msgs = [{"role": "user", "content": text}]
    for path, body, tok in (
        ("/v1/completions", {"prompt": text}, {"prompt": text}),
        ("/v1/chat/completions", {"messages": msgs}, {"messages": msgs}),
    ):
        count = httpx.post(f"{base}/tokenize", json={"model": model, **tok},
                           timeout=60).json()["count"]
        assert count > MAX_MODEL_LEN
        r = httpx.post(f"{base}{path}", json={"model": model, "max_tokens": 1, **body},
                       timeout=60)
        assert r.status_code == 400, r.text
        assert f"your request has {count} input tokens" in r.json()["error"]["message"]
    ok = httpx.post(f"{base}/v1/completions", json={"model": model, "prompt": PROMPT,
                                                     "max_tokens": 2}, timeout=60)
    assert ok.status_code == 200  # and the server goes on serving


def test_sagemaker_ping_and_invocations(base, model) -> None:
    """vLLM's SageMaker paths: /ping answers as /health (GET and POST); /invocations runs
    the API the body is (chat, completions; streaming too), else a 400 naming the APIs."""
    assert httpx.get(f"{base}/ping").status_code == 200
    assert httpx.post(f"{base}/ping").status_code == 200
    chat = {"model": model, "messages": [{"role": "user", "content": "Hi"}],
            "max_tokens": 5, "temperature": 0}
    want = httpx.post(f"{base}/v1/chat/completions", json=chat, timeout=120).json()
    got = httpx.post(f"{base}/invocations", json=chat, timeout=120)
    assert got.status_code == 200, got.text
    assert got.json()["object"] == "chat.completion"
    assert got.json()["choices"][0]["message"] == want["choices"][0]["message"]
    comp = {"model": model, "prompt": PROMPT, "max_tokens": 5, "temperature": 0}
    got = httpx.post(f"{base}/invocations", json=comp, timeout=120).json()
    assert got["object"] == "text_completion"
    want = httpx.post(f"{base}/v1/completions", json=comp, timeout=120).json()
    assert got["choices"][0]["text"] == want["choices"][0]["text"]
    events = sse_events(base, "/invocations", {**chat, "stream": True})
    assert events[-1] == "[DONE]"
    text = "".join(json.loads(e)["choices"][0]["delta"].get("content") or ""
                   for e in events[:-1] if json.loads(e)["choices"])
    assert text == want_chat_text(base, chat)
    r = httpx.post(f"{base}/invocations", json={"input": "embed me"}, timeout=60)
    assert r.status_code == 400
    assert r.json()["error"]["message"] == (
        "Cannot find suitable handler for request. Expected one of: ChatCompletionRequest, "
        "CompletionRequest")
    r = httpx.post(f"{base}/invocations", content=b"{nope", timeout=60)
    assert r.status_code == 400 and "not valid JSON" in r.json()["error"]["message"]


def want_chat_text(base: str, chat: dict) -> str:
    r = httpx.post(f"{base}/v1/chat/completions", json=chat, timeout=120)
    return r.json()["choices"][0]["message"]["content"]
