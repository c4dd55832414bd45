"""Ensembles: a DAG of model steps wired by input_map / output_map (Triton's ensemble_scheduling).

Why validate as a graph at load: a cycle, a tensor nobody produces, or a tensor produced
twice would otherwise surface as a hung or half-answered request. Execution is data-driven:
a step starts as soon as all of its input tensors exist, so independent branches overlap,
and each step goes through its composing model's own queue and batcher.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass

from tritonclient.grpc import model_config_pb2 as mc

from modelport.repository.checks import check_request
from modelport.repository.errors import ModelConfigError, ServingError
from modelport.repository.stats import ModelStats
from modelport.repository.tensors import InferRequest, InferResponse, InferTensor
from modelport.repository.trace import Trace, Tracer
from modelport.serving.response_cache import Miss, ModelCache, ResponseCache


@dataclass(frozen=True)
class Step:
    index: int
    model_name: str
    model_version: int
    input_map: dict[str, str]  # composing model input -> ensemble tensor
    output_map: dict[str, str]  # composing model output -> ensemble tensor


def _err(cfg: mc.ModelConfig, message: str) -> ModelConfigError:
    return ModelConfigError(f"ensemble '{cfg.name}': {message}")


def ensemble_steps(cfg: mc.ModelConfig) -> list[Step]:
    """Parse and check the step graph on its own (no other model needed)."""
    raw = cfg.ensemble_scheduling.step
    if not raw:
        raise _err(cfg, "must have at least one step")
    steps = []
    for i, s in enumerate(raw):
        if not s.model_name:
            raise _err(cfg, f"step {i} must specify 'model_name'")
        if s.model_name == cfg.name:
            raise _err(cfg, f"step {i} uses the ensemble itself")
        if not s.input_map or not s.output_map:
            raise _err(cfg, f"step {i} (model '{s.model_name}') needs input_map and output_map")
        steps.append(Step(i, s.model_name, s.model_version, dict(s.input_map), dict(s.output_map)))
    ens_inputs = {i.name for i in cfg.input}
    producer: dict[str, int] = {name: -1 for name in ens_inputs}
    for st in steps:
        for tensor in st.output_map.values():
            if tensor in producer:
                who = "an ensemble input" if producer[tensor] < 0 else f"step {producer[tensor]}"
                raise _err(
                    cfg,
                    f"ensemble tensor '{tensor}' is produced by step {st.index} (model "
                    f"'{st.model_name}') and already by {who}",
                )
            producer[tensor] = st.index
    for st in steps:
        for tensor in st.input_map.values():
            if tensor not in producer:
                raise _err(
                    cfg,
                    f"step {st.index} (model '{st.model_name}') consumes ensemble tensor "
                    f"'{tensor}' which is not mapped from any ensemble input or step output",
                )
    for out in cfg.output:
        if out.name not in producer:
            raise _err(cfg, f"ensemble output '{out.name}' is not mapped from any step output")
    consumed = {t for st in steps for t in st.input_map.values()}
    unused = sorted(ens_inputs - consumed)
    if unused:
        raise _err(cfg, f"ensemble input(s) {unused} are not used by any step (unreachable)")
    # Kahn's algorithm over steps: whatever is left is on (or behind) a cycle
    deps = {
        st.index: {producer[t] for t in st.input_map.values() if producer[t] >= 0} for st in steps
    }
    done: set[int] = set()
    progress = True
    while progress:
        progress = False
        for idx, d in deps.items():
            if idx not in done and d <= done:
                done.add(idx)
                progress = True
    stuck = sorted(set(deps) - done)
    if stuck:
        names = [f"{i}:{steps[i].model_name}" for i in stuck]
        raise _err(cfg, f"the steps form a cycle; steps {names} can never run")
    return steps


def check_composing(
    cfg: mc.ModelConfig, steps: list[Step], configs: dict[str, mc.ModelConfig]
) -> None:
    """Cross-model checks: every step's names exist in its model, and types line up."""
    dtypes: dict[str, int] = {i.name: i.data_type for i in cfg.input}
    for st in steps:
        sub = configs[st.model_name]
        if sub.model_transaction_policy.decoupled:
            raise _err(cfg, f"step {st.index}: decoupled model '{st.model_name}' cannot be a step")
        ins = {i.name: i for i in sub.input}
        outs = {o.name: o for o in sub.output}
        for k in st.input_map:
            if k not in ins:
                raise _err(cfg, f"step {st.index}: model '{st.model_name}' has no input '{k}'")
        for k in st.output_map:
            if k not in outs:
                raise _err(cfg, f"step {st.index}: model '{st.model_name}' has no output '{k}'")
        missing = [n for n, i in ins.items() if not i.optional and n not in st.input_map]
        if missing:
            raise _err(
                cfg, f"step {st.index}: required input(s) {missing} of '{st.model_name}' unmapped"
            )
        for k, tensor in st.output_map.items():
            dtypes[tensor] = outs[k].data_type
    for st in steps:
        sub = configs[st.model_name]
        ins = {i.name: i for i in sub.input}
        for k, tensor in st.input_map.items():
            if tensor in dtypes and dtypes[tensor] != ins[k].data_type:
                raise _err(
                    cfg,
                    f"tensor '{tensor}' is {mc.DataType.Name(dtypes[tensor])} but step "
                    f"{st.index} input '{k}' of '{st.model_name}' expects "
                    f"{mc.DataType.Name(ins[k].data_type)}",
                )
    for out in cfg.output:
        if dtypes.get(out.name, out.data_type) != out.data_type:
            raise _err(
                cfg,
                f"output '{out.name}' is declared {mc.DataType.Name(out.data_type)} but its step "
                f"produces {mc.DataType.Name(dtypes[out.name])}",
            )


