"""Dynamic batching, queue policy, and failure isolation, seen by real tritonclient clients.

One server over tests/fixtures/repositories/{scheduling,failures}.
"""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import tritonclient.grpc as grpcclient
import tritonclient.http as httpclient
from tritonclient.utils import InferenceServerException

from modelport.entrypoints.kserve.embedded import EmbeddedServer

FIXTURES = Path(__file__).parent / "fixtures" / "repositories"


@pytest.fixture(scope="module")
def server():
    srv = EmbeddedServer([FIXTURES / "scheduling", FIXTURES / "failures"]).start()
    yield srv
    srv.stop()


def x_input(value, rows=1, protocol="http"):
    m = httpclient if protocol == "http" else grpcclient
    t = m.InferInput("X", [rows, 1], "FP32")
    t.set_data_from_numpy(np.full((rows, 1), value, dtype=np.float32))
    return t


def x_input_flat(value, protocol="http"):
    m = httpclient if protocol == "http" else grpcclient
    t = m.InferInput("X", [1], "FP32")
    t.set_data_from_numpy(np.array([value], dtype=np.float32))
    return t


def queue_ns(server, model):
    return server.manager.stats(model)[0]["inference_stats"]["queue"]


def _until(cond, timeout=10.0):
    """Poll server state from this thread (the state a test needs, not a fixed sleep)."""
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.005)


def test_dynamic_batching_batches_under_32_concurrent_clients(server):
    def one(i):
        protocol = "http" if i % 2 else "grpc"
        c = (
            httpclient.InferenceServerClient(server.http_url)
            if protocol == "http"
            else grpcclient.InferenceServerClient(server.grpc_url)
        )
        r = c.infer("batch_recorder", [x_input(float(i), protocol=protocol)])
        return r.as_numpy("Y")[0, 0], int(r.as_numpy("BATCH")[0, 0])

    with ThreadPoolExecutor(32) as pool:
        results = list(pool.map(one, range(32)))
    assert [y for y, _ in results] == [2.0 * i for i in range(32)]
    sizes = [b for _, b in results]
    assert max(sizes) > 1, sizes  # requests really were batched
    assert max(sizes) <= 8, sizes  # never above max_batch_size
    stats = server.manager.stats("batch_recorder")[0]
    assert all(b["batch_size"] <= 8 for b in stats["batch_stats"])
    assert stats["execution_count"] < 32


def test_lone_request_waits_no_longer_than_max_queue_delay(server):
    c = httpclient.InferenceServerClient(server.http_url)
    before = queue_ns(server, "batch_recorder")
    t0 = time.perf_counter()
    c.infer("batch_recorder", [x_input(1.0)])
    took = time.perf_counter() - t0
    after = queue_ns(server, "batch_recorder")
    waited = (after["ns"] - before["ns"]) / 1e9
    assert after["count"] - before["count"] == 1
    # max_queue_delay_microseconds is 300000: it waits for company, but no longer
    assert 0.28 <= waited <= 0.9, waited
    assert took < 2.0


def test_queue_policy_rejects_past_max_queue_size(server):
    batcher = server.manager.get("queue_limited").batcher

    def one(i):
        c = httpclient.InferenceServerClient(server.http_url)
        try:
            c.infer("queue_limited", [x_input(float(i))])
            return "ok"
        except InferenceServerException as e:
            return (e.status(), e.message())

    with ThreadPoolExecutor(6) as pool:
        # arrive in order: 0 runs (1 s), 1 and 2 fill the queue, then 3..5 come while 0 runs
        futures = [pool.submit(one, 0)]
        _until(lambda: batcher.in_flight == 1)
        for i in (1, 2):
            futures.append(pool.submit(one, i))
            _until(lambda i=i: batcher.queued == i)
        futures += [pool.submit(one, i) for i in range(3, 6)]
        results = [f.result() for f in futures]
    ok = [r for r in results if r == "ok"]
    rejected = [r for r in results if r != "ok"]
    assert 3 <= len(ok) < 6, results  # one running + max_queue_size 2 waiting (+ late arrivals)
    assert rejected and all(r == ("503", "Exceeds maximum queue size") for r in rejected), results


