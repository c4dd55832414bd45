"""Triton's response cache: `--cache-config local,size=N` and `response_cache { enable: true }`.

A python model counts its executions and returns the count (COUNT), so a response that came
from the cache is recognisable: the model did not run (execution_count unchanged) and COUNT
is the one of the response that was cached.
"""

from __future__ import annotations

import argparse
import json
import re
import textwrap
import urllib.request
from pathlib import Path

import numpy as np
import pytest
import tritonclient.grpc as grpcclient
import tritonclient.http as httpclient

from modelport.entrypoints.kserve import frontend
from modelport.entrypoints.kserve.embedded import EmbeddedServer
from modelport.repository.tensors import InferRequest, InferResponse, InferTensor
from modelport.serving.response_cache import (
    CacheEntry,
    ResponseCache,
    parse_cache_config,
    request_key,
)

PROTOCOLS = ["http", "grpc"]
CACHE_SIZE = 4096

# Y = X * 2 (+ the request parameter "offset"), COUNT = executions so far, TAG a BYTES output,
# and a response parameter
COUNTER_MODEL = """
import json

import numpy as np
import triton_python_backend_utils as pb_utils


class TritonPythonModel:
    def initialize(self, args):
        self.count = 0

    def execute(self, requests):
        self.count += 1
        responses = []
        for request in requests:
            x = pb_utils.get_input_tensor_by_name(request, "X").as_numpy()
            if x.reshape(-1)[0] < 0:
                error = pb_utils.TritonError("X must not be negative")
                responses.append(pb_utils.InferenceResponse(error=error))
                continue
            offset = float(json.loads(request.parameters()).get("offset", 0))
            rows = x.shape[0]
            outputs = [
                pb_utils.Tensor("Y", (x * 2 + offset).astype(np.float32)),
                pb_utils.Tensor("COUNT", np.full((rows, 1), self.count, dtype=np.int64)),
                pb_utils.Tensor("TAG", np.array([[b"tag-%d" % self.count]] * rows, dtype=object)),
            ]
            responses.append(
                pb_utils.InferenceResponse(outputs, parameters={"executions": self.count})
            )
        return responses
"""

COUNTER_CONFIG = """
name: "{name}"
backend: "python"
max_batch_size: 4
dynamic_batching {{ }}
input [{{ name: "X" data_type: TYPE_FP32 dims: [ 2 ] }}]
output [
  {{ name: "Y" data_type: TYPE_FP32 dims: [ 2 ] }},
  {{ name: "COUNT" data_type: TYPE_INT64 dims: [ 1 ] }},
  {{ name: "TAG" data_type: TYPE_STRING dims: [ 1 ] }}
]
{extra}
"""

# Y = X + executions so far; X of any length (the byte-size tests pick entry sizes with it)
WIDE_MODEL = """
import numpy as np
import triton_python_backend_utils as pb_utils


class TritonPythonModel:
    def initialize(self, args):
        self.count = 0

    def execute(self, requests):
        self.count += 1
        out = []
        for request in requests:
            x = pb_utils.get_input_tensor_by_name(request, "X").as_numpy()
            out.append(pb_utils.InferenceResponse([pb_utils.Tensor("Y", x + self.count)]))
        return out
"""

WIDE_CONFIG = """
name: "wide"
backend: "python"
max_batch_size: 0
input [{ name: "X" data_type: TYPE_FP32 dims: [ -1 ] }]
output [{ name: "Y" data_type: TYPE_FP32 dims: [ -1 ] }]
response_cache { enable: true }
"""

DECOUPLED_CONFIG = """
name: "decoupled_cached"
backend: "python"
max_batch_size: 0
model_transaction_policy { decoupled: true }
input [{ name: "COUNT" data_type: TYPE_INT32 dims: [ 1 ] }]
output [{ name: "OUT" data_type: TYPE_INT32 dims: [ 1 ] }]
response_cache { enable: true }
"""

