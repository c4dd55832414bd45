"""TorchServe's management API (its own app and port, 127.0.0.1:8081 by default).

register / scale / describe / list / unregister / set-default, plus /token and /metrics.
Every error is TorchServe's JSON (`{"code", "type", "message"}`) with its status code.
"""

from __future__ import annotations

import asyncio
import json
import logging
import uuid

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, PlainTextResponse, Response
from starlette.exceptions import HTTPException as StarletteHTTPException

from modelport.entrypoints.torchserve.common import TSState, error_response, status
from modelport.entrypoints.torchserve.metrics import CONTENT_TYPE
from modelport.torchserve.errors import TSError, bad_request
from modelport.torchserve.messages import InputParam, RequestItem
from modelport.torchserve.model import ModelVersion

logger = logging.getLogger("modelport.torchserve")


class _Params:
    """Query parameters (or a JSON body, which TorchServe also accepts for registration)."""

    def __init__(self, values: dict[str, str]) -> None:
        self.values = values

    def str(self, name: str) -> str | None:
        v = self.values.get(name)
        return None if v is None else str(v)

    def int(self, name: str, default: int | None = None, minimum: int | None = None) -> int | None:
        raw = self.values.get(name)
        if raw is None or raw == "":
            return default
        try:
            v = int(raw)
        except (TypeError, ValueError):
            raise bad_request(f"Invalid parameter {name}: {raw!r} is not an integer") from None
        if minimum is not None and v < minimum:
            raise bad_request(f"Invalid parameter {name}: must be >= {minimum}, got {v}")
        return v

    def bool(self, name: str, default: bool) -> bool:
        raw = self.values.get(name)
        if raw is None or raw == "":
            return default
        if str(raw).lower() in ("true", "1"):
            return True
        if str(raw).lower() in ("false", "0"):
            return False
        raise bad_request(f"Invalid parameter {name}: {raw!r} is not a boolean")


async def _params(request: Request) -> _Params:
    values: dict[str, str] = dict(request.query_params)
    body = await request.body()
    if body.strip() and request.headers.get("content-type", "").startswith("application/json"):
        try:
            doc = json.loads(body)
        except ValueError as e:
            raise bad_request(f"Invalid JSON body: {e}") from e
        if not isinstance(doc, dict):
            raise bad_request("JSON body must be an object")
        values.update({k: v for k, v in doc.items() if v is not None})
    return _Params(values)


