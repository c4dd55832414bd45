"""LoRA through the OpenAI server under data and tensor parallelism (CPU).

- ``--data-parallel-size 2``: the replicas sit behind one frontend, which keeps the served
  adapters; each request carries its adapter (name, id, folder) to whichever replica takes
  it, which reads it on first use. /v1/models lists each adapter once; an adapter loaded at
  runtime serves on both replicas, and an unloaded one is forgotten by both (a name loaded
  again with another folder gives that folder's output everywhere, never a replica's stale
  copy; the core logs show both replicas reading it and both freeing it). Sequential
  requests alternate between the two replicas (the router takes the one with fewest in
  flight, then the one given fewest), so two in a row reach both.
- ``--tensor-parallel-size 2`` (gloo): completions and chat with an adapter equal the merged
  single-rank reference; runtime load and unload work.

One server per combination; greedy text equals an independent merged checkpoint's.
"""

from __future__ import annotations

import os
import re

import httpx
import pytest

from helpers.lora_adapters import make_adapter, merge
from helpers.server_proc import start_server, stop_server
from helpers.tiny_models import make_tiny_llama_dir

PROMPT = "the quick brown fox jumps over the lazy dog"
CHAT = [{"role": "user", "content": "hi"}]
LLM_KW = dict(max_model_len=128, kv_cache_memory=4 << 20, block_size=4, enforce_eager=True)


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    from modelport import LLM, SamplingParams

    root = tmp_path_factory.mktemp("lorapar")
    base = make_tiny_llama_dir(root / "base")
    pairs = {
        "a": make_adapter(root / "a", rank=8, alpha=16, seed=1),
        "b": make_adapter(root / "b", rank=4, alpha=8, seed=2, targets=("q_proj", "down_proj")),
    }
    greedy = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True)
    refs = {}
    for key in ("base", "a", "b"):
        path = base if key == "base" else merge(base, root / f"merged_{key}", pairs[key])
        llm = LLM(str(path), **LLM_KW)
        refs[key] = (
            llm.generate([PROMPT], greedy, use_tqdm=False)[0].outputs[0].text,
            llm.chat(CHAT, greedy, use_tqdm=False)[0].outputs[0].text,
        )
        del llm
    assert refs["a"][0] != refs["base"][0] and refs["b"][0] != refs["base"][0]
    assert refs["a"][0] != refs["b"][0]
    return {"root": root, "base": base, "a": root / "a", "b": root / "b", "refs": refs}


def _serve(world, tmp_path_factory, *extra: str):
    log = tmp_path_factory.mktemp("lorapar-srv") / "server.log"
    argv = [
        "-m", "modelport.entrypoints.cli", "serve", "--model", str(world["base"]),
        "--served-model-name", "tiny", "--max-model-len", "128", "--kv-cache-memory", "4MiB",
        "--block-size", "4", "--enable-lora", "--max-loras", "2", "--max-lora-rank", "8",
        "--lora-modules", f"sql={world['a']}", *extra,
    ]  # fmt: skip
    saved = os.environ.get("VLLM_ALLOW_RUNTIME_LORA_UPDATING")
    os.environ["VLLM_ALLOW_RUNTIME_LORA_UPDATING"] = "True"
    try:
        proc, url = start_server(argv, log, timeout=180)
    finally:
        if saved is None:
            os.environ.pop("VLLM_ALLOW_RUNTIME_LORA_UPDATING")
        else:
            os.environ["VLLM_ALLOW_RUNTIME_LORA_UPDATING"] = saved
    return proc, url, log


def _complete(url: str, model: str) -> httpx.Response:
    body = {"model": model, "prompt": PROMPT, "max_tokens": 6, "temperature": 0,
            "ignore_eos": True}  # fmt: skip
    return httpx.post(f"{url}/v1/completions", json=body, timeout=60)


def _chat(url: str, model: str) -> httpx.Response:
    body = {"model": model, "messages": CHAT, "max_tokens": 6, "temperature": 0,
            "ignore_eos": True}  # fmt: skip
    return httpx.post(f"{url}/v1/chat/completions", json=body, timeout=60)


