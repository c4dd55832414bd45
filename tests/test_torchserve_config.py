"""config.properties parsing, model settings validation, and the registry's URL rules."""

from __future__ import annotations

import asyncio
import json
import sys
from pathlib import Path

import pytest

from modelport.torchserve.errors import TSError
from modelport.torchserve.registry import ModelRegistry
from modelport.torchserve.ts_config import (
    ModelSettings,
    load_ts_config,
    model_overrides,
    parse_properties,
)

sys.path.insert(0, str(Path(__file__).parent / "fixtures" / "torchserve"))
import ts_archives  # noqa: E402

HERE = Path(__file__).parent / "fixtures" / "torchserve"


def test_properties_syntax():
    text = (
        "# comment\n! also a comment\n"
        "inference_address=http://0.0.0.0:8080\n"
        "management_address: http://127.0.0.1:9081\n"
        'models={\\\n  "a": {"1.0": {"marName": "a.mar"}}\\\n}\n'
        "empty=\n"
    )
    props = parse_properties(text)
    assert props["inference_address"] == "http://0.0.0.0:8080"
    assert props["management_address"] == "http://127.0.0.1:9081"
    assert props["models"].replace(" ", "") == '{"a":{"1.0":{"marName":"a.mar"}}}'
    assert props["empty"] == ""


def test_load_ts_config(tmp_path):
    p = tmp_path / "config.properties"
    p.write_text(
        "management_address=http://127.0.0.1:9081\n"
        "model_store=/models\n"
        "load_models=a.mar, b.mar\n"
        'models={"a": {"2.0": {"defaultVersion": true, "marName": "a.mar", "batchSize": 8, '
        '"maxBatchDelay": 50, "minWorkers": 2, "maxWorkers": 4, "responseTimeout": 30}}}\n'
        "allowed_urls=https://s3.amazonaws.com/.*,file:///opt/models/.*\n"
        "disable_token_authorization=true\n"
        "default_workers_per_model=3\n"
        "some_java_option=1\n"
    )
    cfg = load_ts_config(p)
    assert cfg.management_address == ("127.0.0.1", 9081)
    assert cfg.model_store == "/models" and cfg.load_models == ("a.mar", "b.mar")
    (entry,) = cfg.models
    assert (entry.name, entry.version, entry.mar_name, entry.default) == ("a", "2.0", "a.mar", True)
    assert entry.overrides == {
        "batch_size": 8,
        "max_batch_delay_ms": 50,
        "min_workers": 2,
        "max_workers": 4,
        "response_timeout_s": 30.0,
    }
    assert cfg.allowed_urls == ("https://s3.amazonaws.com/.*", "file:///opt/models/.*")
    assert cfg.disable_token_authorization and cfg.default_workers_per_model == 3
    assert cfg.extra == {"some_java_option": "1"}


def test_bad_config_values_fail_clearly(tmp_path):
    p = tmp_path / "c.properties"
    p.write_text("models={not json\n")
    with pytest.raises(ValueError, match="not valid JSON"):
        load_ts_config(p)
    p.write_text("allowed_urls=([unclosed\n")
    with pytest.raises(Exception, match="unterminated|missing"):
        load_ts_config(p)
    with pytest.raises(ValueError, match="max_worker"):
        ModelSettings(min_workers=3, max_workers=1)
    with pytest.raises(ValueError, match="batch_size"):
        ModelSettings(batch_size=0)
    assert model_overrides({"batchSize": "4", "unknown": 1}) == {"batch_size": 4}


def test_url_resolution_rules(tmp_path):
    store = tmp_path / "store"
    store.mkdir()
    (store / "a.mar").write_bytes(b"")
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    (outside / "b.mar").write_bytes(b"")
    reg = ModelRegistry(store, allowed_urls=(rf"file://{outside}/.*",), work_dir=tmp_path / "w")
    assert reg.resolve_url("a.mar") == (store / "a.mar").resolve()
    assert reg.resolve_url(str(store / "a.mar")) == (store / "a.mar").resolve()
    assert reg.resolve_url(f"file://{outside}/b.mar") == (outside / "b.mar").resolve()
    strict = ModelRegistry(store, work_dir=tmp_path / "w2")
    for url, code in [
        (f"file://{outside}/b.mar", 404),  # outside the store and not allowed
        ("../elsewhere/b.mar", 404),
        ("https://example.com/a.mar", 404),
        ("http://[::1/a.mar", 400),
        ("s3://bucket/a.mar", 400),
        ("", 400),
    ]:
        with pytest.raises(TSError) as ei:
            strict.resolve_url(url)
        assert ei.value.code == code, (url, ei.value.to_json())


