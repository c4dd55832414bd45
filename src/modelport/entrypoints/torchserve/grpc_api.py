"""TorchServe's gRPC APIs: InferenceAPIsService (port 7070) and ManagementAPIsService (7071).

The RPCs call the same code as the REST APIs (the registry, `run_one`, and management.py's
register/scale/describe/...), so the two protocols never disagree. What is gRPC's own is
TorchServe's mapping of errors to status codes and words (its InferenceImpl, ManagementImpl,
GRPCJob and GRPCUtils), reproduced here:

- a status description is the message, a newline, and the Java exception class TorchServe
  names (`Model not found: m\\norg.pytorch.serve.archive.model.ModelNotFoundException`);
- Predictions answers an unknown model with INTERNAL (TorchServe's choice), a failed
  prediction with the HTTP status mapped by GRPCUtils.getGRPCStatusCode;
- the management RPCs answer NOT_FOUND, INVALID_ARGUMENT or INTERNAL by exception;
- a missing or wrong token is CANCELLED "Token Authorization failed. ..." (GRPCInterceptor),
  the inference key on the inference port and the management key on the management port.

As in TorchServe, gRPC is on by default at 127.0.0.1:7070 and 127.0.0.1:7071. A port that
config.properties or the command line names must bind or startup fails, as there; a default
port that is busy is skipped with a warning (TorchServe would not start), and
--disable-grpc turns both off.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc

from modelport.entrypoints.torchserve.common import TSState, health
from modelport.entrypoints.torchserve.inference import run_one
from modelport.entrypoints.torchserve.management import (
    _Params,
    describe_docs,
    list_models_doc,
    register_model,
    scale_workers,
    set_default_version,
    unregister_model,
)
from modelport.torchserve import protos
from modelport.torchserve.errors import TSError
from modelport.torchserve.messages import InputParam, ItemResponse, RequestItem
from modelport.torchserve.model import ModelVersion
from modelport.torchserve.ts_config import DEFAULT_MAX_SIZE, TSConfig

logger = logging.getLogger("modelport.torchserve")

DEFAULT_INFERENCE_PORT = 7070
DEFAULT_MANAGEMENT_PORT = 7071
AUTH_FAILED = (
    "Token Authorization failed. Token either incorrect, expired, or not provided correctly"
)
_INTERNAL_SERVER_EXCEPTION = "org.pytorch.serve.http.InternalServerException"
_JAVA_CLASS = {
    "ModelNotFoundException": "org.pytorch.serve.archive.model.ModelNotFoundException",
    "ModelVersionNotFoundException": (
        "org.pytorch.serve.archive.model.ModelVersionNotFoundException"
    ),
    "InvalidModelException": "org.pytorch.serve.archive.model.InvalidModelException",
    "InvalidModelVersionException": (
        "org.pytorch.serve.archive.model.InvalidModelVersionException"
    ),
    "DownloadArchiveException": "org.pytorch.serve.archive.DownloadArchiveException",
}
# GRPCUtils.getGRPCStatusCode
_HTTP_TO_GRPC = {
    400: grpc.StatusCode.INVALID_ARGUMENT,
    401: grpc.StatusCode.UNAUTHENTICATED,
    403: grpc.StatusCode.PERMISSION_DENIED,
    404: grpc.StatusCode.NOT_FOUND,
    409: grpc.StatusCode.ABORTED,
    413: grpc.StatusCode.RESOURCE_EXHAUSTED,
    429: grpc.StatusCode.RESOURCE_EXHAUSTED,
    416: grpc.StatusCode.OUT_OF_RANGE,
    499: grpc.StatusCode.CANCELLED,
    501: grpc.StatusCode.UNIMPLEMENTED,
    503: grpc.StatusCode.UNAVAILABLE,
    504: grpc.StatusCode.DEADLINE_EXCEEDED,
}


def grpc_status(http_code: int) -> grpc.StatusCode:
    """TorchServe's GRPCUtils.getGRPCStatusCode."""
    if http_code in _HTTP_TO_GRPC:
        return _HTTP_TO_GRPC[http_code]
    if 200 <= http_code < 300:
        return grpc.StatusCode.OK
    if 400 <= http_code < 500:
        return grpc.StatusCode.FAILED_PRECONDITION
    if 500 <= http_code < 600:
        return grpc.StatusCode.INTERNAL
    return grpc.StatusCode.UNKNOWN


def java_class(e: TSError) -> str:
    return _JAVA_CLASS.get(e.type, f"org.pytorch.serve.http.{e.type}")


