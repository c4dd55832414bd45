"""TorchServe's inference API: /ping, /predictions/{model}[/{version}], KServe v1 predict.

Requests are turned into the inputs TorchServe's frontend gives a handler: a raw body is one
input named "body"; multipart and urlencoded form fields (and, on the SageMaker paths only,
query parameters) are inputs under their own names. Each input keeps its content type so the worker decodes it the way
TorchServe's backend does (JSON -> object, text -> str, anything else -> bytes); form fields
and query parameters have none (bytes), uploaded files their part's (else octet-stream).
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import replace
from email.parser import BytesParser
from email.policy import HTTP
from urllib.parse import parse_qsl

from fastapi import APIRouter, FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from modelport.entrypoints.torchserve.api_description import describe_model, describe_routes
from modelport.entrypoints.torchserve.common import (
    ANY_METHOD,
    TSState,
    error_response,
    health,
    http_error_response,
    status,
)
from modelport.entrypoints.torchserve.reason_phrase import reason_header
from modelport.entrypoints.torchserve.workflows import make_workflow_inference_router
from modelport.torchserve.errors import TSError, bad_request, internal
from modelport.torchserve.messages import InputParam, ItemResponse, RequestItem
from modelport.torchserve.model import ModelVersion

logger = logging.getLogger("modelport.torchserve")


def _form_params(content_type: str, body: bytes) -> list[InputParam]:
    msg = BytesParser(policy=HTTP).parsebytes(
        b"Content-Type: " + content_type.encode("latin-1") + b"\r\n\r\n" + body
    )
    if not msg.is_multipart():
        raise bad_request("malformed multipart/form-data body")
    params = []
    for part in msg.iter_parts():
        name = part.get_param("name", header="content-disposition")
        if not name:
            continue
        payload = part.get_payload(decode=True) or b""
        if part.get_filename() is None:
            # a form field (Netty's Attribute, whatever its Content-Type): TorchServe passes
            # it with no content type, so the handler gets bytes
            ct = ""
        elif part.get("content-type"):
            ct = part.get_content_type()
        else:
            ct = "application/octet-stream"
        params.append(InputParam(str(name), ct, payload))
    if not params:
        raise bad_request("multipart/form-data body has no named part")
    return params


async def read_body(request: Request, limit: int) -> bytes:
    """The request body, refused with 413 once it passes ``limit`` bytes (TorchServe's
    max_request_size) rather than held in memory whole."""
    def too_large(size: str) -> TSError:
        return TSError(413, "RequestEntityTooLarge",
                       f"request body of {size} bytes exceeds max_request_size {limit}")

    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:
        raise too_large(declared)
    chunks, n = [], 0
    async for chunk in request.stream():
        n += len(chunk)
        if n > limit:
            raise too_large(f"more than {limit}")
        chunks.append(chunk)
    return b"".join(chunks)


async def request_item(
    request: Request, max_size: int, query_params: bool = False
) -> RequestItem:
    """Build the handler's view of one HTTP request. TorchServe makes query parameters inputs
    only on /invocations and /models/{m}/invoke (its parseRequest gets no decoder for
    /predictions, /explanations or /wfpredict), so only those pass `query_params`."""
    ct = request.headers.get("content-type", "")
    body = await read_body(request, max_size)
    base = ct.split(";")[0].strip().lower()
    if base == "multipart/form-data":
        params = _form_params(ct, body)
    elif base == "application/x-www-form-urlencoded" and b"=" not in body:
        # `curl -d "some text"` sends this content type for plain text; TorchServe would turn
        # the text into an empty form field named after it, which no handler expects
        params = [InputParam("body", "text/plain", body)]
    elif base == "application/x-www-form-urlencoded":
        # form fields and query parameters reach the handler as bytes: TorchServe's frontend
        # sends them with no content type, so its backend decodes none of them
        pairs = parse_qsl(body.decode("utf-8", "replace"), keep_blank_values=True)
        params = [InputParam(k, "", v.encode()) for k, v in pairs]
    else:
        params = [InputParam("body", ct, body)]
    if query_params:
        params += [InputParam(k, "", v.encode()) for k, v in request.query_params.multi_items()]
    headers = {k.lower(): v for k, v in request.headers.items()}
    return RequestItem(uuid.uuid4().hex, params, headers)


def _to_response(r: ItemResponse, request_id: str) -> Response:
    headers = {"x-request-id": request_id, **r.headers, **reason_header(r.phrase)}
    return Response(
        content=r.body, status_code=r.status, media_type=r.content_type, headers=headers
    )


async def run_one(
    state: TSState,
    mv: ModelVersion,
    item: RequestItem,
    alone: bool = False,
    on_partial: Callable[[ItemResponse], None] | None = None,
    requested_version: str | None = None,
) -> ItemResponse:
    """Run one request; `requested_version` is the version the client named, if any."""
    start = time.monotonic()
    outcome = await (mv.run_alone(item) if alone else mv.predict(item, on_partial))
    # TorchServe (RestJob) labels the inference metrics with the version the request named,
    # "default" when it named none (the default version served it)
    state.metrics.observe(
        mv.name,
        requested_version or "default",
        time.monotonic() - start,
        outcome.queue_latency_s,
    )
    if isinstance(outcome.response, TSError):
        raise outcome.response
    return outcome.response


async def respond(
    state: TSState, mv: ModelVersion, item: RequestItem, requested_version: str | None = None
) -> Response:
    """One response, or a chunked stream when the handler sends intermediate responses.

    The choice is made by the handler at run time (send_intermediate_predict_response), so
    the response waits for whichever comes first: an intermediate response or the final one.
    """
    partials: asyncio.Queue[ItemResponse] = asyncio.Queue()
    final = asyncio.ensure_future(
        run_one(state, mv, item, on_partial=partials.put_nowait,
                requested_version=requested_version)
    )  # fmt: skip
    first = asyncio.ensure_future(partials.get())
    await asyncio.wait({final, first}, return_when=asyncio.FIRST_COMPLETED)
    if not first.done():
        first.cancel()
        return _to_response(final.result(), item.request_id)  # raises the request's TSError

    async def chunks() -> AsyncIterator[bytes]:
        yield first.result().body
        while True:
            nxt = asyncio.ensure_future(partials.get())
            await asyncio.wait({final, nxt}, return_when=asyncio.FIRST_COMPLETED)
            if nxt.done():
                yield nxt.result().body
                continue
            nxt.cancel()
            while not partials.empty():
                yield partials.get_nowait().body
            try:
                yield final.result().body
            except TSError as e:  # the status line is gone: end the stream, log why
                logger.warning("stream of model %s ended with an error: %s", mv.name, e)
            return

    head = first.result()
    headers = {k: v for k, v in head.headers.items() if k != "ts_stream_next"}
    headers["x-request-id"] = item.request_id
    headers.update(reason_header(head.phrase))
    return StreamingResponse(
        chunks(), status_code=head.status, media_type=head.content_type, headers=headers
    )


def _reject_constant(name: str) -> object:
    raise ValueError(f"{name} is not valid JSON")


def _unexpected(e: Exception) -> Response:
    """A bug, not the client's: still TorchServe's shape, and logged with its traceback."""
    logger.error("inference request failed", exc_info=e)
    return error_response(internal(f"{type(e).__name__}: {e}"))


def _decode_prediction(r: ItemResponse) -> object:
    ct = (r.content_type or "").split(";")[0].strip().lower()
    if ct == "application/json":
        return json.loads(r.body)
    return r.body.decode("utf-8", "replace")


def make_inference_router(state: TSState) -> APIRouter:
    router = APIRouter()
    router.include_router(make_workflow_inference_router(state))  # /wfpredict

    # TorchServe's API description; no token needed, as there
    @router.api_route("/api-description", methods=ANY_METHOD)
    @router.api_route("/", methods=["OPTIONS"])
    async def api_description() -> JSONResponse:
        skip = () if state.workflows is not None else ("/wfpredict",)
        return JSONResponse(describe_routes(router.routes, "TorchServe inference API", skip))

    @router.api_route("/ping", methods=ANY_METHOD)  # TorchServe's takes any method
    async def ping() -> JSONResponse:
        return status(*health(state))

    async def predict(
        request: Request, model_name: str, version: str | None, explain: bool = False,
        url_path: str | None = None,
    ) -> Response:
        response = await _predict(request, model_name, version, explain, url_path)
        state.metrics.request_status(response.status_code)  # Requests2XX/4XX/5XX
        return response

    async def _predict(
        request: Request, model_name: str, version: str | None, explain: bool,
        url_path: str | None,
    ) -> Response:
        item = None
        try:
            state.authorize("inference", request)
            mv = state.registry.get(model_name, version)
            # /predictions and /explanations (url_path given) take no query parameters and
            # carry TorchServe's url_path / explain headers; the SageMaker paths the reverse
            item = await request_item(request, state.max_request_size, url_path is None)
            if url_path is not None:
                extra = {"url_path": url_path, "explain": "True" if explain else "False"}
                item = replace(item, headers={**item.headers, **extra})
            if explain:  # BaseHandler switches to explain_handle on this header
                answer = await run_one(state, mv, item, alone=True, requested_version=version)
                return _to_response(answer, item.request_id)
            return await respond(state, mv, item, version)
        except TSError as e:
            resp = error_response(e)
            if item is not None:  # as TorchServe, a job's failure names the job
                resp.headers["x-request-id"] = item.request_id
            return resp
        except Exception as e:
            return _unexpected(e)

    # TorchServe runs /predictions and /explanations for any method but OPTIONS (which
    # describes the model), and passes path segments past the version as the url_path header
    predict_methods = [m for m in ANY_METHOD if m != "OPTIONS"] + ["HEAD"]
    for prefix, explain in (("/predictions", False), ("/explanations", True)):

        async def by_name(request: Request, model_name: str, explain: bool = explain) -> Response:
            return await predict(request, model_name, None, explain, "")

        async def by_version(
            request: Request, model_name: str, version: str, explain: bool = explain
        ) -> Response:
            return await predict(request, model_name, version, explain, "")

        async def with_path(
            request: Request, model_name: str, version: str, url_path: str,
            explain: bool = explain,
        ) -> Response:
            return await predict(request, model_name, version, explain, url_path)

        router.api_route(prefix + "/{model_name}", methods=predict_methods)(by_name)
        router.api_route(prefix + "/{model_name}/{version}", methods=predict_methods)(by_version)
        router.api_route(
            prefix + "/{model_name}/{version}/{url_path:path}", methods=predict_methods,
            include_in_schema=False,
        )(with_path)

    # SageMaker's paths, as TorchServe serves them: the model named by ?model_name= (or in
    # the path), else the only model there is
    @router.post("/invocations")
    async def invocations(request: Request) -> Response:
        name = request.query_params.get("model_name") or ""
        if not name and len(state.registry.names()) == 1:
            (name,) = state.registry.names()
        return await predict(request, name or "null", None)

    @router.post("/models/{model_name}/invoke")
    async def invoke(request: Request, model_name: str) -> Response:
        return await predict(request, model_name, None)

    @router.post("/v1/models/{model_name}:predict")
    async def kserve_v1_predict(request: Request, model_name: str) -> Response:
        try:
            state.authorize("inference", request)
            mv = state.registry.get(model_name)
            try:
                body = await read_body(request, state.max_request_size)
                doc = json.loads(body, parse_constant=_reject_constant)
                if not isinstance(doc, dict):
                    raise TypeError("the body is no JSON object")
                instances = doc["instances"]
                if not isinstance(instances, list):
                    raise TypeError("instances must be a list")
            except (ValueError, KeyError, TypeError, RecursionError) as e:
                raise bad_request(f'body must be {{"instances": [...]}}: {e}') from e
            headers = {k.lower(): v for k, v in request.headers.items()}
            items = []
            for inst in instances:
                fields = inst if isinstance(inst, dict) else {"data": inst}
                params = [
                    InputParam(str(k), "application/json", json.dumps(v).encode())
                    for k, v in fields.items()
                ]
                items.append(RequestItem(uuid.uuid4().hex, params, headers))
            results = await asyncio.gather(*(run_one(state, mv, it) for it in items))
            return JSONResponse({"predictions": [_decode_prediction(r) for r in results]})
        except TSError as e:
            return error_response(e)
        except Exception as e:
            return _unexpected(e)

    async def model_api(request: Request, model_name: str, version: str | None = None) -> Response:
        """TorchServe's `OPTIONS /predictions/{model}`: the API of that model."""
        try:
            state.authorize("inference", request)
            return JSONResponse(describe_model(state.registry.get(model_name, version), version))
        except TSError as e:
            return error_response(e)

    for prefix in ("/predictions", "/explanations"):
        for path in ("/{model_name}", "/{model_name}/{version}",
                     "/{model_name}/{version}/{url_path:path}"):
            router.api_route(prefix + path, methods=["OPTIONS"], include_in_schema=False)(
                model_api
            )
    return router


def make_inference_app(state: TSState) -> FastAPI:
    """The inference API on its own port (config inference_address / --inference-port): every
    error there, unknown paths included, in TorchServe's shape."""
    app = FastAPI(title="modelport TorchServe inference API")
    app.include_router(make_inference_router(state))

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(_: Request, e: StarletteHTTPException) -> JSONResponse:
        return http_error_response(e.status_code, e.detail)

    return app
