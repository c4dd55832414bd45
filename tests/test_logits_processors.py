"""Custom logits processors (vLLM V1's contract, modelport/logits_processor.py): the batch
update the runner tells them, per-request targets through extra_args, the adapter for
per-request callables, validate_params offline and as the server's 400 (vllm_xargs), loading
by name, and the --logits-processors flag. A tiny random Llama on CPU."""

from __future__ import annotations

import random
from pathlib import Path

import pytest
import torch

from helpers.logits_processors import CountUp, Recorder, TargetToken
from helpers.openai_http import in_process
from helpers.tiny_models import make_tiny_llama_dir
from modelport import LLM, MoveDirectionality, SamplingParams
from modelport.engine.arg_utils import EngineArgs
from modelport.logits_processor import apply_moves, load_logits_processors
from modelport.runner.logits_processors import batch_update

SMALL = {"max_model_len": 128, "kv_cache_memory": 8 << 20, "device": "cpu"}
PROMPTS = [[1, 2, 3, 4], [10, 20, 30], [5, 6, 7, 8, 9], [40, 41], [100, 101, 102]]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    return make_tiny_llama_dir(tmp_path_factory.mktemp("lp") / "tiny")


@pytest.fixture(scope="module")
def llm(model_dir) -> LLM:
    return LLM(str(model_dir), logits_processors=[TargetToken, CountUp, Recorder],
               max_num_seqs=3, **SMALL)


def _gen(llm: LLM, params: list[SamplingParams]) -> list[list[int]]:
    outs = llm.generate([{"prompt_token_ids": p} for p in PROMPTS[: len(params)]], params,
                        use_tqdm=False)
    return [list(o.outputs[0].token_ids) for o in outs]


# ---------------------------------------------------------------- the batch update
def test_batch_update_takes_any_order_to_any_other() -> None:
    rng = random.Random(0)
    ids = [f"r{i}" for i in range(12)]
    for _ in range(500):
        old = rng.sample(ids, rng.randint(0, 8))
        new = rng.sample(ids, rng.randint(0, 8))
        state = dict(enumerate(old))
        u = batch_update(old, new, lambda j, new=new: (new[j], [], []))
        if u is None:
            assert old == new
            continue
        assert u.batch_size == len(new)
        limit = max(len(old), len(new))
        for index, rid, _, _ in u.added:
            assert index < limit and rid not in old
            state[index] = rid
        for index in u.removed:
            assert index < limit
            state.pop(index)
        assert all(a < limit and b < limit for a, b, _ in u.moved)
        apply_moves(state, u.moved)
        assert state == dict(enumerate(new))


def test_batch_update_keeps_rows_in_place_when_it_can() -> None:
    u = batch_update(["a", "b", "c"], ["a", "b", "c", "d"], lambda j: (None, [], []))
    assert [a[0] for a in u.added] == [3] and not u.removed and not u.moved
    u = batch_update(["a", "b", "c"], ["a", "c"], lambda j: (None, [], []))
    assert u.removed == [1] and u.moved == [(2, 1, MoveDirectionality.UNIDIRECTIONAL)]
    assert batch_update(["a", "b"], ["a", "b"], lambda j: (None, [], [])) is None


# ---------------------------------------------------------------- offline
def test_argmax_invariant_processors_see_temperature_scaled_logits(model_dir) -> None:
    """As vLLM's sampler: an argmax-invariant processor runs after temperature, only in
    steps that sample (none for an all-greedy step)."""
    from helpers.logits_processors import ScaledProbe

    llm = LLM(str(model_dir), logits_processors=[ScaledProbe], **SMALL)
    prompt = [{"prompt_token_ids": PROMPTS[0]}]
    firsts = []
    for temperature in (1.0, 0.5):
        ScaledProbe.seen = []
        llm.generate(prompt, SamplingParams(temperature=temperature, seed=0, max_tokens=1),
                     use_tqdm=False)
        assert len(ScaledProbe.seen) == 1
        firsts.append(ScaledProbe.seen[0])
    torch.testing.assert_close(firsts[1], firsts[0] * 2)  # the same logits over T = 0.5
    ScaledProbe.seen = []
    llm.generate(prompt, SamplingParams(temperature=0, max_tokens=2), use_tqdm=False)
    assert ScaledProbe.seen == []


