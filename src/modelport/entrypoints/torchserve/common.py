"""What the inference and management apps share: the registry, auth, metrics, error shape."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from fastapi import FastAPI, Request
from fastapi.exception_handlers import http_exception_handler
from fastapi.responses import JSONResponse, Response
from starlette.exceptions import HTTPException as StarletteHTTPException

from modelport.entrypoints.torchserve.metrics import TSMetrics
from modelport.torchserve.auth import TokenAuth
from modelport.torchserve.errors import TSError
from modelport.torchserve.registry import ModelRegistry
from modelport.torchserve.ts_config import DEFAULT_MAX_SIZE, ModelEntry
from modelport.torchserve.workflow import WorkflowRegistry


@dataclass
class TSState:
    registry: ModelRegistry
    metrics: TSMetrics
    auth: TokenAuth | None  # None: token authorization disabled
    model_api: bool = True  # register / unregister over the management API
    # initial_workers when a registration leaves it out: config.properties
    # default_workers_per_model, else 0 (TorchServe's getConfiguredDefaultWorkersPerModel)
    default_workers: int = 0
    # config.properties `models=` entry by (name, version), for models registered over the
    # management API (TorchServe's ModelManager.createModel consults it there too)
    config_entry: Callable[[str, str], ModelEntry | None] | None = None
    # TorchServe workflows (/workflows, /wfpredict); None: the API answers 404
    workflows: WorkflowRegistry | None = None
    # called after each management change (TorchServe's config snapshot); None: nothing
    on_change: Callable[[], object] | None = None
    # config.properties max_request_size: the largest request body, in bytes; a larger one
    # is refused before it is read whole
    max_request_size: int = DEFAULT_MAX_SIZE

    def changed(self) -> None:
        if self.on_change is not None:
            self.on_change()

    def authorize(self, kind: str, request: Request) -> None:
        if self.auth is not None:
            self.auth.check(kind, request.headers.get("authorization"))


def error_response(e: TSError) -> JSONResponse:
    return JSONResponse(e.to_json(), status_code=e.code)


def http_error_response(status_code: int, detail: object) -> JSONResponse:
    """A routing error of the web framework (unknown path, wrong method, ...) in TorchServe's
    shape and words."""
    if status_code == 404:
        err = TSError(404, "ResourceNotFoundException",
                      "Requested resource is not found, please refer to API document.")
    elif status_code == 405:
        err = TSError(405, "MethodNotAllowedException",
                      "Requested method is not allowed, please refer to API document.")
    else:
        err = TSError(status_code, "BadRequestException", str(detail))
    return error_response(err)


# the paths TorchServe's inference routes own on an app it shares with other frontends
INFERENCE_PREFIXES = ("/predictions", "/explanations", "/ping", "/wfpredict", "/api-description")
# for the routes TorchServe answers whatever the method (/ping, /api-description)
ANY_METHOD = ["GET", "POST", "PUT", "DELETE", "PATCH", "OPTIONS"]


def install_http_error_handler(app: FastAPI, prefixes: tuple[str, ...] = ("/",)) -> None:
    """Routing errors (unknown path, wrong method) under `prefixes` in TorchServe's shape.

    On the shared `modelport serve` app the handler installed before (another frontend's, or
    FastAPI's default) still answers every other path; served alone, pass ("/",).
    """
    prev = app.exception_handlers.get(StarletteHTTPException, http_exception_handler)

    async def _http_error(request: Request, exc: Exception) -> Response:
        if not request.url.path.startswith(prefixes):
            return await prev(request, exc)
        assert isinstance(exc, StarletteHTTPException)
        return http_error_response(exc.status_code, exc.detail)

    app.add_exception_handler(StarletteHTTPException, _http_error)


def health(state: TSState) -> tuple[str, int]:
    """TorchServe 0.12's ping (ApiUtils.isModelHealthy): "Unhealthy" with 500 as soon as the
    default version of one model has fewer healthy workers than its minWorkers, else
    "Healthy" with 200 (no models included). Other versions do not count, and TorchServe
    0.12 has no "Partial Healthy" (its 0.7 ping said that, with 200, for a model short of
    workers)."""
    if all(mv.healthy() for mv in state.registry.default_versions()):
        return "Healthy", 200
    return "Unhealthy", 500


def status(message: str, code: int = 200) -> JSONResponse:
    return JSONResponse({"status": message}, status_code=code)
