"""OpenAI-shaped errors: every failure leaves the server as {"error": {message, type, param, code}}.

Validation happens once at the edge; handlers raise `OpenAIError` and the exception handlers
installed here turn it (and FastAPI's own validation errors) into the right status and body.
A real internal fault becomes a 500 that carries a request id, and the traceback is logged
under that id so an operator can find it.
"""

from __future__ import annotations

import logging
import uuid
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from modelport.entrypoints.openai.protocol import ErrorInfo, ErrorResponse

logger = logging.getLogger("modelport.openai")

_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    404: "not_found_error",
    405: "invalid_request_error",
    413: "invalid_request_error",
    415: "invalid_request_error",
    429: "rate_limit_error",
    500: "internal_server_error",
    503: "service_unavailable_error",
}


class OpenAIError(Exception):
    """An error to return to the client as-is (status, OpenAI error type, param, code)."""

    def __init__(
        self,
        message: str,
        status: int = 400,
        *,
        param: str | None = None,
        code: str | int | None = None,
        retry_after: int | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.status = status
        self.param = param
        self.code = code
        self.retry_after = retry_after

    def response(self) -> JSONResponse:
        return error_response(
            self.message,
            self.status,
            param=self.param,
            code=self.code,
            retry_after=self.retry_after,
        )


def error_body(
    message: str, status: int, *, param: str | None = None, code: str | int | None = None
) -> dict:
    info = ErrorInfo(
        message=message, type=_TYPES.get(status, "invalid_request_error"), param=param, code=code
    )
    return ErrorResponse(error=info).model_dump()


def error_response(
    message: str,
    status: int,
    *,
    param: str | None = None,
    code: str | int | None = None,
    retry_after: int | None = None,
) -> JSONResponse:
    headers = {"Retry-After": str(retry_after)} if retry_after is not None else None
    return JSONResponse(
        error_body(message, status, param=param, code=code), status_code=status, headers=headers
    )


def _is_union_branch(part: Any) -> bool:
    """pydantic names the member of a union it tried in `loc`: 'str', 'list[int]',
    "literal['auto']", a model's class name ('NamedToolChoice') ... (the API's own field
    names are lower case)."""
    return isinstance(part, str) and (
        "[" in part
        or part in ("str", "int", "float", "bool", "dict", "list", "none")
        or (part[:1].isupper() and part.isidentifier())
    )


def _closest_union_member(errs: list[dict[str, Any]]) -> dict[str, Any]:
    """The error to tell for one field. A value that fits no member of a union fails once
    per member; tell the member it came closest to: one that failed a constraint rather
    than the type, then the fewest errors, then the furthest index (prompt=[[1, 2], []]:
    "prompt.1: List should have at least 1 item", not "should be a valid string")."""
    members: dict[Any, list[dict[str, Any]]] = {}
    for e in errs:
        member = next((p for p in e.get("loc", ()) if _is_union_branch(p)), None)
        members.setdefault(member, []).append(e)

    def closeness(group: list[dict[str, Any]]) -> tuple:
        constrained = any(  # the value had this member's type and broke a rule of it
            not str(e.get("type", "")).endswith(("_type", "_parsing", "literal_error"))
            for e in group
        )
        furthest = max((p for e in group for p in e.get("loc", ()) if isinstance(p, int)),
                       default=-1)  # fmt: skip
        return constrained, -len(group), furthest

    return max(members.values(), key=closeness)[0]


def _validation_message(exc: RequestValidationError) -> tuple[str, str | None]:
    errs = exc.errors()
    if not errs:
        return "invalid request", None
    first = errs[0]
    if first.get("type") == "json_invalid":  # FastAPI puts the character offset in loc
        return _json_message(first, getattr(exc, "body", None)), None
    field = tuple(first.get("loc", ())[:2])
    first = _closest_union_member([e for e in errs if tuple(e.get("loc", ())[:2]) == field])
    loc = [str(p) for p in first.get("loc", ()) if p != "body" and not _is_union_branch(p)]
    if not loc and first.get("type") == "missing":  # no body at all (or an empty one)
        return "the request body is missing: send a JSON object", None
    param = ".".join(loc) or None
    msg = first.get("msg", "invalid value")
    others = len({tuple(e.get("loc", ())[:2]) for e in errs} - {field})
    extra = f" (and {others} more errors)" if others else ""
    return (f"{param}: {msg}{extra}" if param else f"{msg}{extra}"), param


def _json_message(err: dict[str, Any], body: Any) -> str:
    """'not valid JSON: Expecting value: line 1 column 17 (char 16)', as json.loads says it."""
    loc = err.get("loc", ())
    pos = loc[-1] if loc and isinstance(loc[-1], int) else None
    why = (err.get("ctx") or {}).get("error") or "JSON decode error"
    if pos is None:
        return f"the request body is not valid JSON: {why}"
    where = f"char {pos}"
    if isinstance(body, str):  # the decoded text json.loads saw: pos counts its characters
        line = body.count("\n", 0, pos) + 1
        column = pos - body.rfind("\n", 0, pos)
        where = f"line {line} column {column} (char {pos})"
    return f"the request body is not valid JSON: {why}: {where}"


def install_error_handlers(app: FastAPI, prefixes: tuple[str, ...] = ("/v1/",),
                           log_stack: bool = False) -> None:
    """Make the OpenAI routes (paths under `prefixes`) answer every error in OpenAI's JSON.

    On the shared `modelport serve` app other frontends own other paths: for those, the
    handler that was installed before (or FastAPI's default) still answers. A server that
    is only this frontend passes ("/",): then an unknown path is OpenAI's 404 too.
    log_stack (vLLM's --log-error-stack): each error answer is logged with its traceback.
    """
    from fastapi.exception_handlers import (
        http_exception_handler,
        request_validation_exception_handler,
    )

    def ours(request: Request) -> bool:
        return request.url.path.startswith(prefixes)

    prev_validation = app.exception_handlers.get(
        RequestValidationError, request_validation_exception_handler
    )
    prev_http = app.exception_handlers.get(StarletteHTTPException, http_exception_handler)
    prev_internal = app.exception_handlers.get(Exception)

    async def _openai_error(request: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, OpenAIError)
        if log_stack:
            logger.error("error %d in %s: %s", exc.status, request.url.path, exc.message,
                         exc_info=exc)
        return exc.response()

    async def _validation_error(request: Request, exc: Exception) -> Any:
        if not ours(request):
            return await prev_validation(request, exc)
        assert isinstance(exc, RequestValidationError)
        message, param = _validation_message(exc)
        return error_response(message, 400, param=param)

    async def _http_error(request: Request, exc: Exception) -> Any:
        if not ours(request):
            return await prev_http(request, exc)
        assert isinstance(exc, StarletteHTTPException)
        message = exc.detail if isinstance(exc.detail, str) else str(exc.detail)
        if exc.status_code == 404 and message == "Not Found":  # no route has this path
            message = f"Invalid URL ({request.method} {request.url.path})"  # OpenAI's words
        return error_response(message, exc.status_code)

    async def _internal_error(request: Request, exc: Exception) -> Any:
        if not ours(request) and prev_internal is not None:
            return await prev_internal(request, exc)
        return internal_error(request.url.path, exc)

    app.add_exception_handler(OpenAIError, _openai_error)
    app.add_exception_handler(RequestValidationError, _validation_error)
    app.add_exception_handler(StarletteHTTPException, _http_error)
    app.add_exception_handler(Exception, _internal_error)


def internal_error(where: str, exc: BaseException) -> JSONResponse:
    """Log a fault with a fresh id and return a 500 that names the id (never the traceback)."""
    err_id = uuid.uuid4().hex[:16]
    logger.error("internal error %s in %s", err_id, where, exc_info=exc)
    return error_response(
        f"internal server error (id {err_id}): {type(exc).__name__}", 500, code="internal_error"
    )
