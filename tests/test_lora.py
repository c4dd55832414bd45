"""Multi-LoRA serving (vLLM's enable_lora / LoRARequest / --lora-modules).

A tiny random Llama and tiny PEFT-layout adapters (random A and B, so every adapter changes
the output) are built here (helpers/lora_adapters.py). The reference for an adapter is an
independent merged checkpoint, ``W + scale * B @ A`` written into a copy of the base model,
run through the same engine without LoRA: a LoRA request's greedy tokens and logprobs must
equal it.
"""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from helpers.lora_adapters import make_adapter, merge
from helpers.tiny_models import make_tiny_llama_dir
from modelport import SamplingParams
from modelport.lora.request import LoRARequest

PROMPTS = ["the quick brown fox jumps over the lazy dog", "hello world, hello again"]
GREEDY = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True, logprobs=2)
LLM_KW = dict(max_model_len=128, kv_cache_memory=4 << 20, block_size=4, enforce_eager=True)


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("lora")
    base = make_tiny_llama_dir(root / "base")
    a = make_adapter(root / "sql", rank=8, alpha=16, seed=1)
    b = make_adapter(
        root / "chat",
        rank=4,
        alpha=8,
        seed=2,
        targets=("q_proj", "v_proj", "down_proj"),
        rslora=True,
    )
    make_adapter(root / "big", rank=32, alpha=32, seed=3)
    return {
        "root": root,
        "base": base,
        "a": root / "sql",
        "b": root / "chat",
        "big": root / "big",
        "merged_a": merge(base, root / "merged_sql", a),
        "merged_b": merge(base, root / "merged_chat", b),
    }


def _greedy(llm, prompts, **kw):
    return llm.generate(prompts, GREEDY, use_tqdm=False, **kw)


def _lps(out) -> list[float]:
    o = out.outputs[0]
    return [lp[t].logprob for t, lp in zip(o.token_ids, o.logprobs)]


@pytest.fixture(scope="module")
def references(world):
    from modelport import LLM

    refs = {}
    for key in ("base", "merged_a", "merged_b"):
        llm = LLM(str(world[key]), **LLM_KW)
        refs[key] = _greedy(llm, PROMPTS)
        del llm
    return refs


@pytest.fixture(scope="module")
def lora_llm(world):
    from modelport import LLM

    return LLM(str(world["base"]), enable_lora=True, max_loras=2, max_lora_rank=8, **LLM_KW)


def assert_same(got, ref) -> None:
    assert got.outputs[0].token_ids == ref.outputs[0].token_ids
    assert _lps(got) == pytest.approx(_lps(ref), abs=2e-4)


def _run_together(llm, prompts, loras) -> list:
    """Queue every request, check that the first step admitted them all (one batch mixes
    the adapters), then run them to the end."""
    engine = llm.llm_engine
    for i, (p, lr) in enumerate(zip(prompts, loras)):
        engine.add_request(f"m{i}", p, GREEDY, lora_request=lr)
    done = {o.request_id: o for o in engine.step() if o.finished}
    assert engine.core.scheduler.num_running == len(prompts) and not done
    while engine.has_unfinished_requests():
        done.update((o.request_id, o) for o in engine.step() if o.finished)
    return [done[f"m{i}"] for i in range(len(prompts))]


def _mixed_batch(llm, world, references) -> None:
    """Both adapters and the base model in one batch, each equal to its merged reference."""
    la, lb = LoRARequest("sql", 1, str(world["a"])), LoRARequest("chat", 2, str(world["b"]))
    prompts = [PROMPTS[0], PROMPTS[0], PROMPTS[0], PROMPTS[1], PROMPTS[1]]
    outs = _run_together(llm, prompts, [la, lb, None, lb, la])
    for out, (ref, i) in zip(
        outs, [("merged_a", 0), ("merged_b", 0), ("base", 0), ("merged_b", 1), ("merged_a", 1)]
    ):
        assert_same(out, references[ref][i])


