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
from modelport.torchserve.model import ModelVersion, _Slot
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
    "Partial Healthy"."""
    store = tmp_path / "store"
    ts_archives.echo_archive(store, tmp_path / "w", name="pingecho")
    # version 2.0 of the same model, whose handler cannot load its weights
    ts_archives.archive(store / "v2", "pingecho", HERE / "bad_init_handler.py", version="2.0")
    (store / "v2" / "pingecho.mar").rename(store / "pingecho_v2.mar")
    ts_archives.archive(store, "broken", HERE / "bad_init_handler.py")

    async def main():
        reg = ModelRegistry(store, work_dir=tmp_path / "work")
        state = TSState(reg, TSMetrics(), None)
        try:
            async with _client(make_inference_app(state)) as c:
                assert (await c.get("/ping")).json() == {"status": "Healthy"}  # no models
                await reg.register("pingecho.mar", initial_workers=1)
                await reg.register("pingecho_v2.mar", initial_workers=1, synchronous=False)
                await _settled(reg.get("pingecho", "2.0"))
                r = await c.get("/ping")  # 2.0 has no worker, but 1.0 is the default
                assert (r.status_code, r.json()) == (200, {"status": "Healthy"})
                reg.set_default("pingecho", "2.0")
                r = await c.get("/ping")
                assert (r.status_code, r.json()) == (500, {"status": "Unhealthy"})
                assert (await c.options("/ping")).status_code == 500  # any method, as there
                reg.set_default("pingecho", "1.0")
                await reg.register("broken.mar", initial_workers=0)  # no worker wanted
                assert (await c.get("/ping")).status_code == 200
                with pytest.raises(TSError, match="weights.bin is missing"):
                    await reg.scale("broken", None, 1, 1)
                r = await c.get("/ping")
                assert (r.status_code, r.json()) == (500, {"status": "Unhealthy"})
        finally:
            await reg.stop()

    asyncio.run(main())


async def _settled(mv: ModelVersion, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while mv._starting and time.monotonic() < deadline:
        await asyncio.sleep(0.05)


class _Worker:
    """Stands in for a ProcessWorker: alive, or down since a given time."""

    def __init__(self, alive: bool, down_since: float | None = None) -> None:
        self.alive, self.down_since = alive, down_since


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
            mv._slots = [_Slot(_Worker(True), "1"), _Slot(_Worker(False, now - 10), "2")]
            assert (mv.healthy_workers(), mv.healthy()) == (2, True)
            mv.model_yaml = {"maxRetryTimeoutInSec": 5}
            assert (mv.healthy_workers(), mv.healthy()) == (1, False)
            mv._slots[1].worker.down_since = None  # restarting, not yet noted as down
            assert mv.healthy()
            mv._slots = []
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
