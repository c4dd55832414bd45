"""Implicit state (`sequence_batching.state`) for TorchScript models (`pytorch_libtorch`).

The state input is one more positional input of the module's forward (after the config's
inputs, by forward argument name, or by `NAME__<i>` index), the state output one more
output; the server keeps it per sequence as for the python and onnxruntime backends.
Driven end to end through tritonclient (HTTP and gRPC) with accumulator modules scripted
here with torch.jit.script.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import torch
import tritonclient.grpc as grpcclient
import tritonclient.http as httpclient
from tritonclient.utils import InferenceServerException

from modelport.entrypoints.kserve.embedded import EmbeddedServer
from test_sequence_state import PROTOCOLS, _client, interleave_two_sequences


class Acc(torch.nn.Module):
    """OUTPUT_STATE = INPUT_STATE + INPUT; OUTPUT = OUTPUT_STATE; BATCH = rows run."""

    def forward(self, INPUT: torch.Tensor, INPUT_STATE: torch.Tensor):
        new = INPUT_STATE + INPUT
        batch = torch.full(INPUT.shape, INPUT.shape[0], dtype=torch.int32)
        return new, batch, new


class StateFirst(torch.nn.Module):
    """Asymmetric in its arguments, so a swapped order shows: new = s + 2 * x."""

    def forward(self, INPUT_STATE: torch.Tensor, INPUT: torch.Tensor):
        new = INPUT_STATE + 2 * INPUT
        return new, new


class Indexed(torch.nn.Module):
    """Inputs INPUT_STATE__0, INPUT__1; outputs OUTPUT_STATE__0, OUTPUT__1."""

    def forward(self, s: torch.Tensor, x: torch.Tensor):
        new = s + 2 * x
        return new, new * 10


class Wide(torch.nn.Module):
    """The state output has dims [2], not the configured [1]."""

    def forward(self, INPUT: torch.Tensor, INPUT_STATE: torch.Tensor):
        new = INPUT_STATE + INPUT
        return new, torch.cat([new, new], dim=1)


class Three(torch.nn.Module):
    """Takes one more argument than the config's input plus the state."""

    def forward(self, INPUT: torch.Tensor, INPUT_STATE: torch.Tensor, EXTRA: torch.Tensor):
        new = INPUT_STATE + INPUT + EXTRA
        return new, new


class Double(torch.nn.Module):
    """The state output is float64, not the configured TYPE_FP32."""

    def forward(self, INPUT: torch.Tensor, INPUT_STATE: torch.Tensor):
        new = INPUT_STATE + INPUT
        return new, new.double()


CONFIG = """
name: "{name}"
platform: "pytorch_libtorch"
max_batch_size: 4
input [{{ name: "INPUT" data_type: TYPE_FP32 dims: [ 1 ] }}]
output [{outputs}]
sequence_batching {{
  max_sequence_idle_microseconds: 5000000
  {strategy}
  state [{{
    input_name: "{state_in}" output_name: "OUTPUT_STATE" data_type: TYPE_FP32 dims: [ 1 ]
    initial_state: {{ data_type: TYPE_FP32 dims: [ 1 ] zero_data: true name: "zero" }}
  }}]
}}
"""
OUT = '{ name: "OUTPUT" data_type: TYPE_FP32 dims: [ 1 ] }'
BATCH = '{ name: "BATCH" data_type: TYPE_INT32 dims: [ 1 ] }'
OLDEST = "oldest { max_candidate_sequences: 4 max_queue_delay_microseconds: 300000 }"

INDEXED = """
name: "ts_indexed"
backend: "pytorch"
max_batch_size: 0
input [{ name: "INPUT__1" data_type: TYPE_FP32 dims: [ 1 ] }]
output [{ name: "OUTPUT__1" data_type: TYPE_FP32 dims: [ 1 ] }]
sequence_batching {
  state [{
    input_name: "INPUT_STATE__0" output_name: "OUTPUT_STATE__0" data_type: TYPE_FP32
    dims: [ 1 ]
    initial_state: { data_type: TYPE_FP32 dims: [ 1 ] data_file: "init" name: "file" }
  }]
}
"""


def _model(repo: Path, name: str, module: torch.nn.Module, config: str) -> Path:
    d = repo / name
    (d / "1").mkdir(parents=True)
    torch.jit.script(module).save(str(d / "1" / "model.pt"))
    (d / "config.pbtxt").write_text(config)
    return d


def _cfg(name, module_outputs=(OUT, BATCH), strategy="", state_in="INPUT_STATE"):
    return CONFIG.format(
        name=name, outputs=", ".join(module_outputs), strategy=strategy, state_in=state_in
    )


