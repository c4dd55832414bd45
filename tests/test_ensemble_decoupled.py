"""Ensembles with a decoupled step, as Triton serves them (23.x on).

Each response of the decoupled step runs the steps after it with that response's tensors (and
the tensors made before it, such as ensemble inputs), and each complete set of the ensemble's
outputs is one response to the client: the ensemble is decoupled itself, so clients stream
(gRPC ModelStreamInfer, generate_stream) and unary infer gets Triton's decoupled error.

One server for the module: the fixture ensemble `repeat_double` (repeat_decoupled, then
double_int32) from tests/fixtures/repositories/main, and small models and ensembles written
here for joins, failures, empty responses, nesting and response order.
"""

from __future__ import annotations

import asyncio
import json
import shutil
import textwrap
import time
import urllib.request
from pathlib import Path

import numpy as np
import pytest
import tritonclient.grpc as grpcclient
import tritonclient.http as httpclient
from tritonclient.utils import InferenceServerException

from modelport.entrypoints.kserve.embedded import EmbeddedServer
from modelport.repository.errors import Unsupported
from modelport.repository.manager import RepositoryManager
from modelport.repository.tensors import InferRequest, InferTensor

MAIN = Path(__file__).parent / "fixtures" / "repositories" / "main"


def _config(name: str, inputs: list[str], outputs: list[str], extra: str = "") -> str:
    def io(names: list[str]) -> str:
        return ", ".join(f'{{ name: "{n}" data_type: TYPE_INT32 dims: [ 1 ] }}' for n in names)

    return (
        f'name: "{name}"\nbackend: "python"\nmax_batch_size: 0\n'
        f"input [{io(inputs)}]\noutput [{io(outputs)}]\n{extra}"
    )


# SUM = A + B
ADD_MODEL = """
import triton_python_backend_utils as pb_utils


class TritonPythonModel:
    def execute(self, requests):
        out = []
        for r in requests:
            a = pb_utils.get_input_tensor_by_name(r, "A").as_numpy()
            b = pb_utils.get_input_tensor_by_name(r, "B").as_numpy()
            out.append(pb_utils.InferenceResponse([pb_utils.Tensor("SUM", a + b)]))
        return out
"""

# OUT = 2 * IN; IN == 2 answers an INVALID_ARG error
FAIL_ON_TWO_MODEL = """
import triton_python_backend_utils as pb_utils


class TritonPythonModel:
    def execute(self, requests):
        out = []
        for r in requests:
            x = pb_utils.get_input_tensor_by_name(r, "IN").as_numpy()
            if int(x[0]) == 2:
                error = pb_utils.TritonError("IN must not be 2", pb_utils.TritonError.INVALID_ARG)
                out.append(pb_utils.InferenceResponse(error=error))
            else:
                out.append(pb_utils.InferenceResponse([pb_utils.Tensor("OUT", x * 2)]))
        return out
"""

# decoupled: for COUNT >= 0, OUT = i then a response without outputs, for i < COUNT, then the
# final flag alone; for COUNT < 0, OUT = 0 then an error response (with the final flag)
GAPPY_MODEL = """
import threading

import numpy as np
import triton_python_backend_utils as pb_utils


class TritonPythonModel:
    def execute(self, requests):
        for r in requests:
            count = int(pb_utils.get_input_tensor_by_name(r, "COUNT").as_numpy()[0])
            threading.Thread(target=self._send, args=(r.get_response_sender(), count)).start()
        return None

    def _send(self, sender, count):
        def value(i):
            return pb_utils.InferenceResponse([pb_utils.Tensor("OUT", np.array([i], np.int32))])

        if count < 0:
            sender.send(value(0))
            error = pb_utils.TritonError("ran dry", pb_utils.TritonError.UNAVAILABLE)
            sender.send(
                pb_utils.InferenceResponse(error=error),
                flags=pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL,
            )
            return
        for i in range(count):
            sender.send(value(i))
            sender.send(pb_utils.InferenceResponse([]))
        sender.send(flags=pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL)
"""

# OUT = 2 * IN, IN == 0 only after a while (two instances: later values overtake it)
SLOW_ZERO_MODEL = """
import time

import triton_python_backend_utils as pb_utils


class TritonPythonModel:
    def execute(self, requests):
        out = []
        for r in requests:
            x = pb_utils.get_input_tensor_by_name(r, "IN").as_numpy()
            if int(x[0]) == 0:
                time.sleep(0.5)
            out.append(pb_utils.InferenceResponse([pb_utils.Tensor("OUT", x * 2)]))
        return out
"""

