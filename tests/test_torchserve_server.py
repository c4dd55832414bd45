"""End to end: `modelport serve --model-store ... --models ...` with real .mar archives.

One server process for the module (token auth on, config.properties with a batch_size=4
model); archives are built in tmp with torch-model-archiver. Each handler runs in its own
worker process, so the failure tests kill real processes.
"""

from __future__ import annotations

import http.server
import json
import os
import signal
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest

sys.path.insert(0, str(Path(__file__).parent / "fixtures" / "torchserve"))
import ts_archives  # noqa: E402

from helpers.server_proc import free_port as _free_port

HERE = Path(__file__).parent / "fixtures" / "torchserve"


class Server:
    def __init__(self, root: Path) -> None:
        self.root = root
        self.port, self.mport, self.iport = _free_port(), _free_port(), _free_port()
        self.metrics_port = _free_port()
        self.key_file = root / "keys" / "key_file.json"
        self.remote_dir = root / "remote"
        self.proc: subprocess.Popen | None = None

    @property
    def keys(self) -> dict:
        return json.loads(self.key_file.read_text())

    def headers(self, kind: str) -> dict:
        return {"Authorization": f"Bearer {self.keys[kind]['key']}"}

    def infer(self, path: str, **kw) -> httpx.Response:
        kw.setdefault("headers", self.headers("inference"))
        return httpx.post(f"http://127.0.0.1:{self.port}{path}", timeout=60, **kw)

    def mgmt(self, method: str, path: str, **kw) -> httpx.Response:
        kw.setdefault("headers", self.headers("management"))
        return httpx.request(method, f"http://127.0.0.1:{self.mport}{path}", timeout=120, **kw)


@pytest.fixture(scope="module")
def remote_http(tmp_path_factory):
    """A local HTTP server standing in for a remote model host (no network in CI)."""
    root = tmp_path_factory.mktemp("remote")
    ts_archives.archive(root, "remote", HERE / "func_handler.py")
    handler = lambda *a, **k: http.server.SimpleHTTPRequestHandler(*a, directory=str(root), **k)  # noqa: E731
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}"
    httpd.shutdown()


@pytest.fixture(scope="module")
def server(tmp_path_factory, remote_http):
    root = tmp_path_factory.mktemp("ts_server")
    store, work = root / "model_store", root / "work"
    ts_archives.llm_archive(store, work / "llm")
    ts_archives.echo_archive(store, work / "echo1", greeting="hello from v1")
    ts_archives.echo_archive(store / "v2", work / "echo2", version="2.0", greeting="hello from v2")
    ts_archives.classifier_archive(root / "outside_store", work / "cls")
    ts_archives.archive(store, "func", HERE / "func_handler.py")
    ts_archives.traversal_archive(store)
    ts_archives.archive(store, "badinit", HERE / "bad_init_handler.py")
    ts_archives.archive(store, "stream", HERE / "stream_handler.py")
    s = Server(root)
    cfg = root / "config.properties"
    models = {
        "echo": {
            "1.0": {
                "defaultVersion": True,
                "marName": "echo.mar",
                "minWorkers": 1,
                "maxWorkers": 1,
                "batchSize": 4,
                "maxBatchDelay": 5000,
            }
        }
    }
    cfg.write_text(
        "# TorchServe config\n"
        f"models={json.dumps(models)}\n"
        f"allowed_urls={remote_http}/.*\n"
        "default_response_timeout=60\n"
        f"metrics_address=http://127.0.0.1:{s.metrics_port}\n"
    )
    cmd = [
        sys.executable, "-m", "modelport", "serve",
        "--port", str(s.port), "--log-level", "warning",
        "--model-store", str(store),
        "--models", "llm=llm.mar", "echo=echo.mar",
        f"classifier={root / 'outside_store' / 'classifier.mar'}",  # operator-named: trusted
        "--ts-config", str(cfg),
        "--management-port", str(s.mport), "--inference-port", str(s.iport),
        "--ts-key-file", str(s.key_file),
        "--ts-workers", "1",  # not one per CPU, TorchServe's default
    ]  # fmt: skip
    log = open(root / "server.log", "wb")  # noqa: SIM115
    s.proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, cwd=root)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        if s.proc.poll() is not None:
            raise RuntimeError((root / "server.log").read_text()[-4000:])
        try:  # the three listeners start side by side: wait for each of them
            if (
                httpx.get(f"http://127.0.0.1:{s.mport}/models", timeout=2).status_code in (200, 400)
                and httpx.get(f"http://127.0.0.1:{s.port}/ping", timeout=2).status_code == 200
                and httpx.get(f"http://127.0.0.1:{s.iport}/ping", timeout=2).status_code == 200
            ):
                break
        except httpx.HTTPError:
            pass
        time.sleep(0.3)
    else:
        s.proc.kill()
        raise RuntimeError("server did not start:\n" + (root / "server.log").read_text()[-4000:])
    yield s
    s.proc.send_signal(signal.SIGINT)
    try:
        s.proc.wait(30)
    except subprocess.TimeoutExpired:
        s.proc.kill()
    log.close()
    assert not s.key_file.exists(), "key file is removed at shutdown"


