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
