"""KServe v2 / Triton REST routes on the shared FastAPI app.

Every error leaves as `{"error": "<message>"}` with Triton's status mapping, whatever
raised it; only the routes under /v2 are registered here.
"""

from __future__ import annotations

import base64
import binascii
import functools
import json
from collections.abc import Awaitable, Callable
from typing import Any

from fastapi import APIRouter, FastAPI, Request, Response
from fastapi.responses import JSONResponse, StreamingResponse

from modelport.entrypoints.kserve import http_codec as codec
from modelport.entrypoints.kserve.log_settings import LogControl
from modelport.entrypoints.kserve.shared_memory import CUDA, SharedMemoryRegistry
from modelport.repository.errors import (
    InvalidArgument,
    NotFound,
    ServingError,
    Status,
    Unsupported,
)
from modelport.repository.manager import RepositoryManager
from modelport.repository.model_config import config_to_json
from modelport.repository.tensors import InferRequest
from modelport.repository.trace import parse_update

# Triton's HttpCodeFromError: ALREADY_EXISTS (like UNKNOWN and CANCELLED) is a 400
HTTP_STATUS = {
    Status.INVALID_ARG: 400,
    Status.NOT_FOUND: 404,
    Status.UNAVAILABLE: 503,
    Status.UNSUPPORTED: 501,
    Status.ALREADY_EXISTS: 400,
    Status.INTERNAL: 500,
}
EXTENSIONS = [
    "binary_tensor_data",
    "statistics",
    "model_repository",
    "model_repository(unload_dependents)",
    "model_configuration",
    "classification",
    "system_shared_memory",
    "cuda_shared_memory",
    "schedule_policy",
    "generate",
    "trace",
    "logging",
]


def error_response(e: Exception) -> JSONResponse:
    if isinstance(e, ServingError):
        return JSONResponse({"error": str(e)}, status_code=HTTP_STATUS.get(e.status, 500))
    return JSONResponse({"error": f"{type(e).__name__}: {e}"}, status_code=500)


def _version(v: str | None) -> int:
    if v is None or v == "":
        return -1
    return codec.parse_version(v)


async def _json_body(request: Request) -> dict[str, Any]:
    body = await request.body()
    if not body:
        return {}
    return codec.parse_json(body)


def _params(doc: dict[str, Any]) -> dict[str, Any]:
    params = doc.get("parameters")
    if params is None:
        return {}
    if not isinstance(params, dict):
        raise InvalidArgument("'parameters' must be a JSON object")
    return params


def trace_model(manager: RepositoryManager, model_name: str | None) -> str | None:
    """The model of a trace setting request (None: global); Triton's error if not ready."""
    if not model_name:
        return None
    if not manager.is_ready(model_name):
        raise InvalidArgument(f"Request for unknown model : {model_name}")
    return model_name


def _trace_values(doc: dict[str, Any]) -> dict[str, list[str] | None]:
    """HTTP trace settings: a string, an array of strings, or null (clear)."""
    out: dict[str, list[str] | None] = {}
    for k, v in doc.items():
        if v is None:
            out[k] = None
        elif isinstance(v, list) and all(isinstance(x, str) for x in v):
            out[k] = v
        elif isinstance(v, str | int) and not isinstance(v, bool):
            out[k] = [str(v)]
        else:
            raise InvalidArgument(f"expect a string or an array of strings for '{k}'")
    return out


