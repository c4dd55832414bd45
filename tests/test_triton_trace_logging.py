"""Triton's trace and logging extensions through tritonclient.http and tritonclient.grpc.

One server for the module on a repository built here: an ONNX model (onnx_add), a python
model (add_sub) and an ensemble of the two (pair). It traces to tmp/trace.json
(--trace-config triton,file=...) and logs to tmp/server.log (--log-file). Settings are
reset before each test; the trace files only grow, so tests read the traces they caused.
"""

from __future__ import annotations

import argparse
import json
import logging
import queue
import re
import time
from pathlib import Path

import numpy as np
import pytest
import tritonclient.grpc as grpcclient
import tritonclient.http as httpclient
from tritonclient.utils import InferenceServerException

from modelport.entrypoints.kserve import frontend
from modelport.entrypoints.kserve.embedded import EmbeddedServer
from modelport.repository import testing
from modelport.repository.trace import parse_trace_config

ORDER = [
    "REQUEST_START",
    "QUEUE_START",
    "COMPUTE_START",
    "COMPUTE_INPUT_END",
    "COMPUTE_OUTPUT_START",
    "COMPUTE_END",
    "REQUEST_END",
]
ONNX_CONFIG = """
name: "onnx_add"
backend: "onnxruntime"
max_batch_size: 8
input [
  { name: "A" data_type: TYPE_FP32 dims: [ 4 ] },
  { name: "B" data_type: TYPE_FP32 dims: [ 4 ] }
]
output [
  { name: "SUM" data_type: TYPE_FP32 dims: [ 4 ] },
  { name: "PRODUCT" data_type: TYPE_FP32 dims: [ 4 ] }
]
"""
PY_CONFIG = """
name: "add_sub"
backend: "python"
max_batch_size: 8
input [
  { name: "INPUT0" data_type: TYPE_FP32 dims: [ 4 ] },
  { name: "INPUT1" data_type: TYPE_FP32 dims: [ 4 ] }
]
output [
  { name: "OUTPUT0" data_type: TYPE_FP32 dims: [ 4 ] },
  { name: "OUTPUT1" data_type: TYPE_FP32 dims: [ 4 ] }
]
instance_group [{ kind: KIND_CPU count: 1 }]
"""
PY_MODEL = """
import triton_python_backend_utils as pb_utils


class TritonPythonModel:
    def execute(self, requests):
        out = []
        for r in requests:
            a = pb_utils.get_input_tensor_by_name(r, "INPUT0").as_numpy()
            b = pb_utils.get_input_tensor_by_name(r, "INPUT1").as_numpy()
            out.append(pb_utils.InferenceResponse(
                [pb_utils.Tensor("OUTPUT0", a + b), pb_utils.Tensor("OUTPUT1", a - b)]))
        return out
"""
ENSEMBLE_CONFIG = """
name: "pair"
platform: "ensemble"
max_batch_size: 8
input [
  { name: "X" data_type: TYPE_FP32 dims: [ 4 ] },
  { name: "Y" data_type: TYPE_FP32 dims: [ 4 ] }
]
output [{ name: "Z" data_type: TYPE_FP32 dims: [ 4 ] }]
ensemble_scheduling {
  step [
    {
      model_name: "onnx_add"
      model_version: -1
      input_map { key: "A" value: "X" }
      input_map { key: "B" value: "Y" }
      output_map { key: "SUM" value: "s" }
    },
    {
      model_name: "add_sub"
      model_version: -1
      input_map { key: "INPUT0" value: "s" }
      input_map { key: "INPUT1" value: "Y" }
      output_map { key: "OUTPUT1" value: "Z" }
    }
  ]
}
"""
REPEAT_CONFIG = """
name: "repeat"
backend: "python"
max_batch_size: 0
model_transaction_policy { decoupled: true }
input [{ name: "COUNT" data_type: TYPE_INT32 dims: [ 1 ] }]
output [{ name: "OUT" data_type: TYPE_INT32 dims: [ 1 ] }]
"""
REPEAT_MODEL = """
import numpy as np
import triton_python_backend_utils as pb_utils


class TritonPythonModel:
    def execute(self, requests):
        for r in requests:
            sender = r.get_response_sender()
            n = int(pb_utils.get_input_tensor_by_name(r, "COUNT").as_numpy()[0])
            for i in range(n):
                out = pb_utils.Tensor("OUT", np.array([i], dtype=np.int32))
                sender.send(pb_utils.InferenceResponse([out]))
            sender.send(flags=pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL)
        return None
"""
CLEAR = {"trace_level": None, "trace_rate": None, "trace_count": None, "log_frequency": None}


