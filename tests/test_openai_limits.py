"""--api-key, the bounded waiting queue (503 + Retry-After) and --served-model-name, through
the seed's launch form `python -m modelport.entrypoints.openai.api_server`.

One engine slot (--max-num-seqs 1) and a waiting queue of one make back-pressure certain with
a handful of concurrent requests.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal

import httpx
import openai
import pytest

from helpers.server_proc import start_server, stop_server

KEY = "s3cret-key"


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    log = tmp_path_factory.mktemp("limits") / "server.log"
    argv = [
        "-m", "modelport.entrypoints.openai.api_server", "--api-key", KEY,
        "--max-num-seqs", "1", "--max-waiting-requests", "1", "--max-model-len", "128",
        "--served-model-name", "smol", "smol-alias",
    ]  # fmt: skip
    seen: set[int | None] = set()
    proc, url = start_server(argv, log, on_status=seen.add)
    try:
        yield url, 503 in seen, log, proc
    finally:
        stop_server(proc)


@pytest.fixture(scope="module")
def base(server):
    return server[:2]


@pytest.fixture(scope="module")
def server_log(server):
    return server[2]


@pytest.fixture(scope="module")
def server_proc(server):
    return server[3]


def test_health_is_503_until_ready(base) -> None:
    url, saw_503 = base
    assert saw_503, "/health should answer 503 while the model loads"
    assert httpx.get(f"{url}/health").status_code == 200


def test_api_key_enforced(base) -> None:
    url, _ = base
    body = {"prompt": "Hi", "max_tokens": 1}
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": KEY}):
        r = httpx.post(f"{url}/v1/completions", json=body, headers=headers)
        assert r.status_code == 401, r.text
        assert r.json()["error"]["code"] == "invalid_api_key"
    assert httpx.get(f"{url}/v1/models").status_code == 401
    assert httpx.post(f"{url}/tokenize", json={"prompt": "x"}).status_code == 401
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=f"{url}/v1", api_key="wrong", max_retries=0).models.list()
    good = openai.OpenAI(base_url=f"{url}/v1", api_key=KEY, max_retries=0, timeout=120)
    assert [m.id for m in good.models.list().data] == ["smol", "smol-alias"]
    r = good.completions.create(model="smol-alias", prompt="Hi", max_tokens=2, temperature=0)
    assert r.model == "smol" and r.choices[0].text is not None
    # probes stay open
    assert httpx.get(f"{url}/health").status_code == 200
    assert httpx.get(f"{url}/metrics").status_code == 200


def test_full_waiting_queue_gives_503_with_retry_after(base) -> None:
    url, _ = base
    headers = {"Authorization": f"Bearer {KEY}"}
    body = {"model": "smol", "prompt": "Count:", "max_tokens": 24, "ignore_eos": True}

    async def main() -> list[httpx.Response]:
        async with httpx.AsyncClient(headers=headers, timeout=120) as c:
            return await asyncio.gather(
                *(c.post(f"{url}/v1/completions", json=body) for _ in range(5))
            )

    responses = asyncio.run(main())
    statuses = sorted(r.status_code for r in responses)
    # one running and one waiting; the other three are refused
    assert statuses == [200, 200, 503, 503, 503], statuses
    for r in responses:
        if r.status_code == 503:
            assert int(r.headers["retry-after"]) >= 1
            assert r.json()["error"]["type"] == "service_unavailable_error"
        else:
            assert r.json()["usage"]["completion_tokens"] == 24
    rejected = httpx.get(f"{url}/metrics").text
    assert 'modelport:request_rejected_total{model_name="smol"}' in rejected
    # after the burst the server takes requests again
    ok = httpx.post(f"{url}/v1/completions", json={**body, "max_tokens": 2}, headers=headers)
    assert ok.status_code == 200


def test_engine_core_death_is_reported_not_hung(base, server_log, server_proc) -> None:
    """Last in this module: it kills the engine core process of this server, which then
    fails the requests it held and exits with status 1 (vLLM's behaviour)."""
    url, _ = base
    headers = {"Authorization": f"Bearer {KEY}"}
    pid = int(re.search(r"engine core pid (\d+)", server_log.read_text()).group(1))
    body = {"model": "smol", "prompt": "Count:", "max_tokens": 100, "ignore_eos": True}

    async def main() -> tuple[list[str], httpx.Response]:
        async with httpx.AsyncClient(headers=headers, timeout=60) as c:
            events: list[str] = []
            plain = None
            req = c.stream("POST", f"{url}/v1/completions", json={**body, "stream": True})
            async with req as r:
                assert r.status_code == 200
                async for line in r.aiter_lines():
                    if not line.startswith("data: "):
                        continue
                    events.append(line[6:])
                    if len(events) == 1:  # one request running, a second one queued: kill
                        plain = asyncio.ensure_future(c.post(f"{url}/v1/completions", json=body))
                        await asyncio.sleep(1.0)
                        os.kill(pid, signal.SIGKILL)
            assert plain is not None
            return events, await asyncio.wait_for(plain, 60)

    events, plain = asyncio.run(main())
    assert events[-1] == "[DONE]"
    assert "error" in json.loads(events[-2]) and "engine" in events[-2]
    assert plain.status_code == 500 and "engine" in plain.json()["error"]["message"]
    # afterwards the server ends, for a supervisor to restart it
    assert server_proc.wait(30) == 1
    assert "shutting the server down, exit status 1" in server_log.read_text()


@pytest.mark.parametrize("keep_alive", [False, True])
def test_engine_death_stops_the_server_unless_kept_alive(monkeypatch, keep_alive: bool) -> None:
    from types import SimpleNamespace

    from modelport.entrypoints.openai.api_server import OpenAIService

    if keep_alive:
        monkeypatch.setenv("MODELPORT_KEEP_ALIVE_ON_ENGINE_DEATH", "1")
    else:
        monkeypatch.delenv("MODELPORT_KEEP_ALIVE_ON_ENGINE_DEATH", raising=False)
    for alone in (True, False):  # beside other frontends the process stays up for them
        service = OpenAIService(SimpleNamespace(), SimpleNamespace(), exit_on_failure=alone)
        service.http_server = SimpleNamespace(should_exit=False)
        service._engine_died("engine core process exited with code -9")
        stops = alone and not keep_alive
        assert service.http_server.should_exit is stops and service.failed is stops


def test_queue_admits_any_request_while_empty() -> None:
    from modelport.engine.async_llm import queue_has_room

    assert queue_has_room(waiting=0, num_seqs=5, limit=1)  # retrying could not help: admit
    assert queue_has_room(waiting=0, num_seqs=1, limit=1)
    assert queue_has_room(waiting=1, num_seqs=1, limit=2)
    assert not queue_has_room(waiting=1, num_seqs=1, limit=1)  # busy: retry later helps
    assert not queue_has_room(waiting=1, num_seqs=2, limit=2)


def test_admission_counts_free_sequence_slots_as_not_waiting() -> None:
    """A burst on an idle server fills the free slots first: with 2 slots and a queue of 2,
    4 requests sent before any engine step are all admitted and the 5th is refused."""
    from types import SimpleNamespace

    from modelport.engine.async_llm import AsyncLLM, QueueFullError
    from modelport.engine.messages import SchedulerStats

    rejected: list[int] = []
    fake = SimpleNamespace(
        dead_reason=None, max_waiting_requests=2, max_num_seqs=2, _num_inflight_seqs=0,
        stats=SchedulerStats(),
        engine_config=SimpleNamespace(parallel_config=SimpleNamespace(data_parallel_size=1)),
        stat_logger=SimpleNamespace(observe_rejected=lambda: rejected.append(1)),
    )  # fmt: skip

    def admit(n: int = 1) -> bool:
        try:
            AsyncLLM.check_admission(fake, n)
        except QueueFullError:
            return False
        fake._num_inflight_seqs += n
        return True

    assert [admit() for _ in range(5)] == [True, True, True, True, False]
    assert len(rejected) == 1
    # two replicas: twice the slots
    fake._num_inflight_seqs = 0
    fake.engine_config.parallel_config.data_parallel_size = 2
    assert [admit() for _ in range(7)] == [True] * 6 + [False]
    # the last step left requests waiting (KV memory full): only what runs is not waiting
    fake.engine_config.parallel_config.data_parallel_size = 1
    fake.stats = SchedulerStats(num_running=1, num_waiting=1)
    fake._num_inflight_seqs = 2
    assert admit() and not admit()
    # a request of n=3 on an idle server: 2 start, 1 waits
    fake.stats, fake._num_inflight_seqs = SchedulerStats(), 0
    assert admit(3) and admit(1) and not admit(1)
