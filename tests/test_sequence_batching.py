"""Triton's sequence batcher for stateful models (config `sequence_batching`).

End to end through tritonclient (HTTP, gRPC, gRPC streaming): a python accumulator model
keeps a running sum per correlation id from the START / END / READY / CORRID control
inputs the server fills in; idle sequences are released; Triton's error words; every
request of a sequence runs on one instance; an ONNX model reads the control tensors.
The slot layout of the direct strategy (null requests with READY false in empty slots),
the backlog and the oldest strategy are pinned on serving.sequence_batcher directly.
"""

from __future__ import annotations

import asyncio
import queue
import time
from pathlib import Path

import numpy as np
import pytest
import tritonclient.grpc as grpcclient
import tritonclient.http as httpclient
from tritonclient.grpc import model_config_pb2 as mc
from tritonclient.utils import InferenceServerException

from modelport.entrypoints.kserve.embedded import EmbeddedServer
from modelport.repository.errors import ModelConfigError
from modelport.repository.model_config import autocomplete, parse_config_text
from modelport.repository.validation import validate_config
from modelport.serving.sequence_batcher import (
    SequenceBatcher,
    SequenceBatcherConfig,
    SequenceNotStartedError,
)

PROTOCOLS = ["http", "grpc"]

ACCUMULATOR = """
import numpy as np
import triton_python_backend_utils as pb_utils


def _get(request, name):
    return pb_utils.get_input_tensor_by_name(request, name).as_numpy().reshape(-1)[0]


class TritonPythonModel:
    def initialize(self, args):
        self.instance = args["model_instance_name"]
        self.sums = {}

    def execute(self, requests):
        responses = []
        for request in requests:
            x = int(_get(request, "INPUT"))
            start, end, ready = (bool(_get(request, n)) for n in ("START", "END", "READY"))
            corrid = _get(request, "CORRID")
            corrid = corrid.decode() if isinstance(corrid, bytes) else int(corrid)
            if ready:
                if corrid != request.correlation_id():
                    raise pb_utils.TritonModelException(
                        f"CORRID {corrid!r} != correlation_id() {request.correlation_id()!r}"
                    )
                flags = (pb_utils.TRITONSERVER_REQUEST_FLAG_SEQUENCE_START if start else 0) | (
                    pb_utils.TRITONSERVER_REQUEST_FLAG_SEQUENCE_END if end else 0
                )
                if flags != request.flags():
                    raise pb_utils.TritonModelException(f"flags {request.flags()} != {flags}")
                if start:
                    self.sums[corrid] = 0
                self.sums[corrid] = self.sums.get(corrid, 0) + x
                total = self.sums[corrid]
                if end:
                    del self.sums[corrid]
            else:  # a null request in an empty slot: no state to touch
                total = 0
            shape = [1, 1] if len(pb_utils.get_input_tensor_by_name(request, "INPUT").shape()) == 2 else [1]
            responses.append(
                pb_utils.InferenceResponse(
                    [
                        pb_utils.Tensor("OUTPUT", np.full(shape, total, np.int32)),
                        pb_utils.Tensor("INSTANCE", np.full(shape, self.instance.encode(), object)),
                    ]
                )
            )
        return responses
"""

CONTROLS = """
  control_input [
    {{ name: "START" control [{{ kind: CONTROL_SEQUENCE_START int32_false_true: [0, 1] }}] }},
    {{ name: "END" control [{{ kind: CONTROL_SEQUENCE_END fp32_false_true: [0, 1] }}] }},
    {{ name: "READY" control [{{ kind: CONTROL_SEQUENCE_READY bool_false_true: [false, true] }}] }},
    {{ name: "CORRID" control [{{ kind: CONTROL_SEQUENCE_CORRID data_type: {corrid} }}] }}
  ]
"""

ACC_CONFIG = """
name: "{name}"
backend: "python"
max_batch_size: {mbs}
input [{{ name: "INPUT" data_type: TYPE_INT32 dims: [ 1 ] }}]
output [
  {{ name: "OUTPUT" data_type: TYPE_INT32 dims: [ 1 ] }},
  {{ name: "INSTANCE" data_type: TYPE_STRING dims: [ 1 ] }}
]
{extra}
sequence_batching {{
  {strategy}
  max_sequence_idle_microseconds: {idle}
{controls}
}}
"""

