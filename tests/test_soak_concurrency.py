"""A concurrency and cancellation soak on the OpenAI server: a fixed-seed random mix of ~50
requests fired at once (chat and completions, streamed or not, n=2, greedy and seeded
sampling, json_schema, stop strings, logprobs, max_tokens 1, clients that hang up
mid-stream, 400s, Anthropic /v1/messages, /tokenize) must leave the server serving everyone
else: every request that stays connected gets exactly one complete, well-formed answer;
greedy answers equal the same request run alone; seeded answers repeat when re-sent alone;
afterwards nothing runs or waits, the KV cache is back to its idle usage and every hang-up
was aborted exactly once.

No wall-clock assertions: the only clocks are generous hang guards.
"""

from __future__ import annotations

import asyncio
import json
import random
import re
import time

import httpx
import pytest

from helpers.server_proc import serving

CHAT = "/v1/chat/completions"
COMP = "/v1/completions"
MSGS = "/v1/messages"
PROMPTS = ["The capital of France is", "Once upon a time", "def add(a, b):"]
QUESTIONS = [[{"role": "user", "content": "What is the capital of France?"}],
             [{"role": "user", "content": "Name three colors."}]]
SCHEMA = {"type": "object", "properties": {"name": {"type": "string", "maxLength": 8},
                                           "age": {"type": "integer"}},
          "required": ["name", "age"]}
JSON_FORMAT = {"type": "json_schema", "json_schema": {"name": "person", "schema": SCHEMA}}
N_REQUESTS = 52
HANG_GUARD_S = 300


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    pytest.importorskip("xgrammar")  # response_format json_schema
    log = tmp_path_factory.mktemp("soak") / "server.log"
    argv = ["-m", "modelport.entrypoints.cli", "serve", "--max-model-len", "256"]
    with serving(argv, log) as url:
        yield url


def metric(base: str, name: str, labels: str = "") -> float:
    text = httpx.get(f"{base}/metrics", timeout=30).text
    pat = re.compile(rf"^{re.escape(name)}\{{([^}}]*)\}} (\S+)$", re.M)
    for found, value in pat.findall(text):
        if labels in found:
            return float(value)
    raise AssertionError(f"{name}{{{labels}}} not in /metrics")


def finished_counts(base: str) -> dict[str, float]:
    """request_success_total by finished_reason (one count per sample of an n>1 request)."""
    return {r: metric(base, "modelport:request_success_total", f'finished_reason="{r}"')
            for r in ("stop", "length", "abort")}


# ---------------------------------------------------------------- the mix


def _sampling(rng: random.Random) -> dict:
    if rng.random() < 0.5:
        return {"temperature": 0}
    return {"temperature": 0.9, "top_p": 0.95, "seed": rng.randrange(1000)}


def _openai_body(rng: random.Random, path: str) -> dict:
    body = {"max_tokens": rng.choice([1, 4, 8]), **_sampling(rng)}
    if path == COMP:
        body["prompt"] = rng.choice(PROMPTS)
    else:
        body["messages"] = rng.choice(QUESTIONS)
    if rng.random() < 0.3:
        body["n"] = 2
    if rng.random() < 0.25:
        body["stop"] = [" ", "\n"]
    if rng.random() < 0.3:
        body.update({"logprobs": 2} if path == COMP else {"logprobs": True, "top_logprobs": 2})
    if path == CHAT and rng.random() < 0.35:
        body.update(response_format=JSON_FORMAT, max_tokens=12)
        body.pop("stop", None)  # a stop string could cut the JSON short
    if rng.random() < 0.5:
        body.update(stream=True, stream_options={"include_usage": True})
    return body


