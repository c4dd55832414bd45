"""Beam search's outputs and scoring, under vLLM's names (``vllm.beam_search``).

This module holds what a search returns (``BeamSearchOutput`` of ``BeamSearchSequence``), how
beams are ranked, and the steps of the search itself (:class:`BeamSearcher`): which beams are
still live, the one-token request each live beam makes, how their answers grow and prune
the beams, and which beams win. ``LLM.beam_search()`` (entrypoints/llm.py) drives it with
the offline engine; the OpenAI server's ``use_beam_search`` drives it with AsyncLLM.
"""

from __future__ import annotations

from collections.abc import Callable, Collection
from dataclasses import dataclass, field
from typing import Any

from modelport.outputs import LogprobsDict, RequestOutput
from modelport.sampling_params import SamplingParams


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


def beam_logprobs_error(beam_width: int, max_logprobs: int) -> str | None:
    """Why ``beam_width`` cannot run under ``max_logprobs`` (each step asks for
    ``2 * beam_width`` logprobs; -1: no cap), or None when it can."""
    if max_logprobs != -1 and 2 * beam_width > max_logprobs:
        return (f"beam_width {beam_width} needs 2 * beam_width = {2 * beam_width} logprobs per "
                f"step, more than max_logprobs ({max_logprobs})")
    return None


class BeamSearcher:
    """The search of one batch of prompts, one step at a time, whatever runs the requests:

        searcher = BeamSearcher(prompt_ids_list, beam_width, eos, ...)
        for _ in range(max_tokens):
            live = searcher.live_beams()
            if not live:
                break
            outs = <one request per live beam: (beam.tokens, searcher.step_params)>
            searcher.advance(live, outs)
        best = searcher.best()  # per prompt, best first

    Each live beam asks for the top ``2 * beam_width`` candidates of its next token (vLLM's
    and HF's choice); every beam grown from them is kept if among the ``beam_width`` best of
    its prompt by :func:`get_beam_search_score`, and one that ends with an end-of-sequence
    token is finished ("stop") unless ``ignore_eos``. A beam that reaches ``max_model_len``
    is finished ("length"), as are the live beams at the end."""

    def __init__(
        self,
        prompts: list[list[int]],
        beam_width: int,
        eos_token_id: int | Collection[int] | None,
        *,
        length_penalty: float = 1.0,
        ignore_eos: bool = False,
        temperature: float = 0.0,
        max_model_len: int | None = None,
    ) -> None:
        self.width = beam_width
        self.eos = _eos_set(eos_token_id)
        self.ignore_eos = ignore_eos
        self.max_model_len = max_model_len
        self.sort_key = create_sort_beams_key_function(self.eos, length_penalty)
        self.step_params = SamplingParams(max_tokens=1, logprobs=2 * beam_width,
                                          temperature=temperature)
        self.instances = [
            BeamSearchInstance([BeamSearchSequence(tokens=list(ids), num_prompt_tokens=len(ids))])
            for ids in prompts
        ]

    def live_beams(
        self, instances: list[BeamSearchInstance] | None = None
    ) -> list[tuple[BeamSearchInstance, BeamSearchSequence]]:
        """The beams (of ``instances``, default all) that take another step, each with its
        instance; those with no room left are finished."""
        live = []
        for inst in self.instances if instances is None else instances:
            for beam in inst.beams:
                if (self.max_model_len is not None and len(beam.tokens) >= self.max_model_len
                        and len(beam.tokens) > beam.num_prompt_tokens):
                    beam.finish_reason = "length"  # no room for another token
                    inst.completed.append(beam)
                else:
                    live.append((inst, beam))
            inst.beams = []
        return live

    def advance(
        self,
        live: list[tuple[BeamSearchInstance, BeamSearchSequence]],
        outputs: list[RequestOutput],
    ) -> None:
        """Grow each live beam by each candidate of its one-token request's output (same
        order as ``live``) and keep each prompt's ``beam_width`` best."""
        grown: dict[int, tuple[BeamSearchInstance, list[BeamSearchSequence]]] = {
            id(inst): (inst, []) for inst, _ in live}
        for (inst, beam), out in zip(live, outputs, strict=True):
            lps = out.outputs[0].logprobs
            if not lps:
                continue
            for token_id, lp in lps[0].items():
                new = BeamSearchSequence(
                    tokens=[*beam.tokens, token_id], logprobs=[*beam.logprobs, lps[0]],
                    cum_logprob=beam.cum_logprob + lp.logprob,
                    num_prompt_tokens=beam.num_prompt_tokens)
                if token_id in self.eos and not self.ignore_eos:
                    new.finish_reason = "stop"
                    inst.completed.append(new)
                else:
                    grown[id(inst)][1].append(new)
        for inst, beams in grown.values():
            inst.beams = sorted(beams, key=self.sort_key, reverse=True)[:self.width]

    def best(self) -> list[list[BeamSearchSequence]]:
        """Per prompt (in order), its ``beam_width`` best beams, finished or not, best first."""
        results = []
        for inst in self.instances:
            for beam in inst.beams:
                beam.finish_reason = beam.finish_reason or "length"
            results.append(
                sorted([*inst.completed, *inst.beams], key=self.sort_key, reverse=True)[:self.width])
        return results

    @staticmethod
    def text(beam: BeamSearchSequence, tokenizer: Any, include_prompt: bool,
             include_stop_str_in_output: bool) -> str:
        """The beam's text (the prompt's too if include_prompt): a final end-of-sequence
        token's text only with include_stop_str_in_output."""
        ids = beam.tokens if include_prompt else beam.output_token_ids
        if beam.finish_reason != "stop":
            return tokenizer.decode(ids)
        text = tokenizer.decode(ids[:-1])
        if include_stop_str_in_output:
            text += tokenizer.decode(ids[-1:], skip_special_tokens=False)
        return text