def _ts_error(r: httpx.Response, code: int, type_: str | None = None) -> dict:
    assert r.status_code == code, r.text
    body = r.json()
    assert body["code"] == code and body["message"], body
    if type_:
        assert body["type"] == type_, body
    return body


# ---- inference --------------------------------------------------------------------------------


def test_ping_and_seed_llm_handler(server):
    r = httpx.get(f"http://127.0.0.1:{server.port}/ping")
    assert r.json() == {"status": "Healthy"}
    r = server.infer("/predictions/llm", content=b"Hello world", headers={
        **server.headers("inference"), "Content-Type": "text/plain"})  # fmt: skip
    assert r.status_code == 200, r.text
    # generate() returns prompt + new tokens; the byte-level tokenizer round-trips the prompt
    assert r.text.startswith("Hello world") and len(r.text.encode()) > len("Hello world")


def test_basehandler_subclass_with_torchscript_model(server):
    import torch

    x = [0.5, -1.0, 2.0, 0.25]
    r = server.infer("/predictions/classifier", json={"x": x})
    assert r.status_code == 200, r.text
    assert r.headers["content-type"].startswith("application/json")
    got = r.json()
    torch.manual_seed(0)  # the same net ts_archives scripted into the archive
    net = torch.nn.Sequential(torch.nn.Linear(4, 3)).eval()
    expected = net(torch.tensor([x])).detach()[0]
    assert got["label"] == int(expected.argmax())
    assert got["device"] == ("cuda:0" if torch.cuda.is_available() else "cpu")  # gpu_id
    assert got["scores"] == pytest.approx(expected.tolist(), abs=1e-3)


def test_batch_size_4_with_concurrent_clients(server):
    def call(i: int) -> httpx.Response:
        return server.infer("/predictions/echo", content=f"req-{i}".encode())

    with ThreadPoolExecutor(8) as pool:
        responses = list(pool.map(call, range(8)))
    bodies = [r.json() for r in responses]
    assert all(r.status_code == 200 for r in responses)
    assert [b["echo"] for b in bodies] == [f"req-{i}" for i in range(8)]
    assert all(b["batch"] == 4 for b in bodies), [b["batch"] for b in bodies]
    assert all(r.headers["x-batch-size"] == "4" for r in responses)
    assert bodies[0]["batch_size"] == 4 and bodies[0]["cwd_is_model_dir"]
    assert bodies[0]["keys"] == ["body"]