BAD = [  # (path, body, param): each must be a 400 with OpenAI's error object
    (COMP, {"prompt": "Hi", "max_tokens": -1}, "max_tokens"),
    (CHAT, {"messages": [], "max_tokens": 1}, "messages"),
    (COMP, {"prompt": "Hi", "max_tokens": 1, "temperature": -1}, "temperature"),
    (CHAT, {"messages": QUESTIONS[0], "max_tokens": 1, "n": 0}, "n"),
    (COMP, {"prompt": "word " * 400, "max_tokens": 1}, None),
    (CHAT, {"messages": QUESTIONS[0], "max_tokens": 1, "response_format": {
        "type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "foo"}}}},
     "response_format"),
]


def build_mix(seed: int = 0) -> list[tuple[str, str, dict]]:
    """(kind, path, body) in firing order; kinds: ok, hangup, bad, messages, tokenize. Each
    kind has a fixed share so every seed covers them all; the bodies and order are random."""
    rng = random.Random(seed)
    mix: list[tuple[str, str, dict]] = [("bad", path, body) for path, body, _ in BAD]
    for _ in range(6):  # long enough that the hang-up always comes first
        path = rng.choice([COMP, CHAT])
        body = _openai_body(rng, path)
        body.update(stream=True, max_tokens=200, ignore_eos=True, stop=None)
        body.pop("response_format", None)
        mix.append(("hangup", path, body))
    for i in range(6):
        body = {"max_tokens": rng.choice([1, 6]), "messages": rng.choice(QUESTIONS),
                **_sampling(rng), "stream": i % 2 == 0}
        body.pop("seed", None)  # Anthropic's API has no seed: sampled ones can't repeat
        mix.append(("messages", MSGS, body))
    mix += [("tokenize", "/tokenize", {"prompt": rng.choice(PROMPTS)}) for _ in range(3)]
    while len(mix) < N_REQUESTS:
        path = rng.choice([COMP, CHAT])
        mix.append(("ok", path, _openai_body(rng, path)))
    rng.shuffle(mix)
    return mix


def greedy_key(path: str, body: dict) -> str | None:
    """Requests that must give the same text as one greedy non-streamed n=1 run alone."""
    if body.get("temperature") != 0:
        return None
    keep = {k: body.get(k) for k in ("prompt", "messages", "max_tokens", "stop",
                                     "response_format")}
    return json.dumps([path, keep])  # not sort_keys: a schema's property order is its grammar's


def alone_body(path: str, body: dict) -> dict:
    """The greedy, non-streamed, n=1 request that `body` must agree with."""
    one = {k: v for k, v in json.loads(greedy_key(path, body))[1].items() if v is not None}
    return {**one, "model": body["model"], "temperature": 0}


# ---------------------------------------------------------------- one request


async def _sse(c: httpx.AsyncClient, path: str, body: dict, hangup: bool = False) -> list:
    """The `data:` payloads of a stream (JSON-decoded, "[DONE]" kept as a string); with
    hangup, the connection is closed after the second payload."""
    out: list = []
    async with c.stream("POST", path, json=body) as r:
        assert r.status_code == 200, await r.aread()
        assert r.headers["content-type"].startswith("text/event-stream")
        async for line in r.aiter_lines():
            if line.startswith("data: "):
                data = line[6:]
                out.append(data if data == "[DONE]" else json.loads(data))
                if hangup and len(out) >= 2:
                    break
    return out


async def fire(c: httpx.AsyncClient, kind: str, path: str, body: dict):
    if kind == "hangup":
        return await _sse(c, path, body, hangup=True)
    if kind == "messages" and body["stream"]:
        events = []
        async with c.stream("POST", path, json=body) as r:
            assert r.status_code == 200, await r.aread()
            name = None
            async for line in r.aiter_lines():
                if line.startswith("event: "):
                    name = line[7:]
                elif line.startswith("data: "):
                    events.append((name, json.loads(line[6:])))
        return events
    if body.get("stream"):
        return await _sse(c, path, body)
    r = await c.post(path, json=body)
    return r.status_code, r.json()


# ---------------------------------------------------------------- answer checks


def _token_count(path: str, choice: dict) -> int | None:
    lp = choice.get("logprobs")
    if not lp:
        return None
    return len(lp["tokens"]) if path == COMP else len(lp["content"])


def check_choices(path: str, body: dict, choices: list[dict], usage: dict,
                  prompt_tokens: int) -> list[str]:
    """Choices well formed and usage consistent; returns the texts by index."""
    n, max_tokens = body.get("n", 1), body["max_tokens"]
    assert sorted(ch["index"] for ch in choices) == list(range(n)), choices
    assert usage["prompt_tokens"] == prompt_tokens, (body, usage)
    assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"]
    done = usage["completion_tokens"]
    reasons = [ch["finish_reason"] for ch in choices]
    assert all(f in ("stop", "length") for f in reasons), reasons
    if all(f == "length" for f in reasons) or max_tokens == 1:
        assert done == n * max_tokens, (body, usage, choices)
    assert n <= done <= n * max_tokens, (body, usage)
    counts = [_token_count(path, ch) for ch in choices]
    if body.get("logprobs") and not body.get("stop"):
        assert sum(counts) == done, (body, usage, counts)
    texts = [None] * n
    for ch in choices:
        texts[ch["index"]] = ch["text"] if path == COMP else ch["message"]["content"]
        if body.get("response_format") and ch["finish_reason"] == "stop":
            assert set(json.loads(texts[ch["index"]])) == {"name", "age"}
    return texts


def merge_stream(path: str, body: dict, events: list) -> tuple[list[dict], dict]:
    """A stream's chunks as (choices, usage) of the equivalent non-streamed answer, checking
    [DONE] comes once and last, one usage chunk, one finish_reason per choice."""
    assert events.count("[DONE]") == 1 and events[-1] == "[DONE]", events[-3:]
    chunks = events[:-1]
    usage = [ch["usage"] for ch in chunks if ch.get("usage")]
    assert len(usage) == 1 and chunks[-1]["usage"] and chunks[-1]["choices"] == [], chunks[-2:]
    assert len({ch["id"] for ch in chunks}) == 1
    merged: dict[int, dict] = {}
    for chunk in chunks[:-1]:
        for ch in chunk["choices"]:
            m = merged.setdefault(ch["index"], {"index": ch["index"], "text": "",
                                                "finish_reason": None, "logprobs": None})
            assert m["finish_reason"] is None, f"content after finish_reason: {chunk}"
            piece = ch["text"] if path == COMP else (ch["delta"].get("content") or "")
            m["text"] += piece
            m["finish_reason"] = ch["finish_reason"]
            if ch.get("logprobs"):
                lp = ch["logprobs"]
                key = "tokens" if path == COMP else "content"
                m["logprobs"] = m["logprobs"] or {key: []}
                m["logprobs"][key] += lp[key] or []
    choices = list(merged.values())
    assert all(m["finish_reason"] is not None for m in choices), choices
    if path == CHAT:
        choices = [{**m, "message": {"content": m["text"]}} for m in choices]
    return choices, usage[0]


def check_messages(body: dict, answer, prompt_tokens: int) -> str:
    if body["stream"]:
        names = [n for n, _ in answer]
        assert names.count("message_stop") == 1 and names[-1] == "message_stop", names
        assert names[:3] == ["message_start", "ping", "content_block_start"], names
        assert names[-3:-1] == ["content_block_stop", "message_delta"], names
        assert all(d["type"] == n for n, d in answer)
        assert answer[0][1]["message"]["usage"]["input_tokens"] == prompt_tokens
        final = answer[-2][1]
        assert final["delta"]["stop_reason"] in ("end_turn", "max_tokens")
        out = final["usage"]["output_tokens"]
        text = "".join(d["delta"]["text"] for n, d in answer if n == "content_block_delta")
        reason = final["delta"]["stop_reason"]
    else:
        status, msg = answer
        assert status == 200, msg
        assert msg["type"] == "message" and msg["stop_reason"] in ("end_turn", "max_tokens")
        assert msg["usage"]["input_tokens"] == prompt_tokens
        out, reason = msg["usage"]["output_tokens"], msg["stop_reason"]
        (block,) = msg["content"]
        text = block["text"]
    assert 1 <= out <= body["max_tokens"]
    assert (reason == "max_tokens") == (out == body["max_tokens"]) or body["max_tokens"] == 1
    return text


# ---------------------------------------------------------------- the soak


def test_soak_mixed_concurrent_load(base) -> None:
    model = httpx.get(f"{base}/v1/models").json()["data"][0]["id"]
    mix = build_mix()
    kinds = [k for k, _, _ in mix]
    assert {"ok", "hangup", "bad", "messages", "tokenize"} <= set(kinds), kinds
    for _, path, body in mix:
        if path != "/tokenize":
            body["model"] = model

    prompt_tokens: dict[str, int] = {}
    for p in PROMPTS:
        prompt_tokens[json.dumps(p)] = httpx.post(f"{base}/tokenize", json={"prompt": p}).json()["count"]
    for q in QUESTIONS:
        prompt_tokens[json.dumps(q)] = httpx.post(f"{base}/tokenize", json={"messages": q}).json()["count"]

    def n_prompt(body: dict) -> int:
        return prompt_tokens[json.dumps(body.get("prompt", body.get("messages")))]

    # greedy answers, each run alone first
    alone: dict[str, str] = {}
    for kind, path, body in mix:
        key = greedy_key(path, body) if kind in ("ok", "messages") else None
        if key is not None and key not in alone:
            one = alone_body(path, body)
            if path == MSGS:
                (block,) = httpx.post(f"{base}{path}", json=one, timeout=120).json()["content"]
                alone[key] = block["text"]
                continue
            ch = httpx.post(f"{base}{path}", json=one, timeout=120).json()["choices"][0]
            alone[key] = ch["text"] if path == COMP else ch["message"]["content"]
    idle_kv = metric(base, "modelport:kv_cache_usage_perc")
    finished = finished_counts(base)

    async def soak() -> list:
        limits = httpx.Limits(max_connections=None, max_keepalive_connections=None)
        async with httpx.AsyncClient(base_url=base, timeout=HANG_GUARD_S, limits=limits) as c:
            return await asyncio.gather(*(fire(c, *m) for m in mix))

    answers = asyncio.run(soak())

    seeded, ids = [], []
    for (kind, path, body), answer in zip(mix, answers, strict=True):
        if kind in ("ok", "messages", "hangup"):  # each answer its own, none crossed over
            first = answer[0] if isinstance(answer, list) else answer[1]
            first = first[1]["message"] if kind == "messages" and body["stream"] else first
            ids.append(first["id"])
        if kind == "bad":
            status, payload = answer
            assert status == 400, (body, payload)
            err = payload["error"]
            assert set(err) == {"message", "type", "param", "code"} and err["message"], err
        elif kind == "tokenize":
            status, payload = answer
            assert status == 200 and payload["count"] == n_prompt(body) == len(payload["tokens"])
        elif kind == "hangup":
            assert 1 <= len(answer) <= 2 and "[DONE]" not in answer, answer
        elif kind == "messages":
            text = check_messages(body, answer, n_prompt(body))
            if (key := greedy_key(path, body)) is not None:
                assert text == alone[key], (body, text, alone[key])
        else:
            if body.get("stream"):
                choices, usage = merge_stream(path, body, answer)
            else:
                status, payload = answer
                assert status == 200, (body, payload)
                choices, usage = payload["choices"], payload["usage"]
            texts = check_choices(path, body, choices, usage, n_prompt(body))
            if (key := greedy_key(path, body)) is not None:
                assert texts == [alone[key]] * len(texts), (body, texts, alone[key])
            else:
                seeded.append((path, body, texts))

    assert len(set(ids)) == len(ids), ids

    # the server settles: nothing running or waiting, every sample finished exactly once
    # (only the hang-ups aborted), the KV cache back to its idle usage. The frontend counts a
    # finish before it answers and an abort before it tells the core, so once the core runs
    # nothing the counts are final: a double finish shows as too many, a lost one too few.
    deadline = time.monotonic() + HANG_GUARD_S
    while (metric(base, "modelport:num_requests_running")
           or metric(base, "modelport:num_requests_waiting")):
        assert time.monotonic() < deadline, "requests still running after the soak"
        time.sleep(0.2)
    samples = {k: sum(b.get("n", 1) for kind, _, b in mix if kind == k)
               for k in ("ok", "messages", "hangup")}
    after = finished_counts(base)
    assert after["abort"] - finished["abort"] == samples["hangup"], (finished, after, samples)
    done = sum(after[r] - finished[r] for r in ("stop", "length"))
    assert done == samples["ok"] + samples["messages"], (finished, after, samples)
    assert metric(base, "modelport:kv_cache_usage_perc") == idle_kv

    # seeded sampling repeats alone
    assert seeded
    for path, body, texts in seeded:
        answer = asyncio.run(_alone(base, path, body))
        if body.get("stream"):
            choices, usage = merge_stream(path, body, answer)
        else:
            choices, usage = answer[1]["choices"], answer[1]["usage"]
        assert check_choices(path, body, choices, usage, n_prompt(body)) == texts, body

    final = httpx.post(f"{base}{COMP}", json={"model": model, "prompt": PROMPTS[0],
                                              "max_tokens": 3, "temperature": 0}, timeout=120)
    assert final.status_code == 200 and final.json()["usage"]["completion_tokens"] == 3


async def _alone(base: str, path: str, body: dict):
    async with httpx.AsyncClient(base_url=base, timeout=HANG_GUARD_S) as c:
        return await fire(c, "ok", path, body)


def test_the_checks_catch_a_double_or_missing_answer() -> None:
    """The soak's stream checks are not vacuous: a second [DONE], a second finish_reason, a
    missing choice index and a usage that does not add up each fail."""
    body = {"prompt": "x", "max_tokens": 2, "n": 2, "stream": True}

    def chunk(index: int, text: str, finish: str | None) -> dict:
        return {"id": "c", "choices": [{"index": index, "text": text, "finish_reason": finish}]}

    usage = {"id": "c", "choices": [], "usage": {"prompt_tokens": 1, "completion_tokens": 4,
                                                  "total_tokens": 5}}
    good = [chunk(0, "a", None), chunk(1, "b", None), chunk(0, "c", "length"),
            chunk(1, "d", "length"), usage, "[DONE]"]
    choices, use = merge_stream(COMP, body, good)
    assert check_choices(COMP, body, choices, use, 1) == ["ac", "bd"]
    bad_streams = {
        "two [DONE]": [*good, "[DONE]"],
        "finish twice": [*good[:3], chunk(0, "", "length"), *good[3:]],
        "no finish": [*good[:3], chunk(1, "d", None), *good[4:]],
        "two usage chunks": [*good[:-1], usage, "[DONE]"],
    }
    for name, events in bad_streams.items():
        with pytest.raises(AssertionError):
            merge_stream(COMP, body, events)
            pytest.fail(name)
    with pytest.raises(AssertionError):  # choice 1 never came
        check_choices(COMP, body, choices[:1], use, 1)
    with pytest.raises(AssertionError):  # both choices ran to length: 4 tokens, not 3
        check_choices(COMP, body, choices, {**use, "completion_tokens": 3, "total_tokens": 4}, 1)
