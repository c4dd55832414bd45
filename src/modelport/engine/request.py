"""Request: the engine's view of one sequence. Token ids only, never text."""

from __future__ import annotations

import enum
import time
from dataclasses import dataclass, field
from typing import Any

from modelport.pooling_params import TOKEN_TASKS
from modelport.sampling_params import SamplingParams


class RequestStatus(enum.Enum):
    WAITING = "waiting"
    # structured outputs: waiting for its grammar to compile (vLLM's WAITING_FOR_FSM); the
    # scheduler passes over it until the engine core sets it WAITING with its matcher
    WAITING_FOR_FSM = "waiting_for_fsm"
    RUNNING = "running"
    PREEMPTED = "preempted"
    FINISHED_STOPPED = "stop"
    FINISHED_LENGTH = "length"
    FINISHED_ABORTED = "abort"

    @property
    def finished(self) -> bool:
        return self in (
            RequestStatus.FINISHED_STOPPED,
            RequestStatus.FINISHED_LENGTH,
            RequestStatus.FINISHED_ABORTED,
        )


@dataclass
class Request:
    """One sequence. num_tokens - num_computed_tokens is the work still owed to it.

    There is no prefill or decode mode: a fresh prompt owes len(prompt) tokens (minus any
    prefix-cache hit), a decoding request owes exactly one (its last sampled token), and a
    preempted request owes everything again (recompute).
    """

    request_id: str
    prompt_token_ids: list[int]
    sampling_params: SamplingParams
    eos_token_ids: tuple[int, ...] = ()
    arrival_time: float = field(default_factory=time.monotonic)
    priority: int = 0
    output_token_ids: list[int] = field(default_factory=list)
    num_computed_tokens: int = 0
    # tokens sampled by a step still in flight (async scheduling): their ids are not known
    # here yet, but their positions are already scheduled (num_computed_tokens counts them)
    num_placeholders: int = 0
    num_cached_tokens: int = -1  # prefix-cache hit at first scheduling; -1 until scheduled
    num_preemptions: int = 0
    status: RequestStatus = RequestStatus.WAITING
    stop_reason: int | str | None = None
    first_scheduled_time: float | None = None
    first_token_time: float | None = None
    # structured outputs: the request's xgrammar GrammarMatcher (set by the engine core once
    # its grammar compiled), advanced with each accepted token; its bitmask constrains sampling
    grammar: Any = field(default=None, repr=False)
    # structured outputs with a reasoning parser: the ReasoningEnd to watch while the request
    # is still reasoning (its grammar neither masks nor advances), None once the reasoning
    # ended or when the grammar applies from the first token (see engine/structured_output.py)
    reasoning: Any = field(default=None, repr=False)
    # a pooling (embedding) request: its PoolingParams; prefill only, finished by the pooler
    pooling_params: Any = None
    # multi-LoRA: the request's LoRARequest (modelport.lora) and its loaded adapter (set by
    # the engine core at admission); None runs the base model
    lora_request: Any = None
    lora_adapter: Any = field(default=None, repr=False)

    def __post_init__(self) -> None:
        assert len(self.prompt_token_ids) > 0, "empty prompt"
        self.all_token_ids: list[int] = list(self.prompt_token_ids)

    @property
    def cache_salt(self) -> bytes:
        """Seed of the request's prefix-cache hashes: KV is shared only under one adapter."""
        return b"" if self.lora_request is None else self.lora_request.cache_salt()

    @property
    def computes_whole_prompt(self) -> bool:
        """Whether every prompt token must be computed, none read from the prefix cache:
        prompt logprobs, and a per-token pooling task (each token's hidden state is its
        output)."""
        task = getattr(self.pooling_params, "task", None)
        return self.sampling_params.prompt_logprobs is not None or task in TOKEN_TASKS

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)

    @property
    def num_tokens(self) -> int:
        return len(self.all_token_ids)

    @property
    def num_output_tokens(self) -> int:
        return len(self.output_token_ids)

    @property
    def max_tokens(self) -> int:
        mt = self.sampling_params.max_tokens
        assert mt is not None, "max_tokens is resolved at admission"
        return mt

    @property
    def needs_host_history(self) -> bool:
        """Whether sampling or outputs need every earlier token on the host (no overlap)."""
        return self.no_speculation or self.sampling_params.has_multi_token_bad_words

    @property
    def no_speculation(self) -> bool:
        """Whether sampling or outputs need what speculative steps do not give (spec_verify:
        penalties, min_tokens, logprobs; a grammar, which is advanced token by token)."""
        p = self.sampling_params
        return (
            p.structured_outputs is not None
            or p.needs_penalties
            or p.min_tokens > 0
            or p.logprobs is not None
            or p.prompt_logprobs is not None
        )

    @property
    def active_grammar(self) -> Any:
        """The matcher that constrains the next token: None while the request is reasoning."""
        return self.grammar if self.reasoning is None else None

    def append_output_token(self, token_id: int) -> None:
        self.output_token_ids.append(token_id)
        self.all_token_ids.append(token_id)

    @property
    def is_finished(self) -> bool:
        return self.status.finished