DECOUPLED_MODEL = """
import triton_python_backend_utils as pb_utils


class TritonPythonModel:
    def execute(self, requests):
        return None
"""

ENSEMBLE_CONFIG = """
name: "ens"
platform: "ensemble"
max_batch_size: 4
input [{ name: "IN" data_type: TYPE_FP32 dims: [ 2 ] }]
output [{ name: "OUT" data_type: TYPE_FP32 dims: [ 2 ] }]
response_cache { enable: true }
ensemble_scheduling {
  step [
    { model_name: "plain" model_version: -1
      input_map { key: "X" value: "IN" } output_map { key: "Y" value: "OUT" } }
  ]
}
"""

CACHE_ON = "response_cache { enable: true }"

SEQUENCE_CONFIG = COUNTER_CONFIG.replace("dynamic_batching {{ }}", "sequence_batching {{ }}")


def _python_model(repo: Path, name: str, config: str, code: str) -> None:
    (repo / name / "1").mkdir(parents=True)
    (repo / name / "config.pbtxt").write_text(textwrap.dedent(config))
    (repo / name / "1" / "model.py").write_text(textwrap.dedent(code))


def _repository(root: Path) -> Path:
    repo = root / "models"
    repo.mkdir()
    _python_model(
        repo, "counter", COUNTER_CONFIG.format(name="counter", extra=CACHE_ON), COUNTER_MODEL
    )
    _python_model(repo, "plain", COUNTER_CONFIG.format(name="plain", extra=""), COUNTER_MODEL)
    _python_model(repo, "wide", WIDE_CONFIG, WIDE_MODEL)
    _python_model(repo, "seq", SEQUENCE_CONFIG.format(name="seq", extra=CACHE_ON), COUNTER_MODEL)
    _python_model(repo, "decoupled_cached", DECOUPLED_CONFIG, DECOUPLED_MODEL)
    (repo / "ens").mkdir()
    (repo / "ens" / "config.pbtxt").write_text(ENSEMBLE_CONFIG)
    return repo


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    repo = _repository(tmp_path_factory.mktemp("cache"))
    srv = EmbeddedServer(
        [repo], cache_config=[f"local,size={CACHE_SIZE}"], exit_on_error=False
    ).start()
    yield srv
    srv.stop()


def client(server, protocol):
    if protocol == "http":
        return httpclient.InferenceServerClient(server.http_url)
    return grpcclient.InferenceServerClient(server.grpc_url)


def infer(server, protocol, model, x, name="X", outputs=None, **kw):
    m = httpclient if protocol == "http" else grpcclient
    t = m.InferInput(name, list(x.shape), "FP32")
    t.set_data_from_numpy(x)
    requested = [m.InferRequestedOutput(o) for o in outputs] if outputs else None
    return client(server, protocol).infer(model, [t], outputs=requested, **kw)


def stats(server, model):
    doc = httpclient.InferenceServerClient(server.http_url).get_inference_statistics(model)
    return doc["model_stats"][0]


def _count(s, key):
    return int(s["inference_stats"][key]["count"])


def metrics(server):
    return urllib.request.urlopen(server.metrics_url).read().decode()


def metric(text, name, model):
    m = re.search(rf'^{name}{{model="{model}",version="1"}} (\S+)$', text, re.M)
    return None if m is None else float(m.group(1))


def _x(seed, rows=1):
    return np.arange(seed, seed + 2 * rows, dtype=np.float32).reshape(rows, 2)


# -- the cache itself --


def _entry(nbytes):
    return CacheEntry({}, {}, nbytes)


