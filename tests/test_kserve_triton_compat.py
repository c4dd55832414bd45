"""Behaviour a Triton user moving a repository and tritonclient code over relies on.

Each test pins one thing Triton does that modelport once did differently: `async def
execute` with `async_exec` BLS, a step's error named by its ensemble, Triton's words and
codes for a decoupled model on unary endpoints and for load / unload outside explicit mode,
and the `triton_python_backend_utils` helpers Triton's own examples call.
"""

from __future__ import annotations

import shutil
import textwrap
from pathlib import Path

import numpy as np
import pytest
import tritonclient.grpc as grpcclient
import tritonclient.http as httpclient
from tritonclient.utils import InferenceServerException

import triton_python_backend_utils as pb_utils
from modelport.entrypoints.kserve.embedded import EmbeddedServer

MAIN = Path(__file__).parent / "fixtures" / "repositories" / "main"
PROTOCOLS = ["http", "grpc"]

STEP_CONFIG = """
name: "{name}"
backend: "python"
max_batch_size: 4
input [{{ name: "X" data_type: TYPE_FP32 dims: [ 2 ] }}]
output [{{ name: "Y" data_type: TYPE_FP32 dims: [ 2 ] }}]
"""

# Y = X * 10; a negative X[0] answers with an INVALID_ARG error response
SCALE_MODEL = """
import triton_python_backend_utils as pb_utils


class TritonPythonModel:
    def execute(self, requests):
        responses = []
        for request in requests:
            x = pb_utils.get_input_tensor_by_name(request, "X").as_numpy()
            if x.reshape(-1)[0] < 0:
                error = pb_utils.TritonError("X must not be negative", pb_utils.TritonError.INVALID_ARG)
                responses.append(pb_utils.InferenceResponse(error=error))
            else:
                responses.append(pb_utils.InferenceResponse([pb_utils.Tensor("Y", x * 10)]))
        return responses
"""

# Triton's async BLS example shape: `async def execute`, awaiting requests to other models
ASYNC_BLS_MODEL = """
import asyncio

import numpy as np
import triton_python_backend_utils as pb_utils


class TritonPythonModel:
    async def execute(self, requests):
        responses = []
        for request in requests:
            x = pb_utils.get_input_tensor_by_name(request, "X").as_numpy()
            ok = pb_utils.InferenceRequest(
                model_name="scale", inputs=[pb_utils.Tensor("X", x)], requested_output_names=["Y"]
            )
            bad = pb_utils.InferenceRequest(
                model_name="scale", inputs=[pb_utils.Tensor("X", -x)], requested_output_names=["Y"]
            )
            first, second, failed = await asyncio.gather(
                ok.async_exec(), ok.async_exec(), bad.async_exec()
            )
            if not failed.has_error():
                raise pb_utils.TritonModelException("the negative request should have failed")
            y = pb_utils.get_output_tensor_by_name(first, "Y").as_numpy()
            y = y + pb_utils.get_output_tensor_by_name(second, "Y").as_numpy()
            responses.append(pb_utils.InferenceResponse([pb_utils.Tensor("Y", y)]))
        return responses
"""

# execute() returning something that is not a list of responses
BAD_RETURN_MODEL = """
class TritonPythonModel:
    def execute(self, requests):
        return 42
"""

ENSEMBLE_CONFIG = """
name: "scale_twice"
platform: "ensemble"
max_batch_size: 4
input [{ name: "IN" data_type: TYPE_FP32 dims: [ 2 ] }]
output [{ name: "OUT" data_type: TYPE_FP32 dims: [ 2 ] }]
ensemble_scheduling {
  step [
    { model_name: "scale" model_version: -1
      input_map { key: "X" value: "IN" } output_map { key: "Y" value: "mid" } },
    { model_name: "scale" model_version: -1
      input_map { key: "X" value: "mid" } output_map { key: "Y" value: "OUT" } }
  ]
}
"""


