"""Typed messages between the server and a handler worker process (pickled by ProcessWorker)."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class InputParam:
    """One named input of a request, as TorchServe's frontend hands it to the backend.

    A raw body is named "body"; multipart/form fields and query parameters keep their names.
    The worker decodes `value` by `content_type` (JSON -> object, text/* -> str, else bytes).
    """

    name: str
    content_type: str
    value: bytes


@dataclass(frozen=True)
class RequestItem:
    request_id: str
    params: list[InputParam]
    headers: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class ItemResponse:
    """One request's answer: the handler may set its status, content type and headers."""

    status: int
    body: bytes
    content_type: str | None = None
    headers: dict[str, str] = field(default_factory=dict)
    # the reason phrase the handler set with its status (None: it set none, so the standard
    # one for the status goes on the status line; "" is an empty one, as TorchServe sends)
    phrase: str | None = None


@dataclass(frozen=True)
class BatchResult:
    """Either one response per request, or one error for the whole batch."""

    responses: list[ItemResponse] | None
    error_code: int = 0
    error_message: str = ""
    # the handler's own PredictionException: its message goes to the client as is
    handler_error: bool = False
    # `[METRICS]...` lines the handler's ts.metrics logged since the last batch
    metrics: tuple[str, ...] = ()