def test_lru_evicts_least_recently_used_by_bytes():
    cache = ResponseCache(100)
    cache.insert(b"a", _entry(40))
    cache.insert(b"b", _entry(40))
    assert cache.lookup(b"a") is not None  # a is now the most recently used
    cache.insert(b"c", _entry(40))  # 120 > 100: b goes
    assert b"b" not in cache and b"a" in cache and b"c" in cache
    assert cache.used_bytes == 80 and cache.num_evictions == 1
    cache.insert(b"d", _entry(100))  # exactly the size: everything else goes
    assert len(cache) == 1 and cache.used_bytes == 100


def test_an_item_larger_than_the_cache_is_not_inserted():
    cache = ResponseCache(100)
    cache.insert(b"a", _entry(10))
    with pytest.raises(ValueError, match="larger than the cache"):
        cache.insert(b"big", _entry(101))
    assert b"big" not in cache and b"a" in cache and cache.used_bytes == 10


def _req(**kw):
    base = dict(
        model_name="m",
        inputs={"X": InferTensor("X", "FP32", np.ones((1, 2), np.float32))},
    )
    base.update(kw)
    return InferRequest(**base)


def test_key_covers_inputs_and_parameters_but_not_id_priority_or_timeout():
    key = request_key("m", 1, _req())
    assert request_key("m", 1, _req(id="other", priority=2, timeout_us=5)) == key
    different = [
        request_key("m", 2, _req()),
        request_key("n", 1, _req()),
        request_key(
            "m", 1, _req(inputs={"X": InferTensor("X", "FP32", np.ones((2, 1), np.float32))})
        ),
        request_key(
            "m", 1, _req(inputs={"X": InferTensor("X", "INT32", np.ones((1, 2), np.int32))})
        ),
        request_key(
            "m", 1, _req(inputs={"X": InferTensor("X", "FP32", np.zeros((1, 2), np.float32))})
        ),
        request_key(
            "m", 1, _req(inputs={"Z": InferTensor("Z", "FP32", np.ones((1, 2), np.float32))})
        ),
        request_key("m", 1, _req(parameters={"offset": 1})),
        request_key("m", 1, _req(requested_outputs=["Y"])),
        request_key("m", 1, _req(classification={"Y": 1})),
        request_key("m", 1, _req(), load=7),
    ]
    assert key not in different and len(set(different)) == len(different)
    # input order does not matter
    two = {
        "A": InferTensor("A", "FP32", np.ones(2, np.float32)),
        "B": InferTensor("B", "FP32", np.zeros(2, np.float32)),
    }
    assert request_key("m", 1, _req(inputs=two)) == request_key(
        "m", 1, _req(inputs=dict(reversed(list(two.items()))))
    )


def test_entry_size_and_copies():
    y = np.arange(4, dtype=np.float32).reshape(1, 4)
    tag = np.array([[b"abc"]], dtype=object)
    resp = InferResponse(
        "m", 1, {"Y": InferTensor("Y", "FP32", y), "T": InferTensor("T", "BYTES", tag)}, id="a"
    )
    entry = CacheEntry.of(resp)
    assert entry.nbytes == (1 + 4 + 16 + 16) + (1 + 5 + 16 + 4 + 3)
    y[0, 0] = 99  # the model's array changing later does not change the cache
    out = entry.response("m", 1, "b")
    assert out.id == "b" and out.outputs["Y"].data[0, 0] == 0
    out.outputs["Y"].data[0, 1] = 42  # nor does a caller changing what it got
    assert entry.response("m", 1, "c").outputs["Y"].data[0, 1] == 1


