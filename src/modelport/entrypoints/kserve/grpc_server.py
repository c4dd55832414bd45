"""`inference.GRPCInferenceService` on grpc.aio, using the service definition tritonclient ships.

Errors become gRPC status codes with Triton's mapping (INVALID_ARG -> INVALID_ARGUMENT,
UNAVAILABLE -> UNAVAILABLE, ...). ModelStreamInfer runs the requests of one stream
concurrently and interleaves their responses, marking each with `triton_final_response`
the way Triton's decoupled streaming does.
"""

from __future__ import annotations

import asyncio
import contextlib

import grpc
from google.protobuf import json_format
from tritonclient.grpc import service_pb2 as pb
from tritonclient.grpc import service_pb2_grpc as pb_grpc

from modelport.entrypoints.kserve.grpc_codec import (
    decode_request,
    encode_response,
    param_value,
    parse_version,
)
from modelport.entrypoints.kserve.http_codec import tensor_metadata
from modelport.entrypoints.kserve.http_routes import EXTENSIONS, trace_model
from modelport.entrypoints.kserve.log_settings import LogControl
from modelport.entrypoints.kserve.shared_memory import CUDA, SharedMemoryRegistry
from modelport.repository.errors import InvalidArgument, ServingError, Status, Unsupported
from modelport.repository.manager import RepositoryManager
from modelport.repository.tensors import (
    InferResponse,
)
from modelport.repository.trace import parse_update

GRPC_STATUS = {
    Status.INVALID_ARG: grpc.StatusCode.INVALID_ARGUMENT,
    Status.NOT_FOUND: grpc.StatusCode.NOT_FOUND,
    Status.UNAVAILABLE: grpc.StatusCode.UNAVAILABLE,
    Status.UNSUPPORTED: grpc.StatusCode.UNIMPLEMENTED,
    Status.ALREADY_EXISTS: grpc.StatusCode.ALREADY_EXISTS,
    Status.INTERNAL: grpc.StatusCode.INTERNAL,
}


