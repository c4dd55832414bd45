"""The management app in-process (ASGI, no sockets): models registered with 0 workers need no
worker processes, so listing, paging, API control and auth are checked cheaply here."""

from __future__ import annotations

import asyncio
import json
import sys
from pathlib import Path

import httpx
import pytest

from modelport.entrypoints.torchserve.common import TSState
from modelport.entrypoints.torchserve.management import make_management_app
from modelport.entrypoints.torchserve.metrics import TSMetrics
from modelport.torchserve.auth import TokenAuth
from modelport.torchserve.errors import TSError
from modelport.torchserve.registry import ModelRegistry

sys.path.insert(0, str(Path(__file__).parent / "fixtures" / "torchserve"))
import ts_archives  # noqa: E402


def _run(tmp_path: Path, body, *, auth: bool = False, model_api: bool = True) -> None:
    store = tmp_path / "store"
    for i in range(5):
        ts_archives.echo_archive(store, tmp_path / f"w{i}", name=f"m{i}")

    async def main():
        reg = ModelRegistry(store, work_dir=tmp_path / "work")
        keys = TokenAuth(tmp_path / "key_file.json") if auth else None
        state = TSState(reg, TSMetrics(), keys, model_api=model_api)
        transport = httpx.ASGITransport(app=make_management_app(state))
        async with httpx.AsyncClient(transport=transport, base_url="http://ts") as client:
            try:
                await body(client, reg, keys)
            finally:
                await reg.stop()

    asyncio.run(main())


def test_list_pages_and_zero_worker_registration(tmp_path):
    async def body(c: httpx.AsyncClient, reg, _):
        for i in (3, 1, 4, 0, 2):
            r = await c.post(f"/models?url=m{i}.mar")
            assert r.status_code == 200, r.text
            assert r.json()["status"].endswith(
                "Use scale workers API to add workers for the model."
            )
        seen, token = [], "0"
        while token is not None:
            page = (await c.get(f"/models?limit=2&next_page_token={token}")).json()
            assert len(page["models"]) <= 2
            seen += [m["modelName"] for m in page["models"]]
            token = page.get("nextPageToken")
        assert seen == ["m0", "m1", "m2", "m3", "m4"]
        (desc,) = (await c.get("/models/m2")).json()
        assert (desc["minWorkers"], desc["workers"], desc["modelUrl"]) == (0, [], "m2.mar")
        assert desc["jobQueueStatus"] == {"remainingCapacity": 100, "pendingRequests": 0}
        # JSON bodies are accepted for registration, as TorchServe does
        r = await c.post(
            "/models", json={"url": "m0.mar", "model_name": "m0_json", "batch_size": 2}
        )
        assert r.status_code == 200, r.text
        (desc,) = (await c.get("/models/m0_json")).json()
        assert desc["batchSize"] == 2
        r = await c.delete("/models/m0_json/9.9")
        assert r.status_code == 404 and r.json()["type"] == "ModelVersionNotFoundException"

    _run(tmp_path, body)


def test_model_api_can_be_turned_off(tmp_path):
    async def body(c: httpx.AsyncClient, reg, _):
        await reg.register("m0.mar", initial_workers=0)
        r = await c.post("/models?url=m1.mar")
        assert r.status_code == 405 and r.json()["type"] == "MethodNotAllowedException"
        r = await c.delete("/models/m0")
        assert r.status_code == 405
        assert (await c.get("/models/m0")).status_code == 200  # reading still works

    _run(tmp_path, body, model_api=False)


def test_management_key_and_token_api(tmp_path):
    async def body(c: httpx.AsyncClient, reg, keys: TokenAuth):
        doc = json.loads(keys.key_file.read_text())
        assert set(doc) == {"management", "inference", "API"}
        assert oct(keys.key_file.stat().st_mode & 0o777) == "0o600"
        good = {"Authorization": f"Bearer {doc['management']['key']}"}
        assert (await c.get("/models", headers=good)).status_code == 200
        for bad in ({}, {"Authorization": "Bearer nope"}, {"Authorization": doc["management"]["key"]},
                    {"Authorization": f"Bearer {doc['inference']['key']}"}):  # fmt: skip
            r = await c.get("/models", headers=bad)
            assert r.status_code == 400 and r.json()["type"] == "InvalidKeyException"
        # only the API key may rotate keys; the old management key stops working
        r = await c.post("/token?type=management", headers=good)
        assert r.status_code == 400
        api = {"Authorization": f"Bearer {doc['API']['key']}"}
        r = await c.post("/token?type=management", headers=api)
        assert r.status_code == 200
        assert r.content == b""  # as TorchServe: the new key is in the key file only
        new = json.loads(keys.key_file.read_text())["management"]["key"]
        assert (await c.get("/models", headers=good)).status_code == 400
        assert (
            await c.get("/models", headers={"Authorization": f"Bearer {new}"})
        ).status_code == 200
        r = await c.post("/token?type=bogus", headers=api)
        assert r.status_code == 400 and r.json()["type"] == "InvalidKeyException"
        assert r.json()["message"].startswith("Token Authentication failed.")

    _run(tmp_path, body, auth=True)


def test_expired_keys_are_refused(tmp_path):
    keys = TokenAuth(tmp_path / "k.json", expiration_min=-1)  # already expired
    with pytest.raises(TSError) as ei:
        keys.check("inference", f"Bearer {keys.key('inference')}")
    assert ei.value.type == "InvalidKeyException"
