"""Ensembles: a DAG of model steps wired by input_map / output_map (Triton's ensemble_scheduling).

Why validate as a graph at load: a cycle, a tensor nobody produces, or a tensor produced
twice would otherwise surface as a hung or half-answered request. Execution is data-driven:
a step starts as soon as all of its input tensors exist, so independent branches overlap,
and each step goes through its composing model's own queue and batcher.

A decoupled step (or a nested ensemble that is decoupled) makes the ensemble decoupled, as in
Triton: each response of that step is its own set of tensors that runs the steps after it
again, and each time the ensemble's outputs are complete the client gets a response (so it
must stream). Tensors carry a lineage tag (which response of which decoupled step they come
from) so that a step only ever pairs tensors of one response, with the tensors made before
the fork (ensemble inputs, earlier steps) shared by every response.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Iterator
from dataclasses import dataclass, field

from tritonclient.grpc import model_config_pb2 as mc

from modelport.repository.checks import check_request
from modelport.repository.errors import ModelConfigError, ServingError, needs_streaming
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


def _upstream(steps: list[Step]) -> dict[int, set[int]]:
    """Step index -> the steps that feed it, directly or through others (the graph is acyclic)."""
    producer = {t: st.index for st in steps for t in st.output_map.values()}
    out: dict[int, set[int]] = {}

    def walk(i: int) -> set[int]:
        if i not in out:
            direct = {producer[t] for t in steps[i].input_map.values() if t in producer}
            out[i] = set(direct).union(*(walk(d) for d in direct))
        return out[i]

    for st in steps:
        walk(st.index)
    return out


def check_decoupled_joins(cfg: mc.ModelConfig, steps: list[Step], decoupled: set[int]) -> None:
    """Refuse a step (or the ensemble outputs) that combines tensors of two decoupled steps
    running side by side (neither feeds the other).

    Why at load: each response of a decoupled step starts its own lineage; responses of two
    independent streams have no pairing, so such a step would never run and the ensemble
    would answer nothing."""
    if len(decoupled) < 2:
        return
    producer = {t: st.index for st in steps for t in st.output_map.values()}
    upstream = _upstream(steps)

    def forks(tensors: Iterable[str]) -> set[int]:
        found: set[int] = set()
        for t in tensors:
            if t in producer:
                p = producer[t]
                found |= {d for d in upstream[p] | {p} if d in decoupled}
        return found

    consumers = [
        (f"step {st.index} (model '{st.model_name}')", st.input_map.values()) for st in steps
    ]
    consumers.append(("the ensemble outputs", [o.name for o in cfg.output]))
    for who, tensors in consumers:
        for a, b in itertools.combinations(sorted(forks(tensors)), 2):
            if a not in upstream[b] and b not in upstream[a]:
                raise _err(
                    cfg,
                    f"{who} combines the responses of decoupled steps {a} "
                    f"('{steps[a].model_name}') and {b} ('{steps[b].model_name}'), which run "
                    "side by side: their responses cannot be paired",
                )


StepRunner = Callable[[InferRequest], Awaitable[InferResponse]]
StepStreamer = Callable[[InferRequest], AsyncIterator[InferResponse]]
# the lineage of a tensor: ((decoupled step index, response index), ...) from the outermost
# fork in; () for ensemble inputs and whatever was computed before any decoupled step
Tag = tuple[tuple[int, int], ...]


def _lineage(tags: Iterable[Tag]) -> Tag | None:
    """The longest of `tags` when they all lie on one lineage (each extends the shorter
    ones), else None: tensors of different responses never meet in one step."""
    longest: Tag = ()
    for t in sorted(tags, key=len):
        if t[: len(longest)] != longest:
            return None
        longest = t
    return longest


def _related(a: Tag, b: Tag) -> bool:
    return a[: len(b)] == b or b[: len(a)] == a


@dataclass
class _Run:
    """One execution of a step in a decoupled ensemble request."""

    step: Step
    tag: Tag  # the lineage of its inputs
    decoupled: bool
    responses: int = 0

    def floor(self) -> Tag:
        """No tensor this run still produces sorts before this (its next response's tag)."""
        return self.tag + ((self.step.index, self.responses),) if self.decoupled else self.tag


@dataclass
class _Flow:
    """The tensors of one decoupled ensemble request, each with its lineage tags."""

    consumers: dict[str, list[Step]]
    wanted: list[str]
    values: dict[str, list[tuple[Tag, InferTensor]]] = field(default_factory=dict)
    # complete output sets not yet sent: (tag, arrival, outputs); sent in tag order
    ready: list[tuple[Tag, int, dict[str, InferTensor]]] = field(default_factory=list)
    arrivals: int = 0

    def _matches(
        self, names: list[str], name: str, tag: Tag, t: InferTensor
    ) -> Iterator[tuple[Tag, dict[str, InferTensor]]]:
        """Every way to complete `names` around the new tensor `name` with tensors of one
        lineage: (lineage, tensors). Each combination is found once, when its last tensor
        arrives."""
        choices = []
        for n in dict.fromkeys(names):
            if n == name:
                choices.append([(tag, t)])
            else:
                choices.append([(g, v) for g, v in self.values.get(n, ()) if _related(g, tag)])
        for combo in itertools.product(*choices):
            lineage = _lineage(g for g, _ in combo)
            if lineage is not None:
                yield lineage, dict(zip(dict.fromkeys(names), (v for _, v in combo)))

    def add(self, name: str, tag: Tag, t: InferTensor) -> list[tuple[Step, Tag, dict]]:
        """Record a tensor; return the step runs it completes (step, lineage, tensors)."""
        self.values.setdefault(name, []).append((tag, t))
        runs = []
        for st in self.consumers.get(name, ()):
            for lineage, tensors in self._matches(list(st.input_map.values()), name, tag, t):
                runs.append((st, lineage, tensors))
        if name in self.wanted:
            for lineage, tensors in self._matches(self.wanted, name, tag, t):
                self.ready.append((lineage, self.arrivals, tensors))
                self.arrivals += 1
        return runs

    def release(self, floor: Tag | None) -> list[dict[str, InferTensor]]:
        """The output sets that sort before `floor` (everything when nothing runs), in order:
        a response never overtakes one of an earlier response of a decoupled step."""
        self.ready.sort(key=lambda r: (r[0], r[1]))
        n = len(self.ready) if floor is None else sum(1 for r in self.ready if r[0] < floor)
        out, self.ready = self.ready[:n], self.ready[n:]
        return [tensors for _, _, tensors in out]


class EnsembleModel:
    """A ready ensemble; `run_step` is the repository's infer (so steps hit real queues)."""

    def __init__(
        self,
        config: mc.ModelConfig,
        version: int,
        steps: list[Step],
        run_step: StepRunner,
        cache: ResponseCache | None = None,
        tracer: Tracer | None = None,
        stream_step: StepStreamer | None = None,
        decoupled_steps: Iterable[int] = (),
    ) -> None:
        """cache: the server's response cache; with `response_cache { enable: true }` in the
        ensemble's config, whole ensemble responses are cached (Triton's top-level ensemble
        caching; steps use the cache by their own configs). decoupled_steps: the indices of
        the steps whose models are decoupled; any makes the ensemble decoupled, its steps run
        through `stream_step` (the repository's stream) and its responses are not cached."""
        self.config = config
        self.name = config.name
        self.version = version
        self.steps = steps
        self.stats = ModelStats(config.name, version)
        self.ready = True
        self._run_step = run_step
        self._stream_step = stream_step
        self.decoupled_steps = frozenset(decoupled_steps)
        self.decoupled = bool(self.decoupled_steps)
        if self.decoupled and stream_step is None:
            raise ValueError("an ensemble with decoupled steps needs stream_step")
        self.tracer = tracer
        self.cache_enabled = cache is not None and config.response_cache.enable
        self._cache = (
            ModelCache(cache, self.name, version, self.stats)
            if cache is not None and self.cache_enabled and not self.decoupled
            else None
        )
        self._consumers: dict[str, list[Step]] = {}
        for st in steps:
            for tensor in dict.fromkeys(st.input_map.values()):
                self._consumers.setdefault(tensor, []).append(st)
        # ensemble tensor -> the steps it depends on (those worth waiting for before sending)
        producer = {t: st.index for st in steps for t in st.output_map.values()}
        upstream = _upstream(steps)
        self._feeders = {t: upstream[p] | {p} for t, p in producer.items()}

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
        return await self._run_step(self._request(st, req, tensors, trace))

    def _request(
        self,
        st: Step,
        req: InferRequest,
        tensors: dict[str, InferTensor],
        trace: Trace | None = None,
    ) -> InferRequest:
        """The request of step `st` for the ensemble request `req`, inputs from `tensors`."""
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
        return sub

    def _trace_start(self, req: InferRequest, t0: int) -> Trace | None:
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
        return trace

    async def infer(self, req: InferRequest) -> InferResponse:
        if self.decoupled:
            raise needs_streaming(self.name)
        t0 = time.perf_counter_ns()
        trace = self._trace_start(req, t0)
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
                        tensors.update(self._step_outputs(st, resp))
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
        """One response for a plain ensemble; for a decoupled one, a response each time the
        outputs are complete (see the module docstring).

        Responses go out in the order of the decoupled steps' responses they come from, and
        a step's error ends the stream in that order too: the responses of earlier responses
        still go out, then the error; work of later responses is dropped."""
        if not self.decoupled:
            yield await self.infer(req)
            return
        t0 = time.perf_counter_ns()
        trace = self._trace_start(req, t0)
        self.stats.pending += 1
        ok = False
        rows = 1
        sent: dict[str, InferTensor] = {}
        events: asyncio.Queue = asyncio.Queue()
        tasks: dict[asyncio.Task, _Run] = {}
        # the first error in response order: (the lineage it ends, the error to raise)
        failure: tuple[Tag, BaseException] | None = None
        try:
            rows = check_request(self.config, req)
            wanted = req.requested_outputs or [o.name for o in self.config.output]
            # a run that cannot reach the requested outputs never holds a response back
            feeding = set().union(*(self._feeders.get(n, set()) for n in wanted))
            flow = _Flow(self._consumers, list(wanted))

            def launch(found: list[tuple[Step, Tag, dict[str, InferTensor]]]) -> None:
                for st, tag, tensors in found:
                    if failure is not None and tag >= failure[0]:
                        continue  # after the error in response order: never sent
                    run = _Run(st, tag, st.index in self.decoupled_steps)
                    sub = self._request(st, req, tensors, trace)
                    tasks[asyncio.ensure_future(self._pump(sub, events))] = run

            def fail(tag: Tag, error: BaseException) -> None:
                nonlocal failure
                if failure is None or tag < failure[0]:
                    failure = (tag, error)

            for name, t in req.inputs.items():
                launch(flow.add(name, (), t))
            if not tasks:
                raise ServingError(f"ensemble '{self.name}' cannot make progress")
            while tasks:
                kind, task, payload = await events.get()
                run = tasks.get(task)
                if run is None:
                    continue  # a run dropped after an error
                if kind == "error":
                    del tasks[task]
                    if isinstance(payload, ServingError):
                        # Triton names the ensemble in a step's error, keeping its code
                        error = ServingError(
                            f"in ensemble '{self.name}', {payload}", payload.status
                        )
                        error.__cause__ = payload
                        payload = error
                    fail(run.floor(), payload)
                elif kind == "done":
                    del tasks[task]
                else:
                    tag = run.floor()
                    try:
                        launch(self._consume(flow, run, payload))
                    except ServingError as e:
                        fail(tag, e)
                if failure is not None:  # what can only come after the error: stop it
                    for t, r in list(tasks.items()):
                        if r.floor() >= failure[0] or r.step.index not in feeding:
                            t.cancel()
                            del tasks[t]
                floors = [r.floor() for r in tasks.values() if r.step.index in feeding]
                if failure is not None:
                    floors.append(failure[0])
                for outputs in flow.release(min(floors) if floors else None):
                    if trace is not None and trace.tensors:
                        sent.update(outputs)
                    yield InferResponse(self.name, self.version, outputs, id=req.id)
            if failure is not None:
                raise failure[1]
            ok = True
        finally:
            for task in tasks:
                task.cancel()
            self.stats.pending -= 1
            elapsed = time.perf_counter_ns() - t0
            if ok:
                self.stats.record_success(rows, elapsed, 0, elapsed)
                self.stats.record_execution(rows, elapsed)
            else:
                self.stats.record_failure(elapsed)
            if trace is not None:
                self._trace_end(trace, req, sent, t0 + elapsed)

    async def _pump(self, sub: InferRequest, events: asyncio.Queue) -> None:
        """Forward a step's responses, then its end or its error, to the request's loop."""
        assert self._stream_step is not None
        me = asyncio.current_task()
        try:
            async with contextlib.aclosing(self._stream_step(sub)) as responses:
                async for resp in responses:
                    events.put_nowait(("response", me, resp))
        except Exception as e:  # noqa: BLE001 - raised by the request's loop
            events.put_nowait(("error", me, e))
        else:
            events.put_nowait(("done", me, None))

    def _consume(
        self, flow: _Flow, run: _Run, resp: InferResponse
    ) -> list[tuple[Step, Tag, dict[str, InferTensor]]]:
        """A step's response: its tensors join the flow; returns the runs they complete."""
        st = run.step
        tag = run.floor()
        run.responses += 1
        if run.decoupled and not any(k in resp.outputs for k in st.output_map):
            return []  # e.g. a response that only carries the final flag: nothing to run
        found = []
        for name, t in self._step_outputs(st, resp).items():
            found += flow.add(name, tag, t)
        return found

    def _step_outputs(self, st: Step, resp: InferResponse) -> dict[str, InferTensor]:
        """A step's outputs under their ensemble tensor names (an error if one is missing)."""
        out = {}
        for k, name in st.output_map.items():
            if k not in resp.outputs:
                raise ServingError(
                    f"in ensemble '{self.name}', step {st.index} model "
                    f"'{st.model_name}' returned no output '{k}'"
                )
            t = resp.outputs[k]
            out[name] = InferTensor(name, t.datatype, t.data)
        return out
