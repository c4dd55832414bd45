"""Bad input gets a clear error in the protocol's own shape, and the server keeps serving.

One real server per protocol for the whole module: KServe (HTTP + gRPC, embedded) over a
small copy of tests/fixtures/repositories/main, and `modelport serve` with a TorchServe echo
archive. Each case sends one malformed request, checks the status and error shape, and the
module's last checks send a normal request again.
"""

from __future__ import annotations

import json
import os
import shutil
import struct
import subprocess
import sys
import time
from pathlib import Path

import grpc
import httpx
import numpy as np
import pytest
from tritonclient.grpc import service_pb2 as pb
from tritonclient.grpc import service_pb2_grpc as pb_grpc

from modelport.entrypoints.kserve.embedded import EmbeddedServer
from modelport.repository import testing

FIXTURES = Path(__file__).parent / "fixtures"
sys.path.insert(0, str(FIXTURES / "torchserve"))
import ts_archives  # noqa: E402

from helpers.server_proc import free_port  # noqa: E402

# ---- KServe ------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def kserve(tmp_path_factory):
    repo = tmp_path_factory.mktemp("bad_input_repo") / "models"
    repo.mkdir()
    for name in ("torch_linear", "bytes_echo"):
        shutil.copytree(FIXTURES / "repositories" / "main" / name, repo / name)
    testing.build_torch_linear(repo / "torch_linear" / "1" / "model.pt", version=1)
    srv = EmbeddedServer([repo], control_mode="explicit", load_models=["*"]).start()
    yield srv
    srv.stop()


GOOD = {"inputs": [{"name": "INPUT__0", "datatype": "FP32", "shape": [1, 3], "data": [1, 2, 3]}]}


def _with(**changes):
    """GOOD with its input's fields changed."""
    return {"inputs": [{**GOOD["inputs"][0], **changes}]}


def _with_doc(**changes):
    return {**GOOD, **changes}


def _out(**params):
    return _with_doc(outputs=[{"name": "OUTPUT__0", "parameters": params}])


def _kserve_error(r: httpx.Response, status: int, *words: str) -> str:
    assert r.status_code == status, r.text
    doc = r.json()
    assert set(doc) == {"error"} and isinstance(doc["error"], str), doc
    assert not doc["error"].startswith(("TypeError", "ValueError", "AttributeError")), doc
    for w in words:
        assert w in doc["error"], doc
    return doc["error"]


HTTP_INFER_CASES = {
    "input name a list": (_with(name=["a"]), "name of an input must be a string"),
    "shape with a bool": (_with(shape=[True, 3]), "invalid shape"),
    "datatype a list": (_with(datatype=["FP32"]), "invalid datatype"),
    "numbers as strings": (_with(data=["1", "2", "3"]), "must hold numbers"),
    "null element": (_with(data=[1, None, 3]), "must hold numbers"),
    "data nested deeper than shape": (_with(data=[[[1, 2, 3]]]), "nested unlike its shape"),
    "ragged data": (_with(data=[[1, 2], [3]]), "nested unlike its shape"),
    "INT64 out of range": (
        _with(datatype="INT64", data=[2**70, 1, 2]),
        "out of range for INT64",
    ),
    "UINT8 negative": (_with(datatype="UINT8", data=[-1, 1, 2]), "out of range for UINT8"),
    "float for INT32": (_with(datatype="INT32", data=[1.5, 1, 2]), "must hold integers"),
    # was cast to inf with a RuntimeWarning and answered 200 with inf / -inf outputs
    "FP32 overflow": (_with(data=[1e300, 1, 2]), "out of range for FP32"),
    "FP32 overflow by a big integer": (_with(data=[10**400, 1, 2]), "out of range for FP32"),
    "input parameters a string": (_with(parameters="x"), "must be a JSON object"),
    "binary_data_size a string": (
        _with(parameters={"binary_data_size": "x"}),
        "'binary_data_size' of input 'INPUT__0' must be an integer",
    ),
    "shared memory byte size a string": (
        _with(parameters={"shared_memory_region": "r", "shared_memory_byte_size": "x"}),
        "'shared_memory_byte_size' must be an integer",
    ),
    "priority a string": (
        _with_doc(parameters={"priority": "high"}),
        "parameter 'priority' must be an integer",
    ),
    "timeout a list": (
        _with_doc(parameters={"timeout": [1]}),
        "parameter 'timeout' must be an integer",
    ),
    "negative priority": (_with_doc(parameters={"priority": -5}), "must be >= 0"),
    "binary_data_output a string": (
        _with_doc(parameters={"binary_data_output": "yes"}),
        "'binary_data_output' must be a boolean",
    ),
    "id an object": (_with_doc(id={"a": 1}), "'id' must be a string"),
    "outputs a string": (_with_doc(outputs="OUTPUT__0"), "'outputs' must be an array"),
    "outputs of strings": (_with_doc(outputs=["OUTPUT__0"]), "every output must be an object"),
    "output without name": (_with_doc(outputs=[{}]), "every output must be an object"),
    "output parameters a list": (
        _with_doc(outputs=[{"name": "OUTPUT__0", "parameters": [1]}]),
        "must be a JSON object",
    ),
    "output requested twice": (
        _with_doc(outputs=[{"name": "OUTPUT__0"}, {"name": "OUTPUT__0"}]),
        "requested more than once",
    ),
    "classification a string": (_out(classification="x"), "classification count"),
    "classification a float": (_out(classification=1.5), "classification count"),
    "classification 0": (_out(classification=0), "must be >= 1"),
    "binary_data a string": (_out(binary_data="yes"), "must be a boolean"),
}


