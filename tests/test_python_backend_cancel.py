"""Python backend: request cancellation reaches model.py, and decoupled BLS calls stream.

Triton's python backend lets a model see that its client went away (`request.is_cancelled()`
inside execute(), `response_sender.is_cancelled()` for a decoupled model) and lets a BLS
call on a decoupled model (`exec(decoupled=True)`) read each response as it is sent. The
models below report what they saw through files in a folder the test reads.
"""

from __future__ import annotations

import queue
import time
from pathlib import Path

import httpx
import numpy as np
import pytest
import tritonclient.grpc as grpcclient
from tritonclient.utils import InferenceServerException

from modelport.entrypoints.kserve.embedded import EmbeddedServer

PARAMS = 'parameters {{ key: "dir" value: {{ string_value: "{dir}" }} }}'
READ_DIR = """
import json
from pathlib import Path


def report_dir(args):
    params = json.loads(args["model_config"])["parameters"]
    return Path(params["dir"]["string_value"])
"""

# decoupled: OUT = 0, 1, 2 ... every 20 ms until the client goes away (10 s at most)
TICKER_CONFIG = """
name: "ticker"
backend: "python"
max_batch_size: 0
model_transaction_policy { decoupled: true }
input [{ name: "START" data_type: TYPE_INT32 dims: [ 1 ] }]
output [{ name: "OUT" data_type: TYPE_INT32 dims: [ 1 ] }]
"""
TICKER = (
    READ_DIR
    + """
import threading
import time

import numpy as np
import triton_python_backend_utils as pb_utils


class TritonPythonModel:
    def initialize(self, args):
        self.dir = report_dir(args)

    def execute(self, requests):
        for r in requests:
            threading.Thread(target=self.tick, args=(r,)).start()
        return None

    def tick(self, request):
        sender = request.get_response_sender()
        i = 0
        while not sender.is_cancelled() and i < 500:
            sender.send(pb_utils.InferenceResponse(
                [pb_utils.Tensor("OUT", np.array([i], dtype=np.int32))]))
            i += 1
            time.sleep(0.02)
        seen = "cancelled" if sender.is_cancelled() else "not cancelled"
        (self.dir / f"{request.request_id()}.txt").write_text(f"{seen} after {i}")
        sender.send(flags=pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL)
"""
)

# not decoupled: WAIT=1 waits (10 s at most) for its client to go away; CANCELLED says
# whether it saw that
WAITER_CONFIG = """
name: "waiter"
backend: "python"
max_batch_size: 0
input [{ name: "WAIT" data_type: TYPE_INT32 dims: [ 1 ] }]
output [{ name: "CANCELLED" data_type: TYPE_INT32 dims: [ 1 ] }]
"""
WAITER = (
    READ_DIR
    + """
import time

import numpy as np
import triton_python_backend_utils as pb_utils


class TritonPythonModel:
    def initialize(self, args):
        self.dir = report_dir(args)

    def execute(self, requests):
        responses = []
        for r in requests:
            wait = int(pb_utils.get_input_tensor_by_name(r, "WAIT").as_numpy()[0])
            deadline = time.monotonic() + 10
            while wait and not r.is_cancelled() and time.monotonic() < deadline:
                time.sleep(0.01)
            seen = r.is_cancelled()
            (self.dir / f"{r.request_id()}.txt").write_text(
                "cancelled" if seen else "not cancelled")
            responses.append(pb_utils.InferenceResponse(
                [pb_utils.Tensor("CANCELLED", np.array([int(seen)], dtype=np.int32))]))
        return responses
"""
)