def test_model_yaml_settings_and_tgz_served_in_process(tmp_path):
    """The archive's model-config YAML sets batch size and workers; a tgz archive serves."""
    cfg = tmp_path / "model-config.yaml"
    cfg.write_text(
        "batchSize: 3\nmaxBatchDelay: 20\nminWorkers: 1\nmaxWorkers: 2\njobQueueSize: 7\n"
    )
    src = ts_archives.echo_archive(
        tmp_path / "store", tmp_path / "w", name="yecho", config_file=cfg, archive_format="tgz"
    )

    async def main():
        from modelport.torchserve.messages import InputParam, RequestItem

        reg = ModelRegistry(tmp_path / "store", work_dir=tmp_path / "work")
        try:
            mv = await reg.register(src.name)
            assert (mv.settings.batch_size, mv.settings.max_batch_delay_ms) == (3, 20)
            assert (mv.settings.min_workers, mv.settings.max_workers, mv.num_workers) == (1, 2, 1)
            assert mv.settings.job_queue_size == 7  # TorchServe: the YAML's, where > 0
            items = [
                RequestItem(str(i), [InputParam("data", "text/plain", b"v")]) for i in range(3)
            ]
            outs = await asyncio.gather(*(mv.predict(it) for it in items))
            import json

            bodies = [json.loads(o.response.body) for o in outs]
            assert [b["batch"] for b in bodies] == [3, 3, 3]
            assert bodies[0]["keys"] == ["data"] and bodies[0]["echo"] == "v"
            with pytest.raises(TSError) as ei:
                await reg.register(src.name)
            assert ei.value.code == 409
        finally:
            await reg.stop()
        assert not (tmp_path / "work").exists()

    asyncio.run(main())


GPU_ID_HANDLER = """
def handle(data, context):
    if data is None:
        return None
    return [str(context.system_properties.get("gpu_id")) for _ in data]
"""


@pytest.mark.parametrize(
    "yaml, expected",
    [
        ("", [0, 1, 2]),  # spread over the visible GPUs
        ("deviceType: cpu\n", [None, None, None]),  # a CPU model stays off the GPUs
        ("deviceType: gpu\ndeviceIds: [2, 3]\n", [2, 3, 2]),  # only the listed GPUs
        ("deviceIds: [1, 9]\n", [0, 1, 2]),  # an id out of range voids the list
    ],
)
def test_model_yaml_device_type_and_ids_place_the_workers(tmp_path, monkeypatch, yaml, expected):
    """TorchServe (Model, WorkLoadManager): `deviceType: cpu` in the model-config YAML gives
    the workers no gpu_id, `deviceIds` limits them to those GPUs. GPUs are faked (the gpu_id
    only reaches the handler's context, which says what it got)."""
    import functools

    from modelport.torchserve import model as ts_model
    from modelport.torchserve.messages import InputParam, RequestItem

    monkeypatch.setattr(ts_model, "gpu_count", functools.cache(lambda: 4))
    handler = tmp_path / "gpu_id_handler.py"
    handler.write_text(GPU_ID_HANDLER)
    cfg = tmp_path / "model-config.yaml"
    cfg.write_text(yaml + "minWorkers: 3\nmaxWorkers: 3\n")
    ts_archives.archive(tmp_path / "store", "dev", handler, config_file=cfg)

    async def main():
        reg = ModelRegistry(tmp_path / "store", work_dir=tmp_path / "work")
        try:
            mv = await reg.register("dev.mar")
            assert [w["gpuId"] for w in mv.describe()["workers"]] == expected
            assert mv.describe()["deviceType"] == ("cpu" if expected[0] is None else "gpu")
            out = await mv.predict(RequestItem("r", [InputParam("body", "", b"x")]))
            assert out.response.body.decode() in {str(g) for g in expected}
        finally:
            await reg.stop()

    asyncio.run(main())


