"""Triton's rate limiter (--rate-limit execution_count, instance_group rate_limiter).

Unit tests drive serving/rate_limiter.py with asyncio alone; the end-to-end tests serve a
python-backend repository built in tmp_path whose models record when each execution ran,
and contend for one resource.
"""

from __future__ import annotations

import argparse
import asyncio
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import tritonclient.http as httpclient
from tritonclient.utils import InferenceServerException

from modelport.entrypoints.kserve import frontend
from modelport.entrypoints.kserve.embedded import EmbeddedServer
from modelport.serving.rate_limiter import (
    PER_DEVICE,
    InstanceLimits,
    RateLimiter,
    RateLimitError,
    Resource,
    parse_resource_option,
)

# -- the limiter alone ------------------------------------------------------------------


def needs(*resources, device=0, priority=0):
    return InstanceLimits(device, priority, tuple(Resource(*r) for r in resources))


async def _run(gate, log, name, hold=0.02):
    await gate.acquire()
    log.append(("start", name))
    try:
        await asyncio.sleep(hold)
    finally:
        log.append(("end", name))
        gate.release()


def _max_concurrent(log):
    now = peak = 0
    for ev, _ in log:
        now += 1 if ev == "start" else -1
        peak = max(peak, now)
    return peak


def test_default_count_is_the_largest_need_and_bounds_concurrency():
    async def main():
        rl = RateLimiter()
        small = rl.register("small", [needs(("R", 1))] * 3)
        big = rl.register("big", [needs(("R", 2))])
        assert rl.limits == {(0, "R"): 2}
        log: list = []
        await asyncio.gather(*(_run(g, log, f"s{i}") for i, g in enumerate(small)))
        assert _max_concurrent(log) == 2  # three instances needing 1 of 2 copies
        log.clear()
        await asyncio.gather(_run(big[0], log, "big"), *(_run(g, log, "s") for g in small))
        # while "big" holds both copies nobody else runs
        i = log.index(("start", "big"))
        assert log[i + 1] == ("end", "big")
        rl.unregister("big")
        assert rl.limits == {(0, "R"): 1}
        assert rl.allocated() == {}

    asyncio.run(main())


def test_per_device_resources_are_separate_and_global_ones_are_shared():
    async def main():
        rl = RateLimiter()
        dev = rl.register("dev", [needs(("R", 1), device=0), needs(("R", 1), device=1)])
        log: list = []
        await asyncio.gather(_run(dev[0], log, "d0"), _run(dev[1], log, "d1"))
        assert _max_concurrent(log) == 2  # one R on each device
        glob = rl.register(
            "glob", [needs(("G", 1, True), device=0), needs(("G", 1, True), device=1)]
        )
        assert rl.limits[("GLOBAL", "G")] == 1
        log.clear()
        await asyncio.gather(_run(glob[0], log, "g0"), _run(glob[1], log, "g1"))
        assert _max_concurrent(log) == 1  # one G in the whole server

    asyncio.run(main())


def test_triton_errors_for_conflicting_or_short_resources():
    rl = RateLimiter()
    rl.register("a", [needs(("R", 1))])
    with pytest.raises(RateLimitError) as e:
        rl.register("b", [needs(("R", 1, True))])
    assert str(e.value) == (
        'Resource "R" is present as both global and device-specific resource in the model '
        "configuration."
    )
    assert rl.limits == {(0, "R"): 1}  # the failed registration left nothing behind
    rl = RateLimiter([("R", 1, PER_DEVICE)])
    with pytest.raises(RateLimitError) as e:
        rl.register("b", [needs(("R", 2))])
    assert str(e.value) == (
        'Resource count for "R" is limited to 1 which will prevent scheduling of one or more '
        "model instances, the minimum required count is 2"
    )
    with pytest.raises(RateLimitError, match='"S" is limited to 0'):
        rl.register("c", [needs(("S", 1))])  # once any is given, the others count 0


def test_explicit_counts_per_device_and_global():
    # Triton's example: R1:10 R2:5:0 R2:8:1 R3:2 on two devices, R3 global
    rl = RateLimiter([parse_resource_option(a) for a in ("R1:10", "R2:5:0", "R2:8:1", "R3:2")])
    rl.register(
        "m",
        [
            needs(("R1", 1), ("R2", 1), ("R3", 1, True), device=0),
            needs(("R1", 1), ("R2", 1), ("R3", 1, True), device=1),
        ],
    )
    assert rl.limits == {
        (0, "R1"): 10,
        (1, "R1"): 10,
        (0, "R2"): 5,
        (1, "R2"): 8,
        ("GLOBAL", "R3"): 2,
    }


