"""pb_utils.load_model / unload_model / is_model_ready (Triton's python backend "Model Loading
API") and the repository load API's model file override, driven with tritonclient."""

from __future__ import annotations

import json

import numpy as np
import pytest
import tritonclient.grpc as grpcclient
import tritonclient.http as httpclient
from tritonclient.utils import InferenceServerException

from modelport.entrypoints.kserve.embedded import EmbeddedServer

# A model that runs model loading API calls given as JSON: [[op, kwargs], ...] -> results
CONTROLLER = """
import json
import numpy as np
import triton_python_backend_utils as pb_utils


class TritonPythonModel:
    def initialize(self, args):
        # the README's use: load what this model needs from initialize()
        if not pb_utils.is_model_ready("needed"):
            try:
                pb_utils.load_model("needed")
            except pb_utils.TritonModelException:
                pass  # not in explicit model control mode

    def execute(self, requests):
        out = []
        for request in requests:
            calls = json.loads(pb_utils.get_input_tensor_by_name(request, "CALLS").as_numpy()[0])
            results = []
            for op, kw in calls:
                if "files" in kw:
                    kw["files"] = {k: v.encode() for k, v in kw["files"].items()}
                try:
                    r = getattr(pb_utils, op)(**kw)
                    results.append(["ok", r])
                except pb_utils.TritonModelException as e:
                    results.append(["error", e.message()])
            data = np.array([json.dumps(results).encode()], dtype=np.object_)
            out.append(pb_utils.InferenceResponse([pb_utils.Tensor("RESULTS", data)]))
        return out
"""

CONTROLLER_CONFIG = """
name: "controller"
backend: "python"
input [ { name: "CALLS" data_type: TYPE_STRING dims: [ 1 ] } ]
output [ { name: "RESULTS" data_type: TYPE_STRING dims: [ 1 ] } ]
instance_group [{ kind: KIND_CPU }]
"""

ADD = """
import numpy as np
import triton_python_backend_utils as pb_utils


class TritonPythonModel:
    def execute(self, requests):
        return [
            pb_utils.InferenceResponse([pb_utils.Tensor(
                "Y", pb_utils.get_input_tensor_by_name(r, "X").as_numpy() + ADDEND)])
            for r in requests
        ]
"""


def add_model(addend: int) -> str:
    return ADD.replace("ADDEND", str(addend))


def add_config(name: str, extra: str = "") -> str:
    return f"""
name: "{name}"
backend: "python"
input [ {{ name: "X" data_type: TYPE_INT32 dims: [ 1 ] }} ]
output [ {{ name: "Y" data_type: TYPE_INT32 dims: [ 1 ] }} ]
instance_group [{{ kind: KIND_CPU }}]
{extra}
"""


def override_config(name: str) -> str:
    return json.dumps(
        {
            "name": name,
            "backend": "python",
            "input": [{"name": "X", "data_type": "TYPE_INT32", "dims": [1]}],
            "output": [{"name": "Y", "data_type": "TYPE_INT32", "dims": [1]}],
            "instance_group": [{"kind": "KIND_CPU"}],
        }
    )


def _write(repo, name, config, files):
    d = repo / name
    d.mkdir(parents=True)
    (d / "config.pbtxt").write_text(config)
    for path, text in files.items():
        (d / path).parent.mkdir(parents=True, exist_ok=True)
        (d / path).write_text(text)


def _repo(root):
    repo = root / "models"
    _write(repo, "controller", CONTROLLER_CONFIG, {"1/model.py": CONTROLLER})
    _write(repo, "needed", add_config("needed"), {"1/model.py": add_model(1)})
    _write(
        repo,
        "target",
        add_config("target"),
        {"1/model.py": add_model(10), "2/model.py": add_model(20)},
    )
    return repo


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    repo = _repo(tmp_path_factory.mktemp("mctl"))
    srv = EmbeddedServer([repo], control_mode="explicit", load_models=["controller"]).start()
    yield srv
    srv.stop()


