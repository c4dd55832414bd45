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

from modelport.entrypoints.torchserve.api_description import describe_routes
from modelport.entrypoints.torchserve.common import (
    ANY_METHOD,
    TSState,
    error_response,
    http_error_response,
    status,
)
from modelport.entrypoints.torchserve.metrics import CONTENT_TYPE
from modelport.entrypoints.torchserve.workflows import make_workflow_management_router
from modelport.torchserve.errors import TSError, bad_request, internal, service_unavailable
from modelport.torchserve.messages import InputParam, RequestItem
from modelport.torchserve.model import ModelVersion

logger = logging.getLogger("modelport.torchserve")

# Worker processes one request may ask for (min_worker, max_worker, initial_workers). TorchServe
# sets no bound, but each worker is an OS process: a typo such as min_worker=100000 must be a
# 400, not a fork storm that takes the host down.
MAX_WORKERS = 256


class _Params:
    """Query parameters (or a JSON body, which TorchServe also accepts for registration)."""

    def __init__(self, values: dict[str, str]) -> None:
        self.values = values

    def str(self, name: str) -> str | None:
        v = self.values.get(name)
        if v is None:
            return None
        if isinstance(v, (dict, list, bool)):  # a JSON body's value
            raise bad_request(f"Invalid parameter {name}: {_show(v)} is not a string")
        return str(v)

    def int(
        self,
        name: str,
        default: int | None = None,
        minimum: int | None = None,
        maximum: int | None = None,
    ) -> int | None:
        raw = self.values.get(name)
        if raw is None or raw == "":
            return default
        try:
            if isinstance(raw, (bool, float)):  # a JSON body's true / 1.5: no integer
                raise TypeError
            v = int(raw)
        except (TypeError, ValueError):
            raise bad_request(f"Invalid parameter {name}: {_show(raw)} is not an integer") from None
        if minimum is not None and v < minimum:
            raise bad_request(f"Invalid parameter {name}: must be >= {minimum}, got {v}")
        if maximum is not None and v > maximum:
            raise bad_request(f"Invalid parameter {name}: must be <= {maximum}, got {v}")
        return v

    def lenient_int(self, name: str, default: int) -> int:
        """TorchServe's NettyUtils.getIntParameter: a value that is no integer is the default."""
        try:
            return int(self.values.get(name, default))
        except (TypeError, ValueError):
            return default

    def java_bool(self, name: str, default: bool) -> bool:
        """Java's Boolean.parseBoolean, as TorchServe reads `synchronous`: only "true"
        (any case) is true; anything else given, "1" and "yes" included, is false."""
        raw = self.values.get(name)
        if raw is None:
            return default
        if isinstance(raw, bool):  # a JSON body
            return raw
        return str(raw).strip().lower() == "true"

    def bool(self, name: str, default: bool) -> bool:
        raw = self.values.get(name)
        if raw is None or raw == "":
            return default
        if str(raw).lower() in ("true", "1"):
            return True
        if str(raw).lower() in ("false", "0"):
            return False
        raise bad_request(f"Invalid parameter {name}: {raw!r} is not a boolean")


