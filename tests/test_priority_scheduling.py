"""vLLM's priority scheduling (--scheduling-policy priority): waiting requests admitted by
(priority, arrival), a running request short of KV blocks preempting the running request with
the largest (priority, arrival); fcfs refusing a nonzero priority as vLLM does."""

from __future__ import annotations

import httpx
import pytest

from helpers.server_proc import start_server, stop_server
from helpers.tiny_models import make_tiny_llama_dir
from modelport import LLM, SamplingParams
from modelport.config import SchedulerConfig
from modelport.engine.kv_cache_manager import KVCacheManager
from modelport.engine.request import Request, RequestStatus
from modelport.engine.scheduler import Scheduler
from modelport.entrypoints.openai.errors import error_body

FCFS_ERROR = "Got priority 3 but Priority scheduling is not enabled."


def make(policy="priority", num_blocks=16, block_size=4, budget=32, max_seqs=4, prefix=False):
    kv = KVCacheManager(num_blocks, block_size, prefix)
    return Scheduler(SchedulerConfig(max_num_seqs=max_seqs, max_num_batched_tokens=budget,
                                     max_model_len=64, policy=policy), kv)


def req(rid, n_prompt, priority=0, arrival=0.0, max_tokens=6, base=0):
    return Request(rid, [base + i for i in range(n_prompt)],
                   SamplingParams(max_tokens=max_tokens, temperature=0, ignore_eos=True),
                   eos_token_ids=(2,), arrival_time=arrival, priority=priority)


def step(s: Scheduler, token: int = 7):
    out = s.schedule()
    s.update(out, {x.request_id: token for x in out.scheduled if x.sample})
    return out


def test_admission_by_priority_then_arrival() -> None:
    s = make(max_seqs=1)
    for rid, prio, t in [("a", 2, 1.0), ("b", 0, 2.0), ("c", 1, 3.0), ("d", 0, 1.5), ("e", 2, 0.5)]:
        s.add_request(req(rid, 3, prio, t, max_tokens=1, base=10 * len(s.requests)))
    assert [r.request_id for r in s.waiting] == ["d", "b", "c", "e", "a"]
    admitted = []
    while s.has_unfinished_requests():
        admitted += [x.request_id for x in step(s).scheduled]
    assert admitted == ["d", "b", "c", "e", "a"]
    # fcfs: arrival order of add_request, whatever the arrival times
    f = make("fcfs", max_seqs=1)
    for rid in "xyz":
        f.add_request(req(rid, 3, arrival=-ord(rid)))
    assert [r.request_id for r in f.waiting] == ["x", "y", "z"]


def test_abort_of_a_waiting_request_keeps_the_order() -> None:
    s = make(max_seqs=1)
    for rid, prio in [("a", 3), ("b", 1), ("c", 2), ("d", 0)]:
        s.add_request(req(rid, 3, prio, 1.0))
    s.abort_requests(["c"])
    assert [r.request_id for r in s.waiting] == ["d", "b", "a"]
    out = s.schedule()
    assert out.finished_ids == ["c"] and [x.request_id for x in out.scheduled] == ["d"]
    assert [r.request_id for r in s.waiting] == ["b", "a"]


def _older_low_then_newer_high(policy: str):
    # 4 blocks of 4 tokens; "low" (priority 1, arrived first) runs, then "high" (priority 0)
    # joins; both hold 2 blocks when "low" needs a third
    s = make(policy, num_blocks=4)
    low, high = req("low", 7, priority=1, arrival=1.0), req("high", 7, priority=0, arrival=2.0)
    if policy == "fcfs":
        low.priority = high.priority = 0
    s.add_request(low)
    step(s)  # low: 7 prompt tokens, samples the 8th
    s.add_request(high)
    step(s)  # low decodes in its 2nd block, high prefills 7 tokens: the cache is full
    return s, low, high


def test_priority_preempts_the_lowest_priority_not_the_newest() -> None:
    s, low, high = _older_low_then_newer_high("priority")
    out = s.schedule()
    # low needs a 3rd block: the victim is the largest (priority, arrival), low itself; the
    # requests after it in the running list still run
    assert out.preempted_ids == ["low"]
    assert [x.request_id for x in out.scheduled] == ["high"]
    assert low.status is RequestStatus.PREEMPTED and low.num_computed_tokens == 0
    assert low.output_token_ids == [7, 7]  # kept for the recompute
    s.update(out, {"high": 9})
    s.kv.check_integrity()


