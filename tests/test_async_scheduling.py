"""Async scheduling: step N+1 is scheduled and launched before step N's tokens are read.

On CPU the launch runs the forward synchronously, so these tests check the bookkeeping
(placeholders, the device-side fill of not-yet-known input ids, dropped tokens of requests
that stopped while a step was in flight), not the overlap itself: every output must equal
the synchronous engine's, token for token, with no token lost or sent twice.
"""

from __future__ import annotations

import pytest

from helpers.tiny_models import make_tiny_llama_dir
from modelport import LLM, SamplingParams
from modelport.config import SchedulerConfig
from modelport.engine.kv_cache_manager import KVCacheManager
from modelport.engine.request import Request
from modelport.engine.scheduler import Scheduler

PROMPTS = [
    [256, 10, 20, 30],
    [256] + list(range(40, 77)),
    [256, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16, 17, 18, 19, 20],
    [256, 99],
    [256] + list(range(120, 141)),
]
KV_MEM = 8 << 20


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory):
    return make_tiny_llama_dir(tmp_path_factory.mktemp("llama_async") / "m")


def make_pair(llama_dir, **kw):
    kw = {"kv_cache_memory": KV_MEM, "max_num_batched_tokens": 16, "block_size": 8, **kw}
    return (LLM(str(llama_dir), async_scheduling=False, **kw),
            LLM(str(llama_dir), async_scheduling=True, **kw))


@pytest.fixture(scope="module")
def pair(llama_dir):
    sync, asyn = make_pair(llama_dir)
    assert not sync.llm_engine.core.async_scheduling
    assert asyn.llm_engine.core.async_scheduling
    return sync, asyn


def run(llm, params, prompts=PROMPTS):
    outs = llm.generate(prompt_token_ids=prompts, sampling_params=params, use_tqdm=False)
    return [[(c.token_ids, c.finish_reason, c.stop_reason) for c in o.outputs] for o in outs]


def test_greedy_with_chunked_prefill_equals_sync(pair) -> None:
    sync, asyn = pair
    params = [SamplingParams(temperature=0, max_tokens=m, ignore_eos=True) for m in (9, 3, 12, 1, 6)]
    want = run(sync, params)
    assert run(asyn, params) == want
    assert [len(o[0][0]) for o in want] == [9, 3, 12, 1, 6]
    core = asyn.llm_engine.core
    assert core._inflight is None and not core.has_unfinished_requests()
    assert core.kv.num_free_blocks == core.kv.num_blocks


def test_stop_tokens_drop_the_in_flight_token(pair) -> None:
    sync, asyn = pair
    base = run(sync, SamplingParams(temperature=0, max_tokens=10, ignore_eos=True))
    # stop each request at its 3rd greedy token: the async engine has already launched the
    # step after it, whose token must not reach the output
    params = [SamplingParams(temperature=0, max_tokens=10, stop_token_ids=[o[0][0][2]])
              for o in base]
    want = run(sync, params)
    got = run(asyn, params)
    assert got == want
    for o, b in zip(got, base):
        toks, reason, stop = o[0]
        assert reason == "stop" and stop == b[0][0][2]
        assert toks == b[0][0][: b[0][0].index(stop) + 1]
    assert asyn.llm_engine.core.kv.num_free_blocks == asyn.llm_engine.core.kv.num_blocks


def test_seeded_sampling_and_n_equal_sync(pair) -> None:
    sync, asyn = pair
    params = [SamplingParams(temperature=1.0, top_p=0.9, top_k=40, seed=100 + i, max_tokens=8,
                             ignore_eos=True) for i in range(len(PROMPTS))]
    assert run(asyn, params) == run(sync, params)
    nparams = SamplingParams(n=3, temperature=1.0, seed=5, max_tokens=7, ignore_eos=True)
    got = run(asyn, nparams, PROMPTS[1:3])
    assert got == run(sync, nparams, PROMPTS[1:3])
    assert all(len(c[0]) == 7 for o in got for c in o)


