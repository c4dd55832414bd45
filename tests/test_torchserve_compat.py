"""TorchServe 0.12 behaviours that clients and configs rely on, as the real TorchServe 0.12.0
answered them (run side by side while writing these): the API description (`OPTIONS /`),
/ping's health rule, how many workers start, and a handler's custom reason phrase.

In-process (ASGI) where no socket is needed; the reason phrase needs a real HTTP server.
"""

from __future__ import annotations

import asyncio
import json
import sys
import time
from pathlib import Path

import httpx
import pytest

from modelport.entrypoints.torchserve.common import TSState
from modelport.entrypoints.torchserve.inference import make_inference_app
from modelport.entrypoints.torchserve.management import make_management_app, make_metrics_app
from modelport.entrypoints.torchserve.metrics import TSMetrics
from modelport.torchserve.auth import TokenAuth
from modelport.torchserve.errors import TSError
from modelport.torchserve.model import _Slot
from modelport.torchserve.registry import ModelRegistry

sys.path.insert(0, str(Path(__file__).parent / "fixtures" / "torchserve"))
import ts_archives  # noqa: E402

HERE = Path(__file__).parent / "fixtures" / "torchserve"


def _client(app) -> httpx.AsyncClient:  # noqa: ANN001
    return httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://ts")


# ---- the API description ------------------------------------------------------------------------


def test_options_root_describes_each_ports_own_endpoints(tmp_path):
    """`OPTIONS /` (and `/api-description`, any method) answer an OpenAPI 3.0.1 document of
    that port's endpoints, without a token; GET / is 405, as TorchServe answers it."""
    ts_archives.echo_archive(tmp_path / "store", tmp_path / "w", name="apidoc")

    async def main():
        reg = ModelRegistry(tmp_path / "store", work_dir=tmp_path / "work")
        state = TSState(reg, TSMetrics(), TokenAuth(tmp_path / "key_file.json"))
        docs = {}
        try:
            for port, app in (("management", make_management_app(state)),
                              ("inference", make_inference_app(state)),
                              ("metrics", make_metrics_app(state))):  # fmt: skip
                async with _client(app) as c:
                    r = await c.options("/")
                    assert r.status_code == 200, (port, r.text)
                    assert r.headers["content-type"] == "application/json"
                    docs[port] = doc = r.json()
                    for method in ("GET", "POST"):  # the deprecated path, whatever the method
                        again = await c.request(method, "/api-description")
                        assert again.status_code == 200 and again.json() == doc
                    r = await c.get("/")
                    assert r.status_code == 405 and r.json()["type"] == "MethodNotAllowedException"
        finally:
            await reg.stop()
        return docs

    docs = asyncio.run(main())
    for doc in docs.values():
        assert doc["openapi"] == "3.0.1" and set(doc) == {"openapi", "info", "paths"}
        assert doc["paths"]["/"]["options"]["operationId"] == "apiDescription"
        assert doc["paths"]["/api-description"]["get"]["deprecated"] is True

    def ops(port: str) -> dict[tuple[str, str], str]:
        return {(m.upper(), p): op["operationId"]
                for p, methods in docs[port]["paths"].items() for m, op in methods.items()}  # fmt: skip

    inference = ops("inference")
    assert inference[("GET", "/ping")] == "ping"
    assert inference[("POST", "/predictions/{model_name}")] == "predictions"
    assert inference[("POST", "/predictions/{model_name}/{version}")] == "version_predictions"
    assert ("POST", "/v1/models/{model_name}:predict") in inference
    # the catch-alls that refuse other methods are no endpoints; no workflows, no /wfpredict
    assert not any("{rest" in p or p.startswith("/wfpredict") for _, p in inference)
    assert ("GET", "/models") not in inference
    management = ops("management")
    assert management[("GET", "/models")] == "listModels"
    assert management[("POST", "/models")] == "registerModel"
    assert management[("PUT", "/models/{model_name}")] == "setAutoScale"
    assert management[("DELETE", "/models/{model_name}/{version}")] == "version_unregisterModel"
    assert management[("PUT", "/models/{model_name}/{version}/set-default")] == "setDefault"
    assert ("POST", "/token") in management  # token authorization is on
    assert not any(p.startswith("/workflows") for _, p in management)
    assert ("GET", "/ping") not in management
    assert set(ops("metrics")) == {("OPTIONS", "/"), ("GET", "/api-description"),
                                   ("GET", "/metrics")}  # fmt: skip
    register = docs["management"]["paths"]["/models"]["post"]
    url = next(p for p in register["parameters"] if p["name"] == "url")
    assert url == {**url, "in": "query", "required": True}
    assert {"200", "202", "400", "404", "409", "500"} <= set(register["responses"])
    error = register["responses"]["404"]["content"]["application/json"]["schema"]
    assert error["required"] == ["code", "type", "message"]


