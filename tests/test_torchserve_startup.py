"""`modelport serve` with TorchServe's config.properties: the settings of the models it loads at
startup (`models=` with `load_models=` / --models) and the addresses it listens on."""

from __future__ import annotations

import argparse
import asyncio
import json
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
from fastapi import FastAPI

from helpers.server_proc import free_port as _free_port
from helpers.server_proc import stop_server
from modelport.entrypoints.cli_serve import add_common_args
from modelport.entrypoints.torchserve import frontend
from modelport.torchserve.ts_config import load_ts_config

sys.path.insert(0, str(Path(__file__).parent / "fixtures" / "torchserve"))
import ts_archives  # noqa: E402

SETTINGS = {"batchSize": 4, "maxBatchDelay": 300, "responseTimeout": 20}


def _args(argv: list[str], *, alone: bool = True, workers: bool = True) -> argparse.Namespace:
    """`workers`: one worker per startup model unless its entry says otherwise (not one per
    CPU, TorchServe's default)."""
    parser = argparse.ArgumentParser()
    add_common_args(parser)
    frontend.add_serve_args(parser)
    args = parser.parse_args([*argv, *(["--ts-workers", "1"] if workers else [])])
    if alone:  # as cli_serve sets it when TorchServe is the only frontend chosen
        args.serve_frontends = (frontend.__name__,)
    return args


def _config(tmp_path: Path, text: str) -> Path:
    p = tmp_path / "config.properties"
    p.write_text(text)
    return p


def _models_json(entry: dict, name: str = "echo", version: str = "1.0") -> str:
    return json.dumps({name: {version: {"defaultVersion": True, **entry}}})


async def _started(args: argparse.Namespace) -> tuple[frontend.TorchServeService, FastAPI]:
    app = FastAPI()
    service = await frontend.build(args, app)
    await service.start()
    return service, app


# ---- models= settings for the models loaded at startup ----------------------------------------


def test_models_settings_apply_to_load_models_archive(tmp_path):
    """The reported setup: `load_models=echo.mar` plus a `models=` entry for it. Its batch
    settings show in the describe API and the predictions really run in batches of 4."""
    store = tmp_path / "store"
    ts_archives.echo_archive(store, tmp_path / "w")
    cfg = _config(
        tmp_path,
        f"model_store={store}\nload_models=echo.mar\n"
        f"models={_models_json({'marName': 'echo.mar', **SETTINGS})}\n"
        "management_address=http://127.0.0.1:0\n",
    )

    async def main():
        service, app = await _started(_args(["--ts-config", str(cfg), "--disable-token-auth"]))
        try:
            (desc,) = [mv.describe() for mv in service.state.registry.versions("echo")]
            assert (desc["batchSize"], desc["maxBatchDelay"], desc["responseTimeout"]) == (
                4,
                300,
                20,
            )
            assert desc["minWorkers"] == 1 and len(desc["workers"]) == 1
            transport = httpx.ASGITransport(app=app)
            async with httpx.AsyncClient(transport=transport, base_url="http://ts") as c:
                rs = await asyncio.gather(
                    *(c.post("/predictions/echo", content=f"r{i}".encode()) for i in range(4))
                )
            assert [r.status_code for r in rs] == [200] * 4, [r.text for r in rs]
            assert [r.json()["batch"] for r in rs] == [4] * 4
            assert rs[0].json()["batch_size"] == 4  # the handler's context says so too
        finally:
            await service.stop()

    asyncio.run(main())


@pytest.mark.parametrize(
    "load_models, cli, entry",
    [
        ("all", [], {"marName": "echo.mar"}),  # load_models=all
        ("", ["--models", "echo.mar"], {"marName": "echo.mar"}),  # --models on the command line
        ("", ["--models", "all"], {"marName": "echo.mar"}),
        # TorchServe's own key: the model's name and manifest version, whatever the marName
        ("echo.mar", [], {"marName": "elsewhere/echo-renamed.mar"}),
        ("", ["--models", "echo=echo.mar"], {"marName": "other.mar"}),
    ],
)
def test_models_settings_apply_to_every_startup_spec(tmp_path, load_models, cli, entry):
    store = tmp_path / "store"
    ts_archives.echo_archive(store, tmp_path / "w")
    # minWorkers 0: the settings are checked without starting worker processes
    models = _models_json({**entry, **SETTINGS, "minWorkers": 0, "maxWorkers": 2})
    cfg = _config(
        tmp_path,
        f"model_store={store}\nmodels={models}\nmanagement_address=http://127.0.0.1:0\n"
        + (f"load_models={load_models}\n" if load_models else ""),
    )
    args = _args(["--ts-config", str(cfg), "--disable-token-auth", *cli])

    async def main():
        service, _ = await _started(args)
        try:
            (mv,) = service.state.registry.versions("echo")
            s = mv.settings
            assert (s.batch_size, s.max_batch_delay_ms, s.response_timeout_s) == (4, 300, 20)
            assert (s.min_workers, s.max_workers, mv.num_workers) == (0, 2, 0)
            assert mv.loaded_at_startup
        finally:
            await service.stop()

    asyncio.run(main())