@pytest.mark.parametrize("number_of_gpu, expected", [(0, [None] * 3), (2, [0, 1, 0])])
def test_number_of_gpu_limits_the_gpus_workers_use(tmp_path, monkeypatch, number_of_gpu,
                                                    expected):  # fmt: skip
    """config.properties number_of_gpu: TorchServe uses min(number_of_gpu, the GPUs there
    are), so number_of_gpu=0 serves on CPU only. 4 GPUs are faked."""
    import functools

    from fastapi import FastAPI

    from modelport.torchserve import model as ts_model

    monkeypatch.setattr(ts_model, "gpu_count", functools.cache(lambda: 4))
    handler = tmp_path / "gpu_id_handler.py"
    handler.write_text(GPU_ID_HANDLER)
    yaml = tmp_path / "model-config.yaml"
    yaml.write_text("minWorkers: 3\nmaxWorkers: 3\n")
    store = tmp_path / "store"
    ts_archives.archive(store, "dev", handler, config_file=yaml)
    props = tmp_path / "config.properties"
    props.write_text(f"model_store={store}\nload_models=dev.mar\nnumber_of_gpu={number_of_gpu}\n"
                     "management_address=http://127.0.0.1:0\n"
                     "metrics_address=http://127.0.0.1:0\n")  # fmt: skip
    assert load_ts_config(props).number_of_gpu == number_of_gpu
    frontend, args = _serve_args(["--ts-config", str(props), "--disable-token-auth",
                                  "--disable-grpc", "--ncs"])  # fmt: skip
    args.serve_frontends = (frontend.__name__,)

    async def main():
        service = await frontend.build(args, FastAPI())
        await service.start()
        try:
            desc = service.state.registry.get("dev").describe()
            assert [w["gpuId"] for w in desc["workers"]] == expected
        finally:
            await service.stop()

    asyncio.run(main())


def _serve_args(argv: list[str]):
    import argparse

    from modelport.entrypoints.cli_serve import add_common_args
    from modelport.entrypoints.torchserve import frontend

    parser = argparse.ArgumentParser()
    add_common_args(parser)
    frontend.add_serve_args(parser)
    return frontend, parser.parse_args(argv)


def test_frontend_plan_from_cli_and_config(tmp_path):
    store = tmp_path / "store"
    store.mkdir()
    for name in ("a.mar", "b.tar.gz", "notes.txt"):
        (store / name).write_bytes(b"")
    (store / "folder" / "MAR-INF").mkdir(parents=True)
    (store / "folder" / "MAR-INF" / "MANIFEST.json").write_text("{}")

    frontend, args = _serve_args(["--model-store", str(store), "--models", "all"])
    assert frontend.wants(args)
    plan = frontend._plan(args, load_ts_config_text(tmp_path, ""))
    assert plan.startup == ((None, "a.mar"), (None, "b.tar.gz"), (None, "folder"))
    assert plan.management == ("127.0.0.1", 8081) and plan.inference is None

    frontend, args = _serve_args(
        ["--models", "x=a.mar", "b.tar.gz", "--management-port", "9999", "--inference-port", "0"]
    )
    plan = frontend._plan(args, load_ts_config_text(tmp_path, ""))
    assert plan.startup == (("x", "a.mar"), (None, "b.tar.gz"))
    assert plan.management == ("127.0.0.1", 9999) and plan.inference == ("127.0.0.1", 0)

    cfg = load_ts_config_text(
        tmp_path,
        "management_address=http://0.0.0.0:7071\nload_models=a.mar\ndefault_workers_per_model=2\n"
        "inference_address=http://127.0.0.1:7070\nmetrics_address=http://127.0.0.1:7072\n",
    )
    frontend, args = _serve_args(["--ts-config", "c.properties"])
    assert frontend.wants(args)
    plan = frontend._plan(args, cfg)
    assert plan.startup == ((None, "a.mar"),) and plan.workers == 2
    assert plan.management == ("0.0.0.0", 7071)
    assert plan.inference == ("127.0.0.1", 7070) and plan.metrics == ("127.0.0.1", 7072)

    frontend, args = _serve_args(["--port", "8000"])
    assert not frontend.wants(args)


def load_ts_config_text(tmp_path: Path, text: str):
    p = tmp_path / "c.properties"
    p.write_text(text)
    return load_ts_config(p)