def test_options_on_a_models_predictions_describes_that_model(tmp_path):
    """`OPTIONS /predictions/{model}[/{version}]` is that model's API (TorchServe's
    OpenApiUtils.getModelApi), behind the inference token; an unknown model or version is
    TorchServe's 404."""
    ts_archives.echo_archive(tmp_path / "store", tmp_path / "w", name="apidoc")
    key_file = tmp_path / "key_file.json"

    async def main():
        reg = ModelRegistry(tmp_path / "store", work_dir=tmp_path / "work")
        state = TSState(reg, TSMetrics(), TokenAuth(key_file))
        await reg.register("apidoc.mar", initial_workers=0)
        token = {"Authorization": f"Bearer {json.loads(key_file.read_text())['inference']['key']}"}
        try:
            async with _client(make_inference_app(state)) as c:
                r = await c.options("/predictions/apidoc")
                assert r.status_code == 400 and r.json()["type"] == "InvalidKeyException"
                r = await c.options("/predictions/apidoc", headers=token)
                assert r.status_code == 200, r.text
                doc = r.json()
                assert doc["openapi"] == "3.0.1" and doc["info"]["title"] == "RESTful API for: apidoc"
                assert doc["paths"]["/predictions/apidoc"]["post"]["operationId"] == "apidoc"
                r = await c.options("/predictions/apidoc/1.0", headers=token)
                assert "/predictions/apidoc/1.0" in r.json()["paths"]
                r = await c.options("/predictions/ghost", headers=token)
                assert (r.status_code, r.json()["type"]) == (404, "ModelNotFoundException")
                r = await c.options("/predictions/apidoc/9.9", headers=token)
                assert (r.status_code, r.json()["type"]) == (404, "ModelVersionNotFoundException")
                # other methods predict, as TorchServe's handlePredictions does for any method
                r = await c.get("/predictions/apidoc")
                assert r.status_code == 400 and r.json()["type"] == "InvalidKeyException"
        finally:
            await reg.stop()

    asyncio.run(main())


# ---- /ping --------------------------------------------------------------------------------------


def test_ping_is_unhealthy_when_a_default_version_lacks_workers(tmp_path):
    """TorchServe 0.12 (ApiUtils.isModelHealthy): 200 Healthy, or 500 Unhealthy as soon as the
    default version of a model has fewer healthy workers than its minWorkers; versions that
    are not the default do not count, nor do models scaled to 0 workers. 0.12 has no
    "Partial Healthy". A worker that cannot start is retried and counts as healthy for its
    model's maxRetryTimeoutInSec (1 s here), as TorchServe 0.12 answered."""
    store = tmp_path / "store"
    retry1 = tmp_path / "retry1.yaml"
    retry1.write_text("maxRetryTimeoutInSec: 1\n")
    ts_archives.echo_archive(store, tmp_path / "w", name="pingecho")
    # version 2.0 of the same model, whose handler cannot load its weights
    ts_archives.archive(store / "v2", "pingecho", HERE / "bad_init_handler.py", version="2.0",
                        config_file=retry1)  # fmt: skip
    (store / "v2" / "pingecho.mar").rename(store / "pingecho_v2.mar")
    ts_archives.archive(store, "broken", HERE / "bad_init_handler.py", config_file=retry1)

    async def main():
        reg = ModelRegistry(store, work_dir=tmp_path / "work")
        state = TSState(reg, TSMetrics(), None)
        try:
            async with _client(make_inference_app(state)) as c:
                assert (await c.get("/ping")).json() == {"status": "Healthy"}  # no models
                await reg.register("pingecho.mar", initial_workers=1)
                await reg.register("pingecho_v2.mar", initial_workers=1, synchronous=False)
                reg.set_default("pingecho", "2.0")
                r = await c.get("/ping")  # 2.0's worker is starting, then retried
                assert (r.status_code, r.json()) == (200, {"status": "Healthy"})
                await _ping_until(c, 500, within=10)  # its retries ran out
                r = await c.get("/ping")
                assert (r.status_code, r.json()) == (500, {"status": "Unhealthy"})
                assert (await c.options("/ping")).status_code == 500  # any method, as there
                reg.set_default("pingecho", "1.0")  # 2.0 has no worker, but is no default
                assert (await c.get("/ping")).status_code == 200
                await reg.register("broken.mar", initial_workers=0)  # no worker wanted
                assert (await c.get("/ping")).status_code == 200
                with pytest.raises(TSError, match="weights.bin is missing"):
                    await reg.scale("broken", None, 1, 1)
                assert (await c.get("/ping")).status_code == 200  # being retried
                await _ping_until(c, 500, within=10)
        finally:
            await reg.stop()

    asyncio.run(main())