def run(server, calls, client=None):
    c = client or httpclient.InferenceServerClient(server.http_url)
    mod = grpcclient if isinstance(c, grpcclient.InferenceServerClient) else httpclient
    t = mod.InferInput("CALLS", [1], "BYTES")
    t.set_data_from_numpy(np.array([json.dumps(calls).encode()], dtype=np.object_))
    return json.loads(c.infer("controller", [t]).as_numpy("RESULTS")[0])


def add(server, model, x, version="", grpc=False):
    c = (grpcclient if grpc else httpclient).InferenceServerClient(
        server.grpc_url if grpc else server.http_url
    )
    mod = grpcclient if grpc else httpclient
    t = mod.InferInput("X", [1], "INT32")
    t.set_data_from_numpy(np.array([x], dtype=np.int32))
    return int(c.infer(model, [t], model_version=version).as_numpy("Y")[0])


def test_load_from_initialize(server):
    h = httpclient.InferenceServerClient(server.http_url)
    assert h.is_model_ready("needed")  # controller's initialize() loaded it
    assert add(server, "needed", 1) == 2


def test_load_ready_unload(server):
    h = httpclient.InferenceServerClient(server.http_url)
    assert not h.is_model_ready("target")
    assert run(server, [["is_model_ready", {"model_name": "target"}]]) == [["ok", False]]
    got = run(
        server,
        [
            ["load_model", {"model_name": "target"}],
            ["is_model_ready", {"model_name": "target"}],
            ["is_model_ready", {"model_name": "target", "model_version": "2"}],
            ["is_model_ready", {"model_name": "target", "model_version": "1"}],
        ],
    )
    # the default version policy serves the latest version only
    assert got == [["ok", None], ["ok", True], ["ok", True], ["ok", False]]
    assert h.is_model_ready("target") and add(server, "target", 1, grpc=True) == 21
    got = run(
        server,
        [["unload_model", {"model_name": "target"}], ["is_model_ready", {"model_name": "target"}]],
    )
    assert got == [["ok", None], ["ok", False]]
    assert not h.is_model_ready("target")
    # as in Triton, unload_model() returns before the instances have finished unloading
    rows = {r["name"]: r for r in h.get_model_repository_index()}
    assert rows["target"]["state"] in ("UNLOADING", "UNAVAILABLE")


def test_load_with_config_override(server):
    h = httpclient.InferenceServerClient(server.http_url)
    config = json.dumps(
        {
            "backend": "python",
            "version_policy": {"specific": {"versions": [1, 2]}},
            "input": [{"name": "X", "data_type": "TYPE_INT32", "dims": [1]}],
            "output": [{"name": "Y", "data_type": "TYPE_INT32", "dims": [1]}],
            "instance_group": [{"kind": "KIND_CPU"}],
        }
    )
    got = run(
        server,
        [
            ["load_model", {"model_name": "target", "config": config}],
            ["is_model_ready", {"model_name": "target", "model_version": "1"}],
            ["is_model_ready", {"model_name": "target", "model_version": "2"}],
            # a broken config fails; the versions loaded before keep serving
            ["load_model", {"model_name": "target", "config": '"parameters": {{'}],
            ["is_model_ready", {"model_name": "target", "model_version": "1"}],
        ],
    )
    assert got[:3] == [["ok", None], ["ok", True], ["ok", True]]
    assert got[3][0] == "error" and got[3][1].startswith("Failed to load model: ")
    assert got[4] == ["ok", True]
    assert add(server, "target", 1, "1") == 11 and add(server, "target", 1, "2") == 21
    run(server, [["unload_model", {"model_name": "target"}]])
    assert not h.is_model_ready("target")