def test_inference_port_and_kserve_v1(server):
    r = httpx.get(f"http://127.0.0.1:{server.iport}/ping")
    assert r.status_code == 200
    r = httpx.post(
        f"http://127.0.0.1:{server.iport}/v1/models/classifier:predict",
        json={"instances": [{"data": {"x": [1, 0, 0, 0]}}, {"data": {"x": [0, 0, 0, 1]}}]},
        headers=server.headers("inference"),
        timeout=60,
    )
    assert r.status_code == 200, r.text
    preds = r.json()["predictions"]
    assert len(preds) == 2 and all(set(p) == {"label", "scores", "device"} for p in preds)
    # SageMaker's paths, as TorchServe serves them
    for path in ("/invocations?model_name=echo", "/models/echo/invoke"):
        r = server.infer(path, content=b"sm")
        assert r.status_code == 200 and r.json()["echo"] == "sm", (path, r.text)
    _ts_error(server.infer("/invocations", content=b"sm"), 404, "ModelNotFoundException")


def test_token_auth(server):
    r = server.infer("/predictions/classifier", json={"x": [0, 0, 0, 0]}, headers={})
    _ts_error(r, 400, "InvalidKeyException")
    r = server.infer(
        "/predictions/classifier",
        json={"x": [0, 0, 0, 0]},
        headers=server.headers("management"),  # the wrong key for this API
    )
    _ts_error(r, 400, "InvalidKeyException")
    _ts_error(server.mgmt("GET", "/models", headers={}), 400, "InvalidKeyException")
    old = server.keys["inference"]["key"]
    api = {"Authorization": f"Bearer {server.keys['API']['key']}"}
    assert server.mgmt("POST", "/token?type=inference", headers=api).status_code == 200
    assert server.keys["inference"]["key"] != old
    r = server.infer("/predictions/classifier", json={"x": [0, 0, 0, 0]},
                     headers={"Authorization": f"Bearer {old}"})  # fmt: skip
    _ts_error(r, 400, "InvalidKeyException")
    assert server.infer("/predictions/classifier", json={"x": [0, 0, 0, 0]}).status_code == 200


def test_metrics(server):
    assert server.infer("/predictions/classifier", json={"x": [0, 1, 0, 0]}).status_code == 200
    text = server.mgmt("GET", "/metrics").text
    line = next(s for s in text.splitlines() if s.startswith("ts_inference_requests_total{")
                and 'model_name="classifier"' in s)  # fmt: skip
    assert float(line.rsplit(" ", 1)[1]) >= 1
    assert 'ts_inference_latency_microseconds{model_name="classifier"' in text
    assert 'ts_queue_latency_microseconds{model_name="classifier"' in text
    # the metrics API of config.properties' metrics_address serves the same, without a key
    assert httpx.get(f"http://127.0.0.1:{server.metrics_port}/metrics").text.startswith("# HELP")


# ---- management -------------------------------------------------------------------------------


def test_register_scale_describe_unregister_round_trip(server):
    r = server.mgmt("POST", "/models?url=func.mar&initial_workers=1&synchronous=true")
    assert r.status_code == 200, r.text
    assert r.json() == {"status": 'Model "func" Version: 1.0 registered with 1 initial workers'}
    r = server.infer("/predictions/func", content=b"abcd")
    assert r.json() == {"model": "func", "n": len(str(bytearray(b"abcd")))}
    r = server.mgmt("PUT", "/models/func?min_worker=2&max_worker=3&synchronous=true")
    assert r.status_code == 200, r.text
    assert r.json() == {"status": "Workers scaled to 2 for model: func"}  # no version named
    (desc,) = server.mgmt("GET", "/models/func").json()
    assert (desc["minWorkers"], desc["maxWorkers"], len(desc["workers"])) == (2, 3, 2)
    assert all(w["status"] == "READY" and w["pid"] for w in desc["workers"])
    names = [m["modelName"] for m in server.mgmt("GET", "/models").json()["models"]]
    assert "func" in names
    page = server.mgmt("GET", "/models?limit=1").json()
    assert len(page["models"]) == 1 and page["nextPageToken"] == "1"
    r = server.mgmt("DELETE", "/models/func")
    assert r.status_code == 200 and r.json() == {"status": 'Model "func" unregistered'}
    _ts_error(server.infer("/predictions/func", content=b"x"), 404, "ModelNotFoundException")
    _ts_error(server.mgmt("GET", "/models/func"), 404, "ModelNotFoundException")


