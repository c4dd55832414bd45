"""End to end over tritonclient.http and tritonclient.grpc against one real server.

The repository is tests/fixtures/repositories/main copied to a tmp dir, with the TorchScript
and ONNX models built here. One server for the whole module keeps the suite fast.
"""

from __future__ import annotations

import os
import shutil
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import tritonclient.grpc as grpcclient
import tritonclient.http as httpclient
from tritonclient.utils import InferenceServerException

from modelport.entrypoints.kserve.embedded import EmbeddedServer
from modelport.repository import testing

FIXTURES = Path(__file__).parent / "fixtures" / "repositories"
PROTOCOLS = ["http", "grpc"]


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    repo = tmp_path_factory.mktemp("repo") / "models"
    shutil.copytree(FIXTURES / "main", repo)
    testing.build_seed_model(repo / "llama_model" / "1" / "model.pt")
    testing.build_onnx_add(repo / "onnx_add" / "1" / "model.onnx")
    testing.build_torch_linear(repo / "torch_linear" / "1" / "model.pt", version=1)
    testing.build_torch_linear(repo / "torch_linear" / "2" / "model.pt", version=2)
    testing.build_onnx_add(repo / "onnx_no_config" / "1" / "model.onnx")  # no config.pbtxt
    # the invalid models fail to load on purpose: serve the others, and say ready (Triton's
    # --exit-on-error=false --strict-readiness=false)
    srv = EmbeddedServer(
        [repo, FIXTURES / "invalid"], exit_on_error=False, strict_readiness=False
    ).start()
    yield srv
    srv.stop()


def client(server, protocol):
    if protocol == "http":
        return httpclient.InferenceServerClient(server.http_url, concurrency=8)
    return grpcclient.InferenceServerClient(server.grpc_url)


def mod(protocol):
    return httpclient if protocol == "http" else grpcclient


def make_input(protocol, name, array, datatype, binary=True):
    m = mod(protocol)
    t = m.InferInput(name, list(array.shape), datatype)
    if protocol == "http":
        t.set_data_from_numpy(array, binary_data=binary)
    else:
        t.set_data_from_numpy(array)
    return t


def as_bytes(arr):
    """tritonclient returns JSON BYTES outputs as str, binary ones as bytes."""
    return [x.encode() if isinstance(x, str) else x for x in arr.reshape(-1)]


def make_output(protocol, name, binary=True):
    if protocol == "http":
        return httpclient.InferRequestedOutput(name, binary_data=binary)
    return grpcclient.InferRequestedOutput(name)


VARIANTS = [("http", False), ("http", True), ("grpc", True)]


@pytest.mark.parametrize("protocol,binary", VARIANTS)
def test_add_sub_python_model(server, protocol, binary):
    c = client(server, protocol)
    a = np.arange(4, dtype=np.float32)
    b = np.full(4, 0.5, dtype=np.float32)
    r = c.infer(
        "add_sub",
        [
            make_input(protocol, "INPUT0", a, "FP32", binary),
            make_input(protocol, "INPUT1", b, "FP32", binary),
        ],
        outputs=[
            make_output(protocol, "OUTPUT0", binary),
            make_output(protocol, "OUTPUT1", binary),
        ],
    )
    np.testing.assert_allclose(r.as_numpy("OUTPUT0"), a + b)
    np.testing.assert_allclose(r.as_numpy("OUTPUT1"), a - b)


@pytest.mark.parametrize("protocol,binary", VARIANTS)
def test_torchscript_model_both_versions(server, protocol, binary):
    c = client(server, protocol)
    x = np.array([[1, 2, 3], [-1, 0, 4]], dtype=np.float32)
    for version in ("1", "2"):
        r = c.infer(
            "torch_linear",
            [make_input(protocol, "INPUT__0", x, "FP32", binary)],
            model_version=version,
            outputs=[make_output(protocol, "OUTPUT__0", binary)],
        )
        np.testing.assert_allclose(
            r.as_numpy("OUTPUT__0"), testing.linear_reference(x, int(version)), rtol=1e-5
        )
    # no version: the newest of the policy's versions (2)
    r = c.infer("torch_linear", [make_input(protocol, "INPUT__0", x, "FP32", binary)])
    np.testing.assert_allclose(r.as_numpy("OUTPUT__0"), testing.linear_reference(x, 2), rtol=1e-5)