ONNX_CONFIG = """
name: "onnx_seq"
backend: "onnxruntime"
max_batch_size: 4
input [{ name: "INPUT" data_type: TYPE_FP32 dims: [ 1 ] }]
output [
  { name: "OUTPUT" data_type: TYPE_FP32 dims: [ 1 ] },
  { name: "CORRID_OUT" data_type: TYPE_INT64 dims: [ 1 ] }
]
sequence_batching {
  control_input [
    { name: "START" control [{ kind: CONTROL_SEQUENCE_START int32_false_true: [0, 1] }] },
    { name: "READY" control [{ kind: CONTROL_SEQUENCE_READY fp32_false_true: [0, 1] }] },
    { name: "CORRID" control [{ kind: CONTROL_SEQUENCE_CORRID data_type: TYPE_INT64 }] }
  ]
}
"""


def _acc(repo: Path, name: str, mbs: int, corrid: str, idle_us: int, strategy="", extra=""):
    d = repo / name
    (d / "1").mkdir(parents=True)
    (d / "1" / "model.py").write_text(ACCUMULATOR)
    controls = CONTROLS.format(corrid=corrid)
    (d / "config.pbtxt").write_text(
        ACC_CONFIG.format(
            name=name, mbs=mbs, extra=extra, strategy=strategy, idle=idle_us, controls=controls
        )
    )