# decoupled: OUT = 0, then a second later OUT = 1, then the final flag
DRIP_MODEL = """
import threading
import time

import numpy as np
import triton_python_backend_utils as pb_utils


class TritonPythonModel:
    def execute(self, requests):
        for r in requests:
            threading.Thread(target=self._send, args=(r.get_response_sender(),)).start()
        return None

    def _send(self, sender):
        for i in range(2):
            if i:
                time.sleep(1.0)
            sender.send(pb_utils.InferenceResponse([pb_utils.Tensor("OUT", np.array([i], np.int32))]))
        sender.send(flags=pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL)
"""


def _ensemble(name: str, inputs: list[str], outputs: list[str], steps: list[tuple]) -> str:
    """steps: (model, {model input: tensor}, {model output: tensor})."""
    io = lambda names: ", ".join(  # noqa: E731
        f'{{ name: "{n}" data_type: TYPE_INT32 dims: [ 1 ] }}' for n in names
    )
    body = []
    for model, ins, outs in steps:
        maps = " ".join(f'input_map {{ key: "{k}" value: "{v}" }}' for k, v in ins.items())
        maps += " " + " ".join(f'output_map {{ key: "{k}" value: "{v}" }}' for k, v in outs.items())
        body.append(f'{{ model_name: "{model}" model_version: -1 {maps} }}')
    return (
        f'name: "{name}"\nplatform: "ensemble"\nmax_batch_size: 0\n'
        f"input [{io(inputs)}]\noutput [{io(outputs)}]\n"
        f"ensemble_scheduling {{ step [ {', '.join(body)} ] }}\n"
    )


ENSEMBLES = {
    # each response joins the ensemble input OFFSET: SUM = i + OFFSET
    "repeat_offset": (
        ["COUNT", "OFFSET"],
        ["SUM"],
        [
            ("repeat_decoupled", {"COUNT": "COUNT"}, {"OUT": "v"}),
            ("add_int32", {"A": "v", "B": "OFFSET"}, {"SUM": "SUM"}),
        ],
    ),
    # fan out and join again: SUM = i + 2 i, pairing tensors of the same response only
    "repeat_join": (
        ["COUNT"],
        ["SUM"],
        [
            ("repeat_decoupled", {"COUNT": "COUNT"}, {"OUT": "v"}),
            ("double_int32", {"IN": "v"}, {"OUT": "twice"}),
            ("add_int32", {"A": "v", "B": "twice"}, {"SUM": "SUM"}),
        ],
    ),
    "repeat_fail": (
        ["COUNT"],
        ["OUT"],
        [
            ("repeat_decoupled", {"COUNT": "COUNT"}, {"OUT": "v"}),
            ("fail_on_two", {"IN": "v"}, {"OUT": "OUT"}),
        ],
    ),
    "gappy_double": (
        ["COUNT"],
        ["OUT"],
        [
            ("gappy", {"COUNT": "COUNT"}, {"OUT": "v"}),
            ("double_int32", {"IN": "v"}, {"OUT": "OUT"}),
        ],
    ),
    # a decoupled ensemble as a step makes this one decoupled too: QUAD = 4 i
    "nested_repeat": (
        ["COUNT"],
        ["QUAD"],
        [
            ("repeat_double", {"COUNT": "COUNT"}, {"DOUBLED": "d"}),
            ("double_int32", {"IN": "d"}, {"OUT": "QUAD"}),
        ],
    ),
    "drip_double": (
        ["COUNT"],
        ["OUT"],
        [
            ("drip", {"COUNT": "COUNT"}, {"OUT": "v"}),
            ("double_int32", {"IN": "v"}, {"OUT": "OUT"}),
        ],
    ),
    "repeat_slow_zero": (
        ["COUNT"],
        ["OUT"],
        [
            ("repeat_decoupled", {"COUNT": "COUNT"}, {"OUT": "v"}),
            ("slow_zero", {"IN": "v"}, {"OUT": "OUT"}),
        ],
    ),
    # two decoupled steps side by side, joined: their responses have no pairing (refused)
    "side_by_side": (
        ["COUNT"],
        ["SUM"],
        [
            ("repeat_decoupled", {"COUNT": "COUNT"}, {"OUT": "a"}),
            ("gappy", {"COUNT": "COUNT"}, {"OUT": "b"}),
            ("add_int32", {"A": "a", "B": "b"}, {"SUM": "SUM"}),
        ],
    ),
    # no decoupled step: served as before (one response, unary infer)
    "double_twice": (
        ["IN"],
        ["OUT"],
        [
            ("double_int32", {"IN": "IN"}, {"OUT": "mid"}),
            ("double_int32", {"IN": "mid"}, {"OUT": "OUT"}),
        ],
    ),
}