def make_management_app(state: TSState) -> FastAPI:
    app = FastAPI(title="modelport TorchServe management API")
    reg = state.registry

    @app.exception_handler(TSError)
    async def _ts_error(_: Request, e: TSError) -> JSONResponse:
        return error_response(e)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(_: Request, e: StarletteHTTPException) -> JSONResponse:
        if e.status_code == 404:
            err = TSError(
                404,
                "ResourceNotFoundException",
                "Requested resource is not found, please refer to API document.",
            )
        elif e.status_code == 405:
            err = TSError(
                405,
                "MethodNotAllowedException",
                "Requested method is not allowed, please refer to API document.",
            )
        else:
            err = TSError(e.status_code, "BadRequestException", str(e.detail))
        return error_response(err)

    @app.middleware("http")
    async def _auth(request: Request, call_next):  # noqa: ANN001, ANN202
        if request.url.path != "/token":
            try:
                state.authorize("management", request)
            except TSError as e:
                return error_response(e)
        return await call_next(request)

    @app.get("/models")
    async def list_models(request: Request) -> JSONResponse:
        p = await _params(request)
        limit = p.int("limit", 100, minimum=1) or 100
        start = p.int("next_page_token", 0, minimum=0) or 0
        names = reg.names()
        page = names[start : start + limit]
        doc: dict = {}
        if start + limit < len(names):
            doc["nextPageToken"] = str(start + limit)
        doc["models"] = [{"modelName": n, "modelUrl": reg.get(n).url} for n in page]
        return JSONResponse(doc)

    def _model_api() -> None:
        if not state.model_api:
            raise TSError(
                405,
                "ModelAPIDisabledException",
                "Model API is disabled (enable_model_api=false in config.properties)",
            )

    @app.post("/models")
    async def register(request: Request) -> JSONResponse:
        _model_api()
        p = await _params(request)
        url = p.str("url")
        if not url:
            raise bad_request("Parameter url is required.")
        overrides = {}
        for name, field, minimum in (
            ("batch_size", "batch_size", 1),
            ("max_batch_delay", "max_batch_delay_ms", 0),
            ("response_timeout", "response_timeout_s", 1),
        ):
            v = p.int(name, None, minimum=minimum)
            if v is not None:
                overrides[field] = v
        initial = p.int("initial_workers", 0, minimum=0)
        sync = p.bool("synchronous", False)
        mv = await reg.register(
            url,
            model_name=p.str("model_name"),
            handler=p.str("handler"),
            overrides=overrides,
            initial_workers=initial,
            synchronous=sync,
            config_entry=state.config_entry,
        )
        # the archive's YAML minWorkers/maxWorkers win over initial_workers (TorchServe)
        workers = mv.settings.min_workers
        base = f'Model "{mv.name}" Version: {mv.version} registered with {workers} initial workers'
        if workers == 0:
            return status(f"{base}. Use scale workers API to add workers for the model.")
        if sync:
            return status(base)
        return status(f"{base}. Processing worker updates...", 202)

    async def _describe(request: Request, mvs: list[ModelVersion]) -> JSONResponse:
        p = await _params(request)
        out = [mv.describe() for mv in mvs]
        if p.bool("customized", False):
            for doc, mv in zip(out, mvs):
                doc["customizedMetadata"] = await _customized(mv)
        return JSONResponse(out)

    @app.get("/models/{model_name}")
    async def describe(request: Request, model_name: str) -> JSONResponse:
        return await _describe(request, [reg.get(model_name)])

    @app.get("/models/{model_name}/all")
    async def describe_all(request: Request, model_name: str) -> JSONResponse:
        return await _describe(request, reg.versions(model_name))

    @app.get("/models/{model_name}/{version}")
    async def describe_version(request: Request, model_name: str, version: str) -> JSONResponse:
        return await _describe(request, [reg.get(model_name, version)])

    async def _scale(request: Request, model_name: str, version: str | None) -> JSONResponse:
        p = await _params(request)
        mv = reg.get(model_name, version)
        min_w = p.int("min_worker", 1, minimum=0)
        max_w = p.int("max_worker", None, minimum=0)
        if max_w is not None and min_w is not None and max_w < min_w:
            raise bad_request(
                f"Invalid worker params: max_worker ({max_w}) is less than min_worker ({min_w})"
            )
        assert min_w is not None
        job = reg.scale(model_name, mv.version, min_w, max_w)
        if p.bool("synchronous", False):
            await job
            return status(
                f"Workers scaled to {min_w} for model: {model_name}, version: {mv.version}"
            )
        task = asyncio.get_running_loop().create_task(job)
        task.add_done_callback(_log_failure)
        return status("Processing worker updates...", 202)

    @app.put("/models/{model_name}")
    async def scale(request: Request, model_name: str) -> JSONResponse:
        return await _scale(request, model_name, None)

    @app.put("/models/{model_name}/{version}")
    async def scale_version(request: Request, model_name: str, version: str) -> JSONResponse:
        return await _scale(request, model_name, version)

    @app.put("/models/{model_name}/{version}/set-default")
    async def set_default(model_name: str, version: str) -> JSONResponse:
        reg.set_default(model_name, version)
        return status(
            f'Default version successfully updated for model "{model_name}" to "{version}"'
        )

    @app.delete("/models/{model_name}")
    async def unregister(model_name: str) -> JSONResponse:
        _model_api()
        mv = await reg.unregister(model_name)
        return status(f'Model "{mv.name}" unregistered')

    @app.delete("/models/{model_name}/{version}")
    async def unregister_version(model_name: str, version: str) -> JSONResponse:
        _model_api()
        mv = await reg.unregister(model_name, version)
        return status(f'Model "{mv.name}" version: {mv.version} unregistered')

    @app.api_route("/token", methods=["GET", "POST"])
    async def token(request: Request) -> JSONResponse:
        if state.auth is None:
            raise bad_request("Token authorization is disabled")
        kind = request.query_params.get("type", "")
        key = state.auth.regenerate(kind, request.headers.get("authorization"))
        return JSONResponse({kind: {"key": key}})

    @app.get("/metrics")
    async def metrics() -> Response:
        return PlainTextResponse(state.metrics.render(), media_type=CONTENT_TYPE)

    return app


def make_metrics_app(state: TSState) -> FastAPI:
    """TorchServe's metrics API (its own port, 8082 there), for config `metrics_address`."""
    app = FastAPI(title="modelport TorchServe metrics API")

    @app.get("/metrics")
    async def metrics() -> Response:
        return PlainTextResponse(state.metrics.render(), media_type=CONTENT_TYPE)

    return app


async def _customized(mv: ModelVersion) -> object:
    """TorchServe's `?customized=true`: the handler's describe_handle() output."""
    item = RequestItem(uuid.uuid4().hex, [InputParam("body", "", b"")], {"describe": "True"})
    outcome = await mv.run_alone(item)
    if isinstance(outcome.response, TSError):
        raise outcome.response
    body = outcome.response.body.decode("utf-8", "replace")
    try:
        return json.loads(body)
    except ValueError:
        return body


def _log_failure(task: asyncio.Task) -> None:
    if not task.cancelled() and task.exception() is not None:
        logger.error("scaling workers failed: %s", task.exception())
