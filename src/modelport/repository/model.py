"""A loaded model version: request checks, the dynamic batcher, the backend, and stats.

The request path is: check (Triton's messages) -> reshape -> batcher queue (priority,
queue policy) -> backend.execute on a free instance -> reshape back, filter outputs.
Readiness turns true only after every instance initialized and warm-up ran.
"""

from __future__ import annotations

import asyncio
import dataclasses
import time
from collections.abc import AsyncIterator
from typing import Any

import numpy as np
from tritonclient.grpc import model_config_pb2 as mc

from modelport.repository.backends.base import STREAM_END, Backend, BatchItem
from modelport.repository.checks import check_request
from modelport.repository.classification import classify, load_labels
from modelport.repository.errors import (
    InvalidArgument,
    ModelConfigError,
    ServingError,
    Unavailable,
    needs_streaming,
)
from modelport.repository.model_config import is_decoupled
from modelport.repository.rate_limit import instance_limits
from modelport.repository.sequence import ControlInputs, ImplicitStates, is_sequence
from modelport.repository.sequence import batcher_config as sequence_batcher_config
from modelport.repository.stats import ModelStats
from modelport.repository.tensors import InferRequest, InferResponse, InferTensor
from modelport.repository.trace import Trace, Tracer
from modelport.repository.warmup import warmup_requests
from modelport.serving.batcher import (
    BatcherConfig,
    BatcherStoppedError,
    DynamicBatcher,
    QueueFullError,
    QueuePolicy,
    RequestTimeoutError,
    TimeoutAction,
)
from modelport.serving.rate_limiter import RateLimiter, RateLimitError
from modelport.serving.response_cache import Miss, ModelCache, ResponseCache
from modelport.serving.sequence_batcher import (
    SeqEntry,
    SequenceBatcher,
    SequenceNotStartedError,
)

# the correlation id warm-up requests of a sequence model run under (START and END)
WARMUP_SEQUENCE_ID = 2**64 - 1


def _policy(p: mc.ModelQueuePolicy) -> QueuePolicy:
    return QueuePolicy(
        max_queue_size=p.max_queue_size,
        timeout_s=(p.default_timeout_microseconds / 1e6)
        if p.default_timeout_microseconds
        else None,
        timeout_action=(
            TimeoutAction.DELAY
            if p.timeout_action == mc.ModelQueuePolicy.DELAY
            else TimeoutAction.REJECT
        ),
        allow_timeout_override=p.allow_timeout_override,
    )


def batcher_config(cfg: mc.ModelConfig) -> BatcherConfig:
    """Triton's dynamic_batching block -> BatcherConfig (no block: each request alone)."""
    if not cfg.HasField("dynamic_batching"):
        return BatcherConfig(max_batch_size=0)
    db = cfg.dynamic_batching
    ragged = {i.name for i in cfg.input if i.allow_ragged_batch}

    def shapes(item: BatchItem) -> tuple:
        # Triton batches requests whose inputs agree in shape past the batch dimension,
        # except the inputs that allow_ragged_batch
        return tuple(sorted((n, t.data.shape[1:]) for n, t in item.request.inputs.items()
                            if n not in ragged))

    return BatcherConfig(
        batch_key=shapes,
        max_batch_size=cfg.max_batch_size,
        preferred_batch_sizes=tuple(db.preferred_batch_size),
        max_queue_delay_s=db.max_queue_delay_microseconds / 1e6,
        preserve_ordering=db.preserve_ordering,
        priority_levels=db.priority_levels,
        default_priority=db.default_priority_level,
        default_policy=_policy(db.default_queue_policy),
        priority_policies={int(k): _policy(v) for k, v in db.priority_queue_policy.items()},
    )


def _reshape(t: InferTensor, shape: list[int], batched: bool) -> InferTensor:
    target = ([t.data.shape[0]] if batched else []) + shape
    if sum(1 for d in target if d == -1) > 1 or list(t.data.shape) == target:
        return t
    try:
        return InferTensor(t.name, t.datatype, t.data.reshape(target))
    except ValueError:
        raise InvalidArgument(
            f"cannot reshape '{t.name}' {list(t.data.shape)} to {target}"
        ) from None