# decoupled: sends OUT = i, then waits (3 s at most) for the caller to acknowledge it (a
# file) before the next; ACKED says whether the one before was acknowledged in time
ACKED_CONFIG = """
name: "acked"
backend: "python"
max_batch_size: 0
model_transaction_policy { decoupled: true }
input [
  { name: "COUNT" data_type: TYPE_INT32 dims: [ 1 ] },
  { name: "TAG" data_type: TYPE_STRING dims: [ 1 ] }
]
output [
  { name: "OUT" data_type: TYPE_INT32 dims: [ 1 ] },
  { name: "ACKED" data_type: TYPE_INT32 dims: [ 1 ] }
]
"""
ACKED = (
    READ_DIR
    + """
import time

import numpy as np
import triton_python_backend_utils as pb_utils


class TritonPythonModel:
    def initialize(self, args):
        self.dir = report_dir(args)

    def execute(self, requests):
        for r in requests:
            count = int(pb_utils.get_input_tensor_by_name(r, "COUNT").as_numpy()[0])
            tag = pb_utils.get_input_tensor_by_name(r, "TAG").as_numpy()[0].decode()
            sender = r.get_response_sender()
            acked = 1
            for i in range(count):
                sender.send(pb_utils.InferenceResponse([
                    pb_utils.Tensor("OUT", np.array([i], dtype=np.int32)),
                    pb_utils.Tensor("ACKED", np.array([acked], dtype=np.int32)),
                ]))
                deadline = time.monotonic() + 3
                while not (self.dir / f"{tag}-{i}").exists() and time.monotonic() < deadline:
                    time.sleep(0.005)
                acked = int((self.dir / f"{tag}-{i}").exists())
            sender.send(flags=pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL)
        return None
"""
)

# BLS on `acked`, acknowledging each response when it reads it
BLS_CONFIG = """
name: "bls_acked"
backend: "python"
max_batch_size: 0
input [
  { name: "COUNT" data_type: TYPE_INT32 dims: [ 1 ] },
  { name: "TAG" data_type: TYPE_STRING dims: [ 1 ] }
]
output [
  { name: "VALUES" data_type: TYPE_INT32 dims: [ -1 ] },
  { name: "ACKED" data_type: TYPE_INT32 dims: [ -1 ] },
  { name: "EMPTY" data_type: TYPE_INT32 dims: [ 1 ] }
]
"""
BLS = (
    READ_DIR
    + """
import numpy as np
import triton_python_backend_utils as pb_utils


class TritonPythonModel:
    def initialize(self, args):
        self.dir = report_dir(args)

    def execute(self, requests):
        responses = []
        for r in requests:
            tag = pb_utils.get_input_tensor_by_name(r, "TAG").as_numpy()[0].decode()
            call = pb_utils.InferenceRequest(
                model_name="acked",
                inputs=[pb_utils.get_input_tensor_by_name(r, "COUNT"),
                        pb_utils.get_input_tensor_by_name(r, "TAG")],
                requested_output_names=["OUT", "ACKED"],
            )
            values, acked, empty = [], [], 0
            for resp in call.exec(decoupled=True):
                if resp.has_error():
                    raise pb_utils.TritonModelException(resp.error().message())
                if not resp.output_tensors():
                    empty += 1
                    continue
                v = int(pb_utils.get_output_tensor_by_name(resp, "OUT").as_numpy()[0])
                values.append(v)
                acked.append(int(pb_utils.get_output_tensor_by_name(resp, "ACKED").as_numpy()[0]))
                (self.dir / f"{tag}-{v}").touch()
            responses.append(pb_utils.InferenceResponse([
                pb_utils.Tensor("VALUES", np.array(values, dtype=np.int32)),
                pb_utils.Tensor("ACKED", np.array(acked, dtype=np.int32)),
                pb_utils.Tensor("EMPTY", np.array([empty], dtype=np.int32)),
            ]))
        return responses
"""
)

MODELS = {
    "ticker": (TICKER_CONFIG, TICKER),
    "waiter": (WAITER_CONFIG, WAITER),
    "acked": (ACKED_CONFIG, ACKED),
    "bls_acked": (BLS_CONFIG, BLS),
}


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    root = tmp_path_factory.mktemp("cancel")
    reports = root / "reports"
    reports.mkdir()
    repo = root / "models"
    for name, (config, code) in MODELS.items():
        (repo / name / "1").mkdir(parents=True)
        (repo / name / "config.pbtxt").write_text(config + PARAMS.format(dir=reports))
        (repo / name / "1" / "model.py").write_text(code)
    srv = EmbeddedServer([repo], metrics_port=-1).start()
    yield srv, reports
    srv.stop()


def wait_report(path: Path, timeout: float = 15.0) -> str:
    deadline = time.monotonic() + timeout
    while not path.exists() and time.monotonic() < deadline:
        time.sleep(0.02)
    assert path.exists(), f"the model wrote no report {path.name}"
    time.sleep(0.05)  # written at once; let a slow write land
    return path.read_text()


