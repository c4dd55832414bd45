"""Triton's implicit state management (`sequence_batching { state [...] }`).

The server keeps each state tensor per correlation id: a START request gets the
initial_state (zero_data / data_file; zeros with -1 dims as 1 when there is none), later
requests get the state output of the previous request of the sequence. Driven end to end
through tritonclient (HTTP and gRPC) with python accumulator models and an ONNX one;
state outputs stay out of the client's response unless listed under 'output'.
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
from modelport.repository.errors import ModelConfigError
from modelport.repository.model_config import autocomplete, parse_config_text
from modelport.repository.validation import validate_config

PROTOCOLS = ["http", "grpc"]

# OUTPUT_STATE = INPUT_STATE + INPUT; OUTPUT = OUTPUT_STATE; BATCH = requests in this execute.
# INPUT 13 "forgets" the state output; INPUT 99 raises.
ACC = """
import numpy as np
import triton_python_backend_utils as pb_utils


class TritonPythonModel:
    def execute(self, requests):
        out = []
        for r in requests:
            x = pb_utils.get_input_tensor_by_name(r, "INPUT").as_numpy()
            s = pb_utils.get_input_tensor_by_name(r, "INPUT_STATE").as_numpy()
            if int(x.reshape(-1)[0]) == 99:
                out.append(pb_utils.InferenceResponse(error=pb_utils.TritonError("boom")))
                continue
            new = (s + x).astype(np.float32)
            tensors = [
                pb_utils.Tensor("OUTPUT", new),
                pb_utils.Tensor("BATCH", np.full(x.shape, len(requests), np.int32)),
            ]
            if int(x.reshape(-1)[0]) != 13:
                tensors.append(pb_utils.Tensor("OUTPUT_STATE", new))
            out.append(pb_utils.InferenceResponse(tensors))
        return out
"""

# a growing state (dims [-1]): OUTPUT_STATE = concat(INPUT_STATE, INPUT)
GROW = """
import numpy as np
import triton_python_backend_utils as pb_utils


class TritonPythonModel:
    def execute(self, requests):
        out = []
        for r in requests:
            x = pb_utils.get_input_tensor_by_name(r, "INPUT").as_numpy()
            s = pb_utils.get_input_tensor_by_name(r, "INPUT_STATE").as_numpy()
            new = np.concatenate([s, x], axis=1).astype(np.float32)
            out.append(pb_utils.InferenceResponse([
                pb_utils.Tensor("OUTPUT", np.array([[new.sum()]], np.float32)),
                pb_utils.Tensor("LEN", np.array([[new.shape[1]]], np.int32)),
                pb_utils.Tensor("OUTPUT_STATE", new),
            ]))
        return out
