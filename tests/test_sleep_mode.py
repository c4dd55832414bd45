"""vLLM's sleep mode (enable_sleep_mode / --enable-sleep-mode) on CPU with tiny models:
LLM.sleep / wake_up (levels 1 and 2, wake-up by tags), what is freed while asleep, the
server's /sleep, /wake_up, /is_sleeping (requests while asleep wait and run after wake-up),
and tensor / data parallelism (every rank and replica sleeps and wakes)."""

from __future__ import annotations

import gc
import threading
import time
import weakref

import httpx
import pytest

from helpers.server_proc import start_server, stop_server
from helpers.tiny_models import make_tiny_llama_dir

LLM_KW = dict(max_model_len=128, kv_cache_memory=2 << 20, block_size=4, enforce_eager=True)
PROMPTS = [[5, 17, 42, 99, 3, 250, 7, 8, 9, 10, 11, 12], [200, 201, 2, 77]]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return make_tiny_llama_dir(tmp_path_factory.mktemp("sleep") / "m", tie_word_embeddings=True)


def _greedy(llm) -> list:
    """Token ids and their logprobs: equal only when the weights are bit for bit the same."""
    from modelport import SamplingParams

    sp = SamplingParams(max_tokens=8, temperature=0, ignore_eos=True, logprobs=3)
    outs = llm.generate([{"prompt_token_ids": p} for p in PROMPTS], sp, use_tqdm=False)
    return [(list(o.outputs[0].token_ids),
             [{k: v.logprob for k, v in lp.items()} for lp in o.outputs[0].logprobs])
            for o in outs]


@pytest.fixture(scope="module")
def llm(model_dir):
    from modelport import LLM

    return LLM(str(model_dir), enable_sleep_mode=True, **LLM_KW)


def test_level_1_frees_kv_resets_prefix_cache_and_wakes_identical(llm) -> None:
    core = llm.llm_engine.core
    want = _greedy(llm)
    assert _greedy(llm) == want
    assert core.kv.cached  # the prompts' full blocks are in the prefix cache
    kv = weakref.ref(core.runner.kv_caches[0])
    assert not llm.is_sleeping()
    llm.sleep(level=1)
    gc.collect()
    assert llm.is_sleeping() and core.runner.kv_caches == [] and kv() is None
    assert not core.kv.cached and all(b.block_hash is None for b in core.kv.blocks)
    with pytest.raises(RuntimeError, match="asleep"):
        _greedy(llm)
    llm.wake_up()
    assert not llm.is_sleeping() and len(core.runner.kv_caches) == 2
    hits = core.kv.hits
    assert _greedy(llm) == want
    assert core.kv.hits == hits  # a cold cache after the reset: nothing found


def test_level_2_drops_weights_and_wakes_by_tags(llm) -> None:
    core = llm.llm_engine.core
    want = _greedy(llm)
    weight = core.runner.model.lm_head.weight  # tied: the embedding's storage too
    n = weight.untyped_storage().nbytes()
    llm.sleep(level=2)
    assert weight.untyped_storage().nbytes() == 0 and core.runner.kv_caches == []
    llm.wake_up(tags=["weights"])
    assert llm.is_sleeping() and weight.untyped_storage().nbytes() == n
    assert core.runner.kv_caches == []
    llm.wake_up(tags=["kv_cache"])
    assert not llm.is_sleeping() and core.runner.kv_caches
    assert _greedy(llm) == want
    with pytest.raises(ValueError, match="tags"):
        llm.wake_up(tags=["activations"])