@pytest.mark.parametrize("protocol,binary", VARIANTS)
def test_onnx_model(server, protocol, binary):
    c = client(server, protocol)
    a = np.random.default_rng(1).standard_normal((3, 4)).astype(np.float32)
    b = np.random.default_rng(2).standard_normal((3, 4)).astype(np.float32)
    r = c.infer(
        "onnx_add",
        [
            make_input(protocol, "A", a, "FP32", binary),
            make_input(protocol, "B", b, "FP32", binary),
        ],
        outputs=[make_output(protocol, "PRODUCT", binary)],
    )
    np.testing.assert_allclose(r.as_numpy("PRODUCT"), a * b, rtol=1e-6)
    assert r.as_numpy("SUM") is None  # only what was asked for comes back


@pytest.mark.parametrize("protocol,binary", VARIANTS)
def test_seed_ensemble_tokenizer_model_detokenizer(server, protocol, binary):
    c = client(server, protocol)
    texts = np.array([[b"hello world"], [b"Triton 24.01"]], dtype=np.object_)
    r = c.infer(
        "llama_ensemble",
        [make_input(protocol, "TEXT", texts, "BYTES", binary)],
        outputs=[make_output(protocol, "OUTPUT_TEXT", binary)],
    )
    assert as_bytes(r.as_numpy("OUTPUT_TEXT")) == [b"HELLO WORLD", b"TRITON 24.01"]


@pytest.mark.parametrize("protocol,binary", VARIANTS)
def test_bytes_round_trip(server, protocol, binary):
    c = client(server, protocol)
    if binary:
        data = np.array([[b"abc", b"\x00\xff\xfe", b""]], dtype=np.object_)
    else:  # JSON carries BYTES as UTF-8 strings
        data = np.array([["abc", "two words", ""]], dtype=np.object_)
    r = c.infer(
        "bytes_echo",
        [make_input(protocol, "IN", data, "BYTES", binary)],
        outputs=[make_output(protocol, "OUT", binary), make_output(protocol, "LENGTHS", binary)],
    )
    expect = [x if isinstance(x, bytes) else x.encode() for x in data.reshape(-1)]
    assert as_bytes(r.as_numpy("OUT")) == [x[::-1] for x in expect]
    assert r.as_numpy("LENGTHS").reshape(-1).tolist() == [len(x) for x in expect]


def test_non_utf8_bytes_output_needs_binary(server):
    c = httpclient.InferenceServerClient(server.http_url)
    data = np.array([["h\u00e9llo"]], dtype=np.object_)  # reversed: invalid UTF-8
    with pytest.raises(InferenceServerException, match="request it as binary data"):
        c.infer(
            "bytes_echo",
            [make_input("http", "IN", data, "BYTES", False)],
            outputs=[make_output("http", "OUT", False)],
        )
    r = c.infer(
        "bytes_echo",
        [make_input("http", "IN", data, "BYTES", False)],
        outputs=[make_output("http", "OUT", True)],
    )
    assert as_bytes(r.as_numpy("OUT")) == ["h\u00e9llo".encode()[::-1]]


@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_bls_calls_another_model(server, protocol):
    c = client(server, protocol)
    a = np.arange(4, dtype=np.float32)
    r = c.infer(
        "bls_add",
        [make_input(protocol, "INPUT0", a, "FP32"), make_input(protocol, "INPUT1", a, "FP32")],
    )
    np.testing.assert_allclose(r.as_numpy("OUTPUT0"), (a + a) * 2)


def test_decoupled_model_streams_over_grpc(server):
    results = []

    def callback(result, error):
        results.append(error if error is not None else result)

    c = grpcclient.InferenceServerClient(server.grpc_url)
    c.start_stream(callback=callback)
    try:
        inp = grpcclient.InferInput("COUNT", [1], "INT32")
        inp.set_data_from_numpy(np.array([4], dtype=np.int32))
        c.async_stream_infer("repeat_decoupled", [inp], enable_empty_final_response=True)
    finally:
        c.stop_stream()  # waits for the stream to finish
    errors = [r for r in results if isinstance(r, Exception)]
    assert not errors
    outs = [r.as_numpy("OUT") for r in results if r.as_numpy("OUT") is not None]
    assert [int(o[0]) for o in outs] == [0, 1, 2, 3]
    finals = [r.get_response().parameters["triton_final_response"].bool_param for r in results]
    assert finals[-1] is True and not any(finals[:-1])