def int_input(name: str, value: int) -> grpcclient.InferInput:
    t = grpcclient.InferInput(name, [1], "INT32")
    t.set_data_from_numpy(np.array([value], np.int32))
    return t


def test_closed_stream_is_cancelled_for_the_decoupled_model(env):
    srv, reports = env
    g = grpcclient.InferenceServerClient(srv.grpc_url)
    got: queue.Queue = queue.Queue()
    g.start_stream(callback=lambda result, error: got.put((result, error)))
    try:
        g.async_stream_infer("ticker", [int_input("START", 0)], request_id="tick-1")
        outs = []
        for _ in range(3):
            result, error = got.get(timeout=30)
            assert error is None
            outs.append(int(result.as_numpy("OUT")[0]))
        assert outs == [0, 1, 2]
    finally:
        g.stop_stream(cancel_requests=True)
    report = wait_report(reports / "tick-1.txt")
    assert report.startswith("cancelled after "), report
    assert int(report.split()[-1]) < 500  # stopped early, not at its 10 s limit


def test_cancelled_grpc_call_is_seen_inside_execute(env):
    srv, reports = env
    g = grpcclient.InferenceServerClient(srv.grpc_url)
    got: queue.Queue = queue.Queue()
    ctx = g.async_infer(
        "waiter",
        [int_input("WAIT", 1)],
        callback=lambda result, error: got.put((result, error)),
        request_id="w-1",
    )
    time.sleep(0.5)  # running in execute() by now
    ctx.cancel()
    result, error = got.get(timeout=30)
    assert result is None and isinstance(error, InferenceServerException)
    assert "CANCELLED" in str(error.status())
    assert wait_report(reports / "w-1.txt") == "cancelled"


def test_client_timeout_is_a_cancellation(env):
    srv, reports = env
    g = grpcclient.InferenceServerClient(srv.grpc_url)
    with pytest.raises(InferenceServerException, match="Deadline"):
        g.infer("waiter", [int_input("WAIT", 1)], request_id="w-2", client_timeout=0.5)
    assert wait_report(reports / "w-2.txt") == "cancelled"


def test_requests_left_alone_are_not_cancelled(env):
    srv, reports = env
    g = grpcclient.InferenceServerClient(srv.grpc_url)
    r = g.infer("waiter", [int_input("WAIT", 0)], request_id="w-3")
    assert int(r.as_numpy("CANCELLED")[0]) == 0
    assert (reports / "w-3.txt").read_text() == "not cancelled"
    # and the server still answers everyone after the cancellations above
    got: queue.Queue = queue.Queue()
    g.start_stream(callback=lambda result, error: got.put((result, error)))
    try:
        g.async_stream_infer("ticker", [int_input("START", 0)], request_id="tick-2")
        result, error = got.get(timeout=30)
        assert error is None and int(result.as_numpy("OUT")[0]) == 0
    finally:
        g.stop_stream(cancel_requests=True)
    assert wait_report(reports / "tick-2.txt").startswith("cancelled")


def test_decoupled_bls_reads_each_response_as_it_is_sent(env):
    srv, _ = env
    g = grpcclient.InferenceServerClient(srv.grpc_url)
    tag = grpcclient.InferInput("TAG", [1], "BYTES")
    tag.set_data_from_numpy(np.array([b"bls-1"], dtype=np.object_))
    r = g.infer("bls_acked", [int_input("COUNT", 4), tag])
    assert r.as_numpy("VALUES").tolist() == [0, 1, 2, 3]
    # each response was acknowledged before the next was sent: the caller read it at once
    assert r.as_numpy("ACKED").tolist() == [1, 1, 1, 1]
    assert r.as_numpy("EMPTY").tolist() == [1]  # then the final flag, as an empty response


def test_closed_generate_stream_is_cancelled(env):
    srv, reports = env
    url = f"http://{srv.http_url}/v2/models/ticker/generate_stream"
    events = []
    with httpx.stream("POST", url, json={"id": "tick-http", "START": 0}, timeout=30) as r:
        assert r.status_code == 200
        for line in r.iter_lines():
            if line.startswith("data: "):
                events.append(line)
            if len(events) == 2:
                break  # and close the connection
    report = wait_report(reports / "tick-http.txt")
    assert report.startswith("cancelled after "), report