@pytest.mark.parametrize("case", sorted(HTTP_INFER_CASES))
def test_kserve_http_infer_bad_fields(kserve, case):
    doc, words = HTTP_INFER_CASES[case]
    r = httpx.post(f"http://{kserve.http_url}/v2/models/torch_linear/infer", json=doc)
    _kserve_error(r, 400, words)


def test_kserve_http_bytes_inputs(kserve):
    url = f"http://{kserve.http_url}/v2/models/bytes_echo/infer"

    def doc(data, shape=(1, 3)):
        return {"inputs": [{"name": "IN", "datatype": "BYTES", "shape": list(shape), "data": data}]}

    _kserve_error(httpx.post(url, json=doc([1, None, {"a": 1}])), 400, "must hold strings")
    _kserve_error(httpx.post(url, json=doc([["a"], "b"], (1, 2))), 400, "nested unlike")
    # a JSON escape of a lone surrogate: valid JSON, not valid Unicode
    body = b'{"inputs":[{"name":"IN","datatype":"BYTES","shape":[1,1],"data":["\\udcff"]}]}'
    _kserve_error(httpx.post(url, content=body), 400, "not valid Unicode")
    # binary: a shape of 10^12 elements with 8 bytes of data is refused before any allocation
    head = json.dumps(
        {
            "inputs": [
                {
                    "name": "IN",
                    "datatype": "BYTES",
                    "shape": [1, 10**12],
                    "parameters": {"binary_data_size": 8},
                }
            ]
        }
    ).encode()
    r = httpx.post(
        url,
        content=head + struct.pack("<I", 4) + b"abcd",
        headers={"Inference-Header-Content-Length": str(len(head))},
    )
    _kserve_error(r, 400, "unexpected total byte size")
    r = httpx.post(url, json=doc(["a", "b", "c"]))
    assert r.status_code == 200, r.text


def test_kserve_http_body_and_url(kserve):
    base = f"http://{kserve.http_url}"
    deep = b'{"inputs": ' + b"[" * 100_000 + b"]" * 100_000 + b"}"
    _kserve_error(httpx.post(f"{base}/v2/models/torch_linear/infer", content=deep), 400, "JSON")
    # NaN and Infinity are no JSON (Triton's parser refuses them): they were read as numbers
    for word in ("NaN", "Infinity", "-Infinity"):
        body = b'{"inputs": [{"name": "INPUT__0", "datatype": "FP32", "shape": [1, 3], '
        body += b'"data": [1, 2, ' + word.encode() + b"]}]}"
        r = httpx.post(f"{base}/v2/models/torch_linear/infer", content=body)
        _kserve_error(r, 400, "failed to parse the request JSON buffer", "is not valid JSON")
    r = httpx.post(f"{base}/v2/models/torch_linear/versions/-5/infer", json=GOOD)
    _kserve_error(r, 400, "invalid model version '-5'")
    # paths and methods KServe does not serve: still {"error": ...}
    _kserve_error(httpx.get(f"{base}/v2/models/torch_linear/infer"), 404, "not a KServe")
    _kserve_error(httpx.post(f"{base}/v2/no/such/path"), 404, "not a KServe")


