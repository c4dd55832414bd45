"""Data parallelism: `modelport serve --data-parallel-size N` runs N engine cores (replicas,
each its own process and KV cache) behind one server.

- requests spread over the replicas (fewest in flight first), each answered once, with the
  tokens one replica alone gives; the n samples of a request stay on one replica;
- aborts follow a request to its replica, which frees it and keeps serving;
- stats are the replicas' merged (KV blocks add up); /metrics has each replica's series under
  its own `engine` label, each request's counts under the replica that ran it;
- one replica's death ends the engine with an error naming it;
- the offline engine refuses data_parallel_size > 1, pointing at `serve`.
"""

from __future__ import annotations

import asyncio
import itertools
import os
import signal
import time

import httpx
import pytest

from helpers.server_proc import start_server, stop_server
from helpers.tiny_models import make_tiny_llama_dir
from modelport import LLM, SamplingParams
from modelport.engine.arg_utils import EngineArgs
from modelport.engine.async_llm import AsyncLLM
from modelport.engine.core_client import DPEngineCoreClient, replica_config

PROMPTS = [[(5 * i + 3 * j + 1) % 200 + 10 for j in range(6 + i)] for i in range(6)]
GREEDY = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)
KV = 4 << 20
KV_FLAG = "4MiB"


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return make_tiny_llama_dir(tmp_path_factory.mktemp("dp") / "tiny")


@pytest.fixture(scope="module")
def offline(model_dir):
    llm = LLM(str(model_dir), kv_cache_memory=KV, max_model_len=64)
    return [o.outputs[0] for o in llm.generate(prompt_token_ids=PROMPTS, sampling_params=GREEDY)]


@pytest.fixture(scope="module")
def expected(offline):
    return [o.token_ids for o in offline]


def _args(model_dir, dp: int) -> EngineArgs:
    return EngineArgs(model=str(model_dir), data_parallel_size=dp, kv_cache_memory=KV,
                      max_model_len=64)


async def _collect(llm: AsyncLLM, rid: str, ids: list[int], params: SamplingParams):
    final = None
    async for out in llm.generate(ids, params, rid):
        final = out
    return final


def test_requests_spread_over_replicas_with_single_replica_tokens(model_dir, expected):
    async def main():
        llm = await AsyncLLM.from_engine_args(_args(model_dir, 2))
        try:
            client = llm.client
            assert isinstance(client, DPEngineCoreClient) and len(client.clients) == 2
            assert len(set(client.pids)) == 2
            one = llm.engine_config
            assert llm.ready.num_kv_blocks == 2 * client.clients[0].ready.num_kv_blocks
            outs = await asyncio.gather(*(
                _collect(llm, f"r{i}", p, GREEDY) for i, p in enumerate(PROMPTS)))
            assert [o.outputs[0].token_ids for o in outs] == expected
            assert all(o.finished for o in outs)
            assert client.num_added[0] > 0 and client.num_added[1] > 0
            assert sum(client.num_added) == len(PROMPTS)
            # n samples share the prompt's KV blocks: all go to one replica
            before = list(client.num_added)
            n4 = SamplingParams(temperature=0.8, seed=1, n=4, max_tokens=4)
            out = await _collect(llm, "n4", PROMPTS[0], n4)
            assert len(out.outputs) == 4 and all(len(c.token_ids) == 4 for c in out.outputs)
            added = [a - b for a, b in zip(client.num_added, before)]
            assert sorted(added) == [0, 4]
            assert client._inflight == [0, 0] and not client._owner
            # merged stats: KV blocks of both replicas, nothing running now
            for _ in range(50):
                if llm.stats.num_kv_blocks:
                    break
                await asyncio.sleep(0.05)
            assert llm.stats.num_kv_blocks == llm.ready.num_kv_blocks
            assert one.parallel_config.data_parallel_size == 2
        finally:
            llm.shutdown()

    asyncio.run(main())


def test_abort_goes_to_the_owning_replica_and_it_keeps_serving(model_dir, expected):
    async def main():
        llm = await AsyncLLM.from_engine_args(_args(model_dir, 2))
        try:
            client = llm.client
            long = SamplingParams(temperature=0, max_tokens=50, ignore_eos=True)
            streams = [llm.generate(PROMPTS[i], long, f"a{i}") for i in range(2)]
            owners = {client._owner[f"a{i}"] for i in range(2)}
            assert owners == {0, 1}  # one each
            for s in streams:
                first = await s.__anext__()
                assert len(first.outputs[0].token_ids) >= 1
                await s.aclose()
            assert client._inflight == [0, 0] and not client._owner
            # both replicas freed the aborted requests and answer new ones
            outs = await asyncio.gather(*(
                _collect(llm, f"b{i}", p, GREEDY) for i, p in enumerate(PROMPTS[:4])))
            assert [o.outputs[0].token_ids for o in outs] == expected[:4]
            for _ in range(100):
                if llm.stats.num_running == 0:
                    break
                await asyncio.sleep(0.05)
            assert llm.stats.num_running == 0 and llm.stats.kv_cache_usage == 0.0
        finally:
            llm.shutdown()

    asyncio.run(main())


def test_a_dead_replica_ends_the_engine_naming_it(model_dir):
    async def main():
        llm = await AsyncLLM.from_engine_args(_args(model_dir, 2))
        try:
            dead = []
            llm.on_dead = dead.append
            os.kill(llm.client.pids[1], signal.SIGKILL)
            deadline = time.monotonic() + 20
            while not dead and time.monotonic() < deadline:
                await asyncio.sleep(0.05)
            assert dead and "data-parallel replica 1" in dead[0]
            with pytest.raises(RuntimeError, match="replica 1"):
                llm.generate(PROMPTS[0], GREEDY, "late")
        finally:
            llm.shutdown()

    asyncio.run(main())