def test_models_without_load_models_loads_nothing(tmp_path):
    """TorchServe (ModelServer.initModelStore): with no load_models (nor --models) nothing is
    loaded at startup; `models=` only configures the models that are loaded."""
    store = tmp_path / "store"
    ts_archives.echo_archive(store, tmp_path / "w")
    models = _models_json({"marName": "echo.mar", **SETTINGS, "minWorkers": 0})
    cfg = _config(
        tmp_path,
        f"model_store={store}\nmodels={models}\nmanagement_address=http://127.0.0.1:0\n",
    )

    async def main():
        service, _ = await _started(_args(["--ts-config", str(cfg), "--disable-token-auth"]))
        try:
            assert service.plan.startup == ()
            assert service.state.registry.names() == []
        finally:
            await service.stop()

    asyncio.run(main())


def test_archive_yaml_config_wins_over_models_entry(tmp_path):
    """TorchServe (ModelManager.createModel, ModelServer.initModelStore): the archive's
    model-config YAML wins over its `models=` entry (values > 0; workers where
    0 < minWorkers <= maxWorkers); the entry fills what the YAML leaves out."""
    yaml = tmp_path / "model-config.yaml"
    yaml.write_text("batchSize: 3\nmaxBatchDelay: 20\nminWorkers: 1\nmaxWorkers: 2\n")
    store = tmp_path / "store"
    ts_archives.echo_archive(store, tmp_path / "w", config_file=yaml)
    entry = {"marName": "echo.mar", **SETTINGS, "minWorkers": 0, "maxWorkers": 3}
    cfg = _config(
        tmp_path,
        f"model_store={store}\nload_models=echo.mar\nmodels={_models_json(entry)}\n"
        "management_address=http://127.0.0.1:0\n",
    )

    async def main():
        service, _ = await _started(_args(["--ts-config", str(cfg), "--disable-token-auth"]))
        try:
            (mv,) = service.state.registry.versions("echo")
            s = mv.settings
            assert (s.batch_size, s.max_batch_delay_ms) == (3, 20)  # the YAML's
            assert s.response_timeout_s == 20  # the entry's: the YAML has none
            assert (s.min_workers, s.max_workers, mv.num_workers) == (1, 2, 1)  # the YAML's
        finally:
            await service.stop()

    asyncio.run(main())


def test_entries_matched_by_marName_keep_their_names_and_versions(tmp_path):
    """Two versions of one model in two archives that both say "echo 1.0" in their manifests:
    each archive gets its own entry by marName, with that entry's version and settings."""
    store = tmp_path / "store"
    ts_archives.echo_archive(store, tmp_path / "w1")
    (store / "echo.mar").rename(store / "echo_v1.mar")
    ts_archives.echo_archive(store, tmp_path / "w2")
    (store / "echo.mar").rename(store / "echo_v2.mar")
    models = {
        "echo": {
            "1.0": {"marName": "echo_v1.mar", "batchSize": 2, "minWorkers": 0},
            "2.0": {"marName": "echo_v2.mar", "batchSize": 8, "minWorkers": 0},
        }
    }
    cfg = _config(
        tmp_path,
        f"model_store={store}\nload_models=all\nmodels={json.dumps(models)}\n"
        "management_address=http://127.0.0.1:0\n",
    )

    async def main():
        service, _ = await _started(_args(["--ts-config", str(cfg), "--disable-token-auth"]))
        try:
            got = {
                mv.version: mv.settings.batch_size for mv in service.state.registry.versions("echo")
            }
            assert got == {"1.0": 2, "2.0": 8}
        finally:
            await service.stop()

    asyncio.run(main())


