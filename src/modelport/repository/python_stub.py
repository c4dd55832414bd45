"""The instance process of a `python` backend model: hosts model.py's TritonPythonModel.

Why a process per instance: user code may hold the GIL, leak, or crash the interpreter; in
its own process it can only fail its own in-flight requests (the parent restarts it).
Why not serving.process_worker: a Triton python model also talks back mid-execute --
decoupled response senders stream many responses per request, and BLS requests call other
models through the server and wait -- so this pipe carries messages both ways at any time.

Messages are the frozen dataclasses below. In the child a reader thread owns the receiving
end: execute batches go to the main thread's queue, BLS results wake the waiting caller.
Only numpy and pb_utils are imported here so the process starts quickly.
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib.util
import inspect
import itertools
import os
import queue
import sys
import threading
import traceback
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from modelport.repository import pb_utils

METRIC_FLUSH_S = 0.005  # longest a queued custom metric operation waits for a message

# ---- messages ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class Req:
    id: str
    inputs: dict[str, np.ndarray]
    requested_outputs: list[str]
    parameters: dict[str, Any] = field(default_factory=dict)
    model_name: str = ""
    model_version: int = -1
    timeout_us: int = 0
    correlation_id: int | str = 0  # sequence batching: the sequence id
    flags: int = 0  # TRITONSERVER_REQUEST_FLAG_SEQUENCE_START | _END
    cancelled: bool = False  # the client went away before the batch was sent


@dataclass(frozen=True)
class Resp:
    outputs: dict[str, np.ndarray] = field(default_factory=dict)
    error: str | None = None
    error_code: int = 0
    parameters: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Execute:
    batch_id: int
    requests: list[Req]


@dataclass(frozen=True)
class Shutdown:
    pass


@dataclass(frozen=True)
class Ready:
    pid: int


@dataclass(frozen=True)
class InitFailed:
    message: str
    traceback: str


@dataclass(frozen=True)
class ExecDone:
    batch_id: int
    responses: list[Resp] | None  # None for decoupled models (responses were streamed)
    error: str | None = None


@dataclass(frozen=True)
class Stream:
    batch_id: int
    index: int
    response: Resp | None
    final: bool


@dataclass(frozen=True)
class Cancel:
    """The client of request `index` of batch `batch_id` went away (parent -> child)."""

    batch_id: int
    index: int


@dataclass(frozen=True)
class BLSCall:
    call_id: int
    request: Req
    decoupled: bool


@dataclass(frozen=True)
class BLSResult:
    """Responses of a BLS call: all of them, or (a decoupled call) the next ones as they
    come, until one with `final`."""

    call_id: int
    responses: list[Resp]
    final: bool = True


@dataclass(frozen=True)
class MetricOps:
    """Custom metric operations, in the order the model made them (pb_utils.Metric):
    (op, family, label key, arg) with op metric_new / increment / set / observe /
    metric_delete. Several per message; no answer."""

    ops: list[tuple]


@dataclass(frozen=True)
class MetricCall:
    """A custom metric request that needs the server's answer: family_new
    (name, description, kind) or value (family, label key)."""

    call_id: int
    op: str
    args: tuple


@dataclass(frozen=True)
class MetricResult:
    call_id: int
    value: float | None = None
    error: str | None = None


@dataclass(frozen=True)
class ModelControl:
    """pb_utils.load_model / unload_model / is_model_ready: op "load" (name, config, files),
    "unload" (name, unload_dependents) or "ready" (name, version)."""

    call_id: int
    op: str
    args: dict


@dataclass(frozen=True)
class ModelControlResult:
    call_id: int
    value: Any = None
    error: str | None = None


# ---- conversions ------------------------------------------------------------------------------


def _tensor_data(t: Any) -> np.ndarray:
    """A pb_utils.Tensor's array, BF16 included (as_numpy() refuses BF16, as Triton's does)."""
    return t._numpy() if isinstance(t, pb_utils.Tensor) else t.as_numpy()


def resp_from_pb(r: Any) -> Resp:
    if r is None:
        return Resp()
    err = r.error()
    outputs = {}
    for t in r.output_tensors():
        arr = _tensor_data(t)
        if not isinstance(arr, np.ndarray):
            arr = np.asarray(arr)
        outputs[t.name()] = arr
    params = {}
    try:
        import json

        params = json.loads(r.parameters())
    except Exception:
        params = {}
    return Resp(
        outputs=outputs,
        error=None if err is None else err.message(),
        error_code=0 if err is None else err.code(),
        parameters=params,
    )


def resp_to_pb(r: Resp) -> Any:
    tensors = [pb_utils.Tensor(n, a) for n, a in r.outputs.items()]
    err = None if r.error is None else pb_utils.TritonError(r.error, r.error_code or 1)
    return pb_utils.InferenceResponse(tensors, error=err, parameters=r.parameters)


# ---- child ------------------------------------------------------------------------------------


@dataclass
class _Collected:
    responses: list = field(default_factory=list)
    done: threading.Event = field(default_factory=threading.Event)


class _Runtime:
    """What pb_utils calls into: response senders and BLS, over the shared pipe."""

    def __init__(self, conn: Any) -> None:
        self.conn = conn
        self._loop: asyncio.AbstractEventLoop | None = None
        self._ids = itertools.count(1)
        self._waiting: dict[int, tuple[threading.Event, list]] = {}
        self._streams: dict[int, queue.Queue] = {}  # decoupled BLS calls being answered
        self.collected: dict[tuple[int, int], _Collected] = {}
        # requests being executed or streamed (keys: (batch id, index)), and those of them
        # whose client went away (request.is_cancelled(), response_sender.is_cancelled())
        self._live: set[tuple[int, int]] = set()
        self._cancelled: set[tuple[int, int]] = set()
        self._keys_lock = threading.Lock()
        # custom metric operations not sent yet; an RLock because MetricFamily.__del__ may
        # queue its deletes from a garbage collection inside send()
        self._lock = threading.RLock()
        self._metric_ops: list[tuple] = []
        self._flush_timer: threading.Timer | None = None
        self.finalizing = False  # the model loading API is refused in finalize(), as in Triton

    def send(self, msg: Any) -> None:
        """Send a message, after the metric operations queued before it (order is kept)."""
        with self._lock:
            self._flush_locked()
            self.conn.send(msg)

    def flush(self) -> None:
        with self._lock:
            self._flush_locked()

    def _flush_locked(self) -> None:
        if self._metric_ops:
            ops, self._metric_ops = self._metric_ops, []
            self.conn.send(MetricOps(ops))

    def metric_op(self, op: tuple) -> None:
        """Queue a metric operation: it goes with the next message this process sends, or
        at the latest a few milliseconds later (one pipe message for many increments)."""
        with self._lock:
            self._metric_ops.append(op)
            if len(self._metric_ops) >= 4096:
                self._flush_locked()
            elif len(self._metric_ops) == 1:
                timer = threading.Timer(METRIC_FLUSH_S, self._timed_flush)
                timer.daemon = True
                self._flush_timer = timer
                timer.start()

    def _timed_flush(self) -> None:
        try:
            self.flush()
        except (OSError, EOFError, ValueError):
            pass

    def metric_call(self, op: str, *args: Any) -> Any:
        """A metric request answered by the server (after every operation queued before)."""
        call_id = next(self._ids)
        event = threading.Event()
        box: list = []
        self._waiting[call_id] = (event, box)
        try:
            self.send(MetricCall(call_id, op, args))
        except (OSError, EOFError, ValueError) as e:
            self._waiting.pop(call_id, None)
            raise pb_utils.TritonModelException(f"the server is gone: {e}") from None
        event.wait()
        result: MetricResult = box[0]
        if result.error is not None:
            raise pb_utils.TritonModelException(result.error)
        return result.value

    def model_control(self, what: str, op: str, args: dict) -> Any:
        """A model loading API request, answered by the server once it is done."""
        if self.finalizing:
            raise pb_utils.TritonModelException(
                f"{what}the model loading API is not supported in finalize()"
            )
        call_id = next(self._ids)
        event = threading.Event()
        box: list = []
        self._waiting[call_id] = (event, box)
        try:
            self.send(ModelControl(call_id, op, args))
        except (OSError, EOFError, ValueError) as e:
            self._waiting.pop(call_id, None)
            raise pb_utils.TritonModelException(f"{what}the server is gone: {e}") from None
        event.wait()
        result: ModelControlResult = box[0]
        if result.error is not None:
            raise pb_utils.TritonModelException(what + result.error)
        return result.value

    def run(self, awaitable: Any) -> Any:
        """Run an `async def execute(...)` to its end on the process's one event loop.

        Triton's stub does the same so a model can `await request.async_exec()` (BLS)
        and `asyncio.gather` several of them."""
        if self._loop is None:
            self._loop = asyncio.new_event_loop()
            asyncio.set_event_loop(self._loop)
        return self._loop.run_until_complete(awaitable)

    # -- cancellation --

    def started(self, keys: list[tuple[int, int]], cancelled: list[bool]) -> None:
        with self._keys_lock:
            self._live.update(keys)
            self._cancelled.update(k for k, c in zip(keys, cancelled) if c)

    def ended(self, keys: Any) -> None:
        with self._keys_lock:
            self._live.difference_update(keys)
            self._cancelled.difference_update(keys)

    def cancel(self, key: tuple[int, int]) -> None:
        with self._keys_lock:
            if key in self._live:  # else it already ended: nothing to tell
                self._cancelled.add(key)

    def is_cancelled(self, key: tuple[int, int] | None) -> bool:
        return key is not None and key in self._cancelled

    def send_response(self, key: tuple[int, int], response: Any, final: bool) -> None:
        box = self.collected.get(key)
        if box is not None:  # a non-decoupled model answering through its sender
            if response is not None:
                box.responses.append(response)
            if final:
                box.done.set()
            return
        self.send(
            Stream(key[0], key[1], None if response is None else resp_from_pb(response), final)
        )
        if final:
            self.ended([key])

    def bls(self, request: Any, decoupled: bool) -> Any:
        """A BLS request's response(s): a list, or for `decoupled` an iterator that yields
        each response as the server passes it on, then an empty final one, as Triton's."""
        call_id = next(self._ids)
        event = threading.Event()
        box: list = []
        if decoupled:
            parts: queue.Queue = queue.Queue()
            self._streams[call_id] = parts
        else:
            self._waiting[call_id] = (event, box)
        req = Req(
            id=request.request_id(),
            inputs={t.name(): _tensor_data(t) for t in request.inputs()},
            requested_outputs=request.requested_output_names(),
            parameters=__import__("json").loads(request.parameters()),
            model_name=request.model_name(),
            model_version=request.model_version(),
            timeout_us=request.timeout(),
            correlation_id=request.correlation_id(),
            flags=request.flags(),
        )
        self.send(BLSCall(call_id, req, decoupled))
        if decoupled:
            return _bls_stream(parts)
        event.wait()
        return [resp_to_pb(r) for r in box[0]]

    def resolve(self, msg: BLSResult | MetricResult | ModelControlResult) -> None:
        if isinstance(msg, BLSResult) and msg.call_id in self._streams:
            parts = self._streams[msg.call_id]
            if msg.final:
                del self._streams[msg.call_id]
            parts.put(msg)
            return
        event, box = self._waiting.pop(msg.call_id, (None, None))
        if event is not None:
            box.append(msg.responses if isinstance(msg, BLSResult) else msg)
            event.set()


