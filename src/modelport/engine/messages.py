"""Typed messages between the frontend (tokenize/detokenize/HTTP) and the engine core.

msgspec Structs so they cross a process boundary cheaply (msgspec.msgpack); the engine core
knows token ids only, never text.
"""

from __future__ import annotations

import msgspec

from modelport.lora.request import LoRARequest
from modelport.sampling_params import SamplingParams


class EngineCoreRequest(msgspec.Struct, kw_only=True):
    request_id: str
    prompt_token_ids: list[int]
    # SamplingParams travels as its constructor kwargs (see params_to_dict / dict_to_params)
    sampling_params: dict
    eos_token_ids: list[int]
    arrival_time: float
    priority: int = 0
    # a pooling (embedding) request: PoolingParams.to_dict(); prefill only, no sampling
    pooling_params: dict | None = None
    # multi-LoRA: the adapter to run with (None: the base model)
    lora_request: LoRARequest | None = None


class TokenLogprobs(msgspec.Struct, array_like=True):
    """Logprobs of one position: the chosen token first, then the top-k (ids, logprobs, ranks)."""

    token_ids: list[int]
    logprobs: list[float]
    ranks: list[int]


class EngineCoreOutput(msgspec.Struct, kw_only=True):
    request_id: str
    new_token_ids: list[int]
    new_logprobs: list[TokenLogprobs] | None = None
    prompt_logprobs: list[TokenLogprobs | None] | None = None
    finish_reason: str | None = None  # "stop" | "length" | "abort"
    stop_reason: int | str | None = None
    num_cached_tokens: int = 0
    # monotonic timestamps, for per-request metrics
    first_scheduled_time: float | None = None
    first_token_time: float | None = None
    # a pooling request's pooled vector (float32 values), with its finish
    pooled: list[float] | None = None
    # a per-token pooling task's [n, d]: ``pooled`` holds its rows one after another
    pooled_shape: list[int] | None = None

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None


class EngineCoreOutputs(msgspec.Struct, kw_only=True):
    outputs: list[EngineCoreOutput]
    stats: SchedulerStats | None = None
    # tokens of the step launched in this step() call (vLLM's iteration_tokens_total); 0 when
    # none ran. With async scheduling the outputs are the previous step's; each step counts once
    num_step_tokens: int = 0
    # data parallelism (set by DPEngineCoreClient, defaults for one engine): the replica whose
    # step this is (vLLM's engine_index: `stats`, `outputs` and `num_step_tokens` are its own),
    # and every replica's latest stats merged into one engine's (with `stats` present)
    engine_index: int = 0
    merged_stats: SchedulerStats | None = None


class SchedulerStats(msgspec.Struct, kw_only=True):
    num_running: int = 0
    num_waiting: int = 0
    kv_cache_usage: float = 0.0  # fraction of blocks in use
    prefix_cache_queries: int = 0  # tokens looked up (cumulative)
    prefix_cache_hits: int = 0  # tokens found (cumulative)
    num_preemptions: int = 0  # cumulative
    spec_num_drafts: int = 0  # speculative decoding: steps that checked drafts (cumulative)
    spec_num_draft_tokens: int = 0  # ... draft tokens proposed (cumulative)
    spec_num_accepted_tokens: int = 0  # ... and accepted (cumulative)
    spec_num_accepted_per_pos: list[int] = msgspec.field(default_factory=list)  # ... by position
    num_kv_blocks: int = 0
    block_size: int = 0
    # multi-LoRA: names of the adapters of the running / waiting requests (vLLM's
    # vllm:lora_requests_info labels); empty without --enable-lora
    running_lora_adapters: list[str] = msgspec.field(default_factory=list)
    waiting_lora_adapters: list[str] = msgspec.field(default_factory=list)


_PARAM_FIELDS = (
    "n", "temperature", "top_p", "top_k", "min_p", "seed", "presence_penalty",
    "frequency_penalty", "repetition_penalty", "max_tokens", "min_tokens", "stop",
    "stop_token_ids", "ignore_eos", "include_stop_str_in_output", "logprobs",
    "prompt_logprobs", "skip_special_tokens", "spaces_between_special_tokens", "logit_bias",
    "allowed_token_ids", "extra_args",
)
# bad_words cross as the token id sequences the frontend made of them (the core has no text)
BAD_WORDS_KEY = "bad_words_token_ids"
# structured outputs cross as StructuredOutputsParams' plain fields (a JSON schema as its text);
# the core compiles them with the model's tokenizer (engine/structured_output.py)
STRUCTURED_KEY = "structured_outputs"


def params_to_dict(p: SamplingParams) -> dict:
    d = {f: getattr(p, f) for f in _PARAM_FIELDS}
    if p.bad_words_token_ids:
        d[BAD_WORDS_KEY] = p.bad_words_token_ids
    if p.structured_outputs is not None:
        d[STRUCTURED_KEY] = p.structured_outputs.to_dict()
    return d


def dict_to_params(d: dict) -> SamplingParams:
    kw = dict(d)
    bad_words = kw.pop(BAD_WORDS_KEY, None)
    p = SamplingParams(**kw)
    if bad_words:
        p._bad_words_token_ids = [[int(t) for t in w] for w in bad_words]
    return p