def _texts(url: str, model: str, times: int) -> list[str]:
    """`times` completions one after another (under DP 2: alternating replicas)."""
    out = []
    for _ in range(times):
        r = _complete(url, model)
        assert r.status_code == 200, r.text
        out.append(r.json()["choices"][0]["text"])
    return out


def _ids(url: str) -> list[str]:
    return [c["id"] for c in httpx.get(f"{url}/v1/models").json()["data"]]


def _post(url: str, path: str, body: dict) -> httpx.Response:
    return httpx.post(f"{url}{path}", json=body, timeout=60)


def _load_and_unload_everywhere(url: str, world, times: int) -> None:
    refs = world["refs"]
    r = _post(url, "/v1/load_lora_adapter", {"lora_name": "rt", "lora_path": str(world["b"])})
    assert r.status_code == 200 and "added successfully" in r.text, r.text
    assert _ids(url).count("rt") == 1
    assert _texts(url, "rt", times) == [refs["b"][0]] * times
    r = _post(url, "/v1/unload_lora_adapter", {"lora_name": "rt"})
    assert r.status_code == 200 and "removed successfully" in r.text, r.text
    assert "rt" not in _ids(url)
    for _ in range(times):
        r = _complete(url, "rt")
        assert r.status_code == 404 and r.json()["error"]["code"] == "model_not_found"
    # the same name again, another folder: every replica serves the new weights
    r = _post(url, "/v1/load_lora_adapter", {"lora_name": "rt", "lora_path": str(world["a"])})
    assert r.status_code == 200, r.text
    assert _texts(url, "rt", times) == [refs["a"][0]] * times
    r = _post(url, "/v1/unload_lora_adapter", {"lora_name": "rt"})
    assert r.status_code == 200, r.text
    # a folder that is no adapter: refused in OpenAI's shape, served nowhere
    bad = world["root"] / "not_an_adapter"
    bad.mkdir(exist_ok=True)
    r = _post(url, "/v1/load_lora_adapter", {"lora_name": "bad", "lora_path": str(bad)})
    assert r.status_code in (400, 404), r.text
    err = r.json()["error"]
    assert "Failed to load LoRA adapter 'bad'" in err["message"] and err["type"], err
    assert "bad" not in _ids(url)
    for _ in range(times):
        assert _complete(url, "bad").status_code == 404


def test_data_parallel_server_serves_adapters_on_every_replica(world, tmp_path_factory) -> None:
    proc, url, log = _serve(world, tmp_path_factory, "--data-parallel-size", "2")
    try:
        refs = world["refs"]
        assert sorted(_ids(url)) == ["sql", "tiny"]
        # four in a row: each replica serves the startup adapter twice, and the base model
        assert _texts(url, "sql", 4) == [refs["a"][0]] * 4
        assert _texts(url, "tiny", 2) == [refs["base"][0]] * 2
        _load_and_unload_everywhere(url, world, 4)
        assert _texts(url, "sql", 2) == [refs["a"][0]] * 2  # the others are untouched
    finally:
        stop_server(proc)
    text = log.read_text()
    assert "data parallel: 2 replicas" in text and "internal error" not in text, text[-3000:]
    # each of rt's two loads was read by both replicas, and both freed it at each unload
    assert len(re.findall(r"LoRA adapter 'rt' \(id \d+\) read from", text)) == 4, text[-3000:]
    assert len(re.findall(r"LoRA adapter 'rt' \(id \d+\) removed", text)) == 4, text[-3000:]


def test_tensor_parallel_server_equals_merged_reference(world, tmp_path_factory) -> None:
    proc, url, log = _serve(world, tmp_path_factory, "--tensor-parallel-size", "2")
    try:
        refs = world["refs"]
        assert sorted(_ids(url)) == ["sql", "tiny"]
        assert _texts(url, "sql", 1) == [refs["a"][0]]
        r = _chat(url, "sql")
        assert r.status_code == 200, r.text
        assert r.json()["choices"][0]["message"]["content"] == refs["a"][1]
        assert _texts(url, "tiny", 1) == [refs["base"][0]]
        _load_and_unload_everywhere(url, world, 1)
    finally:
        stop_server(proc)
    text = log.read_text()
    assert "internal error" not in text, text[-3000:]
    assert len(re.findall(r"LoRA adapter 'rt' \(id \d+\) removed", text)) == 2, text[-3000:]