def test_mixed_batch_equals_merged_references(world, references, lora_llm) -> None:
    _mixed_batch(lora_llm, world, references)
    # the adapters do change the model (else this test would prove nothing)
    assert (
        references["merged_a"][0].outputs[0].token_ids != references["base"][0].outputs[0].token_ids
    )
    assert (
        references["merged_b"][0].outputs[0].token_ids != references["base"][0].outputs[0].token_ids
    )


def test_prefix_cache_is_per_adapter(world, references, lora_llm) -> None:
    """The same prompt again, one request at a time: each run finds full blocks cached,
    but only those computed under its own adapter."""
    la, lb = LoRARequest("sql", 1, str(world["a"])), LoRARequest("chat", 2, str(world["b"]))
    for lr, ref in (
        (None, "base"),
        (la, "merged_a"),
        (lb, "merged_b"),
        (la, "merged_a"),
        (None, "base"),
    ):
        out = _greedy(lora_llm, [PROMPTS[0]], lora_request=lr)[0]
        assert_same(out, references[ref][0])
    # and a second run under one adapter reuses its own blocks
    again = _greedy(lora_llm, [PROMPTS[0]], lora_request=lb)[0]
    assert again.num_cached_tokens > 0
    assert_same(again, references["merged_b"][0])


def test_scheduler_holds_back_an_adapter_past_max_loras() -> None:
    """vLLM's rule, on the plain scheduler: with max_loras=1 a request for a second
    adapter waits while the first runs; base requests and the same adapter's go on; equal
    prompts under different adapters hash to different prefix-cache blocks."""
    from modelport.config import SchedulerConfig
    from modelport.engine.kv_cache_manager import KVCacheManager
    from modelport.engine.request import Request
    from modelport.engine.scheduler import Scheduler

    kv = KVCacheManager(32, 4)
    s = Scheduler(
        SchedulerConfig(max_num_seqs=8, max_num_batched_tokens=64, max_model_len=64),
        kv,
        max_loras=1,
    )
    la, lb = LoRARequest("a", 1, "/a"), LoRARequest("b", 2, "/b")

    def req(rid, lr, first=1):
        return Request(
            rid, list(range(first, first + 9)), SamplingParams(max_tokens=2), lora_request=lr
        )

    for r in (req("a1", la), req("b1", lb, 2), req("base", None, 3), req("a2", la, 4)):
        s.add_request(r)
    first = [x.request_id for x in s.schedule().scheduled]
    assert first == ["a1", "base", "a2"] and [r.request_id for r in s.waiting] == ["b1"]
    same = [req("x1", la), req("x2", LoRARequest("a", 1, "/a")), req("x3", lb), req("x4", None)]
    hashes = [kv.first_block_hash(r) for r in same]
    assert hashes[0] == hashes[1] and len(set(hashes)) == 3
    s.abort_requests(["a1", "a2"])
    assert [x.request_id for x in s.schedule().scheduled] == ["base", "b1"]


def test_one_adapter_per_step_completes_both(world, references) -> None:
    from modelport import LLM

    llm = LLM(
        str(world["base"]),
        enable_lora=True,
        max_loras=1,
        max_lora_rank=8,
        max_cpu_loras=1,
        **LLM_KW,
    )
    la, lb = LoRARequest("sql", 1, str(world["a"])), LoRARequest("chat", 2, str(world["b"]))
    outs = _greedy(llm, [PROMPTS[0], PROMPTS[0], PROMPTS[1]], lora_request=[la, lb, None])
    assert_same(outs[0], references["merged_a"][0])
    assert_same(outs[1], references["merged_b"][0])
    assert_same(outs[2], references["base"][1])
    engine = llm.llm_engine  # vLLM's engine-level adapter management
    assert engine.list_loras() == {2}  # max_cpu_loras=1: the last one used stays loaded
    assert engine.add_lora(la) and engine.list_loras() == {1}
    assert engine.remove_lora(1) and engine.list_loras() == set()
    # chat: single conversations through the template, with an adapter
    chat = llm.chat([{"role": "user", "content": "hi"}], GREEDY, use_tqdm=False, lora_request=lb)
    assert len(chat[0].outputs[0].token_ids) == 8