def test_level_2_while_asleep_at_level_1_drops_the_weights(llm) -> None:
    """A deeper sleep while asleep: level 1 (on a CPU device the weights stay) then level 2
    frees the loader's weights; wake-up builds them again, the same bits."""
    core = llm.llm_engine.core
    want = _greedy(llm)
    weight = core.runner.model.lm_head.weight
    n = weight.untyped_storage().nbytes()
    llm.sleep(level=1)
    assert weight.untyped_storage().nbytes() == n
    llm.sleep(level=1)  # again at the same level: nothing changes
    assert weight.untyped_storage().nbytes() == n
    llm.sleep(level=2)
    assert weight.untyped_storage().nbytes() == 0 and llm.is_sleeping()
    llm.wake_up()
    assert weight.untyped_storage().nbytes() == n and _greedy(llm) == want


def test_level_2_with_dummy_weights_loads_the_same_ones(model_dir) -> None:
    from modelport import LLM

    llm = LLM(str(model_dir), enable_sleep_mode=True, load_format="dummy", **LLM_KW)
    want = _greedy(llm)
    llm.sleep(level=2)
    llm.wake_up()
    assert _greedy(llm) == want


def test_sleep_needs_enable_sleep_mode(model_dir) -> None:
    from modelport import LLM

    llm = LLM(str(model_dir), **LLM_KW)
    with pytest.raises(ValueError, match="enable_sleep_mode"):
        llm.sleep()
    with pytest.raises(ValueError, match="enable_sleep_mode"):
        llm.wake_up()
    assert not llm.is_sleeping()


def test_tensor_parallel_ranks_sleep_and_reload(model_dir) -> None:
    from modelport import LLM

    tp = LLM(str(model_dir), enable_sleep_mode=True, tensor_parallel_size=2, **LLM_KW)
    try:
        want = _greedy(tp)  # two ranks' sums round otherwise than one's: their own reference
        tp.sleep(level=2)  # rank 1 drops its shard too: only its own reload brings it back
        tp.wake_up(tags=["weights"])
        tp.wake_up(tags=["kv_cache"])
        assert _greedy(tp) == want
    finally:
        tp.llm_engine.core.shutdown()


# ---------------------------------------------------------------- the server


def _serve(model_dir, tmp_path_factory, *extra: str):
    log = tmp_path_factory.mktemp("sleep-srv") / "server.log"
    argv = ["-m", "modelport.entrypoints.cli", "serve", "--model", str(model_dir),
            "--served-model-name", "tiny", "--max-model-len", "128", "--kv-cache-memory", "2MiB",
            "--block-size", "4", "--enforce-eager", *extra]  # fmt: skip
    proc, url = start_server(argv, log, timeout=180)
    return proc, url, log


def _complete(url: str, max_tokens: int = 8) -> httpx.Response:
    body = {"model": "tiny", "prompt": "hello sleepy world", "max_tokens": max_tokens,
            "temperature": 0, "ignore_eos": True}  # fmt: skip
    return httpx.post(f"{url}/v1/completions", json=body, timeout=60)


def _text(url: str) -> str:
    r = _complete(url)
    assert r.status_code == 200, r.text
    return r.json()["choices"][0]["text"]


def _sleeping(url: str) -> bool:
    r = httpx.get(f"{url}/is_sleeping", timeout=10)
    assert r.status_code == 200, r.text
    return r.json()["is_sleeping"]


def _in_thread(fn, *args):
    box: dict = {}

    def run() -> None:
        box["value"] = fn(*args)
        box["at"] = time.monotonic()

    t = threading.Thread(target=run)
    t.start()
    return t, box