def test_decoupled_model_refuses_unary_infer(server):
    c = httpclient.InferenceServerClient(server.http_url)
    inp = httpclient.InferInput("COUNT", [1], "INT32")
    inp.set_data_from_numpy(np.array([2], dtype=np.int32))
    with pytest.raises(InferenceServerException, match="decoupled"):
        c.infer("repeat_decoupled", [inp])


def test_generate_extension(server):
    import json

    body = json.dumps({"INPUT0": [1, 2, 3, 4], "INPUT1": [1, 1, 1, 1]}).encode()
    req = urllib.request.Request(
        f"http://{server.http_url}/v2/models/add_sub/generate", data=body, method="POST"
    )
    doc = json.loads(urllib.request.urlopen(req).read())
    assert doc["OUTPUT0"] == [2, 3, 4, 5] and doc["OUTPUT1"] == [0, 1, 2, 3]
    body = json.dumps({"COUNT": 3}).encode()
    req = urllib.request.Request(
        f"http://{server.http_url}/v2/models/repeat_decoupled/generate_stream",
        data=body,
        method="POST",
    )
    events = [
        json.loads(line[len("data: ") :])
        for line in urllib.request.urlopen(req).read().decode().splitlines()
        if line.startswith("data: ")
    ]
    assert [e["OUT"] for e in events] == [0, 1, 2]


@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_metadata_config_and_health(server, protocol):
    c = client(server, protocol)
    assert c.is_server_live() and c.is_server_ready()
    assert c.is_model_ready("onnx_add") and c.is_model_ready("torch_linear", "1")
    assert not c.is_model_ready("neg_max_batch_size")
    if protocol == "http":
        meta = c.get_model_metadata("llama_model")
        assert meta["platform"] == "pytorch_libtorch"
        assert meta["inputs"][0] == {"name": "input_ids", "datatype": "INT64", "shape": [-1, -1]}
        cfg = c.get_model_config("llama_model")
        assert cfg["max_batch_size"] == 64
        assert cfg["dynamic_batching"]["preferred_batch_size"] == [8, 16, 32]
        assert c.get_server_metadata()["name"] == "modelport"
    else:
        meta = c.get_model_metadata("torch_linear")
        assert sorted(meta.versions) == ["1", "2"]
        cfg = c.get_model_config("llama_model").config
        assert cfg.max_batch_size == 64 and list(cfg.dynamic_batching.preferred_batch_size) == [
            8,
            16,
            32,
        ]


@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_infer_errors_have_triton_messages_and_codes(server, protocol):
    c = client(server, protocol)
    a3 = np.arange(3, dtype=np.float32)
    a4 = np.arange(4, dtype=np.float32)
    i4 = np.arange(4, dtype=np.int32)
    cases = [
        ("add_sub", [("INPUT0", a3, "FP32"), ("INPUT1", a4, "FP32")], "unexpected shape for input 'INPUT0'", 400, "StatusCode.INVALID_ARGUMENT"),
        ("add_sub", [("INPUT0", i4, "INT32"), ("INPUT1", a4, "FP32")], "unexpected datatype TYPE_INT32 for inference input 'INPUT0', expecting TYPE_FP32", 400, "StatusCode.INVALID_ARGUMENT"),
        ("add_sub", [("INPUT0", a4, "FP32")], "missing required input(s) ['INPUT1']", 400, "StatusCode.INVALID_ARGUMENT"),
        ("add_sub", [("INPUT0", a4, "FP32"), ("INPUT1", a4, "FP32"), ("EXTRA", a4, "FP32")], "unexpected inference input 'EXTRA'", 400, "StatusCode.INVALID_ARGUMENT"),
        ("no_such_model", [("INPUT0", a4, "FP32")], "Request for unknown model: 'no_such_model' is not found", 404, "StatusCode.NOT_FOUND"),
        ("onnx_add", [("A", np.zeros((9, 4), np.float32), "FP32"), ("B", np.zeros((9, 4), np.float32), "FP32")], "inference request batch-size must be <= 8 for 'onnx_add'", 400, "StatusCode.INVALID_ARGUMENT"),
        ("neg_max_batch_size", [("X", a4, "FP32")], "has no available versions", 503, "StatusCode.UNAVAILABLE"),
    ]  # fmt: skip
    for model, inputs, message, http_status, grpc_status in cases:
        with pytest.raises(InferenceServerException) as info:
            c.infer(model, [make_input(protocol, n, arr, dt) for n, arr, dt in inputs])
        assert message in info.value.message(), (model, info.value.message())
        expected = str(http_status) if protocol == "http" else grpc_status
        assert info.value.status() == expected, (model, info.value.status())