GOOD = ["ts_acc", "ts_oldest", "ts_named", "ts_indexed"]


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    repo = tmp_path_factory.mktemp("ts_state_repo")
    _model(repo, "ts_acc", Acc(), _cfg("ts_acc"))
    _model(repo, "ts_oldest", Acc(), _cfg("ts_oldest", strategy=OLDEST))
    _model(repo, "ts_named", StateFirst(), _cfg("ts_named", module_outputs=(OUT,)))
    d = _model(repo, "ts_indexed", Indexed(), INDEXED)
    (d / "initial_state").mkdir()
    (d / "initial_state" / "init").write_bytes(np.array([100.0], np.float32).tobytes())
    # load errors, loaded by the tests
    _model(repo, "bad_dims", Wide(), _cfg("bad_dims", module_outputs=(OUT,)))
    _model(repo, "bad_dtype", Double(), _cfg("bad_dtype", module_outputs=(OUT,)))
    _model(repo, "bad_name", Acc(), _cfg("bad_name", state_in="STATE"))
    _model(repo, "bad_count", Three(), _cfg("bad_count", module_outputs=(OUT,)))
    controlled = _cfg("bad_controls", module_outputs=(OUT,)).replace(
        "5000000",
        '5000000 control_input [{ name: "START" control [{ kind: CONTROL_SEQUENCE_START '
        "int32_false_true: [0, 1] }] }]",
    )
    _model(repo, "bad_controls", StateFirst(), controlled)  # START is a 3rd argument
    _model(repo, "bad_outputs", StateFirst(), _cfg("bad_outputs", module_outputs=(OUT, BATCH)))
    srv = EmbeddedServer([repo], control_mode="explicit", load_models=GOOD).start()
    yield srv
    srv.stop()


def _infer(c, protocol, model, sid, x, start=False, end=False, name="INPUT", batched=True):
    m = httpclient if protocol == "http" else grpcclient
    shape = [1, 1] if batched else [1]
    t = m.InferInput(name, shape, "FP32")
    t.set_data_from_numpy(np.full(shape, x, np.float32))
    return c.infer(model, [t], sequence_id=sid, sequence_start=start, sequence_end=end)


def _step(c, protocol, model, sid, x, start=False, end=False):
    r = _infer(c, protocol, model, sid, x, start, end)
    return float(r.as_numpy("OUTPUT").reshape(-1)[0])


def _store(server, model):
    return server.manager.get(model).states._store


@pytest.mark.parametrize("protocol", PROTOCOLS)
@pytest.mark.parametrize("model", ["ts_acc", "ts_oldest"])
def test_interleaved_sequences_keep_their_own_state(server, protocol, model):
    c = _client(server, protocol)
    a, b = interleave_two_sequences(_step, c, protocol, model)
    assert b not in _store(server, model)  # END freed b; a is still held
    assert a in _store(server, model)
    # START resets the state of an active sequence; END drops it
    assert _step(c, protocol, model, a, 5, start=True) == 5
    assert _step(c, protocol, model, a, 1, end=True) == 6
    assert a not in _store(server, model)


@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_state_output_stays_out_of_the_response(server, protocol):
    c = _client(server, protocol)
    r = _infer(c, protocol, "ts_acc", 31, 4, start=True, end=True)
    assert r.as_numpy("OUTPUT_STATE") is None
    assert r.as_numpy("OUTPUT").reshape(-1).tolist() == [4]
    assert r.as_numpy("BATCH") is not None


@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_state_input_goes_where_the_forward_takes_it(server, protocol):
    """forward(INPUT_STATE, INPUT): by argument name the state is the first argument."""
    c = _client(server, protocol)
    assert _step(c, protocol, "ts_named", 41, 1, start=True) == 2  # 0 + 2 * 1
    assert _step(c, protocol, "ts_named", 41, 3) == 8  # 2 + 2 * 3
    assert _step(c, protocol, "ts_named", 41, 1, end=True) == 10


@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_indexed_names_and_initial_state_from_file(server, protocol):
    """INPUT_STATE__0 / INPUT__1 by index, max_batch_size 0, initial state 100 from a file."""
    c = _client(server, protocol)
    sid = 51 if protocol == "http" else 52

    def step(x, start=False, end=False):
        r = _infer(c, protocol, "ts_indexed", sid, x, start, end, name="INPUT__1", batched=False)
        assert r.as_numpy("OUTPUT_STATE__0") is None
        return float(r.as_numpy("OUTPUT__1").reshape(-1)[0])

    assert step(1, start=True) == 1020  # (100 + 2) * 10
    assert step(2) == 1060  # (102 + 4) * 10
    assert step(5, start=True) == 1100  # START: back to the file's 100
    assert step(0, end=True) == 1100
    assert sid not in _store(server, "ts_indexed")


