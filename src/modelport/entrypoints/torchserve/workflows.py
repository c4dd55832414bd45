"""TorchServe's workflow APIs: /workflows on the management port, /wfpredict for inference.

Routes only; the work is in torchserve/workflow.py. Errors are TorchServe's JSON: the
management app turns a TSError into one, the inference routes do it themselves (they also
live on the shared app, whose error handlers are not TorchServe's).
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response

from modelport.entrypoints.torchserve.common import TSState, error_response, status
from modelport.torchserve.errors import TSError, bad_request, internal
from modelport.torchserve.registry import ModelRegistry
from modelport.torchserve.ts_config import TSConfig
from modelport.torchserve.workflow import WorkflowRegistry

logger = logging.getLogger("modelport.torchserve")


def _workflows(state: TSState) -> WorkflowRegistry:
    wfs = getattr(state, "workflows", None)
    if wfs is None:
        raise TSError(
            404,
            "ResourceNotFoundException",
            "Requested resource is not found, please refer to API document.",
        )
    return wfs


def _lenient_int(request: Request, name: str, default: int) -> int:
    try:
        return int(request.query_params.get(name, default))
    except (TypeError, ValueError):
        return default


def make_workflow_management_router(state: TSState) -> APIRouter:
    router = APIRouter()

    def _model_api() -> None:
        # registering a workflow registers models (user code): gated like POST /models
        if not state.model_api:
            raise TSError(
                405,
                "MethodNotAllowedException",
                "Requested method is not allowed, please refer to API document.",
            )

    @router.post("/workflows")
    async def register(request: Request) -> JSONResponse:
        _model_api()
        wfs = _workflows(state)
        q = request.query_params
        url = q.get("url")
        if not url:
            raise bad_request("Parameter url is required.")
        timeout = None
        if q.get("response_timeout"):
            try:
                timeout = int(q["response_timeout"])
            except ValueError:
                raise bad_request("Invalid parameter response_timeout: not an integer") from None
            if timeout < 1:
                raise bad_request("Invalid parameter response_timeout: must be >= 1")
        wf = await wfs.register(url, q.get("workflow_name") or None, response_timeout=timeout)
        return status(f"Workflow {wf.name} has been registered and scaled successfully.")

    @router.get("/workflows")
    async def list_workflows(request: Request) -> JSONResponse:
        # paging as GET /models (TorchServe's ApiUtils)
        wfs = _workflows(state)
        limit = _lenient_int(request, "limit", 100)
        if not 0 <= limit <= 100:
            limit = 100
        start = max(_lenient_int(request, "next_page_token", 0), 0)
        names = wfs.names()
        doc: dict = {}
        if start + limit <= len(names):
            doc["nextPageToken"] = str(start + limit)
        doc["workflows"] = [
            {"workflowName": n, "workflowUrl": wfs.get(n).url} for n in names[start : start + limit]
        ]
        return JSONResponse(doc)

    @router.get("/workflows/{workflow_name}")
    async def describe(workflow_name: str) -> JSONResponse:
        return JSONResponse([_workflows(state).get(workflow_name).describe()])

    @router.delete("/workflows/{workflow_name}")
    async def unregister(workflow_name: str) -> JSONResponse:
        _model_api()
        wf = await _workflows(state).unregister(workflow_name)
        return status(f'Workflow "{wf.name}" unregistered')

    return router


def make_workflow_inference_router(state: TSState) -> APIRouter:
    router = APIRouter()

    @router.post("/wfpredict/{workflow_name}")
    async def wfpredict(request: Request, workflow_name: str) -> Response:
        from modelport.entrypoints.torchserve.inference import request_item

        try:
            state.authorize("inference", request)
            wfs = _workflows(state)
            wfs.get(workflow_name)  # 404 before reading the body
            item = await request_item(request, state.max_request_size)
            r = await wfs.predict(workflow_name, item)
            return Response(r.body, status_code=r.status, media_type=r.content_type)
        except TSError as e:
            return error_response(e)
        except Exception as e:
            logger.error("workflow request failed", exc_info=e)
            return error_response(internal(f"{type(e).__name__}: {e}"))

    return router


# -- `modelport serve` plumbing (called from frontend.py) --


def add_workflow_args(g: argparse._ArgumentGroup) -> None:
    g.add_argument(
        "--workflow-store",
        dest="workflow_store",
        help="folder of .war workflow archives (default: config workflow_store, else the "
        "model store)",
    )
    g.add_argument(
        "--workflows",
        dest="workflows",
        nargs="+",
        metavar="NAME=FILE.war",
        help="workflow archives to register at startup: NAME=FILE or FILE (a modelport "
        "addition; TorchServe registers workflows over the management API only)",
    )


def wants_workflows(args: argparse.Namespace) -> bool:
    return bool(getattr(args, "workflow_store", None) or getattr(args, "workflows", None))


def make_workflow_registry(
    args: argparse.Namespace, cfg: TSConfig, models: ModelRegistry
) -> WorkflowRegistry:
    store = (
        getattr(args, "workflow_store", None)
        or getattr(cfg, "workflow_store", None)
        or cfg.extra.get("workflow_store")
        or models.model_store
    )
    startup = []
    for spec in getattr(args, "workflows", None) or ():
        name, sep, url = spec.partition("=")
        startup.append((name, url) if sep else (None, spec))
    return WorkflowRegistry(models, Path(store) if store else None, startup=tuple(startup))


async def start_workflows(state: TSState) -> None:
    """Register the startup workflows (after the startup models); a failure stops startup."""
    if state.workflows is None:
        return
    try:
        await state.workflows.load_startup()
    except Exception as e:
        await state.workflows.stop()
        await state.registry.stop()
        raise RuntimeError(f"loading TorchServe workflows failed: {e}") from e


async def stop_workflows(state: TSState) -> None:
    if state.workflows is not None:
        await state.workflows.stop()