def _bls_stream(parts: queue.Queue) -> Any:
    while True:
        msg: BLSResult = parts.get()
        for r in msg.responses:
            yield resp_to_pb(r)
        if msg.final:
            if not any(r.error is not None for r in msg.responses):
                yield pb_utils.InferenceResponse([])  # the final flag alone, as in Triton
            return


def _load_model(model_file: str) -> Any:
    spec = importlib.util.spec_from_file_location("model", model_file)
    if spec is None or spec.loader is None:
        raise ImportError(f"cannot import {model_file}")
    module = importlib.util.module_from_spec(spec)
    sys.modules["model"] = module
    spec.loader.exec_module(module)
    cls = getattr(module, "TritonPythonModel", None)
    if cls is None:
        raise AttributeError(f"{model_file} defines no class TritonPythonModel")
    return cls()


def child_main(conn: Any, model_file: str, version_dir: str, args: dict, decoupled: bool) -> None:
    sys.modules["triton_python_backend_utils"] = pb_utils
    sys.dont_write_bytecode = True  # never write __pycache__ into the model repository
    sys.path.insert(0, version_dir)
    runtime = _Runtime(conn)
    pb_utils._install_runtime(runtime)
    work: queue.Queue = queue.Queue()

    def reader() -> None:
        while True:
            try:
                msg = conn.recv()
            except (EOFError, OSError):
                work.put(Shutdown())
                return
            if isinstance(msg, (BLSResult, MetricResult, ModelControlResult)):
                runtime.resolve(msg)
            elif isinstance(msg, Cancel):  # now: the main thread may be inside execute()
                runtime.cancel((msg.batch_id, msg.index))
            else:
                work.put(msg)

    # started before initialize(): answers (custom metric families, BLS) may be awaited there
    threading.Thread(target=reader, daemon=True).start()
    try:
        model = _load_model(model_file)
        init = getattr(model, "initialize", None)
        if callable(init):
            init(args)
    except BaseException as e:  # noqa: BLE001 - reported to the parent
        runtime.send(InitFailed(f"{type(e).__name__}: {e}", traceback.format_exc()))
        return
    runtime.send(Ready(os.getpid()))
    while True:
        msg = work.get()
        if isinstance(msg, Shutdown):
            runtime.finalizing = True
            fin = getattr(model, "finalize", None)
            if callable(fin):
                try:
                    fin()
                except Exception:
                    traceback.print_exc()
            with contextlib.suppress(Exception):
                runtime.flush()
            return
        runtime.send(_execute(model, msg, decoupled, args.get("model_name", ""), runtime))