async def _ping_until(c: httpx.AsyncClient, code: int, within: float) -> None:
    deadline = time.monotonic() + within
    while (await c.get("/ping")).status_code != code:
        assert time.monotonic() < deadline, f"/ping did not turn {code}"
        await asyncio.sleep(0.1)


class _Worker:
    """Stands in for a ProcessWorker."""

    def __init__(self, alive: bool) -> None:
        self.alive = alive


def test_a_down_worker_counts_as_healthy_for_max_retry_timeout(tmp_path):
    """TorchServe's WorkerThread.isHealthy: a worker that died is given maxRetryTimeoutInSec
    (model-config YAML, default 300) to come back before it counts as lost."""
    ts_archives.echo_archive(tmp_path / "store", tmp_path / "w", name="retry")

    async def main():
        reg = ModelRegistry(tmp_path / "store", work_dir=tmp_path / "work")
        mv = await reg.register("retry.mar", initial_workers=0)
        try:
            mv.settings = mv.settings.__class__(min_workers=2, max_workers=2)
            now = time.monotonic()
            mv._slots = [_Slot(_Worker(True), "1"), _Slot(_Worker(False), "2", down_since=now - 10)]
            assert (mv.healthy_workers(), mv.healthy()) == (2, True)
            mv.model_yaml = {"maxRetryTimeoutInSec": 5}
            assert (mv.healthy_workers(), mv.healthy()) == (1, False)
            mv._slots[1].down_since = None  # starting, not yet noted as down
            assert mv.healthy()
            mv._slots = []
        finally:
            await reg.stop()

    asyncio.run(main())


def _retry_yaml(tmp_path: Path, seconds: int) -> Path:
    path = tmp_path / f"retry{seconds}.yaml"
    path.write_text(f"maxRetryTimeoutInSec: {seconds}\n")
    return path


async def _workers(c: httpx.AsyncClient, name: str, within: float = 10) -> list[dict]:
    """The model's workers, once it has some (an asynchronous registration adds them soon
    after it answered)."""
    deadline = time.monotonic() + within
    while True:
        r = await c.get(f"/models/{name}")
        assert r.status_code == 200, r.text
        if r.json()[0]["workers"] or time.monotonic() > deadline:
            return r.json()[0]["workers"]
        await asyncio.sleep(0.02)


