"""AsyncLLM: the server-side engine handle. Text work here, model steps in the core process.

`generate()` validates and sends a request at once (so errors surface before any response
starts) and returns a stream of cumulative RequestOutputs. The OutputProcessor runs on the
event loop in delta mode (it holds back text that might still become a stop string) and the
stream re-accumulates, so a streamed answer and a non-streamed one are the same text.

Back-pressure is decided here, not in the core: the core is another process and could only
answer asynchronously, after a streaming response has already begun with 200. The estimate
`in-flight sequences - running sequences (from the latest step)` is exact as of that step.
"""

from __future__ import annotations

import asyncio
import contextlib
import copy
import dataclasses
import functools
import logging
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from modelport.engine.core_client import (
    CorePrefixCacheReset,
    CoreProfiled,
    CoreReady,
    CoreRejected,
    CoreSleepState,
    CoreStepOutputs,
    DPEngineCoreClient,
    EngineCoreClient,
    EngineDeadError,
    make_core_client,
)
from modelport.engine.messages import SchedulerStats
from modelport.outputs import CompletionOutput, Prefix, RequestOutput, shallow_copy
from modelport.sampling_params import SamplingParams

logger = logging.getLogger("modelport.engine.async_llm")

# text prompts of this many characters and more are encoded off the event loop
# (AsyncLLM.encode_async); shorter ones cost less than the thread hop
ENCODE_OFFLOAD_CHARS = 8192


def _encode_all(tokenizer: Any, texts: list[str], add_special_tokens: bool) -> list[list[int]]:
    return [list(tokenizer.encode(t, add_special_tokens=add_special_tokens)) for t in texts]

__all__ = ["AsyncLLM", "EngineDeadError", "QueueFullError", "RequestStream"]


class QueueFullError(RuntimeError):
    """The bounded waiting queue cannot take the request now; retry later (HTTP 503)."""


class StatLogger:
    """What AsyncLLM reports; the OpenAI server plugs its Prometheus metrics in here.

    `engine`: the index of the engine core (data-parallel replica) the stats or the request
    belong to, 0 with one engine."""

    def observe_stats(self, stats: SchedulerStats, engine: int = 0,
                      server_stats: SchedulerStats | None = None) -> None: ...
    def observe_step_tokens(self, num_tokens: int, engine: int = 0) -> None: ...
    def observe_first_token(self, ttft: float, queue_time: float | None,
                            engine: int = 0) -> None: ...
    def observe_tokens(self, n_new: int, gap: float | None, engine: int = 0) -> None: ...
    def observe_finished(
        self, finish_reason: str, e2e: float, prompt_tokens: int, generation_tokens: int,
        decode_time: float = 0.0, prefill_time: float | None = None, engine: int = 0,
    ) -> None: ...
    def observe_rejected(self) -> None: ...
    def observe_request(self, n: int, max_tokens: int | None, max_generated: int,
                        engine: int = 0) -> None: ...


@dataclasses.dataclass
class _Child:
    index: int
    text: str = ""
    token_ids: list[int] = dataclasses.field(default_factory=list)
    logprobs: list | None = None
    cumulative_logprob: float | None = None
    finish_reason: str | None = None
    stop_reason: int | str | None = None
    first_token_time: float | None = None
    last_token_time: float | None = None

    def decode_time(self) -> float:
        """Seconds from its first token to its latest (vLLM's decode_time)."""
        if self.first_token_time is None or self.last_token_time is None:
            return 0.0
        return self.last_token_time - self.first_token_time


class RequestStream:
    """Async iterator of one request's cumulative outputs; closing it early aborts the request."""

    def __init__(
        self, llm: AsyncLLM, request_id: str, prompt_ids: list[int], params: SamplingParams
    ):
        self._llm = llm
        self.request_id = request_id
        self.prompt_ids = prompt_ids
        self.params = params
        self.queue: asyncio.Queue[RequestOutput | BaseException] = asyncio.Queue()
        self.children = {i: _Child(i) for i in range(params.n)}
        self.arrival = time.monotonic()
        self.first_token_time: float | None = None
        self.prefill_time: float | None = None  # first scheduled -> first token (seconds)
        self.engine = 0  # the engine core (data-parallel replica) that runs it
        self.done = False

    def __aiter__(self) -> RequestStream:
        return self

    async def __anext__(self) -> RequestOutput:
        if self.done:
            raise StopAsyncIteration
        try:
            item = await self.queue.get()
        except BaseException:  # cancelled: the client is gone
            self._llm.abort_now(self.request_id)
            raise
        if isinstance(item, BaseException):
            self.done = True
            raise item
        if item.finished:
            self.done = True
        return item

    async def aclose(self) -> None:
        if not self.done:
            self._llm.abort_now(self.request_id)

    def __del__(self) -> None:
        if not self.done and self._llm is not None:
            try:
                self._llm._loop.call_soon_threadsafe(self._llm.abort_now, self.request_id)
            except Exception:
                pass