@pytest.mark.parametrize("bad", ["R", "R:x", "R:1:2:3", ":1", "R:-1", "R:1:-2"])
def test_resource_option_format(bad):
    with pytest.raises(ValueError, match="--rate-limit-resource option format is"):
        parse_resource_option(bad)


def test_serve_flags():
    from modelport.entrypoints import cli

    argv = ["serve", "--model-repository", "/r", "--rate-limit", "execution_count"]
    args = cli.build_parser().parse_args([*argv, "--rate-limit-resource", "R:3:1"])
    assert frontend.rate_limiter(args)._explicit == {1: {"R": 3}}
    assert cli.build_parser().parse_args(argv[:3]).rate_limit == "off"
    args = argparse.Namespace(rate_limit="off", rate_limit_resource=["R:2"])
    assert frontend.rate_limiter(args) is None
    args = argparse.Namespace(rate_limit="execution_count", rate_limit_resource=["R:2:0"])
    assert frontend.rate_limiter(args)._explicit == {0: {"R": 2}}
    with pytest.raises(SystemExit, match="option format"):
        frontend.rate_limiter(
            argparse.Namespace(rate_limit="execution_count", rate_limit_resource=["R"])
        )


def test_priority_weights_waiting_instances():
    async def main():
        rl = RateLimiter()
        hi, lo, holder = (
            rl.register(n, [needs(("R", 1), priority=p)])[0]
            for n, p in (("hi", 1), ("lo", 3), ("holder", 1))
        )
        for g in (hi, lo):  # one execution each: scaled priorities 1 and 3
            await g.acquire()
            g.release()
        await holder.acquire()
        order: list[str] = []

        async def wait(g, name):
            await g.acquire()
            order.append(name)
            g.release()

        t_lo = asyncio.ensure_future(wait(lo, "lo"))
        await asyncio.sleep(0.01)
        t_hi = asyncio.ensure_future(wait(hi, "hi"))
        await asyncio.sleep(0.01)
        holder.release()
        await asyncio.gather(t_lo, t_hi)
        assert order == ["hi", "lo"]  # lower value first, though "lo" waited longer
        # after 3 executions of "hi" (scaled 3) it ties "lo" (1 x 3): first come goes first
        hi.exec_count, lo.exec_count = 3, 1
        await holder.acquire()
        order.clear()
        t_lo = asyncio.ensure_future(wait(lo, "lo"))
        await asyncio.sleep(0.01)
        t_hi = asyncio.ensure_future(wait(hi, "hi"))
        await asyncio.sleep(0.01)
        holder.release()
        await asyncio.gather(t_lo, t_hi)
        assert order == ["lo", "hi"]

    asyncio.run(main())


def test_cancelled_waiter_does_not_block_or_leak():
    async def main():
        rl = RateLimiter()
        a, b, c = rl.register("m", [needs(("R", 1))] * 3)
        await a.acquire()
        tb = asyncio.ensure_future(b.acquire())
        tc = asyncio.ensure_future(c.acquire())
        await asyncio.sleep(0.01)
        tb.cancel()
        a.release()
        await asyncio.wait_for(tc, 1)
        assert rl.allocated() == {(0, "R"): 1}
        c.release()
        assert rl.allocated() == {}

    asyncio.run(main())


# -- end to end: python models contending for one resource ----------------------------

MODEL_PY = """
import json
import os
import time

import numpy as np

import triton_python_backend_utils as pb_utils


class TritonPythonModel:
    def initialize(self, args):
        params = json.loads(args["model_config"])["parameters"]
        self.sleep_s = float(params["sleep_s"]["string_value"])
        self.gate = params.get("gate", {}).get("string_value")  # a file the test creates
        self.started = params.get("started", {}).get("string_value")  # a file this creates

    def _wait_for_gate(self):
        deadline = time.monotonic() + 30
        while not os.path.exists(self.gate) and time.monotonic() < deadline:
            time.sleep(0.002)
        if os.path.exists(self.gate):
            os.remove(self.gate)

    def execute(self, requests):
        start = time.time()
        if self.started:
            open(self.started, "a").close()
        xs = [pb_utils.get_input_tensor_by_name(r, "X").as_numpy() for r in requests]
        if any(float(x[0]) < 0 for x in xs):
            raise pb_utils.TritonModelException("asked to fail")
        time.sleep(self.sleep_s)
        if self.gate:
            self._wait_for_gate()
        span = np.array([start, time.time()], dtype=np.float64)
        return [pb_utils.InferenceResponse([pb_utils.Tensor("T", span)]) for _ in xs]
"""