def build_repo(root: Path) -> Path:
    repo = root / "models"
    (repo / "onnx_add").mkdir(parents=True)
    (repo / "onnx_add" / "config.pbtxt").write_text(ONNX_CONFIG)
    testing.build_onnx_add(repo / "onnx_add" / "1" / "model.onnx")
    (repo / "add_sub" / "1").mkdir(parents=True)
    (repo / "add_sub" / "config.pbtxt").write_text(PY_CONFIG)
    (repo / "add_sub" / "1" / "model.py").write_text(PY_MODEL)
    (repo / "repeat" / "1").mkdir(parents=True)
    (repo / "repeat" / "config.pbtxt").write_text(REPEAT_CONFIG)
    (repo / "repeat" / "1" / "model.py").write_text(REPEAT_MODEL)
    (repo / "pair" / "1").mkdir(parents=True)
    (repo / "pair" / "config.pbtxt").write_text(ENSEMBLE_CONFIG)
    return repo


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    root = tmp_path_factory.mktemp("trace")
    trace_file = root / "trace.json"
    log_file = root / "server.log"
    srv = EmbeddedServer(
        [build_repo(root)],
        metrics_port=-1,
        trace_config=[f"triton,file={trace_file}", "rate=1000"],
        log_settings={"file": str(log_file)},
    ).start()
    yield srv, trace_file, log_file
    srv.stop()


@pytest.fixture
def server(env):
    srv, _, _ = env
    c = httpclient.InferenceServerClient(srv.http_url)
    for model in ("onnx_add", "add_sub", "pair", "repeat"):
        c.update_trace_settings(model_name=model, settings=CLEAR)
    c.update_trace_settings(settings=CLEAR)
    c.update_log_settings(
        {
            "log_info": True,
            "log_warning": True,
            "log_error": True,
            "log_verbose_level": 0,
            "log_format": "default",
        }
    )
    return srv


