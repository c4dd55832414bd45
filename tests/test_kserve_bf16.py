"""TYPE_BF16 end to end: tritonclient over HTTP (binary) and gRPC, TorchScript / python /
onnxruntime backends, dynamic batching and an ensemble passing BF16 between steps.

numpy has no bfloat16; tritonclient sends and returns BF16 as `ml_dtypes.bfloat16` arrays,
and so does modelport inside. Expected values are what torch computes in bfloat16, compared
bit for bit.
"""

from __future__ import annotations

import json
import textwrap
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import ml_dtypes
import numpy as np
import pytest
import torch
import tritonclient.grpc as grpcclient
import tritonclient.http as httpclient
from tritonclient.utils import InferenceServerException

import triton_python_backend_utils as pb_utils
from modelport.entrypoints.kserve.embedded import EmbeddedServer

BF16 = ml_dtypes.bfloat16
PROTOCOLS = ["http", "grpc"]

W = [1.5, -2.0, 0.3, 7.0]
B = [0.1, 0.25, -3.0, 1.0]

TORCH_CONFIG = """
name: "bf16_torch"
backend: "pytorch"
max_batch_size: 8
input [{ name: "INPUT__0" data_type: TYPE_BF16 dims: [ 4 ] }]
output [
  { name: "OUTPUT__0" data_type: TYPE_BF16 dims: [ 4 ] },
  { name: "OUTPUT__1" data_type: TYPE_INT32 dims: [ 1 ] }
]
dynamic_batching { max_queue_delay_microseconds: 200000 }
model_warmup [{
  name: "bf16_random" batch_size: 2
  inputs { key: "INPUT__0" value: { data_type: TYPE_BF16 dims: [ 4 ] random_data: true } }
}]
"""

PY_CONFIG = """
name: "bf16_py"
backend: "python"
max_batch_size: 8
input [{ name: "X" data_type: TYPE_BF16 dims: [ 4 ] }]
output [
  { name: "Y" data_type: TYPE_BF16 dims: [ 4 ] },
  { name: "AS_NUMPY" data_type: TYPE_STRING dims: [ 1 ] }
]
"""

# reads BF16 through dlpack, answers BF16 through dlpack, and reports what as_numpy() said
PY_MODEL = """
import numpy as np
import torch
import triton_python_backend_utils as pb_utils


class TritonPythonModel:
    def execute(self, requests):
        responses = []
        for request in requests:
            t = pb_utils.get_input_tensor_by_name(request, "X")
            x = torch.utils.dlpack.from_dlpack(t.to_dlpack())
            if x.dtype != torch.bfloat16 or t.triton_dtype() != 14:
                raise pb_utils.TritonModelException(f"got {x.dtype} / {t.triton_dtype()}")
            try:
                t.as_numpy()
                said = "no error"
            except pb_utils.TritonModelException as e:
                said = str(e)
            y = x * 2 + 1
            err = np.array([[said.encode()]] * x.shape[0], dtype=np.object_)
            responses.append(pb_utils.InferenceResponse([
                pb_utils.Tensor.from_dlpack("Y", torch.utils.dlpack.to_dlpack(y)),
                pb_utils.Tensor("AS_NUMPY", err),
            ]))
        return responses
"""

BLS_CONFIG = """
name: "bf16_bls"
backend: "python"
max_batch_size: 8
input [{ name: "X" data_type: TYPE_BF16 dims: [ 4 ] }]
output [{ name: "Y" data_type: TYPE_BF16 dims: [ 4 ] }]
"""

# BLS: hands its BF16 input to bf16_torch and its BF16 answer back, never touching numpy
BLS_MODEL = """
import triton_python_backend_utils as pb_utils


class TritonPythonModel:
    def execute(self, requests):
        responses = []
        for request in requests:
            x = pb_utils.get_input_tensor_by_name(request, "X")
            r = pb_utils.InferenceRequest(
                model_name="bf16_torch",
                inputs=[pb_utils.Tensor.from_dlpack("INPUT__0", x.to_dlpack())],
                requested_output_names=["OUTPUT__0"],
            ).exec()
            if r.has_error():
                raise pb_utils.TritonModelException(r.error().message())
            y = pb_utils.get_output_tensor_by_name(r, "OUTPUT__0")
            responses.append(pb_utils.InferenceResponse([pb_utils.Tensor.from_dlpack("Y", y)]))
        return responses
"""