def _zeros_like(t: InferTensor) -> InferTensor:
    if t.data.dtype == object:
        return InferTensor(t.name, t.datatype, np.full(t.data.shape, b"", dtype=object))
    return InferTensor(t.name, t.datatype, np.zeros_like(t.data))


class ModelVersion:
    """One ready-to-serve version of a non-ensemble model."""

    def __init__(
        self,
        config: mc.ModelConfig,
        version: int,
        backend: Backend,
        cache: ResponseCache | None = None,
        tracer: Tracer | None = None,
        rate_limiter: RateLimiter | None = None,
    ) -> None:
        """cache: the server's response cache (--cache-config), used when the config has
        `response_cache { enable: true }`; tracer: the server's request tracing;
        rate_limiter: the server's (--rate-limit execution_count), None when off."""
        self.config = config
        self.rate_limiter = rate_limiter
        self._limiter_key = f"{config.name}:{version}:{id(self)}"
        self.tracer = tracer
        self.name = config.name
        self.version = version
        self.backend = backend
        self.decoupled = is_decoupled(config)
        self.stats = ModelStats(config.name, version)
        self.batcher = DynamicBatcher(batcher_config(config), self._execute, backend.num_instances)
        self.sequencer: SequenceBatcher | None = None
        self._controls: ControlInputs | None = None
        self.states: ImplicitStates | None = None
        if is_sequence(config):
            if config.sequence_batching.state:
                self.states = ImplicitStates(config, backend.ctx.model_dir)
            self.sequencer = SequenceBatcher(
                sequence_batcher_config(config),
                self._execute_sequence,
                backend.num_instances,
                on_release=self.states.drop if self.states is not None else None,
            )
            self._controls = ControlInputs(config)
        self.ready = False
        self._inputs = {i.name: i for i in config.input}
        self._outputs = {o.name: o for o in config.output}
        self._labels = load_labels(config, backend.ctx.model_dir)
        # as Triton: cache metrics exist when both the server and the model enable the cache;
        # only requests of the default / dynamic batch scheduler use it (not sequence models;
        # decoupled models with the cache enabled fail validation)
        self.cache_enabled = cache is not None and config.response_cache.enable
        self._cache: ModelCache | None = None
        if self.cache_enabled and self.sequencer is None and not self.decoupled:
            assert cache is not None
            self._cache = ModelCache(cache, self.name, version, self.stats)

    def _limit(self) -> None:
        if self.rate_limiter is None:
            return
        try:
            gates = self.rate_limiter.register(self._limiter_key, instance_limits(self.config))
        except RateLimitError as e:
            raise ModelConfigError(str(e)) from None
        self.backend.limit(gates)

    def _unlimit(self) -> None:
        if self.rate_limiter is not None:
            self.rate_limiter.unregister(self._limiter_key)

    async def start(self) -> None:
        self._limit()
        try:
            await self.backend.load()
        except BaseException:
            self._unlimit()
            raise
        self.batcher.start()
        if self.sequencer is not None:
            self.sequencer.start()
        try:
            await self._warmup()
        except Exception:
            await self.stop()
            raise
        self.ready = True

    async def stop(self) -> None:
        self.ready = False
        if self.sequencer is not None:
            await self.sequencer.stop()
        if self.states is not None:
            self.states.clear()
        await self.batcher.stop()
        await self.backend.unload()
        self._unlimit()

    async def _warmup(self) -> None:
        for label, req, count in warmup_requests(self.config, self.backend.ctx.model_dir):
            if self.sequencer is not None:  # each warm-up request is a whole sequence
                sid: int | str = WARMUP_SEQUENCE_ID
                if self._controls is not None and self._controls.corrid_type == mc.TYPE_STRING:
                    sid = "modelport-warmup"
                req = dataclasses.replace(
                    req, sequence_id=sid, sequence_start=True, sequence_end=True
                )
            for _ in range(count):
                try:
                    if self.decoupled:
                        async for _r in self.stream(req):
                            pass
                    else:
                        await self.infer(req)
                except ServingError as e:
                    raise ModelConfigError(
                        f"model '{self.name}' version {self.version}: warmup '{label}' failed: {e}"
                    ) from None

    async def _execute(self, items: list[BatchItem]) -> list[Any]:
        start = time.perf_counter_ns()
        results = await self.backend.execute(items)
        # from the backend's compute start: a rate limiter's wait is queue time, not compute
        start = max(start, items[0].compute_start_ns) if items else start
        rows = sum(it.extra.get("rows", 1) for it in items)
        self.stats.record_execution(rows, time.perf_counter_ns() - start)
        return results

    async def _execute_sequence(self, instance: int, entries: list[SeqEntry]) -> list[Any]:
        """One batch of the sequence batcher on `instance`, control inputs (and implicit
        state inputs) filled in; an empty slot (direct strategy) runs a null request:
        zeros, READY false, CORRID 0."""
        assert self._controls is not None
        states = self.states
        extra: list[dict] = [{} for _ in entries]
        if states is not None:  # continuing requests first: an END and a new START of one
            for i, e in sorted(enumerate(entries), key=lambda x: x[1].start):  # id may share
                if e.item is not None:  # a batch, and the START resets the stored state
                    extra[i] = states.inputs(e)
        first = next(i for i, e in enumerate(entries) if e.item is not None)
        template = entries[first].item.request
        items: list[BatchItem] = []
        for e, ex in zip(entries, extra):
            if e.item is None:
                null = InferRequest(
                    model_name=self.name,
                    model_version=self.version,
                    inputs={
                        n: _zeros_like(t) for n, t in {**template.inputs, **extra[first]}.items()
                    },
                    requested_outputs=template.requested_outputs,
                )
                item = BatchItem(null, extra={"rows": 1, "null": True})
            else:
                item = e.item
            req = item.request
            requested = req.requested_outputs
            if states is not None and requested is not None:
                requested = list(dict.fromkeys([*requested, *states.output_names]))
            item.request = dataclasses.replace(
                req,
                inputs={**req.inputs, **ex, **self._controls.tensors(e)},
                requested_outputs=requested,
            )
            items.append(item)
        start = time.perf_counter_ns()
        results = await self.backend.run_limited(instance, items)
        start = max(start, items[0].compute_start_ns)  # rate limiter wait: queue time
        self.stats.record_execution(len(items), time.perf_counter_ns() - start)
        if states is not None and len(results) == len(entries):
            results = list(results)
            updates = []
            for i, e in enumerate(entries):
                if e.item is None:
                    continue
                results[i], new = states.take_outputs(e, results[i])
                updates.append((e, new))
            # END drops first: a new START of the same id may share this batch
            for e, _ in updates:
                if e.end:
                    states.drop(e.corrid)
            for e, new in updates:
                if not e.end and new is not None:
                    states.store(e.corrid, new)
        return results

    def _prepare(self, req: InferRequest) -> tuple[InferRequest, int]:
        rows = check_request(self.config, req)
        batched = self.config.max_batch_size > 0
        inputs = {}
        for name, t in req.inputs.items():
            io = self._inputs[name]
            inputs[name] = (
                _reshape(t, list(io.reshape.shape), batched) if io.HasField("reshape") else t
            )
        prepared = InferRequest(
            model_name=req.model_name,
            model_version=self.version,
            inputs=inputs,
            requested_outputs=req.requested_outputs,
            id=req.id,
            parameters=req.parameters,
            priority=req.priority,
            timeout_us=req.timeout_us,
            classification=req.classification,
            sequence_id=req.sequence_id,
            sequence_start=req.sequence_start,
            sequence_end=req.sequence_end,
        )
        return prepared, rows

    def _finish(self, req: InferRequest, resp: InferResponse) -> InferResponse:
        batched = self.config.max_batch_size > 0
        outputs = {}
        for name, t in resp.outputs.items():
            if req.requested_outputs is not None and name not in req.requested_outputs:
                continue
            io = self._outputs.get(name)
            if io is not None and io.HasField("reshape"):
                t = _reshape(t, list(io.dims), batched)
            if name in req.classification:
                t = classify(t, req.classification[name], self._labels.get(name), batched)
            outputs[name] = t
        return InferResponse(
            self.name,
            self.version,
            outputs,
            id=req.id,
            parameters=resp.parameters,
            final=resp.final,
        )

    async def _submit_sequence(self, item: BatchItem, rows: int) -> Any:
        assert self.sequencer is not None and self._controls is not None
        req = item.request
        sid = req.sequence_id
        if sid == 0 or sid == "":
            raise InvalidArgument(
                f"inference request to model '{self.name}' must specify a non-zero or "
                "non-empty correlation ID"
            )
        if self.config.max_batch_size > 0 and rows > 1:
            raise InvalidArgument(
                f"inference request to model '{self.name}' must specify batch-size 1 due to "
                "requirements of sequence batcher"
            )
        self._controls.check_corrid(self.name, sid)
        try:
            return await self.sequencer.submit(item, sid, req.sequence_start, req.sequence_end)
        except SequenceNotStartedError:
            raise InvalidArgument(
                f"inference request for sequence {sid} to model '{self.name}' must specify "
                "the START flag on the first request of the sequence"
            ) from None
        except BatcherStoppedError:
            raise Unavailable(f"model '{self.name}' is being unloaded") from None

    async def _submit(self, item: BatchItem, rows: int) -> Any:
        if self.sequencer is not None:
            return await self._submit_sequence(item, rows)
        req = item.request
        timeout = req.timeout_us / 1e6 if req.timeout_us else None
        try:
            return await self.batcher.submit(
                item, batch_size=rows, priority=req.priority or None, timeout_s=timeout
            )
        except QueueFullError:
            raise Unavailable("Exceeds maximum queue size") from None
        except RequestTimeoutError:
            raise Unavailable("Request timeout expired") from None
        except BatcherStoppedError:
            raise Unavailable(f"model '{self.name}' is being unloaded") from None
        except ValueError as e:
            raise InvalidArgument(f"{e} for model '{self.name}'") from None

    def _trace_start(self, req: InferRequest, t0: int) -> Trace | None:
        tracer = self.tracer  # warm-up requests (before ready) are not traced, as in Triton
        if tracer is None or not self.ready or (req.trace_parent is None and not tracer.active):
            return None
        trace = tracer.start(self.name, self.version, req.id, req.trace_parent)
        if trace is not None:
            trace.stamp("REQUEST_START", t0)
        return trace

    @staticmethod
    def _trace_queued(trace: Trace, prepared: InferRequest) -> None:
        trace.stamp("QUEUE_START", time.perf_counter_ns())
        if trace.tensors:
            for name, t in prepared.inputs.items():
                trace.tensor("TENSOR_QUEUE_INPUT", name, t.datatype, t.data)

    def _trace_end(
        self,
        trace: Trace,
        req: InferRequest,
        item: BatchItem | None,
        outputs: dict[str, InferTensor] | None,
        end: int,
    ) -> None:
        """The compute points are the batch's (the same the statistics record); the
        backend's input copy and output copy are inside them, so COMPUTE_INPUT_END is
        COMPUTE_START and COMPUTE_OUTPUT_START is COMPUTE_END, as compute_input and
        compute_output are 0 in the statistics."""
        if item is not None and item.compute_start_ns:
            # a decoupled stream may end before its batch reports back: then at `end`; and
            # the batch may report back between `end` and now: never after REQUEST_END
            done = item.compute_end_ns if item.compute_end_ns >= item.compute_start_ns else end
            done = min(done, end)
            trace.stamp("COMPUTE_START", item.compute_start_ns)
            trace.stamp("COMPUTE_INPUT_END", item.compute_start_ns)
            trace.stamp("COMPUTE_OUTPUT_START", done)
            if outputs and trace.tensors:
                for name, t in outputs.items():
                    trace.tensor("TENSOR_BACKEND_OUTPUT", name, t.datatype, t.data)
            trace.stamp("COMPUTE_END", done)
        trace.stamp("REQUEST_END", end)
        assert self.tracer is not None
        self.tracer.finish(trace, req.trace_parent)

    async def infer(self, req: InferRequest) -> InferResponse:
        if self.decoupled:
            raise needs_streaming(self.name)
        t0 = time.perf_counter_ns()
        trace = self._trace_start(req, t0)
        self.stats.pending += 1
        miss: Miss | None = None
        item: BatchItem | None = None
        try:
            prepared, rows = self._prepare(req)
            # before the batcher's queue, so that a hit never waits there (warm-up, which
            # runs before the model is ready, bypasses the cache as Triton's does)
            if self._cache is not None and self.ready:
                found = self._cache.lookup(req, t0)
                if isinstance(found, InferResponse):
                    if trace is not None:
                        self._trace_end(trace, req, None, None, time.perf_counter_ns())
                    return found
                miss = found
            item = BatchItem(prepared, extra={"rows": rows})
            if trace is not None:
                self._trace_queued(trace, prepared)
            try:
                result = await self._submit(item, rows)
            except asyncio.CancelledError:  # the client went away: request.is_cancelled()
                item.cancel()
                raise
            resp = self._finish(req, result)
        except ServingError:
            failed = time.perf_counter_ns()
            self.stats.record_failure(failed - t0)
            if trace is not None:
                self._trace_end(trace, req, item, None, failed)
            raise
        except Exception as e:
            failed = time.perf_counter_ns()
            self.stats.record_failure(failed - t0)
            if trace is not None:
                self._trace_end(trace, req, item, None, failed)
            raise ServingError(f"model '{self.name}': {type(e).__name__}: {e}") from e
        finally:
            self.stats.pending -= 1
        end = time.perf_counter_ns()
        if trace is not None:  # the backend's outputs, before the requested-output filter
            outputs = result.outputs if isinstance(result, InferResponse) else resp.outputs
            self._trace_end(trace, req, item, outputs, end)
        self.stats.record_success(
            rows,
            end - t0,
            queue_ns=(item.compute_start_ns - t0) if item.compute_start_ns else 0,
            infer_ns=item.compute_end_ns - item.compute_start_ns,
        )
        if miss is not None and self._cache is not None:
            self._cache.store(miss, resp)
        return resp

    async def stream(self, req: InferRequest) -> AsyncIterator[InferResponse]:
        """Responses of one request: many for a decoupled model, one otherwise."""
        if not self.decoupled:
            yield await self.infer(req)
            return
        t0 = time.perf_counter_ns()
        trace = self._trace_start(req, t0)
        self.stats.pending += 1
        ok = False
        item: BatchItem | None = None
        sent: dict[str, InferTensor] = {}
        try:
            prepared, rows = self._prepare(req)
            item = BatchItem(prepared, stream=asyncio.Queue(), extra={"rows": rows})
            if trace is not None:
                self._trace_queued(trace, prepared)
            submit = asyncio.ensure_future(self._submit(item, rows))
            try:
                while True:
                    getter = asyncio.ensure_future(item.stream.get())
                    waiting = {getter} if submit.done() else {getter, submit}
                    await asyncio.wait(waiting, return_when=asyncio.FIRST_COMPLETED)
                    if not getter.done():  # the batch ended before the stream did
                        getter.cancel()
                        submit.result()  # raises if rejected in the queue or the batch failed
                        continue
                    msg = getter.result()
                    if msg is STREAM_END:
                        break
                    if isinstance(msg, BaseException):
                        raise msg
                    out = self._finish(req, msg)
                    if trace is not None and trace.tensors:
                        sent.update(out.outputs)
                    yield out
            except (asyncio.CancelledError, GeneratorExit):  # the client went away
                item.cancel()
                raise
            finally:
                if not submit.done():
                    submit.cancel()
            ok = True
        finally:
            self.stats.pending -= 1
            elapsed = time.perf_counter_ns() - t0
            if ok and item is not None:
                self.stats.record_success(
                    item.extra.get("rows", 1),
                    elapsed,
                    queue_ns=max(item.compute_start_ns - t0, 0) if item.compute_start_ns else 0,
                    infer_ns=item.compute_end_ns - item.compute_start_ns,
                )
            else:
                self.stats.record_failure(elapsed)
            if trace is not None:
                self._trace_end(trace, req, item, sent, t0 + elapsed)


__all__ = ["ModelVersion", "batcher_config"]
