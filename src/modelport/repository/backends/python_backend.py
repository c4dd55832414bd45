"""The `python` backend: each instance of model.py runs in its own process (stub_process.py).

The parent side of repository/python_stub.py. An instance that dies fails only the batch
it was running (and the open streams of its decoupled requests) with Triton's "stub process
is not healthy" error; a fresh process is started and initialized in the background, and
later batches wait for it.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import itertools
import json
import logging
import threading
import time
from typing import Any

from modelport.repository import custom_metrics as cm
from modelport.repository import python_stub as stub
from modelport.repository.backends.base import (
    STREAM_END,
    Backend,
    BackendContext,
    BatchItem,
    InstanceSpec,
)
from modelport.repository.errors import ModelConfigError, ServingError, Status, Unavailable
from modelport.repository.model_config import config_to_json, is_decoupled
from modelport.repository.stub_process import start_stub
from modelport.repository.tensors import (
    InferRequest,
    InferResponse,
    InferTensor,
    as_bytes_array,
    wire_of_numpy,
)

log = logging.getLogger(__name__)

START_TIMEOUT_S = 120.0
_FLAG_START = 1  # TRITONSERVER_REQUEST_FLAG_SEQUENCE_START
_FLAG_END = 2  # TRITONSERVER_REQUEST_FLAG_SEQUENCE_END


def _flags(req: InferRequest) -> int:
    return (_FLAG_START if req.sequence_start else 0) | (_FLAG_END if req.sequence_end else 0)


_CODES = {
    2: Status.NOT_FOUND,
    3: Status.INVALID_ARG,
    4: Status.UNAVAILABLE,
    5: Status.UNSUPPORTED,
    6: Status.ALREADY_EXISTS,
}


def _to_response(model: str, version: int, rid: str, r: stub.Resp) -> InferResponse | ServingError:
    if r.error is not None:
        return ServingError(r.error, _CODES.get(r.error_code, Status.INTERNAL))
    tensors = {}
    for name, arr in r.outputs.items():
        if arr.dtype.kind in "OSU":
            arr = as_bytes_array(arr)
        tensors[name] = InferTensor(name, wire_of_numpy(arr.dtype), arr)
    return InferResponse(model, version, tensors, id=rid, parameters=r.parameters)


class _Instance:
    """One model.py process; replaced wholesale when it dies."""

    def __init__(self, backend: PythonBackend, spec: InstanceSpec) -> None:
        self.backend = backend
        self.spec = spec
        self.proc: Any = None
        self.conn: Any = None
        self.restarts = 0
        self._ready: asyncio.Future | None = None
        self._batches: dict[int, tuple[asyncio.Future, list[BatchItem]]] = {}
        self._streams: dict[tuple[int, int], BatchItem] = {}
        self._ids = itertools.count(1)
        self._stopping = False
        self._restart: asyncio.Task | None = None
        self._bls_tasks: set[asyncio.Task] = set()
        # custom metric series each process holds (process -> (family, labels) -> count):
        # released when the process ends, as Triton's stub releases them at unload
        self._metric_refs: dict[Any, collections.Counter] = {}
        self._metrics_released: set[Any] = set()

    @property
    def name(self) -> str:
        return self.spec.name

    def _args(self) -> dict[str, str]:
        ctx = self.backend.ctx
        return {
            "model_config": json.dumps(config_to_json(ctx.config)),
            "model_instance_kind": self.spec.kind,
            "model_instance_name": self.spec.name,
            "model_instance_device_id": str(self.spec.device_id),
            "model_repository": str(ctx.model_dir),
            "model_version": str(ctx.version),
            "model_name": ctx.config.name,
        }

    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        ctx = self.backend.ctx
        proc, parent = start_stub(
            (
                str(self.backend.model_file),
                str(ctx.version_dir),
                self._args(),
                is_decoupled(ctx.config),
            ),
            self.name,
        )
        self.proc, self.conn = proc, parent
        self._ready = ready = loop.create_future()
        threading.Thread(
            target=self._reader, args=(proc, parent, loop), name=f"{self.name}-reader", daemon=True
        ).start()
        done, _ = await asyncio.wait({ready}, timeout=START_TIMEOUT_S)
        if not done:
            ready.add_done_callback(lambda f: f.cancelled() or f.exception())  # consumed
            proc.kill()
            raise ModelConfigError(
                f"model '{ctx.config.name}': instance {self.name} did not initialize within "
                f"{START_TIMEOUT_S:.0f}s"
            )
        ready.result()  # raises the initialization error, if any

    def _reader(self, proc: Any, conn: Any, loop: asyncio.AbstractEventLoop) -> None:
        while True:
            try:
                msg = conn.recv()
            except (EOFError, OSError):
                break
            with contextlib.suppress(RuntimeError):
                loop.call_soon_threadsafe(self._on_message, msg, proc)
        proc.join(5)
        with contextlib.suppress(RuntimeError):
            loop.call_soon_threadsafe(self._on_exit, proc)

    def _on_message(self, msg: Any, proc: Any = None) -> None:
        ready = self._ready
        if isinstance(msg, stub.MetricOps):
            self._metric_ops(msg, proc)
        elif isinstance(msg, stub.MetricCall):
            self._metric_call(msg, proc)
        elif isinstance(msg, stub.Ready):
            if ready is not None and not ready.done():
                ready.set_result(msg.pid)
        elif isinstance(msg, stub.InitFailed):
            if ready is not None and not ready.done():
                ready.set_exception(
                    ModelConfigError(
                        f"Failed to initialize model '{self.backend.config.name}' instance "
                        f"{self.name}: {msg.message}"
                    )
                )
        elif isinstance(msg, stub.ExecDone):
            entry = self._batches.pop(msg.batch_id, None)
            if entry is not None and not entry[0].done():
                entry[0].set_result(msg)
        elif isinstance(msg, stub.Stream):
            self._on_stream(msg)
        elif isinstance(msg, stub.BLSCall):
            task = asyncio.get_running_loop().create_task(self._bls(msg))
            self._bls_tasks.add(task)
            task.add_done_callback(self._bls_tasks.discard)
        elif isinstance(msg, stub.ModelControl):
            task = asyncio.get_running_loop().create_task(self._model_control(msg, proc))
            self._bls_tasks.add(task)
            task.add_done_callback(self._bls_tasks.discard)

    # -- custom metrics (pb_utils.MetricFamily) --

    def _metric_ops(self, msg: stub.MetricOps, proc: Any) -> None:
        registry = self.backend.ctx.metrics
        if registry is None or proc in self._metrics_released:
            return  # the process is gone and what it held was released
        refs = self._metric_refs.setdefault(proc, collections.Counter())
        for op, family, key, arg in msg.ops:
            try:
                if op == "metric_new":
                    registry.metric_new(family, key, arg)
                    refs[(family, key)] += 1
                elif op == "metric_delete":
                    if refs[(family, key)] > 0:
                        refs[(family, key)] -= 1
                        registry.metric_release(family, key)
                else:
                    registry.apply(op, family, key, arg)
            except Exception:  # noqa: BLE001 - pb_utils checked it; never fail the reader
                log.exception("model '%s': custom metric operation %s failed", self.name, op)

    def _metric_call(self, msg: stub.MetricCall, proc: Any) -> None:
        registry = self.backend.ctx.metrics
        value, error = None, None
        try:
            if registry is None:
                raise cm.CustomMetricError("custom metrics are not available in this server")
            if msg.op == "family_new":
                registry.family_new(*msg.args)
            elif msg.op == "value":
                value = registry.value(*msg.args)
            else:
                raise cm.CustomMetricError(f"unknown custom metric request '{msg.op}'")
        except cm.CustomMetricError as e:
            error = str(e)
        except Exception as e:  # noqa: BLE001 - answered to the model
            error = f"{type(e).__name__}: {e}"
        if proc is not None and proc is not self.proc:
            return
        with contextlib.suppress(Exception):
            self.conn.send(stub.MetricResult(msg.call_id, value, error))

    def _release_metrics(self, proc: Any) -> None:
        """Drop the series a process held (it ended: unload, crash or restart)."""
        if proc is None or proc in self._metrics_released:
            return
        self._metrics_released.add(proc)
        refs = self._metric_refs.pop(proc, None)
        registry = self.backend.ctx.metrics
        if refs and registry is not None:
            for (family, key), n in refs.items():
                if n > 0:
                    registry.metric_release(family, key, n)

    def _on_stream(self, msg: stub.Stream) -> None:
        item = self._streams.get((msg.batch_id, msg.index))
        if item is None or item.stream is None:  # a null request of the sequence batcher
            if msg.final:
                self._streams.pop((msg.batch_id, msg.index), None)
            return
        cfg = self.backend.config
        if msg.response is not None:
            item.stream.put_nowait(
                _to_response(cfg.name, self.backend.ctx.version, item.request.id, msg.response)
            )
        if msg.final:
            self._streams.pop((msg.batch_id, msg.index), None)
            item.stream.put_nowait(STREAM_END)

    async def _bls(self, msg: stub.BLSCall) -> None:
        r = msg.request
        bls = self.backend.ctx.bls
        try:
            if bls is None:
                raise Unavailable("BLS is not available in this server")
            inputs = {}
            for n, a in r.inputs.items():
                if a.dtype.kind in "OSU":
                    a = as_bytes_array(a)
                inputs[n] = InferTensor(n, wire_of_numpy(a.dtype), a)
            req = InferRequest(
                model_name=r.model_name,
                model_version=r.model_version,
                inputs=inputs,
                requested_outputs=r.requested_outputs or None,
                id=r.id,
                parameters=r.parameters,
                timeout_us=r.timeout_us,
                sequence_id=r.correlation_id,
                sequence_start=bool(r.flags & _FLAG_START),
                sequence_end=bool(r.flags & _FLAG_END),
            )
            out = []
            async for x in bls(req):
                resp = stub.Resp({n: t.data for n, t in x.outputs.items()}, parameters=x.parameters)
                if msg.decoupled:  # each response as it comes
                    self.conn.send(stub.BLSResult(msg.call_id, [resp], final=False))
                else:
                    out.append(resp)
        except ServingError as e:
            code = {v: k for k, v in _CODES.items()}.get(e.status, 1)
            out = [stub.Resp(error=str(e), error_code=code)]
        except Exception as e:
            out = [stub.Resp(error=f"{type(e).__name__}: {e}", error_code=1)]
        with contextlib.suppress(Exception):
            self.conn.send(stub.BLSResult(msg.call_id, out))

    async def _model_control(self, msg: stub.ModelControl, proc: Any) -> None:
        """pb_utils.load_model / unload_model / is_model_ready, answered like a BLS call."""
        handler = self.backend.ctx.model_control
        value, error = None, None
        try:
            if handler is None:
                raise Unavailable("the model loading API is not available in this server")
            value = await handler(self.backend.config.name, msg.op, msg.args)
        except ServingError as e:
            error = str(e)
        except Exception as e:  # noqa: BLE001 - answered to the model
            error = f"{type(e).__name__}: {e}"
        if proc is not None and proc is not self.proc:
            return  # the asking process is gone (restarted)
        with contextlib.suppress(Exception):
            self.conn.send(stub.ModelControlResult(msg.call_id, value, error))

    def _on_exit(self, proc: Any) -> None:
        self._release_metrics(proc)
        if proc is not self.proc:
            return
        ready = self._ready
        if ready is not None and not ready.done():
            ready.set_exception(
                ModelConfigError(
                    f"Failed to initialize model '{self.backend.config.name}' instance "
                    f"{self.name}: process exited with code {proc.exitcode}"
                )
            )
            return
        err = ServingError(
            f"Failed to process the request(s) for model instance '{self.name}', message: "
            f"Stub process '{self.name}' is not healthy (exit code {proc.exitcode})."
        )
        for fut, _ in self._batches.values():
            if not fut.done():
                fut.set_exception(err)
        self._batches.clear()
        for item in self._streams.values():
            if item.stream is not None:
                item.stream.put_nowait(err)
                item.stream.put_nowait(STREAM_END)
        self._streams.clear()
        if not self._stopping:
            self.restarts += 1
            self._restart = asyncio.get_running_loop().create_task(self._restart_now())

    async def _restart_now(self) -> None:
        with contextlib.suppress(Exception):
            await self.start()

    async def execute(self, items: list[BatchItem]) -> list[Any]:
        if self._restart is not None and not self._restart.done():
            await self._restart
        if self.proc is None or not self.proc.is_alive():
            return [
                Unavailable(f"model instance '{self.name}' is not running (restart failed)")
            ] * len(items)
        loop = asyncio.get_running_loop()
        batch_id = next(self._ids)
        fut = loop.create_future()
        self._batches[batch_id] = (fut, items)
        decoupled = is_decoupled(self.backend.config)
        if decoupled:
            for i, it in enumerate(items):
                self._streams[(batch_id, i)] = it
        conn = self.conn
        for i, it in enumerate(items):
            it.on_cancel = self._canceller(conn, batch_id, i)
        reqs = [
            stub.Req(
                id=it.request.id,
                inputs={n: t.data for n, t in it.request.inputs.items()},
                requested_outputs=list(it.request.requested_outputs or []),
                parameters=dict(it.request.parameters),
                timeout_us=it.request.timeout_us,
                correlation_id=it.request.sequence_id,
                flags=_flags(it.request),
                cancelled=it.cancelled,
            )
            for it in items
        ]
        start = time.perf_counter_ns()
        for it in items:  # now: a decoupled stream may end (and be traced) before ExecDone
            it.compute_start_ns = start
        try:
            self.conn.send(stub.Execute(batch_id, reqs))
        except (OSError, EOFError) as e:
            self._batches.pop(batch_id, None)
            return [ServingError(f"model instance '{self.name}' is gone: {e}")] * len(items)
        try:
            done: stub.ExecDone = await fut
        except ServingError as e:
            done = stub.ExecDone(batch_id, None, str(e))
            crashed = e
        else:
            crashed = None
        end = time.perf_counter_ns()
        for it in items:
            it.compute_end_ns = end
        cfg = self.backend.config
        if crashed is not None:
            return [crashed] * len(items)
        if done.error is not None:
            err = ServingError(
                f"Failed to process the request(s) for model instance '{self.name}', "
                f"message: {done.error}"
            )
            if decoupled:
                for i, it in enumerate(items):
                    if self._streams.pop((batch_id, i), None) is not None and it.stream:
                        it.stream.put_nowait(err)
                        it.stream.put_nowait(STREAM_END)
            return [err] * len(items)
        if decoupled:
            return [None] * len(items)
        assert done.responses is not None
        return [
            _to_response(cfg.name, self.backend.ctx.version, it.request.id, r)
            for it, r in zip(items, done.responses)
        ]

    @staticmethod
    def _canceller(conn: Any, batch_id: int, index: int) -> Any:
        def cancel() -> None:  # to the process that runs it (a replaced one is gone)
            with contextlib.suppress(Exception):
                conn.send(stub.Cancel(batch_id, index))

        return cancel

    async def stop(self) -> None:
        self._stopping = True
        if self._restart is not None:
            self._restart.cancel()
            with contextlib.suppress(BaseException):
                await self._restart
        proc = self.proc
        if proc is None:
            return
        with contextlib.suppress(Exception):
            self.conn.send(stub.Shutdown())
        deadline = time.monotonic() + 10
        while proc.is_alive() and time.monotonic() < deadline:
            await asyncio.sleep(0.02)
        if proc.is_alive():
            proc.kill()
        self._release_metrics(proc)


class PythonBackend(Backend):
    def __init__(self, ctx: BackendContext) -> None:
        super().__init__(ctx)
        self.model_file = ctx.model_file("model.py")
        if not self.model_file.is_file():
            raise ModelConfigError(
                f"model '{self.config.name}' version {ctx.version}: model file "
                f"{self.model_file} not found"
            )
        self._procs = [_Instance(self, spec) for spec in self.instances]

    @property
    def restarts(self) -> int:
        return sum(p.restarts for p in self._procs)

    def pids(self) -> list[int]:
        return [p.proc.pid for p in self._procs if p.proc is not None]

    async def load(self) -> None:
        results = await asyncio.gather(*(p.start() for p in self._procs), return_exceptions=True)
        errors = [r for r in results if isinstance(r, BaseException)]
        if errors:
            await self.unload()
            raise errors[0]
        self._mark_ready()

    async def run_batch(self, instance: int, items: list[BatchItem]) -> list[Any]:
        return await self._procs[instance].execute(items)

    async def unload(self) -> None:
        await asyncio.gather(*(p.stop() for p in self._procs), return_exceptions=True)


__all__ = ["PythonBackend"]