def _execute(model: Any, msg: Execute, decoupled: bool, name: str, runtime: _Runtime) -> ExecDone:
    requests = []
    keys = [(msg.batch_id, i) for i in range(len(msg.requests))]
    for key, r in zip(keys, msg.requests):
        req = pb_utils.InferenceRequest(
            model_name=name,
            inputs=[pb_utils.Tensor(n, a) for n, a in r.inputs.items()],
            requested_output_names=r.requested_outputs,
            request_id=r.id,
            parameters=r.parameters,
            timeout=r.timeout_us,
            correlation_id=r.correlation_id,
            flags=r.flags,
        )
        req._sender = pb_utils.ResponseSender(key)
        req._key = key
        if not decoupled:
            runtime.collected[key] = _Collected()
        requests.append(req)
    runtime.started(keys, [r.cancelled for r in msg.requests])
    try:
        try:
            responses = model.execute(requests)
            if inspect.isawaitable(responses):  # `async def execute`
                responses = runtime.run(responses)
        except BaseException as e:  # noqa: BLE001 - fails this batch only
            if decoupled:  # the parent ends these streams with the error
                runtime.ended(keys)
            return ExecDone(msg.batch_id, None, f"{type(e).__name__}: {e}")
        if decoupled:
            return ExecDone(msg.batch_id, None)
        if responses is None:
            return _from_senders(msg.batch_id, [runtime.collected[k] for k in keys])
        try:
            responses = list(responses)
        except TypeError:
            return ExecDone(
                msg.batch_id,
                None,
                f"execute() must return a list of InferenceResponse, got "
                f"{type(responses).__name__}",
            )
        if len(responses) != len(requests):
            return ExecDone(
                msg.batch_id,
                None,
                f"execute() returned {len(responses)} responses for {len(requests)} requests",
            )
        try:
            return ExecDone(msg.batch_id, [resp_from_pb(r) for r in responses])
        except Exception as e:
            return ExecDone(msg.batch_id, None, f"bad response from execute(): {e}")
    finally:
        for k in keys:
            runtime.collected.pop(k, None)
        if not decoupled:  # a decoupled request ends with its final response
            runtime.ended(keys)