@pytest.mark.parametrize("first", ["echo.mar", "echo_v2.mar"])
def test_first_startup_version_listed_is_the_default(tmp_path, monkeypatch, first):
    """TorchServe loads startup archives one after the other, so the first version of a model
    it loads is its default. Here they load side by side: the first listed stays the default
    even when it is the slower to load."""
    from modelport.torchserve import registry

    store = tmp_path / "store"
    ts_archives.echo_archive(store, tmp_path / "w1")
    ts_archives.echo_archive(tmp_path / "v2", tmp_path / "w2", version="2.0")
    (tmp_path / "v2" / "echo.mar").rename(store / "echo_v2.mar")
    unpack = registry.unpack

    def slow_unpack(src, dest):  # noqa: ANN001, ANN202
        if Path(src).name == first:
            time.sleep(1.0)
        return unpack(src, dest)

    monkeypatch.setattr(registry, "unpack", slow_unpack)
    entries = {v: {"marName": mar, "minWorkers": 0, "maxWorkers": 1}
               for v, mar in (("1.0", "echo.mar"), ("2.0", "echo_v2.mar"))}  # fmt: skip
    cfg = _config(tmp_path, f"model_store={store}\nmodels={json.dumps({'echo': entries})}\n"
                            "management_address=http://127.0.0.1:0\n")  # fmt: skip
    listed = [first, *({"echo.mar", "echo_v2.mar"} - {first})]
    args = _args(["--ts-config", str(cfg), "--disable-token-auth", "--disable-grpc", "--ncs",
                  "--models", *listed])  # fmt: skip

    async def main():
        service, _ = await _started(args)
        try:
            assert service.state.registry.get("echo").url == first
        finally:
            await service.stop()

    asyncio.run(main())


def test_archive_entry_lookup(tmp_path):
    models = {
        "a": {"1.0": {"marName": "a.mar"}, "2.0": {"marName": "v2/a.mar"}},
        "b": {"1.0": {"marName": "shared.mar"}},
        "c": {"1.0": {"marName": "shared.mar"}},
    }
    cfg = load_ts_config(_config(tmp_path, f"models={json.dumps(models)}\n"))
    assert cfg.entry_for_archive("a.mar").version == "1.0"
    assert cfg.entry_for_archive("v2/a.mar").version == "2.0"  # the exact marName first
    assert cfg.entry_for_archive("/models/a.mar") is None  # a.mar or v2/a.mar: not decided
    assert cfg.entry_for_archive("shared.mar") is None  # two models: not decided
    assert cfg.entry_for_archive("shared.mar", "c").name == "c"
    assert cfg.entry_for_archive("a.mar", "b") is None  # NAME=FILE keeps to NAME's entries
    assert cfg.entry_for_model("a", "2.0").mar_name == "v2/a.mar"
    assert cfg.entry_for_model("a", "3.0") is None


# ---- listening addresses ----------------------------------------------------------------------


def test_plan_listens_on_config_inference_address(tmp_path):
    cfg = load_ts_config(
        _config(
            tmp_path,
            "inference_address=http://127.0.0.1:7070\nmanagement_address=http://127.0.0.1:7071\n",
        )
    )
    # TorchServe alone, no --port: the shared app moves to the configured address
    plan = frontend._plan(_args(["--ts-config", "c"]), cfg)
    assert plan.listen == ("127.0.0.1", 7070) and plan.inference is None
    # an explicit --port keeps it, even --port 8000, and inference_address is served besides
    for port in ("8000", "9000"):
        plan = frontend._plan(_args(["--ts-config", "c", "--port", port]), cfg)
        assert plan.listen is None and plan.inference == ("127.0.0.1", 7070)
    # other frontends in the process need the main port: as before
    plan = frontend._plan(_args(["--ts-config", "c"], alone=False), cfg)
    assert plan.listen is None and plan.inference == ("127.0.0.1", 7070)
    # --inference-port is an extra server, besides --port, as before
    plan = frontend._plan(_args(["--ts-config", "c", "--inference-port", "7080"]), cfg)
    assert plan.listen is None and plan.inference == ("127.0.0.1", 7080)
    # no inference_address in the config: TorchServe's default, 8080 (alone, no --port)
    plan = frontend._plan(_args(["--ts-config", "c"]), load_ts_config(_config(tmp_path, "")))
    assert plan.listen == ("127.0.0.1", 8080) and plan.inference is None
    plan = frontend._plan(_args(["--ts-config", "c"], alone=False), load_ts_config(
        _config(tmp_path, "")))
    assert plan.listen is None and plan.inference is None  # beside other frontends: --port


