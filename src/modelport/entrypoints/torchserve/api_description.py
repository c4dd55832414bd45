"""TorchServe's API description: `OPTIONS /` (and `/api-description`) on each of its ports.

TorchServe answers with an OpenAPI 3.0.1 document of the endpoints that port serves, which
clients feed to swagger codegen; `OPTIONS /predictions/{model}` describes one model. Ours is
built from the routes the port really has (so a route added later is listed, and one that is
switched off, such as /token without token authorization, is not), with TorchServe's
operationIds and parameters where the endpoint is one of TorchServe's.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass

from fastapi.routing import APIRoute
from starlette.routing import BaseRoute

from modelport.torchserve.model import ModelVersion

OPENAPI_VERSION = "3.0.1"
TORCHSERVE_API_VERSION = "0.12.0"  # the TorchServe whose APIs these are

_ERROR_SCHEMA = {
    "type": "object",
    "required": ["code", "type", "message"],
    "properties": {
        "code": {"type": "integer", "description": "HTTP status code."},
        "type": {"type": "string", "description": "TorchServe's exception name."},
        "message": {"type": "string", "description": "What went wrong."},
    },
}
_STATUS_SCHEMA = {
    "type": "object",
    "required": ["status"],
    "properties": {"status": {"type": "string", "description": "Outcome, in words."}},
}
_DESCRIPTION_SCHEMA = {
    "type": "object",
    "required": ["openapi", "info", "paths"],
    "properties": {
        "openapi": {"type": "string"},
        "info": {"type": "object"},
        "paths": {"type": "object"},
    },
}
_REASONS = {
    200: "OK", 202: "Accepted", 400: "Bad request", 403: "Forbidden",
    404: "Model or resource not found", 405: "Method not allowed", 408: "Request timeout",
    409: "Already registered", 413: "Request too large", 500: "Internal server error",
    503: "No worker to serve the request", 507: "Out of resources",
}  # fmt: skip


@dataclass(frozen=True)
class _Op:
    """What a route does, for the document: TorchServe's operationId where it has one."""

    op_id: str
    description: str
    query: tuple[tuple[str, str, str], ...] = ()  # (name, OpenAPI type, description)
    ok: dict | None = None  # the 2xx body's schema (None: any content)
    errors: tuple[int, ...] = (500,)
    body: bool = False  # takes the request body (an inference input)
    required: tuple[str, ...] = ()  # required query parameters
    deprecated: bool = False
    accepted: bool = False  # may answer 202 (asynchronous)


_PREDICT_ERRORS = (400, 404, 413, 500, 503, 507)
_SCALE_QUERY = (
    ("min_worker", "integer", "Fewest workers to run (default 1)."),
    ("max_worker", "integer", "Most workers to run (default min_worker)."),
    ("synchronous", "boolean", "Wait until the workers run (default false)."),
)
_REGISTER_QUERY = (
    ("url", "string", "Archive to load: a name in the model store, or an allowed URL/path."),
    ("model_name", "string", "Serve under this name instead of the manifest's."),
    ("handler", "string", "Use this handler instead of the manifest's."),
    ("batch_size", "integer", "Largest batch a worker gets (default 1)."),
    ("max_batch_delay", "integer", "Milliseconds to wait for a batch to fill (default 100)."),
    ("response_timeout", "integer", "Seconds a worker may take per batch (default 120)."),
    ("initial_workers", "integer", "Workers to start (default: default_workers_per_model)."),
    ("synchronous", "boolean", "Wait until the workers run (default true)."),
)
_PAGE_QUERY = (
    ("limit", "integer", "Most entries in one page (default 100)."),
    ("next_page_token", "string", "Where the page starts: a previous page's nextPageToken."),
)