def test_a_worker_that_cannot_start_is_retried_for_max_retry_timeout(tmp_path):
    """TorchServe 0.12, measured with a handler whose initialize always raises (and
    maxRetryTimeoutInSec 20): a synchronous registration answers 500 InternalServerException
    "Failed to start workers for model M version: V" at the first failure and is undone; an
    asynchronous one answers 202 and its worker is started again after 1, 1, 2, 3, 5, ...
    seconds, listed as UNLOADING (same id, its latest pid), /ping Healthy until it has been
    down for maxRetryTimeoutInSec, then Unhealthy and no more retries. A model loaded at
    startup stays registered the same way. Other models serve throughout. (A prediction
    waiting for such a worker hangs in TorchServe; here it gets 503 once the retries ran
    out.)"""
    store = tmp_path / "store"
    ts_archives.archive(store, "broken", HERE / "bad_init_handler.py",
                        config_file=_retry_yaml(tmp_path, 2))  # fmt: skip
    ts_archives.echo_archive(store, tmp_path / "w", name="fine")

    async def main():
        reg = ModelRegistry(store, work_dir=tmp_path / "work")
        state = TSState(reg, TSMetrics(), None)
        try:
            async with _client(make_management_app(state)) as m, \
                    _client(make_inference_app(state)) as i:  # fmt: skip
                await reg.register("fine.mar", initial_workers=1)
                r = await m.post("/models?url=broken.mar&initial_workers=1&synchronous=true")
                assert r.status_code == 500, r.text
                assert r.json()["type"] == "InternalServerException"
                assert r.json()["message"].startswith(
                    "Failed to start workers for model broken version: 1.0"
                )
                assert "weights.bin is missing" in r.json()["message"]
                assert (await m.get("/models/broken")).status_code == 404  # undone

                started = time.monotonic()
                r = await m.post("/models?url=broken.mar&initial_workers=1&synchronous=false")
                assert (r.status_code, r.json()) == (202, {"status": "Processing worker updates..."})
                waiting = asyncio.ensure_future(i.post("/predictions/broken", content=b"x"))
                pids, ids = set(), set()
                while time.monotonic() - started < 1.9:  # within maxRetryTimeoutInSec
                    (w,) = await _workers(m, "broken")
                    assert w["status"] == "UNLOADING"
                    pids.add(w["pid"])
                    ids.add(w["id"])
                    assert (await i.get("/ping")).status_code == 200
                    ok = await i.post("/predictions/fine", content=b"still serving")
                    assert ok.status_code == 200 and ok.json()["echo"] == "still serving"
                    await asyncio.sleep(0.2)
                deadline = time.monotonic() + 10
                while (await i.get("/ping")).status_code == 200:  # until its retries ran out
                    assert time.monotonic() < deadline
                    (w,) = await _workers(m, "broken")
                    pids.add(w["pid"])
                    await asyncio.sleep(0.1)
                assert len(ids) == 1 and len(pids - {-1}) >= 2  # one worker, started again
                r = await waiting  # no worker left for it
                assert r.status_code == 503 and r.json()["type"] == "ServiceUnavailableException"
                (w,) = await _workers(m, "broken")
                assert w["status"] == "UNLOADING" and w["restarts"] >= 1
                restarts = w["restarts"]
                await asyncio.sleep(1.2)  # given up: no more retries
                assert (await _workers(m, "broken"))[0]["restarts"] == restarts
                r = await i.post("/predictions/broken", content=b"x")
                assert r.status_code == 503
                assert (await i.post("/predictions/fine", content=b"y")).status_code == 200
                assert (await m.delete("/models/broken")).status_code == 200

                # loaded at startup: kept, its worker retried
                mv = await reg.register("broken.mar", initial_workers=1, loaded_at_startup=True)
                assert reg.get("broken") is mv and mv.healthy()
        finally:
            await reg.stop()

    asyncio.run(main())


def test_a_worker_that_fails_once_comes_up_when_retried(tmp_path):
    """TorchServe 0.12, measured with a handler whose initialize raises the first time only:
    registered asynchronously, the worker is started again 1 s after the failure and serves;
    a prediction sent meanwhile waits for it (200), the worker turns READY with the same id
    and startTime. Registered synchronously, the first failure is the answer (500) and the
    model is undone."""
    store = tmp_path / "store"
    ts_archives.archive(store, "flaky", HERE / "fail_once_handler.py")

    async def main():
        reg = ModelRegistry(store, work_dir=tmp_path / "work")
        state = TSState(reg, TSMetrics(), None)
        try:
            async with _client(make_management_app(state)) as m, \
                    _client(make_inference_app(state)) as i:  # fmt: skip
                r = await m.post("/models?url=flaky.mar&initial_workers=1&synchronous=true")
                assert r.status_code == 500 and "first start fails" in r.json()["message"]
                assert (await m.get("/models/flaky")).status_code == 404

                started = time.monotonic()
                r = await m.post("/models?url=flaky.mar&initial_workers=1&synchronous=false")
                assert r.status_code == 202
                # sent before its worker was even added: waits for it, then for the retry
                sent = asyncio.ensure_future(i.post("/predictions/flaky", content=b"x"))
                (before,) = await _workers(m, "flaky")
                r = await sent
                took = time.monotonic() - started
                assert r.status_code == 200, r.text
                assert 1.0 <= took < 10, took  # BACK_OFF[1]: 1 s
                (w,) = await _workers(m, "flaky")
                assert w["status"] == "READY" and w["pid"] == int(r.text)
                assert (w["id"], w["startTime"]) == (before["id"], before["startTime"])
                assert w["restarts"] == 1
                assert (await i.get("/ping")).status_code == 200
        finally:
            await reg.stop()

    asyncio.run(main())