def test_http_error_body_shape_and_bad_json(server):
    import json
    import urllib.error

    req = urllib.request.Request(
        f"http://{server.http_url}/v2/models/add_sub/infer", data=b"{not json", method="POST"
    )
    with pytest.raises(urllib.error.HTTPError) as info:
        urllib.request.urlopen(req)
    assert info.value.code == 400
    assert "failed to parse the request JSON" in json.loads(info.value.read())["error"]
    with pytest.raises(urllib.error.HTTPError) as info:
        urllib.request.urlopen(f"http://{server.http_url}/v2/models/nope")
    assert info.value.code == 404
    assert json.loads(info.value.read()) == {
        "error": "Request for unknown model: 'nope' is not found"
    }


def test_statistics_and_metrics_count_requests(server):
    c = httpclient.InferenceServerClient(server.http_url)
    before = c.get_inference_statistics("onnx_add")["model_stats"][0]
    a = np.ones((2, 4), dtype=np.float32)
    for _ in range(3):
        c.infer(
            "onnx_add", [make_input("http", "A", a, "FP32"), make_input("http", "B", a, "FP32")]
        )
    after = c.get_inference_statistics("onnx_add")["model_stats"][0]
    assert (
        after["inference_stats"]["success"]["count"] - before["inference_stats"]["success"]["count"]
        == 3
    )
    assert after["inference_count"] - before["inference_count"] == 6  # rows
    g = grpcclient.InferenceServerClient(server.grpc_url)
    gstats = g.get_inference_statistics("onnx_add").model_stats[0]
    assert gstats.inference_stats.success.count == after["inference_stats"]["success"]["count"]
    text = urllib.request.urlopen(server.metrics_url).read().decode()
    line = f'nv_inference_request_success{{model="onnx_add",version="1"}} {after["inference_stats"]["success"]["count"]}'
    assert line in text
    for name in ("nv_inference_count", "nv_inference_exec_count", "nv_inference_queue_duration_us",
                 "nv_inference_compute_infer_duration_us", "nv_inference_request_failure",
                 "nv_inference_pending_request_count"):  # fmt: skip
        assert f"# TYPE {name} " in text


def test_warmup_ran_before_ready(server):
    stats = server.manager.stats("onnx_add")[0]
    # the warm-up request (batch 2) ran at load, before the model reported ready
    assert stats["execution_count"] >= 1
    assert any(b["batch_size"] == 2 for b in stats["batch_stats"])


def test_concurrent_clients_on_both_protocols(server):
    x = np.array([[1, 2, 3]], dtype=np.float32)

    def one(i):
        protocol = PROTOCOLS[i % 2]
        c = client(server, protocol)
        r = c.infer(
            "torch_linear", [make_input(protocol, "INPUT__0", x * i, "FP32")], model_version="1"
        )
        return r.as_numpy("OUTPUT__0")

    with ThreadPoolExecutor(16) as pool:
        outs = list(pool.map(one, range(32)))
    for i, out in enumerate(outs):
        np.testing.assert_allclose(out, testing.linear_reference(x * i, 1), rtol=1e-5)