def test_cache_config_flags():
    assert parse_cache_config([]) is None
    assert parse_cache_config([], 0) is None
    assert parse_cache_config(["local,size=1048576"]).size == 1048576
    assert parse_cache_config([], 8192).size == 8192  # --response-cache-byte-size
    with pytest.raises(ValueError, match="incompatible flags"):
        parse_cache_config(["local,size=10"], 12345)
    with pytest.raises(ValueError, match="multiple cache configurations"):
        parse_cache_config(["local,size=8192", "redis,key=value"])
    with pytest.raises(ValueError, match="'local' cache only"):
        parse_cache_config(["redis,host=localhost"])
    for bad in ("local", "local,size", "local,size=abc", "local,size=0", "local,sise=1"):
        with pytest.raises(ValueError):
            parse_cache_config([bad])
    parser = argparse.ArgumentParser()
    frontend.add_serve_args(parser)
    args = parser.parse_args(["--cache-config", "local,size=100", "--cache-config=local,size=200"])
    assert args.triton_cache_config == ["local,size=100", "local,size=200"]
    assert parse_cache_config(args.triton_cache_config).size == 200  # the last one wins
    assert parser.parse_args(["--response-cache-byte-size", "64"]).response_cache_byte_size == 64


# -- served --


@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_repeated_request_is_answered_from_the_cache(server, protocol):
    x = _x(100 if protocol == "http" else 200)
    before = stats(server, "counter")
    first = infer(server, protocol, "counter", x, request_id="first")
    second = infer(server, protocol, "counter", x, request_id="second")
    after = stats(server, "counter")
    assert after["execution_count"] == before["execution_count"] + 1  # ran once
    for name in ("Y", "COUNT", "TAG"):
        a, b = first.as_numpy(name), second.as_numpy(name)
        assert a.dtype == b.dtype and a.shape == b.shape and a.tolist() == b.tolist()
    np.testing.assert_array_equal(first.as_numpy("Y"), x * 2)
    if protocol == "http":
        r1, r2 = first.get_response(), second.get_response()
        assert r1["id"] == "first" and r2["id"] == "second"
        assert r1["parameters"] == r2["parameters"]
        assert [(o["name"], o["datatype"], o["shape"]) for o in r1["outputs"]] == [
            (o["name"], o["datatype"], o["shape"]) for o in r2["outputs"]
        ]
    else:
        r1, r2 = first.get_response(), second.get_response()
        assert r1.id == "first" and r2.id == "second"
        r1.id = r2.id = ""
        assert r1 == r2  # byte-identical apart from the id
    assert _count(after, "cache_hit") == _count(before, "cache_hit") + 1
    assert _count(after, "cache_miss") == _count(before, "cache_miss") + 1


def test_http_and_grpc_share_entries(server):
    x = _x(300)
    first = infer(server, "http", "counter", x)
    before = stats(server, "counter")
    second = infer(server, "grpc", "counter", x)
    assert stats(server, "counter")["execution_count"] == before["execution_count"]
    np.testing.assert_array_equal(first.as_numpy("COUNT"), second.as_numpy("COUNT"))


@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_different_inputs_parameters_or_outputs_miss(server, protocol):
    x = _x(400 if protocol == "http" else 500)
    infer(server, protocol, "counter", x)
    before = stats(server, "counter")
    infer(server, protocol, "counter", x + 1)  # other bytes
    infer(server, protocol, "counter", np.concatenate([x, x]))  # other shape
    with_offset = infer(server, protocol, "counter", x, parameters={"offset": 1})
    only_y = infer(server, protocol, "counter", x, outputs=["Y"])
    after = stats(server, "counter")
    assert after["execution_count"] == before["execution_count"] + 4
    assert _count(after, "cache_hit") == _count(before, "cache_hit")
    assert _count(after, "cache_miss") == _count(before, "cache_miss") + 4
    np.testing.assert_array_equal(with_offset.as_numpy("Y"), x * 2 + 1)
    assert only_y.as_numpy("COUNT") is None
    # and each of them is a hit the second time
    again = infer(server, protocol, "counter", x, parameters={"offset": 1})
    np.testing.assert_array_equal(again.as_numpy("COUNT"), with_offset.as_numpy("COUNT"))
    assert stats(server, "counter")["execution_count"] == after["execution_count"]