def test_requirements_file_installed_only_when_allowed(tmp_path):
    wheel = ts_archives.tiny_wheel(tmp_path / "wheels", value=7)
    req = tmp_path / "requirements.txt"
    req.write_text(f"{wheel}\n")
    store = tmp_path / "store"
    ts_archives.archive(store, "dep", HERE / "dep_handler.py", requirements_file=req)

    async def main():
        from modelport.torchserve.messages import InputParam, RequestItem

        strict = ModelRegistry(store, work_dir=tmp_path / "w1")
        try:
            with pytest.raises(TSError) as ei:  # not installed: the handler cannot import
                await strict.register("dep.mar")
            assert ei.value.code == 500 and "tinydep" in ei.value.message
            assert strict.names() == []
        finally:
            await strict.stop()
        allowed = ModelRegistry(store, work_dir=tmp_path / "w2", install_py_dep_per_model=True)
        try:
            mv = await allowed.register("dep.mar")
            out = await mv.predict(RequestItem("r", [InputParam("body", "text/plain", b"x")]))
            assert json.loads(out.response.body) == {"value": 7}
        finally:
            await allowed.stop()

    asyncio.run(main())


UPPER_HANDLER = """
def handle(data, context):
    if data is None:
        return None
    return [str(x).upper() for x in data]
"""


@pytest.mark.parametrize("envelope", ["kserve", None])
def test_service_envelope_wraps_every_handler(tmp_path, envelope):
    """config.properties service_envelope=kserve: the handler gets the request's "instances"
    and the answer is {"predictions": [...]}, as TorchServe's KServe envelope does."""
    from fastapi import FastAPI

    from modelport.torchserve.messages import InputParam, RequestItem

    handler = tmp_path / "upper_handler.py"
    handler.write_text(UPPER_HANDLER)
    store = tmp_path / "store"
    ts_archives.archive(store, "upper", handler)
    props = tmp_path / "config.properties"
    props.write_text(f"model_store={store}\nload_models=upper.mar\n"
                     + (f"service_envelope={envelope}\n" if envelope else "")
                     + "management_address=http://127.0.0.1:0\n"
                     "metrics_address=http://127.0.0.1:0\n")  # fmt: skip
    assert load_ts_config(props).service_envelope == envelope
    frontend, args = _serve_args(["--ts-config", str(props), "--disable-token-auth",
                                  "--disable-grpc", "--ncs"])  # fmt: skip
    args.serve_frontends = (frontend.__name__,)
    body = json.dumps({"instances": ["a", "b"]}).encode()

    async def main():
        service = await frontend.build(args, FastAPI())
        await service.start()
        try:
            mv = service.state.registry.get("upper")
            out = await mv.predict(RequestItem("r", [InputParam("body", "application/json", body)]))
            return bytes(out.response.body).decode()
        finally:
            await service.stop()

    got = asyncio.run(main())
    if envelope:
        assert json.loads(got) == {"predictions": ["A", "B"]}
    else:  # no envelope: the handler gets TorchServe's request rows, the JSON body in one
        assert got == str({"body": {"instances": ["a", "b"]}}).upper()


def test_unknown_service_envelope_is_refused(tmp_path):
    props = tmp_path / "config.properties"
    props.write_text("service_envelope=soap\n")
    with pytest.raises(ValueError, match="kserve, kservev2"):
        load_ts_config(props)


def test_max_request_size_refuses_larger_bodies(tmp_path):
    """config.properties max_request_size (TorchServe's default 6553500 bytes): a larger body
    gets a 413 in TorchServe's error shape, whether it declares its length or streams."""
    from fastapi.testclient import TestClient
    from starlette.applications import Starlette
    from starlette.responses import JSONResponse
    from starlette.routing import Route

    from modelport.entrypoints.torchserve.common import error_response
    from modelport.entrypoints.torchserve.inference import request_item

    props = tmp_path / "config.properties"
    props.write_text("max_request_size=10\n")
    assert load_ts_config(props).max_request_size == 10
    props.write_text("job_queue_size=5\n")
    assert load_ts_config(props).max_request_size == 6553500

    async def p(request):  # noqa: ANN001, ANN202
        try:
            item = await request_item(request, 10)
        except TSError as e:
            return error_response(e)
        return JSONResponse({"bytes": len(item.params[0].value)})

    c = TestClient(Starlette(routes=[Route("/p", p, methods=["POST"])]))
    assert c.post("/p", content=b"a" * 10).json() == {"bytes": 10}
    big = c.post("/p", content=b"a" * 11)
    assert big.status_code == 413 and big.json()["type"] == "RequestEntityTooLarge", big.text
    streamed = c.post("/p", content=iter([b"a" * 6, b"a" * 6]))  # chunked: no length given
    assert streamed.status_code == 413 and "max_request_size 10" in streamed.json()["message"]
