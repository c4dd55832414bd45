"""LLMEngine: the synchronous, in-process engine behind the offline LLM class.

Frontend (tokenize, detokenize, stop strings) and EngineCore (schedule + run) in one process;
the server runs the same two halves in separate processes (engine/core_client.py).
"""

from __future__ import annotations

from typing import Any

from modelport.engine.arg_utils import EngineArgs, EngineConfig
from modelport.engine.core import EngineCore
from modelport.frontend.processor import InputProcessor, OutputProcessor
from modelport.frontend.prompts import PromptInput
from modelport.lora.request import LoRARequest
from modelport.outputs import RequestOutput
from modelport.pooling_params import PoolingParams
from modelport.sampling_params import SamplingParams


class LLMEngine:
    def __init__(self, config: EngineConfig) -> None:
        from modelport.frontend.tokenizer import load_tokenizer

        if config.parallel_config.data_parallel_size > 1:
            raise ValueError(
                f"data_parallel_size {config.parallel_config.data_parallel_size}: the offline "
                "engine runs one replica in this process; data-parallel replicas are served "
                "by `modelport serve --data-parallel-size N` (or run one LLM per process)"
            )
        self.config = config
        self.tokenizer = load_tokenizer(config.model_source)
        self.core = EngineCore(config)
        self.input_processor = InputProcessor(self.tokenizer, config.model_config,
                                              config.scheduler_config,
                                              max_logprobs=config.max_logprobs,
                                              logits_processors=config.logits_processors)
        self.output_processor = OutputProcessor(self.tokenizer)
        # pooling requests in flight: request id -> (prompt text, prompt token ids)
        self._pooling: dict[str, tuple[str | None, list[int]]] = {}

    @classmethod
    def from_engine_args(cls, args: EngineArgs) -> LLMEngine:
        return cls(args.create_engine_config())

    @property
    def model_config(self) -> Any:
        return self.config.model_config

    def get_tokenizer(self) -> Any:
        return self.tokenizer

    def reset_prefix_cache(self) -> bool:
        return self.core.reset_prefix_cache()

    @property
    def num_kv_blocks(self) -> int:
        return self.core.num_kv_blocks

    @property
    def block_size(self) -> int:
        return self.core.block_size

    def add_request(
        self,
        request_id: str,
        prompt: PromptInput,
        params: SamplingParams,
        *,
        output_kind: str | None = None,
        priority: int = 0,
        add_special_tokens: bool = True,
        lora_request: LoRARequest | None = None,
    ) -> None:
        """Validate and queue one request; raises ValueError and leaves the engine untouched.

        ``prompt``: text, token ids, or a vLLM prompt dict (see frontend/prompts.py).
        ``output_kind`` ("cumulative" | "delta" | "final"): what step() returns for it while
        it runs; by default the one ``params.output_kind`` names (vLLM's CUMULATIVE)."""
        self._check_awake()
        if output_kind is None:
            output_kind = params.output_kind.processor_kind
        text, ids = self.input_processor.prompt_inputs(prompt, params, add_special_tokens)
        core_reqs = self.input_processor.process(request_id, ids, params, priority=priority,
                                                  cap_max_tokens=True, lora_request=lora_request)
        added = []
        try:
            for r in core_reqs:
                self.core.add_request(r)
                added.append(r.request_id)
        except Exception:
            self.core.abort_requests(added)
            raise
        self.output_processor.add_request(
            request_id, text, ids, params,
            output_kind=output_kind, arrival_time=core_reqs[0].arrival_time,
        )

    def add_pooling_request(self, request_id: str, prompt: PromptInput, params: PoolingParams,
                            *, add_special_tokens: bool = True) -> None:
        """Validate and queue one pooling (embedding) request; ValueError if invalid."""
        from modelport.pooling_params import pooling_core_request

        self._check_awake()
        text, ids = self.input_processor.prompt_inputs(prompt, None, add_special_tokens)
        if params.truncate_prompt_tokens is not None:
            ids = self.input_processor.truncate(ids, params.truncate_prompt_tokens)
        cfg = self.config
        req = pooling_core_request(
            request_id, ids, params, vocab_size=cfg.model_config.vocab_size,
            max_model_len=cfg.scheduler_config.max_model_len,
            model_name=cfg.served_model_name, hf_config=cfg.model_config.hf_config,
            pooler=cfg.pooler_config)
        self.core.add_request(req)
        self._pooling[request_id] = (text, ids)

    def abort_request(self, request_ids: list[str]) -> None:
        if self._pooling:
            pooled = [r for r in request_ids if self._pooling.pop(r, None) is not None]
            self.core.abort_requests(pooled)
        for rid in request_ids:
            self.core.abort_requests(self.output_processor.abort(rid))

    def step(self) -> list[RequestOutput]:
        """One engine step. Raises ValueError (before stepping, so no output is lost) when a
        request's grammar failed to compile in the core; that request is dropped, the others
        go on at the next call."""
        self.core.poll_grammars()
        rejected = self.core.take_rejected()
        if rejected:
            parents = []
            for rid, _ in rejected:
                pid = self.output_processor.child_to_parent.get(rid)
                if pid is not None and pid not in parents:
                    parents.append(pid)
            for pid in parents:  # its other samples too
                self.core.abort_requests(self.output_processor.abort(pid))
            raise ValueError(rejected[0][1])
        outs = self.core.step()
        if self._pooling:
            return self._pooling_outputs(outs.outputs)
        results, to_abort = self.output_processor.process_outputs(outs.outputs)
        if to_abort:
            self.core.abort_requests(to_abort)
        return results

    def _pooling_outputs(self, outs: list) -> list:
        import torch

        from modelport.outputs import PoolingOutput, PoolingRequestOutput

        results = []
        for o in outs:
            if not o.finished or o.request_id not in self._pooling:
                continue
            text, ids = self._pooling.pop(o.request_id)
            if o.pooled is None:  # aborted
                continue
            data = torch.tensor(o.pooled, dtype=torch.float32)
            if o.pooled_shape is not None:  # a per-token task: [n, d]
                data = data.reshape(o.pooled_shape)
            results.append(PoolingRequestOutput(
                o.request_id, PoolingOutput(data), ids, True, o.num_cached_tokens, text))
        return results

    # -- vLLM's sleep mode (LLM(enable_sleep_mode=True)) -----------------------------------
    def sleep(self, level: int = 1) -> None:
        """Level 1: weights to host memory, KV cache freed; level 2: both freed (wake_up
        reloads the weights from the checkpoint). The prefix cache is reset."""
        self.core.sleep(level)

    def wake_up(self, tags: list[str] | None = None) -> None:
        self.core.wake_up(tags)

    def is_sleeping(self) -> bool:
        return self.core.is_sleeping

    def _check_awake(self) -> None:
        if self.core.is_sleeping:
            raise RuntimeError("the engine is asleep (sleep mode): call wake_up() before "
                               "adding requests")

    # -- vLLM's torch profiler (VLLM_TORCH_PROFILER_DIR; engine/torch_profiler.py) ----------
    def start_profile(self) -> None:
        self.core.start_profile()

    def stop_profile(self) -> None:
        self.core.stop_profile()

    # -- vLLM's LoRA management (LLM(enable_lora=True)) -------------------------------------
    def add_lora(self, lora_request: LoRARequest) -> bool:
        """Load an adapter ahead of its requests; ValueError if it cannot serve."""
        self._lora_manager().load(lora_request)
        return True

    def remove_lora(self, lora_id: int) -> bool:
        self._lora_manager()  # LoRA enabled, else ValueError
        return self.core.remove_lora(lora_id)

    def list_loras(self) -> set[int]:
        return {k[0] for k in self._lora_manager().list_loras()}

    def _lora_manager(self):  # noqa: ANN202 - modelport.lora.manager.LoRAManager
        manager = self.core.runner.lora
        if manager is None:
            raise ValueError("LoRA is not enabled: create the engine with enable_lora=True")
        return manager

    def has_unfinished_requests(self) -> bool:
        # a grammar failure not yet raised by step() counts: the caller must step to hear it
        return self.core.has_unfinished_requests() or self.core.has_rejected