def test_queue_timeout_rejects(server):
    batcher = server.manager.get("timeout_limited").batcher

    def one(i):
        c = grpcclient.InferenceServerClient(server.grpc_url)
        try:
            c.infer("timeout_limited", [x_input(float(i), protocol="grpc")])
            return "ok"
        except InferenceServerException as e:
            return (e.status(), e.message())

    with ThreadPoolExecutor(2) as pool:
        first = pool.submit(one, 0)
        _until(lambda: batcher.in_flight == 1)  # 0 runs (1 s): 1 waits past its 100 ms
        second = pool.submit(one, 1)
        results = [first.result(), second.result()]
    assert results[0] == "ok"
    assert results[1] == ("StatusCode.UNAVAILABLE", "Request timeout expired")


def test_error_response_fails_only_its_own_request_in_a_batch(server):
    def one(value):
        c = httpclient.InferenceServerClient(server.http_url)
        try:
            r = c.infer("faulty", [x_input(value)])
            return float(r.as_numpy("Y")[0, 0]), int(r.as_numpy("BATCH")[0, 0])
        except InferenceServerException as e:
            return (e.status(), e.message())

    values = [1.0, 2.0, -1.0, 3.0, 4.0]
    with ThreadPoolExecutor(5) as pool:
        results = list(pool.map(one, values))
    assert results[2] == ("400", "negative input rejected")
    good = [results[i] for i in (0, 1, 3, 4)]
    assert [g[0] for g in good] == [2.0, 3.0, 4.0, 5.0]
    assert max(g[1] for g in good) >= 2  # the bad request's neighbours shared its batch


def test_python_exception_fails_only_its_own_request(server):
    def one(value):
        c = httpclient.InferenceServerClient(server.http_url)
        try:
            return float(c.infer("raiser", [x_input_flat(value)]).as_numpy("Y")[0])
        except InferenceServerException as e:
            return e.message()

    with ThreadPoolExecutor(4) as pool:
        results = list(pool.map(one, [1.0, -5.0, 2.0, 3.0]))
    assert results[0] == 2.0 and results[2] == 3.0 and results[3] == 4.0
    assert "ValueError: negative input -5.0" in results[1]


def test_dead_process_fails_only_its_requests_and_is_restarted(server):
    backend = server.manager.get("raiser").backend
    pids_before = set(backend.pids())
    restarts_before = backend.restarts

    def one(value):
        c = httpclient.InferenceServerClient(server.http_url)
        try:
            return float(c.infer("raiser", [x_input_flat(value)]).as_numpy("Y")[0])
        except InferenceServerException as e:
            return e.message()

    with ThreadPoolExecutor(4) as pool:
        results = list(pool.map(one, [666.0, 1.0, 2.0, 3.0]))
    assert "is not healthy" in results[0], results
    assert results[1:] == [2.0, 3.0, 4.0]  # served by the other instance, or the restarted one
    # the crashed instance comes back and serves again
    deadline = time.time() + 30
    while backend.restarts == restarts_before and time.time() < deadline:
        time.sleep(0.05)
    assert backend.restarts == restarts_before + 1
    for v in range(4):
        assert one(float(v)) == v + 1.0
    assert set(backend.pids()) != pids_before
    assert server.manager.is_ready("raiser")


def test_priority_parameter_reaches_the_queue(server):
    """priority_levels 2: a priority-1 request overtakes priority-2 requests already queued."""
    order = []
    batcher = server.manager.get("prioritized").batcher

    def one(i, priority):
        c = httpclient.InferenceServerClient(server.http_url)
        c.infer("prioritized", [x_input(float(i))], priority=priority)
        order.append(i)

    with ThreadPoolExecutor(4) as pool:
        # 0 runs first (1 s); 1 and 2 queue at priority 2; 3 arrives last at priority 1
        futures = [pool.submit(one, 0, 2)]
        _until(lambda: batcher.in_flight == 1)
        for i, priority in ((1, 2), (2, 2), (3, 1)):
            futures.append(pool.submit(one, i, priority))
            _until(lambda i=i: batcher.queued == i)
        for f in futures:
            f.result()
    assert order.index(3) < order.index(1) and order.index(3) < order.index(2), order
    with pytest.raises(InferenceServerException, match=r"priority 7 outside \[1, 2\]"):
        httpclient.InferenceServerClient(server.http_url).infer(
            "prioritized", [x_input(1.0)], priority=7
        )
