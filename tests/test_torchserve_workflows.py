"""TorchServe workflows end to end: .war archives built with `modelport workflow-archive`,
registered at startup (--workflows) and over the management API, run through /wfpredict.

One server process for the module. Model nodes are real .mar archives (torch-model-archiver)
of a tiny function handler; function nodes are the workflow handler's functions. Every node
runs in its own worker process, as in TorchServe.
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import httpx
import pytest

from helpers.server_proc import free_port as _free_port
from modelport.entrypoints.cli import main as cli_main

sys.path.insert(0, str(Path(__file__).parent / "fixtures" / "torchserve"))
import ts_archives  # noqa: E402

MODEL_HANDLER = """
import json
import os
import time


def _meet(folder, kind):
    # mark this node running, then wait (at most 20 s) until both fan branches are running
    open(os.path.join(folder, kind), "w").close()
    deadline = time.monotonic() + 20
    while not all(os.path.exists(os.path.join(folder, k)) for k in ("add10", "times2")):
        if time.monotonic() > deadline:
            raise RuntimeError(f"{kind} ran alone: the other branch never started")
        time.sleep(0.005)


def handle(data, context):
    if data is None:  # TorchServe's initialization call of a function entry point
        return None
    kind = context.manifest["model"]["modelName"]
    out = []
    for row in data:
        v = row.get("body")
        if isinstance(v, (bytes, bytearray)):  # workflow nodes get the last node's bytes
            v = json.loads(v)
        if v.get("fail") == kind:
            raise ValueError(f"{kind} was asked to fail")
        time.sleep(v.get("sleep", 0))
        if v.get("meet"):
            _meet(v["meet"], kind)
        x = v["x"] + 10 if kind == "add10" else v["x"] * 2
        out.append({**v, "x": x, "path": v.get("path", []) + [kind]})
    return out
"""

WORKFLOW_HANDLER = """
import json


def _load(v):
    return json.loads(v) if isinstance(v, (bytes, bytearray)) else v


def pre(data, context):
    if data is None:
        return None
    out = []
    for row in data:
        body = _load(row["body"])  # the request's JSON body, decoded as for a model
        out.append({**body, "x": body["x"] + 1, "path": ["pre"]})
    return out


def post(data, context):
    if data is None:
        return None
    return [
        {"result": _load(r["body"])["x"], "path": _load(r["body"])["path"] + ["post"],
         "keys": sorted(r), "raw_bytes": isinstance(r["body"], (bytes, bytearray))}
        for r in data
    ]


def agg(data, context):
    if data is None:
        return None
    return [
        {"sum": sum(_load(v)["x"] for v in r.values()), "keys": sorted(r)} for r in data
    ]
"""

SEQ_SPEC = """
models:
  min-workers: 1
  max-workers: 1
  add10:
    url: add10.mar
dag:
  pre: [add10]
  add10: [post]
"""

FAN_SPEC = """
models:
  min-workers: 1
  max-workers: 1
  batch-size: 2
  max-batch-delay: 10
  retry-attempts: 0
  add10:
    url: add10.mar
    batch-size: 3
  times2:
    url: times2.mar
dag:
  pre: [add10, times2]
  add10: [agg]
  times2: [agg]