class InferenceServicer(pb_grpc.GRPCInferenceServiceServicer):
    def __init__(
        self,
        manager: RepositoryManager,
        version: str,
        shm: SharedMemoryRegistry | None = None,
        logs: LogControl | None = None,
        server_name: str = "modelport",
    ) -> None:
        self.manager = manager
        self.version = version
        self.server_name = server_name
        self.shm = shm if shm is not None else SharedMemoryRegistry()
        self.logs = logs if logs is not None else LogControl()

    async def _fail(self, context: grpc.aio.ServicerContext, e: Exception) -> None:
        if isinstance(e, ServingError):
            await context.abort(GRPC_STATUS.get(e.status, grpc.StatusCode.INTERNAL), str(e))
        await context.abort(grpc.StatusCode.INTERNAL, f"{type(e).__name__}: {e}")

    async def ServerLive(self, request, context):  # noqa: N802 - gRPC method names
        return pb.ServerLiveResponse(live=True)

    async def ServerReady(self, request, context):  # noqa: N802
        return pb.ServerReadyResponse(ready=self.manager.server_ready())

    async def ModelReady(self, request, context):  # noqa: N802
        try:
            ok = self.manager.is_ready(request.name, parse_version(request.version))
        except Exception as e:
            await self._fail(context, e)
        return pb.ModelReadyResponse(ready=ok)

    async def ServerMetadata(self, request, context):  # noqa: N802
        return pb.ServerMetadataResponse(
            name=self.server_name, version=self.version, extensions=EXTENSIONS
        )

    async def ModelMetadata(self, request, context):  # noqa: N802
        try:
            model = self.manager.get(request.name, parse_version(request.version))
            cfg = model.config
            versions = sorted(self.manager.entries[request.name].versions)
        except Exception as e:
            await self._fail(context, e)
        return pb.ModelMetadataResponse(
            name=cfg.name,
            versions=[str(v) for v in versions],
            platform=cfg.platform or cfg.backend,
            inputs=[
                pb.ModelMetadataResponse.TensorMetadata(**m)
                for m in tensor_metadata(cfg, cfg.input)
            ],
            outputs=[
                pb.ModelMetadataResponse.TensorMetadata(**m)
                for m in tensor_metadata(cfg, cfg.output)
            ],
        )

    async def ModelConfig(self, request, context):  # noqa: N802
        try:
            cfg = self.manager.config(request.name, parse_version(request.version))
        except Exception as e:
            await self._fail(context, e)
        return pb.ModelConfigResponse(config=cfg)

    async def ModelStatistics(self, request, context):  # noqa: N802
        try:
            stats = self.manager.stats(request.name, parse_version(request.version))
        except Exception as e:
            await self._fail(context, e)
        out = pb.ModelStatisticsResponse()
        json_format.ParseDict({"model_stats": stats}, out, ignore_unknown_fields=True)
        return out

    async def ModelInfer(self, request, context):  # noqa: N802
        try:
            req, shm_outputs = decode_request(request, self.shm)
            model = self.manager.get(req.model_name, req.model_version)
            if model.decoupled:  # Triton's check and words, before the request is made
                raise Unsupported(
                    "ModelInfer RPC doesn't support models with decoupled transaction policy"
                )
            resp = await model.infer(req)
            return encode_response(resp, None, shm_outputs, self.shm)
        except Exception as e:
            await self._fail(context, e)

    async def ModelStreamInfer(self, request_iterator, context):  # noqa: N802
        """Triton's stream: a non-decoupled model's response (or error) is written in the
        order its request arrived; a decoupled model's responses as they come. An error
        carries the failed request's id."""
        out: asyncio.Queue = asyncio.Queue()
        tasks: set[asyncio.Task] = set()
        done_reading = object()
        loop = asyncio.get_running_loop()

        async def one(msg: pb.ModelInferRequest, before: asyncio.Future | None,
                      turn: asyncio.Future) -> None:  # fmt: skip
            async def in_order(item: pb.ModelStreamInferResponse) -> None:
                if before is not None:
                    await before
                await out.put(item)
                if not turn.done():
                    turn.set_result(None)

            empty_final = False
            p = msg.parameters.get("triton_enable_empty_final_response")
            if p is not None:
                empty_final = bool(param_value(p))
            # a decoupled model's last response, held back to carry the final flag
            previous: InferResponse | None = None
            try:
                req, shm_outputs = decode_request(msg, self.shm)
                model = self.manager.get(req.model_name, req.model_version)
                if not model.decoupled:
                    resp = await model.infer(req)
                    await in_order(
                        pb.ModelStreamInferResponse(
                            infer_response=encode_response(resp, None, shm_outputs, self.shm)
                        )
                    )
                    return
                turn.set_result(None)  # a decoupled model's responses hold back no one
                async for r in model.stream(req):
                    if previous is not None:
                        await out.put(
                            pb.ModelStreamInferResponse(
                                infer_response=encode_response(previous, False)
                            )
                        )
                    previous = r
                if previous is not None:
                    last, previous = previous, None
                    await out.put(
                        pb.ModelStreamInferResponse(
                            infer_response=encode_response(last, not empty_final)
                        )
                    )
                if empty_final:
                    final = pb.ModelInferResponse(
                        model_name=req.model_name,
                        model_version=str(model.version),
                        id=req.id,
                    )
                    final.parameters["triton_final_response"].bool_param = True
                    await out.put(pb.ModelStreamInferResponse(infer_response=final))
            except Exception as e:
                if previous is not None:  # sent before the stream failed: it goes out first
                    await out.put(
                        pb.ModelStreamInferResponse(infer_response=encode_response(previous, False))
                    )
                msg_text = str(e) if isinstance(e, ServingError) else f"{type(e).__name__}: {e}"
                failed = pb.ModelStreamInferResponse(
                    error_message=msg_text, infer_response=pb.ModelInferResponse(id=msg.id)
                )
                if turn.done():
                    await out.put(failed)
                else:
                    await in_order(failed)
            finally:
                if not turn.done():  # cancelled: release the requests behind this one
                    turn.set_result(None)

        async def reader() -> None:
            before: asyncio.Future | None = None
            try:
                async for msg in request_iterator:
                    turn = loop.create_future()
                    task = asyncio.ensure_future(one(msg, before, turn))
                    before = turn
                    tasks.add(task)
                    task.add_done_callback(tasks.discard)
            finally:
                await out.put(done_reading)

        reader_task = asyncio.ensure_future(reader())
        reading = True
        try:
            while reading or tasks or not out.empty():
                item = await out.get()
                if item is done_reading:
                    reading = False
                    if tasks:
                        await asyncio.gather(*list(tasks), return_exceptions=True)
                    continue
                yield item
        finally:
            reader_task.cancel()
            for t in list(tasks):
                t.cancel()

    async def TraceSetting(self, request, context):  # noqa: N802
        try:
            model = trace_model(self.manager, request.model_name)
            if request.settings:  # an empty value list clears the setting
                raw = {k: list(v.value) or None for k, v in request.settings.items()}
                self.manager.tracer.update(model, parse_update(raw))
            current = self.manager.tracer.settings(model)
        except Exception as e:
            await self._fail(context, e)
        out = pb.TraceSettingResponse()
        for k, v in current.items():
            out.settings[k].value.extend(v if isinstance(v, list) else [v])
        return out

    async def LogSettings(self, request, context):  # noqa: N802
        try:
            values = {}
            for k, v in request.settings.items():
                choice = v.WhichOneof("parameter_choice")
                values[k] = getattr(v, choice) if choice else None
            self.logs.update(values)
            current = self.logs.settings()
        except Exception as e:
            await self._fail(context, e)
        out = pb.LogSettingsResponse()
        for k, v in current.items():
            if isinstance(v, bool):
                out.settings[k].bool_param = v
            elif isinstance(v, int):
                out.settings[k].uint32_param = v
            else:
                out.settings[k].string_param = v
        return out

    async def SystemSharedMemoryStatus(self, request, context):  # noqa: N802
        try:
            rows = self.shm.status(request.name)
        except Exception as e:
            await self._fail(context, e)
        out = pb.SystemSharedMemoryStatusResponse()
        for r in rows:
            out.regions[r["name"]].CopyFrom(pb.SystemSharedMemoryStatusResponse.RegionStatus(**r))
        return out

    async def SystemSharedMemoryRegister(self, request, context):  # noqa: N802
        try:
            self.shm.register(request.name, request.key, request.offset, request.byte_size)
        except Exception as e:
            await self._fail(context, e)
        return pb.SystemSharedMemoryRegisterResponse()

    async def SystemSharedMemoryUnregister(self, request, context):  # noqa: N802
        try:
            self.shm.unregister(request.name)
        except Exception as e:
            await self._fail(context, e)
        return pb.SystemSharedMemoryUnregisterResponse()

    async def CudaSharedMemoryStatus(self, request, context):  # noqa: N802
        try:
            rows = self.shm.status(request.name, kind=CUDA)
        except Exception as e:
            await self._fail(context, e)
        out = pb.CudaSharedMemoryStatusResponse()
        for r in rows:
            out.regions[r["name"]].CopyFrom(pb.CudaSharedMemoryStatusResponse.RegionStatus(**r))
        return out

    async def CudaSharedMemoryRegister(self, request, context):  # noqa: N802
        try:
            self.shm.register_cuda(
                request.name, request.raw_handle, request.device_id, request.byte_size
            )
        except Exception as e:
            await self._fail(context, e)
        return pb.CudaSharedMemoryRegisterResponse()

    async def CudaSharedMemoryUnregister(self, request, context):  # noqa: N802
        try:
            self.shm.unregister(request.name, kind=CUDA)
        except Exception as e:
            await self._fail(context, e)
        return pb.CudaSharedMemoryUnregisterResponse()

    async def RepositoryIndex(self, request, context):  # noqa: N802
        try:
            rows = self.manager.index(ready_only=request.ready)
        except Exception as e:
            await self._fail(context, e)
        return pb.RepositoryIndexResponse(
            models=[
                pb.RepositoryIndexResponse.ModelIndex(
                    name=r["name"],
                    version=r.get("version", ""),
                    state=r.get("state", ""),
                    reason=r.get("reason", ""),
                )
                for r in rows
            ]
        )

    async def RepositoryModelLoad(self, request, context):  # noqa: N802
        try:
            config = None
            if "config" in request.parameters:
                p = request.parameters["config"]
                if p.WhichOneof("parameter_choice") != "string_param":
                    raise InvalidArgument("load parameter 'config' must be a string of JSON")
                config = p.string_param
            files = {}
            for k, v in request.parameters.items():
                if k.startswith("file:"):  # model file override
                    if v.WhichOneof("parameter_choice") != "bytes_param":
                        raise InvalidArgument(
                            f"File parameter '{k}' must have bytes type for its value"
                        )
                    files[k] = v.bytes_param
            await self.manager.request_load(request.model_name, config, files or None)
        except Exception as e:
            await self._fail(context, e)
        return pb.RepositoryModelLoadResponse()

    async def RepositoryModelUnload(self, request, context):  # noqa: N802
        try:
            deps = False
            if "unload_dependents" in request.parameters:
                p = request.parameters["unload_dependents"]
                if p.WhichOneof("parameter_choice") != "bool_param":
                    raise InvalidArgument("parameter 'unload_dependents' must be a boolean")
                deps = p.bool_param
            await self.manager.request_unload(request.model_name, deps)
        except Exception as e:
            await self._fail(context, e)
        return pb.RepositoryModelUnloadResponse()