def _model(repo, name, sleep_s, resource="", priority=0, extra="", gate=None, started=None):
    d = repo / name
    (d / "1").mkdir(parents=True)
    (d / "1" / "model.py").write_text(MODEL_PY)
    limiter = f"rate_limiter {{ resources [{{ {resource} }}] priority: {priority} }}"
    (d / "config.pbtxt").write_text(
        f'name: "{name}"\nbackend: "python"\nmax_batch_size: 0\n'
        'input [{ name: "X" data_type: TYPE_FP32 dims: [ 1 ] }]\n'
        'output [{ name: "T" data_type: TYPE_FP64 dims: [ 2 ] }]\n'
        f'parameters {{ key: "sleep_s" value: {{ string_value: "{sleep_s}" }} }}\n'
        + (f'parameters {{ key: "gate" value: {{ string_value: "{gate}" }} }}\n' if gate else "")
        + (
            f'parameters {{ key: "started" value: {{ string_value: "{started}" }} }}\n'
            if started
            else ""
        )
        + f"instance_group [{{ count: 1 kind: KIND_CPU {limiter} }}]\n{extra}"
    )


R1 = 'name: "R" count: 1'


@pytest.fixture(scope="module")
def repo(tmp_path_factory):
    repo = tmp_path_factory.mktemp("ratelimit") / "models"
    _model(repo, "a", 0.15, R1, priority=1)
    _model(repo, "b", 0.15, R1, priority=3)
    # "h" holds R until the test creates its gate file
    _model(repo, "h", 0.0, R1, priority=1, gate=repo.parent / "h.gate")
    _model(repo, "seq", 0.15, R1, extra="sequence_batching { }\n")  # the sequence batcher
    # "oa" and "ob" need the one R; each says when it started and runs until its gate opens
    for m in ("oa", "ob"):
        _model(
            repo, m, 0.0, R1, gate=repo.parent / f"{m}.gate", started=repo.parent / f"{m}.started"
        )
    _model(repo, "conflict", 0.01, 'name: "R" global: true count: 1')
    _model(repo, "greedy", 0.01, 'name: "R" count: 5')
    return repo


@pytest.fixture(scope="module")
def server(repo):
    srv = EmbeddedServer(
        [repo],
        control_mode="explicit",
        load_models=["a", "b", "h", "seq"],
        grpc_port=-1,
        metrics_port=-1,
        rate_limit="execution_count",
        rate_limit_resources=["R:1"],
    ).start()
    yield srv
    srv.stop()


def infer(server, model, x=1.0, sequence_id=0):
    c = httpclient.InferenceServerClient(server.http_url, network_timeout=30)
    t = httpclient.InferInput("X", [1], "FP32")
    t.set_data_from_numpy(np.array([x], dtype=np.float32))
    seq = {"sequence_id": sequence_id, "sequence_start": True, "sequence_end": True}
    return tuple(c.infer(model, [t], **(seq if sequence_id else {})).as_numpy("T"))


def test_executions_never_overlap_beyond_the_resource_count(server):
    jobs = [("a", 0), ("b", 0), ("seq", 1), ("a", 0), ("b", 0), ("seq", 2)]
    with ThreadPoolExecutor(len(jobs)) as pool:
        spans = sorted(pool.map(lambda job: infer(server, job[0], sequence_id=job[1]), jobs))
    for (_, end), (start, _) in zip(spans, spans[1:]):
        assert start >= end - 0.002, spans  # one R: one execution at a time, both models
    assert server.manager.rate_limiter.allocated() == {}


def _executions(server, model):
    return server.manager.stats(model)[0]["execution_count"]


def _stat(server, model, *path):
    d = server.manager.stats(model)[0]
    for p in path:
        d = d[p]
    return d