def test_tensor_parallel_lora_equals_merged_references(world, references, tmp_path) -> None:
    """tensor_parallel_size=2 (gloo on CPU): rank 0 admits adapters and picks slots and rows,
    and sends its slot changes with each LoRA step; every rank adds its part of each pair
    (B's rows of its q/k/v and gate/up outputs, A's columns of its o/down inputs, summed by
    the layer's all-reduce). A mixed batch, a third adapter evicting one of the two slots,
    and an unloaded adapter loaded again all equal the merged single-rank references."""
    from modelport import LLM

    c = make_adapter(tmp_path / "c", rank=4, alpha=8, seed=7, targets=("gate_proj", "o_proj"))
    ref_c = _greedy(LLM(str(merge(world["base"], tmp_path / "merged_c", c)), **LLM_KW), PROMPTS)
    llm = LLM(
        str(world["base"]),
        enable_lora=True,
        max_loras=2,
        max_lora_rank=8,
        tensor_parallel_size=2,
        **LLM_KW,
    )
    try:
        _mixed_batch(llm, world, references)
        la = LoRARequest("sql", 1, str(world["a"]))
        lc = LoRARequest("c", 3, str(tmp_path / "c"))
        # c takes the least recently used slot (a's) on every rank
        assert_same(_greedy(llm, [PROMPTS[1]], lora_request=lc)[0], ref_c[1])
        assert ref_c[1].outputs[0].token_ids != references["base"][1].outputs[0].token_ids
        engine = llm.llm_engine
        assert engine.remove_lora(3)  # c's slot is cleared; c is read and placed again
        outs = _greedy(llm, [PROMPTS[0], PROMPTS[1]], lora_request=[lc, la])
        assert_same(outs[0], ref_c[0])
        assert_same(outs[1], references["merged_a"][1])
    finally:
        llm.llm_engine.core.shutdown()


def test_bad_adapters_fail_only_their_request(world, references, lora_llm, tmp_path) -> None:
    engine = lora_llm.llm_engine
    good = LoRARequest("sql", 1, str(world["a"]))
    engine.add_request("ok-1", PROMPTS[0], GREEDY, lora_request=good)
    with pytest.raises(ValueError, match="LoRA rank 32 is greater than max_lora_rank 8"):
        engine.add_request(
            "big", PROMPTS[0], GREEDY, lora_request=LoRARequest("big", 3, str(world["big"]))
        )
    with pytest.raises(ValueError, match="no such folder"):
        engine.add_request(
            "missing",
            PROMPTS[0],
            GREEDY,
            lora_request=LoRARequest("nope", 4, str(tmp_path / "nope")),
        )
    wrong = tmp_path / "wrong"
    make_adapter(wrong, rank=4, alpha=4, seed=5, targets=("q_proj",))
    t = load_file(str(wrong / "adapter_model.safetensors"))
    t = {k: (v[:, :-1].contiguous() if ".lora_A." in k else v) for k, v in t.items()}  # 63 in
    save_file(t, str(wrong / "adapter_model.safetensors"))
    with pytest.raises(ValueError, match="another model"):
        engine.add_request(
            "wrong", PROMPTS[0], GREEDY, lora_request=LoRARequest("wrong", 5, str(wrong))
        )
    head = tmp_path / "head"
    make_adapter(head, rank=4, alpha=4, seed=6, targets=("q_proj",))
    t = load_file(str(head / "adapter_model.safetensors"))
    t["base_model.model.model.layers.0.self_attn.rotary.lora_A.weight"] = torch.zeros(4, 64)
    t["base_model.model.model.layers.0.self_attn.rotary.lora_B.weight"] = torch.zeros(64, 4)
    save_file(t, str(head / "adapter_model.safetensors"))
    with pytest.raises(ValueError, match="target module"):
        engine.add_request(
            "head", PROMPTS[0], GREEDY, lora_request=LoRARequest("head", 6, str(head))
        )
    engine.add_request("ok-2", PROMPTS[1], GREEDY)
    done = {}
    while engine.has_unfinished_requests():
        for out in engine.step():
            if out.finished:
                done[out.request_id] = out
    assert set(done) == {"ok-1", "ok-2"}
    assert_same(done["ok-1"], references["merged_a"][0])
    assert_same(done["ok-2"], references["base"][1])