def _python_model(repo: Path, name: str, config: str, code: str) -> None:
    (repo / name / "1").mkdir(parents=True)
    (repo / name / "config.pbtxt").write_text(config)
    (repo / name / "1" / "model.py").write_text(textwrap.dedent(code))


def _build_repo(repo: Path, ensembles: dict = ENSEMBLES) -> Path:
    repo.mkdir(parents=True)
    for name in ("repeat_decoupled", "double_int32", "repeat_double"):
        shutil.copytree(MAIN / name, repo / name)
    _python_model(repo, "add_int32", _config("add_int32", ["A", "B"], ["SUM"]), ADD_MODEL)
    _python_model(repo, "fail_on_two", _config("fail_on_two", ["IN"], ["OUT"]), FAIL_ON_TWO_MODEL)
    decoupled = "model_transaction_policy { decoupled: true }\n"
    _python_model(repo, "gappy", _config("gappy", ["COUNT"], ["OUT"], decoupled), GAPPY_MODEL)
    _python_model(repo, "drip", _config("drip", ["COUNT"], ["OUT"], decoupled), DRIP_MODEL)
    two = "instance_group [{ count: 2 kind: KIND_CPU }]\n"
    _python_model(repo, "slow_zero", _config("slow_zero", ["IN"], ["OUT"], two), SLOW_ZERO_MODEL)
    for name, (ins, outs, steps) in ensembles.items():
        (repo / name).mkdir()
        (repo / name / "config.pbtxt").write_text(_ensemble(name, ins, outs, steps))
    return repo


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    repo = _build_repo(tmp_path_factory.mktemp("ens_decoupled") / "models")
    # side_by_side fails to load on purpose
    srv = EmbeddedServer([repo], exit_on_error=False, strict_readiness=False).start()
    yield srv
    srv.stop()


def grpc_stream(server, model: str, **inputs: int) -> list:
    """Stream one request; the results (InferResult or InferenceServerException) in order."""
    results: list = []
    c = grpcclient.InferenceServerClient(server.grpc_url)
    c.start_stream(callback=lambda result, error: results.append(error or result))
    try:
        tensors = []
        for name, value in inputs.items():
            t = grpcclient.InferInput(name, [1], "INT32")
            t.set_data_from_numpy(np.array([value], dtype=np.int32))
            tensors.append(t)
        c.async_stream_infer(model, tensors, enable_empty_final_response=True)
    finally:
        c.stop_stream()  # waits for the stream to finish
    return results


def values(results: list, output: str) -> list[int]:
    outs = [r.as_numpy(output) for r in results if not isinstance(r, Exception)]
    return [int(o[0]) for o in outs if o is not None]


def errors(results: list) -> list[str]:
    return [r.message() for r in results if isinstance(r, InferenceServerException)]


def generate_stream(server, model: str, **inputs: int) -> list[dict]:
    req = urllib.request.Request(
        f"http://{server.http_url}/v2/models/{model}/generate_stream",
        data=json.dumps(inputs).encode(),
        method="POST",
    )
    return [
        json.loads(line[len("data: ") :])
        for line in urllib.request.urlopen(req).read().decode().splitlines()
        if line.startswith("data: ")
    ]


def test_fixture_ensemble_streams_one_response_per_decoupled_response(server):
    results = grpc_stream(server, "repeat_double", COUNT=4)
    assert not errors(results)
    assert values(results, "DOUBLED") == [0, 2, 4, 6]
    finals = [r.get_response().parameters["triton_final_response"].bool_param for r in results]
    assert finals == [False] * 4 + [True]  # the empty final response closes the stream
    assert results[-1].as_numpy("DOUBLED") is None


