"""EngineCore: schedule -> runner.execute -> update, over typed messages. Token ids only."""

from __future__ import annotations

import logging
from concurrent.futures import FIRST_COMPLETED, Future, wait
from typing import TYPE_CHECKING, Any

from modelport.engine.arg_utils import EngineConfig
from modelport.engine.kv_cache_manager import KVCacheManager
from modelport.engine.messages import (
    EngineCoreOutput,
    EngineCoreOutputs,
    EngineCoreRequest,
    SchedulerStats,
    TokenLogprobs,
    dict_to_params,
)
from modelport.engine.request import Request, RequestStatus
from modelport.engine.scheduler import Scheduler, SchedulerOutput
from modelport.engine.structured_output import ReasoningEnd, StructuredOutputManager
from modelport.engine.torch_profiler import TorchProfiler, TorchProfilerError, not_enabled_message

if TYPE_CHECKING:
    from modelport.runner.model_runner import PendingStep

logger = logging.getLogger(__name__)

# what wake_up(tags=...) may restore, as vLLM names it
WAKE_UP_TAGS = ("weights", "kv_cache")

# an idle step with only grammars compiling waits this long (at most) for one to finish
_GRAMMAR_WAIT_S = 0.01


class EngineCore:
    def __init__(self, config: EngineConfig) -> None:
        from modelport.runner.model_runner import ModelRunner

        self.config = config
        self.runner = ModelRunner(config)
        # vLLM's VLLM_TORCH_PROFILER_DIR (engine/torch_profiler.py): None when it is unset
        self.torch_profiler = TorchProfiler.from_env(config)
        self.runner.load_model()
        num_blocks = self.runner.determine_num_blocks()
        self.runner.init_kv_cache(num_blocks)
        bs = config.cache_config.block_size
        window = self.runner.uniform_sliding_window()
        self.kv = KVCacheManager(num_blocks, bs, config.cache_config.enable_prefix_caching,
                                 sliding_window=window)
        if window is not None:
            logger.info("sliding window of %d tokens on every layer: blocks that leave it are "
                        "given back while a request runs", window)
        lora = config.lora_config
        self.scheduler = Scheduler(config.scheduler_config, self.kv, config.speculative_config,
                                   max_loras=lora.max_loras if lora is not None else None)
        # structured outputs: the tokenizer and xgrammar are loaded on the first such request
        self._structured: StructuredOutputManager | None = None
        # requests whose grammar is compiling in the manager's pool (WAITING_FOR_FSM)
        self._compiling: dict[str, tuple[Request, Future]] = {}
        # (request id, why): requests whose grammar failed to compile, for the caller to
        # refuse as it refuses an invalid request at admission (take_rejected)
        self._rejected: list[tuple[str, str]] = []
        self._tokenizer: Any = None
        # a reasoning parser: a request's grammar waits for the end of its reasoning (vLLM's);
        # the think tags are looked up now, so a tokenizer without them fails at start
        self._reasoning_end: ReasoningEnd | None = None
        if config.reasoning_parser is not None and config.runner_type != "pooling":
            end = ReasoningEnd.from_vocab(config.reasoning_parser,
                                          self._load_tokenizer().get_vocab())
            if not config.enable_in_reasoning:
                self._reasoning_end = end
        logger.info("KV cache: %d blocks x %d tokens = %d tokens", num_blocks, bs, num_blocks * bs)
        # prompt logprobs arrive chunk by chunk; gathered here until the prompt is done
        self._prompt_lps: dict[str, list[TokenLogprobs | None]] = {}
        # async scheduling: the step launched on the device whose tokens are not back yet
        # speculative steps need the accepted tokens on the host before the next schedule
        spec = config.speculative_config
        self.async_scheduling = (config.async_scheduling and self.runner.supports_async
                                 and spec is None)
        self._inflight: tuple[SchedulerOutput, PendingStep] | None = None
        # an embedding model (runner "pooling"): every request is prefill-only and pooled
        self.pooling = config.runner_type == "pooling"
        if self.async_scheduling:
            logger.info("async scheduling: step N+1 is prepared while step N runs")
        if spec is not None:
            source = (f"{'draft model' if spec.method == 'draft_model' else 'EAGLE head'} {spec.model}"
                      if spec.model is not None else
                      f"n-grams of {spec.prompt_lookup_min}-{spec.prompt_lookup_max} tokens")
            logger.info("speculative decoding: up to %d draft tokens from %s; async scheduling "
                        "off", spec.num_speculative_tokens, source)

    def _load_tokenizer(self) -> Any:
        if self._tokenizer is None:
            from modelport.frontend.tokenizer import load_tokenizer

            self._tokenizer = load_tokenizer(self.config.model_source)
        return self._tokenizer

    def _structured_outputs(self) -> StructuredOutputManager:
        if self._structured is None:
            self._structured = StructuredOutputManager(
                self._load_tokenizer, self.config.model_config.vocab_size,
                disable_any_whitespace=self.config.disable_any_whitespace)
        return self._structured

    @property
    def num_kv_blocks(self) -> int:
        return self.kv.num_blocks

    @property
    def block_size(self) -> int:
        return self.kv.block_size

    def shutdown(self) -> None:
        """Stop helper processes (tensor-parallel ranks); the core is unusable afterwards."""
        if self.torch_profiler is not None and self.torch_profiler.running:
            try:  # a profile still running: its trace is written (the ranks write theirs)
                self.torch_profiler.stop()
            except Exception:
                logger.exception("writing the torch profiler's trace at shutdown failed")
        if self._structured is not None:
            self._structured.shutdown()
        self.runner.shutdown()

    def add_request(self, r: EngineCoreRequest) -> None:
        """Raises ValueError (invalid) or QueueFullError (back-pressure); the engine is unaffected."""
        if self.pooling or r.pooling_params is not None:
            if r.lora_request is not None:
                raise ValueError("LoRA adapters are not supported for pooling requests")
            self._add_pooling_request(r)
            return
        adapter = self._lora_adapter(r)
        params = dict_to_params(r.sampling_params)
        if params.max_tokens is None:
            params.max_tokens = self.config.scheduler_config.max_model_len - len(r.prompt_token_ids)
            if params.max_tokens < 1:
                raise ValueError(
                    f"prompt ({len(r.prompt_token_ids)} tokens) leaves no room to generate within "
                    f"max_model_len ({self.config.scheduler_config.max_model_len})"
                )
        vocab = self.config.model_config.vocab_size
        bad = [t for t in r.prompt_token_ids if not 0 <= t < vocab]
        if bad:
            raise ValueError(f"prompt token ids out of range [0, {vocab}): {bad[:5]}")
        if not r.prompt_token_ids:
            raise ValueError("prompt is empty")
        req = Request(
            request_id=r.request_id,
            prompt_token_ids=list(r.prompt_token_ids),
            sampling_params=params,
            eos_token_ids=tuple(r.eos_token_ids),
            arrival_time=r.arrival_time,
            priority=r.priority,
            lora_request=r.lora_request,
            lora_adapter=adapter,
        )
        compiling = None
        if params.structured_outputs is not None:
            end = self._reasoning_end
            if end is not None and not end.ended(req.prompt_token_ids):
                req.reasoning = end  # no grammar until the reasoning ends
            # compiled off the loop: the request waits (WAITING_FOR_FSM), the others step on
            fut = self._structured_outputs().submit(params.structured_outputs)
            if fut.done():  # cached (or already failed: a ValueError now, as at admission)
                req.grammar = StructuredOutputManager.matcher(fut.result())
            else:
                req.status = RequestStatus.WAITING_FOR_FSM
                compiling = fut
        try:
            self.scheduler.add_request(req)
        except Exception:
            if compiling is not None and all(f is not compiling
                                             for _, f in self._compiling.values()):
                self._structured_outputs().cancel(compiling)
            raise
        if compiling is not None:
            self._compiling[r.request_id] = (req, compiling)
        if params.prompt_logprobs is not None:
            self._prompt_lps[r.request_id] = [None]

    # -- sleep mode (vLLM's): the KV cache and weights are given back between phases -----
    @property
    def is_sleeping(self) -> bool:
        return self.runner.is_sleeping

    def sleep(self, level: int = 1) -> None:
        """Free the KV cache (the prefix cache is reset with it) and offload (level 1) or drop
        (level 2) the weights. ValueError without enable_sleep_mode, for a level other than
        1 and 2, or while requests are unfinished (the caller drains or holds them first)."""
        if not self.config.enable_sleep_mode:
            raise ValueError("sleep mode is off: create the engine with enable_sleep_mode=True "
                             "(--enable-sleep-mode)")
        if level not in (1, 2):
            raise ValueError(f"sleep level must be 1 or 2, got {level}")
        if self.has_unfinished_requests():
            raise ValueError("cannot sleep while requests are unfinished: let them finish or "
                             "abort them first")
        reset = self.reset_prefix_cache()
        assert reset, "no request holds a block, so the prefix cache must reset"
        self.runner.sleep(level)

    def reset_prefix_cache(self) -> bool:
        """Forget every cached prefix block; False (nothing reset) while requests hold blocks."""
        return self.kv.reset_prefix_cache()

    def wake_up(self, tags: list[str] | None = None) -> None:
        """Restore what sleep freed: tags "weights" and/or "kv_cache" (None: both). A level-2
        sleep's weights are built again from the checkpoint (or the dummy load format)."""
        if not self.config.enable_sleep_mode:
            raise ValueError("sleep mode is off: create the engine with enable_sleep_mode=True "
                             "(--enable-sleep-mode)")
        bad = [t for t in tags or () if t not in WAKE_UP_TAGS]
        if bad:
            raise ValueError(f"wake_up tags must be among {list(WAKE_UP_TAGS)}, got {bad}")
        self.runner.wake_up(tags)

    # -- vLLM's torch profiler (VLLM_TORCH_PROFILER_DIR): a trace per process ------------
    def _profiler(self) -> TorchProfiler:
        if self.torch_profiler is None:
            raise TorchProfilerError(not_enabled_message())
        return self.torch_profiler

    def start_profile(self) -> None:
        """Start recording on this process and every tensor-parallel rank;
        TorchProfilerError when the profiler is off or already running."""
        prof = self._profiler()
        prof.require(running=False)  # before the ranks are told
        workers = self.runner.tp_workers
        if workers is not None:
            workers.send(("torch_profile", "start"))
        prof.start()

    def stop_profile(self) -> None:
        """Stop recording; returns once every process (each rank) has written its trace."""
        prof = self._profiler()
        prof.require(running=True)
        workers = self.runner.tp_workers
        if workers is not None:
            workers.send(("torch_profile", "stop"))
        try:
            prof.stop()
        finally:
            if workers is not None:
                workers.barrier()  # the ranks have written their traces too

    def remove_lora(self, lora_id: int) -> bool:
        """Forget the adapters of id ``lora_id`` (their loaded copy and device slot; running
        requests keep theirs); False if none was loaded."""
        manager = self.runner.lora
        if manager is None:
            return False
        keys = {k for k in [*manager.list_loras(), *manager.slotted()] if k[0] == lora_id}
        for k in keys:
            manager.remove(k)
        return bool(keys)

    def _lora_adapter(self, r: EngineCoreRequest) -> Any:
        """The request's loaded adapter (None: the base model); ValueError if the engine
        serves no LoRA or the adapter cannot run (that request alone is refused)."""
        if r.lora_request is None:
            return None
        if self.runner.lora is None:
            raise ValueError(f"LoRA adapter {r.lora_request.lora_name!r} requested but LoRA "
                             "is not enabled: start the engine with enable_lora=True "
                             "(--enable-lora)")
        return self.runner.lora.load(r.lora_request)

    def _add_pooling_request(self, r: EngineCoreRequest) -> None:
        """A pooling request: its prompt runs once (max_tokens 0), then the pooler finishes it."""
        from modelport.pooling_params import PoolingParams
        from modelport.sampling_params import SamplingParams

        if not self.pooling:
            raise ValueError("this engine runs a generative model: pooling requests need "
                             "runner='pooling'")
        if r.pooling_params is None:
            raise ValueError("this engine runs a pooling model: it takes pooling requests only")
        vocab = self.config.model_config.vocab_size
        if not r.prompt_token_ids:
            raise ValueError("prompt is empty")
        bad = [t for t in r.prompt_token_ids if not 0 <= t < vocab]
        if bad:
            raise ValueError(f"prompt token ids out of range [0, {vocab}): {bad[:5]}")
        params = SamplingParams(max_tokens=1)
        params.max_tokens = 0  # prefill only: nothing is generated
        req = Request(request_id=r.request_id, prompt_token_ids=list(r.prompt_token_ids),
                      sampling_params=params, arrival_time=r.arrival_time,
                      priority=r.priority,
                      pooling_params=PoolingParams.from_dict(r.pooling_params))
        self.scheduler.add_request(req)

    def poll_grammars(self) -> None:
        """Move requests whose grammar compiled to WAITING (with their matcher); finish those
        whose compile failed and keep why for take_rejected."""
        if not self._compiling:
            return
        for rid, (req, fut) in list(self._compiling.items()):
            if not fut.done():
                continue
            del self._compiling[rid]
            try:
                compiled = fut.result()
                matcher = StructuredOutputManager.matcher(compiled)
            except Exception as e:  # noqa: BLE001 - this request's failure, not the core's
                msg = str(e) if isinstance(e, ValueError) else f"{type(e).__name__}: {e}"
                logger.info("request %s: structured outputs: %s", rid, msg)
                self.scheduler.fail_request(req)
                self._prompt_lps.pop(rid, None)
                self._rejected.append((rid, msg))
                continue
            req.grammar = matcher
            req.status = RequestStatus.WAITING

    def take_rejected(self) -> list[tuple[str, str]]:
        """(request id, message) of requests finished because their grammar failed to
        compile since the last call; they get no EngineCoreOutput."""
        out, self._rejected = self._rejected, []
        return out

    @property
    def has_rejected(self) -> bool:
        return bool(self._rejected)

    @property
    def num_compiling(self) -> int:
        return len(self._compiling)

    def _drop_compiling(self, rid: str) -> None:
        entry = self._compiling.pop(rid, None)
        if entry is None or self._structured is None:
            return
        fut = entry[1]
        if all(f is not fut for _, f in self._compiling.values()):
            self._structured.cancel(fut)  # no one else waits for it: drop it if not started

    def abort_requests(self, request_ids: list[str]) -> list[EngineCoreOutput]:
        outs = []
        for rid in request_ids:
            self._drop_compiling(rid)
        for req in self.scheduler.abort_requests(request_ids):
            self._prompt_lps.pop(req.request_id, None)
            outs.append(EngineCoreOutput(request_id=req.request_id, new_token_ids=[],
                                         finish_reason="abort",
                                         num_cached_tokens=max(0, req.num_cached_tokens)))
        return outs

    def has_unfinished_requests(self) -> bool:
        return self.scheduler.has_unfinished_requests() or self._inflight is not None

    def step(self) -> EngineCoreOutputs:
        """One scheduling step. With async scheduling, schedules and launches step N+1, then
        waits for step N's tokens and returns their outputs: the host's bookkeeping for N
        runs while the device computes N+1."""
        outputs: list[EngineCoreOutput] = []
        self.poll_grammars()
        if self._inflight is not None and self.scheduler.num_needing_history:
            # a request needs every earlier token on the host (penalties, logprobs): drain
            outputs += self._collect(*self._inflight)
            self._inflight = None
        so = self.scheduler.schedule()
        pending = self.runner.launch(so)  # None for an empty step
        step_tokens = so.num_batched_tokens if pending is not None else 0
        if self._inflight is not None:
            outputs += self._collect(*self._inflight)
            self._inflight = None
        if pending is not None:
            if self.async_scheduling:
                self._inflight = (so, pending)
            else:
                outputs += self._collect(so, pending)
        elif self._inflight is None and self._compiling and not outputs:
            # nothing to run but grammars compiling: wait a little for one instead of spinning
            wait([f for _, f in self._compiling.values()], timeout=_GRAMMAR_WAIT_S,
                 return_when=FIRST_COMPLETED)
        return EngineCoreOutputs(outputs=outputs, stats=self.get_stats(),
                                 num_step_tokens=step_tokens)

    def _collect(self, so: SchedulerOutput, pending: PendingStep) -> list[EngineCoreOutput]:
        ro = self.runner.collect(pending)
        for rid in so.preempted_ids:  # recompute re-sends prompt logprobs from the start
            if rid in self._prompt_lps:
                self._prompt_lps[rid] = [None]
        progressed = self.scheduler.update(so, ro.sampled, ro.spec_tokens,
                                           (ro.pooled or {}) if self.pooling else None)
        outputs = []
        for req, new_tokens in progressed:
            rid = req.request_id
            plp = None
            if rid in self._prompt_lps and rid in ro.prompt_logprobs:
                self._prompt_lps[rid].extend(ro.prompt_logprobs[rid])
            if new_tokens and rid in self._prompt_lps:
                plp = self._prompt_lps.pop(rid)
            if not new_tokens and not req.is_finished and plp is None:
                continue
            lp = ro.logprobs.get(rid)
            outputs.append(
                EngineCoreOutput(
                    request_id=rid,
                    new_token_ids=new_tokens,
                    new_logprobs=[lp] if lp is not None else None,
                    prompt_logprobs=plp,
                    finish_reason=req.status.value if req.is_finished else None,
                    stop_reason=req.stop_reason,
                    num_cached_tokens=max(0, req.num_cached_tokens),
                    first_scheduled_time=req.first_scheduled_time,
                    first_token_time=req.first_token_time,
                    pooled=(ro.pooled or {}).get(rid) if self.pooling else None,
                    pooled_shape=(ro.pooled_shapes or {}).get(rid) if self.pooling else None,
                )
            )
        return outputs

    def get_stats(self) -> SchedulerStats:
        return SchedulerStats(
            num_running=self.scheduler.num_running,
            num_waiting=self.scheduler.num_waiting,
            kv_cache_usage=self.kv.usage,
            prefix_cache_queries=self.kv.queries,
            prefix_cache_hits=self.kv.hits,
            num_preemptions=self.scheduler.num_preemptions,
            spec_num_drafts=self.scheduler.num_drafts,
            spec_num_draft_tokens=self.scheduler.num_draft_tokens,
            spec_num_accepted_tokens=self.scheduler.num_accepted_tokens,
            spec_num_accepted_per_pos=list(self.scheduler.num_accepted_per_pos),
            num_kv_blocks=self.kv.num_blocks,
            block_size=self.kv.block_size,
            running_lora_adapters=self._lora_names(self.scheduler.running),
            waiting_lora_adapters=self._lora_names(self.scheduler.waiting),
        )

    def _lora_names(self, reqs: Any) -> list[str]:
        """The adapters' names among reqs, once each, in order (none without LoRA)."""
        if self.scheduler.max_loras is None:
            return []
        return list(dict.fromkeys(
            r.lora_request.lora_name for r in reqs if r.lora_request is not None))