def test_versions_and_set_default(server):
    r = server.mgmt("POST", "/models?url=v2/echo.mar&initial_workers=1&synchronous=true")
    assert r.status_code == 200, r.text
    versions = {d["modelVersion"] for d in server.mgmt("GET", "/models/echo/all").json()}
    assert versions == {"1.0", "2.0"}
    r = server.infer("/predictions/echo/2.0", content=b"x")
    assert r.json()["greeting"] == "hello from v2" and r.json()["batch"] == 1
    with ThreadPoolExecutor(4) as pool:  # the default (1.0) batches by 4
        v1 = list(pool.map(lambda i: server.infer("/predictions/echo", content=b"x"), range(4)))
    assert {r.json()["greeting"] for r in v1} == {"hello from v1"}
    r = server.mgmt("PUT", "/models/echo/2.0/set-default")
    assert r.status_code == 200, r.text
    assert server.infer("/predictions/echo", content=b"x").json()["version"] == "2.0"
    body = _ts_error(
        server.mgmt("PUT", "/models/echo/9.9/set-default"), 404, "ModelVersionNotFoundException"
    )
    assert body["message"] == "Model version 9.9 does not exist for model echo"
    _ts_error(
        server.infer("/predictions/echo/9.9", content=b"x"), 404, "ModelVersionNotFoundException"
    )
    # the default version goes last, even through an unversioned DELETE (TorchServe: 403)
    body = _ts_error(server.mgmt("DELETE", "/models/echo"), 403, "InvalidModelVersionException")
    assert body["message"] == "Cannot remove default version for model echo"
    r = server.mgmt("PUT", "/models/echo/1.0/set-default")
    assert r.status_code == 200
    assert r.json() == {"status": 'Default version successfully updated for model "echo" to "1.0"'}


def test_remote_url_allowed_list(server, remote_http):
    _ts_error(
        server.mgmt("POST", "/models?url=https://example.com/models/x.mar"),
        404,
        "ModelNotFoundException",
    )
    r = server.mgmt(
        "POST", f"/models?url={remote_http}/remote.mar&initial_workers=1&synchronous=true"
    )
    assert r.status_code == 200, r.text
    assert server.infer("/predictions/remote", content=b"abc").json()["model"] == "remote"
    assert server.mgmt("DELETE", "/models/remote").status_code == 200


@pytest.mark.parametrize(
    "query, code, type_",
    [
        ("url=http://[::1/x.mar", 400, "BadRequestException"),
        ("url=ftp://host/x.mar", 400, "BadRequestException"),
        ("model_name=x", 400, "BadRequestException"),
        ("url=nope.mar", 404, "ModelNotFoundException"),
        ("url=../outside.mar", 404, "ModelNotFoundException"),
        ("url=/etc/passwd", 404, "ModelNotFoundException"),
        ("url=func.mar&initial_workers=-1", 400, "BadRequestException"),
        ("url=func.mar&batch_size=0", 400, "BadRequestException"),
        ("url=func.mar&batch_size=four", 400, "BadRequestException"),
        ("url=evil.mar", 400, "InvalidModelException"),
        ("url=llm.mar", 409, "ConflictStatusException"),
    ],
)
def test_register_errors(server, query, code, type_):
    _ts_error(server.mgmt("POST", f"/models?{query}"), code, type_)


def test_scale_and_describe_errors(server):
    _ts_error(server.mgmt("PUT", "/models/llm?min_worker=-1"), 400, "BadRequestException")
    _ts_error(
        server.mgmt("PUT", "/models/llm?min_worker=3&max_worker=1"), 400, "BadRequestException"
    )
    _ts_error(server.mgmt("PUT", "/models/ghost?min_worker=1"), 404, "ModelNotFoundException")
    _ts_error(server.mgmt("GET", "/models/ghost"), 404, "ModelNotFoundException")
    _ts_error(server.mgmt("DELETE", "/models/ghost"), 404, "ModelNotFoundException")
    # TorchServe clamps a limit outside 0..100 to 100 rather than refusing it
    assert server.mgmt("GET", "/models?limit=-5").status_code == 200
    _ts_error(server.infer("/predictions/ghost", content=b"x"), 404, "ModelNotFoundException")