def test_server_sleep_endpoints_requests_while_asleep_every_replica(
        model_dir, tmp_path_factory) -> None:
    """Two data-parallel replicas: /sleep and /wake_up reach both (requests alternate)."""
    proc, url, log = _serve(model_dir, tmp_path_factory, "--enable-sleep-mode",
                            "--data-parallel-size", "2")
    try:
        want = _text(url)
        assert _text(url) == want  # the other replica
        assert not _sleeping(url)
        # /sleep waits for a running request to finish (it is not cut short)
        t, long = _in_thread(_complete, url, 48)
        time.sleep(0.2)
        r = httpx.post(f"{url}/sleep", params={"level": 1}, timeout=60)
        slept = time.monotonic()
        assert r.status_code == 200, r.text
        t.join(60)
        assert long["value"].status_code == 200 and long["at"] <= slept
        assert long["value"].json()["usage"]["completion_tokens"] == 48
        assert _sleeping(url) and log.read_text().count("sleep level 1:") == 2
        # requests while asleep wait in the queue and run after /wake_up
        waiting = [_in_thread(_complete, url) for _ in range(2)]
        time.sleep(0.5)
        assert all("value" not in box for _, box in waiting)
        r = httpx.post(f"{url}/wake_up", timeout=60)
        assert r.status_code == 200, r.text
        for t, box in waiting:
            t.join(60)
            assert box["value"].status_code == 200
            assert box["value"].json()["choices"][0]["text"] == want
        assert not _sleeping(url)
        # level 2, woken by tags: weights (reloaded on both replicas) first, then the KV cache
        assert httpx.post(f"{url}/sleep?level=2", timeout=60).status_code == 200
        assert log.read_text().count("sleep level 2:") == 2
        assert httpx.post(f"{url}/wake_up?tags=weights", timeout=60).status_code == 200
        assert _sleeping(url)
        assert httpx.post(f"{url}/wake_up?tags=kv_cache", timeout=60).status_code == 200
        assert not _sleeping(url) and [_text(url), _text(url)] == [want, want]
        for bad in (httpx.post(f"{url}/sleep?level=3", timeout=10),
                    httpx.post(f"{url}/wake_up?tags=activations", timeout=10)):
            assert bad.status_code == 400 and bad.json()["error"]["message"], bad.text
        assert not _sleeping(url)
    finally:
        stop_server(proc)
    assert "internal error" not in log.read_text()


def test_routes_without_the_flag_refuse() -> None:
    """The routes of a server without --enable-sleep-mode (an engine stub: no model needed)."""
    import types

    from fastapi import APIRouter, FastAPI
    from starlette.testclient import TestClient

    from modelport.entrypoints.openai.errors import install_error_handlers
    from modelport.entrypoints.openai.sleep import SLEEP_PATHS, add_routes

    engine = types.SimpleNamespace(engine_config=types.SimpleNamespace(enable_sleep_mode=False))
    app, api = FastAPI(), APIRouter()
    add_routes(api, lambda request: engine)
    app.include_router(api)
    install_error_handlers(app, SLEEP_PATHS)
    client = TestClient(app)
    for r in (client.post("/sleep?level=1"), client.post("/wake_up"),
              client.get("/is_sleeping")):
        assert r.status_code == 400, r.text
        assert "--enable-sleep-mode" in r.json()["error"]["message"]


@pytest.mark.parametrize("fmt", ["fp8", "gguf-q8_0", "gguf-q4_0"])
def test_quantized_weights_sleep_and_wake_the_same_bits(model_dir, tmp_path, fmt) -> None:
    # weights the loader turns into kernel layouts (online FP8 on the CPU's int8 rows, GGUF
    # blocks kept for the C / int4 kernels): level 2 drops them and wake-up rebuilds them
    # from the checkpoint; level 1 keeps them. Same tokens and logprobs each time.
    from helpers.tiny_models import make_tiny_llama_gguf
    from modelport import LLM

    if fmt == "fp8":
        llm = LLM(str(model_dir), enable_sleep_mode=True, quantization="fp8", **LLM_KW)
    else:
        qtype = fmt.split("-")[1].upper()
        path = make_tiny_llama_gguf(model_dir, tmp_path / f"m-{qtype}.gguf", qtype=qtype)
        llm = LLM(str(path), enable_sleep_mode=True, quantization="gguf", **LLM_KW)
    want = _greedy(llm)
    for level in (2, 1, 2):
        llm.sleep(level=level)
        assert llm.is_sleeping()
        llm.wake_up()
        assert _greedy(llm) == want, f"after a level-{level} sleep"