# Several engines of one process (a model repository's llm models, the OpenAI model beside
# them) start one after another: one resolves its config or loads its tokenizer at a time
# (transformers' lazy imports race in two threads at once), and one core at a time sizes its
# KV cache from free memory. An engine's own tokenizer loads while its core starts.
_PREPARING = threading.Lock()
_SIZING = threading.Lock()


def queue_has_room(waiting: int, num_seqs: int, limit: int) -> bool:
    """Whether a request of `num_seqs` sequences (n, times prompts) may join `waiting` ones.

    An empty queue takes any request, even one wider than the limit: refusing it as "busy"
    would refuse it forever, since no retry could find the queue emptier than that.
    """
    return waiting == 0 or waiting + num_seqs <= limit


class AsyncLLM:
    def __init__(
        self,
        engine_config: Any,
        tokenizer: Any,
        client: EngineCoreClient | DPEngineCoreClient | None,
        loop: asyncio.AbstractEventLoop,
        *,
        max_waiting_requests: int | None = None,
        served_model_names: list[str] | None = None,
    ) -> None:
        from modelport.frontend.processor import InputProcessor, OutputProcessor

        self.engine_config = engine_config
        self.tokenizer = tokenizer
        self._loop = loop
        self.input_processor = InputProcessor(
            tokenizer, engine_config.model_config, engine_config.scheduler_config,
            max_logprobs=engine_config.max_logprobs,
            logits_processors=getattr(engine_config, "logits_processors", ()),
        )
        self.output_processor = OutputProcessor(tokenizer)
        self.max_waiting_requests = max_waiting_requests
        self.served_model_names = served_model_names or [engine_config.served_model_name]
        # the names /v1/models lists (None: all of served_model_names); the others are
        # accepted aliases
        self.listed_model_names: list[str] | None = None
        # multi-LoRA (--enable-lora): adapter name -> its LoRARequest; a request whose
        # 'model' is one of these names runs with that adapter (entrypoints/openai/lora.py)
        self.lora_requests: dict[str, Any] = {}
        self.stat_logger: StatLogger = StatLogger()
        self.stats = SchedulerStats()
        self._streams: dict[str, RequestStream] = {}
        # pooling (embedding) requests in flight: request id -> its future pooled vector
        self._pooling: dict[str, asyncio.Future] = {}
        self._num_inflight_seqs = 0
        self.dead_reason: str | None = None
        # called (on the event loop) once the core died and its requests were failed
        self.on_dead: Callable[[str], None] | None = None
        self.client: EngineCoreClient | DPEngineCoreClient | None = client
        self.ready: CoreReady | None = client.ready if client is not None else None
        # encode_async's tokenizer thread and copy (None: not made yet; False: unavailable)
        self._encoder: tuple[ThreadPoolExecutor, Any] | bool | None = None
        # sleep mode: the core's state as of its latest answer, and the sleep / wake_up calls
        # waiting for theirs (the core answers in order)
        self._sleeping = False
        self._sleep_waiters: list[asyncio.Future] = []
        # the torch profiler's start / stop calls waiting for the core's answer, in order
        self._profile_waiters: list[asyncio.Future] = []
        # reset_prefix_cache calls waiting for the core's answer, in order
        self._reset_waiters: list[asyncio.Future] = []

    # ---------------------------------------------------------------- start / stop

    @classmethod
    async def from_engine_args(cls, engine_args: Any, **kw: Any) -> AsyncLLM:
        """Resolve the config, then start the core process while the tokenizer loads (worker
        threads)."""
        from modelport.frontend.tokenizer import load_tokenizer

        loop = asyncio.get_running_loop()

        def prepare() -> Any:
            with _PREPARING:
                return engine_args.create_engine_config()

        config = await asyncio.to_thread(prepare)
        # The bound is enforced here (see module doc), so the core gets none.
        sched = dataclasses.replace(config.scheduler_config, max_waiting_requests=None)
        core_config = dataclasses.replace(config, scheduler_config=sched)
        # the core's messages reach the engine once it exists (an early one, its death while
        # the tokenizer still loads, waits in `early`); both lists change on the loop only
        made: list[AsyncLLM] = []
        early: list[Any] = []

        def deliver(msg: Any) -> None:
            if made:
                made[0]._on_core_message(msg)
            else:
                early.append(msg)

        def on_message(msg: Any) -> None:
            # the core's last message (its exit) can come after the server's loop closed
            with contextlib.suppress(RuntimeError):
                loop.call_soon_threadsafe(deliver, msg)

        def start_core() -> Any:
            with _SIZING:
                return make_core_client(core_config, on_message)

        def tokenizer() -> Any:
            with _PREPARING:
                return load_tokenizer(config.model_source)

        # the core process imports and loads its weights while this one loads the tokenizer
        core = asyncio.ensure_future(asyncio.to_thread(start_core))
        try:
            tok = await asyncio.to_thread(tokenizer)
            client = await core
        except BaseException:  # a core that did start goes too
            with contextlib.suppress(BaseException):
                started = await core
                await asyncio.to_thread(started.shutdown)
            raise
        llm = cls(
            config,
            tok,
            None,
            loop,
            max_waiting_requests=config.scheduler_config.max_waiting_requests,
            **kw,
        )
        llm.client = client
        llm.ready = client.ready
        made.append(llm)
        for msg in early:
            llm._on_core_message(msg)
        await asyncio.to_thread(llm._offload_encoder)  # the copy now, not at a request
        return llm

    def shutdown(self) -> None:
        if self.client is not None:
            self.client.shutdown()
        if self._encoder:
            self._encoder[0].shutdown(wait=False)

    # ---------------------------------------------------------------- facts

    @property
    def model_config(self) -> Any:
        return self.engine_config.model_config

    @property
    def max_model_len(self) -> int:
        return self.engine_config.scheduler_config.max_model_len

    @property
    def max_num_seqs(self) -> int:
        return self.engine_config.scheduler_config.max_num_seqs

    @property
    def vocab_size(self) -> int:
        return self.engine_config.model_config.vocab_size

    @property
    def is_ready(self) -> bool:
        return self.client is not None and self.dead_reason is None

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return list(self.tokenizer.encode(text, add_special_tokens=add_special_tokens))

    async def encode_async(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """``encode``, off the event loop for long texts (ENCODE_OFFLOAD_CHARS and up): on the
        tokenizer thread, with that thread's own copy of the tokenizer. A 40,000-token prompt
        takes ~55 ms to encode on a 2-core box; on the loop that stalls every other stream's
        tokens for as long."""
        return (await self.encode_many_async([text], add_special_tokens))[0]

    async def encode_many_async(self, texts: list[str], add_special_tokens: bool = True
                                ) -> list[list[int]]:
        """``encode`` of each text, all on the tokenizer thread in one hop when together they
        reach ENCODE_OFFLOAD_CHARS (a batch of embedding inputs, each short)."""
        if sum(map(len, texts)) < ENCODE_OFFLOAD_CHARS:
            return [self.encode(t, add_special_tokens) for t in texts]
        enc = self._offload_encoder()
        if enc is None:
            return [self.encode(t, add_special_tokens) for t in texts]
        pool, tok = enc
        return await asyncio.get_running_loop().run_in_executor(
            pool, functools.partial(_encode_all, tok, list(texts), add_special_tokens))

    def _offload_encoder(self) -> tuple[ThreadPoolExecutor, Any] | None:
        """(the one-thread pool, its tokenizer copy), made on first use; None when the
        tokenizer cannot be copied (then encoding stays on the loop). HF fast tokenizers are
        not safe to use from two threads at once (encode may reconfigure the Rust object's
        padding and truncation), and the loop keeps decoding with the original."""
        if self._encoder is None:
            try:
                tok = copy.deepcopy(getattr(self.tokenizer, "hf", self.tokenizer))
            except Exception as e:  # an exotic tokenizer object: encode on the loop
                logger.info("prompts are encoded on the event loop (tokenizer copy: %s)", e)
                self._encoder = False
                return None
            pool = ThreadPoolExecutor(1, thread_name_prefix="modelport-tokenizer")
            self._encoder = (pool, tok)
        return self._encoder or None

    def decode(self, ids: list[int], skip_special_tokens: bool = False) -> str:
        return self.tokenizer.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def decode_token(self, token_id: int) -> str:
        return self.tokenizer.decode([token_id], skip_special_tokens=False)

    # ---------------------------------------------------------------- requests

    def check_admission(self, num_seqs: int) -> None:
        """Raise QueueFullError if `num_seqs` more sequences would overflow the waiting queue."""
        if self.dead_reason is not None:
            raise EngineDeadError(self.dead_reason)
        limit = self.max_waiting_requests
        if limit is None:
            return
        # Sequences sent but not running wait, except those the next step can still start:
        # free sequence slots, unless the last step left some waiting (KV memory is full).
        stats = self.stats
        slots = self.max_num_seqs * self.engine_config.parallel_config.data_parallel_size
        capacity = stats.num_running if stats.num_waiting else max(stats.num_running, slots)
        waiting = max(0, self._num_inflight_seqs - capacity)
        starting = max(0, capacity - self._num_inflight_seqs)
        if num_seqs > starting and not queue_has_room(waiting, num_seqs - starting, limit):
            self.stat_logger.observe_rejected()
            raise QueueFullError(
                f"the server is busy: {waiting} requests are waiting "
                f"(--max-waiting-requests {limit}); retry later"
            )

    def generate(
        self,
        prompt_token_ids: list[int],
        params: SamplingParams,
        request_id: str,
        *,
        prompt_text: str | None = None,
        priority: int = 0,
        lora_request: Any = None,
    ) -> RequestStream:
        """Send the request now (ValueError if invalid); iterate the result for its outputs.
        ``lora_request`` (a modelport.lora LoRARequest) runs it with that adapter."""
        if self.dead_reason is not None or self.client is None:
            raise EngineDeadError(self.dead_reason or "engine is not started")
        if request_id in self._streams:
            raise ValueError(f"request id {request_id!r} is already in use")
        ids = list(prompt_token_ids)
        if params.truncate_prompt_tokens is not None:  # as LLM.generate does
            ids = self.input_processor.truncate(ids, params.truncate_prompt_tokens)
        stream = RequestStream(self, request_id, ids, params)
        core_reqs = self.input_processor.process(
            request_id, stream.prompt_ids, params, arrival_time=stream.arrival, priority=priority,
            lora_request=lora_request,
        )
        self.output_processor.add_request(
            request_id, prompt_text, stream.prompt_ids, params,
            output_kind="delta", arrival_time=stream.arrival,
        )  # fmt: skip
        self._streams[request_id] = stream
        self._num_inflight_seqs += len(core_reqs)
        # together: one replica holds all n samples; its index labels the request's metrics
        stream.engine = self.client.add_requests(core_reqs) or 0
        return stream

    @property
    def num_inflight_seqs(self) -> int:
        """Sequences sent to the core and not finished (samples of n > 1 count each)."""
        return self._num_inflight_seqs

    @property
    def runner_type(self) -> str:
        return getattr(self.engine_config, "runner_type", "generate")

    @property
    def pooling_task(self) -> str | None:
        """What a pooling engine does: "embed" or "classify" (None: a generative engine)."""
        if self.runner_type != "pooling":
            return None
        pooler = getattr(self.engine_config, "pooler_config", None)
        return pooler.task if pooler is not None else "embed"

    async def pool(self, prompt_token_ids: list[int], params: Any, request_id: str,
                   *, priority: int = 0) -> tuple[list[float], int]:
        """A pooling model's vector for one prompt: (pooled floats, cached prompt tokens).

        Validates and sends at once (ValueError if invalid, before anything is awaited when
        called through :meth:`submit_pooling`); cancelling the await aborts the request."""
        fut = self.submit_pooling(prompt_token_ids, params, request_id, priority=priority)
        return await self.wait_pooling(request_id, fut)

    def submit_pooling(self, prompt_token_ids: list[int], params: Any, request_id: str,
                       *, priority: int = 0) -> asyncio.Future:
        from modelport.pooling_params import pooling_core_request

        if self.dead_reason is not None or self.client is None:
            raise EngineDeadError(self.dead_reason or "engine is not started")
        if request_id in self._pooling or request_id in self._streams:
            raise ValueError(f"request id {request_id!r} is already in use")
        cfg = self.engine_config
        if priority:
            cfg.scheduler_config.verify_priority(priority)
        ids = list(prompt_token_ids)
        if params.truncate_prompt_tokens is not None:
            ids = self.input_processor.truncate(ids, params.truncate_prompt_tokens)
        req = pooling_core_request(
            request_id, ids, params, vocab_size=cfg.model_config.vocab_size,
            max_model_len=cfg.scheduler_config.max_model_len, model_name=cfg.served_model_name,
            hf_config=cfg.model_config.hf_config, pooler=cfg.pooler_config, priority=priority)
        fut: asyncio.Future = self._loop.create_future()
        self._pooling[request_id] = fut
        self._num_inflight_seqs += 1
        self.client.add_requests([req])
        return fut

    async def wait_pooling(self, request_id: str, fut: asyncio.Future) -> tuple[list[float], int]:
        try:
            return await fut
        except BaseException:
            self._abort_pooling(request_id)
            raise

    def _abort_pooling(self, request_id: str) -> None:
        fut = self._pooling.pop(request_id, None)
        if fut is None:
            return
        self._num_inflight_seqs -= 1
        if self.client is not None and self.dead_reason is None:
            self.client.abort_requests([request_id])

    def _on_pooled(self, outputs: list) -> list:
        """Resolve the pooling requests among a step's outputs (a token task's rows as a
        list of lists); returns the others."""
        from modelport.pooling_params import unflatten

        rest = []
        for o in outputs:
            fut = self._pooling.get(o.request_id)
            if fut is None:
                rest.append(o)
                continue
            if not o.finished:
                continue
            del self._pooling[o.request_id]
            self._num_inflight_seqs -= 1
            if fut.done():
                continue
            if o.pooled is None:
                fut.set_exception(ValueError(f"request {o.request_id} was aborted"))
            else:
                fut.set_result((unflatten(o.pooled, o.pooled_shape), o.num_cached_tokens))
        return rest

    def remove_lora(self, lora_int_id: int) -> None:
        """The engine core (every data-parallel replica) forgets an adapter the server no
        longer serves: its loaded copy and device slot. Requests already sent keep theirs."""
        if self.client is not None and self.dead_reason is None:
            with contextlib.suppress(EngineDeadError):  # a dead core has nothing to free
                self.client.remove_lora(lora_int_id)

    # ---------------------------------------------------------------- sleep mode (vLLM's)

    async def sleep(self, level: int = 1) -> None:
        """Free the KV cache (prefix cache reset) and offload (1) or drop (2) the weights on
        every replica and rank. Requests already in the engine finish first; requests sent
        from then until wake_up wait in the core and run after it."""
        if level not in (1, 2):
            raise ValueError(f"sleep level must be 1 or 2, got {level}")
        await self._sleep_call(lambda c: c.sleep(level))

    async def wake_up(self, tags: list[str] | None = None) -> None:
        """Restore "weights" and/or "kv_cache" (None: both); level 2 reloads the weights from
        the checkpoint. Held requests run once both are back."""
        from modelport.engine.core import WAKE_UP_TAGS

        bad = [t for t in tags or () if t not in WAKE_UP_TAGS]
        if bad:
            raise ValueError(f"wake_up tags must be among {list(WAKE_UP_TAGS)}, got {bad}")
        await self._sleep_call(lambda c: c.wake_up(tags))

    async def is_sleeping(self) -> bool:
        return self._sleeping

    async def _sleep_call(self, send: Callable[[Any], None]) -> None:
        if not self.engine_config.enable_sleep_mode:
            raise ValueError("sleep mode is off: start the engine with --enable-sleep-mode "
                             "(enable_sleep_mode=True)")
        state: CoreSleepState = await self._control_call(self._sleep_waiters, send)
        if state.error is not None:
            raise ValueError(state.error)

    async def _control_call(self, waiters: list[asyncio.Future],
                            send: Callable[[Any], None]) -> Any:
        """Send a control call to the core(s) and wait for its answer, which
        `_answer(waiters, ...)` hands over in the order the calls were sent."""
        if self.dead_reason is not None or self.client is None:
            raise EngineDeadError(self.dead_reason or "engine is not started")
        fut = self._loop.create_future()
        waiters.append(fut)
        try:
            send(self.client)
        except BaseException:
            waiters.remove(fut)
            raise
        return await fut

    @staticmethod
    def _answer(waiters: list[asyncio.Future], msg: Any) -> None:
        if waiters:
            fut = waiters.pop(0)
            if not fut.done():
                fut.set_result(msg)

    def _on_sleep_state(self, msg: CoreSleepState) -> None:
        self._sleeping = msg.is_sleeping
        self._answer(self._sleep_waiters, msg)

    # ---------------------------------------------------------------- torch profiler (vLLM's)

    async def start_profile(self) -> None:
        """Start vLLM's torch profiler in every process that runs the model (each replica's
        core, each tensor-parallel rank); TorchProfilerError when it is off (no
        MODELPORT_TORCH_PROFILER_DIR / VLLM_TORCH_PROFILER_DIR) or already running."""
        await self._profile_call("start")

    async def stop_profile(self) -> None:
        """Stop it; returns once every process has written its trace into the directory."""
        await self._profile_call("stop")

    async def _profile_call(self, action: str) -> None:
        from modelport.engine.torch_profiler import TorchProfilerError

        answer: CoreProfiled = await self._control_call(self._profile_waiters,
                                                        lambda c: c.profile(action))
        if answer.error is not None:
            raise TorchProfilerError(answer.error)

    # ---------------------------------------------------------------- prefix cache (vLLM's)

    async def reset_prefix_cache(self) -> CorePrefixCacheReset:
        """Forget every cached prefix block on every data-parallel replica. As vLLM's
        (reset_running_requests=False), a replica whose blocks are held by requests in flight
        resets nothing: the answer's `reset` is False and `failed_replicas` names them."""
        return await self._control_call(self._reset_waiters, lambda c: c.reset_prefix_cache())

    def abort_now(self, request_id: str) -> None:
        """Forget the request here and tell the core to free its blocks (next step at latest)."""
        stream = self._streams.pop(request_id, None)
        if stream is None:
            return
        stream.done = True
        child_ids = self.output_processor.abort(request_id)
        self._num_inflight_seqs -= sum(
            1 for c in stream.children.values() if c.finish_reason is None
        )
        e2e = time.monotonic() - stream.arrival
        for c in stream.children.values():
            if c.finish_reason is None:
                self.stat_logger.observe_finished(
                    "abort", e2e, len(stream.prompt_ids), len(c.token_ids), c.decode_time(),
                    stream.prefill_time, engine=stream.engine,
                )
        self._observe_done(stream)
        if self.client is not None and self.dead_reason is None and child_ids:
            self.client.abort_requests(child_ids)

    async def abort(self, request_id: str) -> None:
        self.abort_now(request_id)

    # ---------------------------------------------------------------- core messages (loop thread)

    def _on_core_message(self, msg: Any) -> None:
        try:
            if isinstance(msg, CoreStepOutputs):
                self._on_outputs(msg)
            elif isinstance(msg, CoreRejected):
                self._on_rejected(msg)
            elif isinstance(msg, CoreSleepState):
                self._on_sleep_state(msg)
            elif isinstance(msg, CoreProfiled):
                self._answer(self._profile_waiters, msg)
            elif isinstance(msg, CorePrefixCacheReset):
                self._answer(self._reset_waiters, msg)
            elif isinstance(msg, EngineDeadError):
                self._on_dead(msg)
        except Exception:
            logger.exception("failed to process engine core outputs")

    def _on_rejected(self, msg: CoreRejected) -> None:
        fut = self._pooling.pop(msg.request_id, None)
        if fut is not None:
            self._num_inflight_seqs -= 1
            if not fut.done():
                fut.set_exception(QueueFullError(msg.message) if msg.kind == "queue_full"
                                  else ValueError(msg.message))
            return
        for rid, stream in list(self._streams.items()):
            if msg.request_id in self.output_processor.child_ids(rid):
                err: Exception = (
                    QueueFullError(msg.message)
                    if msg.kind == "queue_full"
                    else ValueError(msg.message)
                )
                self.abort_now(rid)
                stream.queue.put_nowait(err)
                return

    def _on_dead(self, err: EngineDeadError) -> None:
        self.dead_reason = str(err)
        logger.error("engine core died: %s; failing %d requests", err, len(self._streams))
        for stream in self._streams.values():
            stream.queue.put_nowait(EngineDeadError(str(err)))
        self._streams.clear()
        for fut in self._pooling.values():
            if not fut.done():
                fut.set_exception(EngineDeadError(str(err)))
        self._pooling.clear()
        for fut in self._sleep_waiters + self._profile_waiters + self._reset_waiters:
            if not fut.done():
                fut.set_exception(EngineDeadError(str(err)))
        self._sleep_waiters.clear()
        self._profile_waiters.clear()
        self._reset_waiters.clear()
        self._num_inflight_seqs = 0
        if self.on_dead is not None:
            self.on_dead(self.dead_reason)

    def _on_outputs(self, msg: CoreStepOutputs) -> None:
        outs = msg.outputs
        if outs.stats is not None:
            # the whole engine's (all replicas merged, under data parallelism) for admission;
            # the metrics also get the sending replica's own
            self.stats = outs.stats if outs.merged_stats is None else outs.merged_stats
            self.stat_logger.observe_stats(outs.stats, outs.engine_index, self.stats)
        if outs.num_step_tokens:
            self.stat_logger.observe_step_tokens(outs.num_step_tokens, outs.engine_index)
        if not outs.outputs:
            return
        outputs = outs.outputs
        if self._pooling:
            outputs = self._on_pooled(outputs)
            if not outputs:
                return
        results, to_abort = self.output_processor.process_outputs(outputs)
        if to_abort and self.client is not None:
            self.client.abort_requests(to_abort)
        now = time.monotonic()
        for ro in results:
            stream = self._streams.get(ro.request_id)
            if stream is not None:
                self._deliver(stream, ro, now)

    def _observe_done(self, stream: RequestStream) -> None:
        """A request is done (finished or aborted): its parameters, for the metrics."""
        longest = max(len(c.token_ids) for c in stream.children.values())
        self.stat_logger.observe_request(stream.params.n, stream.params.max_tokens, longest,
                                         stream.engine)

    def _deliver(self, stream: RequestStream, delta: RequestOutput, now: float) -> None:
        log = self.stat_logger
        for d in delta.outputs:
            c = stream.children[d.index]
            if d.token_ids:
                if stream.first_token_time is None:
                    stream.first_token_time = now
                    m = delta.metrics
                    queue_time = None
                    if m is not None and m.first_scheduled_time is not None:
                        queue_time = m.first_scheduled_time - stream.arrival
                        stream.prefill_time = max(0.0, now - m.first_scheduled_time)
                    log.observe_first_token(now - stream.arrival, queue_time, stream.engine)
                if c.last_token_time is None:
                    c.first_token_time = now
                gap = None if c.last_token_time is None else now - c.last_token_time
                log.observe_tokens(len(d.token_ids), gap, stream.engine)
                c.last_token_time = now
            c.text += d.text
            c.token_ids.extend(d.token_ids)
            if d.logprobs is not None:
                if c.logprobs is None:
                    c.logprobs = []
                c.logprobs.extend(d.logprobs)
            c.cumulative_logprob = d.cumulative_logprob
            if d.finish_reason is not None and c.finish_reason is None:
                c.finish_reason, c.stop_reason = d.finish_reason, d.stop_reason
                self._num_inflight_seqs -= 1
                log.observe_finished(
                    d.finish_reason, now - stream.arrival, len(stream.prompt_ids),
                    len(c.token_ids), c.decode_time(), stream.prefill_time, stream.engine,
                )
        # a running child's lists only grow (extend above): its outputs get Prefix views of
        # them, O(1) a step; a finished child's, real lists
        outputs = [
            CompletionOutput(
                index=c.index,
                text=c.text,
                token_ids=(list(c.token_ids) if c.finish_reason is not None
                           else Prefix(c.token_ids, len(c.token_ids))),
                cumulative_logprob=c.cumulative_logprob,
                logprobs=None if c.logprobs is None else (
                    list(c.logprobs) if c.finish_reason is not None
                    else Prefix(c.logprobs, len(c.logprobs))),
                finish_reason=c.finish_reason,
                stop_reason=c.stop_reason,
            )
            for c in stream.children.values()
        ]
        cumulative = shallow_copy(delta)  # dataclasses.replace's result, several times cheaper
        cumulative.outputs = outputs
        if delta.finished:
            self._streams.pop(stream.request_id, None)
            self._observe_done(stream)
        stream.queue.put_nowait(cumulative)
