"""Beam search's outputs and scoring, under vLLM's names (``vllm.beam_search``).

``LLM.beam_search()`` (entrypoints/llm.py) runs the search; this module holds what it returns
(``BeamSearchOutput`` of ``BeamSearchSequence``) and how beams are ranked.
"""

from __future__ import annotations

from collections.abc import Callable, Collection
from dataclasses import dataclass, field
from typing import Any

from modelport.outputs import LogprobsDict


@dataclass
class BeamSearchSequence:
    """One beam: ``tokens`` holds the prompt's ids followed by the generated ones (as in
    vLLM); ``logprobs`` one dict per generated token (the top ``2 * beam_width`` candidates
    of that step, token id -> Logprob); ``cum_logprob`` the sum of the chosen tokens'
    log-probabilities; ``text`` the decoded ``tokens`` (filled when returned);
    ``finish_reason`` "stop" (it generated an end-of-sequence token) or "length"."""

    tokens: list[int]
    logprobs: list[LogprobsDict] = field(default_factory=list)
    lora_request: Any = None
    cum_logprob: float = 0.0
    text: str | None = None
    finish_reason: str | None = None
    stop_reason: int | str | None = None
    # the number of prompt ids at the head of ``tokens`` (not in vLLM's class)
    num_prompt_tokens: int = 0

    @property
    def output_token_ids(self) -> list[int]:
        """The generated ids (``tokens`` without the prompt)."""
        return self.tokens[self.num_prompt_tokens:]


@dataclass
class BeamSearchOutput:
    """The best beams of one prompt, best first (at most ``beam_width`` of them)."""

    sequences: list[BeamSearchSequence]


@dataclass
class BeamSearchInstance:
    """The search state of one prompt: its live beams and its finished ones."""

    beams: list[BeamSearchSequence]
    completed: list[BeamSearchSequence] = field(default_factory=list)


def get_beam_search_score(
    tokens: list[int],
    cumulative_logprob: float,
    eos_token_id: int | Collection[int] | None,
    length_penalty: float = 1.0,
) -> float:
    """vLLM's (and Hugging Face's) length-penalised score: the cumulative log-probability
    over the sequence length (prompt included, a final end-of-sequence token not counted)
    to the power ``length_penalty``."""
    eos = _eos_set(eos_token_id)
    seq_len = len(tokens)
    if tokens and tokens[-1] in eos:
        seq_len -= 1
    return cumulative_logprob / (max(seq_len, 1) ** length_penalty)


def create_sort_beams_key_function(
    eos_token_id: int | Collection[int] | None, length_penalty: float
) -> Callable[[BeamSearchSequence], float]:
    """A sort key ranking beams by :func:`get_beam_search_score` (sort with reverse=True)."""
    eos = _eos_set(eos_token_id)

    def sort_beams_key(beam: BeamSearchSequence) -> float:
        return get_beam_search_score(beam.tokens, beam.cum_logprob, eos, length_penalty)

    return sort_beams_key


def _eos_set(eos: int | Collection[int] | None) -> frozenset[int]:
    if eos is None:
        return frozenset()
    if isinstance(eos, int):
        return frozenset((eos,))
    return frozenset(eos)