def _show(value: object, limit: int = 60) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


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
    app.include_router(make_workflow_management_router(state))  # /workflows

    @app.exception_handler(TSError)
    async def _ts_error(_: Request, e: TSError) -> JSONResponse:
        return error_response(e)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(_: Request, e: StarletteHTTPException) -> JSONResponse:
        return http_error_response(e.status_code, e.detail)

    @app.exception_handler(Exception)
    async def _unexpected(_: Request, e: Exception) -> JSONResponse:
        # a bug, not the client's: still TorchServe's shape, and logged with its traceback
        logger.exception("management request failed")
        return error_response(internal(f"{type(e).__name__}: {e}"))

    @app.middleware("http")
    async def _auth(request: Request, call_next):  # noqa: ANN001, ANN202
        if request.url.path not in ("/token", "/", "/api-description"):
            try:
                state.authorize("management", request)
            except TSError as e:
                return error_response(e)
        response = await call_next(request)
        state.metrics.request_status(response.status_code)  # Requests2XX/4XX/5XX
        return response

    @app.api_route("/api-description", methods=ANY_METHOD)
    @app.api_route("/", methods=["OPTIONS"])
    async def api_description() -> JSONResponse:
        """TorchServe's API description of this port (no token needed, as there)."""
        skip = [p for p, off in (("/token", state.auth is None),
                                 ("/workflows", state.workflows is None)) if off]  # fmt: skip
        return JSONResponse(describe_routes(app.routes, "TorchServe management API", skip))

    @app.get("/models")
    async def list_models(request: Request) -> JSONResponse:
        return JSONResponse(list_models_doc(state, await _params(request)))

    @app.post("/models")
    async def register(request: Request) -> JSONResponse:
        check_model_api(state)
        msg, code = await register_model(state, await _params(request))
        return status(msg, code)

    async def _describe(
        request: Request, mvs: list[ModelVersion], all_versions: bool = False
    ) -> JSONResponse:
        p = await _params(request)
        # as TorchServe: `customized` asks the handler of one version, never for /all
        customized = not all_versions and p.java_bool("customized", False)
        return JSONResponse(await describe_docs(mvs, customized))

    @app.get("/models/{model_name}")
    async def describe(request: Request, model_name: str) -> JSONResponse:
        return await _describe(request, [reg.get(model_name)])

    @app.get("/models/{model_name}/all")
    async def describe_all(request: Request, model_name: str) -> JSONResponse:
        return await _describe(request, reg.versions(model_name), all_versions=True)

    @app.get("/models/{model_name}/{version}")
    async def describe_version(request: Request, model_name: str, version: str) -> JSONResponse:
        return await _describe(request, [reg.get(model_name, version)])

    async def _scale(request: Request, model_name: str, version: str | None) -> JSONResponse:
        """TorchServe's scale workers: min_worker defaults to 1, max_worker to min_worker, a
        version comes from the path or `model_version`, synchronous defaults to false."""
        msg, code = await scale_workers(state, model_name, version, await _params(request))
        return status(msg, code)

    @app.put("/models/{model_name}")
    async def scale(request: Request, model_name: str) -> JSONResponse:
        return await _scale(request, model_name, None)

    @app.put("/models/{model_name}/{version}")
    async def scale_version(request: Request, model_name: str, version: str) -> JSONResponse:
        return await _scale(request, model_name, version)

    @app.put("/models/{model_name}/{version}/set-default")
    async def set_default(model_name: str, version: str) -> JSONResponse:
        return status(set_default_version(state, model_name, version))

    @app.delete("/models/{model_name}")
    async def unregister(model_name: str) -> JSONResponse:
        return status(await unregister_model(state, model_name, None))

    @app.delete("/models/{model_name}/{version}")
    async def unregister_version(model_name: str, version: str) -> JSONResponse:
        return status(await unregister_model(state, model_name, version))

    @app.get("/v1/models/{model}")
    async def kserve_v1_ready(model: str) -> JSONResponse:
        """TorchServe's KServe v1 readiness on the management port: ready once it has a
        worker (`/v1/models/{name}` and `/v1/models/{name}:predict` alike)."""
        mv = reg.get(model.split(":")[0])
        return JSONResponse({"name": mv.name, "ready": mv.num_workers > 0})

    @app.api_route("/token", methods=["GET", "POST", "PUT", "DELETE"])
    async def token(request: Request) -> Response:
        """TorchServe's token API: the API key renews the management or inference key.

        As there, the new key goes to the key file only and the answer is empty; with token
        authorization off there is no such API (404).
        """
        if state.auth is None:
            raise TSError(
                404,
                "ResourceNotFoundException",
                "Requested resource is not found, please refer to API document.",
            )
        kind = request.query_params.get("type", "")
        state.auth.regenerate(kind, request.headers.get("authorization"))
        return Response(b"", media_type="application/json")

    @app.get("/metrics")
    async def metrics() -> Response:
        return PlainTextResponse(state.metrics.render(), media_type=CONTENT_TYPE)

    return app


def make_metrics_app(state: TSState) -> FastAPI:
    """TorchServe's metrics API (its own port, 8082 there), for config `metrics_address`."""
    app = FastAPI(title="modelport TorchServe metrics API")

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(_: Request, e: StarletteHTTPException) -> JSONResponse:
        return http_error_response(e.status_code, e.detail)

    @app.api_route("/api-description", methods=ANY_METHOD)
    @app.api_route("/", methods=["OPTIONS"])
    async def api_description() -> JSONResponse:
        return JSONResponse(describe_routes(app.routes, "TorchServe metrics API"))

    @app.get("/metrics")
    async def metrics() -> Response:
        return PlainTextResponse(state.metrics.render(), media_type=CONTENT_TYPE)

    return app


# ---- the management operations, shared by this REST API and the gRPC one (grpc_api.py) ----


def check_model_api(state: TSState) -> None:
    # TorchServe answers register/unregister with the model API off as any method it
    # does not serve: 405 MethodNotAllowedException
    if not state.model_api:
        logger.warning("register/unregister refused: enable_model_api=false")
        raise TSError(
            405,
            "MethodNotAllowedException",
            "Requested method is not allowed, please refer to API document.",
        )