class _Fail(Exception):
    """Ends an RPC with this status (raised below the handler, aborted by its wrapper)."""

    def __init__(self, code: grpc.StatusCode, message: str, reason: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.reason = reason  # TorchServe's augmentDescription: an exception class

    @property
    def details(self) -> str:
        return f"{self.message}\n{self.reason}"


def _management_failure(e: TSError) -> _Fail:
    """ManagementImpl: not-found exceptions NOT_FOUND, model and request errors
    INVALID_ARGUMENT, internal ones INTERNAL; anything else by its HTTP status."""
    if e.code == 404:
        code = grpc.StatusCode.NOT_FOUND
    elif e.code in (400, 403):
        code = grpc.StatusCode.INVALID_ARGUMENT
    elif e.code == 500:
        code = grpc.StatusCode.INTERNAL
    else:
        code = grpc_status(e.code)
    return _Fail(code, e.message, java_class(e))


# ---- plan: ports, SSL, on/off ----------------------------------------------------------------


@dataclass(frozen=True)
class GrpcEndpoint:
    host: str
    port: int
    explicit: bool  # named by config or CLI: it must bind; a busy default port is skipped


@dataclass(frozen=True)
class GrpcPlan:
    inference: GrpcEndpoint
    management: GrpcEndpoint
    certificate_file: str | None = None  # both set: TLS (enable_grpc_ssl=true)
    private_key_file: str | None = None
    max_message_bytes: int = DEFAULT_MAX_SIZE


def add_grpc_args(g: argparse._ArgumentGroup) -> None:
    g.add_argument(
        "--grpc-inference-port",
        dest="ts_grpc_inference_port",
        type=int,
        metavar="PORT",
        default=None,
        help="TorchServe gRPC inference API port (config grpc_inference_port, default 7070)",
    )
    g.add_argument(
        "--grpc-management-port",
        dest="ts_grpc_management_port",
        type=int,
        metavar="PORT",
        default=None,
        help="TorchServe gRPC management API port (config grpc_management_port, default 7071)",
    )
    g.add_argument(
        "--disable-grpc",
        dest="ts_disable_grpc",
        action="store_true",
        help="no TorchServe gRPC APIs, REST only (KServe's gRPC is --grpc-port -1)",
    )


def grpc_plan(args: argparse.Namespace, cfg: TSConfig) -> GrpcPlan | None:
    if getattr(args, "ts_disable_grpc", False):
        return None
    s = cfg.grpc

    def endpoint(address: str | None, cli: int | None, conf: int | None, default: int):
        port = cli if cli is not None else conf
        return GrpcEndpoint(address or "127.0.0.1", default if port is None else port,
                            explicit=port is not None)  # fmt: skip

    cert = key = None
    if s.ssl:
        if not (s.certificate_file and s.private_key_file):
            raise SystemExit(
                "enable_grpc_ssl=true needs certificate_file and private_key_file in "
                "config.properties (modelport does not read a keystore or make a "
                "self-signed certificate for gRPC)"
            )
        cert, key = s.certificate_file, s.private_key_file
    max_bytes = max(DEFAULT_MAX_SIZE, cfg.max_request_size, cfg.max_response_size)
    return GrpcPlan(
        inference=endpoint(s.inference_address, getattr(args, "ts_grpc_inference_port", None),
                           s.inference_port, DEFAULT_INFERENCE_PORT),
        management=endpoint(s.management_address,
                            getattr(args, "ts_grpc_management_port", None),
                            s.management_port, DEFAULT_MANAGEMENT_PORT),
        certificate_file=cert,
        private_key_file=key,
        max_message_bytes=max_bytes,
    )  # fmt: skip


# ---- the services ------------------------------------------------------------------------------


Handler = Callable[[Any, grpc.aio.ServicerContext], Any]


class _Service:
    kind: str  # which token this port takes: "inference" or "management"

    def __init__(self, state: TSState) -> None:
        self.state = state

    async def _authorize(self, context: grpc.aio.ServicerContext) -> None:
        if self.state.auth is None:
            return
        metadata = dict(context.invocation_metadata() or ())
        try:
            self.state.auth.check(self.kind, metadata.get("authorization"))
        except TSError:
            await context.abort(grpc.StatusCode.CANCELLED, AUTH_FAILED)

    def _failure(self, e: TSError) -> _Fail:
        raise NotImplementedError

    def _unary(self, fn: Callable[[Any, grpc.aio.ServicerContext], Awaitable[Any]]) -> Handler:
        async def handler(request: Any, context: grpc.aio.ServicerContext) -> Any:
            await self._authorize(context)
            try:
                return await fn(request, context)
            except _Fail as f:
                fail = f
            except TSError as e:
                fail = self._failure(e)
            except Exception as e:  # a bug, not the client's: logged with its traceback
                logger.exception("TorchServe gRPC %s request failed", self.kind)
                fail = _Fail(grpc.StatusCode.INTERNAL, f"{type(e).__name__}: {e}",
                             _INTERNAL_SERVER_EXCEPTION)  # fmt: skip
            await context.abort(fail.code, fail.details)

        return handler

    def _streaming(self, fn: Callable[[Any, grpc.aio.ServicerContext], AsyncIterator]) -> Handler:
        async def handler(request: Any, context: grpc.aio.ServicerContext) -> AsyncIterator:
            await self._authorize(context)
            try:
                async for response in fn(request, context):
                    yield response
                return
            except _Fail as f:
                fail = f
            except TSError as e:
                fail = self._failure(e)
            except Exception as e:
                logger.exception("TorchServe gRPC %s stream failed", self.kind)
                fail = _Fail(grpc.StatusCode.INTERNAL, f"{type(e).__name__}: {e}",
                             _INTERNAL_SERVER_EXCEPTION)  # fmt: skip
            await context.abort(fail.code, fail.details)

        return handler

    def handler(self, service: str, impls: dict[str, Handler]) -> grpc.GenericRpcHandler:
        wrapped = {}
        for name, (req, resp, client_streaming, server_streaming) in protos.methods(
            service
        ).items():
            make = {
                (False, False): grpc.unary_unary_rpc_method_handler,
                (False, True): grpc.unary_stream_rpc_method_handler,
                (True, False): grpc.stream_unary_rpc_method_handler,
                (True, True): grpc.stream_stream_rpc_method_handler,
            }[(client_streaming, server_streaming)]
            wrap = self._streaming if server_streaming else self._unary
            wrapped[name] = make(
                wrap(impls[name]),
                request_deserializer=req.FromString,
                response_serializer=resp.SerializeToString,
            )
        return grpc.method_handlers_generic_handler(service, wrapped)


class InferenceService(_Service):
    kind = "inference"

    def generic_handler(self) -> grpc.GenericRpcHandler:
        return self.handler(protos.INFERENCE_SERVICE, {
            "Ping": self.ping,
            "Predictions": self.predictions,
            "StreamPredictions": self.stream_predictions,
            "StreamPredictions2": self.stream_predictions2,
        })  # fmt: skip

    def _failure(self, e: TSError) -> _Fail:
        # GRPCJob.sendError: the worker's status, mapped; always named InternalServerException
        return _Fail(grpc_status(e.code), e.message, _INTERNAL_SERVER_EXCEPTION)

    async def ping(self, request: Any, context: grpc.aio.ServicerContext) -> Any:
        doc = {"status": health(self.state)[0]}  # the RPC itself is OK either way
        return protos.TorchServeHealthResponse(health=json.dumps(doc, indent=2))

    def _model(self, request: Any) -> ModelVersion:
        """InferenceImpl.prediction: the model, or INTERNAL with TorchServe's words."""
        if not request.model_name:
            raise _Fail(grpc.StatusCode.INTERNAL, "Parameter model_name is required.",
                        "BadRequestException.()")  # fmt: skip
        try:
            return self.state.registry.get(request.model_name, request.model_version or None)
        except TSError as e:
            raise _Fail(grpc.StatusCode.INTERNAL, e.message, java_class(e)) from e

    @staticmethod
    def _item(request: Any, headers: dict[str, str] | None = None) -> RequestItem:
        # as TorchServe's gRPC frontend: each input is a parameter with no content type,
        # which the handler receives as bytes
        params = [InputParam(k, "", bytes(v)) for k, v in request.input.items()]
        return RequestItem(uuid.uuid4().hex, params, headers or {})

    async def predictions(self, request: Any, context: grpc.aio.ServicerContext) -> Any:
        mv = self._model(request)
        r = await run_one(self.state, mv, self._item(request),
                          requested_version=request.model_version or None)  # fmt: skip
        return protos.PredictionResponse(prediction=r.body)

    async def _responses(
        self, mv: ModelVersion, item: RequestItem, requested_version: str | None
    ) -> AsyncIterator[ItemResponse]:
        """The handler's intermediate responses as they come, then its final one."""
        partials: asyncio.Queue[ItemResponse] = asyncio.Queue()
        final = asyncio.ensure_future(
            run_one(self.state, mv, item, on_partial=partials.put_nowait,
                    requested_version=requested_version)
        )  # fmt: skip
        nxt: asyncio.Future | None = None
        try:
            while True:
                nxt = asyncio.ensure_future(partials.get())
                await asyncio.wait({final, nxt}, return_when=asyncio.FIRST_COMPLETED)
                if nxt.done():
                    yield nxt.result()
                    continue
                nxt.cancel()
                while not partials.empty():
                    yield partials.get_nowait()
                yield final.result()  # raises the request's TSError
                return
        finally:
            if nxt is not None:
                nxt.cancel()
            if not final.done():  # the client went away: let the request finish unobserved
                final.add_done_callback(_consume)

    async def stream_predictions(
        self, request: Any, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[Any]:
        mv = self._model(request)
        async for r in self._responses(mv, self._item(request), request.model_version or None):
            yield protos.PredictionResponse(prediction=r.body)

    async def stream_predictions2(
        self, requests: AsyncIterator[Any], context: grpc.aio.ServicerContext
    ) -> AsyncIterator[Any]:
        """Requests of one stream in order; an error is a response with `status` set (as
        TorchServe's STREAMPREDICT2) and the stream goes on."""
        async for request in requests:
            seq = request.sequenceId if request.HasField("sequenceId") else ""
            headers = {}
            if not seq:
                seq = f"ts-seq-{uuid.uuid4()}"
                headers["ts_request_sequence_start"] = "true"
            headers["ts_request_sequence_id"] = seq
            try:
                mv = self._model(request)
                item = self._item(request, headers)
                async for r in self._responses(mv, item, request.model_version or None):
                    yield protos.PredictionResponse(prediction=r.body, sequenceId=seq)
            except _Fail as f:
                yield _status_response(f.code, f.message, f.reason, seq)
            except TSError as e:
                f = self._failure(e)
                yield _status_response(f.code, f.message, f.reason, seq)


def _status_response(code: grpc.StatusCode, message: str, reason: str, seq: str) -> Any:
    detail = protos.Any()
    detail.Pack(protos.ErrorInfo(reason=reason))
    status = protos.RpcStatus(code=code.value[0], message=message, details=[detail])
    return protos.PredictionResponse(sequenceId=seq, status=status)


def _consume(task: asyncio.Future) -> None:
    if not task.cancelled():
        task.exception()


class ManagementService(_Service):
    kind = "management"

    def generic_handler(self) -> grpc.GenericRpcHandler:
        return self.handler(protos.MANAGEMENT_SERVICE, {
            "DescribeModel": self.describe_model,
            "ListModels": self.list_models,
            "RegisterModel": self.register_model,
            "ScaleWorker": self.scale_worker,
            "SetDefault": self.set_default,
            "UnregisterModel": self.unregister_model,
        })  # fmt: skip

    def _failure(self, e: TSError) -> _Fail:
        return _management_failure(e)

    def _model_api(self) -> None:
        # TorchServe's ManagementImpl, where REST says 405 MethodNotAllowedException
        if not self.state.model_api:
            logger.warning("register/unregister refused: enable_model_api=false")
            raise _Fail(grpc.StatusCode.PERMISSION_DENIED, "Model API disabled",
                        "org.pytorch.serve.archive.model.ModelException")  # fmt: skip

    @staticmethod
    def _reply(msg: str) -> Any:
        return protos.ManagementResponse(msg=msg)

    async def describe_model(self, request: Any, context: grpc.aio.ServicerContext) -> Any:
        reg = self.state.registry
        version = request.model_version or None
        if version == "all":  # TorchServe's getModelDescription: every version
            mvs = reg.versions(request.model_name)
        else:
            mvs = [reg.get(request.model_name, version)]
        customized = request.customized and version != "all"
        return self._reply(json.dumps(await describe_docs(mvs, customized), indent=2))

    async def list_models(self, request: Any, context: grpc.aio.ServicerContext) -> Any:
        # proto3 cannot tell an unset limit from 0: both are the documented default, 100
        values = {"limit": request.limit or 100, "next_page_token": request.next_page_token}
        return self._reply(json.dumps(list_models_doc(self.state, _Params(values)), indent=2))

    async def register_model(self, request: Any, context: grpc.aio.ServicerContext) -> Any:
        """TorchServe's RegisterModelRequest(gRPC): a field left at 0 or "" is the default;
        synchronous is the field itself (false when unset)."""
        self._model_api()
        values: dict[str, Any] = {"synchronous": request.synchronous}
        for name in ("url", "model_name", "handler"):
            if getattr(request, name):
                values[name] = getattr(request, name)
        for name in ("batch_size", "initial_workers", "max_batch_delay", "response_timeout"):
            if getattr(request, name) > 0:
                values[name] = getattr(request, name)
        msg, _ = await register_model(self.state, _Params(values))
        return self._reply(msg)

    async def scale_worker(self, request: Any, context: grpc.aio.ServicerContext) -> Any:
        """As TorchServe's ManagementImpl: min_worker <= 0 is 1, max_worker <= 0 is min_worker."""
        values: dict[str, Any] = {"synchronous": request.synchronous}
        if request.min_worker > 0:
            values["min_worker"] = request.min_worker
        if request.max_worker > 0:
            values["max_worker"] = request.max_worker
        version = request.model_version or None
        msg, _ = await scale_workers(self.state, request.model_name, version, _Params(values))
        return self._reply(msg)

    async def set_default(self, request: Any, context: grpc.aio.ServicerContext) -> Any:
        msg = set_default_version(self.state, request.model_name, request.model_version)
        return self._reply(msg)

    async def unregister_model(self, request: Any, context: grpc.aio.ServicerContext) -> Any:
        self._model_api()
        if not request.model_name:
            raise _Fail(
                grpc.StatusCode.INVALID_ARGUMENT,
                "Parameter url is required.",
                "org.pytorch.serve.http.BadRequestException",
            )  # TorchServe's words
        msg = await unregister_model(self.state, request.model_name, request.model_version or None)
        return self._reply(msg)


# ---- servers -----------------------------------------------------------------------------------


class GrpcServers:
    """The two gRPC servers of one TorchServe frontend (either may be absent)."""

    def __init__(self) -> None:
        self._servers: list[grpc.aio.Server] = []
        self.inference_port: int | None = None
        self.management_port: int | None = None

    @classmethod
    async def start(cls, state: TSState, plan: GrpcPlan) -> GrpcServers:
        self = cls()
        creds = None
        if plan.certificate_file and plan.private_key_file:
            key = Path(plan.private_key_file).read_bytes()
            cert = Path(plan.certificate_file).read_bytes()
            creds = grpc.ssl_server_credentials([(key, cert)])
        try:
            self.inference_port = await self._serve(
                InferenceService(state).generic_handler(), plan.inference, plan, creds, "inference"
            )
            self.management_port = await self._serve(
                ManagementService(state).generic_handler(), plan.management, plan, creds,
                "management",
            )  # fmt: skip
        except BaseException:
            await self.stop()
            raise
        return self

    async def _serve(
        self,
        handler: grpc.GenericRpcHandler,
        ep: GrpcEndpoint,
        plan: GrpcPlan,
        creds: grpc.ServerCredentials | None,
        what: str,
    ) -> int | None:
        server = grpc.aio.server(
            options=[
                # grpc turns SO_REUSEPORT on: a second server would share a busy port silently
                ("grpc.so_reuseport", 0),
                ("grpc.max_receive_message_length", plan.max_message_bytes),
                ("grpc.max_send_message_length", plan.max_message_bytes),
            ]
        )
        server.add_generic_rpc_handlers((handler,))
        host = f"[{ep.host}]" if ":" in ep.host else ep.host
        address = f"{host}:{ep.port}"
        try:
            port = (
                server.add_secure_port(address, creds)
                if creds is not None
                else server.add_insecure_port(address)
            )
        except RuntimeError as e:
            port, error = 0, e
        else:
            error = None
        if not port:
            if ep.explicit:
                raise OSError(f"cannot bind TorchServe gRPC {what} API to {address}: {error}")
            logger.warning(
                "TorchServe gRPC %s API not started: %s is busy (set grpc_%s_port or "
                "--disable-grpc)",
                what,
                address,
                what,
            )
            return None
        await server.start()
        self._servers.append(server)
        scheme = "grpcs" if creds is not None else "grpc"
        logger.info("TorchServe gRPC %s API on %s://%s:%d", what, scheme, ep.host, port)
        return port

    async def stop(self) -> None:
        await asyncio.gather(*(s.stop(grace=1) for s in self._servers), return_exceptions=True)
        self._servers.clear()