def _from_senders(batch_id: int, boxes: list[_Collected]) -> ExecDone:
    """execute() returned None: a non-decoupled model may answer through its senders."""
    if not any(b.responses or b.done.is_set() for b in boxes):
        return ExecDone(batch_id, None, "execute() returned None and sent no response")
    for b in boxes:
        b.done.wait()
    if any(len(b.responses) != 1 for b in boxes):
        counts = [len(b.responses) for b in boxes]
        return ExecDone(
            batch_id,
            None,
            f"a non-decoupled model must send exactly one response per request, sent {counts}",
        )
    return ExecDone(batch_id, [resp_from_pb(b.responses[0]) for b in boxes])


def auto_complete(model_file: str, version_dir: str, config: dict) -> dict | None:
    """Run the model's `auto_complete_config` (in a throwaway process); None if it has none."""
    sys.modules["triton_python_backend_utils"] = pb_utils
    sys.dont_write_bytecode = True
    sys.path.insert(0, version_dir)
    spec = importlib.util.spec_from_file_location("model", model_file)
    if spec is None or spec.loader is None:
        raise ImportError(f"cannot import {model_file}")
    module = importlib.util.module_from_spec(spec)
    sys.modules["model"] = module
    spec.loader.exec_module(module)
    cls = getattr(module, "TritonPythonModel", None)
    hook = getattr(cls, "auto_complete_config", None)
    if hook is None:
        return None
    result = hook(pb_utils.ModelConfig(config))
    return (result if result is not None else pb_utils.ModelConfig(config)).as_dict()
