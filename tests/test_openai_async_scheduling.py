"""The OpenAI server with async scheduling forced on (the CUDA default) on CPU: concurrent
streamed and plain requests, n > 1 and stop tokens give exactly the synchronous offline
engine's text, each request answered once."""

from __future__ import annotations

import asyncio
import json

import httpx
import pytest

from helpers.server_proc import start_server, stop_server
from helpers.tiny_models import make_tiny_llama_dir

PROMPTS = ["hello there", "the quick brown fox", "a", "one two three four five six"]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return make_tiny_llama_dir(tmp_path_factory.mktemp("tiny_async") / "llama")


@pytest.fixture(scope="module")
def base(model_dir, tmp_path_factory):
    log = tmp_path_factory.mktemp("asyncsrv") / "server.log"
    argv = ["-m", "modelport.entrypoints.cli", "serve", "--model", str(model_dir),
            "--served-model-name", "tiny", "--max-model-len", "64", "--kv-cache-memory", "8MiB",
            "--async-scheduling"]  # fmt: skip
    proc, url = start_server(argv, log, timeout=180)
    try:
        yield url, log
    finally:
        stop_server(proc)


async def _plain(client: httpx.AsyncClient, url: str, body: dict) -> list[str]:
    r = await client.post(url, json=body, timeout=60)
    assert r.status_code == 200, r.text
    return [c["text"] for c in sorted(r.json()["choices"], key=lambda c: c["index"])]


async def _streamed(client: httpx.AsyncClient, url: str, body: dict) -> list[str]:
    texts: dict[int, str] = {}
    finished: dict[int, int] = {}
    async with client.stream("POST", url, json={**body, "stream": True}, timeout=60) as r:
        assert r.status_code == 200
        async for line in r.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            for c in json.loads(line[6:])["choices"]:
                texts[c["index"]] = texts.get(c["index"], "") + c["text"]
                if c.get("finish_reason"):
                    finished[c["index"]] = finished.get(c["index"], 0) + 1
    assert all(v == 1 for v in finished.values()) and len(finished) == len(texts)
    return [texts[i] for i in sorted(texts)]


def test_concurrent_requests_equal_the_sync_offline_engine(base, model_dir) -> None:
    from modelport import LLM, SamplingParams

    base, log = base

    llm = LLM(str(model_dir), max_model_len=64, kv_cache_memory=8 << 20, async_scheduling=False)
    greedy = SamplingParams(max_tokens=10, temperature=0, ignore_eos=True)
    ref = llm.generate(PROMPTS, greedy, use_tqdm=False)
    stop_tok = ref[1].outputs[0].token_ids[4]
    stopped = llm.generate([PROMPTS[1]], SamplingParams(max_tokens=10, temperature=0,
                                                        stop_token_ids=[stop_tok]),
                           use_tqdm=False)[0].outputs[0].text
    seeded = llm.generate([PROMPTS[0]], SamplingParams(n=2, max_tokens=8, temperature=1.0,
                                                       seed=11, ignore_eos=True),
                          use_tqdm=False)[0]
    url = f"{base}/v1/completions"
    common = {"model": "tiny", "max_tokens": 10, "temperature": 0, "ignore_eos": True}

    async def go():
        async with httpx.AsyncClient() as client:
            jobs = [_streamed(client, url, {**common, "prompt": p}) if i % 2 else
                    _plain(client, url, {**common, "prompt": p}) for i, p in enumerate(PROMPTS)]
            jobs.append(_plain(client, url, {"model": "tiny", "prompt": PROMPTS[1], "max_tokens": 10,
                                             "temperature": 0, "stop_token_ids": [stop_tok]}))
            jobs.append(_streamed(client, url, {"model": "tiny", "prompt": PROMPTS[0], "n": 2,
                                                "max_tokens": 8, "temperature": 1.0, "seed": 11,
                                                "ignore_eos": True}))
            return await asyncio.gather(*jobs)

    got = asyncio.run(go())
    assert [g[0] for g in got[:4]] == [o.outputs[0].text for o in ref]
    assert got[4] == [stopped]
    assert got[5] == [c.text for c in seeded.outputs]
    assert httpx.get(f"{base}/health").status_code == 200
    assert "async scheduling: step N+1 is prepared while step N runs" in log.read_text()