def _python_model(repo: Path, name: str, code: str) -> None:
    (repo / name / "1").mkdir(parents=True)
    (repo / name / "config.pbtxt").write_text(STEP_CONFIG.format(name=name))
    (repo / name / "1" / "model.py").write_text(textwrap.dedent(code))


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    repo = tmp_path_factory.mktemp("compat") / "models"
    repo.mkdir()
    _python_model(repo, "scale", SCALE_MODEL)
    _python_model(repo, "async_bls", ASYNC_BLS_MODEL)
    _python_model(repo, "bad_return", BAD_RETURN_MODEL)
    (repo / "scale_twice").mkdir()
    (repo / "scale_twice" / "config.pbtxt").write_text(ENSEMBLE_CONFIG)
    shutil.copytree(MAIN / "repeat_decoupled", repo / "repeat_decoupled")
    srv = EmbeddedServer([repo]).start()
    yield srv
    srv.stop()


def client(server, protocol):
    if protocol == "http":
        return httpclient.InferenceServerClient(server.http_url)
    return grpcclient.InferenceServerClient(server.grpc_url)


def x_input(protocol, x):
    m = httpclient if protocol == "http" else grpcclient
    t = m.InferInput("X" if x.ndim == 2 else "IN", list(x.shape), "FP32")
    t.set_data_from_numpy(x)
    return t


@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_async_execute_with_async_exec_bls(server, protocol):
    x = np.array([[1.0, 2.0]], dtype=np.float32)
    out = client(server, protocol).infer("async_bls", [x_input(protocol, x)]).as_numpy("Y")
    np.testing.assert_allclose(out, x * 20)


@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_execute_returning_a_non_list_fails_the_request_not_the_process(server, protocol):
    c = client(server, protocol)
    x = np.ones((1, 2), dtype=np.float32)
    for _ in range(2):  # the instance process lives on: the same error, not "not healthy"
        with pytest.raises(InferenceServerException, match="must return a list") as info:
            c.infer("bad_return", [x_input(protocol, x)])
        assert "not healthy" not in info.value.message()


@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_ensemble_step_error_names_the_ensemble_and_keeps_the_code(server, protocol):
    c = client(server, protocol)
    x = np.array([[1.0, 2.0]], dtype=np.float32)
    t = (httpclient if protocol == "http" else grpcclient).InferInput("IN", [1, 2], "FP32")
    t.set_data_from_numpy(x)
    np.testing.assert_allclose(c.infer("scale_twice", [t]).as_numpy("OUT"), x * 100)
    t.set_data_from_numpy(-x)
    with pytest.raises(InferenceServerException) as info:
        c.infer("scale_twice", [t])
    assert info.value.message() == "in ensemble 'scale_twice', X must not be negative"
    assert info.value.status() == ("400" if protocol == "http" else "StatusCode.INVALID_ARGUMENT")


@pytest.mark.parametrize(
    "protocol,status,words",
    [
        ("http", "501", "HTTP end point doesn't support models with decoupled transaction policy"),
        (
            "grpc",
            "StatusCode.UNIMPLEMENTED",
            "ModelInfer RPC doesn't support models with decoupled transaction policy",
        ),
    ],
)
def test_decoupled_model_on_unary_infer_has_tritons_error(server, protocol, status, words):
    m = httpclient if protocol == "http" else grpcclient
    t = m.InferInput("COUNT", [1], "INT32")
    t.set_data_from_numpy(np.array([2], dtype=np.int32))
    with pytest.raises(InferenceServerException) as info:
        client(server, protocol).infer("repeat_decoupled", [t])
    assert info.value.message() == words
    assert info.value.status() == status


@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_load_unload_outside_explicit_mode_is_unavailable(server, protocol):
    c = client(server, protocol)
    for call in (lambda: c.load_model("scale"), lambda: c.unload_model("scale")):
        with pytest.raises(InferenceServerException) as info:
            call()
        assert info.value.message().startswith(
            "explicit model load / unload is not allowed if polling is enabled"
        )
        assert info.value.status() == ("503" if protocol == "http" else "StatusCode.UNAVAILABLE")
    assert c.is_model_ready("scale")