def _onnx(repo: Path) -> None:
    """OUTPUT = INPUT * READY + START * 100, CORRID_OUT = CORRID (all [batch, 1])."""
    import onnx
    from onnx import TensorProto, helper

    def vi(name, t):
        return helper.make_tensor_value_info(name, t, ["b", 1])

    nodes = [
        helper.make_node("Cast", ["START"], ["start_f"], to=TensorProto.FLOAT),
        helper.make_node("Mul", ["INPUT", "READY"], ["x_ready"]),
        helper.make_node("Constant", [], ["hundred"], value_float=100.0),
        helper.make_node("Mul", ["start_f", "hundred"], ["start_100"]),
        helper.make_node("Add", ["x_ready", "start_100"], ["OUTPUT"]),
        helper.make_node("Identity", ["CORRID"], ["CORRID_OUT"]),
    ]
    graph = helper.make_graph(
        nodes,
        "seq",
        [
            vi("INPUT", TensorProto.FLOAT),
            vi("START", TensorProto.INT32),
            vi("READY", TensorProto.FLOAT),
            vi("CORRID", TensorProto.INT64),
        ],
        [vi("OUTPUT", TensorProto.FLOAT), vi("CORRID_OUT", TensorProto.INT64)],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    d = repo / "onnx_seq"
    (d / "1").mkdir(parents=True)
    onnx.save(model, str(d / "1" / "model.onnx"))
    (d / "config.pbtxt").write_text(ONNX_CONFIG)


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    repo = tmp_path_factory.mktemp("seq_repo")
    _acc(repo, "acc_direct", 4, "TYPE_UINT64", 5_000_000)
    _acc(
        repo,
        "acc_two",
        0,
        "TYPE_STRING",
        400_000,
        extra="instance_group [{ count: 2 kind: KIND_CPU }]",
    )
    _acc(
        repo,
        "acc_oldest",
        4,
        "TYPE_UINT64",
        5_000_000,
        strategy="oldest { max_candidate_sequences: 4 }",
    )
    _onnx(repo)
    srv = EmbeddedServer([repo]).start()
    yield srv
    srv.stop()


def _client(server, protocol):
    if protocol == "http":
        return httpclient.InferenceServerClient(server.http_url)
    return grpcclient.InferenceServerClient(server.grpc_url)


def _input(protocol, value, batched=True, dtype="INT32", name="INPUT"):
    m = httpclient if protocol == "http" else grpcclient
    arr = np.array(
        [[value]] if batched else [value], dtype=np.int32 if dtype == "INT32" else np.float32
    )
    t = m.InferInput(name, list(arr.shape), dtype)
    t.set_data_from_numpy(arr)
    return t


def _step(c, protocol, model, sid, x, start=False, end=False, batched=True):
    r = c.infer(
        model,
        [_input(protocol, x, batched)],
        sequence_id=sid,
        sequence_start=start,
        sequence_end=end,
    )
    return int(r.as_numpy("OUTPUT").reshape(-1)[0]), r.as_numpy("INSTANCE").reshape(-1)[0]


@pytest.mark.parametrize("protocol", PROTOCOLS)
@pytest.mark.parametrize("model", ["acc_direct", "acc_oldest"])
def test_two_interleaved_sequences_keep_their_own_sums(server, protocol, model):
    c = _client(server, protocol)
    a, b = (1001, 1002) if protocol == "http" else (2**40 + 5, 7)
    got = [
        _step(c, protocol, model, a, 1, start=True)[0],
        _step(c, protocol, model, b, 10, start=True)[0],
        _step(c, protocol, model, a, 2)[0],
        _step(c, protocol, model, b, 20)[0],
        _step(c, protocol, model, a, 3, end=True)[0],
        _step(c, protocol, model, b, 30, end=True)[0],
    ]
    assert got == [1, 10, 3, 30, 6, 60]


def test_grpc_stream_sequences(server):
    c = grpcclient.InferenceServerClient(server.grpc_url)
    results: queue.Queue = queue.Queue()
    c.start_stream(callback=lambda result, error: results.put((result, error)))
    steps = [
        (11, 5, True, False),
        (12, 1, True, False),
        (11, 5, False, False),
        (12, 1, False, False),
        (11, 5, False, True),
        (12, 1, False, True),
    ]
    try:
        for i, (sid, x, start, end) in enumerate(steps):
            c.async_stream_infer(
                "acc_direct",
                [_input("grpc", x)],
                request_id=str(i),
                sequence_id=sid,
                sequence_start=start,
                sequence_end=end,
            )
        got = {}
        for _ in steps:
            result, error = results.get(timeout=10)
            assert error is None, error
            got[int(result.get_response().id)] = int(result.as_numpy("OUTPUT")[0, 0])
    finally:
        c.stop_stream()
    assert [got[i] for i in range(len(steps))] == [5, 1, 10, 2, 15, 3]


@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_string_correlation_ids_stay_on_one_instance(server, protocol):
    c = _client(server, protocol)
    a, b = f"{protocol}-a", f"{protocol}-b"
    seen = {a: set(), b: set()}
    sums = {a: [], b: []}
    for i in range(4):
        for sid in (a, b):
            out, inst = _step(
                c, protocol, "acc_two", sid, i + 1, start=i == 0, end=i == 3, batched=False
            )
            sums[sid].append(out)
            seen[sid].add(inst)
    assert sums[a] == sums[b] == [1, 3, 6, 10]
    assert len(seen[a]) == len(seen[b]) == 1  # every request of a sequence on one instance
    assert seen[a] != seen[b]  # two free instances: one sequence each


@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_errors_in_tritons_words(server, protocol):
    c = _client(server, protocol)
    with pytest.raises(InferenceServerException) as e:
        c.infer("acc_direct", [_input(protocol, 1)])
    assert (
        "inference request to model 'acc_direct' must specify a non-zero or non-empty "
        "correlation ID" in str(e.value)
    )
    with pytest.raises(InferenceServerException) as e:
        c.infer("acc_direct", [_input(protocol, 1)], sequence_id=424242)
    assert (
        "inference request for sequence 424242 to model 'acc_direct' must specify the START "
        "flag on the first request of the sequence" in str(e.value)
    )
    m = httpclient if protocol == "http" else grpcclient
    two = m.InferInput("INPUT", [2, 1], "INT32")
    two.set_data_from_numpy(np.array([[1], [2]], dtype=np.int32))
    with pytest.raises(InferenceServerException) as e:
        c.infer("acc_direct", [two], sequence_id=5, sequence_start=True)
    assert (
        "inference request to model 'acc_direct' must specify batch-size 1 due to "
        "requirements of sequence batcher" in str(e.value)
    )
    with pytest.raises(InferenceServerException) as e:  # a string id for a UINT64 CORRID
        c.infer("acc_direct", [_input(protocol, 1)], sequence_id="abc", sequence_start=True)
    assert "expects a unsigned integer ID (TYPE_UINT64)" in str(e.value)


@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_start_on_an_active_sequence_restarts_it(server, protocol):
    c = _client(server, protocol)
    sid = 3131 if protocol == "http" else 3232
    assert _step(c, protocol, "acc_direct", sid, 10, start=True)[0] == 10
    assert _step(c, protocol, "acc_direct", sid, 1)[0] == 11
    assert _step(c, protocol, "acc_direct", sid, 3, start=True)[0] == 3  # restarted
    assert _step(c, protocol, "acc_direct", sid, 4, end=True)[0] == 7
    with pytest.raises(InferenceServerException, match="must specify the START flag"):
        _step(c, protocol, "acc_direct", sid, 1)  # ended


def test_idle_sequence_is_released_and_its_slot_reused(server):
    c = _client(server, "grpc")
    # acc_two: 2 instances x 1 slot, max_sequence_idle_microseconds 400000
    assert _step(c, "grpc", "acc_two", "idle-a", 1, start=True, batched=False)[0] == 1
    assert _step(c, "grpc", "acc_two", "idle-b", 2, start=True, batched=False)[0] == 2
    t0 = time.monotonic()
    # both slots are held: "idle-c" waits in the backlog until an idle sequence is released
    assert _step(c, "grpc", "acc_two", "idle-c", 3, start=True, batched=False)[0] == 3
    assert time.monotonic() - t0 >= 0.3
    assert _step(c, "grpc", "acc_two", "idle-c", 4, end=True, batched=False)[0] == 7
    time.sleep(0.9)
    for sid in ("idle-a", "idle-b"):
        with pytest.raises(InferenceServerException) as e:
            _step(c, "grpc", "acc_two", sid, 1, batched=False)
        assert (
            f"inference request for sequence {sid} to model 'acc_two' must specify the START "
            "flag on the first request of the sequence" in str(e.value)
        )


@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_onnx_model_reads_control_inputs(server, protocol):
    c = _client(server, protocol)
    m = httpclient if protocol == "http" else grpcclient

    def run(x, **kw):
        t = m.InferInput("INPUT", [1, 1], "FP32")
        t.set_data_from_numpy(np.array([[x]], dtype=np.float32))
        r = c.infer("onnx_seq", [t], **kw)
        return float(r.as_numpy("OUTPUT")[0, 0]), int(r.as_numpy("CORRID_OUT")[0, 0])

    assert run(2.0, sequence_id=77, sequence_start=True) == (102.0, 77)
    assert run(3.0, sequence_id=77) == (3.0, 77)
    assert run(4.0, sequence_id=77, sequence_end=True) == (4.0, 77)


# -- load-time checks -----------------------------------------------------------------------

BASE = """
name: "m"
backend: "python"
max_batch_size: 4
input [{ name: "INPUT" data_type: TYPE_INT32 dims: [ 1 ] }]
output [{ name: "OUTPUT" data_type: TYPE_INT32 dims: [ 1 ] }]
"""


@pytest.mark.parametrize(
    ("block", "words"),
    [
        ("iterative_sequence: true", r"'iterative_sequence' is not supported"),
        ("oldest { }", r"'oldest' needs 'max_candidate_sequences' >= 1"),
        (
            'control_input [{ name: "S" control [{ kind: CONTROL_SEQUENCE_START }] }]',
            r"must specify exactly one of 'int32_false_true', 'fp32_false_true'",
        ),
        (
            'control_input [{ name: "C" control [{ kind: CONTROL_SEQUENCE_CORRID '
            "data_type: TYPE_FP32 }] }]",
            r"unexpected control data type TYPE_FP32 for CONTROL_SEQUENCE_CORRID",
        ),
        (
            'control_input [{ name: "INPUT" control [{ kind: CONTROL_SEQUENCE_READY '
            "int32_false_true: [0, 1] }] }]",
            r"control input 'INPUT' is also a model input",
        ),
        (
            'control_input [{ name: "A" control [{ kind: CONTROL_SEQUENCE_READY '
            'int32_false_true: [0, 1] }] }, { name: "B" control [{ kind: '
            "CONTROL_SEQUENCE_READY int32_false_true: [0, 1] }] }]",
            r"specifies multiple CONTROL_SEQUENCE_READY tensors",
        ),
    ],
)
def test_refused_at_load_with_a_clear_reason(block, words):
    cfg = autocomplete(parse_config_text(BASE + f"sequence_batching {{ {block} }}"), Path("m"))
    with pytest.raises(ModelConfigError, match=words):
        validate_config(cfg, "m", ["python"])


def test_plain_sequence_batching_validates():
    cfg = autocomplete(parse_config_text(BASE + "sequence_batching { }"), Path("m"))
    validate_config(cfg, "m", ["python"])


# -- the batcher itself ---------------------------------------------------------------------


def _recorder(delay: float = 0.0):
    batches: list[tuple[int, list]] = []

    async def execute(instance, entries):
        batches.append((instance, entries))
        if delay:
            await asyncio.sleep(delay)
        return [e.item for e in entries]

    return batches, execute


def test_direct_slots_and_null_requests():
    async def main():
        batches, execute = _recorder()
        b = SequenceBatcher(SequenceBatcherConfig(slots_per_instance=4), execute)
        b.start()
        try:
            await asyncio.gather(
                b.submit("a1", "A", True, False),
                b.submit("b1", "B", True, False),
                b.submit("c1", "C", True, False),
            )
            assert [(e.item, e.slot, e.start) for e in batches[-1][1]] == [
                ("a1", 0, True),
                ("b1", 1, True),
                ("c1", 2, True),
            ]
            assert await b.submit("b2", "B", False, True) == "b2"
            # slots up to the highest occupied one; A and C have no request: not ready
            assert [(e.item, e.ready, e.end) for e in batches[-1][1]] == [
                (None, False, False),
                ("b2", True, True),
                (None, False, False),
            ]
            await asyncio.gather(
                b.submit("a2", "A", False, False), b.submit("c2", "C", False, False)
            )
            assert [(e.item, e.slot, e.corrid) for e in batches[-1][1]] == [
                ("a2", 0, "A"),
                (None, 1, 0),  # B ended: its slot is empty
                ("c2", 2, "C"),
            ]
            with pytest.raises(SequenceNotStartedError):
                await b.submit("b3", "B", False, False)
        finally:
            await b.stop()

    asyncio.run(main())


def test_backlog_waits_for_a_free_slot_and_instances_are_sticky():
    async def main():
        batches, execute = _recorder(0.01)
        b = SequenceBatcher(SequenceBatcherConfig(slots_per_instance=1), execute, num_instances=2)
        b.start()
        try:
            await asyncio.gather(b.submit("a1", 1, True, False), b.submit("b1", 2, True, False))
            assert {b.slot_of(1)[0], b.slot_of(2)[0]} == {0, 1}
            inst_a = b.slot_of(1)[0]
            c = asyncio.ensure_future(b.submit("c1", 3, True, True))  # no free slot
            await asyncio.sleep(0.05)
            assert not c.done()
            await b.submit("a2", 1, False, True)  # A ends: C takes its slot
            assert await asyncio.wait_for(c, 2) == "c1"
            assert [i for i, es in batches if any(e.item == "c1" for e in es)] == [inst_a]
            for _ in range(3):
                await b.submit("b", 2, False, False)
            assert {i for i, es in batches if any(e.corrid == 2 for e in es)} == {b.slot_of(2)[0]}
        finally:
            await b.stop()

    asyncio.run(main())


def test_idle_release_and_oldest_strategy():
    async def main():
        batches, execute = _recorder()
        b = SequenceBatcher(SequenceBatcherConfig(idle_timeout_s=0.05), execute)
        b.start()
        try:
            await b.submit("x", 9, True, False)
            await asyncio.sleep(0.2)
            assert b.released_idle == 1 and b.active_sequences == 0
            with pytest.raises(SequenceNotStartedError):
                await b.submit("y", 9, False, False)
        finally:
            await b.stop()

        batches, execute = _recorder()
        cfg = SequenceBatcherConfig(slots_per_instance=4, oldest=True, max_batch_size=2)
        b = SequenceBatcher(cfg, execute)
        b.start()
        try:
            await asyncio.gather(*(b.submit(f"s{i}", i, True, False) for i in range(1, 4)))
            sizes = [[e.item for e in es] for _, es in batches]
            assert sizes == [["s1", "s2"], ["s3"]]  # oldest first, no null entries
        finally:
            await b.stop()

    asyncio.run(main())


def test_concurrent_sequences_batch_in_slots(server):
    """Four sequences at once on one instance with 4 slots: batches mix sequences (and null
    requests for slots without a request); every sum stays right."""
    from concurrent.futures import ThreadPoolExecutor

    def one(sid):
        c = _client(server, "http")
        return [
            _step(c, "http", "acc_direct", sid, sid, start=i == 0, end=i == 4)[0] for i in range(5)
        ]

    with ThreadPoolExecutor(4) as pool:
        results = list(pool.map(one, [501, 502, 503, 504]))
    for sid, sums in zip([501, 502, 503, 504], results):
        assert sums == [sid * (i + 1) for i in range(5)]


def test_direct_minimum_slot_utilization():
    """model_config.proto: direct's max_queue_delay_microseconds counts only with a non-zero
    minimum_slot_utilization; then a batch goes once that share of the slots has a request."""

    async def timed(b, *reqs):
        t0 = time.monotonic()
        await asyncio.gather(*(b.submit(*r) for r in reqs))
        return time.monotonic() - t0

    # the "at once" bounds are half the delay: far from it, with room for a loaded box
    async def main():
        batches, execute = _recorder()
        cfg = SequenceBatcherConfig(slots_per_instance=4, max_queue_delay_s=2.0)
        b = SequenceBatcher(cfg, execute)
        b.start()
        try:
            assert await timed(b, ("a1", "A", True, False)) < 1.0  # delay ignored
        finally:
            await b.stop()

        batches, execute = _recorder()
        cfg = SequenceBatcherConfig(
            slots_per_instance=4, max_queue_delay_s=1.2, minimum_slot_utilization=0.5
        )
        b = SequenceBatcher(cfg, execute)
        b.start()
        try:
            assert await timed(b, ("a1", "A", True, False)) >= 1.15  # 1/4 ready: waits
            # 2/4 slots with a request: at once, in one batch
            assert await timed(b, ("a2", "A", False, False), ("b1", "B", True, False)) < 0.6
            assert [e.item for e in batches[-1][1]] == ["a2", "b1"]
        finally:
            await b.stop()

    asyncio.run(main())


@pytest.mark.parametrize("preserve", [False, True])
def test_oldest_preserve_ordering(preserve):
    async def main():
        fast_ran = asyncio.Event()

        async def execute(instance, entries):
            if entries[0].item == "slow":  # finishes only after "fast" ran on the other instance
                await fast_ran.wait()
                await asyncio.sleep(0.05)
            else:
                fast_ran.set()
            return [e.item for e in entries]

        cfg = SequenceBatcherConfig(
            slots_per_instance=1, oldest=True, max_batch_size=1, preserve_ordering=preserve
        )
        b = SequenceBatcher(cfg, execute, num_instances=2)
        b.start()
        done: list[str] = []

        async def one(item, corrid):
            done.append(await b.submit(item, corrid, True, False))  # slots stay taken

        try:
            slow = asyncio.ensure_future(one("slow", 1))
            await asyncio.sleep(0.05)
            await asyncio.gather(slow, one("fast", 2))
        finally:
            await b.stop()
        return done

    assert asyncio.run(main()) == (["slow", "fast"] if preserve else ["fast", "slow"])


def test_sequence_strategy_options_reach_the_batcher():
    from modelport.repository.sequence import batcher_config

    cfg = mc.ModelConfig(name="m", max_batch_size=4)
    cfg.sequence_batching.direct.max_queue_delay_microseconds = 1000
    cfg.sequence_batching.direct.minimum_slot_utilization = 0.5
    assert batcher_config(cfg).minimum_slot_utilization == 0.5
    cfg = mc.ModelConfig(name="m", max_batch_size=4)
    cfg.sequence_batching.oldest.max_candidate_sequences = 2
    cfg.sequence_batching.oldest.preserve_ordering = True
    assert batcher_config(cfg).preserve_ordering