def test_lora_request_needs_enable_lora(world) -> None:
    from modelport import LLM

    llm = LLM(str(world["base"]), **LLM_KW)
    with pytest.raises(ValueError, match="LoRA is not enabled"):
        _greedy(llm, PROMPTS[:1], lora_request=LoRARequest("sql", 1, str(world["a"])))
    with pytest.raises(ValueError, match="id must be > 0"):
        LoRARequest("x", 0, "/tmp")
    assert _greedy(llm, PROMPTS[:1])[0].finished  # the engine is fine afterwards


# ---------------------------------------------------------------- the OpenAI server


def _serve(world, tmp_path_factory, env: dict[str, str], *extra: str):
    import os

    from helpers.server_proc import start_server

    log = tmp_path_factory.mktemp("lorasrv") / "server.log"
    argv = [
        "-m",
        "modelport.entrypoints.cli",
        "serve",
        "--model",
        str(world["base"]),
        "--served-model-name",
        "tiny",
        "--max-model-len",
        "128",
        "--kv-cache-memory",
        "4MiB",
        "--block-size",
        "4",
        "--enable-lora",
        "--max-loras",
        "2",
        "--max-lora-rank",
        "8",
        *extra,
    ]
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        return start_server(argv, log, timeout=180)
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


@pytest.fixture(scope="module")
def server(world, tmp_path_factory):
    from helpers.server_proc import stop_server

    chat = json.dumps({"name": "chat", "path": str(world["b"]), "base_model_name": "tiny"})
    proc, url = _serve(
        world,
        tmp_path_factory,
        {"VLLM_ALLOW_RUNTIME_LORA_UPDATING": "True", "MODELPORT_ALLOW_RUNTIME_LORA_UPDATING": ""},
        "--lora-modules",
        f"sql={world['a']}",
        chat,
        # a base_model_name that is not served: vLLM ignores it (parent: the base model)
        json.dumps({"name": "sql2", "path": str(world["a"]), "base_model_name": "other"}),
    )
    try:
        yield url
    finally:
        stop_server(proc)


def _complete(url: str, model: str):
    import httpx

    body = {
        "model": model,
        "prompt": PROMPTS[0],
        "max_tokens": 8,
        "temperature": 0,
        "ignore_eos": True,
    }
    return httpx.post(f"{url}/v1/completions", json=body, timeout=60)


def test_server_serves_adapters_as_models(server, world, references) -> None:
    import httpx

    cards = {c["id"]: c for c in httpx.get(f"{server}/v1/models").json()["data"]}
    assert cards["sql"]["parent"] == "tiny" and cards["sql"]["root"] == str(world["a"])
    assert cards["chat"]["parent"] == "tiny" and cards["chat"]["root"] == str(world["b"])
    assert cards["tiny"]["parent"] is None and cards["tiny"]["root"] == str(world["base"])
    assert cards["sql2"]["parent"] == "tiny" and cards["sql2"]["root"] == str(world["a"])
    for model, ref in (("sql", "merged_a"), ("chat", "merged_b"), ("tiny", "base")):
        r = _complete(server, model)
        assert r.status_code == 200, r.text
        assert r.json()["model"] == model
        assert r.json()["choices"][0]["text"] == references[ref][0].outputs[0].text
    body = {"model": "chat", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}
    r = httpx.post(f"{server}/v1/chat/completions", json=body, timeout=60)
    assert r.status_code == 200 and r.json()["model"] == "chat", r.text
    r = _complete(server, "nope")
    assert r.status_code == 404 and r.json()["error"]["code"] == "model_not_found"