def list_models_doc(state: TSState, p: _Params) -> dict:
    """TorchServe's ApiUtils.getModelList: limit outside 0..100 is 100, a negative token is 0,
    a value that is no integer is the default; nextPageToken is there whenever the page
    reaches its limit, even when that is the last model."""
    reg = state.registry
    limit = p.lenient_int("limit", 100)
    if not 0 <= limit <= 100:
        limit = 100
    start = max(p.lenient_int("next_page_token", 0), 0)
    names = reg.names()
    page = names[start : start + limit]
    doc: dict = {}
    if start + limit <= len(names):
        doc["nextPageToken"] = str(start + limit)
    doc["models"] = [{"modelName": n, "modelUrl": reg.get(n).url} for n in page]
    return doc


async def register_model(state: TSState, p: _Params) -> tuple[str, int]:
    """Register one archive: (status message, HTTP status). The caller checks the model API."""
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
    # TorchServe's RegisterModelRequest: initial_workers defaults to config.properties
    # default_workers_per_model (else 0) and synchronous to true (its docs say false;
    # its code, which clients meet, says true)
    initial = p.int("initial_workers", state.default_workers, minimum=0, maximum=MAX_WORKERS)
    sync = p.java_bool("synchronous", True)
    mv = await state.registry.register(
        url,
        model_name=p.str("model_name"),
        handler=p.str("handler"),
        overrides=overrides,
        initial_workers=initial,
        synchronous=sync,
        config_entry=state.config_entry,
    )
    state.changed()
    # the archive's YAML minWorkers/maxWorkers win over initial_workers (TorchServe)
    workers = mv.settings.min_workers
    base = f'Model "{mv.name}" Version: {mv.version} registered with {workers} initial workers'
    if workers == 0:
        return f"{base}. Use scale workers API to add workers for the model.", 200
    if sync:
        return base, 200
    return "Processing worker updates...", 202


async def describe_docs(mvs: list[ModelVersion], customized: bool) -> list[dict]:
    out = [mv.describe() for mv in mvs]
    if customized:
        for doc, mv in zip(out, mvs):
            doc["customizedMetadata"] = await _customized(mv)
    return out


async def scale_workers(
    state: TSState, model_name: str, version: str | None, p: _Params
) -> tuple[str, int]:
    """TorchServe's scale workers: min_worker defaults to 1, max_worker to min_worker, a
    version comes from the path or `model_version`, synchronous defaults to false."""
    reg = state.registry
    if version is None:
        version = p.str("model_version") or None
    min_w = p.int("min_worker", 1, minimum=0, maximum=MAX_WORKERS)
    assert min_w is not None
    max_w = p.int("max_worker", min_w, minimum=0, maximum=MAX_WORKERS)
    assert max_w is not None
    if max_w < min_w:
        raise bad_request("max_worker cannot be less than min_worker.")
    mv = reg.get(model_name, version)
    job = reg.scale(model_name, mv.version, min_w, max_w)
    if p.java_bool("synchronous", False):
        try:
            await job
        finally:
            state.changed()
        msg = f"Workers scaled to {min_w} for model: {model_name}"
        if version is not None:  # TorchServe names the version only when it was given
            msg += f", version: {version}"
        return msg, 200
    task = asyncio.get_running_loop().create_task(job)
    task.add_done_callback(_log_failure)
    task.add_done_callback(lambda _: state.changed())
    return "Processing worker updates...", 202


def set_default_version(state: TSState, model_name: str, version: str) -> str:
    state.registry.set_default(model_name, version)
    state.changed()
    return f'Default version successfully updated for model "{model_name}" to "{version}"'


async def unregister_model(state: TSState, model_name: str, version: str | None) -> str:
    check_model_api(state)
    mv = await state.registry.unregister(model_name, version)
    state.changed()
    return f'Model "{mv.name}" unregistered'  # TorchServe's words, version or not


async def _customized(mv: ModelVersion) -> object:
    """TorchServe's `?customized=true`: the handler's describe_handle() output, which must be
    a JSON object (anything else is `{}` there, with a warning in its log)."""
    if mv.num_workers == 0:
        raise service_unavailable(
            f'Model "{mv.name}" has no worker to serve describe request. '
            "Please use scale workers API to add workers."
        )
    item = RequestItem(uuid.uuid4().hex, [InputParam("body", "", b"")], {"describe": "True"})
    outcome = await mv.run_alone(item)
    if isinstance(outcome.response, TSError):
        raise outcome.response
    body = outcome.response.body.decode("utf-8", "replace")
    try:
        doc = json.loads(body)
    except ValueError:
        doc = None
    if not isinstance(doc, dict):
        logger.warning("customized metadata of model %s is no JSON object", mv.name)
        return {}
    return doc


def _log_failure(task: asyncio.Task) -> None:
    if not task.cancelled() and task.exception() is not None:
        logger.error("scaling workers failed: %s", task.exception())