def test_target_token_only_for_the_requests_that_ask(llm, model_dir) -> None:
    base = LLM(str(model_dir), max_num_seqs=3, **SMALL)
    lengths = [6, 3, 8, 2, 5]  # finishing at different steps, 3 running at a time
    plain = [SamplingParams(temperature=0, max_tokens=n, ignore_eos=True) for n in lengths]
    want = _gen(base, plain)
    targets = {0: 77, 2: 3, 4: 200}
    params = [SamplingParams(temperature=0, max_tokens=n, ignore_eos=True,
                             extra_args={"target_token": targets[i], "tag": str(i)}
                             if i in targets else {"tag": str(i)})
              for i, n in enumerate(lengths)]
    params[4] = SamplingParams(temperature=1.0, seed=3, max_tokens=5, ignore_eos=True,
                               extra_args={"target_token": 200, "tag": "4"})
    got = _gen(llm, params)
    for i, toks in enumerate(got):
        if i in targets:
            assert toks == [targets[i]] * lengths[i], (i, toks)
        else:
            assert toks == want[i], (i, toks, want[i])


def test_update_state_sees_adds_removes_and_rows_match(llm) -> None:
    lengths = [4, 1, 6, 2, 3]
    # sampled rows: an argmax-invariant processor (Recorder) is skipped for all-greedy steps
    params = [SamplingParams(temperature=1.0, seed=i, max_tokens=n, ignore_eos=True,
                             extra_args={"tag": str(i)}) for i, n in enumerate(lengths)]
    Recorder.log.clear()
    _gen(llm, params)
    updates = [u for kind, u in Recorder.log if kind == "update" and u is not None]
    applies = [a for kind, a in Recorder.log if kind == "apply"]
    added = [(params.extra_args["tag"]) for u in updates for _, params, _, _ in u.added]
    assert sorted(added) == ["0", "1", "2", "3", "4"]  # each once: none skips a step here
    assert sum(len(u.removed) for u in updates) + sum(
        1 for u in updates for *_, how in u.moved if how == MoveDirectionality.UNIDIRECTIONAL
    ) >= 1
    seen: dict[str, int] = {}
    for size, tags in applies:
        assert sorted(tags) == list(range(size)) and 1 <= size <= 3
        for tag in tags.values():
            seen[tag] = seen.get(tag, 0) + 1
    assert seen == {str(i): n for i, n in enumerate(lengths)}  # one row a sampled token
    # the requests left at the end are removed when the next batch comes
    last = applies[-1][1]
    Recorder.log.clear()
    _gen(llm, [SamplingParams(temperature=1.0, max_tokens=1, extra_args={"tag": "new"})])
    (u,) = [u for kind, u in Recorder.log if kind == "update"]
    assert u.batch_size == 1 and len(u.added) == 1
    assert len(u.removed) + len(u.moved) >= len(last) - 1
    assert Recorder.log[-1] == ("apply", (1, {0: "new"}))


def test_adapter_per_request_callables(llm, model_dir) -> None:
    base = LLM(str(model_dir), **SMALL)
    plain = SamplingParams(temperature=0, max_tokens=4, ignore_eos=True)
    want = _gen(base, [plain] * 3)
    params = [
        SamplingParams(temperature=0, max_tokens=4, ignore_eos=True,
                       extra_args={"count_from": 50, "tag": "a"}),
        SamplingParams(temperature=0, max_tokens=4, ignore_eos=True, extra_args={"tag": "b"}),
        SamplingParams(temperature=0.8, max_tokens=7, ignore_eos=True,
                       extra_args={"echo_prompt": True, "tag": "c"}),
    ]
    got = _gen(llm, params)
    assert got[0] == [50, 51, 52, 53]
    assert got[1] == want[1]
    assert got[2] == [5, 6, 7, 8, 9, 5, 6]  # PROMPTS[2] replayed


def test_validate_params_refuses_offline(llm) -> None:
    with pytest.raises(ValueError, match="target_token"):
        _gen(llm, [SamplingParams(max_tokens=2, extra_args={"target_token": "x"})])
    ok = _gen(llm, [SamplingParams(temperature=0, max_tokens=2, ignore_eos=True,
                                   extra_args={"target_token": 9, "tag": "z"})])
    assert ok == [[9, 9]]


# ---------------------------------------------------------------- loading and refusals
def test_loading_by_name_and_bad_names(model_dir) -> None:
    assert load_logits_processors(["helpers.logits_processors:TargetToken",
                                   "helpers.logits_processors.CountUp", Recorder]) == (
        TargetToken, CountUp, Recorder)
    for bad, says in [("helpers.logits_processors:Nope", "has no"),
                      ("no_such_pkg.mod:X", "cannot import"),
                      ("helpers.logits_processors:NotAProcessor", "not a logits processor"),
                      ("TargetToken", "fully-qualified")]:
        with pytest.raises(ValueError, match=says):
            EngineArgs(model=str(model_dir), logits_processors=[bad], **SMALL
                       ).create_engine_config()
    with pytest.raises(ValueError, match="speculative decoding"):
        EngineArgs(model=str(model_dir), logits_processors=[TargetToken],
                   speculative_config={"method": "ngram", "num_speculative_tokens": 2},
                   **SMALL).create_engine_config()