def test_kserve_http_repository_and_shm_bad_json(kserve):
    base = f"http://{kserve.http_url}/v2"
    for path in ("repository/models/torch_linear/load", "repository/models/nope/unload"):
        for params in ([1], "x"):
            r = httpx.post(f"{base}/{path}", json={"parameters": params})
            _kserve_error(r, 400, "'parameters' must be a JSON object")
    r = httpx.post(
        f"{base}/repository/models/torch_linear/load", json={"parameters": {"config": 5}}
    )
    _kserve_error(r, 400, "'config' must be a string")
    r = httpx.post(
        f"{base}/repository/models/nope/unload", json={"parameters": {"unload_dependents": "y"}}
    )
    _kserve_error(r, 400, "must be a boolean")
    _kserve_error(httpx.post(f"{base}/repository/index", json={"ready": "no"}), 400, "boolean")
    r = httpx.post(
        f"{base}/systemsharedmemory/region/r/register", json={"key": "/x", "offset": "a"}
    )
    _kserve_error(r, 400, "'offset' must be an integer")
    r = httpx.post(
        f"{base}/systemsharedmemory/region/r/register", json={"key": "/x\u0000y", "byte_size": 4}
    )
    _kserve_error(r, 400, "invalid shared memory key")


def _grpc_request(**kw) -> pb.ModelInferRequest:
    m = pb.ModelInferRequest(model_name="torch_linear", model_version=kw.pop("version", ""))
    t = m.inputs.add(name="INPUT__0", datatype=kw.pop("datatype", "FP32"), shape=[1, 3])
    for key, (field, value) in kw.pop("params", {}).items():
        setattr(m.parameters[key], field, value)
    if "contents" in kw:
        field, values = kw.pop("contents")
        getattr(t.contents, field).extend(values)
    m.raw_input_contents.extend(kw.pop("raw", [np.array([[1, 2, 3]], np.float32).tobytes()]))
    for name, params in kw.pop("outputs", []):
        o = m.outputs.add(name=name)
        for key, (field, value) in params.items():
            setattr(o.parameters[key], field, value)
    assert not kw
    return m


def _shm_request() -> pb.ModelInferRequest:
    """An input naming a shared memory region with a byte size that is a string."""
    m = _grpc_request(raw=[])
    m.inputs[0].parameters["shared_memory_region"].string_param = "r"
    m.inputs[0].parameters["shared_memory_byte_size"].string_param = "x"
    return m


GRPC_CASES = {
    "contents out of range": (
        _grpc_request(datatype="UINT8", raw=[], contents=("uint_contents", [300, 1, 2])),
        "out of range for UINT8",
    ),
    "raw and contents together": (
        _grpc_request(contents=("fp32_contents", [1, 2, 3])),
        "contents field must not be specified",
    ),
    "negative version": (_grpc_request(version="-5"), "invalid model version"),
    "priority a string": (
        _grpc_request(params={"priority": ("string_param", "high")}),
        "'priority' must be an integer",
    ),
    "timeout a double": (
        _grpc_request(params={"timeout": ("double_param", 1.5)}),
        "'timeout' must be an integer",
    ),
    "shared memory size a string": (_shm_request(), "'shared_memory_byte_size' must be"),
    "classification a string": (
        _grpc_request(outputs=[("OUTPUT__0", {"classification": ("string_param", "x")})]),
        "classification count",
    ),
    "output requested twice": (
        _grpc_request(outputs=[("OUTPUT__0", {}), ("OUTPUT__0", {})]),
        "requested more than once",
    ),
}


@pytest.fixture(scope="module")
def stub(kserve):
    with grpc.insecure_channel(kserve.grpc_url) as channel:
        yield pb_grpc.GRPCInferenceServiceStub(channel)


def _grpc_error(call, code: grpc.StatusCode, words: str) -> None:
    with pytest.raises(grpc.RpcError) as info:
        call()
    assert info.value.code() == code, info.value.details()
    assert words in info.value.details(), info.value.details()


@pytest.mark.parametrize("case", sorted(GRPC_CASES))
def test_kserve_grpc_infer_bad_fields(stub, case):
    msg, words = GRPC_CASES[case]
    _grpc_error(lambda: stub.ModelInfer(msg, timeout=30), grpc.StatusCode.INVALID_ARGUMENT, words)