_OPS: dict[tuple[str, str], _Op] = {
    ("OPTIONS", "/"): _Op("apiDescription", "This API description.", ok=_DESCRIPTION_SCHEMA),
    ("GET", "/api-description"): _Op(
        "api-description", "This API description (prefer OPTIONS /).", ok=_DESCRIPTION_SCHEMA,
        deprecated=True,
    ),
    ("GET", "/ping"): _Op(
        "ping", "Health: Healthy (200), or Unhealthy (500) when a model's default version has "
        "fewer healthy workers than its minWorkers.", ok=_STATUS_SCHEMA,
    ),
    ("POST", "/predictions/{model_name}"): _Op(
        "predictions", "Run the default version of a model on the request body.",
        body=True, errors=_PREDICT_ERRORS,
    ),
    ("POST", "/predictions/{model_name}/{version}"): _Op(
        "version_predictions", "Run one version of a model on the request body.",
        body=True, errors=_PREDICT_ERRORS,
    ),
    ("POST", "/explanations/{model_name}"): _Op(
        "explanations", "Explain the default version's prediction for the request body.",
        body=True, errors=_PREDICT_ERRORS,
    ),
    ("POST", "/explanations/{model_name}/{version}"): _Op(
        "version_explanations", "Explain one version's prediction for the request body.",
        body=True, errors=_PREDICT_ERRORS,
    ),
    ("POST", "/v1/models/{model_name}:predict"): _Op(
        "kserve_v1_predictions", 'KServe v1 prediction: {"instances": [...]}.',
        body=True, errors=_PREDICT_ERRORS,
    ),
    ("POST", "/invocations"): _Op(
        "invocations", "SageMaker's prediction: the model named by ?model_name=, else the "
        "only model.", body=True, errors=_PREDICT_ERRORS,
        query=(("model_name", "string", "Model to run."),),
    ),
    ("POST", "/models/{model_name}/invoke"): _Op(
        "invoke", "SageMaker's prediction of one model.", body=True, errors=_PREDICT_ERRORS,
    ),
    ("POST", "/wfpredict/{workflow_name}"): _Op(
        "workflow_predictions", "Run a workflow on the request body.",
        body=True, errors=_PREDICT_ERRORS,
    ),
    ("GET", "/models"): _Op(
        "listModels", "Registered models (their default versions), a page at a time.",
        query=_PAGE_QUERY,
    ),
    ("POST", "/models"): _Op(
        "registerModel", "Register a model archive.", query=_REGISTER_QUERY,
        required=("url",), ok=_STATUS_SCHEMA, errors=(400, 404, 405, 409, 500),
        accepted=True,
    ),
    ("GET", "/models/{model_name}"): _Op(
        "describeModel", "Settings and workers of a model's default version.",
        query=(("customized", "boolean", "Add the handler's describe_handle() output."),),
        errors=(404, 500, 503),
    ),
    ("GET", "/models/{model_name}/all"): _Op(
        "describeModelAllVersions", "Settings and workers of every version of a model.",
        errors=(404, 500),
    ),
    ("GET", "/models/{model_name}/{version}"): _Op(
        "version_describeModel", "Settings and workers of one version of a model.",
        query=(("customized", "boolean", "Add the handler's describe_handle() output."),),
        errors=(404, 500, 503),
    ),
    ("PUT", "/models/{model_name}"): _Op(
        "setAutoScale", "Scale the workers of a model's default version.",
        query=(*_SCALE_QUERY, ("model_version", "string", "Scale this version instead.")),
        ok=_STATUS_SCHEMA, errors=(400, 404, 500), accepted=True,
    ),
    ("PUT", "/models/{model_name}/{version}"): _Op(
        "version_setAutoScale", "Scale the workers of one version of a model.",
        query=_SCALE_QUERY, ok=_STATUS_SCHEMA, errors=(400, 404, 500), accepted=True,
    ),
    ("DELETE", "/models/{model_name}"): _Op(
        "unregisterModel", "Unregister a model's default version.",
        ok=_STATUS_SCHEMA, errors=(403, 404, 405, 500),
    ),
    ("DELETE", "/models/{model_name}/{version}"): _Op(
        "version_unregisterModel", "Unregister one version of a model.",
        ok=_STATUS_SCHEMA, errors=(403, 404, 405, 500),
    ),
    ("PUT", "/models/{model_name}/{version}/set-default"): _Op(
        "setDefault", "Make this version the model's default.",
        ok=_STATUS_SCHEMA, errors=(404, 500),
    ),
    ("GET", "/v1/models/{model}"): _Op(
        "kserve_v1_ready", "KServe v1 readiness of a model: ready once it has a worker.",
        errors=(404, 500),
    ),
    ("GET", "/metrics"): _Op(
        "metrics", "Metrics in Prometheus' text format.",
        query=(("name[]", "string", "Only the metrics of these names."),),
    ),
    ("POST", "/token"): _Op(
        "token", "With the API key: renew the management or inference key (in the key file).",
        query=(("type", "string", "management or inference"),), errors=(400, 500),
    ),
    ("GET", "/workflows"): _Op("listWorkflows", "Registered workflows.", query=_PAGE_QUERY),
    ("POST", "/workflows"): _Op(
        "registerWorkflow", "Register a workflow archive.",
        query=(("url", "string", "Workflow archive (.war) to load."),
               ("workflow_name", "string", "Serve under this name."),
               ("response_timeout", "integer", "Seconds a step may take.")),
        required=("url",), ok=_STATUS_SCHEMA, errors=(400, 404, 405, 409, 500),
    ),
    ("GET", "/workflows/{workflow_name}"): _Op(
        "describeWorkflow", "A workflow's settings.", errors=(404, 500),
    ),
    ("DELETE", "/workflows/{workflow_name}"): _Op(
        "unregisterWorkflow", "Unregister a workflow and its models.",
        ok=_STATUS_SCHEMA, errors=(404, 405, 500),
    ),
}  # fmt: skip