def test_failed_requests_are_not_cached_nor_counted(server):
    x = -_x(600)
    before = stats(server, "counter")
    for _ in range(2):
        with pytest.raises(Exception, match="must not be negative"):
            infer(server, "http", "counter", x)
    after = stats(server, "counter")
    assert after["execution_count"] == before["execution_count"] + 2
    assert _count(after, "cache_miss") == _count(before, "cache_miss")
    assert _count(after, "cache_hit") == _count(before, "cache_hit")
    assert _count(after, "fail") == _count(before, "fail") + 2


def test_model_without_response_cache_is_not_cached(server):
    x = _x(700)
    before = stats(server, "plain")
    a = infer(server, "grpc", "plain", x)
    b = infer(server, "grpc", "plain", x)
    after = stats(server, "plain")
    assert after["execution_count"] == before["execution_count"] + 2
    assert a.as_numpy("COUNT")[0, 0] != b.as_numpy("COUNT")[0, 0]
    assert _count(after, "cache_hit") == 0 and _count(after, "cache_miss") == 0


@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_statistics_and_metrics_of_hits_and_misses(server, protocol):
    x = _x(800 if protocol == "http" else 900)
    before = stats(server, "counter")
    infer(server, protocol, "counter", x)  # miss
    infer(server, protocol, "counter", x)  # hit
    infer(server, protocol, "counter", x)  # hit
    after = stats(server, "counter")
    # Triton: a hit is a success, not an inference nor an execution
    assert _count(after, "success") == _count(before, "success") + 3
    assert after["inference_count"] == before["inference_count"] + 1
    assert after["execution_count"] == before["execution_count"] + 1
    assert _count(after, "compute_infer") == _count(before, "compute_infer") + 1
    assert _count(after, "cache_hit") == _count(before, "cache_hit") + 2
    assert _count(after, "cache_miss") == _count(before, "cache_miss") + 1
    assert int(after["inference_stats"]["cache_hit"]["ns"]) > int(
        before["inference_stats"]["cache_hit"]["ns"]
    )
    assert int(after["inference_stats"]["cache_miss"]["ns"]) > int(
        before["inference_stats"]["cache_miss"]["ns"]
    )
    # gRPC statistics carry the same numbers
    g = grpcclient.InferenceServerClient(server.grpc_url).get_inference_statistics("counter")
    gs = g.model_stats[0].inference_stats
    assert gs.cache_hit.count == _count(after, "cache_hit")
    assert gs.cache_miss.count == _count(after, "cache_miss")
    text = metrics(server)
    assert metric(text, "nv_cache_num_hits_per_model", "counter") == _count(after, "cache_hit")
    assert metric(text, "nv_cache_num_misses_per_model", "counter") == _count(after, "cache_miss")
    assert metric(text, "nv_cache_hit_duration_per_model", "counter") == (
        int(after["inference_stats"]["cache_hit"]["ns"]) // 1000
    )
    assert metric(text, "nv_cache_miss_duration_per_model", "counter") is not None
    assert "# TYPE nv_cache_num_hits_per_model counter" in text
    # only models with the cache enabled have cache series
    assert metric(text, "nv_cache_num_hits_per_model", "plain") is None
    assert metric(text, "nv_inference_count", "plain") is not None


def _wide(server, n, seed):
    x = np.full(n, seed, dtype=np.float32)
    return infer(server, "http", "wide", x).as_numpy("Y")


def test_byte_limit_evicts_least_recently_used(server):
    cache = server.manager.response_cache
    cache.clear()
    # an entry: "Y" + "FP32" + 8 a dimension + 4 bytes an element = 1037 bytes for 256 elements
    n = 256
    first = {s: _wide(server, n, s) for s in (1, 2, 3)}  # 3111 of 4096 bytes
    assert len(cache) == 3 and cache.used_bytes == 3 * 1037
    execs = stats(server, "wide")["execution_count"]
    np.testing.assert_array_equal(_wide(server, n, 1), first[1])  # 1 is now recently used
    _wide(server, n, 4)  # 4148 > 4096: evicts 2, the least recently used
    assert stats(server, "wide")["execution_count"] == execs + 1
    np.testing.assert_array_equal(_wide(server, n, 3), first[3])  # still cached
    np.testing.assert_array_equal(_wide(server, n, 1), first[1])
    assert stats(server, "wide")["execution_count"] == execs + 1
    again = _wide(server, n, 2)  # evicted: computed again
    assert stats(server, "wide")["execution_count"] == execs + 2
    assert not np.array_equal(again, first[2])


