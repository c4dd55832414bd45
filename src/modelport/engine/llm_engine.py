"""LLMEngine: the synchronous, in-process engine behind the offline LLM class.

Frontend (tokenize, detokenize, stop strings) and EngineCore (schedule + run) in one process;
the server runs the same two halves in separate processes (engine/core_client.py).
"""

from __future__ import annotations

from modelport.engine.arg_utils import EngineArgs, EngineConfig
from modelport.engine.core import EngineCore
from modelport.frontend.processor import InputProcessor, OutputProcessor
from modelport.frontend.prompts import PromptInput
from modelport.outputs import RequestOutput
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
                                              max_logprobs=config.max_logprobs)
        self.output_processor = OutputProcessor(self.tokenizer)

    @classmethod
    def from_engine_args(cls, args: EngineArgs) -> LLMEngine:
        return cls(args.create_engine_config())

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
        output_kind: str = "final",
        priority: int = 0,
        add_special_tokens: bool = True,
    ) -> None:
        """Validate and queue one request; raises ValueError and leaves the engine untouched.

        ``prompt``: text, token ids, or a vLLM prompt dict (see frontend/prompts.py)."""
        text, ids = self.input_processor.prompt_inputs(prompt, params, add_special_tokens)
        core_reqs = self.input_processor.process(request_id, ids, params, priority=priority,
                                                  cap_max_tokens=True)
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

    def abort_request(self, request_ids: list[str]) -> None:
        for rid in request_ids:
            self.core.abort_requests(self.output_processor.abort(rid))

    def step(self) -> list[RequestOutput]:
        outs = self.core.step()
        results, to_abort = self.output_processor.process_outputs(outs.outputs)
        if to_abort:
            self.core.abort_requests(to_abort)
        return results

    def has_unfinished_requests(self) -> bool:
        return self.core.has_unfinished_requests()