def test_fcfs_preempts_the_newest() -> None:
    s, low, high = _older_low_then_newer_high("fcfs")
    out = s.schedule()
    assert out.preempted_ids == ["high"]
    assert [x.request_id for x in out.scheduled] == ["low"]


def test_victim_scheduled_earlier_in_the_step_is_taken_back() -> None:
    s = make(num_blocks=4)
    low = req("low", 6, priority=5, arrival=1.0, max_tokens=4)
    high = req("high", 8, priority=0, arrival=2.0, max_tokens=4, base=100)
    s.add_request(low)
    step(s)  # low: 6 + 1 tokens in 2 blocks
    s.add_request(high)
    step(s)  # low decodes (still 2 blocks), high prefills 8 tokens (2 blocks): cache full
    out = s.schedule()
    # low (first in the running list) fits in its block and is scheduled; then high needs a
    # 3rd block: low is the victim, its token and budget are taken back in this step
    assert out.preempted_ids == ["low"]
    assert [(x.request_id, x.start, x.num_tokens) for x in out.scheduled] == [("high", 8, 1)]
    assert out.num_batched_tokens == 1
    assert low.num_placeholders == 0 and low.num_computed_tokens == 0
    assert low.status is RequestStatus.PREEMPTED and list(s.waiting) == [low]
    s.update(out, {"high": 9})
    while s.has_unfinished_requests():
        o = step(s)
        assert all(x.request_id != "low" for x in o.scheduled) or high.is_finished
    # every token once: low resumed with its output so far and finished at max_tokens
    assert high.output_token_ids == [7, 9, 7, 7]
    assert low.output_token_ids == [7, 7, 7, 7] and low.num_preemptions == 1
    assert s.kv.num_free_blocks == 4
    s.kv.check_integrity()


def test_fcfs_scheduler_refuses_a_nonzero_priority() -> None:
    s = make("fcfs")
    with pytest.raises(ValueError, match="^Got priority 3 but Priority scheduling is not enabled"):
        s.add_request(req("a", 3, priority=3))
    assert not s.has_unfinished_requests()
    make().add_request(req("a", 3, priority=-4))  # any int in priority mode
    with pytest.raises(ValueError, match="scheduling policy"):
        SchedulerConfig(policy="lifo")


# -- the engine -----------------------------------------------------------------------------

@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory):
    return make_tiny_llama_dir(tmp_path_factory.mktemp("prio") / "m")


PER_BLOCK = 8 * 2 * 2 * 2 * 16 * 4  # tokens x (K,V) x layers x kv_heads x head_dim x fp32


@pytest.mark.parametrize("async_scheduling", [False, True])
def test_preempted_requests_keep_their_greedy_tokens(llama_dir, async_scheduling) -> None:
    prompts = [[256] + [(7 * i + j) % 250 for j in range(19)] for i in range(5)]
    params = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True)
    roomy = LLM(str(llama_dir), kv_cache_memory=8 << 20, block_size=8, async_scheduling=False)
    want = [o.outputs[0].token_ids
            for o in roomy.generate(prompt_token_ids=prompts, sampling_params=params,
                                    use_tqdm=False)]
    tight = LLM(str(llama_dir), kv_cache_memory=6 * PER_BLOCK, block_size=8, max_model_len=48,
                scheduling_policy="priority", async_scheduling=async_scheduling)
    assert tight.llm_engine.config.scheduler_config.policy == "priority"
    got = tight.generate(prompt_token_ids=prompts, sampling_params=params, use_tqdm=False,
                         priority=[3, 0, 2, 1, 0])
    assert [o.outputs[0].token_ids for o in got] == want
    assert all(o.outputs[0].finish_reason == "length" for o in got)
    core = tight.llm_engine.core
    assert core.scheduler.num_preemptions > 0
    assert core.kv.num_free_blocks == 6 and not core.has_unfinished_requests()


