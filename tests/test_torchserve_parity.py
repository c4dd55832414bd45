"""TorchServe 0.12 management API parity, checked in-process (ASGI, no sockets).

Worker processes are replaced by a recorder (`ModelVersion.scale` only notes the count), so
these check what the management API answers and records, not the workers themselves (the
end-to-end tests in test_torchserve_server.py do). Each case names the TorchServe source it
follows (frontend/server/src/main/java/org/pytorch/serve/...).
"""

from __future__ import annotations

import asyncio
import sys
from pathlib import Path

import httpx
import pytest

from modelport.entrypoints.torchserve.common import TSState
from modelport.entrypoints.torchserve.management import make_management_app
from modelport.entrypoints.torchserve.metrics import TSMetrics
from modelport.torchserve.model import ModelVersion
from modelport.torchserve.registry import ModelRegistry

sys.path.insert(0, str(Path(__file__).parent / "fixtures" / "torchserve"))
import ts_archives  # noqa: E402


@pytest.fixture
def scaled(monkeypatch) -> list[tuple[str, int]]:
    """Replace worker start/stop with a record of (model, count)."""
    calls: list[tuple[str, int]] = []

    async def scale(self: ModelVersion, n: int, most: int | None = None) -> None:
        calls.append((f"{self.name}/{self.version}", n))

    monkeypatch.setattr(ModelVersion, "scale", scale)
    return calls


def _run(tmp_path: Path, body, *, default_workers: int = 0, n_models: int = 3) -> None:
    store = tmp_path / "store"
    for i in range(n_models):
        ts_archives.echo_archive(store, tmp_path / f"w{i}", name=f"m{i}")
    ts_archives.echo_archive(store / "v2", tmp_path / "w_v2", name="m0", version="2.0")

    async def main():
        reg = ModelRegistry(store, work_dir=tmp_path / "work")
        extra = {"default_workers": default_workers} if default_workers else {}
        state = TSState(reg, TSMetrics(), None, **extra)
        transport = httpx.ASGITransport(app=make_management_app(state))
        async with httpx.AsyncClient(transport=transport, base_url="http://ts") as client:
            try:
                await body(client, reg)
            finally:
                await reg.stop()

    asyncio.run(main())


def test_register_is_synchronous_by_default(tmp_path, scaled):
    # RegisterModelRequest: synchronous defaults to "true" (the docs say false; the code wins)
    async def body(c: httpx.AsyncClient, reg):
        r = await c.post("/models?url=m0.mar&initial_workers=1")
        assert r.status_code == 200, r.text
        assert r.json() == {"status": 'Model "m0" Version: 1.0 registered with 1 initial workers'}
        assert scaled == [("m0/1.0", 1)]
        # only "true" is true (Boolean.parseBoolean): "1" is asynchronous, as "false" is
        for i, flag in ((1, "false"), (2, "1")):
            r = await c.post(f"/models?url=m{i}.mar&initial_workers=1&synchronous={flag}")
            assert r.status_code == 202, r.text
            assert r.json() == {"status": "Processing worker updates..."}

    _run(tmp_path, body)


def test_initial_workers_defaults_to_default_workers_per_model(tmp_path, scaled):
    async def body(c: httpx.AsyncClient, reg):
        r = await c.post("/models?url=m0.mar")
        assert r.status_code == 200, r.text
        assert r.json()["status"].endswith("registered with 2 initial workers")
        (desc,) = (await c.get("/models/m0")).json()
        assert (desc["minWorkers"], desc["maxWorkers"]) == (2, 2)

    _run(tmp_path, body, default_workers=2)


def test_scale_defaults_messages_and_versions(tmp_path, scaled):
    # ManagementRequestHandler.handleScaleModel / ApiUtils.updateModelWorkers
    async def body(c: httpx.AsyncClient, reg):
        await reg.register("m0.mar", initial_workers=0)
        await reg.register("v2/m0.mar", initial_workers=0)
        r = await c.put("/models/m0?min_worker=3&synchronous=true")
        assert r.json() == {"status": "Workers scaled to 3 for model: m0"}
        (desc,) = (await c.get("/models/m0")).json()
        assert (desc["minWorkers"], desc["maxWorkers"]) == (3, 3)  # max_worker = min_worker
        r = await c.put("/models/m0/2.0?min_worker=2&max_worker=4&synchronous=true")
        assert r.json() == {"status": "Workers scaled to 2 for model: m0, version: 2.0"}
        # model_version in the query names the version too
        r = await c.put("/models/m0?model_version=2.0&min_worker=1&synchronous=true")
        assert r.json() == {"status": "Workers scaled to 1 for model: m0, version: 2.0"}
        assert scaled[-1] == ("m0/2.0", 1)
        r = await c.put("/models/m0")  # min_worker 1, asynchronous
        assert (r.status_code, r.json()) == (202, {"status": "Processing worker updates..."})
        r = await c.put("/models/ghost?min_worker=3&max_worker=1")  # checked before the model
        assert r.status_code == 400
        assert r.json() == {
            "code": 400,
            "type": "BadRequestException",
            "message": "max_worker cannot be less than min_worker.",
        }
        r = await c.put("/models/m0/7.0?min_worker=1")
        assert (r.status_code, r.json()["type"]) == (404, "ModelVersionNotFoundException")
        assert r.json()["message"] == "Model version: 7.0 does not exist for model: m0"

    _run(tmp_path, body)