def test_fixture_ensemble_over_generate_stream(server):
    assert [e["DOUBLED"] for e in generate_stream(server, "repeat_double", COUNT=3)] == [0, 2, 4]


@pytest.mark.parametrize(
    "protocol,words",
    [
        ("http", "HTTP end point doesn't support models with decoupled transaction policy"),
        ("grpc", "ModelInfer RPC doesn't support models with decoupled transaction policy"),
    ],
)
def test_unary_infer_of_a_decoupled_ensemble_is_refused(server, protocol, words):
    m = httpclient if protocol == "http" else grpcclient
    url = server.http_url if protocol == "http" else server.grpc_url
    t = m.InferInput("COUNT", [1], "INT32")
    t.set_data_from_numpy(np.array([2], dtype=np.int32))
    for model in ("repeat_double", "nested_repeat"):
        with pytest.raises(InferenceServerException) as info:
            m.InferenceServerClient(url).infer(model, [t])
        assert info.value.message() == words


def test_each_response_joins_the_ensemble_inputs(server):
    results = grpc_stream(server, "repeat_offset", COUNT=3, OFFSET=10)
    assert not errors(results)
    assert values(results, "SUM") == [10, 11, 12]


def test_fan_out_and_join_pairs_tensors_of_the_same_response(server):
    results = grpc_stream(server, "repeat_join", COUNT=5)
    assert not errors(results)
    assert values(results, "SUM") == [0, 3, 6, 9, 12]


def test_a_failing_step_ends_the_stream_with_its_error(server):
    results = grpc_stream(server, "repeat_fail", COUNT=5)
    assert values(results, "OUT") == [0, 2]  # responses 0 and 1; response 2 fails the step
    assert errors(results) == ["in ensemble 'repeat_fail', IN must not be 2"]
    assert isinstance(results[-1], InferenceServerException)  # nothing after the error
    events = generate_stream(server, "repeat_fail", COUNT=5)
    assert [e.get("OUT") for e in events] == [0, 2, None]
    assert events[-1] == {"error": "in ensemble 'repeat_fail', IN must not be 2"}


def test_an_error_of_the_decoupled_step_reaches_the_client(server):
    results = grpc_stream(server, "gappy_double", COUNT=-1)
    assert values(results, "OUT") == [0]
    assert errors(results) == ["in ensemble 'gappy_double', ran dry"]


def test_responses_without_outputs_run_nothing(server):
    results = grpc_stream(server, "gappy_double", COUNT=3)
    assert not errors(results)
    assert values(results, "OUT") == [0, 2, 4]
    assert len(results) == 4  # three responses and the empty final one
    results = grpc_stream(server, "gappy_double", COUNT=0)  # no response at all: not an error
    assert not errors(results) and values(results, "OUT") == [] and len(results) == 1


def test_a_nested_decoupled_ensemble_makes_its_ensemble_decoupled(server):
    results = grpc_stream(server, "nested_repeat", COUNT=3)
    assert not errors(results)
    assert values(results, "QUAD") == [0, 4, 8]


def test_responses_keep_the_order_of_the_decoupled_steps_responses(server):
    # slow_zero has two instances and holds value 0 back: 1 and 2 finish first, yet the
    # client gets the responses in the order the decoupled step sent them
    results = grpc_stream(server, "repeat_slow_zero", COUNT=3)
    assert not errors(results)
    assert values(results, "OUT") == [0, 2, 4]


def test_a_response_goes_out_while_the_decoupled_step_still_runs(server):
    req = urllib.request.Request(
        f"http://{server.http_url}/v2/models/drip_double/generate_stream",
        data=json.dumps({"COUNT": 1}).encode(),
        method="POST",
    )
    seen = []
    with urllib.request.urlopen(req) as resp:
        for line in resp:
            if line.startswith(b"data: "):
                seen.append((time.monotonic(), json.loads(line[len(b"data: ") :])["OUT"]))
    assert [v for _, v in seen] == [0, 2]
    assert seen[1][0] - seen[0][0] > 0.5  # the first one did not wait for the second


def test_side_by_side_decoupled_steps_are_refused_at_load(server):
    c = httpclient.InferenceServerClient(server.http_url)
    index = {r["name"]: r for r in c.get_model_repository_index()}
    assert index["side_by_side"]["state"] == "UNAVAILABLE"
    assert (
        "step 2 (model 'add_int32') combines the responses of decoupled steps 0 "
        "('repeat_decoupled') and 1 ('gappy'), which run side by side"
    ) in index["side_by_side"]["reason"]