def test_pb_utils_helpers_of_tritons_module():
    # numbers are TRITONSERVER_DataType values, as Triton's pb_utils returns them
    assert pb_utils.numpy_to_triton_type(np.float32) == 11
    assert pb_utils.numpy_to_triton_type(np.object_) == 13
    assert pb_utils.numpy_to_triton_type(np.bool_) == 1
    assert pb_utils.triton_to_numpy_type(10) is np.float16
    assert pb_utils.triton_to_numpy_type(13) is np.object_
    assert pb_utils.Tensor("T", np.zeros(2, np.int64)).triton_dtype() == 9
    strings = np.array([b"ab", "c", b""], dtype=np.object_)
    encoded = pb_utils.serialize_byte_tensor(strings)
    assert encoded == b"\x02\x00\x00\x00ab\x01\x00\x00\x00c\x00\x00\x00\x00"
    assert pb_utils.deserialize_bytes_tensor(encoded).tolist() == [b"ab", b"c", b""]
    assert pb_utils.using_decoupled_model_transaction_policy(
        {"model_transaction_policy": {"decoupled": True}}
    )
    assert not pb_utils.using_decoupled_model_transaction_policy({"name": "m"})


def test_pb_utils_logger_levels(capsys):
    logger = pb_utils.Logger
    logger.log("specific", logger.WARNING)
    logger.log("enum", logger.LogLevel.ERROR)
    logger.log("default")
    logger.log_verbose("verbose")
    err = capsys.readouterr().err
    for level, text in (("WARNING", "specific"), ("ERROR", "enum"), ("INFO", "default")):
        assert f"[{level}] {text}" in err
    assert "verbose" in err


@pytest.fixture(scope="module")
def explicit_server(tmp_path_factory):
    repo = tmp_path_factory.mktemp("compat_explicit") / "models"
    repo.mkdir()
    _python_model(repo, "scale", SCALE_MODEL)
    shutil.copytree(repo / "scale" / "1", repo / "scale" / "2")
    config = repo / "scale" / "config.pbtxt"
    config.write_text(config.read_text() + "version_policy: { all: {} }\n")
    srv = EmbeddedServer([repo], control_mode="explicit", load_models=["scale"]).start()
    yield srv
    srv.stop()


@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_repository_index_keeps_unloaded_versions(explicit_server, protocol):
    c = client(explicit_server, protocol)

    def index():
        rows = c.get_model_repository_index()
        if protocol == "grpc":
            rows = [
                {
                    k: v
                    for k, v in (
                        ("name", m.name),
                        ("version", m.version),
                        ("state", m.state),
                        ("reason", m.reason),
                    )
                    if v
                }
                for m in rows.models
            ]
        return rows

    c.load_model("scale")
    assert index() == [
        {"name": "scale", "version": "1", "state": "READY"},
        {"name": "scale", "version": "2", "state": "READY"},
    ]
    # a reload under another version policy unloads version 2, as Triton lists it
    c.load_model(
        "scale",
        config=(
            '{"backend": "python", "max_batch_size": 4,'
            ' "input": [{"name": "X", "data_type": "TYPE_FP32", "dims": [2]}],'
            ' "output": [{"name": "Y", "data_type": "TYPE_FP32", "dims": [2]}],'
            ' "version_policy": {"specific": {"versions": [1]}}}'
        ),
    )
    assert index() == [
        {"name": "scale", "version": "1", "state": "READY"},
        {"name": "scale", "version": "2", "state": "UNAVAILABLE", "reason": "unloaded"},
    ]
    c.unload_model("scale")
    assert index() == [
        {"name": "scale", "version": "1", "state": "UNAVAILABLE", "reason": "unloaded"},
        {"name": "scale", "version": "2", "state": "UNAVAILABLE", "reason": "unloaded"},
    ]
    c.load_model("scale")
    assert [r["state"] for r in index()] == ["READY", "READY"]


def test_auto_complete_may_raise_max_batch_size_but_not_lower_it():
    config = pb_utils.ModelConfig({"name": "m", "max_batch_size": 4})
    config.set_max_batch_size(8)  # Triton lets auto_complete_config raise it
    assert config.as_dict()["max_batch_size"] == 8
    with pytest.raises(ValueError, match="configuration specified max_batch_size 8"):
        config.set_max_batch_size(2)