def test_load_from_override_files(server):
    h = httpclient.InferenceServerClient(server.http_url)
    files = {"file:1/model.py": add_model(100)}
    got = run(
        server,
        [
            [
                "load_model",
                {"model_name": "fresh", "config": override_config("fresh"), "files": files},
            ],
            ["is_model_ready", {"model_name": "fresh"}],
        ],
    )
    assert got == [["ok", None], ["ok", True]]
    assert add(server, "fresh", 5) == 105 and add(server, "fresh", 6, grpc=True) == 106
    # an override of a model of the repository replaces its files for this load only
    got = run(
        server,
        [
            [
                "load_model",
                {"model_name": "target", "config": override_config("target"), "files": files},
            ],
        ],
    )
    assert got == [["ok", None]] and add(server, "target", 1) == 101
    run(server, [["load_model", {"model_name": "target"}]])  # back to the repository's
    assert add(server, "target", 1) == 21
    run(
        server,
        [["unload_model", {"model_name": "fresh"}], ["unload_model", {"model_name": "target"}]],
    )
    assert not h.is_model_ready("fresh")


def test_repository_api_loads_override_files(server):
    for client in (
        httpclient.InferenceServerClient(server.http_url),
        grpcclient.InferenceServerClient(server.grpc_url),
    ):
        client.load_model(
            "viaapi",
            config=override_config("viaapi"),
            files={"file:1/model.py": add_model(7).encode()},
        )
        assert client.is_model_ready("viaapi")
        assert add(server, "viaapi", 1) == 8
        client.unload_model("viaapi")
        assert not client.is_model_ready("viaapi")
        with pytest.raises(InferenceServerException, match="'config' must be specified"):
            client.load_model("viaapi", files={"file:1/model.py": b"x"})


def test_errors_in_tritons_words(server):
    got = run(
        server,
        [
            ["load_model", {"model_name": "fresh2", "files": {"file:1/model.py": "x"}}],
            [
                "load_model",
                {
                    "model_name": "fresh2",
                    "config": override_config("fresh2"),
                    "files": {"file:../../escape.py": "x"},
                },
            ],
            ["load_model", {"model_name": "not_there"}],
            ["is_model_ready", {"model_name": "target", "model_version": "abc"}],
            ["is_model_ready", {"model_name": "target", "model_version": "-1"}],
            ["is_model_ready", {"model_name": "not_there"}],
            ["unload_model", {"model_name": "not_there"}],
        ],
    )
    assert got[0] == [
        "error",
        "Failed to load model: Load parameter 'config' must be specified for model file "
        "override",
    ]
    assert got[1][0] == "error"
    assert got[1][1].startswith("Failed to load model: Invalid file parameter 'file:../../esc")
    assert got[1][1].endswith("must stay within model directory.")
    assert got[2] == ["error", "Failed to load model: failed to load 'not_there', no version is available"]
    assert got[3][0] == "error" and got[3][1].startswith(
        "Failed to check model readiness: failed to get model version from specified version "
        "string 'abc'"
    )
    assert got[4] == [
        "error",
        "Failed to check model readiness: failed to get model version from specified version "
        "string '-1', version should be an integral value > 0",
    ]
    assert got[5] == ["ok", False]
    assert got[6][0] == "error" and got[6][1].startswith("Failed to unload model: ")


def test_only_in_explicit_mode(tmp_path):
    repo = _repo(tmp_path)
    with EmbeddedServer([repo], control_mode="none") as srv:
        got = run(
            srv,
            [
                ["is_model_ready", {"model_name": "target"}],
                ["unload_model", {"model_name": "target"}],
                ["load_model", {"model_name": "target"}],
            ],
            client=grpcclient.InferenceServerClient(srv.grpc_url),
        )
    assert got[0] == ["ok", True]
    for (status, message), verb in zip(got[1:], ("unload", "load")):
        assert status == "error"
        assert message.startswith(
            f"Failed to {verb} model: explicit model load / unload is not allowed if polling "
            "is enabled"
        )