def test_list_models_paging_follows_torchserve(tmp_path, scaled):
    # ApiUtils.getModelList
    async def body(c: httpx.AsyncClient, reg):
        for i in range(3):
            await reg.register(f"m{i}.mar", initial_workers=0)

        async def page(q: str) -> dict:
            r = await c.get(f"/models{q}")
            assert r.status_code == 200, r.text
            return r.json()

        # a page that reaches its limit carries a token, even at the end
        doc = await page("?limit=3")
        assert doc["nextPageToken"] == "3" and len(doc["models"]) == 3
        assert await page("?limit=2&next_page_token=2") == {
            "models": [{"modelName": "m2", "modelUrl": "m2.mar"}]
        }
        assert "nextPageToken" not in await page("?limit=4")
        assert await page("?limit=0") == {"nextPageToken": "0", "models": []}
        for q in ("?limit=-1", "?limit=101", "?limit=abc", "?next_page_token=-2",
                  "?next_page_token=x"):  # fmt: skip
            doc = await page(q)
            assert [m["modelName"] for m in doc["models"]] == ["m0", "m1", "m2"], q
            assert "nextPageToken" not in doc, q

    _run(tmp_path, body)


def test_unregister_and_set_default(tmp_path, scaled):
    # ManagementRequestHandler.handleUnregisterModel / setDefaultModelVersion, ApiUtils
    async def body(c: httpx.AsyncClient, reg):
        await reg.register("m0.mar", initial_workers=0)
        await reg.register("v2/m0.mar", initial_workers=0)
        for path in ("/models/m0", "/models/m0/1.0"):  # the default goes last
            r = await c.delete(path)
            assert r.status_code == 403, path
            assert r.json() == {
                "code": 403,
                "type": "InvalidModelVersionException",
                "message": "Cannot remove default version for model m0",
            }
        r = await c.put("/models/m0/3.0/set-default")
        assert r.status_code == 404
        assert r.json()["type"] == "ModelVersionNotFoundException"
        assert r.json()["message"] == "Model version 3.0 does not exist for model m0"
        r = await c.put("/models/ghost/1.0/set-default")
        assert (r.status_code, r.json()["type"]) == (404, "ModelNotFoundException")
        assert r.json()["message"] == "Model not found: ghost"
        r = await c.put("/models/m0/2.0/set-default")
        assert r.json() == {
            "status": 'Default version successfully updated for model "m0" to "2.0"'
        }
        r = await c.delete("/models/m0/1.0")
        assert (r.status_code, r.json()) == (200, {"status": 'Model "m0" unregistered'})
        r = await c.delete("/models/m0/1.0")
        assert (r.status_code, r.json()["type"]) == (404, "ModelVersionNotFoundException")
        r = await c.delete("/models/m0")  # the last version may go
        assert (r.status_code, r.json()) == (200, {"status": 'Model "m0" unregistered'})

    _run(tmp_path, body)


def test_describe_fields_and_customized(tmp_path, scaled):
    # ApiUtils.createModelResponse (DescribeModelResponse), handleDescribeModel
    async def body(c: httpx.AsyncClient, reg):
        await reg.register("m0.mar", initial_workers=0)
        (desc,) = (await c.get("/models/m0")).json()
        assert list(desc)[:10] == [
            "modelName", "modelVersion", "modelUrl", "runtime", "minWorkers", "maxWorkers",
            "batchSize", "maxBatchDelay", "responseTimeout", "startupTimeout",
        ]  # fmt: skip
        expected = {
            "maxRetryTimeoutInSec": 300,
            "clientTimeoutInMills": 0,
            "parallelType": "",
            "parallelLevel": 0,
            "continuousBatching": False,
            "useJobTicket": False,
            "useVenv": False,
            "stateful": False,
            "sequenceMaxIdleMSec": 0,
            "sequenceTimeoutMSec": 0,
            "maxNumSequence": 0,
            "maxSequenceJobQueueSize": 0,
            "loadedAtStartup": False,
            "workers": [],
        }
        assert {k: desc[k] for k in expected} == expected
        assert desc["deviceType"] in ("cpu", "gpu") and desc["startupTimeout"] == 120
        # customized=true asks the handler, which needs a worker
        r = await c.get("/models/m0?customized=true")
        assert r.status_code == 503
        assert r.json() == {
            "code": 503,
            "type": "ServiceUnavailableException",
            "message": 'Model "m0" has no worker to serve describe request. '
            "Please use scale workers API to add workers.",
        }
        # ... and is ignored for /all
        r = await c.get("/models/m0/all?customized=true")
        assert r.status_code == 200 and "customizedMetadata" not in r.json()[0]
        r = await c.get("/models/m0/9.0")
        assert (r.status_code, r.json()["type"]) == (404, "ModelVersionNotFoundException")

    _run(tmp_path, body, n_models=1)


def test_token_api_is_absent_without_token_auth(tmp_path, scaled):
    async def body(c: httpx.AsyncClient, reg):
        r = await c.post("/token?type=management")
        assert (r.status_code, r.json()["type"]) == (404, "ResourceNotFoundException")

    _run(tmp_path, body, n_models=1)


def test_kserve_v1_readiness_on_the_management_port(tmp_path, scaled):
    # ManagementRequestHandler.handleKF1ModelReady
    async def body(c: httpx.AsyncClient, reg):
        await reg.register("m0.mar", initial_workers=0)
        for path in ("/v1/models/m0", "/v1/models/m0:predict"):
            r = await c.get(path)
            assert r.json() == {"name": "m0", "ready": False}, path
        r = await c.get("/v1/models/ghost")
        assert (r.status_code, r.json()["type"]) == (404, "ModelNotFoundException")

    _run(tmp_path, body, n_models=1)