def test_several_sequences_batched_in_one_execute_keep_their_state(server):
    """oldest with a queue delay: four sequences in one forward, one state row each."""
    sids = [71, 72, 73, 74]

    def one(args):
        sid, x, start, end = args
        c = httpclient.InferenceServerClient(server.http_url)
        r = _infer(c, "http", "ts_oldest", sid, x, start, end)
        return float(r.as_numpy("OUTPUT").reshape(-1)[0]), int(r.as_numpy("BATCH").reshape(-1)[0])

    with ThreadPoolExecutor(4) as pool:
        for step in range(3):
            args = [(s, (k + 1) * 10**step, step == 0, step == 2) for k, s in enumerate(sids)]
            got = list(pool.map(one, args))
            want = [sum((k + 1) * 10**j for j in range(step + 1)) for k in range(4)]
            assert [g[0] for g in got] == want
            assert max(g[1] for g in got) > 1  # batched together
    assert not any(s in _store(server, "ts_oldest") for s in sids)


def test_direct_strategy_batches_slots_with_their_own_state(server):
    """direct: b runs in slot 1 next to a null request (or a's request) in slot 0."""
    c = _client(server, "http")
    assert _step(c, "http", "ts_acc", 81, 1, start=True) == 1
    assert _step(c, "http", "ts_acc", 82, 5, start=True) == 5
    assert _step(c, "http", "ts_acc", 82, 5) == 10
    assert _step(c, "http", "ts_acc", 81, 1, end=True) == 2
    assert _step(c, "http", "ts_acc", 82, 5, end=True) == 15


@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_request_without_sequence_id_is_refused(server, protocol):
    c = _client(server, protocol)
    with pytest.raises(
        InferenceServerException,
        match="inference request to model 'ts_acc' must specify a non-zero or non-empty "
        "correlation ID",
    ):
        _infer(c, protocol, "ts_acc", 0, 1)
    with pytest.raises(InferenceServerException, match="must specify the START flag"):
        _infer(c, protocol, "ts_acc", 424242, 1)


def test_client_cannot_send_the_state_input(server):
    c = httpclient.InferenceServerClient(server.http_url)
    t = httpclient.InferInput("INPUT", [1, 1], "FP32")
    t.set_data_from_numpy(np.array([[1]], np.float32))
    s = httpclient.InferInput("INPUT_STATE", [1, 1], "FP32")
    s.set_data_from_numpy(np.array([[1]], np.float32))
    with pytest.raises(InferenceServerException, match="unexpected inference input 'INPUT_STATE'"):
        c.infer("ts_acc", [t, s], sequence_id=95, sequence_start=True, sequence_end=True)


@pytest.mark.parametrize(
    ("model", "words"),
    [
        (
            "bad_dims",
            r"state output 'OUTPUT_STATE' of the TorchScript model has shape \[2\] \(without "
            r"the batch dimension\), the sequence_batching state declares dims \[1\]",
        ),
        (
            "bad_dtype",
            r"state output 'OUTPUT_STATE' of the TorchScript model has data type TYPE_FP64, "
            r"the sequence_batching state declares TYPE_FP32",
        ),
        (
            "bad_name",
            r"state input 'STATE' is not an argument of the TorchScript forward "
            r"\(arguments: INPUT, INPUT_STATE\)",
        ),
        (
            "bad_count",
            r"unable to load model 'bad_count', configuration expects 2 inputs, model "
            r"provides 3",
        ),
        (
            "bad_controls",
            r"configuration expects 3 inputs, model provides 2: the TorchScript forward would "
            r"be called with 'INPUT_STATE' \(state\), 'INPUT', 'START' \(control START\) "
            r"\(forward arguments: INPUT_STATE, INPUT\)",
        ),
        (
            "bad_outputs",
            r"the TorchScript forward returned no output for state output 'OUTPUT_STATE' "
            r"\(sequence_batching state 'INPUT_STATE'; outputs are taken in the order "
            r"OUTPUT, BATCH, OUTPUT_STATE\)",
        ),
    ],
)
def test_bad_state_configs_fail_at_load(server, model, words):
    c = _client(server, "http")
    with pytest.raises(InferenceServerException, match=rf"failed to load '{model}'.*{words}"):
        c.load_model(model)
    assert not c.is_model_ready(model)
