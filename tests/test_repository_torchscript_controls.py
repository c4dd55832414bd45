"""Sequence control inputs (START / END / READY / CORRID) for TorchScript models.

As Triton's pytorch backend, modelport passes `sequence_batching.control_input` tensors to
the module's forward as more positional inputs: by forward argument name, by `NAME__<i>`
index, or after the config's inputs and states in config order. Driven end to end through
tritonclient (HTTP and gRPC) with modules scripted here that echo or accumulate the values
they see, with and without implicit state, unbatched, one row per sequence, and next to
the null requests (READY false, CORRID 0) of the direct strategy's empty slots.
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
from test_sequence_state import PROTOCOLS, _client


class Seen(torch.nn.Module):
    """Echoes each control of its row; NULLS / SSUM / CSUM / BATCH describe the whole batch."""

    def forward(
        self,
        INPUT: torch.Tensor,
        START: torch.Tensor,
        END: torch.Tensor,
        READY: torch.Tensor,
        CORRID: torch.Tensor,
    ):
        b = INPUT.shape[0]
        nulls = int((~READY).sum())
        ssum = int(START.sum())
        csum = int(CORRID.to(torch.int64).sum())
        return (
            INPUT,
            START,
            END,
            READY,
            CORRID,
            torch.full([b, 1], nulls, dtype=torch.int32),
            torch.full([b, 1], ssum, dtype=torch.int32),
            torch.full([b, 1], csum, dtype=torch.int64),
            torch.full([b, 1], b, dtype=torch.int32),
        )


class AccControls(torch.nn.Module):
    """State [steps, starts, ends, corrid sum] of the sequence; the controls are the 3rd to
    6th arguments, which are not named in the config (placed after the state by default)."""

    def forward(self, INPUT: torch.Tensor, INPUT_STATE: torch.Tensor, s, e, r, c):
        ready = r.to(torch.float32)
        seen = torch.cat([ready, s.to(torch.float32), e.to(torch.float32), c.to(torch.float32)], 1)
        new = INPUT_STATE + seen * ready
        batch = torch.full([INPUT.shape[0], 1], INPUT.shape[0], dtype=torch.int32)
        return new, batch, new


class Mixed(torch.nn.Module):
    """forward(INPUT, CORRID, START): INPUT by name, controls CORRID__1 / START__2 by index."""

    def forward(self, INPUT: torch.Tensor, CORRID: torch.Tensor, START: torch.Tensor):
        return INPUT + START.to(torch.float32), CORRID


class StringIds(torch.nn.Module):
    """A TYPE_STRING CORRID arrives as list[str]: the first 8 character codes of each id;
    EMPTY: the batch's empty ids (null requests)."""

    def forward(self, INPUT: torch.Tensor, CORRID: list[str]):
        rows: list[list[int]] = []
        empty = 0
        for sid in CORRID:
            codes = [ord(ch) for ch in sid][:8]
            rows.append(codes + [0] * (8 - len(codes)))
            empty += int(sid == "")
        b = INPUT.shape[0]
        return INPUT, torch.tensor(rows, dtype=torch.int64), torch.full([b, 1], empty)


class TensorIds(torch.nn.Module):
    def forward(self, INPUT: torch.Tensor, CORRID: torch.Tensor):
        return INPUT, CORRID


class NoEnd(torch.nn.Module):
    def forward(self, INPUT: torch.Tensor, START: torch.Tensor):
        return INPUT + START


# controls listed in another order than the forward's arguments: they bind by name
SEEN = """
name: "{name}"
backend: "pytorch"
max_batch_size: 4
input [{{ name: "INPUT" data_type: TYPE_FP32 dims: [ 1 ] }}]
output [
  {{ name: "OUTPUT" data_type: TYPE_FP32 dims: [ 1 ] }},
  {{ name: "O_START" data_type: TYPE_INT32 dims: [ 1 ] }},
  {{ name: "O_END" data_type: TYPE_FP32 dims: [ 1 ] }},
  {{ name: "O_READY" data_type: TYPE_BOOL dims: [ 1 ] }},
  {{ name: "O_CORRID" data_type: TYPE_UINT64 dims: [ 1 ] }},
  {{ name: "NULLS" data_type: TYPE_INT32 dims: [ 1 ] }},
  {{ name: "SSUM" data_type: TYPE_INT32 dims: [ 1 ] }},
  {{ name: "CSUM" data_type: TYPE_INT64 dims: [ 1 ] }},
  {{ name: "BATCH" data_type: TYPE_INT32 dims: [ 1 ] }}
]
sequence_batching {{
  max_sequence_idle_microseconds: 5000000
  control_input [
    {{ name: "CORRID" control [{{ kind: CONTROL_SEQUENCE_CORRID data_type: TYPE_UINT64 }}] }},
    {{ name: "READY" control [{{ kind: CONTROL_SEQUENCE_READY bool_false_true: [ false, true ] }}] }},
    {{ name: "END" control [{{ kind: CONTROL_SEQUENCE_END fp32_false_true: [ 0.5, 1.5 ] }}] }},
    {{ name: "START" control [{{ kind: CONTROL_SEQUENCE_START int32_false_true: [ 3, 7 ] }}] }}
  ]
}}
"""