def build_router(
    manager: RepositoryManager,
    shm: SharedMemoryRegistry,
    server_name: str = "modelport",
    server_version: str = "0.0.0",
    logs: LogControl | None = None,
) -> APIRouter:
    router = APIRouter()
    log_control = logs if logs is not None else LogControl()

    def guarded(fn: Callable[..., Awaitable[Response]]) -> Callable[..., Awaitable[Response]]:
        @functools.wraps(fn)
        async def wrapper(*args: Any, **kwargs: Any) -> Response:
            try:
                return await fn(*args, **kwargs)
            except Exception as e:
                return error_response(e)

        return wrapper

    @router.get("/v2")
    @guarded
    async def server_metadata() -> Response:
        return JSONResponse(
            {"name": server_name, "version": server_version, "extensions": EXTENSIONS}
        )

    @router.get("/v2/health/live")
    async def live() -> Response:
        return Response(status_code=200)

    @router.get("/v2/health/ready")
    async def ready() -> Response:
        # Triton answers "not ready" with 400, like /v2/models/{m}/ready
        return Response(status_code=200 if manager.server_ready() else 400)

    # before /v2/models/{model_name}, which would otherwise take "stats" for a model name
    async def _stats(model_name: str = "", model_version: str | None = None) -> Response:
        return JSONResponse({"model_stats": manager.stats(model_name, _version(model_version))})

    router.get("/v2/models/stats")(guarded(_stats))
    router.get("/v2/models/{model_name}/stats")(guarded(_stats))
    router.get("/v2/models/{model_name}/versions/{model_version}/stats")(guarded(_stats))

    async def _model_ready(model_name: str, model_version: str | None = None) -> Response:
        ok = manager.is_ready(model_name, _version(model_version))
        return Response(status_code=200 if ok else 400)

    router.get("/v2/models/{model_name}/ready")(guarded(_model_ready))
    router.get("/v2/models/{model_name}/versions/{model_version}/ready")(guarded(_model_ready))

    async def _metadata(model_name: str, model_version: str | None = None) -> Response:
        model = manager.get(model_name, _version(model_version))
        versions = sorted(manager.entries[model_name].versions)
        return JSONResponse(codec.model_metadata(model.config, versions))

    router.get("/v2/models/{model_name}")(guarded(_metadata))
    router.get("/v2/models/{model_name}/versions/{model_version}")(guarded(_metadata))

    async def _config(model_name: str, model_version: str | None = None) -> Response:
        return JSONResponse(config_to_json(manager.config(model_name, _version(model_version))))

    router.get("/v2/models/{model_name}/config")(guarded(_config))
    router.get("/v2/models/{model_name}/versions/{model_version}/config")(guarded(_config))

    async def _infer(
        request: Request, model_name: str, model_version: str | None = None
    ) -> Response:
        body = codec.decompress(await request.body(), request.headers.get("content-encoding"))
        parsed = codec.parse_infer_request(
            model_name,
            _version(model_version),
            body,
            request.headers.get(codec.HEADER_LENGTH),
            shm,
        )
        model = manager.get(model_name, parsed.request.model_version)
        if model.decoupled:  # Triton's check and words, before the request is made
            raise Unsupported(
                "HTTP end point doesn't support models with decoupled transaction policy"
            )
        resp = await model.infer(parsed.request)
        payload, header_len = codec.encode_infer_response(resp, parsed, shm)
        if header_len is None:
            return Response(payload, media_type="application/json")
        return Response(
            payload,
            media_type="application/octet-stream",
            headers={codec.HEADER_LENGTH: str(header_len)},
        )

    router.post("/v2/models/{model_name}/infer")(guarded(_infer))
    router.post("/v2/models/{model_name}/versions/{model_version}/infer")(guarded(_infer))

    def _generate_request(model_name: str, model_version: str | None, doc: dict) -> InferRequest:
        version = _version(model_version)
        cfg = manager.config(model_name, version)
        return InferRequest(
            model_name=model_name,
            model_version=version,
            inputs=codec.generate_inputs(cfg, doc),
            id=str(doc.get("id", "")),
            parameters=codec.generate_parameters(cfg, doc),
        )

    async def _generate(
        request: Request, model_name: str, model_version: str | None = None
    ) -> Response:
        req = _generate_request(model_name, model_version, await _json_body(request))
        model = manager.get(model_name, req.model_version)
        responses = [r async for r in model.stream(req)]
        if len(responses) != 1:
            raise Unsupported(
                f"generate expects exactly one response, model '{model_name}' sent "
                f"{len(responses)}: use generate_stream"
            )
        return JSONResponse(codec.generate_output(responses[0]))

    async def _generate_stream(
        request: Request, model_name: str, model_version: str | None = None
    ) -> Response:
        req = _generate_request(model_name, model_version, await _json_body(request))
        stream = manager.stream(req)
        try:
            first = await anext(stream)
        except StopAsyncIteration:
            first = None

        async def events():
            try:
                if first is not None:
                    yield f"data: {json.dumps(codec.generate_output(first))}\n\n"
                async for r in stream:
                    yield f"data: {json.dumps(codec.generate_output(r))}\n\n"
            except Exception as e:  # the stream has started: the error goes in it
                err = str(e) if isinstance(e, ServingError) else f"{type(e).__name__}: {e}"
                yield f"data: {json.dumps({'error': err})}\n\n"

        return StreamingResponse(events(), media_type="text/event-stream")

    router.post("/v2/models/{model_name}/generate")(guarded(_generate))
    router.post("/v2/models/{model_name}/versions/{model_version}/generate")(guarded(_generate))
    router.post("/v2/models/{model_name}/generate_stream")(guarded(_generate_stream))
    router.post("/v2/models/{model_name}/versions/{model_version}/generate_stream")(
        guarded(_generate_stream)
    )

    @router.post("/v2/repository/index")
    @guarded
    async def repository_index(request: Request) -> Response:
        doc = await _json_body(request)
        ready = codec.bool_param(doc.get("ready", False), "'ready'")
        return JSONResponse(manager.index(ready_only=ready))

    @router.post("/v2/repository/models/{model_name}/load")
    @guarded
    async def repository_load(request: Request, model_name: str) -> Response:
        params = _params(await _json_body(request))
        config = params.get("config")
        if config is not None and not isinstance(config, str):
            raise InvalidArgument("load parameter 'config' must be a string of JSON")
        files = {}
        for k, v in params.items():
            if k.startswith("file:"):  # model file override: base64 content, as tritonclient sends
                try:
                    files[k] = base64.b64decode(v, validate=True)
                except (TypeError, ValueError, binascii.Error):
                    raise InvalidArgument(
                        f"File parameter '{k}' must have bytes type for its value"
                    ) from None
        await manager.request_load(model_name, config, files or None)
        return Response(status_code=200)

    @router.post("/v2/repository/models/{model_name}/unload")
    @guarded
    async def repository_unload(request: Request, model_name: str) -> Response:
        params = _params(await _json_body(request))
        deps = codec.bool_param(params.get("unload_dependents", False), "'unload_dependents'")
        await manager.request_unload(model_name, deps)
        return Response(status_code=200)

    @router.get("/v2/systemsharedmemory/status")
    @router.get("/v2/systemsharedmemory/region/{region}/status")
    @guarded
    async def shm_status(region: str = "") -> Response:
        return JSONResponse(shm.status(region))

    @router.post("/v2/systemsharedmemory/region/{region}/register")
    @guarded
    async def shm_register(request: Request, region: str) -> Response:
        doc = await _json_body(request)
        key = doc.get("key", "")
        if not isinstance(key, str):
            raise InvalidArgument("shared memory 'key' must be a string")
        offset = codec.int_param(doc.get("offset", 0), "shared memory 'offset'")
        byte_size = codec.int_param(doc.get("byte_size", 0), "shared memory 'byte_size'")
        shm.register(region, key, offset, byte_size)
        return Response(status_code=200)

    @router.post("/v2/systemsharedmemory/unregister")
    @router.post("/v2/systemsharedmemory/region/{region}/unregister")
    @guarded
    async def shm_unregister(region: str = "") -> Response:
        shm.unregister(region)
        return Response(status_code=200)

    @router.get("/v2/cudasharedmemory/status")
    @router.get("/v2/cudasharedmemory/region/{region}/status")
    @guarded
    async def cuda_shm_status(region: str = "") -> Response:
        return JSONResponse(shm.status(region, kind=CUDA))

    @router.post("/v2/cudasharedmemory/region/{region}/register")
    @guarded
    async def cuda_shm_register(request: Request, region: str) -> Response:
        doc = await _json_body(request)
        raw = doc.get("raw_handle")
        b64 = raw.get("b64") if isinstance(raw, dict) else None
        try:  # a bad handle fails in the registry, after Triton's no-GPU answer
            handle = base64.b64decode(b64, validate=True) if isinstance(b64, str) else b""
        except (binascii.Error, ValueError):
            handle = b""
        device_id = codec.int_param(doc.get("device_id", 0), "shared memory 'device_id'")
        byte_size = codec.int_param(doc.get("byte_size", 0), "shared memory 'byte_size'")
        shm.register_cuda(region, handle, device_id, byte_size)
        return Response(status_code=200)

    @router.post("/v2/cudasharedmemory/unregister")
    @router.post("/v2/cudasharedmemory/region/{region}/unregister")
    @guarded
    async def cuda_shm_unregister(region: str = "") -> Response:
        shm.unregister(region, kind=CUDA)
        return Response(status_code=200)

    async def _trace_setting(request: Request, model_name: str | None = None) -> Response:
        model = trace_model(manager, model_name)
        if request.method == "POST":
            doc = await _json_body(request)
            if not isinstance(doc, dict):
                raise InvalidArgument("trace settings must be a JSON object")
            manager.tracer.update(model, parse_update(_trace_values(doc)))
        return JSONResponse(manager.tracer.settings(model))

    for path in ("/v2/trace/setting", "/v2/models/{model_name}/trace/setting"):
        router.api_route(path, methods=["GET", "POST"])(guarded(_trace_setting))

    @router.api_route("/v2/logging", methods=["GET", "POST"])
    @guarded
    async def logging_settings(request: Request) -> Response:
        if request.method == "POST":
            doc = await _json_body(request)
            if not isinstance(doc, dict):
                raise InvalidArgument("log settings must be a JSON object")
            log_control.update(doc)
        return JSONResponse(log_control.settings())

    async def _no_route(request: Request, rest: str = "") -> Response:
        # last: any other /v2 path (or method) answers in KServe's shape, not FastAPI's
        raise NotFound(f"{request.method} {request.url.path} is not a KServe v2 endpoint")

    methods = ["GET", "POST", "PUT", "DELETE", "PATCH", "HEAD", "OPTIONS"]
    router.api_route("/v2/{rest:path}", methods=methods)(guarded(_no_route))

    return router


def mount(
    app: FastAPI,
    manager: RepositoryManager,
    shm: SharedMemoryRegistry,
    version: str,
    logs: LogControl | None = None,
    server_name: str = "modelport",
) -> None:
    app.include_router(
        build_router(manager, shm, server_name=server_name, server_version=version, logs=logs)
    )
