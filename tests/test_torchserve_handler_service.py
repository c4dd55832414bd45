"""HandlerService in-process: a failing handler gives the status TorchServe's backend gives."""

from __future__ import annotations

import sys

import pytest

from modelport.torchserve.handler_service import HandlerService
from modelport.torchserve.messages import InputParam, RequestItem

HANDLER = """
from ts.utils.util import PredictionException


def handle(data, context):
    if data is None:
        return None
    what = data[0]["body"]
    if what == "value":
        raise ValueError("bad input row")
    if what == "cuda":
        raise RuntimeError("CUDA out of memory. Tried to allocate 2.00 GiB")
    if what == "memory":
        raise MemoryError()
    if what == "prediction":
        raise PredictionException("the handler says no", 422)
    if what == "not-a-list":
        return {"x": 1}
    return [what for _ in data]
"""


@pytest.fixture
def service(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # HandlerService moves into the model folder, as a worker does
    monkeypatch.setattr(sys, "path", list(sys.path))
    model_dir = tmp_path / "model"
    model_dir.mkdir()
    (model_dir / "raising_handler_t.py").write_text(HANDLER)
    return HandlerService("m", str(model_dir), "raising_handler_t.py")


def _run(service: HandlerService, body: str):
    return service.execute([RequestItem("r1", [InputParam("body", "text/plain", body.encode())])])


@pytest.mark.parametrize(
    "body, code, message",
    [
        ("value", 503, "ValueError: bad input row"),  # TorchServe: 503 "Prediction failed"
        ("cuda", 507, "CUDA out of memory"),  # TorchServe: 507 "Out of resources"
        ("memory", 507, "Out of resources"),
        ("prediction", 422, "the handler says no"),  # PredictionException: its own code
        ("not-a-list", 503, "Invalid model predict output"),
    ],
)
def test_handler_failures_map_to_torchserve_codes(service, body, code, message):
    result = _run(service, body)
    assert result.responses is None
    assert result.error_code == code and message in result.error_message


def test_handler_success_still_answers(service):
    result = _run(service, "fine")
    assert result.error_code == 0 and [r.body for r in result.responses] == [b"fine"]


def test_prediction_exception_over_http_is_torchserves_answer(tmp_path):
    """TorchServe's frontend (RestJob.sendError) answers a handler's
    PredictionException(message, error_code) with that code as the status and
    {"code", "type": "InternalServerException", "message": message}; 413 becomes 507."""
    import asyncio
    from pathlib import Path

    import httpx
    from fastapi import FastAPI

    from modelport.entrypoints.torchserve.common import TSState
    from modelport.entrypoints.torchserve.inference import make_inference_router
    from modelport.entrypoints.torchserve.metrics import TSMetrics
    from modelport.torchserve.registry import ModelRegistry

    sys.path.insert(0, str(Path(__file__).parent / "fixtures" / "torchserve"))
    import ts_archives

    ts_archives.echo_archive(tmp_path / "store", tmp_path / "w")

    async def main():
        reg = ModelRegistry(tmp_path / "store", work_dir=tmp_path / "work")
        app = FastAPI()
        app.include_router(make_inference_router(TSState(reg, TSMetrics(), None)))
        try:
            await reg.register("echo.mar", initial_workers=1)
            transport = httpx.ASGITransport(app=app)
            async with httpx.AsyncClient(transport=transport, base_url="http://ts") as c:
                for sent, status in (("422:the handler says no", 422), ("413:too big", 507),
                                     ("404:no such thing", 404)):
                    r = await c.post("/predictions/echo", content=f"predict_error:{sent}")
                    message = sent.split(":", 1)[1]
                    assert r.status_code == status, r.text
                    assert r.json() == {"code": status, "type": "InternalServerException",
                                        "message": message}
                r = await c.post("/predictions/echo", content=b"fine")
                assert r.status_code == 200 and r.json()["echo"] == "fine"
        finally:
            await reg.stop()

    asyncio.run(main())


PROBE = """
import json


def handle(data, context):
    if data is None:
        return None
    return [
        json.dumps({
            "types": {k: type(v).__name__ for k, v in row.items()},
            "x_token": context.get_request_header(i, "X-Token"),
            "content_type": context.get_request_header(i, "Content-Type"),
        })
        for i, row in enumerate(data)
    ]
"""


def _answers(tmp_path, source: str, requests: list[dict], **register) -> list:
    """Serve a handler (its source) as model "m" over the inference API in-process, send it
    each of `requests` (httpx.post keyword arguments) and return the httpx responses."""
    import asyncio
    from pathlib import Path

    import httpx
    from fastapi import FastAPI

    from modelport.entrypoints.torchserve.common import TSState
    from modelport.entrypoints.torchserve.inference import make_inference_router
    from modelport.entrypoints.torchserve.metrics import TSMetrics
    from modelport.torchserve.registry import ModelRegistry

    sys.path.insert(0, str(Path(__file__).parent / "fixtures" / "torchserve"))
    import ts_archives

    handler = tmp_path / "probe_handler.py"
    handler.write_text(source)
    ts_archives.archive(tmp_path / "store", "m", handler)

    async def main() -> list:
        reg = ModelRegistry(tmp_path / "store", work_dir=tmp_path / "work")
        app = FastAPI()
        app.include_router(make_inference_router(TSState(reg, TSMetrics(), None)))
        try:
            await reg.register("m.mar", initial_workers=1, **register)
            transport = httpx.ASGITransport(app=app)
            async with httpx.AsyncClient(transport=transport, base_url="http://ts") as c:
                return [
                    await c.request(kw.pop("method", "POST"), kw.pop("url", "/predictions/m"), **kw)
                    for kw in requests
                ]
        finally:
            await reg.stop()

    return asyncio.run(main())


def _probe(tmp_path, requests: list[dict]) -> list[dict]:
    """What a handler reporting its inputs' types and two headers answers to `requests`."""
    out = []
    for r in _answers(tmp_path, PROBE, requests):
        assert r.status_code == 200, r.text
        out.append(r.json())
    return out


def test_form_fields_and_query_parameters_reach_the_handler_as_bytes(tmp_path):
    """TorchServe's frontend (NettyUtils.getFormData) sends form fields and query parameters
    with no content type, so its backend decodes none of them: a handler that calls
    .decode() on them must keep working. Uploaded files keep their part's content type.
    Query parameters are inputs only on the SageMaker paths: TorchServe 0.12's
    handlePredictions parses the request without its query (checked against torchserve 0.12)."""
    multipart, urlencoded, json_body, invocations = _probe(tmp_path, [
        {"url": "/predictions/m?mode=fast",
         "files": {"file": ("x.bin", b"\x00\x01"), "doc": ("d.json", b"{}", "application/json"),
                   "typed": (None, b'{"a": 1}', "application/json")},
         "data": {"data": "hello"}},
        {"url": "/predictions/m?mode=fast", "data": {"data": "hello"}},
        {"url": "/predictions/m?mode=fast", "json": {"a": 1}},
        {"url": "/invocations?model_name=m&mode=fast", "json": {"a": 1}},
    ])  # fmt: skip
    assert multipart["types"] == {"data": "bytearray", "file": "bytearray", "doc": "dict",
                                  "typed": "bytearray"}  # fmt: skip
    assert urlencoded["types"] == {"data": "bytearray"}
    assert json_body["types"] == {"body": "dict"}  # a JSON body is still decoded
    assert invocations["types"] == {"body": "dict", "model_name": "bytearray",
                                    "mode": "bytearray"}  # fmt: skip


URL_PATH_PROBE = """
import json


def handle(data, context):
    if data is None:
        return None
    return [json.dumps({"url_path": context.get_request_header(i, "url_path"),
                        "explain": context.get_request_header(i, "explain")})
            for i in range(len(data))]
"""


def test_predictions_take_any_method_and_pass_url_path_and_explain(tmp_path):
    """As TorchServe 0.12 (run against it): /predictions and /explanations run the handler
    whatever the method (OPTIONS aside), segments past the version reach it as the url_path
    header ("" without them), and the explain header is "False" / "True"."""
    rs = _answers(tmp_path, URL_PATH_PROBE, [
        {"method": "GET"},
        {"method": "DELETE", "url": "/predictions/m/1.0"},
        {"url": "/predictions/m/1.0/extra/path", "content": b"x"},
        {"method": "PUT", "url": "/explanations/m"},
        {"url": "/invocations"},
    ])  # fmt: skip
    assert [r.status_code for r in rs] == [200] * 5, [r.text for r in rs]
    assert [r.json() for r in rs] == [
        {"url_path": "", "explain": "False"},
        {"url_path": "", "explain": "False"},
        {"url_path": "extra/path", "explain": "False"},
        {"url_path": "", "explain": "True"},
        {"url_path": None, "explain": None},  # the SageMaker path adds neither
    ]


def test_request_headers_are_found_whatever_the_case_asked_for(tmp_path):
    """TorchServe passes each header as the client wrote its name, so handlers ask for
    `X-Token` or `Content-Type`; the ASGI server lowercases names, which must not hide them."""
    (answer,) = _probe(tmp_path, [
        {"content": b"x", "headers": {"X-Token": "abc", "Content-Type": "text/plain"}},
    ])  # fmt: skip
    assert answer["x_token"] == "abc" and answer["content_type"] == "text/plain"


STALLING = """
import os
import signal
import time


def handle(data, context):
    if data is None:
        return None
    what = data[0]["body"]
    if what == "stall":
        time.sleep(30)
    if what == "oom-killed":
        os.kill(os.getpid(), signal.SIGKILL)
    if what == "exit":
        os._exit(3)
    return [what for _ in data]
"""


def test_worker_timeout_and_death_answer_as_torchserve(tmp_path):
    """TorchServe's WorkerThread: a worker that does not answer within responseTimeout is
    restarted and its request gets 500 InternalServerException ("Worker died."), not a 408;
    a worker killed by SIGKILL (exit value 137: the OOM killer) gets 507."""
    sent = ["stall", "fine", "oom-killed", "fine", "exit", "fine"]
    answers = _answers(
        tmp_path,
        STALLING,
        [{"content": s, "headers": {"Content-Type": "text/plain"}} for s in sent],
        overrides={"response_timeout_s": 2},
    )
    got = [(r.status_code, r.json().get("type") if r.status_code != 200 else r.text)
           for r in answers]  # fmt: skip
    assert got == [
        (500, "InternalServerException"), (200, "fine"),
        (507, "InternalServerException"), (200, "fine"),
        (500, "InternalServerException"), (200, "fine"),
    ], [r.text for r in answers]  # fmt: skip
    assert answers[0].json()["message"].startswith("Worker died.")