# ---- failures ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def echo1(server):
    r = server.mgmt(
        "POST", "/models?url=echo.mar&model_name=echo1&batch_size=1&initial_workers=1"
        "&synchronous=true"
    )  # fmt: skip
    assert r.status_code == 200, r.text
    return "/predictions/echo1"


def test_handler_exception_fails_only_that_batch(server, echo1):
    with ThreadPoolExecutor(2) as pool:
        bad = pool.submit(server.infer, echo1, content=b"raise")
        good = pool.submit(server.infer, echo1, content=b"fine")
    # TorchServe answers a handler exception with 503 InternalServerException "Prediction
    # failed"; ours says which model failed and why after those words
    body = _ts_error(bad.result(), 503, "InternalServerException")
    assert body["message"].startswith("Prediction failed")
    assert len(bad.result().headers["x-request-id"]) == 32  # the failed job's id, as TorchServe
    assert "x-request-id" not in server.infer("/predictions/nope", content=b"x").headers
    assert "echo1" in body["message"] and "handler was asked to raise" in body["message"]
    assert good.result().status_code == 200 and good.result().json()["echo"] == "fine"
    r = server.infer(echo1, content=b"status:201")
    assert r.status_code == 201 and r.json()["echo"] == "status:201"


def test_handler_reason_phrase_on_the_status_line(server, echo1):
    # the echo handler's set_response_status(code, "custom"), as TorchServe writes it: on the
    # shared port (`modelport serve`'s server) and on the inference-only one
    for port in (server.port, server.iport):
        url = f"http://127.0.0.1:{port}{echo1}"
        r = httpx.post(url, content=b"status:418", headers=server.headers("inference"))
        assert (r.status_code, r.reason_phrase) == (418, "custom"), port
        assert r.json()["echo"] == "status:418"
        r = httpx.post(url, content=b"plain", headers=server.headers("inference"))
        assert (r.status_code, r.reason_phrase) == (200, "OK")


def test_worker_crash_is_restarted(server, echo1):
    pid = server.infer(echo1, content=b"who").json()["pid"]
    body = _ts_error(server.infer(echo1, content=b"die"), 500)
    assert "echo1" in body["message"] and "died" in body["message"]
    r = server.infer(echo1, content=b"after")
    assert r.status_code == 200 and r.json()["echo"] == "after"
    assert r.json()["pid"] != pid
    (desc,) = server.mgmt("GET", "/models/echo1").json()
    assert desc["workers"][0]["restarts"] == 1
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)


def test_async_registration_and_failed_initialize(server):
    r = server.mgmt(
        "POST", "/models?url=func.mar&model_name=func_async&initial_workers=1&synchronous=false"
    )
    assert r.status_code == 202, r.text
    assert r.json() == {"status": "Processing worker updates..."}
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        (desc,) = server.mgmt("GET", "/models/func_async").json()
        if desc["workers"] and desc["workers"][0]["status"] == "READY":
            break
        time.sleep(0.2)
    assert server.infer("/predictions/func_async", content=b"ab").json()["model"] == "func_async"
    assert server.mgmt("DELETE", "/models/func_async").status_code == 200

    r = server.mgmt("POST", "/models?url=badinit.mar&initial_workers=1&synchronous=true")
    body = _ts_error(r, 500, "InternalServerException")
    assert "badinit" in body["message"] and "weights.bin is missing" in body["message"]
    _ts_error(server.mgmt("GET", "/models/badinit"), 404)  # nothing half-registered
    r = server.mgmt("POST", "/models?url=badinit.mar&initial_workers=0")
    assert r.status_code == 200 and "Use scale workers API" in r.json()["status"]
    body = _ts_error(server.infer("/predictions/badinit", content=b"x"), 503)
    assert body["type"] == "ServiceUnavailableException" and "no worker" in body["message"]
    assert server.mgmt("DELETE", "/models/badinit").status_code == 200