def test_cli_flag_reaches_the_engine(model_dir) -> None:
    from modelport.entrypoints import vllm_compat
    from modelport.entrypoints.cli import build_parser
    from modelport.entrypoints.openai.api_server import engine_args_from, make_parser

    name = "helpers.logits_processors:TargetToken"
    for args in (make_parser().parse_args(["--model", str(model_dir), "--logits-processors",
                                           name, "helpers.logits_processors.CountUp"]),
                 build_parser().parse_args(["serve", str(model_dir), "--logits-processors",
                                            name, "helpers.logits_processors.CountUp"])):
        vllm_compat.check(args)
        ea = engine_args_from(args)
        ea.kv_cache_memory, ea.device, ea.max_model_len = 8 << 20, "cpu", 128
        assert ea.create_engine_config().logits_processors == (TargetToken, CountUp)
    with pytest.raises(SystemExit, match="--logits-processors.*no_such"):
        vllm_compat.check(make_parser().parse_args(["--logits-processors", "no_such.m:X"]))


# ---------------------------------------------------------------- the OpenAI server
def test_server_vllm_xargs_and_the_400(model_dir) -> None:
    with in_process([
        "--model", str(model_dir), "--served-model-name", "tiny", "--max-model-len", "128",
        "--kv-cache-memory", "8MiB", "--logits-processors",
        "helpers.logits_processors:TargetToken"]) as c:
        body = {"model": "tiny", "prompt": [1, 2, 3], "max_tokens": 3, "ignore_eos": True,
                "temperature": 0, "logprobs": 0}
        r = c.post("/v1/completions", json={**body, "vllm_xargs": {"target_token": "x"}})
        assert r.status_code == 400, r.text
        err = r.json()["error"]
        assert "target_token" in err["message"] and err["type"] == "invalid_request_error"
        r = c.post("/v1/completions", json={**body, "vllm_xargs": {"target_token": 65}})
        assert r.status_code == 200, r.text
        lp = r.json()["choices"][0]["logprobs"]
        r2 = c.post("/v1/completions", json=body)
        assert r2.status_code == 200, r2.text
        assert lp["tokens"] == [lp["tokens"][0]] * 3
        assert r2.json()["choices"][0]["logprobs"]["tokens"] != lp["tokens"]
        r = c.post("/v1/chat/completions", json={
            "model": "tiny", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 3,
            "ignore_eos": True, "vllm_xargs": {"target_token": 66}})
        assert r.status_code == 200, r.text
        forced = r.json()["choices"][0]["message"]["content"]
        assert forced and len(set(forced)) == 1  # one token, three times
        # the Responses API takes vllm_xargs too: the same forced answer
        r = c.post("/v1/responses", json={"model": "tiny", "input": "hi",
                                          "max_output_tokens": 3, "vllm_xargs": {
                                              "target_token": 66}})
        assert r.status_code == 200, r.text
        assert r.json()["output"][0]["content"][0]["text"] == forced


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_target_token_on_cuda(model_dir) -> None:
    """On CUDA (decode in CUDA graphs, the sampler outside them, async scheduling off by
    default with processors): the asked-for requests get their token, the others the
    plain engine's greedy tokens."""
    cuda = {**SMALL, "device": "cuda"}
    lengths = [6, 3, 8, 2, 5]
    base = LLM(str(model_dir), max_num_seqs=3, **cuda)
    want = _gen(base, [SamplingParams(temperature=0, max_tokens=n, ignore_eos=True)
                       for n in lengths])
    del base
    llm = LLM(str(model_dir), logits_processors=["helpers.logits_processors:TargetToken"],
              max_num_seqs=3, **cuda)
    assert llm.llm_engine.config.async_scheduling is False
    targets = {0: 77, 2: 3, 4: 200}
    got = _gen(llm, [SamplingParams(temperature=0, max_tokens=n, ignore_eos=True,
                                    extra_args={"target_token": targets[i]} if i in targets
                                    else None) for i, n in enumerate(lengths)])
    for i, toks in enumerate(got):
        assert toks == ([targets[i]] * lengths[i] if i in targets else want[i]), (i, toks)
