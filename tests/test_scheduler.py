"""Scheduler: token budget, chunked prefill, mixed steps, preemption (pure Python, fake runner)."""

import pytest

from modelport.config import SchedulerConfig
from modelport.engine.kv_cache_manager import KVCacheManager
from modelport.engine.request import Request, RequestStatus
from modelport.engine.scheduler import QueueFullError, Scheduler
from modelport.sampling_params import SamplingParams


def make(num_blocks=16, block_size=4, budget=8, max_seqs=4, max_len=64, prefix=True, **kw):
    kv = KVCacheManager(num_blocks, block_size, prefix)
    return Scheduler(SchedulerConfig(max_num_seqs=max_seqs, max_num_batched_tokens=budget,
                                     max_model_len=max_len, **kw), kv)


def req(rid, n_prompt, max_tokens=4, base=0, **kw):
    return Request(rid, [base + i for i in range(n_prompt)],
                   SamplingParams(max_tokens=max_tokens, temperature=0, **kw), eos_token_ids=(2,))


def step(s: Scheduler, token: int = 7):
    out = s.schedule()
    sampled = {x.request_id: token for x in out.scheduled if x.sample}
    s.update(out, sampled)
    return out


def test_chunked_prefill_and_decode_share_a_step() -> None:
    s = make(budget=8)
    a, b = req("a", 6), req("b", 10, base=100)
    s.add_request(a)
    s.add_request(b)
    o1 = s.schedule()
    assert [(x.request_id, x.start, x.num_tokens, x.sample) for x in o1.scheduled] == [
        ("a", 0, 6, True), ("b", 0, 2, False)]
    assert o1.scheduled[0].block_ids == [0, 1] and o1.scheduled[1].block_ids == [2]
    s.update(o1, {"a": 7})
    o2 = s.schedule()
    # a decodes one token, b continues its prefill with the rest of the budget
    assert [(x.request_id, x.start, x.num_tokens, x.sample) for x in o2.scheduled] == [
        ("a", 6, 1, True), ("b", 2, 7, False)]
    assert o2.num_batched_tokens == 8


def test_finishes_at_max_tokens_and_frees_blocks() -> None:
    s = make()
    s.add_request(req("a", 3, max_tokens=2))
    step(s)
    assert s.kv.num_free_blocks == 15
    step(s)
    assert not s.has_unfinished_requests()
    assert s.kv.num_free_blocks == 16


def test_eos_stops_unless_ignored_or_min_tokens() -> None:
    s = make(budget=16)
    a = req("a", 3, max_tokens=5)
    b = req("b", 3, max_tokens=5, base=100, ignore_eos=True)
    c = req("c", 3, max_tokens=5, base=200, min_tokens=2)
    for r in (a, b, c):
        s.add_request(r)
    step(s, token=2)
    assert a.status == RequestStatus.FINISHED_STOPPED
    assert b.status == RequestStatus.RUNNING and c.status == RequestStatus.RUNNING
    step(s, token=2)
    assert c.status == RequestStatus.FINISHED_STOPPED and c.output_token_ids == [2, 2]


def test_admission_rejects_over_max_model_len() -> None:
    s = make(max_len=16)
    with pytest.raises(ValueError, match=r"prompt \(14 tokens\) \+ max_tokens \(4\) = 18 exceeds max_model_len \(16\)"):
        s.add_request(req("a", 14))
    s.add_request(req("ok", 4))
    step(s)
    assert s.num_running == 1


def test_waiting_queue_bound() -> None:
    s = make(max_waiting_requests=1)
    s.add_request(req("a", 3))
    with pytest.raises(QueueFullError):
        s.add_request(req("b", 3))


def test_max_num_seqs_limits_running() -> None:
    s = make(max_seqs=2, budget=64)
    for i in range(3):
        s.add_request(req(str(i), 3, base=10 * i))
    out = s.schedule()
    assert [x.request_id for x in out.scheduled] == ["0", "1"]
    assert s.num_waiting == 1


def test_preemption_newest_first_and_resume() -> None:
    # 4 blocks of 4 tokens; two requests of 7-token prompts take 2 blocks each;
    # growing past 8 tokens needs a 5th block -> the newest (b) is preempted
    s = make(num_blocks=4, budget=32, prefix=False)
    a, b = req("a", 7, max_tokens=6), req("b", 7, max_tokens=6, base=50)
    s.add_request(a)
    s.add_request(b)
    step(s)  # prefill both, each samples 1 -> 8 tokens in 2 blocks
    step(s)  # decode: 9 tokens, 8 computed; the cache is now full
    out = s.schedule()
    assert out.preempted_ids == ["b"]
    assert [x.request_id for x in out.scheduled] == ["a"]
    assert b.status == RequestStatus.PREEMPTED and b.num_computed_tokens == 0
    assert s.waiting[0] is b
    s.update(out, {"a": 7})
    while a.status == RequestStatus.RUNNING:
        step(s)
    # a finished and freed its blocks: b is readmitted and recomputes prompt + its output so far
    out = s.schedule()
    assert [(x.request_id, x.start, x.num_tokens) for x in out.scheduled] == [("b", 0, 9)]
    s.kv.check_integrity()


def test_prefix_hit_skips_compute() -> None:
    s = make(budget=64)
    a = req("a", 9)
    s.add_request(a)
    step(s)
    b = req("b", 9)  # same prompt
    s.add_request(b)
    out = s.schedule()
    sb = [x for x in out.scheduled if x.request_id == "b"][0]
    assert (sb.start, sb.num_tokens) == (8, 1)
    assert b.num_cached_tokens == 8
    assert sb.block_ids[:2] == s.kv.block_ids("a")[:2]


def test_abort_frees_and_reports_finished() -> None:
    s = make()
    s.add_request(req("a", 5))
    step(s)
    s.abort_requests(["a"])
    assert s.kv.num_free_blocks == 16
    out = s.schedule()
    assert out.finished_ids == ["a"] and out.is_empty


def test_equal_prompts_wait_for_the_first_prefill_and_share_its_blocks() -> None:
    s = make(budget=64)
    kids = [req(f"{i}_p", 10, max_tokens=3) for i in range(3)]  # n=3 children of one prompt
    other = req("other", 10, base=500)
    for r in (*kids, other):
        s.add_request(r)
    o1 = s.schedule()
    # only the first child prefills; its siblings wait a step, the unrelated prompt does not
    assert [x.request_id for x in o1.scheduled] == ["0_p", "other"]
    assert [r.request_id for r in s.waiting] == ["1_p", "2_p"]
    s.update(o1, {"0_p": 7, "other": 7})
    o2 = s.schedule()
    got = {x.request_id: (x.start, x.num_tokens) for x in o2.scheduled}
    assert got["1_p"] == (8, 2) and got["2_p"] == (8, 2)  # two blocks from the cache
    assert s.kv.block_ids("1_p")[:2] == s.kv.block_ids("0_p")[:2] == s.kv.block_ids("2_p")[:2]
    assert s.kv.blocks[s.kv.block_ids("0_p")[0]].ref_cnt == 3