def test_explanations_customized_describe_and_extras(server, echo1):
    r = server.infer("/explanations/echo1", content=b"why")
    assert r.status_code == 200 and r.json()["explained"] is True and r.json()["echo"] == "why"
    r = server.infer(echo1, content=b"plain")
    assert r.json()["explained"] is False
    assert len(r.headers["x-request-id"]) == 32
    (desc,) = server.mgmt("GET", "/models/echo1?customized=true").json()
    assert desc["customizedMetadata"] == {"handler": "EchoHandler", "greeting": "hello from v1"}
    assert desc["workers"][0]["memoryUsage"] > 10_000_000  # RSS of a real process
    (desc,) = server.mgmt("GET", "/models/classifier").json()
    assert desc["modelUrl"].endswith("outside_store/classifier.mar")
    _ts_error(server.mgmt("GET", "/no/such/api"), 404, "ResourceNotFoundException")
    _ts_error(server.mgmt("PATCH", "/models"), 405, "MethodNotAllowedException")


def test_request_shapes_reach_the_handler_as_torchserve_sends_them(server, echo1):
    # multipart: each form field is an input under its own name; files arrive as bytes
    r = server.infer(echo1, files={"data": ("x.txt", b"file-bytes")}, data={"extra": "v"})
    assert r.status_code == 200, r.text
    assert r.json()["keys"] == ["data", "extra"] and r.json()["echo"] == "file-bytes"
    # urlencoded form fields are inputs too; query parameters only on /invocations
    r = server.infer(echo1 + "?mode=fast", data={"data": "form-value"})
    assert r.json()["keys"] == ["data"] and r.json()["echo"] == "form-value"
    # a JSON body is decoded before the handler sees it
    r = server.infer(echo1, json={"a": 1})
    assert r.json()["echo"] == {"a": 1}


def test_seed_llm_handler_in_batches_of_4(server):
    r = server.mgmt(
        "POST", "/models?url=llm.mar&model_name=llm4&batch_size=4&max_batch_delay=30000"
        "&initial_workers=1&synchronous=true"
    )  # fmt: skip
    assert r.status_code == 200, r.text
    prompts = ["a", "bb bb", "the cat sat", "four little words here"]
    start = time.monotonic()
    with ThreadPoolExecutor(4) as pool:
        outs = list(pool.map(lambda p: server.infer("/predictions/llm4", content=p.encode(),
                             headers={**server.headers("inference"), "Content-Type": "text/plain"}),
                             prompts))  # fmt: skip
    # one padded batch of 4 (a lone request would wait the 30 s delay); each answer is its
    # own prompt continued, so padding and row order survived the batch
    assert [o.status_code for o in outs] == [200] * 4
    assert time.monotonic() - start < 20, "the batch filled up instead of timing out"
    for prompt, out in zip(prompts, outs):
        assert out.text.startswith(prompt) and len(out.text.encode()) > len(prompt)
    assert server.mgmt("DELETE", "/models/llm4").status_code == 200


def test_intermediate_responses_stream_as_chunks(server):
    r = server.mgmt("POST", "/models?url=stream.mar&initial_workers=1&synchronous=true")
    assert r.status_code == 200, r.text
    arrivals = []
    with httpx.stream(
        "POST", f"http://127.0.0.1:{server.port}/predictions/stream", content=b"4",
        headers=server.headers("inference"), timeout=60,
    ) as resp:  # fmt: skip
        assert resp.status_code == 200
        assert "content-length" not in resp.headers and "ts_stream_next" not in resp.headers
        for chunk in resp.iter_bytes():
            arrivals.append((time.monotonic(), chunk))
    text = b"".join(c for _, c in arrivals).decode()
    assert text == "tok0 tok1 tok2 tok3 [end]"
    # the first token arrived while the handler was still producing the rest (4 x 0.3 s)
    assert arrivals[-1][0] - arrivals[0][0] > 0.6
    assert server.mgmt("DELETE", "/models/stream").status_code == 200