def test_kserve_grpc_duplicate_input_and_huge_bytes_shape(stub):
    msg = _grpc_request()
    msg.inputs.append(msg.inputs[0])
    msg.raw_input_contents.append(msg.raw_input_contents[0])
    _grpc_error(lambda: stub.ModelInfer(msg), grpc.StatusCode.INVALID_ARGUMENT, "more than once")
    msg = pb.ModelInferRequest(model_name="bytes_echo")
    msg.inputs.add(name="IN", datatype="BYTES", shape=[1, 10**12])
    msg.raw_input_contents.append(b"\x00" * 8)
    _grpc_error(lambda: stub.ModelInfer(msg), grpc.StatusCode.INVALID_ARGUMENT, "byte size")


def test_kserve_grpc_repository_and_shm(stub):
    load = pb.RepositoryModelLoadRequest(model_name="torch_linear")
    load.parameters["config"].int64_param = 5
    _grpc_error(
        lambda: stub.RepositoryModelLoad(load), grpc.StatusCode.INVALID_ARGUMENT, "'config'"
    )
    unload = pb.RepositoryModelUnloadRequest(model_name="torch_linear")
    unload.parameters["unload_dependents"].string_param = "yes"
    _grpc_error(
        lambda: stub.RepositoryModelUnload(unload), grpc.StatusCode.INVALID_ARGUMENT, "boolean"
    )
    reg = pb.SystemSharedMemoryRegisterRequest(name="r", key="/a\x00b", byte_size=4)
    _grpc_error(
        lambda: stub.SystemSharedMemoryRegister(reg),
        grpc.StatusCode.INVALID_ARGUMENT,
        "invalid shared memory key",
    )


def test_kserve_grpc_stream_bad_parameter_is_an_error_message(stub):
    msgs = [_grpc_request(params={"priority": ("string_param", "x")}), _grpc_request()]
    replies = list(stub.ModelStreamInfer(iter(msgs), timeout=30))
    errors = sorted(r.error_message for r in replies)
    assert errors == ["", "parameter 'priority' must be an integer, got 'x'"], errors


def test_kserve_still_serves_after_bad_input(kserve, stub):
    r = httpx.post(f"http://{kserve.http_url}/v2/models/torch_linear/infer", json=GOOD)
    assert r.status_code == 200, r.text
    np.testing.assert_allclose(
        r.json()["outputs"][0]["data"],
        testing.linear_reference(np.array([[1, 2, 3]], np.float32), 1)[0],
        rtol=1e-5,
    )
    reply = stub.ModelInfer(_grpc_request(), timeout=30)
    assert reply.outputs[0].name == "OUTPUT__0"


# ---- TorchServe --------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def torchserve(tmp_path_factory):
    root = tmp_path_factory.mktemp("bad_input_ts")
    store = root / "store"
    ts_archives.echo_archive(store, root / "echo")
    port, mport, iport = free_port(), free_port(), free_port()
    cmd = [
        sys.executable, "-m", "modelport", "serve", "--port", str(port),
        "--log-level", "warning", "--model-store", str(store), "--models", "echo=echo.mar",
        "--management-port", str(mport), "--inference-port", str(iport),
        "--disable-token-auth", "--ts-workers", "1",
    ]  # fmt: skip
    log = root / "server.log"
    # the server runs in `root`: a relative PYTHONPATH (src) would import another checkout
    src = str(Path(__file__).resolve().parents[1] / "src")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([src, os.environ.get("PYTHONPATH", "")]))
    with open(log, "wb") as f:
        proc = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, cwd=root, env=env)
    urls = {
        "shared": f"http://127.0.0.1:{port}",
        "inference": f"http://127.0.0.1:{iport}",
        "management": f"http://127.0.0.1:{mport}",
    }
    deadline = time.monotonic() + 120
    while True:
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            raise RuntimeError(log.read_text()[-4000:])
        try:  # the listeners start one after the other: wait for the shared port too
            if (httpx.get(f"{urls['management']}/models", timeout=2).status_code == 200
                    and httpx.get(f"{urls['shared']}/ping", timeout=2).status_code == 200):
                break
        except httpx.HTTPError:
            pass
        time.sleep(0.3)
    yield urls
    proc.terminate()
    try:
        proc.wait(30)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(5)


def _ts_error(r: httpx.Response, code: int, type_: str, words: str = "") -> None:
    assert r.status_code == code, r.text
    doc = r.json()
    assert doc == {"code": code, "type": type_, "message": doc["message"]}, doc
    assert words in doc["message"], doc