ACC = """
name: "{name}"
backend: "pytorch"
max_batch_size: 4
input [{{ name: "INPUT" data_type: TYPE_FP32 dims: [ 1 ] }}]
output [
  {{ name: "SEEN" data_type: TYPE_FP32 dims: [ 4 ] }},
  {{ name: "BATCH" data_type: TYPE_INT32 dims: [ 1 ] }}
]
sequence_batching {{
  max_sequence_idle_microseconds: 5000000
  {strategy}
  control_input [
    {{ name: "START" control [{{ kind: CONTROL_SEQUENCE_START int32_false_true: [ 0, 1 ] }}] }},
    {{ name: "END" control [{{ kind: CONTROL_SEQUENCE_END bool_false_true: [ false, true ] }}] }},
    {{ name: "READY" control [{{ kind: CONTROL_SEQUENCE_READY fp32_false_true: [ 0, 1 ] }}] }},
    {{ name: "CORRID" control [{{ kind: CONTROL_SEQUENCE_CORRID data_type: TYPE_INT64 }}] }}
  ]
  state [{{
    input_name: "INPUT_STATE" output_name: "OUTPUT_STATE" data_type: TYPE_FP32 dims: [ 4 ]
    initial_state: {{ data_type: TYPE_FP32 dims: [ 4 ] zero_data: true name: "zero" }}
  }}]
}}
"""
OLDEST = "oldest { max_candidate_sequences: 4 max_queue_delay_microseconds: 300000 }"

MIXED = """
name: "ts_mixed"
backend: "pytorch"
max_batch_size: 0
input [{ name: "INPUT" data_type: TYPE_FP32 dims: [ 1 ] }]
output [
  { name: "OUTPUT" data_type: TYPE_FP32 dims: [ 1 ] },
  { name: "O_CORRID" data_type: TYPE_INT64 dims: [ 1 ] }
]
sequence_batching {
  control_input [
    { name: "START__2" control [{ kind: CONTROL_SEQUENCE_START fp32_false_true: [ 0, 100 ] }] },
    { name: "CORRID__1" control [{ kind: CONTROL_SEQUENCE_CORRID data_type: TYPE_INT64 }] }
  ]
}
"""

STRING_IDS = """
name: "{name}"
backend: "pytorch"
max_batch_size: 4
input [{{ name: "INPUT" data_type: TYPE_FP32 dims: [ 1 ] }}]
output [
  {{ name: "OUTPUT" data_type: TYPE_FP32 dims: [ 1 ] }},
  {{ name: "CODES" data_type: TYPE_INT64 dims: [ 8 ] }},
  {{ name: "EMPTY" data_type: TYPE_INT64 dims: [ 1 ] }}
]
sequence_batching {{
  control_input [
    {{ name: "CORRID" control [{{ kind: CONTROL_SEQUENCE_CORRID data_type: TYPE_STRING }}] }}
  ]
}}
"""

BAD_ARITY = """
name: "bad_arity"
backend: "pytorch"
max_batch_size: 0
input [{ name: "INPUT" data_type: TYPE_FP32 dims: [ 1 ] }]
output [{ name: "OUTPUT" data_type: TYPE_FP32 dims: [ 1 ] }]
sequence_batching {
  control_input [
    { name: "START" control [{ kind: CONTROL_SEQUENCE_START fp32_false_true: [ 0, 1 ] }] },
    { name: "END" control [{ kind: CONTROL_SEQUENCE_END fp32_false_true: [ 0, 1 ] }] }
  ]
}
"""

BAD_CLASH = """
name: "bad_clash"
backend: "pytorch"
max_batch_size: 0
input [{ name: "INPUT__0" data_type: TYPE_FP32 dims: [ 1 ] }]
output [{ name: "OUTPUT__0" data_type: TYPE_FP32 dims: [ 1 ] }]
sequence_batching {
  control_input [
    { name: "START__0" control [{ kind: CONTROL_SEQUENCE_START fp32_false_true: [ 0, 1 ] }] }
  ]
}
"""

GOOD = ["ts_seen", "ts_acc_ctl", "ts_oldest_ctl", "ts_mixed", "ts_string_ids"]