def test_too_large_response_is_not_cached(server):
    cache = server.manager.response_cache
    before = stats(server, "wide")
    used = cache.used_bytes
    _wide(server, 2048, 5)  # 8192 bytes of output > 4096
    _wide(server, 2048, 5)
    after = stats(server, "wide")
    assert after["execution_count"] == before["execution_count"] + 2
    assert _count(after, "cache_miss") == _count(before, "cache_miss") + 2  # as Triton
    assert _count(after, "cache_hit") == _count(before, "cache_hit")
    assert cache.used_bytes == used


def test_decoupled_model_with_response_cache_does_not_load(server):
    rows = {
        r["name"]: r
        for r in httpclient.InferenceServerClient(server.http_url).get_model_repository_index()
    }
    row = rows["decoupled_cached"]
    assert row["state"] == "UNAVAILABLE"
    assert "Response Cache does not currently support" in row["reason"]
    assert "decoupled" in row["reason"]


def test_ensemble_top_level_response_is_cached(server):
    x = _x(1000)
    m = grpcclient
    t = m.InferInput("IN", [1, 2], "FP32")
    t.set_data_from_numpy(x)
    g = grpcclient.InferenceServerClient(server.grpc_url)
    before_ens, before_step = stats(server, "ens"), stats(server, "plain")
    a = g.infer("ens", [t])
    b = g.infer("ens", [t])
    np.testing.assert_array_equal(a.as_numpy("OUT"), x * 2)
    np.testing.assert_array_equal(a.as_numpy("OUT"), b.as_numpy("OUT"))
    after_ens, after_step = stats(server, "ens"), stats(server, "plain")
    assert after_step["execution_count"] == before_step["execution_count"] + 1
    assert _count(after_ens, "cache_hit") == _count(before_ens, "cache_hit") + 1
    assert _count(after_ens, "cache_miss") == _count(before_ens, "cache_miss") + 1
    assert _count(after_step, "cache_hit") == 0  # the step has no cache of its own


def test_without_a_server_cache_models_are_served_uncached(tmp_path):
    repo = tmp_path / "models"
    repo.mkdir()
    _python_model(
        repo, "counter", COUNTER_CONFIG.format(name="counter", extra=CACHE_ON), COUNTER_MODEL
    )
    with EmbeddedServer([repo]) as srv:
        assert srv.manager.response_cache is None
        x = _x(1)
        a = infer(srv, "http", "counter", x)
        b = infer(srv, "http", "counter", x)
        assert a.as_numpy("COUNT")[0, 0] != b.as_numpy("COUNT")[0, 0]
        s = stats(srv, "counter")
        assert s["execution_count"] == 2
        assert _count(s, "cache_hit") == 0 and _count(s, "cache_miss") == 0
        assert "nv_cache_num_hits_per_model" not in metrics(srv)
        assert json.loads(json.dumps(s))["inference_stats"]["cache_hit"] == {"count": 0, "ns": 0}


def test_sequence_models_are_not_cached(server):
    x = _x(1100)
    for protocol in PROTOCOLS:
        for sid in (1, 2):
            infer(
                server, protocol, "seq", x, sequence_id=sid, sequence_start=True, sequence_end=True
            )
    s = stats(server, "seq")
    assert s["execution_count"] == 4
    assert _count(s, "cache_hit") == 0 and _count(s, "cache_miss") == 0