def test_server_runtime_load_and_unload(server, world, references, tmp_path) -> None:
    import httpx

    def post(path: str, body: dict) -> httpx.Response:
        return httpx.post(f"{server}{path}", json=body, timeout=60)

    r = post("/v1/load_lora_adapter", {"lora_name": "rt", "lora_path": str(world["a"])})
    assert r.status_code == 200 and "added successfully" in r.text, r.text
    r = _complete(server, "rt")
    assert r.status_code == 200, r.text
    assert r.json()["choices"][0]["text"] == references["merged_a"][0].outputs[0].text
    assert "rt" in {c["id"] for c in httpx.get(f"{server}/v1/models").json()["data"]}
    r = post("/v1/load_lora_adapter", {"lora_name": "rt", "lora_path": str(world["a"])})
    assert r.status_code == 400 and "already been loaded" in r.json()["error"]["message"]
    # vLLM's load_inplace: the loaded name takes another folder's weights
    body = {"lora_name": "rt", "lora_path": str(world["b"]), "load_inplace": True}
    r = post("/v1/load_lora_adapter", body)
    assert r.status_code == 200 and "added successfully" in r.text, r.text
    r = _complete(server, "rt")
    assert r.status_code == 200, r.text
    assert r.json()["choices"][0]["text"] == references["merged_b"][0].outputs[0].text
    cards = {c["id"]: c for c in httpx.get(f"{server}/v1/models").json()["data"]}
    assert cards["rt"]["root"] == str(world["b"]) and cards["rt"]["parent"] == "tiny"
    body = {"lora_name": "rt", "lora_path": str(world["big"]), "load_inplace": True}
    r = post("/v1/load_lora_adapter", body)  # a bad folder: refused, the adapter kept
    assert r.status_code == 400 and "max_lora_rank" in r.json()["error"]["message"]
    r = _complete(server, "rt")
    assert r.json()["choices"][0]["text"] == references["merged_b"][0].outputs[0].text
    r = post("/v1/load_lora_adapter", {"lora_name": "big", "lora_path": str(world["big"])})
    assert r.status_code == 400 and "max_lora_rank" in r.json()["error"]["message"]
    r = post("/v1/load_lora_adapter", {"lora_name": "gone", "lora_path": str(tmp_path / "x")})
    assert r.status_code == 404, r.text
    # a folder without adapter_config.json: vLLM's 404 ("No adapter found"), as no folder
    r = post("/v1/load_lora_adapter", {"lora_name": "gone", "lora_path": str(world["base"])})
    assert r.status_code == 404 and "adapter_config.json" in r.json()["error"]["message"]
    r = post("/v1/load_lora_adapter", {"lora_name": "x"})
    assert r.status_code == 400 and "must be provided" in r.json()["error"]["message"]
    r = post("/v1/unload_lora_adapter", {"lora_name": "rt"})
    assert r.status_code == 200 and "removed successfully" in r.text, r.text
    assert _complete(server, "rt").status_code == 404
    r = post("/v1/unload_lora_adapter", {"lora_name": "rt"})
    assert r.status_code == 404 and "cannot be found" in r.json()["error"]["message"]
    assert _complete(server, "sql").status_code == 200  # the others are untouched


def _lora_info_series(url: str) -> dict[tuple[str, str], float]:
    """vLLM's lora_requests_info series: (waiting, running) -> value, each with max_lora 2."""
    import re

    import httpx

    text = httpx.get(f"{url}/metrics").text
    pat = re.compile(r"^modelport:lora_requests_info\{([^}]*)\} (\S+)$", re.M)
    series = {}
    for labels, value in pat.findall(text):
        d = dict(re.findall(r'(\w+)="([^"]*)"', labels))
        assert set(d) == {"max_lora", "waiting_lora_adapters", "running_lora_adapters"}, d
        assert d["max_lora"] == "2", d
        series[d["waiting_lora_adapters"], d["running_lora_adapters"]] = float(value)
    return series