class Traces:
    """The traces written since it was made (main file entries, indexed files)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.seen = {e["id"] for e in self.main_entries()}
        self.files = set(self.indexed())

    def main_entries(self) -> list[dict]:
        return json.loads(self.path.read_text()) if self.path.exists() else []

    def indexed(self) -> list[Path]:
        files = self.path.parent.glob(self.path.name + ".*")
        return sorted(files, key=lambda p: int(p.suffix[1:]))

    def new_files(self) -> list[Path]:
        return [p for p in self.indexed() if p not in self.files]

    def new(self) -> dict[int, list[dict]]:
        """New main-file entries grouped by trace id (in file order)."""
        out: dict[int, list[dict]] = {}
        for e in self.main_entries():
            if e["id"] not in self.seen:
                out.setdefault(e["id"], []).append(e)
        return out


def header(entries: list[dict]) -> dict:
    return next(e for e in entries if "model_name" in e)


def stamps(entries: list[dict]) -> list[tuple[str, int]]:
    return [(t["name"], t["ns"]) for e in entries for t in e.get("timestamps", [])]


def tensors(entries: list[dict]) -> list[tuple[str, dict]]:
    return [(e["activity"], e["tensor"]) for e in entries if "activity" in e]


def infer_onnx(srv, protocol: str = "http", a=None, b=None):
    a = np.arange(4, dtype=np.float32).reshape(1, 4) if a is None else a
    b = np.full((1, 4), 2.0, dtype=np.float32) if b is None else b
    m = httpclient if protocol == "http" else grpcclient
    c = (
        httpclient.InferenceServerClient(srv.http_url)
        if protocol == "http"
        else grpcclient.InferenceServerClient(srv.grpc_url)
    )
    ins = [m.InferInput("A", [1, 4], "FP32"), m.InferInput("B", [1, 4], "FP32")]
    ins[0].set_data_from_numpy(a)
    ins[1].set_data_from_numpy(b)
    return c.infer("onnx_add", ins, request_id="req-7")


def infer_py(srv):
    c = httpclient.InferenceServerClient(srv.http_url)
    ins = [httpclient.InferInput("INPUT0", [1, 4], "FP32")]
    ins.append(httpclient.InferInput("INPUT1", [1, 4], "FP32"))
    for t in ins:
        t.set_data_from_numpy(np.ones((1, 4), np.float32))
    return c.infer("add_sub", ins)


def grpc_settings(resp) -> dict[str, list[str]]:
    return {k: list(v.value) for k, v in resp.settings.items()}


# -- trace settings --


def test_initial_settings_and_extensions(server):
    h = httpclient.InferenceServerClient(server.http_url)
    g = grpcclient.InferenceServerClient(server.grpc_url)
    file = str(server.args.trace_config[0].split("=", 1)[1])
    expected = {
        "trace_level": ["OFF"],
        "trace_rate": "1000",
        "trace_count": "-1",
        "log_frequency": "0",
        "trace_file": file,
        "trace_mode": "triton",
    }
    assert h.get_trace_settings() == expected
    assert h.get_trace_settings(model_name="onnx_add") == expected
    assert h.update_trace_settings(model_name="onnx_add", settings={}) == expected
    want_grpc = {k: v if isinstance(v, list) else [v] for k, v in expected.items()}
    assert grpc_settings(g.get_trace_settings()) == want_grpc
    assert grpc_settings(g.get_trace_settings(model_name="add_sub")) == want_grpc
    assert {"trace", "logging"} <= set(h.get_server_metadata()["extensions"])
    with pytest.raises(InferenceServerException, match="Request for unknown model : nope"):
        h.get_trace_settings(model_name="nope")
    with pytest.raises(InferenceServerException, match="Request for unknown model : nope"):
        g.get_trace_settings(model_name="nope")


def test_timestamps_written_in_order(env, server):
    _, trace_file, _ = env
    h = httpclient.InferenceServerClient(server.http_url)
    seen = Traces(trace_file)
    got = h.update_trace_settings(settings={"trace_level": ["TIMESTAMPS"], "trace_rate": "1"})
    assert got["trace_level"] == ["TIMESTAMPS"] and got["trace_rate"] == "1"
    infer_onnx(server, "http")
    infer_onnx(server, "grpc")
    traces = seen.new()
    assert len(traces) == 2
    for entries in traces.values():
        head = header(entries)
        assert head["model_name"] == "onnx_add" and head["model_version"] == 1
        assert head["request_id"] == "req-7"
        names = [n for n, _ in stamps(entries)]
        assert names == ORDER
        ns = [t for _, t in stamps(entries)]
        assert ns == sorted(ns) and ns[0] > 0
        assert ns[-1] - ns[0] < 10**10  # nanoseconds of one request, not seconds
        assert not tensors(entries)  # TIMESTAMPS only


def test_tensors_level_records_inputs_and_outputs(env, server):
    _, trace_file, _ = env
    g = grpcclient.InferenceServerClient(server.grpc_url)
    seen = Traces(trace_file)
    g.update_trace_settings(settings={"trace_level": ["TENSORS"], "trace_rate": "1"})
    a = np.array([[1, 2, 3, 4]], np.float32)
    b = np.array([[0.5, 0.5, 0.5, 0.5]], np.float32)
    infer_onnx(server, "grpc", a, b)
    (entries,) = seen.new().values()
    assert not stamps(entries)  # TENSORS only
    acts = dict((f"{act}:{t['name']}", t) for act, t in tensors(entries))
    assert acts["TENSOR_QUEUE_INPUT:A"] == {
        "name": "A",
        "data": "1.0,2.0,3.0,4.0",
        "shape": "1,4",
        "dtype": "FP32",
    }
    assert acts["TENSOR_QUEUE_INPUT:B"]["data"] == "0.5,0.5,0.5,0.5"
    assert acts["TENSOR_BACKEND_OUTPUT:SUM"]["data"] == "1.5,2.5,3.5,4.5"
    assert acts["TENSOR_BACKEND_OUTPUT:PRODUCT"]["data"] == "0.5,1.0,1.5,2.0"


def test_rate_samples_and_count_stops(env, server):
    _, trace_file, _ = env
    h = httpclient.InferenceServerClient(server.http_url)
    seen = Traces(trace_file)
    h.update_trace_settings(
        settings={"trace_level": ["TIMESTAMPS"], "trace_rate": "3", "trace_count": "2"}
    )
    for _ in range(9):
        infer_onnx(server)
    traces = seen.new()
    # the 3rd and the 6th request are sampled, then the count is spent
    assert len(traces) == 2
    assert h.get_trace_settings()["trace_count"] == "0"
    # a new count starts sampling again (from a fresh counter)
    h.update_trace_settings(settings={"trace_count": "1", "trace_rate": "2"})
    infer_onnx(server)
    assert len(seen.new()) == 2
    infer_onnx(server)
    assert len(seen.new()) == 3


def test_model_settings_override_follow_and_clear(env, server):
    _, trace_file, _ = env
    g = grpcclient.InferenceServerClient(server.grpc_url)
    h = httpclient.InferenceServerClient(server.http_url)
    seen = Traces(trace_file)
    # only add_sub traces: its own level, every request
    got = grpc_settings(
        g.update_trace_settings(
            model_name="add_sub", settings={"trace_level": ["TIMESTAMPS"], "trace_rate": "1"}
        )
    )
    assert got["trace_level"] == ["TIMESTAMPS"] and got["trace_rate"] == ["1"]
    assert grpc_settings(g.get_trace_settings())["trace_level"] == ["OFF"]
    infer_onnx(server)
    infer_py(server)
    traces = seen.new()
    assert [header(e)["model_name"] for e in traces.values()] == ["add_sub"]
    assert [n for n, _ in stamps(next(iter(traces.values())))] == ORDER

    # a global change reaches the model fields it did not set, not the ones it set
    h.update_trace_settings(settings={"trace_rate": "7", "log_frequency": "5"})
    model = h.get_trace_settings(model_name="add_sub")
    assert model["trace_rate"] == "1" and model["log_frequency"] == "5"
    # clearing a model field falls back to the global value
    model = h.update_trace_settings(model_name="add_sub", settings={"trace_rate": None})
    assert model["trace_rate"] == "7" and model["trace_level"] == ["TIMESTAMPS"]
    # gRPC: an empty value clears too
    cleared = grpc_settings(
        g.update_trace_settings(model_name="add_sub", settings={"trace_level": None})
    )
    assert cleared["trace_level"] == ["OFF"]
    # clearing a global field goes back to the start-up (--trace-config) value
    glob = h.update_trace_settings(settings={"trace_rate": None, "log_frequency": None})
    assert glob["trace_rate"] == "1000" and glob["log_frequency"] == "0"


def test_log_frequency_writes_indexed_files(env, server):
    _, trace_file, _ = env
    h = httpclient.InferenceServerClient(server.http_url)
    seen = Traces(trace_file)
    h.update_trace_settings(
        settings={
            "trace_level": ["TIMESTAMPS"],
            "trace_rate": "1",
            "log_frequency": "2",
            "trace_count": "5",
        }
    )
    for _ in range(4):
        infer_onnx(server)
    files = seen.new_files()
    assert len(files) == 2
    for f in files:
        ids = {e["id"] for e in json.loads(f.read_text())}
        assert len(ids) == 2  # two traces a file
    infer_onnx(server)  # the 5th and last trace: the count is spent, the rest is written
    files = seen.new_files()
    assert len(files) == 3
    assert len({e["id"] for e in json.loads(files[-1].read_text())}) == 1
    idx = [int(f.suffix[1:]) for f in files]
    assert idx == list(range(idx[0], idx[0] + 3))
    assert not seen.new()  # nothing went to the main file


def test_ensemble_and_its_steps_are_traced(env, server):
    _, trace_file, _ = env
    h = httpclient.InferenceServerClient(server.http_url)
    seen = Traces(trace_file)
    h.update_trace_settings(model_name="pair", settings={"trace_level": ["TIMESTAMPS"]})
    h.update_trace_settings(model_name="pair", settings={"trace_rate": "1"})
    ins = [httpclient.InferInput("X", [1, 4], "FP32"), httpclient.InferInput("Y", [1, 4], "FP32")]
    ins[0].set_data_from_numpy(np.full((1, 4), 3.0, np.float32))
    ins[1].set_data_from_numpy(np.full((1, 4), 1.0, np.float32))
    r = h.infer("pair", ins)
    np.testing.assert_allclose(r.as_numpy("Z"), np.full((1, 4), 3.0))
    traces = seen.new()
    heads = {header(e)["model_name"]: header(e) for e in traces.values()}
    assert set(heads) == {"pair", "onnx_add", "add_sub"}
    parent = heads["pair"]["id"]
    assert "parent_id" not in heads["pair"]
    assert heads["onnx_add"]["parent_id"] == parent and heads["add_sub"]["parent_id"] == parent
    top = dict(stamps(traces[parent]))
    child = dict(stamps(traces[heads["onnx_add"]["id"]]))
    assert top["REQUEST_START"] <= child["REQUEST_START"] <= child["REQUEST_END"]
    assert child["REQUEST_END"] <= top["REQUEST_END"]
    # steps called on their own are not traced (only pair has a setting)
    infer_onnx(server)
    assert len(seen.new()) == 3


def test_decoupled_stream_is_traced(env, server):
    _, trace_file, _ = env
    g = grpcclient.InferenceServerClient(server.grpc_url)
    seen = Traces(trace_file)
    g.update_trace_settings(
        model_name="repeat", settings={"trace_level": ["TIMESTAMPS"], "trace_rate": "1"}
    )
    got: queue.Queue = queue.Queue()
    g.start_stream(callback=lambda result, error: got.put((result, error)))
    try:
        t = grpcclient.InferInput("COUNT", [1], "INT32")
        t.set_data_from_numpy(np.array([3], np.int32))
        g.async_stream_infer("repeat", [t])
        outs = []
        for _ in range(3):
            result, error = got.get(timeout=30)
            assert error is None
            outs.append(int(result.as_numpy("OUT")[0]))
    finally:
        g.stop_stream()
    assert outs == [0, 1, 2]
    deadline = time.monotonic() + 10

    def complete() -> bool:  # written when the stream ends; its entries may land in parts
        new = seen.new()
        return len(new) == 1 and len(stamps(next(iter(new.values())))) >= len(ORDER)

    while not complete() and time.monotonic() < deadline:
        time.sleep(0.05)
    (entries,) = seen.new().values()
    assert header(entries)["model_name"] == "repeat"
    assert [n for n, _ in stamps(entries)] == ORDER
    ns = [t for _, t in stamps(entries)]
    assert ns == sorted(ns)


@pytest.mark.parametrize("protocol", ["http", "grpc"])
def test_bad_trace_settings_are_rejected(server, protocol):
    c = (
        httpclient.InferenceServerClient(server.http_url)
        if protocol == "http"
        else grpcclient.InferenceServerClient(server.grpc_url)
    )
    cases = [
        ({"trace_rate": "abc"}, "Unable to parse 'trace_rate', got: abc"),
        ({"trace_count": "-2"}, "Unable to parse 'trace_count'. Expecting value >= -1, got: -2"),
        ({"log_frequency": "-1"}, "Unable to parse 'log_frequency', value is out of range"),
        ({"trace_rate": ["1", "2"]}, "expect only 1 value for 'trace_rate'"),
        ({"trace_level": ["OFF", "TIMESTAMPS"]}, "Expect only one trace level 'OFF'"),
        ({"trace_level": ["LOUD"]}, "Unable to parse 'trace_level', got: LOUD"),
        ({"trace_file": "x.json"}, "trace file location can not be updated through network"),
    ]
    for settings, message in cases:
        with pytest.raises(InferenceServerException, match=re.escape(message)):
            c.update_trace_settings(settings=settings)
    with pytest.raises(InferenceServerException, match="Request for unknown model : nope"):
        c.update_trace_settings(model_name="nope", settings={"trace_rate": "1"})
    settings = c.get_trace_settings(**({"as_json": True} if protocol == "grpc" else {}))
    rate = settings["trace_rate"] if protocol == "http" else settings["settings"]["trace_rate"]
    assert rate in ("1000", {"value": ["1000"]})  # nothing changed


# -- logging --


def last_line(log_file: Path) -> str:
    lines = log_file.read_text().splitlines()
    return lines[-1] if lines else ""


def test_log_settings_change_what_is_logged(env, server):
    _, _, log_file = env
    h = httpclient.InferenceServerClient(server.http_url)
    g = grpcclient.InferenceServerClient(server.grpc_url)
    expected = {
        "log_file": str(log_file),
        "log_info": True,
        "log_warning": True,
        "log_error": True,
        "log_verbose_level": 0,
        "log_format": "default",
    }
    assert h.get_log_settings() == expected
    assert g.get_log_settings(as_json=True)["settings"]["log_info"] == {"bool_param": True}
    log = logging.getLogger("modelport.tests.trace_logging")

    log.info("info-one")
    log.debug("debug-one")
    text = log_file.read_text()
    assert "info-one" in text and "debug-one" not in text
    assert re.match(
        r"^I\d{4} \d\d:\d\d:\d\d\.\d{6} \d+ test_triton_trace_logging\.py:\d+\] ",
        last_line(log_file),
    )

    got = h.update_log_settings({"log_info": False, "log_verbose_level": 1})
    assert got["log_info"] is False and got["log_verbose_level"] == 1
    log.info("info-two")
    log.debug("debug-two")
    log.warning("warn-two")
    text = log_file.read_text()
    assert "info-two" not in text and "debug-two" in text and "warn-two" in text

    resp = g.update_log_settings({"log_warning": False, "log_format": "ISO8601"})
    assert resp.settings["log_warning"].bool_param is False
    assert resp.settings["log_format"].string_param == "ISO8601"
    log.warning("warn-three")
    log.error("error-three")
    text = log_file.read_text()
    assert "warn-three" not in text and "error-three" in text
    assert re.match(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ E \d+ ", last_line(log_file))

    g.update_log_settings({"log_error": False})
    log.error("error-four")
    assert "error-four" not in log_file.read_text()


def test_bad_log_settings_are_rejected(server):
    h = httpclient.InferenceServerClient(server.http_url)
    g = grpcclient.InferenceServerClient(server.grpc_url)
    for c in (h, g):
        for settings, message in [
            ({"log_file": "other.log"}, "log file location can not be updated through network"),
            ({"log_format": "xml"}, "invalid argument for log_format, got: xml"),
            ({"log_info": None}, "expect boolean for 'log_info'"),
        ]:
            with pytest.raises(InferenceServerException, match=re.escape(message)):
                c.update_log_settings(settings)
    for settings, message in [
        ({"log_verbose_level": "2"}, "expect int32 for 'log_verbose_level'"),
        ({"log_verbose_level": -1}, "expect int32 for 'log_verbose_level'"),
        ({"log_error": "yes"}, "expect boolean for 'log_error'"),
    ]:
        with pytest.raises(InferenceServerException, match=re.escape(message)):
            h.update_log_settings(settings)
    # a bad value changes nothing, also not the valid ones next to it
    with pytest.raises(InferenceServerException):
        h.update_log_settings({"log_info": False, "log_format": "xml"})
    assert h.get_log_settings()["log_info"] is True


# -- command line --


def test_cli_flags(tmp_path):
    parser = argparse.ArgumentParser()
    frontend.add_serve_args(parser)
    args = parser.parse_args(
        [
            "--model-repository",
            str(tmp_path),
            "--trace-config",
            f"triton,file={tmp_path / 't.json'}",
            "--trace-config",
            "level=TIMESTAMPS",
            "--trace-config",
            "level=TENSORS",
            "--trace-config",
            "rate=5",
            "--trace-config",
            "count=9",
            "--trace-config",
            "triton,log-frequency=3",
            "--log-verbose",
            "2",
            "--log-info",
            "false",
            "--log-format",
            "ISO8601",
        ]
    )
    tracer, logs = frontend.trace_log_settings(args)
    try:
        assert tracer.settings() == {
            "trace_level": ["TIMESTAMPS", "TENSORS"],
            "trace_rate": "5",
            "trace_count": "9",
            "log_frequency": "3",
            "trace_file": str(tmp_path / "t.json"),
            "trace_mode": "triton",
        }
        assert logs.engaged
        assert logs.settings() == {
            "log_file": "",
            "log_info": False,
            "log_warning": True,
            "log_error": True,
            "log_verbose_level": 2,
            "log_format": "ISO8601",
        }
        assert logging.getLogger("modelport").isEnabledFor(logging.DEBUG)
    finally:
        logs.release()
    # deprecated spellings, and no --log-* flag: logging left as it is
    args = parser.parse_args(["--trace-level", "TIMESTAMPS", "--trace-rate", "4"])
    tracer, logs = frontend.trace_log_settings(args)
    assert tracer.settings()["trace_rate"] == "4" and not logs.engaged
    assert parse_trace_config(["log_frequency=7"]).log_frequency == 7
    for bad in (["level=LOUD"], ["rate=x"], ["count=-3"], ["opentelemetry,url=x"], ["rate"]):
        with pytest.raises(ValueError):
            parse_trace_config(bad)
    with pytest.raises(SystemExit, match="--trace-config"):
        frontend.trace_log_settings(parser.parse_args(["--trace-config", "rate=-1"]))
