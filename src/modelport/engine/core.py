"""EngineCore: schedule -> runner.execute -> update, over typed messages. Token ids only."""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

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
from modelport.engine.request import Request
from modelport.engine.scheduler import Scheduler, SchedulerOutput
from modelport.engine.structured_output import StructuredOutputManager

if TYPE_CHECKING:
    from modelport.runner.model_runner import PendingStep

logger = logging.getLogger(__name__)


class EngineCore:
    def __init__(self, config: EngineConfig) -> None:
        from modelport.runner.model_runner import ModelRunner

        self.config = config
        self.runner = ModelRunner(config)
        self.runner.load_model()
        num_blocks = self.runner.determine_num_blocks()
        self.runner.init_kv_cache(num_blocks)
        bs = config.cache_config.block_size
        self.kv = KVCacheManager(num_blocks, bs, config.cache_config.enable_prefix_caching)
        self.scheduler = Scheduler(config.scheduler_config, self.kv, config.speculative_config)
        # structured outputs: the tokenizer and xgrammar are loaded on the first such request
        self._structured: StructuredOutputManager | None = None
        logger.info("KV cache: %d blocks x %d tokens = %d tokens", num_blocks, bs, num_blocks * bs)
        # prompt logprobs arrive chunk by chunk; gathered here until the prompt is done
        self._prompt_lps: dict[str, list[TokenLogprobs | None]] = {}
        # async scheduling: the step launched on the device whose tokens are not back yet
        # speculative steps need the accepted tokens on the host before the next schedule
        spec = config.speculative_config
        self.async_scheduling = (config.async_scheduling and self.runner.supports_async
                                 and spec is None)
        self._inflight: tuple[SchedulerOutput, PendingStep] | None = None
        if self.async_scheduling:
            logger.info("async scheduling: step N+1 is prepared while step N runs")
        if spec is not None:
            source = (f"draft model {spec.model}" if spec.model is not None else
                      f"n-grams of {spec.prompt_lookup_min}-{spec.prompt_lookup_max} tokens")
            logger.info("speculative decoding: up to %d draft tokens from %s; async scheduling "
                        "off", spec.num_speculative_tokens, source)

    def _structured_outputs(self) -> StructuredOutputManager:
        if self._structured is None:
            def load():  # noqa: ANN202 - a Tokenizer
                from modelport.frontend.tokenizer import load_tokenizer

                return load_tokenizer(self.config.model_source)

            self._structured = StructuredOutputManager(load, self.config.model_config.vocab_size)
        return self._structured

    @property
    def num_kv_blocks(self) -> int:
        return self.kv.num_blocks

    @property
    def block_size(self) -> int:
        return self.kv.block_size

    def shutdown(self) -> None:
        """Stop helper processes (tensor-parallel ranks); the core is unusable afterwards."""
        self.runner.shutdown()

    def add_request(self, r: EngineCoreRequest) -> None:
        """Raises ValueError (invalid) or QueueFullError (back-pressure); the engine is unaffected."""
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
        )
        if params.structured_outputs is not None:
            req.grammar = self._structured_outputs().new_matcher(params.structured_outputs)
        self.scheduler.add_request(req)
        if params.prompt_logprobs is not None:
            self._prompt_lps[r.request_id] = [None]

    def abort_requests(self, request_ids: list[str]) -> list[EngineCoreOutput]:
        outs = []
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
        if self._inflight is not None and self.scheduler.num_needing_history:
            # a request needs every earlier token on the host (penalties, logprobs): drain
            outputs += self._collect(*self._inflight)
            self._inflight = None
        so = self.scheduler.schedule()
        pending = self.runner.launch(so)  # None for an empty step
        if self._inflight is not None:
            outputs += self._collect(*self._inflight)
            self._inflight = None
        if pending is not None:
            if self.async_scheduling:
                self._inflight = (so, pending)
            else:
                outputs += self._collect(so, pending)
        return EngineCoreOutputs(outputs=outputs, stats=self.get_stats())

    def _collect(self, so: SchedulerOutput, pending: PendingStep) -> list[EngineCoreOutput]:
        ro = self.runner.collect(pending)
        for rid in so.preempted_ids:  # recompute re-sends prompt logprobs from the start
            if rid in self._prompt_lps:
                self._prompt_lps[rid] = [None]
        progressed = self.scheduler.update(so, ro.sampled, ro.spec_tokens)
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
        )