def test_plan_metrics_on_config_metrics_address_else_8082(tmp_path):
    empty = load_ts_config(_config(tmp_path, ""))
    # TorchServe alone: its default metrics_address, http://127.0.0.1:8082, --port or not
    for argv in (["--ts-config", "c"], ["--ts-config", "c", "--port", "9000"]):
        plan = frontend._plan(_args(argv), empty)
        assert plan.metrics == ("127.0.0.1", 8082) and plan.metrics_default
    # beside other frontends: only a configured metrics_address, as before
    assert frontend._plan(_args(["--ts-config", "c"], alone=False), empty).metrics is None
    cfg = load_ts_config(_config(tmp_path, "metrics_address=http://0.0.0.0:7072\n"))
    for alone in (True, False):
        plan = frontend._plan(_args(["--ts-config", "c"], alone=alone), cfg)
        assert plan.metrics == ("0.0.0.0", 7072) and not plan.metrics_default


def test_metrics_api_on_the_default_address(tmp_path, monkeypatch, caplog):
    """No metrics_address: GET /metrics answers on TorchServe's default address (8082 there;
    a free port here, so the test cannot collide), in Prometheus text with TorchServe's
    names. A busy default port is skipped with a warning; the rest still serves."""
    port = _free_port()
    monkeypatch.setattr(frontend, "DEFAULT_METRICS_ADDRESS", ("127.0.0.1", port))
    store = tmp_path / "store"
    ts_archives.echo_archive(store, tmp_path / "w")
    cfg = _config(tmp_path, f"model_store={store}\nload_models=echo.mar\n"
                            "management_address=http://127.0.0.1:0\n")
    empty = tmp_path / "empty"
    empty.mkdir()
    bare = _config(empty, "management_address=http://127.0.0.1:0\n")
    args = ["--disable-token-auth", "--disable-grpc"]

    async def main():
        service, app = await _started(_args(["--ts-config", str(cfg), *args]))
        try:
            assert service.metrics_port == port
            transport = httpx.ASGITransport(app=app)
            async with httpx.AsyncClient(transport=transport, base_url="http://ts") as c:
                r = await c.post("/predictions/echo", content=b"hi")
                assert r.status_code == 200, r.text
            async with httpx.AsyncClient() as c:
                r = await c.get(f"http://127.0.0.1:{port}/metrics")
            assert r.status_code == 200
            assert r.headers["content-type"].startswith("text/plain; version=0.0.4")
            assert "# TYPE ts_inference_requests_total counter" in r.text
            line = next(s for s in r.text.splitlines()
                        if s.startswith('ts_inference_requests_total{model_name="echo"'))
            assert float(line.rsplit(" ", 1)[1]) == 1
            assert 'ts_queue_latency_microseconds{model_name="echo"' in r.text
            # the default port is busy now: a second server starts without a metrics API
            with caplog.at_level("WARNING", logger="modelport.torchserve"):
                second, _ = await _started(_args(["--ts-config", str(bare), *args]))
            try:
                assert second.metrics_port is None and second.management_port
                assert f"metrics API not started: cannot bind TorchServe API to 127.0.0.1:{port}" \
                    in caplog.text
            finally:
                await second.stop()
        finally:
            await service.stop()

    asyncio.run(main())


def _serve(tmp_path: Path, port: int | None) -> tuple[set[int], str, dict[str, int]]:
    """Run `modelport serve --ts-config ...` (no models) until every port it should have is
    up; return the ports it listens on, its log, and the config's ports."""
    import psutil

    ports = {"inference": _free_port(), "management": _free_port(), "metrics": _free_port()}
    # TorchServe's gRPC APIs are on too, at the config's ports (7070/7071 when it has none)
    grpc_ports = {"grpc_inference": _free_port(), "grpc_management": _free_port()}
    cfg = _config(
        tmp_path,
        "".join(f"{k}_address=http://127.0.0.1:{p}\n" for k, p in ports.items())
        + "".join(f"{k}_port={p}\n" for k, p in grpc_ports.items()),
    )
    cmd = [sys.executable, "-m", "modelport", "serve", "--ts-config", str(cfg),
           "--disable-token-auth", *(["--port", str(port)] if port else [])]  # fmt: skip
    log_path = tmp_path / "serve.log"
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, cwd=tmp_path)
    try:
        deadline = time.monotonic() + 60
        for p in [*ports.values(), *([port] if port else [])]:
            while True:
                assert proc.poll() is None, log_path.read_text()
                assert time.monotonic() < deadline, log_path.read_text()
                try:
                    httpx.get(f"http://127.0.0.1:{p}/ping", timeout=1)
                    break
                except httpx.HTTPError:
                    time.sleep(0.2)
        for p in grpc_ports.values():
            while True:
                with socket.socket() as sock:
                    if sock.connect_ex(("127.0.0.1", p)) == 0:
                        break
                assert proc.poll() is None and time.monotonic() < deadline, log_path.read_text()
                time.sleep(0.2)
        ports.update(grpc_ports)
        listening = {
            c.laddr.port
            for c in psutil.Process(proc.pid).net_connections(kind="tcp")
            if c.status == psutil.CONN_LISTEN
        }
    finally:
        stop_server(proc)
    return listening, log_path.read_text(), ports