class GrpcServer:
    """grpc.aio server lifecycle; `port` is the bound port (useful with port 0)."""

    def __init__(
        self,
        manager: RepositoryManager,
        host: str,
        port: int,
        version: str,
        shm: SharedMemoryRegistry | None = None,
        logs: LogControl | None = None,
        server_name: str = "modelport",
        options: list[tuple[str, int]] | None = None,
        grace: float = 1.0,
    ) -> None:
        """options: extra grpc server channel arguments (keepalive, SO_REUSEPORT); grace:
        seconds stop() lets in-flight RPCs finish."""
        self.manager = manager
        self.shm = shm
        self.logs = logs
        self.server_name = server_name
        self.options = list(options or [])
        self.grace = grace
        self.host = host
        self.requested_port = port
        self.version = version
        self.port = 0
        self._server: grpc.aio.Server | None = None

    async def start(self) -> None:
        opts = [("grpc.max_send_message_length", -1), ("grpc.max_receive_message_length", -1)]
        server = grpc.aio.server(options=opts + self.options)
        pb_grpc.add_GRPCInferenceServiceServicer_to_server(
            InferenceServicer(self.manager, self.version, self.shm, self.logs, self.server_name),
            server,
        )
        try:
            self.port = server.add_insecure_port(f"{self.host}:{self.requested_port}")
        except RuntimeError:  # grpcio >= 1.50 raises where older ones returned 0
            self.port = 0
        if self.port == 0:
            raise OSError(f"cannot bind gRPC on {self.host}:{self.requested_port}")
        await server.start()
        self._server = server

    async def stop(self) -> None:
        if self._server is not None:
            with contextlib.suppress(Exception):
                await self._server.stop(grace=self.grace)
            self._server = None


__all__ = ["GrpcServer", "InferenceServicer"]