"""

BAD_SPECS = {
    # a cycle behind the start node
    "cycle": "models:\n  add10: {url: add10.mar}\n  times2: {url: times2.mar}\n"
    "dag:\n  pre: [add10]\n  add10: [times2]\n  times2: [add10]\n",
    "twostarts": "models:\n  add10: {url: add10.mar}\ndag:\n  pre: [add10]\n  post: [add10]\n",
    "nofunc": "models:\n  add10: {url: add10.mar}\ndag:\n  add10: [missing_function]\n",
    "nourl": "models:\n  add10: {batch-size: 2}\ndag:\n  pre: [add10]\n",
    "ghost": "models:\n  ghost: {url: ghost.mar}\ndag:\n  pre: [ghost]\n",
}


def _war(src: Path, out: Path, name: str, spec: str, *extra: str) -> Path:
    spec_file = src / f"{name}.yaml"
    spec_file.write_text(spec)
    argv = [
        "workflow-archive", "--workflow-name", name, "--spec-file", str(spec_file),
        "--handler", str(src / "wf_handler.py"), "--export-path", str(out), *extra,
    ]  # fmt: skip
    assert cli_main(argv) == 0
    return out / f"{name}.war"


class Server:
    def __init__(self, port: int, mport: int) -> None:
        self.port, self.mport = port, mport

    def mgmt(self, method: str, path: str) -> httpx.Response:
        return httpx.request(method, f"http://127.0.0.1:{self.mport}{path}", timeout=120)

    def wfpredict(self, name: str, doc: object) -> httpx.Response:
        return httpx.post(f"http://127.0.0.1:{self.port}/wfpredict/{name}", json=doc, timeout=60)


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    root = tmp_path_factory.mktemp("ts_workflows")
    store, wf_store, src = root / "model_store", root / "wf_store", root / "src"
    for d in (wf_store, src):
        d.mkdir()
    (src / "arith.py").write_text(MODEL_HANDLER)
    (src / "wf_handler.py").write_text(WORKFLOW_HANDLER)
    for name in ("add10", "times2"):
        ts_archives.archive(store, name, src / "arith.py")
    _war(src, wf_store, "seq", SEQ_SPEC)
    _war(src, wf_store, "fan", FAN_SPEC)
    for name, spec in BAD_SPECS.items():
        _war(src, wf_store, name, spec)
    s = Server(_free_port(), _free_port())
    cmd = [
        sys.executable, "-m", "modelport", "serve", "--port", str(s.port),
        "--log-level", "warning", "--model-store", str(store),
        "--workflow-store", str(wf_store), "--workflows", "seq.war",
        "--management-port", str(s.mport), "--disable-token-auth",
    ]  # fmt: skip
    log = open(root / "server.log", "wb")  # noqa: SIM115
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, cwd=root)
    deadline = time.monotonic() + 90
    while True:
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            raise RuntimeError("server did not start:\n" + (root / "server.log").read_text())
        try:  # the listeners start one after the other: wait for the shared port too
            if (
                httpx.get(f"http://127.0.0.1:{s.mport}/workflows", timeout=2).status_code == 200
                and httpx.get(f"http://127.0.0.1:{s.port}/ping", timeout=2).status_code == 200
            ):
                break
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    yield s
    proc.send_signal(signal.SIGINT)
    try:
        proc.wait(30)
    except subprocess.TimeoutExpired:
        proc.kill()
    log.close()


def test_workflow_archive_matches_torch_workflow_archiver(tmp_path):
    (tmp_path / "wf_handler.py").write_text(WORKFLOW_HANDLER)
    (tmp_path / "labels.txt").write_text("a\nb\n")
    war = _war(tmp_path, tmp_path, "seq", SEQ_SPEC, "--extra-files", str(tmp_path / "labels.txt"))
    with zipfile.ZipFile(war) as z:
        assert sorted(z.namelist()) == [
            "WAR-INF/MANIFEST.json", "labels.txt", "seq.yaml", "wf_handler.py",
        ]  # fmt: skip
        manifest = json.loads(z.read("WAR-INF/MANIFEST.json"))
    assert manifest["workflow"] == {
        "workflowName": "seq",
        "specFile": "seq.yaml",
        "handler": "wf_handler.py",
    }
    assert {"createdOn", "archiverVersion"} <= set(manifest)
    argv = ["workflow-archive", "--workflow-name", "seq", "--spec-file", str(tmp_path / "seq.yaml"),
            "--export-path", str(tmp_path)]  # fmt: skip
    assert cli_main(argv) == 1, "an existing .war needs -f"
    assert cli_main([*argv, "-f"]) == 0
    assert cli_main([*argv[:2], "bad name!", *argv[3:], "-f"]) == 1


def test_startup_workflow_runs_sequential_dag(server):
    r = server.wfpredict("seq", {"x": 1})
    assert r.status_code == 200, r.text
    assert r.headers["content-type"].startswith("application/json")
    # pre (+1) -> add10 (+10) -> post; each later node got its predecessor's bytes as "body"
    assert r.json() == {
        "result": 12,
        "path": ["pre", "add10", "post"],
        "keys": ["body"],
        "raw_bytes": True,
    }
    models = [m["modelName"] for m in server.mgmt("GET", "/models").json()["models"]]
    assert {"seq__pre", "seq__add10", "seq__post"} <= set(models)


def test_register_describe_list_and_fan_in(server, tmp_path):
    r = server.mgmt("POST", "/workflows?url=fan.war")
    assert r.status_code == 200, r.text
    assert r.json() == {"status": "Workflow fan has been registered and scaled successfully."}
    assert server.mgmt("POST", "/workflows?url=fan.war").status_code == 409

    (desc,) = server.mgmt("GET", "/workflows/fan").json()
    assert desc == {
        "workflowName": "fan",
        "workflowUrl": "fan.war",
        "minWorkers": 1,
        "maxWorkers": 1,
        "batchSize": 2,
        "maxBatchDelay": 10,
        "workflowDag": "{pre=[add10, times2], add10=[agg], times2=[agg]}",
    }
    # nodes are models named <workflow>__<node> with the spec's settings
    (add10,) = server.mgmt("GET", "/models/fan__add10").json()
    (times2,) = server.mgmt("GET", "/models/fan__times2").json()
    (agg,) = server.mgmt("GET", "/models/fan__agg").json()
    assert (add10["batchSize"], add10["maxBatchDelay"], len(add10["workers"])) == (3, 10, 1)
    assert (times2["batchSize"], times2["maxBatchDelay"]) == (2, 10)
    assert (agg["batchSize"], agg["maxBatchDelay"], len(agg["workers"])) == (1, 0, 1)

    page = server.mgmt("GET", "/workflows?limit=1").json()
    assert page == {"nextPageToken": "1", "workflows": [{"workflowName": "fan",
                                                          "workflowUrl": "fan.war"}]}  # fmt: skip
    page = server.mgmt("GET", "/workflows?limit=1&next_page_token=1").json()
    assert [w["workflowName"] for w in page["workflows"]] == ["seq"]

    # fan-in: agg gets one input per predecessor, named after it: 2+10 and 2*2
    r = server.wfpredict("fan", {"x": 1})
    assert r.status_code == 200, r.text
    assert r.json() == {"sum": 16, "keys": ["add10", "times2"]}

    # the two branches run concurrently: each waits until the other one runs too (one after
    # the other, the first would give up after 20 s and fail the request)
    r = server.wfpredict("fan", {"x": 1, "meet": str(tmp_path)})
    assert r.status_code == 200, r.text
    assert r.json() == {"sum": 16, "keys": ["add10", "times2"]}

    # a failing node fails the request: 500 in TorchServe's shape, with the node's message
    r = server.wfpredict("fan", {"x": 1, "fail": "times2"})
    assert r.status_code == 500
    err = r.json()
    assert (err["code"], err["type"]) == (500, "InternalServerException")
    assert "times2" in err["message"] and "asked to fail" in err["message"]
    assert server.wfpredict("fan", {"x": 2}).json()["sum"] == 3 + 10 + 3 * 2  # still serving

    r = server.mgmt("DELETE", "/workflows/fan")
    assert r.status_code == 200 and r.json() == {"status": 'Workflow "fan" unregistered'}
    models = [m["modelName"] for m in server.mgmt("GET", "/models").json()["models"]]
    assert not [m for m in models if m.startswith("fan__")]
    assert "seq__add10" in models
    assert server.wfpredict("fan", {"x": 1}).status_code == 404
    assert server.mgmt("DELETE", "/workflows/fan").status_code == 404


@pytest.mark.parametrize(
    ("url", "code", "type_", "words"),
    [
        ("cycle.war", 400, "InvalidDAGException", "Not a valid DAG"),
        ("twostarts.war", 400, "InvalidDAGException", "only one start node"),
        ("nofunc.war", 400, "InvalidWorkflowException", "missing_function"),
        ("nourl.war", 400, "InvalidWorkflowException", "has no url"),
        ("nothere.war", 404, "WorkflowNotFoundException", "nothere.war"),
        ("../wf_store/seq.war", 404, "WorkflowNotFoundException", "relative path"),
    ],
)
def test_register_errors(server, url, code, type_, words):
    r = server.mgmt("POST", f"/workflows?url={url}")
    assert r.status_code == code, r.text
    err = r.json()
    assert (err["code"], err["type"]) == (code, type_)
    assert words in err["message"]
    assert [w["workflowName"] for w in server.mgmt("GET", "/workflows").json()["workflows"]] == [
        "seq"
    ]


def test_failed_node_registration_rolls_back(server):
    r = server.mgmt("POST", "/workflows?url=ghost.war")
    assert r.status_code == 500, r.text
    err = r.json()
    assert err["type"] == "WorkflowException"
    assert "ghost__ghost failed to register" in err["message"]
    models = [m["modelName"] for m in server.mgmt("GET", "/models").json()["models"]]
    assert not [m for m in models if m.startswith("ghost__")], "registered nodes rolled back"
    assert server.mgmt("GET", "/workflows/ghost").status_code == 404


def test_unknown_workflow_and_missing_url(server):
    r = server.wfpredict("nope", {"x": 1})
    assert r.status_code == 404
    assert r.json() == {
        "code": 404,
        "type": "WorkflowNotFoundException",
        "message": "Workflow not found: nope",
    }
    assert server.mgmt("GET", "/workflows/nope").json()["type"] == "WorkflowNotFoundException"
    r = server.mgmt("POST", "/workflows")
    assert (r.status_code, r.json()["message"]) == (400, "Parameter url is required.")


# -- the DAG executor alone, over stand-in models (no worker processes) --


class _FakeModel:
    """Answers like ModelVersion.predict; fails its first `fail_first` calls, may sleep."""

    def __init__(self, fn, fail_first: int = 0, sleep: float = 0.0) -> None:
        self.fn, self.fail_first, self.sleep, self.calls = fn, fail_first, sleep, 0

    async def predict(self, item):
        import asyncio

        from modelport.torchserve.errors import internal
        from modelport.torchserve.messages import ItemResponse
        from modelport.torchserve.model import Outcome

        self.calls += 1
        await asyncio.sleep(self.sleep)
        if self.calls <= self.fail_first:
            return Outcome(internal(f"flaky call {self.calls}"), 0.0)
        doc = {p.name: json.loads(p.value) for p in item.params}
        return Outcome(ItemResponse(200, json.dumps(self.fn(doc)).encode()), 0.0)


class _FakeModels:
    allowed_urls = ()
    model_store = None

    def __init__(self, models: dict) -> None:
        self.models = models

    def get(self, name: str):
        return self.models[name]


def _run_dag(tmp_path, spec_yaml: str, models: dict, body: dict):
    import asyncio

    import yaml

    from modelport.torchserve.messages import InputParam, RequestItem
    from modelport.torchserve.workflow import Workflow, WorkflowRegistry
    from modelport.torchserve.workflow_archive import parse_spec

    reg = WorkflowRegistry(_FakeModels(models), None)
    spec = parse_spec(yaml.safe_load(spec_yaml), set())
    reg._workflows["w"] = Workflow("w", "w.war", spec, tmp_path)
    item = RequestItem("r", [InputParam("body", "application/json", json.dumps(body).encode())])
    try:
        return asyncio.run(reg.predict("w", item))
    finally:
        reg._workflows.clear()  # its nodes are no registered models here
        asyncio.run(reg.stop())


def test_dag_with_two_leaves_answers_an_object_keyed_by_leaf(tmp_path):
    spec = "models:\n  a: {url: a.mar}\n  b: {url: b.mar}\n  c: {url: c.mar}\ndag:\n  a: [b, c]\n"
    models = {
        "w__a": _FakeModel(lambda d: {"v": d["body"]["v"] + 1}),
        "w__b": _FakeModel(lambda d: {"b": d["body"]["v"]}),
        "w__c": _FakeModel(lambda d: {"c": d["body"]["v"] * 10}),
    }
    r = _run_dag(tmp_path, spec, models, {"v": 1})
    assert (r.status, r.content_type) == (200, "application/json")
    assert json.loads(r.body) == {"b": {"b": 2}, "c": {"c": 20}}


def test_dag_node_retries_then_times_out(tmp_path):
    from modelport.torchserve.errors import TSError

    spec = (
        "models:\n  retry-attempts: 2\n  timeout-ms: 300\n"
        "  a: {url: a.mar}\n  b: {url: b.mar, retry-attempts: 1}\n"
        "dag:\n  a: [b]\n"
    )
    flaky = _FakeModel(lambda d: {"v": d["body"]["v"] * 3}, fail_first=2)
    models = {"w__a": flaky, "w__b": _FakeModel(lambda d: d["body"])}
    r = _run_dag(tmp_path, spec, models, {"v": 2})
    assert json.loads(r.body) == {"v": 6} and flaky.calls == 3  # 2 failures, then success

    slow = _FakeModel(lambda d: d["body"], sleep=1.0)
    models = {"w__a": _FakeModel(lambda d: d["body"]), "w__b": slow}
    with pytest.raises(TSError) as e:
        _run_dag(tmp_path, spec, models, {"v": 2})
    assert e.value.code == 500 and slow.calls == 2
    assert "Error executing b after 2 attempts: timed out after 300 ms" == e.value.message