def _until(cond, timeout=10.0):
    """Poll the server's limiter from this thread (a read may race the loop: retry)."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            if cond():
                return
        except RuntimeError:  # a dict changed size while read
            pass
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.005)


def test_priority_orders_waiting_instances_and_wait_is_queue_time(server, repo):
    # equal execution counts: "a" (priority 1) outranks "b" (priority 3) when both wait
    for m in ("a", "b"):
        if _executions(server, m) == 0:
            infer(server, m)
    while _executions(server, "b") < _executions(server, "a"):
        infer(server, "b")
    while _executions(server, "a") < _executions(server, "b"):
        infer(server, "a")
    queue0 = _stat(server, "b", "inference_stats", "queue", "ns")
    infer0 = _stat(server, "b", "inference_stats", "compute_infer", "ns")
    rl = server.manager.rate_limiter
    with ThreadPoolExecutor(3) as pool:
        held = pool.submit(infer, server, "h")
        _until(lambda: rl.allocated())
        waiting_b = pool.submit(infer, server, "b")  # b waits first ...
        _until(lambda: rl.waiting == 1)
        waiting_a = pool.submit(infer, server, "a")  # ... a arrives later
        _until(lambda: rl.waiting == 2)
        time.sleep(1.0)  # b and a wait behind h
        (repo.parent / "h.gate").touch()
        h, b, a = held.result(), waiting_b.result(), waiting_a.result()
    assert h[1] <= a[0] + 0.002 and a[1] <= b[0] + 0.002, (h, a, b)
    # b's wait for the resource (behind h, then a) is queue time, not compute time: b computes
    # 0.15 s; were the >= 1 s wait counted as compute it would be over 1.15 s
    queued = (_stat(server, "b", "inference_stats", "queue", "ns") - queue0) / 1e9
    computed = (_stat(server, "b", "inference_stats", "compute_infer", "ns") - infer0) / 1e9
    assert queued >= 1.0, queued
    assert computed < 0.8, computed


def test_resources_are_released_when_the_execution_fails(server):
    c = httpclient.InferenceServerClient(server.http_url, network_timeout=10)
    t = httpclient.InferInput("X", [1], "FP32")
    t.set_data_from_numpy(np.array([-1.0], dtype=np.float32))
    for _ in range(2):
        with pytest.raises(InferenceServerException, match="asked to fail"):
            c.infer("a", [t])
    assert server.manager.rate_limiter.allocated() == {}
    t0 = time.monotonic()
    start, _ = infer(server, "b")
    assert time.monotonic() - t0 < 10.0  # 0.15 s of work; a leaked R would block it (30 s)


def test_load_errors_in_tritons_words(server):
    c = httpclient.InferenceServerClient(server.http_url)
    with pytest.raises(InferenceServerException) as e:
        c.load_model("conflict")
    assert (
        'Resource "R" is present as both global and device-specific resource in the model '
        "configuration." in str(e.value)
    )
    with pytest.raises(InferenceServerException) as e:
        c.load_model("greedy")  # needs 5 R, the server was given 1
    assert (
        'Resource count for "R" is limited to 1 which will prevent scheduling of one or more '
        "model instances, the minimum required count is 5" in str(e.value)
    )
    assert not c.is_model_ready("conflict") and not c.is_model_ready("greedy")
    assert server.manager.rate_limiter.limits == {(0, "R"): 1}
    infer(server, "a")  # the loaded models still run


def test_rate_limit_off_ignores_resources(repo):
    with EmbeddedServer(
        [repo],
        control_mode="explicit",
        load_models=["oa", "ob", "conflict"],  # conflict loads: resources are not looked at
        grpc_port=-1,
        metrics_port=-1,
    ) as srv:
        assert srv.manager.rate_limiter is None
        with ThreadPoolExecutor(2) as pool:
            runs = [pool.submit(infer, srv, m) for m in ("oa", "ob")]
            # both executions start while neither can finish: the one R did not serialize them
            _until(lambda: all((repo.parent / f"{m}.started").exists() for m in ("oa", "ob")))
            for m in ("oa", "ob"):
                (repo.parent / f"{m}.gate").touch()
            a, b = (r.result() for r in runs)
        assert max(a[0], b[0]) < min(a[1], b[1]), (a, b)  # they ran at the same time
        infer(srv, "conflict")