"""

CONFIG = """
name: "{name}"
backend: "python"
max_batch_size: 4
input [{{ name: "INPUT" data_type: TYPE_FP32 dims: [ 1 ] }}]
output [
  {{ name: "OUTPUT" data_type: TYPE_FP32 dims: [ -1 ] }},
  {{ name: "{second}" data_type: TYPE_INT32 dims: [ 1 ] }}
  {listed}
]
sequence_batching {{
  {strategy}
  max_sequence_idle_microseconds: {idle}
  state [{{
    input_name: "INPUT_STATE"
    output_name: "OUTPUT_STATE"
    data_type: TYPE_FP32
    dims: [ -1 ]
    {initial}
  }}]
}}
"""

ZERO = 'initial_state: { data_type: TYPE_FP32 dims: [ 1 ] zero_data: true name: "zero" }'
FILE = 'initial_state: { data_type: TYPE_FP32 dims: [ 1 ] data_file: "init" name: "from file" }'


def _model(repo, name, code, second="BATCH", listed="", strategy="", idle=5_000_000, initial=""):
    d = repo / name
    (d / "1").mkdir(parents=True)
    (d / "1" / "model.py").write_text(code)
    (d / "config.pbtxt").write_text(
        CONFIG.format(
            name=name, second=second, listed=listed, strategy=strategy, idle=idle, initial=initial
        )
    )
    return d


ONNX_CONFIG = """
name: "st_onnx"
backend: "onnxruntime"
max_batch_size: 4
input [{ name: "INPUT" data_type: TYPE_FP32 dims: [ 1 ] }]
output [{ name: "OUTPUT" data_type: TYPE_FP32 dims: [ 1 ] }]
sequence_batching {
  state [{
    input_name: "INPUT_STATE" output_name: "OUTPUT_STATE" data_type: TYPE_FP32 dims: [ 1 ]
    initial_state: { data_type: TYPE_FP32 dims: [ 1 ] zero_data: true name: "zero" }
  }]
}
"""


def _onnx(repo: Path) -> None:
    import onnx
    from onnx import TensorProto, helper

    def vi(name):
        return helper.make_tensor_value_info(name, TensorProto.FLOAT, ["b", 1])

    nodes = [
        helper.make_node("Add", ["INPUT", "INPUT_STATE"], ["OUTPUT_STATE"]),
        helper.make_node("Identity", ["OUTPUT_STATE"], ["OUTPUT"]),
    ]
    graph = helper.make_graph(
        nodes, "acc", [vi("INPUT"), vi("INPUT_STATE")], [vi("OUTPUT"), vi("OUTPUT_STATE")]
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    d = repo / "st_onnx"
    (d / "1").mkdir(parents=True)
    onnx.save(model, str(d / "1" / "model.onnx"))
    (d / "config.pbtxt").write_text(ONNX_CONFIG)


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    repo = tmp_path_factory.mktemp("state_repo")
    _model(repo, "st_acc", ACC, initial=ZERO)
    d = _model(
        repo,
        "st_file",
        ACC,
        initial=FILE,
        listed=', { name: "OUTPUT_STATE" data_type: TYPE_FP32 dims: [ -1 ] }',
    )
    (d / "initial_state").mkdir()
    (d / "initial_state" / "init").write_bytes(np.array([100.0], np.float32).tobytes())
    _model(repo, "st_grow", GROW, second="LEN")
    _model(
        repo,
        "st_oldest",
        ACC,
        initial=ZERO,
        strategy="oldest { max_candidate_sequences: 4 max_queue_delay_microseconds: 300000 }",
    )
    _model(repo, "st_idle", ACC, initial=ZERO, idle=300_000)
    _onnx(repo)
    srv = EmbeddedServer([repo]).start()
    yield srv
    srv.stop()


def _client(server, protocol):
    if protocol == "http":
        return httpclient.InferenceServerClient(server.http_url)
    return grpcclient.InferenceServerClient(server.grpc_url)


def _infer(c, protocol, model, sid, x, start=False, end=False, outputs=None):
    m = httpclient if protocol == "http" else grpcclient
    t = m.InferInput("INPUT", [1, 1], "FP32")
    t.set_data_from_numpy(np.array([[x]], np.float32))
    req = [m.InferRequestedOutput(n) for n in outputs] if outputs else None
    return c.infer(model, [t], outputs=req, sequence_id=sid, sequence_start=start, sequence_end=end)


def _step(c, protocol, model, sid, x, start=False, end=False):
    r = _infer(c, protocol, model, sid, x, start, end)
    return float(r.as_numpy("OUTPUT").reshape(-1)[0])


def interleave_two_sequences(step, c, protocol: str, model: str) -> tuple[int, int]:
    """Two accumulating sequences a and b, interleaved (b ends); their running sums must stay
    apart. Returns (a, b): a still holds its state. ``step(c, protocol, model, sid, x,
    start=, end=)`` sends one request and returns its OUTPUT."""
    a, b = (11, 12) if protocol == "http" else (21, 22)
    got = [
        step(c, protocol, model, a, 1, start=True),
        step(c, protocol, model, b, 10, start=True),
        step(c, protocol, model, a, 2),
        step(c, protocol, model, b, 20),
        step(c, protocol, model, a, 3),
        step(c, protocol, model, b, 30, end=True),
    ]
    assert got == [1, 10, 3, 30, 6, 60]
    return a, b


def _states(server, model):
    return server.manager.get(model).states


@pytest.mark.parametrize("protocol", PROTOCOLS)
@pytest.mark.parametrize("model", ["st_acc", "st_oldest", "st_onnx"])
def test_interleaved_sequences_keep_their_own_state(server, protocol, model):
    c = _client(server, protocol)
    a, b = interleave_two_sequences(_step, c, protocol, model)
    # START resets the state of an active sequence; END drops it
    assert _step(c, protocol, model, a, 5, start=True) == 5
    assert _step(c, protocol, model, a, 1, end=True) == 6
    states = _states(server, model)
    assert a not in states._store and b not in states._store


@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_state_output_is_not_returned(server, protocol):
    c = _client(server, protocol)
    r = _infer(c, protocol, "st_acc", 31, 4, start=True)
    assert r.as_numpy("OUTPUT_STATE") is None
    assert r.as_numpy("OUTPUT") is not None and r.as_numpy("BATCH") is not None
    with pytest.raises(
        InferenceServerException, match="unexpected inference output 'OUTPUT_STATE'"
    ):
        _infer(c, protocol, "st_acc", 31, 1, outputs=["OUTPUT_STATE"])
    # only OUTPUT requested: the state still advances
    r = _infer(c, protocol, "st_acc", 31, 2, end=True, outputs=["OUTPUT"])
    assert r.as_numpy("OUTPUT").reshape(-1)[0] == 6  # the rejected request never ran


@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_initial_state_from_file_and_listed_state_output(server, protocol):
    c = _client(server, protocol)
    assert _step(c, protocol, "st_file", 41, 1, start=True) == 101
    r = _infer(c, protocol, "st_file", 41, 2, outputs=["OUTPUT_STATE"])
    assert r.as_numpy("OUTPUT_STATE").reshape(-1).tolist() == [103]
    assert r.as_numpy("OUTPUT") is None
    r = _infer(c, protocol, "st_file", 41, 1, end=True)  # all outputs: the listed state too
    assert r.as_numpy("OUTPUT_STATE").reshape(-1).tolist() == [104]


@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_default_state_is_zeros_and_variable_dims_follow_the_model(server, protocol):
    c = _client(server, protocol)
    lens = []
    sums = []
    for i, x in enumerate([1.0, 2.0, 3.0]):
        r = _infer(c, protocol, "st_grow", 51, x, start=i == 0, end=i == 2)
        lens.append(int(r.as_numpy("LEN").reshape(-1)[0]))
        sums.append(float(r.as_numpy("OUTPUT").reshape(-1)[0]))
    # START: the state is [1, 1] zeros (Triton: -1 dims as 1, uninitialized data)
    assert lens == [2, 3, 4]
    assert sums == [1.0, 3.0, 6.0]


@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_missing_state_output_fails_only_that_request(server, protocol):
    c = _client(server, protocol)
    assert _step(c, protocol, "st_acc", 61, 1, start=True) == 1
    assert _step(c, protocol, "st_acc", 62, 100, start=True) == 100
    with pytest.raises(
        InferenceServerException, match="did not produce the state output 'OUTPUT_STATE'"
    ):
        _step(c, protocol, "st_acc", 61, 13)
    with pytest.raises(InferenceServerException, match="boom"):
        _step(c, protocol, "st_acc", 61, 99)
    # the failed requests left sequence 61's state as it was; 62 untouched
    assert _step(c, protocol, "st_acc", 61, 2, end=True) == 3
    assert _step(c, protocol, "st_acc", 62, 1, end=True) == 101


def test_several_sequences_batched_in_one_execute_keep_their_state(server):
    """oldest with a queue delay: four sequences' requests go in one execute, each with its
    own state stacked in and the state outputs split back per sequence."""
    sids = [71, 72, 73, 74]

    def one(args):
        sid, x, start, end = args
        c = httpclient.InferenceServerClient(server.http_url)
        r = _infer(c, "http", "st_oldest", sid, x, start, end)
        return float(r.as_numpy("OUTPUT").reshape(-1)[0]), int(r.as_numpy("BATCH").reshape(-1)[0])

    with ThreadPoolExecutor(4) as pool:
        for step in range(3):
            got = list(
                pool.map(
                    one, [(s, (k + 1) * 10**step, step == 0, step == 2) for k, s in enumerate(sids)]
                )
            )
            want = [sum((k + 1) * 10**j for j in range(step + 1)) for k in range(4)]
            assert [g[0] for g in got] == want
            assert max(g[1] for g in got) > 1  # batched together
    assert not any(s in _states(server, "st_oldest")._store for s in sids)


def test_direct_strategy_null_slots_get_a_state_too(server):
    """direct: sequence b in slot 1 runs with a null request in slot 0 (idle sequence a)."""
    c = _client(server, "http")
    assert _step(c, "http", "st_acc", 81, 1, start=True) == 1
    assert _step(c, "http", "st_acc", 82, 5, start=True) == 5
    assert _step(c, "http", "st_acc", 82, 5) == 10
    assert _step(c, "http", "st_acc", 81, 1, end=True) == 2
    assert _step(c, "http", "st_acc", 82, 5, end=True) == 15


def test_idle_sequence_state_is_dropped(server):
    c = _client(server, "grpc")
    assert _step(c, "grpc", "st_idle", 91, 3, start=True) == 3
    assert 91 in _states(server, "st_idle")._store
    deadline = time.monotonic() + 5
    while 91 in _states(server, "st_idle")._store and time.monotonic() < deadline:
        time.sleep(0.05)
    assert 91 not in _states(server, "st_idle")._store
    with pytest.raises(InferenceServerException, match="must specify the START flag"):
        _step(c, "grpc", "st_idle", 91, 1)


def test_client_cannot_send_the_state_input(server):
    c = httpclient.InferenceServerClient(server.http_url)
    t = httpclient.InferInput("INPUT", [1, 1], "FP32")
    t.set_data_from_numpy(np.array([[1]], np.float32))
    s = httpclient.InferInput("INPUT_STATE", [1, 1], "FP32")
    s.set_data_from_numpy(np.array([[1]], np.float32))
    with pytest.raises(InferenceServerException, match="unexpected inference input 'INPUT_STATE'"):
        c.infer("st_acc", [t, s], sequence_id=95, sequence_start=True, sequence_end=True)


# -- config checks --------------------------------------------------------------------------

BASE = """
name: "m"
backend: "{backend}"
max_batch_size: 4
input [{{ name: "INPUT" data_type: TYPE_FP32 dims: [ 1 ] }}]
output [{{ name: "OUTPUT" data_type: TYPE_FP32 dims: [ 1 ] }}]
sequence_batching {{ state [{{ {state} }}] }}
"""
OK = 'input_name: "S_IN" output_name: "S_OUT" data_type: TYPE_FP32 dims: [ -1 ] '


@pytest.mark.parametrize(
    ("state", "words"),
    [
        (
            'input_name: "INPUT" output_name: "S_OUT" data_type: TYPE_FP32 dims: [1]',
            r"state input name 'INPUT' is also a model input",
        ),
        (
            'input_name: "S_IN" output_name: "INPUT" data_type: TYPE_FP32 dims: [1]',
            r"state output name 'INPUT' is also a model input",
        ),
        (
            'input_name: "S_IN" output_name: "OUTPUT" data_type: TYPE_INT32 dims: [1]',
            r"'OUTPUT' is listed under 'output' as TYPE_FP32 but the state data type is "
            r"TYPE_INT32",
        ),
        ('output_name: "S_OUT" data_type: TYPE_FP32 dims: [1]', r"must have 'input_name'"),
        (
            OK + 'initial_state { data_type: TYPE_INT32 dims: [1] zero_data: true name: "z" }',
            r"The data type used for 'initial_state' field of state 'S_IN' does not match",
        ),
        (
            OK + "initial_state { data_type: TYPE_FP32 dims: [1] zero_data: true }",
            r"Field 'name' must be set when using initial_state for state input 'S_IN'",
        ),
        (
            OK + 'initial_state { data_type: TYPE_FP32 dims: [-1] zero_data: true name: "z" }',
            r"'initial_state' field for state input name 'S_IN' contains variable dimensions",
        ),
        (
            OK + 'initial_state { data_type: TYPE_FP32 dims: [1, 2] zero_data: true name: "z" }',
            r"Number of dimensions in 'initial_state' doesn't match",
        ),
        (
            'input_name: "S_IN" output_name: "S_OUT" data_type: TYPE_FP32 dims: [ 2 ] '
            'initial_state { data_type: TYPE_FP32 dims: [3] zero_data: true name: "z" }',
            r"'initial_state' dim for input name 'S_IN' doesn't match 'state' dim description. "
            r"3 != 2",
        ),
        (
            OK + 'initial_state { data_type: TYPE_FP32 dims: [1] name: "z" }',
            r"initial_state setting expects state 'S_IN' to have state_data set",
        ),
        (
            OK + 'initial_state { data_type: TYPE_FP32 dims: [1] data_file: "../x" name: "z" }',
            r"must be a plain file name",
        ),
        (OK + "use_growable_memory: true", r"In order to 'use_growable_memory'"),
    ],
)
def test_state_config_errors(state, words):
    cfg = autocomplete(parse_config_text(BASE.format(backend="python", state=state)), Path("m"))
    with pytest.raises(ModelConfigError, match=words):
        validate_config(cfg, "m", ["python"])


def test_state_config_accepted_and_other_backends_refused():
    ok = OK + "use_same_buffer_for_input_output: true use_growable_memory: true"
    cfg = autocomplete(parse_config_text(BASE.format(backend="python", state=ok)), Path("m"))
    validate_config(cfg, "m", ["python"])  # the buffer options are accepted (and ignored)
    two = f"{OK} }}, {{ {OK.replace('S_IN', 'S2').replace('S_OUT', 'S_OUT')}"
    cfg = autocomplete(parse_config_text(BASE.format(backend="python", state=two)), Path("m"))
    with pytest.raises(
        ModelConfigError, match=r"State output name 'S_OUT' specified more than once"
    ):
        validate_config(cfg, "m", ["python"])
    cfg = parse_config_text(BASE.format(backend="llm", state=OK))
    with pytest.raises(
        ModelConfigError, match=r"python, onnxruntime, pytorch backends only, not 'llm'"
    ):
        validate_config(cfg, "m", ["llm"])