def test_load_unload_refused_in_none_mode(server):
    c = httpclient.InferenceServerClient(server.http_url)
    # Triton's words and status: UNAVAILABLE (503)
    with pytest.raises(
        InferenceServerException, match="load / unload is not allowed if polling is enabled"
    ) as info:
        c.load_model("add_sub")
    assert info.value.status() == "503"
    g = grpcclient.InferenceServerClient(server.grpc_url)
    with pytest.raises(InferenceServerException, match="not allowed") as info:
        g.unload_model("add_sub")
    assert info.value.status() == "StatusCode.UNAVAILABLE"
    assert c.is_model_ready("add_sub")
    index = {r["name"]: r for r in c.get_model_repository_index()}
    assert index["add_sub"]["state"] == "READY"
    assert index["ensemble_cycle"]["state"] == "UNAVAILABLE"
    assert "cycle" in index["ensemble_cycle"]["reason"]


def test_onnx_model_without_config_is_autocompleted(server):
    c = httpclient.InferenceServerClient(server.http_url)
    cfg = c.get_model_config("onnx_no_config")
    assert cfg["backend"] == "onnxruntime" and cfg["max_batch_size"] == 4
    assert [(i["name"], i["data_type"], i["dims"]) for i in cfg["input"]] == [
        ("A", "TYPE_FP32", [4]),
        ("B", "TYPE_FP32", [4]),
    ]
    a = np.ones((3, 4), dtype=np.float32)
    r = c.infer(
        "onnx_no_config", [make_input("http", "A", a, "FP32"), make_input("http", "B", a, "FP32")]
    )
    np.testing.assert_allclose(r.as_numpy("SUM"), a * 2)


def test_grpc_typed_contents_and_stream_errors(server):
    """Clients other than tritonclient send tensors in `contents` rather than raw bytes."""
    import grpc
    from tritonclient.grpc import service_pb2, service_pb2_grpc

    with grpc.insecure_channel(server.grpc_url) as channel:
        stub = service_pb2_grpc.GRPCInferenceServiceStub(channel)
        req = service_pb2.ModelInferRequest(model_name="add_sub", id="typed-1")
        for name, values in (("INPUT0", [1, 2, 3, 4]), ("INPUT1", [0.5, 0.5, 0.5, 0.5])):
            t = req.inputs.add(name=name, datatype="FP32", shape=[4])
            t.contents.fp32_contents.extend(values)
        resp = stub.ModelInfer(req)
        assert resp.id == "typed-1" and resp.model_version == "1"
        out = {o.name: i for i, o in enumerate(resp.outputs)}
        got = np.frombuffer(resp.raw_output_contents[out["OUTPUT0"]], dtype=np.float32)
        np.testing.assert_allclose(got, [1.5, 2.5, 3.5, 4.5])
        bad = service_pb2.ModelInferRequest(model_name="add_sub")
        t = bad.inputs.add(name="INPUT0", datatype="FP32", shape=[4])
        t.contents.fp32_contents.extend([1, 2])
        with pytest.raises(grpc.RpcError) as info:
            stub.ModelInfer(bad)
        assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "unexpected number of elements 2" in info.value.details()
        replies = list(
            stub.ModelStreamInfer(iter([service_pb2.ModelInferRequest(model_name="nope")]))
        )
        assert [r.error_message for r in replies] == [
            "Request for unknown model: 'nope' is not found"
        ]


def test_grpc_stream_answers_in_request_order_and_names_failed_requests(server):
    """Triton writes a non-decoupled model's stream responses in the order the requests came,
    though a later one finishes first, and an error carries its request's id."""
    import grpc
    from tritonclient.grpc import service_pb2, service_pb2_grpc

    def sleepy(seconds: float, rid: str):
        req = service_pb2.ModelInferRequest(model_name="sleepy", id=rid)
        req.inputs.add(name="SECONDS", datatype="FP32", shape=[1])
        req.raw_input_contents.append(np.array([seconds], np.float32).tobytes())
        return req

    requests = [
        sleepy(0.6, "slow"), sleepy(0.0, "fast"),
        service_pb2.ModelInferRequest(model_name="nope", id="unknown"),
        sleepy(0.3, "middle"), sleepy(0.0, "last"),
    ]  # fmt: skip
    with grpc.insecure_channel(server.grpc_url) as channel:
        stub = service_pb2_grpc.GRPCInferenceServiceStub(channel)
        replies = list(stub.ModelStreamInfer(iter(requests)))
    assert [r.infer_response.id for r in replies] == ["slow", "fast", "unknown", "middle", "last"]
    assert [bool(r.error_message) for r in replies] == [False, False, True, False, False]
    assert "unknown model: 'nope'" in replies[2].error_message
    slept = [np.frombuffer(r.infer_response.raw_output_contents[0], np.float32)[0]
             for r in replies if not r.error_message]  # fmt: skip
    np.testing.assert_allclose(slept, [0.6, 0.0, 0.3, 0.0])

    # tritonclient's stream: the callbacks come in request order too
    seen: list[str] = []
    g = grpcclient.InferenceServerClient(server.grpc_url)
    g.start_stream(callback=lambda result, error: seen.append(
        f"error: {error.message()}" if error else result.get_response().id))
    try:
        for rid, seconds in (("a", 0.4), ("b", 0.0)):
            inp = grpcclient.InferInput("SECONDS", [1], "FP32")
            inp.set_data_from_numpy(np.array([seconds], np.float32))
            g.async_stream_infer("sleepy", [inp], request_id=rid)
        g.async_stream_infer("missing_model", [inp], request_id="c")
    finally:
        g.stop_stream()
    assert seen == ["a", "b", "error: Request for unknown model: 'missing_model' is not found"]