def test_replica_configs_and_bad_sizes(model_dir):
    cfg = _args(model_dir, 3).create_engine_config()
    cuda = replica_config(
        type(cfg)(**{**cfg.__dict__, "device": "cuda:1",
                     "parallel_config": type(cfg.parallel_config)(2, 3)}), 2)
    assert cuda.device == "cuda:5" and cuda.parallel_config.data_parallel_rank == 2
    assert replica_config(cfg, 1).device == "cpu"
    with pytest.raises(ValueError, match="data_parallel_size must be >= 1"):
        _args(model_dir, 0).create_engine_config()
    with pytest.raises(ValueError, match="modelport serve --data-parallel-size"):
        LLM(str(model_dir), data_parallel_size=2, kv_cache_memory=KV)


def _engine_series(url: str) -> dict[str, dict[str, float]]:
    """/metrics' per-engine samples: name (with "/finished_reason" for request_success)
    -> {engine: value}."""
    import re

    out: dict[str, dict[str, float]] = {}
    text = httpx.get(f"{url}/metrics", timeout=30).text
    for m in re.finditer(r'^(modelport:\w+)\{engine="(\d+)"(?:,finished_reason="(\w+)")?'
                         r',model_name="[^"]*"\} (\S+)$', text, re.M):
        name = m[1] if m[3] is None else f"{m[1]}/{m[3]}"
        out.setdefault(name, {})[m[2]] = float(m[4])
    return out


def test_serve_with_two_replicas(model_dir, offline, tmp_path):
    log = tmp_path / "server.log"
    argv = ["-m", "modelport.entrypoints.cli", "serve", "--model", str(model_dir),
            "--data-parallel-size", "2", "--kv-cache-memory", KV_FLAG, "--max-model-len", "64"]
    proc, url = start_server(argv, log, timeout=180)
    try:
        # vLLM's engine label: both replicas' series exist (at 0) from the start
        fresh = _engine_series(url)
        for name in ("modelport:num_requests_running", "modelport:prompt_tokens_total",
                     "modelport:generation_tokens_total", "modelport:kv_cache_usage_perc",
                     "modelport:time_to_first_token_seconds_count",
                     "modelport:iteration_tokens_total_count"):
            assert fresh[name] == {"0": 0.0, "1": 0.0}, (name, fresh.get(name))
        for reason in ("stop", "length", "abort"):
            assert fresh[f"modelport:request_success_total/{reason}"] == {"0": 0.0, "1": 0.0}

        async def main():
            async with httpx.AsyncClient(base_url=url, timeout=60) as c:
                rs = await asyncio.gather(*(c.post("/v1/completions", json={
                    "model": "tiny", "prompt": p, "max_tokens": 8, "temperature": 0,
                    "ignore_eos": True}) for p in PROMPTS))
                return [r.json() for r in rs]

        bodies = asyncio.run(main())
        assert [b["choices"][0]["text"] for b in bodies] == [o.text for o in offline]
        assert all(b["usage"]["completion_tokens"] == 8 for b in bodies)
        # each replica's counters hold its own requests: they add up to the whole, both
        # replicas served some, and each request's counts landed on one replica
        after = _engine_series(url)
        prompt = after["modelport:prompt_tokens_total"]
        gen = after["modelport:generation_tokens_total"]
        done = after["modelport:request_success_total/length"]
        assert sum(prompt.values()) == sum(b["usage"]["prompt_tokens"] for b in bodies)
        assert sum(gen.values()) == 8 * len(PROMPTS)
        assert sum(done.values()) == len(PROMPTS) and min(done.values()) >= 1, done
        for e in ("0", "1"):  # whole requests: 8 tokens each, prompt tokens of some subset
            assert gen[e] == 8 * done[e], (gen, done)
            assert after["modelport:e2e_request_latency_seconds_count"][e] == done[e]
            assert after["modelport:request_prompt_tokens_sum"][e] == prompt[e]
            assert after["modelport:iteration_tokens_total_count"][e] > 0
        lens = sorted(b["usage"]["prompt_tokens"] for b in bodies)
        assert any(sum(c) == prompt["0"] for c in itertools.combinations(lens, int(done["0"]))), (
            prompt, lens)
    finally:
        stop_server(proc)
    text = log.read_text()
    assert "data parallel: 2 replicas" in text, text[-3000:]
    assert "internal error" not in text


def test_a_core_whose_owner_left_while_it_loaded_exits_quietly(model_dir, tmp_path):
    # Ctrl-C during start-up: the owner is gone before the core reports ready; the core must
    # end with status 0 and no traceback (it printed a BrokenPipeError traceback before)
    import subprocess
    import sys
    import textwrap

    script = tmp_path / "orphan_core.py"
    script.write_text(textwrap.dedent(f"""
        import multiprocessing as mp
        from modelport.engine.arg_utils import EngineArgs
        from modelport.engine.core_client import run_engine_core
        if __name__ == "__main__":
            cfg = EngineArgs(model={str(model_dir)!r}, kv_cache_memory={KV}).create_engine_config()
            ctx = mp.get_context("spawn")
            in_recv, in_send = ctx.Pipe(duplex=False)
            out_recv, out_send = ctx.Pipe(duplex=False)
            p = ctx.Process(target=run_engine_core, args=(cfg, in_recv, out_send))
            p.start()
            out_send.close()
            out_recv.close()  # the owner's end of the core's output pipe: gone
            p.join(120)
            print("exitcode", p.exitcode)
    """))
    r = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=180)
    assert "exitcode 0" in r.stdout, r.stdout + r.stderr
    assert "Traceback" not in r.stderr, r.stderr