_PATH_PARAM = re.compile(r"{(\w+)(?::\w+)?}")


def _json(schema: dict) -> dict:
    return {"application/json": {"schema": schema}}


def _operation(op: _Op, path: str) -> dict:
    params = [
        {"in": "path", "name": name, "required": True, "schema": {"type": "string"}}
        for name in _PATH_PARAM.findall(path)
    ]
    params += [
        {"in": "query", "name": name, "description": text, "required": name in op.required,
         "schema": {"type": kind}}
        for name, kind, text in op.query
    ]  # fmt: skip
    ok: dict = {"description": _REASONS[200]}
    if op.ok is not None:
        ok["content"] = _json(op.ok)
    responses = {"200": ok}
    if op.accepted:
        responses["202"] = {"description": _REASONS[202], "content": _json(_STATUS_SCHEMA)}
    for code in op.errors:
        responses[str(code)] = {"description": _REASONS[code], "content": _json(_ERROR_SCHEMA)}
    doc: dict = {"description": op.description, "operationId": op.op_id, "parameters": params}
    if op.body:
        doc["requestBody"] = {
            "description": "The input, as the handler reads it: raw, JSON or form fields.",
            "content": {"*/*": {"schema": {"type": "string", "format": "binary"}}},
        }
    doc["responses"] = responses
    if op.deprecated:
        doc["deprecated"] = True
    return doc


def _generic(route: APIRoute) -> _Op:
    text = (route.endpoint.__doc__ or route.name).strip().splitlines()[0]
    return _Op(route.name, text)


def describe_routes(routes: Iterable[BaseRoute], title: str, skip: Iterable[str] = ()) -> dict:
    """An OpenAPI 3.0.1 document of `routes` (those in the app's schema); paths that start
    with one of `skip` are left out (endpoints that exist but are switched off, such as
    /workflows without workflows)."""
    skipped = tuple(skip)
    paths: dict[str, dict] = {}
    for route in routes:
        if not isinstance(route, APIRoute) or not route.include_in_schema:
            continue
        if skipped and route.path.startswith(skipped):
            continue
        known = {m for m, p in _OPS if p == route.path}
        for method in sorted(route.methods - {"HEAD"}):
            if known and method not in known:
                continue  # e.g. /ping answers any method; TorchServe documents GET
            op = _OPS.get((method, route.path)) or _generic(route)
            paths.setdefault(route.path, {})[method.lower()] = _operation(op, route.path)
    return {
        "openapi": OPENAPI_VERSION,
        "info": {
            "title": title,
            "description": "TorchServe's APIs, as modelport serves them.",
            "version": TORCHSERVE_API_VERSION,
        },
        "paths": paths,
    }


def describe_model(mv: ModelVersion, version: str | None) -> dict:
    """`OPTIONS /predictions/{model}[/{version}]`: the prediction endpoints of one model."""
    base = f"/predictions/{mv.name}" + (f"/{version}" if version else "")
    explain = base.replace("/predictions/", "/explanations/", 1)
    paths = {
        base: {"post": _operation(_Op(mv.name, f"Predictions of model {mv.name}, version "
                                               f"{mv.version}.", body=True,
                                      errors=_PREDICT_ERRORS), base)},
        explain: {"post": _operation(_Op(f"{mv.name}_explanations", f"Explanations of model "
                                         f"{mv.name}, version {mv.version}.", body=True,
                                         errors=_PREDICT_ERRORS), explain)},
    }  # fmt: skip
    if not version:
        v1 = f"/v1/models/{mv.name}:predict"
        paths[v1] = {"post": _operation(_Op(f"{mv.name}_kserve_v1", "KServe v1 predictions "
                                            f"of model {mv.name}.", body=True,
                                            errors=_PREDICT_ERRORS), v1)}  # fmt: skip
    return {
        "openapi": OPENAPI_VERSION,
        "info": {"title": f"RESTful API for: {mv.name}", "version": mv.version},
        "paths": paths,
    }