def test_seed_ensemble_under_concurrency_keeps_answers_apart(server):
    words = [f"request number {i} " + "x" * (i % 5) for i in range(24)]

    def one(i):
        protocol = PROTOCOLS[i % 2]
        c = client(server, protocol)
        text = np.array([[words[i].encode()]], dtype=np.object_)
        r = c.infer("llama_ensemble", [make_input(protocol, "TEXT", text, "BYTES")])
        return as_bytes(r.as_numpy("OUTPUT_TEXT"))[0]

    with ThreadPoolExecutor(12) as pool:
        outs = list(pool.map(one, range(len(words))))
    assert outs == [w.upper().encode() for w in words]


def test_gzip_compressed_http_request(server):
    c = httpclient.InferenceServerClient(server.http_url)
    a = np.arange(4, dtype=np.float32)
    r = c.infer(
        "add_sub",
        [make_input("http", "INPUT0", a, "FP32"), make_input("http", "INPUT1", a, "FP32")],
        request_compression_algorithm="gzip",
    )
    np.testing.assert_allclose(r.as_numpy("OUTPUT0"), a * 2)


@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_python_model_auto_complete_config(server, protocol):
    c = client(server, protocol)
    if protocol == "http":
        cfg = c.get_model_config("autocomplete_py")
        assert cfg["max_batch_size"] == 4 and "dynamic_batching" in cfg
        assert cfg["input"][0]["name"] == "X" and cfg["input"][0]["dims"] == [2]
    x = np.array([[1, 2], [3, 4]], dtype=np.int32)
    r = c.infer("autocomplete_py", [make_input(protocol, "X", x, "INT32")])
    np.testing.assert_array_equal(r.as_numpy("SQUARE"), x**2)


def test_non_decoupled_model_answering_through_response_senders(server):
    def one(i):
        c = client(server, PROTOCOLS[i % 2])
        x = np.array([[float(i)]], dtype=np.float32)
        return float(
            c.infer("sender_default", [make_input(PROTOCOLS[i % 2], "X", x, "FP32")]).as_numpy("Y")[
                0, 0
            ]
        )

    with ThreadPoolExecutor(8) as pool:
        assert list(pool.map(one, range(8))) == [-float(i) for i in range(8)]


def test_bls_to_a_decoupled_model(server):
    c = httpclient.InferenceServerClient(server.http_url)
    r = c.infer("bls_stream", [make_input("http", "COUNT", np.array([5], dtype=np.int32), "INT32")])
    assert int(r.as_numpy("TOTAL")[0]) == 0 + 1 + 2 + 3 + 4
    assert int(r.as_numpy("RESPONSES")[0]) == 5


def test_statistics_of_all_models(server):
    h = httpclient.InferenceServerClient(server.http_url)
    names = {s["name"] for s in h.get_inference_statistics()["model_stats"]}
    assert {"add_sub", "onnx_add", "llama_ensemble"} <= names
    g = grpcclient.InferenceServerClient(server.grpc_url)
    assert {s.name for s in g.get_inference_statistics().model_stats} == names


