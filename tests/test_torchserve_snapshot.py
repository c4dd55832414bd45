"""TorchServe's config snapshots: `<yyyyMMddHHmmssSSS>-{startup,snapshot,shutdown}.cfg` in
$LOG_LOCATION/config, and the models they restore at the next start."""

from __future__ import annotations

import argparse
import asyncio
import json
import re
import shutil
import sys
from pathlib import Path

import httpx
import pytest
from fastapi import FastAPI

from modelport.entrypoints.cli_serve import add_common_args
from modelport.entrypoints.torchserve import frontend
from modelport.torchserve.ts_config import parse_properties

sys.path.insert(0, str(Path(__file__).parent / "fixtures" / "torchserve"))
import ts_archives  # noqa: E402

NAME = re.compile(r"^\d{17}-(startup|snapshot|shutdown)\.cfg$")


@pytest.fixture
def logs(tmp_path, monkeypatch) -> Path:
    monkeypatch.setenv("LOG_LOCATION", str(tmp_path / "logs"))
    return tmp_path / "logs" / "config"


@pytest.fixture
def store(tmp_path) -> Path:
    """echo 1.0 as echo.mar and echo 2.0 as echo_v2.mar."""
    store = tmp_path / "store"
    ts_archives.echo_archive(store, tmp_path / "w1")
    other = tmp_path / "v2"
    ts_archives.echo_archive(other, tmp_path / "w2", version="2.0", greeting="two")
    shutil.move(other / "echo.mar", store / "echo_v2.mar")
    return store