def _model(repo: Path, name: str, module: torch.nn.Module, config: str) -> None:
    d = repo / name
    (d / "1").mkdir(parents=True)
    torch.jit.script(module).save(str(d / "1" / "model.pt"))
    (d / "config.pbtxt").write_text(config)


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    repo = tmp_path_factory.mktemp("ts_controls_repo")
    _model(repo, "ts_seen", Seen(), SEEN.format(name="ts_seen"))
    _model(repo, "ts_acc_ctl", AccControls(), ACC.format(name="ts_acc_ctl", strategy=""))
    _model(repo, "ts_oldest_ctl", AccControls(), ACC.format(name="ts_oldest_ctl", strategy=OLDEST))
    _model(repo, "ts_mixed", Mixed(), MIXED)
    _model(repo, "ts_string_ids", StringIds(), STRING_IDS.format(name="ts_string_ids"))
    # load errors, loaded by the tests
    _model(repo, "bad_string_ids", TensorIds(), STRING_IDS.format(name="bad_string_ids"))
    _model(repo, "bad_arity", NoEnd(), BAD_ARITY)
    _model(repo, "bad_clash", NoEnd(), BAD_CLASH)
    srv = EmbeddedServer([repo], control_mode="explicit", load_models=GOOD).start()
    yield srv
    srv.stop()


def _infer(c, protocol, model, sid, x, start=False, end=False, batched=True):
    m = httpclient if protocol == "http" else grpcclient
    shape = [1, 1] if batched else [1]
    t = m.InferInput("INPUT", shape, "FP32")
    t.set_data_from_numpy(np.full(shape, x, np.float32))
    return c.infer(model, [t], sequence_id=sid, sequence_start=start, sequence_end=end)


def _seen(c, protocol, sid, start=False, end=False) -> dict:
    r = _infer(c, protocol, "ts_seen", sid, 1, start, end)
    names = ["O_START", "O_END", "O_READY", "O_CORRID", "NULLS", "SSUM", "CSUM", "BATCH"]
    out = {n: r.as_numpy(n) for n in names}
    assert out["O_START"].dtype == np.int32 and out["O_END"].dtype == np.float32
    assert out["O_READY"].dtype == np.bool_ and out["O_CORRID"].dtype == np.uint64
    return {n: a.reshape(-1)[0].item() for n, a in out.items()}


def _row(start, end, corrid, nulls=0, ssum=None, csum=None, batch=1) -> dict:
    s = 7 if start else 3  # CSUM: the model sums CORRID as int64
    return {
        "O_START": s,
        "O_END": 1.5 if end else 0.5,
        "O_READY": True,
        "O_CORRID": corrid,
        "NULLS": nulls,
        "SSUM": s if ssum is None else ssum,
        "CSUM": (corrid if corrid < 2**63 else corrid - 2**64) if csum is None else csum,
        "BATCH": batch,
    }


@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_forward_gets_the_control_values_triton_sends(server, protocol):
    """START 7 / 3, END 1.5 / 0.5, READY true, CORRID the sequence id as UINT64."""
    c = _client(server, protocol)
    sid = 2**63 + 5 if protocol == "http" else 102  # HTTP: a UINT64 id above INT64 range
    assert _seen(c, protocol, sid, start=True) == _row(True, False, sid)
    assert _seen(c, protocol, sid) == _row(False, False, sid)
    assert _seen(c, protocol, sid, end=True) == _row(False, True, sid)
    assert _seen(c, protocol, sid, start=True, end=True) == _row(True, True, sid)


def test_interleaved_sequences_and_null_slots(server):
    """direct: a holds slot 0 and b slot 1; a request runs next to a null request in the
    other slot, which the forward sees as READY false, START 3 (false) and CORRID 0."""
    c = _client(server, "http")
    a, b = 111, 112
    assert _seen(c, "http", a, start=True) == _row(True, False, a)
    # b's START runs in slot 1 after a null row in slot 0: START false (3) there
    assert _seen(c, "http", b, start=True) == _row(True, False, b, nulls=1, ssum=10, batch=2)
    assert _seen(c, "http", a) == _row(False, False, a, nulls=1, ssum=6, batch=2)
    assert _seen(c, "http", b, end=True) == _row(False, True, b, nulls=1, ssum=6, batch=2)
    # b's slot is free again: a runs alone
    assert _seen(c, "http", a, end=True) == _row(False, True, a)


def _acc(c, protocol, model, sid, x=1, start=False, end=False) -> tuple[list[float], int]:
    r = _infer(c, protocol, model, sid, x, start, end)
    assert r.as_numpy("OUTPUT_STATE") is None
    return r.as_numpy("SEEN").reshape(-1).tolist(), int(r.as_numpy("BATCH").reshape(-1)[0])