def test_a_worker_that_dies_is_restarted_after_a_backoff(tmp_path):
    """TorchServe 0.12, measured with a handler that calls os._exit for one input: that
    request gets 500 InternalServerException "Worker died."; the worker is UNLOADING, then
    started again after 1 s (BACK_OFF[1]) and READY with a new pid; a request queued behind
    the dead one waits and is served by the new process; /ping stays Healthy."""
    ts_archives.echo_archive(tmp_path / "store", tmp_path / "w", name="dies")

    async def main():
        reg = ModelRegistry(tmp_path / "store", work_dir=tmp_path / "work")
        state = TSState(reg, TSMetrics(), None)
        try:
            await reg.register("dies.mar", initial_workers=1)
            async with _client(make_management_app(state)) as m, \
                    _client(make_inference_app(state)) as i:  # fmt: skip
                first = (await i.post("/predictions/dies", content=b"who")).json()["pid"]
                (before,) = await _workers(m, "dies")
                died = asyncio.ensure_future(i.post("/predictions/dies", content=b"die"))
                await asyncio.sleep(0.3)
                started = time.monotonic()
                queued = asyncio.ensure_future(i.post("/predictions/dies", content=b"after"))
                r = await died
                assert r.status_code == 500 and r.json()["type"] == "InternalServerException"
                assert r.json()["message"].startswith("Worker died.")
                (w,) = await _workers(m, "dies")
                assert w["status"] == "UNLOADING"
                assert (await i.get("/ping")).status_code == 200
                r = await queued
                assert r.status_code == 200 and r.json()["echo"] == "after"
                assert r.json()["pid"] != first
                assert time.monotonic() - started >= 0.7  # waited for the 1 s backoff
                (w,) = await _workers(m, "dies")
                assert w["status"] == "READY" and w["pid"] == r.json()["pid"]
                assert (w["id"], w["startTime"]) == (before["id"], before["startTime"])
                assert w["restarts"] == 1
        finally:
            await reg.stop()

    asyncio.run(main())


def test_scaling_keeps_the_running_workers_within_min_and_max(tmp_path):
    """TorchServe's WorkLoadManager.modelChanged starts workers up to minWorkers and stops
    those past maxWorkers: PUT min_worker=1&max_worker=3 on a model with 2 workers keeps 2
    (TorchServe 0.12 answered so), where it used to scale down to min_worker."""
    ts_archives.echo_archive(tmp_path / "store", tmp_path / "w", name="scaled")

    async def main():
        reg = ModelRegistry(tmp_path / "store", work_dir=tmp_path / "work")
        state = TSState(reg, TSMetrics(), None)
        try:
            await reg.register("scaled.mar", initial_workers=2)
            async with _client(make_management_app(state)) as c:

                async def scale(query: str) -> tuple[int, int, int]:
                    r = await c.put(f"/models/scaled?{query}&synchronous=true")
                    assert r.status_code == 200, r.text
                    (d,) = (await c.get("/models/scaled")).json()
                    return d["minWorkers"], d["maxWorkers"], len(d["workers"])

                assert await scale("min_worker=1&max_worker=3") == (1, 3, 2)
                assert await scale("min_worker=1&max_worker=1") == (1, 1, 1)
                assert await scale("min_worker=0") == (0, 0, 0)
        finally:
            await reg.stop()

    asyncio.run(main())


# ---- a handler's reason phrase ------------------------------------------------------------------


@pytest.mark.parametrize("impl", ["httptools", "h11"])
def test_reason_phrase_goes_on_the_status_line(impl):
    """TorchServe writes a handler's `set_response_status(code, phrase)` phrase on the status
    line (`HTTP/1.1 418 I am a teapot`, the handler's body as it is); the internal header that
    carries it here never reaches the client, whatever middleware is in between."""
    pytest.importorskip(impl)
    import uvicorn
    from fastapi import FastAPI, Request
    from fastapi.responses import Response

    from modelport.entrypoints.torchserve.reason_phrase import (
        REASON_HEADER,
        http_protocol,
        reason_header,
    )

    app = FastAPI()

    @app.middleware("http")  # a BaseHTTPMiddleware rebuilds the response it passes on
    async def passthrough(request: Request, call_next):  # noqa: ANN202
        return await call_next(request)

    @app.get("/status/{code}")
    async def answer(code: int, phrase: str | None = None) -> Response:
        return Response(b"body", status_code=code, headers=reason_header(phrase))

    async def main():
        import socket

        sock = socket.socket()
        sock.bind(("127.0.0.1", 0))
        config = uvicorn.Config(app, lifespan="off", log_level="warning", http=http_protocol(impl))
        server = uvicorn.Server(config)
        task = asyncio.get_running_loop().create_task(server.serve(sockets=[sock]))
        while not server.started:
            await asyncio.sleep(0.01)
        base = f"http://127.0.0.1:{sock.getsockname()[1]}"
        try:
            async with httpx.AsyncClient(base_url=base) as c:  # one kept-alive connection
                for code, phrase, expected in (
                    (418, "I am a teapot", "I am a teapot"),
                    (200, None, "OK"),  # none set: the standard one, on the same connection
                    (200, "Fine Thanks", "Fine Thanks"),
                    (404, "", ""),  # set_response_status(404): TorchServe sends it empty
                    (500, "bad\r\nX-Injected: 1", "Internal Server Error"),
                    (500, "caf\u00e9", "Internal Server Error"),  # TorchServe: not ASCII, a 500
                ):
                    params = {} if phrase is None else {"phrase": phrase}
                    r = await c.get(f"/status/{code}", params=params)
                    assert (r.status_code, r.reason_phrase) == (code, expected), phrase
                    assert r.content == b"body"
                    assert REASON_HEADER not in r.headers and "x-injected" not in r.headers
        finally:
            server.should_exit = True
            await task

    asyncio.run(main())