@pytest.mark.parametrize("where", ["shared", "inference"])
def test_torchserve_inference_bad_requests(torchserve, where):
    base = torchserve[where]
    r = httpx.post(
        f"{base}/predictions/echo",
        content=b"--zz\r\nno parts here",
        headers={"content-type": "multipart/form-data; boundary=zz"},
    )
    _ts_error(r, 400, "BadRequestException", "no named part")
    # NaN is no JSON: refused, not a 500 when the prediction is rendered
    r = httpx.post(f"{base}/v1/models/echo:predict", content=b'{"instances": [NaN]}')
    _ts_error(r, 400, "BadRequestException", "NaN")
    # TorchServe runs a prediction whatever the method (torchserve 0.12 answers these 200)
    assert httpx.get(f"{base}/predictions/echo").status_code == 200
    assert httpx.delete(f"{base}/explanations/echo/1.0").status_code == 200
    _ts_error(httpx.get(f"{base}/predictions/nope"), 404, "ModelNotFoundException")


def test_torchserve_inference_port_unknown_path(torchserve):
    r = httpx.get(f"{torchserve['inference']}/no/such/path")
    _ts_error(r, 404, "ResourceNotFoundException")


@pytest.mark.parametrize(
    "method,path", [("GET", "/no/such/path"), ("GET", "/metrics"), ("POST", "/v1/completions")]
)
def test_torchserve_shared_port_unknown_path(torchserve, method, path):
    """`modelport serve --port` with TorchServe alone: an unknown path was FastAPI's
    {"detail": "Not Found"}; it is TorchServe's 404, as on the inference port."""
    r = httpx.request(method, f"{torchserve['shared']}{path}")
    _ts_error(r, 404, "ResourceNotFoundException")


def test_torchserve_routing_errors_beside_another_frontend():
    """On an app shared with other frontends, TorchServe answers routing errors only under its
    own paths and leaves the others to the handler installed before it."""
    from fastapi import FastAPI
    from fastapi.testclient import TestClient
    from starlette.exceptions import HTTPException
    from starlette.responses import JSONResponse

    from modelport.entrypoints.torchserve.common import (
        INFERENCE_PREFIXES,
        install_http_error_handler,
    )

    app = FastAPI()

    async def other(_, exc):
        return JSONResponse({"error": "other frontend"}, status_code=exc.status_code)

    app.add_exception_handler(HTTPException, other)
    install_http_error_handler(app, INFERENCE_PREFIXES)
    client = TestClient(app)
    _ts_error(client.post("/predictions"), 404, "ResourceNotFoundException")
    _ts_error(client.get("/ping/x"), 404, "ResourceNotFoundException")
    r = client.get("/v2/nope")
    assert (r.status_code, r.json()) == (404, {"error": "other frontend"})


@pytest.mark.parametrize(
    "params,words",
    [
        ({"min_worker": "100000"}, "must be <= 256"),
        ({"min_worker": str(10**30)}, "must be <= 256"),
        ({"min_worker": "1", "max_worker": "1000"}, "must be <= 256"),
    ],
)
def test_torchserve_scale_to_absurd_worker_counts_is_refused(torchserve, params, words):
    r = httpx.put(f"{torchserve['management']}/models/echo", params=params)
    _ts_error(r, 400, "BadRequestException", words)


def test_torchserve_management_json_values_of_wrong_type(torchserve):
    base = torchserve["management"]
    for value in (True, 1.7, [1]):
        r = httpx.put(f"{base}/models/echo", json={"min_worker": value})
        _ts_error(r, 400, "BadRequestException", "is not an integer")
    r = httpx.post(f"{base}/models", json={"url": ["echo.mar"]})
    _ts_error(r, 400, "BadRequestException", "is not a string")
    r = httpx.post(f"{base}/models", params={"url": "echo.mar", "initial_workers": "100000"})
    _ts_error(r, 400, "BadRequestException", "must be <= 256")


def test_torchserve_still_serves_after_bad_input(torchserve):
    r = httpx.post(f"{torchserve['inference']}/predictions/echo", content=b"hello", timeout=60)
    assert r.status_code == 200, r.text
    assert r.json()["echo"] == "hello"
    desc = httpx.get(f"{torchserve['management']}/models/echo").json()
    assert (desc[0]["minWorkers"], desc[0]["maxWorkers"]) == (1, 1)