def test_requests_needing_history_drain_the_pipeline(pair) -> None:
    sync, asyn = pair
    plain = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)
    params = [plain, SamplingParams(temperature=0, max_tokens=8, ignore_eos=True,
                                    repetition_penalty=1.5, frequency_penalty=0.5),
              plain, SamplingParams(temperature=0, max_tokens=5, min_tokens=4), plain]
    assert run(asyn, params) == run(sync, params)
    lp = SamplingParams(temperature=0, max_tokens=4, logprobs=2, prompt_logprobs=1, ignore_eos=True)
    a = asyn.generate(prompt_token_ids=PROMPTS[:2], sampling_params=lp, use_tqdm=False)
    s = sync.generate(prompt_token_ids=PROMPTS[:2], sampling_params=lp, use_tqdm=False)
    for x, y in zip(a, s):
        assert x.outputs[0].token_ids == y.outputs[0].token_ids
        assert x.outputs[0].cumulative_logprob == pytest.approx(y.outputs[0].cumulative_logprob)
        assert len(x.prompt_logprobs) == len(y.prompt_logprobs)


def test_preemption_under_a_tight_cache_equals_sync(llama_dir) -> None:
    prompts = [[256] + [(7 * i + j) % 250 for j in range(19)] for i in range(4)]
    params = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True)
    roomy = LLM(str(llama_dir), kv_cache_memory=KV_MEM, block_size=8, async_scheduling=False)
    want = run(roomy, params, prompts)
    per_block = 8 * 2 * 2 * 2 * 16 * 4  # tokens x (K,V) x layers x kv_heads x head_dim x fp32
    tight = LLM(str(llama_dir), kv_cache_memory=6 * per_block, block_size=8, max_model_len=48,
                async_scheduling=True)
    assert run(tight, params, prompts) == want
    core = tight.llm_engine.core
    assert core.scheduler.num_preemptions > 0
    assert core.kv.num_free_blocks == 6


def test_abort_while_a_step_is_in_flight(pair) -> None:
    _, asyn = pair
    eng = asyn.llm_engine
    params = SamplingParams(temperature=0, max_tokens=20, ignore_eos=True)
    for i, p in enumerate(PROMPTS[:3]):
        eng.add_request(f"r{i}", p, params)
    seen: dict[str, list] = {}
    steps = 0
    while eng.has_unfinished_requests():
        for out in eng.step():
            seen.setdefault(out.request_id, []).append(out)
        steps += 1
        if steps == 6:
            assert eng.core._inflight is not None  # a launched step is pending right now
            eng.abort_request(["r1"])
    assert "r1" not in seen or not seen["r1"][-1].finished or \
        seen["r1"][-1].outputs[0].finish_reason == "abort"
    for rid in ("r0", "r2"):
        final = seen[rid][-1]
        assert final.finished and len(final.outputs[0].token_ids) == 20
    assert eng.core.kv.num_free_blocks == eng.core.kv.num_blocks


def test_scheduler_placeholders_without_update_in_between() -> None:
    kv = KVCacheManager(16, 4, True)
    s = Scheduler(SchedulerConfig(max_num_seqs=4, max_num_batched_tokens=8, max_model_len=64), kv)
    r = Request("a", [1, 2, 3, 4, 5], SamplingParams(temperature=0, max_tokens=3),
                eos_token_ids=(0,))
    s.add_request(r)
    o1 = s.schedule()  # prefill; its sampled token becomes a placeholder
    assert [(x.start, x.num_tokens, x.sample) for x in o1.scheduled] == [(0, 5, True)]
    assert r.num_placeholders == 1 and r.num_computed_tokens == 5
    o2 = s.schedule()  # decode of the placeholder, before o1's token is known
    assert [(x.start, x.num_tokens, x.sample) for x in o2.scheduled] == [(5, 1, True)]
    assert r.num_placeholders == 2 and len(o2.scheduled[0].block_ids) == 2
    s.update(o1, {"a": 9})
    assert r.output_token_ids == [9] and r.num_placeholders == 1
    # two tokens known or in flight of max_tokens=3: one more step may be scheduled ...
    o3 = s.schedule()
    assert [(x.start, x.num_tokens) for x in o3.scheduled] == [(6, 1)]
    # ... but not a fourth: the in-flight tokens already reach max_tokens
    assert s.schedule().is_empty
    s.update(o2, {"a": 8})
    s.update(o3, {"a": 7})
    assert r.output_token_ids == [9, 8, 7] and r.is_finished
    assert kv.num_free_blocks == 16