# ---- workers at startup -------------------------------------------------------------------------


def test_default_workers_are_one_per_gpu_else_one_per_cpu(monkeypatch):
    """TorchServe's ConfigManager.getDefaultWorkers where default_workers_per_model is unset:
    the GPUs (number_of_gpu caps them), else the CPUs."""
    from modelport.entrypoints.torchserve import frontend
    from modelport.torchserve import model as ts_model

    monkeypatch.setattr(frontend, "_cpu_count", lambda: 6)
    monkeypatch.setattr(ts_model, "gpu_count", lambda: 0)
    assert frontend.default_workers(None) == 6
    monkeypatch.setattr(ts_model, "gpu_count", lambda: 2)
    assert (frontend.default_workers(None), frontend.default_workers(1)) == (2, 1)
    assert frontend.default_workers(0) == 6  # number_of_gpu=0: CPU workers


def test_startup_workers_follow_default_entry_and_archive_yaml(tmp_path, monkeypatch):
    """What TorchServe 0.12 started for the same config on a 2-CPU machine: the default
    workers for a model nothing configures; a `models=` entry's minWorkers with maxWorkers
    the default where it is left out; the archive YAML's minWorkers/maxWorkers over both.
    The describe API shows the workers that run."""
    import argparse

    from fastapi import FastAPI

    from modelport.entrypoints.cli_serve import add_common_args
    from modelport.entrypoints.torchserve import frontend
    from modelport.torchserve import model as ts_model

    monkeypatch.setattr(frontend, "_cpu_count", lambda: 2)
    monkeypatch.setattr(ts_model, "gpu_count", lambda: 0)
    store = tmp_path / "store"
    ts_archives.echo_archive(store, tmp_path / "w1", name="wdefault")
    ts_archives.echo_archive(store, tmp_path / "w2", name="wentry")
    yaml = tmp_path / "model-config.yaml"
    yaml.write_text("minWorkers: 1\nmaxWorkers: 3\n")
    ts_archives.echo_archive(store, tmp_path / "w3", name="wyaml", config_file=yaml)
    entries = {"wentry": {"1.0": {"marName": "wentry.mar", "minWorkers": 1}},
               "wyaml": {"1.0": {"marName": "wyaml.mar", "minWorkers": 2, "maxWorkers": 2}}}
    cfg = tmp_path / "config.properties"
    cfg.write_text(f"model_store={store}\nload_models=wdefault.mar,wentry.mar,wyaml.mar\n"
                   f"models={json.dumps(entries)}\n")  # fmt: skip
    parser = argparse.ArgumentParser()
    add_common_args(parser)
    frontend.add_serve_args(parser)
    args = parser.parse_args(["--ts-config", str(cfg), "--disable-token-auth", "--disable-grpc",
                              "--ncs", "--management-port", "0"])  # fmt: skip
    args.serve_frontends = (frontend.__name__,)

    async def main():
        service = await frontend.build(args, FastAPI())
        await service.start()
        try:
            async with _client(make_management_app(service.state)) as c:
                got = {}
                for name in ("wdefault", "wentry", "wyaml"):
                    (d,) = (await c.get(f"/models/{name}")).json()
                    pids = {w["pid"] for w in d["workers"] if w["status"] == "READY"}
                    got[name] = (d["minWorkers"], d["maxWorkers"], len(pids))
            assert got == {"wdefault": (2, 2, 2), "wentry": (1, 2, 1), "wyaml": (1, 3, 1)}
        finally:
            await service.stop()

    asyncio.run(main())