def test_serve_binds_only_the_config_addresses(tmp_path):
    listening, log, ports = _serve(tmp_path, None)
    assert listening == set(ports.values()), log  # and not --port's default 8000
    assert f"serving on http://127.0.0.1:{ports['inference']}" in log
    assert f"management API on http://127.0.0.1:{ports['management']}" in log
    assert f"metrics API on http://127.0.0.1:{ports['metrics']}" in log
    assert ":8000" not in log


def test_serve_with_explicit_port_keeps_it(tmp_path):
    port = _free_port()
    listening, log, ports = _serve(tmp_path, port)
    assert listening == {port, *ports.values()}, log
    assert f"serving on http://127.0.0.1:{port}" in log
    assert f"inference API on http://127.0.0.1:{ports['inference']}" in log


def _register_over_management(tmp_path: Path, props: str, query: str, *, yaml: str | None = None):
    """Start with nothing loaded, `POST /models?url=echo.mar&...` and return the settings."""
    store = tmp_path / "store"
    config_file = None
    if yaml is not None:
        config_file = tmp_path / "model-config.yaml"
        config_file.write_text(yaml)
    ts_archives.echo_archive(store, tmp_path / "w", config_file=config_file)
    cfg = _config(
        tmp_path,
        f"model_store={store}\n{props}management_address=http://127.0.0.1:0\n",
    )

    async def main():
        service, _ = await _started(_args(["--ts-config", str(cfg), "--disable-token-auth"]))
        try:
            assert service.state.registry.names() == []  # models= alone loads nothing here
            url = f"http://127.0.0.1:{service.management_port}/models?url=echo.mar&{query}"
            async with httpx.AsyncClient(timeout=60) as c:
                r = await c.post(url)
            assert r.status_code == 200, r.text
            (mv,) = service.state.registry.versions("echo")
            return mv.settings, mv.num_workers, r.json()["status"]
        finally:
            await service.stop()

    return asyncio.run(main())


def test_management_registration_picks_up_the_models_entry(tmp_path):
    """TorchServe's ModelManager.createModel reads the `models=` entry of the model's name and
    version for a model registered over the management API: batch_size and max_batch_delay
    left out of the query come from it; response_timeout comes from it even when the query
    gives one. Its worker counts and defaultVersion apply at startup only."""
    entry = {"marName": "echo.mar", **SETTINGS, "minWorkers": 2, "maxWorkers": 3}
    props = f"models={_models_json(entry)}\n"
    s, workers, _ = _register_over_management(tmp_path, props, "synchronous=true")
    assert (s.batch_size, s.max_batch_delay_ms, s.response_timeout_s) == (4, 300, 20)
    assert (s.min_workers, s.max_workers, workers) == (0, 0, 0)  # initial_workers, not the entry's


def test_management_query_wins_for_batching_but_not_for_the_timeout(tmp_path):
    entry = {"marName": "echo.mar", **SETTINGS}
    props = f"models={_models_json(entry)}\n"
    query = "batch_size=2&max_batch_delay=7&response_timeout=90&initial_workers=1&synchronous=true"
    s, workers, _ = _register_over_management(tmp_path, props, query)
    assert (s.batch_size, s.max_batch_delay_ms) == (2, 7)  # the query's
    assert s.response_timeout_s == 20  # the entry's: TorchServe's query value is the fallback
    assert (s.min_workers, workers) == (1, 1)


def test_management_registration_yaml_over_entry_and_yaml_workers_over_initial(tmp_path):
    """The archive's YAML (values > 0) wins over the `models=` entry; its minWorkers/maxWorkers
    (0 < min <= max) win over initial_workers (TorchServe's ApiUtils.handleRegister)."""
    entry = {"marName": "echo.mar", **SETTINGS}
    props = f"models={_models_json(entry)}\n"
    yaml = "batchSize: 3\nresponseTimeout: 45\nminWorkers: 1\nmaxWorkers: 2\n"
    s, workers, status = _register_over_management(
        tmp_path, props, "initial_workers=0&synchronous=true", yaml=yaml
    )
    assert (s.batch_size, s.max_batch_delay_ms, s.response_timeout_s) == (3, 300, 45)
    assert (s.min_workers, s.max_workers, workers) == (1, 2, 1)
    assert "registered with 1 initial workers" in status