@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_nested_ensemble(server, protocol):
    c = client(server, protocol)
    text = np.array([[b"abc def"]], dtype=np.object_)
    r = c.infer("nested_ensemble", [make_input(protocol, "TEXT", text, "BYTES")])
    assert as_bytes(r.as_numpy("REVERSED_UPPER")) == [b"FED CBA"]


@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_classification_extension(server, protocol):
    c = client(server, protocol)
    a = np.array([[1, 5, 3, 2], [9, 0, 0, 8]], dtype=np.float32)
    zeros = np.zeros_like(a)
    if protocol == "http":
        out = httpclient.InferRequestedOutput("SUM", binary_data=False, class_count=2)
    else:
        out = grpcclient.InferRequestedOutput("SUM", class_count=2)
    r = c.infer(
        "onnx_add",
        [make_input(protocol, "A", a, "FP32"), make_input(protocol, "B", zeros, "FP32")],
        outputs=[out],
    )
    got = r.as_numpy("SUM")
    assert got.shape == (2, 2)
    assert as_bytes(got) == [
        b"5.000000:1:one",
        b"3.000000:2:two",
        b"9.000000:0:zero",
        b"8.000000:3:three",
    ]


@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_system_shared_memory(server, protocol):
    import tritonclient.utils.shared_memory as shm

    c = client(server, protocol)
    m = mod(protocol)
    a = np.arange(4, dtype=np.float32)
    b = np.full(4, 2.0, dtype=np.float32)
    tag = f"mp_{protocol}_{os.getpid()}"
    inp = shm.create_shared_memory_region(f"{tag}_in", f"/{tag}_in", 32)
    out = shm.create_shared_memory_region(f"{tag}_out", f"/{tag}_out", 32)
    try:
        shm.set_shared_memory_region(inp, [a, b])
        c.register_system_shared_memory(f"{tag}_in", f"/{tag}_in", 32)
        c.register_system_shared_memory(f"{tag}_out", f"/{tag}_out", 32)
        status = c.get_system_shared_memory_status()
        names = [r["name"] for r in status] if protocol == "http" else list(status.regions)
        assert f"{tag}_in" in names and f"{tag}_out" in names
        inputs = [m.InferInput("INPUT0", [4], "FP32"), m.InferInput("INPUT1", [4], "FP32")]
        inputs[0].set_shared_memory(f"{tag}_in", 16)
        inputs[1].set_shared_memory(f"{tag}_in", 16, offset=16)
        outputs = [m.InferRequestedOutput("OUTPUT0"), m.InferRequestedOutput("OUTPUT1")]
        outputs[0].set_shared_memory(f"{tag}_out", 16)
        outputs[1].set_shared_memory(f"{tag}_out", 16, offset=16)
        r = c.infer("add_sub", inputs, outputs=outputs)
        assert r.get_output("OUTPUT0") is not None
        got0 = shm.get_contents_as_numpy(out, np.float32, [4])
        got1 = shm.get_contents_as_numpy(out, np.float32, [4], offset=16)
        np.testing.assert_allclose(got0, a + b)
        np.testing.assert_allclose(got1, a - b)
        if protocol == "grpc":  # a stream writes the outputs into the region too
            shm.set_shared_memory_region(out, [np.zeros(8, np.float32)])
            results: list = []
            c.start_stream(callback=lambda result, error: results.append(error or result))
            try:
                c.async_stream_infer("add_sub", inputs, outputs=outputs)
            finally:
                c.stop_stream()
            assert len(results) == 1 and results[0].get_output("OUTPUT0") is not None
            np.testing.assert_allclose(shm.get_contents_as_numpy(out, np.float32, [4]), a + b)
        with pytest.raises(InferenceServerException, match="already in manager"):
            c.register_system_shared_memory(f"{tag}_in", f"/{tag}_in", 32)
        with pytest.raises(InferenceServerException, match="invalid shared memory key"):
            c.register_system_shared_memory("escape", "/../../etc/hostname", 4)
    finally:
        c.unregister_system_shared_memory()
        shm.destroy_shared_memory_region(inp)
        shm.destroy_shared_memory_region(out)
    status = c.get_system_shared_memory_status()
    assert not (status if protocol == "http" else status.regions)