def test_server_metrics_lora_requests_info(server) -> None:
    import time

    from modelport.engine.core_client import merge_stats
    from modelport.engine.messages import SchedulerStats

    assert ("", "") in _lora_info_series(server)  # there from the start, as an idle step
    before = time.time()
    assert _complete(server, "sql").status_code == 200
    series = _lora_info_series(server)
    # a step ran the sql request: its series, stamped with that step's time
    assert ("", "sql") in series and series["", "sql"] >= before - 1, series
    # the label sets seen earlier stay (as in vLLM); the newest is the idle one
    assert max(series, key=series.get) == ("", ""), series
    # data parallelism: the replicas' adapters, once each
    merged = merge_stats([
        SchedulerStats(running_lora_adapters=["sql"], waiting_lora_adapters=["chat"]),
        SchedulerStats(running_lora_adapters=["chat", "sql"]),
    ])
    assert merged.running_lora_adapters == ["sql", "chat"]
    assert merged.waiting_lora_adapters == ["chat"]


def test_server_runtime_updates_need_the_env_flag(world, tmp_path_factory) -> None:
    import httpx

    from helpers.server_proc import stop_server

    proc, url = _serve(
        world,
        tmp_path_factory,
        {"VLLM_ALLOW_RUNTIME_LORA_UPDATING": "", "MODELPORT_ALLOW_RUNTIME_LORA_UPDATING": ""},
    )
    try:
        for path in ("/v1/load_lora_adapter", "/v1/unload_lora_adapter"):
            r = httpx.post(f"{url}{path}", json={"lora_name": "rt", "lora_path": str(world["a"])})
            assert r.status_code == 404, r.text
        assert _complete(url, "rt").status_code == 404
        assert _complete(url, "tiny").status_code == 200
    finally:
        stop_server(proc)


@pytest.mark.gpu
def test_gpu_mixed_batch_with_cuda_graphs(world) -> None:
    """On CUDA (bf16, CUDA graphs on): a batch of two adapters and the base model equals
    the merged references; a base-only step afterwards still runs from the graphs."""
    from modelport import LLM

    kw = dict(max_model_len=128, block_size=16, dtype="bfloat16", gpu_memory_utilization=0.3)
    refs = {}
    for key in ("base", "merged_a", "merged_b"):
        llm = LLM(str(world[key]), **kw)
        refs[key] = _greedy(llm, PROMPTS)
        del llm
        torch.cuda.empty_cache()
    llm = LLM(str(world["base"]), enable_lora=True, max_loras=2, max_lora_rank=8, **kw)
    assert llm.llm_engine.core.runner.graphs is not None  # not disabled by enable_lora
    la, lb = LoRARequest("sql", 1, str(world["a"])), LoRARequest("chat", 2, str(world["b"]))
    outs = _greedy(llm, [PROMPTS[0]] * 3, lora_request=[la, None, lb])
    for out, key in zip(outs, ("merged_a", "base", "merged_b")):
        _assert_close_bf16(out, refs[key][0], key)
    _assert_close_bf16(_greedy(llm, [PROMPTS[1]])[0], refs["base"][1], "base alone")


def _assert_close_bf16(out, ref, what: str) -> None:
    """bf16: the first token equal, logprobs close while the two sequences agree."""
    got_ids, ref_ids = out.outputs[0].token_ids, ref.outputs[0].token_ids
    assert got_ids[0] == ref_ids[0], what
    n = next((i for i, (g, r) in enumerate(zip(got_ids, ref_ids)) if g != r), len(ref_ids))
    assert _lps(out)[:n] == pytest.approx(_lps(ref)[:n], abs=0.1), what