def test_engine_admits_by_priority(llama_dir) -> None:
    llm = LLM(str(llama_dir), kv_cache_memory=8 << 20, block_size=8, max_num_seqs=1,
              scheduling_policy="priority")
    params = SamplingParams(temperature=0, max_tokens=2, ignore_eos=True)
    eng = llm.llm_engine
    for rid, prio in [("a", 2), ("b", 0), ("c", 1)]:
        eng.add_request(rid, [256, 5, 6], params, priority=prio)
    done = []
    while eng.has_unfinished_requests():
        done += [o.request_id for o in eng.step() if o.finished]
    assert done == ["b", "c", "a"]


def test_fcfs_engine_refuses_a_nonzero_priority(llama_dir) -> None:
    llm = LLM(str(llama_dir), kv_cache_memory=8 << 20, block_size=8)
    params = SamplingParams(temperature=0, max_tokens=2)
    with pytest.raises(ValueError, match=f"^{FCFS_ERROR}$"):
        llm.generate(prompt_token_ids=[[256, 5], [256, 6]], sampling_params=params,
                     priority=[0, 3], use_tqdm=False)
    assert not llm.llm_engine.has_unfinished_requests()
    out = llm.generate(prompt_token_ids=[[256, 5]], sampling_params=params, priority=[0],
                       use_tqdm=False)  # 0 is fine under fcfs
    assert len(out[0].outputs[0].token_ids) == 2
    with pytest.raises(ValueError, match="priorities for 2 prompts"):
        llm.generate(prompt_token_ids=[[256, 5], [256, 6]], priority=[0], use_tqdm=False)


def test_cli_flag_reaches_the_scheduler_config(llama_dir) -> None:
    from modelport.entrypoints import vllm_compat
    from modelport.entrypoints.cli import build_parser
    from modelport.entrypoints.openai.api_server import engine_args_from, make_parser

    for argv in (["serve", "--model", str(llama_dir)], ["--model", str(llama_dir)]):
        parser = build_parser() if argv[0] == "serve" else make_parser()
        default = parser.parse_args(argv)
        assert engine_args_from(default).scheduling_policy == "fcfs"
        args = parser.parse_args([*argv, "--scheduling-policy", "priority"])
        vllm_compat.check(args)  # no longer refused
        engine_args = engine_args_from(args)
        assert engine_args.create_engine_config().scheduler_config.policy == "priority"
    with pytest.raises(SystemExit):
        make_parser().parse_args(["--scheduling-policy", "lifo"])


# -- the OpenAI server ---------------------------------------------------------------------

@pytest.fixture(scope="module")
def servers(llama_dir, tmp_path_factory):
    out = {}
    procs = []
    try:
        for policy in ("fcfs", "priority"):
            log = tmp_path_factory.mktemp(f"srv_{policy}") / "server.log"
            argv = ["-m", "modelport.entrypoints.cli", "serve", "--model", str(llama_dir),
                    "--served-model-name", "tiny", "--max-model-len", "64",
                    "--kv-cache-memory", "8MiB", "--scheduling-policy", policy]
            proc, url = start_server(argv, log, timeout=180)
            procs.append(proc)
            out[policy] = url
        yield out
    finally:
        for proc in procs:
            stop_server(proc)


def test_openai_server_fcfs_400_and_priority_served(servers) -> None:
    chat = {"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
    completion = {"model": "tiny", "prompt": "hello", "max_tokens": 2}
    for path, body in (("/v1/chat/completions", chat), ("/v1/completions", completion)):
        for stream in (False, True):
            r = httpx.post(f"{servers['fcfs']}{path}", json={**body, "priority": 3,
                                                              "stream": stream}, timeout=60)
            assert r.status_code == 400, r.text
            err = r.json()["error"]
            assert err == error_body(FCFS_ERROR, 400, param="priority")["error"]
        ok = httpx.post(f"{servers['fcfs']}{path}", json={**body, "priority": 0}, timeout=60)
        assert ok.status_code == 200, ok.text
        served = httpx.post(f"{servers['priority']}{path}", json={**body, "priority": -2},
                            timeout=60)
        assert served.status_code == 200, served.text
        assert served.json()["usage"]["completion_tokens"] == 2