StepRunner = Callable[[InferRequest], Awaitable[InferResponse]]


class EnsembleModel:
    """A ready ensemble; `run_step` is the repository's infer (so steps hit real queues)."""

    decoupled = False

    def __init__(
        self,
        config: mc.ModelConfig,
        version: int,
        steps: list[Step],
        run_step: StepRunner,
        cache: ResponseCache | None = None,
        tracer: Tracer | None = None,
    ) -> None:
        """cache: the server's response cache; with `response_cache { enable: true }` in the
        ensemble's config, whole ensemble responses are cached (Triton's top-level ensemble
        caching; steps use the cache by their own configs)."""
        self.config = config
        self.name = config.name
        self.version = version
        self.steps = steps
        self.stats = ModelStats(config.name, version)
        self.ready = True
        self._run_step = run_step
        self.tracer = tracer
        self.cache_enabled = cache is not None and config.response_cache.enable
        self._cache = (
            ModelCache(cache, self.name, version, self.stats)
            if cache is not None and self.cache_enabled
            else None
        )

    async def start(self) -> None:
        self.ready = True

    async def stop(self) -> None:
        self.ready = False

    async def _step(
        self,
        st: Step,
        req: InferRequest,
        tensors: dict[str, InferTensor],
        trace: Trace | None = None,
    ) -> InferResponse:
        inputs = {}
        for k, name in st.input_map.items():
            t = tensors[name]
            inputs[k] = InferTensor(k, t.datatype, t.data)
        sub = InferRequest(
            model_name=st.model_name,
            model_version=st.model_version,
            inputs=inputs,
            requested_outputs=list(st.output_map),
            id=req.id,
            parameters=req.parameters,
            priority=req.priority,
            timeout_us=req.timeout_us,
            sequence_id=req.sequence_id,
            sequence_start=req.sequence_start,
            sequence_end=req.sequence_end,
            trace_parent=trace,  # the step's trace is a child of the ensemble's
        )
        return await self._run_step(sub)

    async def infer(self, req: InferRequest) -> InferResponse:
        t0 = time.perf_counter_ns()
        trace: Trace | None = None
        tracer = self.tracer
        if tracer is not None and (tracer.active or req.trace_parent is not None):
            trace = tracer.start(self.name, self.version, req.id, req.trace_parent)
        if trace is not None:
            # no queue: the steps queue at their models (their traces are children)
            for name in ("REQUEST_START", "QUEUE_START", "COMPUTE_START"):
                trace.stamp(name, t0)
            if trace.tensors:
                for name, t in req.inputs.items():
                    trace.tensor("TENSOR_QUEUE_INPUT", name, t.datatype, t.data)
        self.stats.pending += 1
        miss: Miss | None = None
        outputs: dict[str, InferTensor] = {}
        try:
            rows = check_request(self.config, req)
            if self._cache is not None:
                found = self._cache.lookup(req, t0)
                if isinstance(found, InferResponse):
                    return found
                miss = found
            tensors: dict[str, InferTensor] = dict(req.inputs)
            waiting = list(self.steps)
            running: dict[asyncio.Task, Step] = {}
            try:
                while waiting or running:
                    for st in [
                        s for s in waiting if all(t in tensors for t in s.input_map.values())
                    ]:
                        waiting.remove(st)
                        step = self._step(st, req, tensors, trace)
                        running[asyncio.ensure_future(step)] = st
                    if not running:
                        raise ServingError(f"ensemble '{self.name}' cannot make progress")
                    done, _ = await asyncio.wait(running, return_when=asyncio.FIRST_COMPLETED)
                    for task in done:
                        st = running.pop(task)
                        try:
                            resp = task.result()
                        except ServingError as e:
                            # Triton names the ensemble in a step's error, keeping its code
                            raise ServingError(f"in ensemble '{self.name}', {e}", e.status) from e
                        for k, name in st.output_map.items():
                            if k not in resp.outputs:
                                raise ServingError(
                                    f"in ensemble '{self.name}', step {st.index} model "
                                    f"'{st.model_name}' returned no output '{k}'"
                                )
                            t = resp.outputs[k]
                            tensors[name] = InferTensor(name, t.datatype, t.data)
            finally:
                for task in running:
                    task.cancel()
            wanted = req.requested_outputs or [o.name for o in self.config.output]
            outputs = {n: tensors[n] for n in wanted if n in tensors}
        except ServingError:
            self.stats.record_failure(time.perf_counter_ns() - t0)
            raise
        finally:
            self.stats.pending -= 1
            if trace is not None:
                self._trace_end(trace, req, outputs, time.perf_counter_ns())
        elapsed = time.perf_counter_ns() - t0
        self.stats.record_success(rows, elapsed, 0, elapsed)
        self.stats.record_execution(rows, elapsed)
        resp = InferResponse(self.name, self.version, outputs, id=req.id)
        if miss is not None and self._cache is not None:
            self._cache.store(miss, resp)
        return resp

    def _trace_end(
        self, trace: Trace, req: InferRequest, outputs: dict[str, InferTensor], end: int
    ) -> None:
        if trace.tensors:
            for name, t in outputs.items():
                trace.tensor("TENSOR_BACKEND_OUTPUT", name, t.datatype, t.data)
        trace.stamp("COMPUTE_END", end)
        trace.stamp("REQUEST_END", end)
        assert self.tracer is not None
        self.tracer.finish(trace, req.trace_parent)

    async def stream(self, req: InferRequest) -> AsyncIterator[InferResponse]:
        yield await self.infer(req)