ENSEMBLE_CONFIG = """
name: "bf16_chain"
platform: "ensemble"
max_batch_size: 8
input [{ name: "IN" data_type: TYPE_BF16 dims: [ 4 ] }]
output [{ name: "OUT" data_type: TYPE_BF16 dims: [ 4 ] }]
ensemble_scheduling {
  step [
    { model_name: "bf16_torch" model_version: -1
      input_map { key: "INPUT__0" value: "IN" } output_map { key: "OUTPUT__0" value: "mid" } },
    { model_name: "bf16_py" model_version: -1
      input_map { key: "X" value: "mid" } output_map { key: "Y" value: "OUT" } }
  ]
}
"""

ONNX_CONFIG = """
name: "bf16_onnx"
backend: "onnxruntime"
max_batch_size: 8
input [{ name: "X" data_type: TYPE_BF16 dims: [ 4 ] }]
output [{ name: "Y" data_type: TYPE_BF16 dims: [ 4 ] }]
"""


def _build_torch(path: Path) -> None:
    class Affine(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.w = torch.nn.Parameter(torch.tensor(W, dtype=torch.bfloat16), requires_grad=False)
            self.b = torch.nn.Parameter(torch.tensor(B, dtype=torch.bfloat16), requires_grad=False)

        def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            if x.dtype != torch.bfloat16:
                raise RuntimeError("expected a bfloat16 input")
            rows = torch.full([x.shape[0], 1], x.shape[0], dtype=torch.int32)
            return x * self.w + self.b, rows

    path.parent.mkdir(parents=True)
    torch.jit.script(Affine()).save(str(path))


def _build_onnx(path: Path) -> None:
    """Y = bf16(float(X) * 2): the CPU provider has bfloat16 Cast, not bfloat16 Mul."""
    onnx = pytest.importorskip("onnx")
    from onnx import TensorProto, helper

    graph = helper.make_graph(
        [
            helper.make_node("Cast", ["X"], ["xf"], to=TensorProto.FLOAT),
            helper.make_node("Add", ["xf", "xf"], ["yf"]),
            helper.make_node("Cast", ["yf"], ["Y"], to=TensorProto.BFLOAT16),
        ],
        "bf16_double",
        [helper.make_tensor_value_info("X", TensorProto.BFLOAT16, ["batch", 4])],
        [helper.make_tensor_value_info("Y", TensorProto.BFLOAT16, ["batch", 4])],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    path.parent.mkdir(parents=True)
    onnx.save(model, str(path))


def _model(repo: Path, name: str, config: str) -> Path:
    (repo / name).mkdir(parents=True, exist_ok=True)
    (repo / name / "config.pbtxt").write_text(config)
    return repo / name / "1"


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    repo = tmp_path_factory.mktemp("bf16") / "models"
    _build_torch(_model(repo, "bf16_torch", TORCH_CONFIG) / "model.pt")
    py_dir = _model(repo, "bf16_py", PY_CONFIG)
    py_dir.mkdir()
    (py_dir / "model.py").write_text(textwrap.dedent(PY_MODEL))
    bls_dir = _model(repo, "bf16_bls", BLS_CONFIG)
    bls_dir.mkdir()
    (bls_dir / "model.py").write_text(textwrap.dedent(BLS_MODEL))
    _model(repo, "bf16_chain", ENSEMBLE_CONFIG).mkdir()
    _build_onnx(_model(repo, "bf16_onnx", ONNX_CONFIG) / "model.onnx")
    srv = EmbeddedServer([repo]).start()
    yield srv
    srv.stop()


def client(server, protocol):
    if protocol == "http":
        return httpclient.InferenceServerClient(server.http_url)
    return grpcclient.InferenceServerClient(server.grpc_url)


def bf16_input(protocol, name, x):
    m = httpclient if protocol == "http" else grpcclient
    t = m.InferInput(name, list(x.shape), "BF16")
    t.set_data_from_numpy(x)  # binary over HTTP (the default), raw_input_contents over gRPC
    return t


def sample(rows, seed=0):
    return np.random.default_rng(seed).standard_normal((rows, 4)).astype(BF16)


def as_torch(x):
    return torch.from_numpy(np.ascontiguousarray(x).view(np.int16)).view(torch.bfloat16)


def ref_affine(x):
    w, b = torch.tensor(W, dtype=torch.bfloat16), torch.tensor(B, dtype=torch.bfloat16)
    return as_torch(x) * w + b


def ref_python(x):
    return as_torch(x) * 2 + 1


def assert_bits(out, expected):
    assert out.dtype == BF16
    assert out.shape == tuple(expected.shape)
    np.testing.assert_array_equal(
        out.view(np.uint16), expected.view(torch.int16).numpy().view(np.uint16)
    )


@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_torchscript_bf16_in_and_out(server, protocol):
    x = sample(3)
    r = client(server, protocol).infer("bf16_torch", [bf16_input(protocol, "INPUT__0", x)])
    assert_bits(r.as_numpy("OUTPUT__0"), ref_affine(x))
    meta = client(server, "http").get_model_metadata("bf16_torch")
    assert meta["inputs"][0]["datatype"] == "BF16"
    assert meta["outputs"][0]["datatype"] == "BF16"


@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_classification_of_a_bf16_output(server, protocol):
    m = httpclient if protocol == "http" else grpcclient
    x = np.array([[1.0, 1.0, 1.0, 1.0]], dtype=BF16)  # -> [1.6, -1.75, -2.7, 8.0] in bf16
    out = m.InferRequestedOutput("OUTPUT__0", class_count=2)
    r = client(server, protocol).infer(
        "bf16_torch", [bf16_input(protocol, "INPUT__0", x)], outputs=[out]
    )
    top = [v.decode().split(":")[1] for v in r.as_numpy("OUTPUT__0")[0]]
    assert top == ["3", "0"]


@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_python_backend_bf16_through_dlpack(server, protocol):
    x = sample(2, seed=1)
    r = client(server, protocol).infer("bf16_py", [bf16_input(protocol, "X", x)])
    assert_bits(r.as_numpy("Y"), ref_python(x))
    said = r.as_numpy("AS_NUMPY")[0, 0].decode()
    assert "BF16" in said and "to_dlpack()" in said and "from_dlpack()" in said


@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_ensemble_passes_bf16_between_steps(server, protocol):
    x = sample(2, seed=2)
    r = client(server, protocol).infer("bf16_chain", [bf16_input(protocol, "IN", x)])
    mid = ref_affine(x)
    assert_bits(r.as_numpy("OUT"), mid * 2 + 1)


@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_python_backend_bls_passes_bf16(server, protocol):
    x = sample(2, seed=4)
    r = client(server, protocol).infer("bf16_bls", [bf16_input(protocol, "X", x)])
    assert_bits(r.as_numpy("Y"), ref_affine(x))


@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_onnxruntime_bf16_through_ort_values(server, protocol):
    x = sample(3, seed=3)
    r = client(server, protocol).infer("bf16_onnx", [bf16_input(protocol, "X", x)])
    assert_bits(r.as_numpy("Y"), (as_torch(x).float() * 2).to(torch.bfloat16))


def test_dynamic_batching_concatenates_and_splits_bf16(server):
    """Requests of 1 and 2 rows, batched together by the dynamic batcher (200 ms window)."""
    xs = [sample(1 + i % 2, seed=10 + i) for i in range(12)]

    def one(i):
        protocol = PROTOCOLS[i % 2]
        r = client(server, protocol).infer("bf16_torch", [bf16_input(protocol, "INPUT__0", xs[i])])
        return r.as_numpy("OUTPUT__0"), int(r.as_numpy("OUTPUT__1")[0, 0])

    with ThreadPoolExecutor(12) as pool:
        results = list(pool.map(one, range(12)))
    for x, (out, _) in zip(xs, results):
        assert_bits(out, ref_affine(x))
    assert max(rows for _, rows in results) > 2  # several requests ran as one batch
    assert all(rows <= 8 for _, rows in results)


def _post(server, model, doc, header_len=None, body=None):
    data = body if body is not None else json.dumps(doc).encode()
    headers = {"Content-Type": "application/json"}
    if header_len is not None:
        headers["Inference-Header-Content-Length"] = str(header_len)
    req = urllib.request.Request(
        f"http://{server.http_url}/v2/models/{model}/infer", data=data, headers=headers
    )
    with pytest.raises(urllib.error.HTTPError) as info:
        urllib.request.urlopen(req)
    return info.value.code, json.loads(info.value.read())["error"]


def test_bf16_json_input_data_is_refused_in_tritons_words(server):
    doc = {
        "inputs": [{"name": "INPUT__0", "datatype": "BF16", "shape": [1, 4], "data": [1, 2, 3, 4]}]
    }
    code, error = _post(server, "bf16_torch", doc)
    assert code == 400
    assert error == (
        "receiving BF16 data via JSON is not supported. Please use the binary data format "
        "for input INPUT__0"
    )
    # tritonclient refuses it before sending anything
    with pytest.raises(InferenceServerException, match="binary"):
        httpclient.InferInput("INPUT__0", [1, 4], "BF16").set_data_from_numpy(
            sample(1), binary_data=False
        )


def test_bf16_output_asked_for_as_json_is_refused_in_tritons_words(server):
    raw = sample(1).tobytes()
    doc = {
        "inputs": [
            {
                "name": "INPUT__0",
                "datatype": "BF16",
                "shape": [1, 4],
                "parameters": {"binary_data_size": len(raw)},
            }
        ],
        "outputs": [{"name": "OUTPUT__0", "parameters": {"binary_data": False}}],
    }
    head = json.dumps(doc).encode()
    code, error = _post(server, "bf16_torch", None, header_len=len(head), body=head + raw)
    assert code == 400
    assert error == (
        "sending BF16 data via JSON is not supported. Please use the binary data format for output"
    )
    # the same request asking for binary output succeeds
    c = httpclient.InferenceServerClient(server.http_url)
    out = httpclient.InferRequestedOutput("OUTPUT__0", binary_data=True)
    r = c.infer("bf16_torch", [bf16_input("http", "INPUT__0", sample(1))], outputs=[out])
    assert_bits(r.as_numpy("OUTPUT__0"), ref_affine(sample(1)))


def test_bf16_wrong_byte_size_is_an_error(server):
    t = httpclient.InferInput("INPUT__0", [1, 4], "BF16")
    t.set_data_from_numpy(sample(1))
    t._raw_data = t._raw_data[:-2]
    t._parameters["binary_data_size"] = len(t._raw_data)
    with pytest.raises(InferenceServerException, match="unexpected total byte size 6"):
        httpclient.InferenceServerClient(server.http_url).infer("bf16_torch", [t])


def test_pb_utils_bf16_tensor():
    x = torch.tensor([[1.5, -2.25, 3.0]], dtype=torch.bfloat16)
    t = pb_utils.Tensor.from_dlpack("X", torch.utils.dlpack.to_dlpack(x))
    assert t.triton_dtype() == 14  # TRITONSERVER_TYPE_BF16
    assert t.shape() == [1, 3]
    with pytest.raises(pb_utils.TritonModelException, match="BF16"):
        t.as_numpy()
    back = torch.utils.dlpack.from_dlpack(t.to_dlpack())
    assert back.dtype == torch.bfloat16 and torch.equal(back, x)
    assert torch.equal(torch.from_dlpack(t), x)  # a Tensor is a DLPack producer too
    assert torch.equal(
        torch.utils.dlpack.from_dlpack(pb_utils.Tensor.from_dlpack("Y", x).to_dlpack()), x
    )
    assert pb_utils.triton_string_to_numpy("TYPE_BF16") is BF16
    assert pb_utils.triton_to_numpy_type(14) is BF16
    assert pb_utils.numpy_to_triton_type(BF16) == 14