@pytest.mark.parametrize("protocol", ["http", "grpc"])
def test_metadata_config_and_statistics_of_a_decoupled_ensemble(server, protocol):
    m = httpclient if protocol == "http" else grpcclient
    c = m.InferenceServerClient(server.http_url if protocol == "http" else server.grpc_url)
    assert c.is_model_ready("repeat_double")
    if protocol == "http":
        meta = c.get_model_metadata("repeat_double")
        assert meta["platform"] == "ensemble"
        assert [i["name"] for i in meta["inputs"]] == ["COUNT"]
        cfg = c.get_model_config("repeat_double")
        assert [s["model_name"] for s in cfg["ensemble_scheduling"]["step"]] == [
            "repeat_decoupled",
            "double_int32",
        ]
        before = c.get_inference_statistics("repeat_double")["model_stats"][0]
        count = lambda s: int(s["inference_stats"]["success"].get("count", 0))  # noqa: E731
    else:
        meta = c.get_model_metadata("repeat_double")
        assert meta.platform == "ensemble" and [i.name for i in meta.inputs] == ["COUNT"]
        cfg = c.get_model_config("repeat_double").config
        assert [s.model_name for s in cfg.ensemble_scheduling.step] == [
            "repeat_decoupled",
            "double_int32",
        ]
        before = c.get_inference_statistics("repeat_double").model_stats[0]
        count = lambda s: s.inference_stats.success.count  # noqa: E731
    grpc_stream(server, "repeat_double", COUNT=2)
    if protocol == "http":
        after = c.get_inference_statistics("repeat_double")["model_stats"][0]
    else:
        after = c.get_inference_statistics("repeat_double").model_stats[0]
    assert count(after) == count(before) + 1  # one request, however many responses


def test_plain_ensemble_next_to_them_is_unchanged(server):
    c = httpclient.InferenceServerClient(server.http_url)
    t = httpclient.InferInput("IN", [1], "INT32")
    t.set_data_from_numpy(np.array([3], dtype=np.int32))
    assert int(c.infer("double_twice", [t]).as_numpy("OUT")[0]) == 12
    results = grpc_stream(server, "double_twice", IN=5)  # one response, final on it
    assert values(results, "OUT") == [20] and not errors(results)


def test_manager_serves_the_ensemble_as_decoupled(tmp_path):
    """The repository manager itself: infer() refuses with the decoupled models' words,
    stream() yields the responses; a plain ensemble stays unary."""
    repo = _build_repo(
        tmp_path / "models", {k: v for k, v in ENSEMBLES.items() if k == "double_twice"}
    )
    for name in ("add_int32", "fail_on_two", "gappy", "slow_zero"):
        shutil.rmtree(repo / name)

    async def main():
        manager = RepositoryManager([repo], gpus=0)
        await manager.start()
        try:
            count = {"COUNT": InferTensor("COUNT", "INT32", np.array([3], dtype=np.int32))}
            ens = manager.get("repeat_double")
            assert ens.decoupled and not manager.get("double_twice").decoupled
            with pytest.raises(
                Unsupported, match="uses the decoupled transaction policy: use streaming"
            ):
                await manager.infer(InferRequest("repeat_double", inputs=count))
            got = [
                r
                async for r in manager.stream(InferRequest("repeat_double", inputs=count, id="r7"))
            ]
            assert [int(r.outputs["DOUBLED"].data[0]) for r in got] == [0, 2, 4]
            assert {r.id for r in got} == {"r7"} and {r.model_name for r in got} == {
                "repeat_double"
            }
            # a client that stops reading early: the rest of the request is dropped cleanly
            stream = manager.stream(InferRequest("repeat_double", inputs=count))
            first = await anext(stream)
            assert int(first.outputs["DOUBLED"].data[0]) == 0
            await stream.aclose()
            plain = {"IN": InferTensor("IN", "INT32", np.array([1], dtype=np.int32))}
            resp = await manager.infer(InferRequest("double_twice", inputs=plain))
            assert int(resp.outputs["OUT"].data[0]) == 4
            assert ens.stats.pending == 0
        finally:
            await manager.stop()

    asyncio.run(main())