@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_state_accumulates_the_controls_of_each_sequence(server, protocol):
    """[steps, starts, ends, corrid sum] per sequence, two sequences interleaved."""
    c = _client(server, protocol)
    a, b = (121, 122) if protocol == "http" else (131, 132)

    def seen(sid, start=False, end=False):
        return _acc(c, protocol, "ts_acc_ctl", sid, start=start, end=end)[0]

    assert seen(a, start=True) == [1, 1, 0, a]
    assert seen(b, start=True) == [1, 1, 0, b]
    assert seen(a) == [2, 1, 0, 2 * a]
    assert seen(b) == [2, 1, 0, 2 * b]
    assert seen(b, end=True) == [3, 1, 1, 3 * b]
    assert seen(a) == [3, 1, 0, 3 * a]
    assert seen(a, start=True) == [1, 1, 0, a]  # START resets the state
    assert seen(a, end=True) == [2, 1, 1, 2 * a]
    store = server.manager.get("ts_acc_ctl").states._store
    assert a not in store and b not in store


def test_batched_rows_each_get_their_own_controls(server):
    """oldest with a queue delay: four sequences in one forward, one control row each."""
    sids = [141, 142, 143, 144]

    def one(args):
        sid, start, end = args
        c = httpclient.InferenceServerClient(server.http_url)
        return _acc(c, "http", "ts_oldest_ctl", sid, start=start, end=end)

    with ThreadPoolExecutor(4) as pool:
        for step in range(3):
            got = list(pool.map(one, [(s, step == 0, step == 2) for s in sids]))
            want = [[step + 1, 1, int(step == 2), (step + 1) * s] for s in sids]
            assert [g[0] for g in got] == want
            assert max(g[1] for g in got) > 1  # batched together
    store = server.manager.get("ts_oldest_ctl").states._store
    assert not any(s in store for s in sids)


@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_controls_named_by_index_next_to_inputs_named_by_argument(server, protocol):
    """Triton's naming: CORRID__1 and START__2 go to forward arguments 1 and 2."""
    c = _client(server, protocol)
    sid = 151 if protocol == "http" else 152

    def step(x, start=False, end=False):
        r = _infer(c, protocol, "ts_mixed", sid, x, start, end, batched=False)
        return float(r.as_numpy("OUTPUT")[0]), int(r.as_numpy("O_CORRID")[0])

    assert step(1, start=True) == (101, sid)
    assert step(2) == (2, sid)
    assert step(3, end=True) == (3, sid)


def _codes(s: str) -> list[int]:
    return [ord(ch) for ch in s[:8]] + [0] * (8 - len(s[:8]))


def test_string_correlation_ids_reach_the_forward_as_a_list_of_str(server):
    """gRPC string ids, two sequences interleaved; b's rows run next to a null row ("")."""
    c = _client(server, "grpc")

    def codes(sid, start=False, end=False):
        r = _infer(c, "grpc", "ts_string_ids", sid, 1, start, end)
        return r.as_numpy("CODES").reshape(-1).tolist(), int(r.as_numpy("EMPTY")[0, 0])

    assert codes("alpha", start=True) == (_codes("alpha"), 0)
    assert codes("bravo-charlie", start=True) == (_codes("bravo-charlie"), 1)  # slot 1
    assert codes("alpha", end=True) == (_codes("alpha"), 1)
    assert codes("bravo-charlie", end=True) == (_codes("bravo-charlie"), 1)
    with pytest.raises(InferenceServerException, match="expects a string ID"):
        codes(5, start=True)


@pytest.mark.parametrize(
    ("model", "words"),
    [
        (
            "bad_string_ids",
            r"the TYPE_STRING CONTROL_SEQUENCE_CORRID input 'CORRID' cannot be a TorchScript "
            r"tensor \(tensors hold no strings\); its forward argument \(position 1\) must be "
            r"declared List\[str\], the argument 'CORRID' is Tensor",
        ),
        (
            "bad_arity",
            r"unable to load model 'bad_arity', configuration expects 3 inputs, model provides "
            r"2: the TorchScript forward would be called with 'INPUT', 'START' \(control "
            r"START\), 'END' \(control END\) \(forward arguments: INPUT, START\)",
        ),
        (
            "bad_clash",
            r"sequence_batching control input 'START__0' would be forward argument 0, which is "
            r"already given 'INPUT__0'",
        ),
    ],
)
def test_bad_control_configs_fail_at_load(server, model, words):
    c = _client(server, "http")
    with pytest.raises(InferenceServerException, match=rf"failed to load '{model}'.*{words}"):
        c.load_model(model)
    assert not c.is_model_ready(model)