def _args(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    add_common_args(parser)
    frontend.add_serve_args(parser)
    args = parser.parse_args(
        ["--disable-token-auth", "--disable-grpc", "--management-port", "0", "--ts-workers", "1",
         *argv]
    )
    args.serve_frontends = (frontend.__name__,)
    return args


async def _start(args: argparse.Namespace) -> tuple[frontend.TorchServeService, FastAPI]:
    app = FastAPI()
    service = await frontend.build(args, app)
    await service.start()
    return service, app


def _snapshots(logs: Path) -> list[tuple[str, dict]]:
    """(kind, model_snapshot) of each snapshot file, oldest first."""
    out = []
    for p in sorted(logs.iterdir()):
        m = NAME.match(p.name)
        assert m, p.name
        props = parse_properties(p.read_text())
        doc = json.loads(props["model_snapshot"])
        assert doc["name"] == p.name and doc["modelCount"] == sum(map(len, doc["models"].values()))
        out.append((m.group(1), doc["models"]))
    return out


def test_changes_are_snapshotted_and_restored(logs, store):
    async def first_run():
        service, _ = await _start(_args("--model-store", str(store)))
        base = f"http://127.0.0.1:{service.management_port}"
        try:
            async with httpx.AsyncClient(base_url=base, timeout=60) as c:
                for q in (
                    "url=echo.mar&batch_size=3&max_batch_delay=50&initial_workers=0",
                    "url=echo_v2.mar&batch_size=2&response_timeout=30&initial_workers=1",
                ):
                    r = await c.post(f"/models?{q}")
                    assert r.status_code == 200, r.text
                r = await c.put("/models/echo/1.0?min_worker=0&max_worker=3&synchronous=true")
                assert r.status_code == 200, r.text
                r = await c.put("/models/echo/2.0/set-default")
                assert r.status_code == 200, r.text
        finally:
            await service.stop()

    asyncio.run(first_run())
    snaps = _snapshots(logs)
    kinds = [k for k, _ in snaps]
    assert kinds == ["startup"] + ["snapshot"] * 4 + ["shutdown"]
    assert snaps[0][1] == {}  # nothing loaded at startup
    assert list(snaps[1][1]["echo"]) == ["1.0"]  # after the first registration
    shutdown = snaps[-1][1]["echo"]
    assert shutdown["1.0"] == {
        "defaultVersion": False,
        "marName": "echo.mar",
        "minWorkers": 0,
        "maxWorkers": 3,
        "batchSize": 3,
        "maxBatchDelay": 50,
        "responseTimeout": 120,
        "runtimeType": "python",
    }
    v2 = shutdown["2.0"]
    assert (v2["defaultVersion"], v2["marName"], v2["minWorkers"], v2["maxWorkers"]) == (
        True,
        "echo_v2.mar",
        1,
        1,
    )
    assert (v2["batchSize"], v2["responseTimeout"]) == (2, 30)
    # java.util.Properties.store's format, so TorchServe reads it too
    text = sorted(logs.iterdir())[-1].read_text()
    assert text.startswith("#Saving snapshot\n#")
    assert 'model_snapshot={\\n  "name"\\: "' in text
    assert f"model_store={store}".replace(":", "\\:") in text

    async def second_run():  # no --models: the last snapshot (shutdown) is restored
        service, app = await _start(_args("--model-store", str(store)))
        try:
            reg = service.state.registry
            v1, v2 = reg.get("echo", "1.0"), reg.get("echo", "2.0")
            assert reg.get("echo").version == "2.0"  # the default version came back
            s1, s2 = v1.settings, v2.settings
            assert (s1.min_workers, s1.max_workers, s1.batch_size, s1.max_batch_delay_ms) == (
                0,
                3,
                3,
                50,
            )
            assert (s2.min_workers, s2.batch_size, s2.response_timeout_s) == (1, 2, 30)
            assert (v1.num_workers, v2.num_workers) == (0, 1)
            assert v1.loaded_at_startup and v2.loaded_at_startup
            transport = httpx.ASGITransport(app=app)
            async with httpx.AsyncClient(transport=transport, base_url="http://ts") as c:
                r = await c.post("/predictions/echo", content=b"hi")
            assert r.status_code == 200 and r.json()["version"] == "2.0", r.text
        finally:
            await service.stop()

    asyncio.run(second_run())
    assert [k for k, _ in _snapshots(logs)][-2:] == ["startup", "shutdown"]
    assert _snapshots(logs)[-1][1] == snaps[-1][1]


def _torchserve_snapshot(path: Path, store: Path, models: dict) -> Path:
    """A snapshot the way TorchServe's FSSnapshotSerializer writes it (Properties.store)."""
    doc = {"name": path.name, "modelCount": 1, "created": 1707366892822, "models": models}
    body = json.dumps(doc, indent=2).replace("\n", "\\n").replace(":", "\\:")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(
        "#Saving snapshot\n#Thu Feb 08 04:34:52 UTC 2024\n"
        f"model_snapshot={body}\n"
        f"model_store={str(store).replace(':', chr(92) + ':')}\n"
        "load_models=other\\=other.mar\n"
        "management_address=http\\://127.0.0.1\\:0\n"
    )
    return path


ECHO = {
    "echo": {
        "1.0": {
            "defaultVersion": True,
            "marName": "echo.mar",
            "minWorkers": 0,
            "maxWorkers": 4,
            "batchSize": 5,
            "maxBatchDelay": 70,
            "responseTimeout": 33,
        }
    }
}


def test_ts_config_snapshot_restores_its_models_not_load_models(tmp_path, logs, store):
    """`--ts-config <snapshot>` restores its model_snapshot; load_models and --models are
    ignored (TorchServe's ModelServer.initModelStore). Java escapes are read."""
    cfg = _torchserve_snapshot(tmp_path / "20240208043452822-shutdown.cfg", store, ECHO)

    async def main():
        service, _ = await _start(_args("--ts-config", str(cfg), "--models", "echo_v2.mar"))
        try:
            (mv,) = service.state.registry.all_versions()
            s = mv.settings
            assert (mv.version, s.min_workers, s.max_workers, s.batch_size) == ("1.0", 0, 4, 5)
            assert (s.max_batch_delay_ms, s.response_timeout_s) == (70, 33)
        finally:
            await service.stop()

    asyncio.run(main())
    startup = parse_properties(sorted(logs.iterdir())[0].read_text())
    assert startup["tsConfigFile"] == str(cfg)
    assert startup["management_address"] == "http://127.0.0.1:0"


def test_snapshot_with_a_missing_archive_fails_the_start(tmp_path, logs, store):
    (store / "echo.mar").unlink()
    cfg = _torchserve_snapshot(tmp_path / "20240208043452822-shutdown.cfg", store, ECHO)
    with pytest.raises(RuntimeError, match="not found in model store"):
        asyncio.run(_start(_args("--ts-config", str(cfg))))


def test_ncs_writes_no_snapshot_and_restores_none(logs, store):
    last = _torchserve_snapshot(logs / "20240208043452822-shutdown.cfg", store, ECHO)

    async def main(*argv: str, register: bool = True) -> list[str]:
        service, _ = await _start(_args("--model-store", str(store), *argv))
        try:
            names = service.state.registry.names()
            if not register:
                return names
            base = f"http://127.0.0.1:{service.management_port}"
            async with httpx.AsyncClient(base_url=base, timeout=60) as c:
                r = await c.post("/models?url=echo_v2.mar&model_name=other&initial_workers=0")
                assert r.status_code == 200, r.text
            return names
        finally:
            await service.stop()

    assert asyncio.run(main("--ncs")) == []
    assert list(logs.iterdir()) == [last]  # nothing written
    assert asyncio.run(main("--no-config-snapshots")) == []
    assert list(logs.iterdir()) == [last]
    # --models given: modelport loads those, not the last snapshot (TorchServe ignores them)
    assert asyncio.run(main("--models", "echo_v2.mar")) == ["echo"]
    # and without either, the last snapshot (the one just written at shutdown) comes back
    assert asyncio.run(main(register=False)) == ["echo", "other"]


def test_workflow_nodes_are_left_out(logs, store):
    """TorchServe's snapshots do not support workflows: a workflow's node models
    (`<workflow>__<node>`) are not written, so a restore never registers them as models."""
    from modelport.entrypoints.torchserve.snapshots import make_snapshot_manager
    from modelport.torchserve.registry import ModelRegistry
    from modelport.torchserve.ts_config import TSConfig

    class Workflows:
        def names(self) -> list[str]:
            return ["wf"]

    async def main() -> Path:
        reg = ModelRegistry(store)
        try:
            for name in ("echo", "wf__pre", "wfx"):
                await reg.register("echo.mar", model_name=name, initial_workers=0)
            args = _args("--model-store", str(store))
            manager = make_snapshot_manager(args, None, TSConfig(), reg, Workflows())
            path = manager.save()
            assert path is not None
            return path
        finally:
            await reg.stop()

    path = asyncio.run(main())
    doc = json.loads(parse_properties(path.read_text())["model_snapshot"])
    assert sorted(doc["models"]) == ["echo", "wfx"] and doc["modelCount"] == 2
