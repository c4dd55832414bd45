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
