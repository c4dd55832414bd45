"""SamplingParams: what to generate and how, validated on construction (vLLM's field names)."""

from __future__ import annotations

import copy
import enum
import json as _json
import math
from dataclasses import dataclass, field
from typing import Any

MAX_N = 128  # completions per request (OpenAI's own limit)

# the constraint kinds of StructuredOutputsParams (exactly one is given)
STRUCTURED_KINDS = ("json", "regex", "choice", "grammar", "json_object", "structural_tag")


def _structural_tag_text(tag: Any) -> str:
    """A structural tag as JSON text (a dict is dumped); a ValueError when it is no JSON
    object or has neither xgrammar's ``format`` nor the older ``structures`` / ``triggers``."""
    if isinstance(tag, dict):
        obj, text = tag, _json.dumps(tag)
    elif isinstance(tag, str):
        try:
            obj, text = _json.loads(tag), tag
        except ValueError as e:
            raise ValueError(f"structured_outputs.structural_tag is not valid JSON: {e}") from None
    else:
        raise ValueError("structured_outputs.structural_tag must be a JSON object (a dict or "
                         f"its JSON text), got {type(tag).__name__}")
    if not isinstance(obj, dict) or ("format" not in obj and "structures" not in obj):
        raise ValueError(
            'structured_outputs.structural_tag must be {"type": "structural_tag", "format": '
            '{...}} or {"structures": [{"begin", "schema", "end"}, ...], "triggers": [...]}'
        )
    if "structures" in obj and not isinstance(obj.get("triggers"), list):
        raise ValueError("structured_outputs.structural_tag with structures needs triggers, "
                         "a list of strings")
    return text


@dataclass
class StructuredOutputsParams:
    """Structured outputs (guided decoding): the output is constrained to a JSON schema
    (``json``, a dict or its JSON text), any JSON object (``json_object=True``), a regular
    expression (``regex``), one of some strings (``choice``) or an EBNF grammar (``grammar``,
    xgrammar's GBNF dialect, as vLLM's xgrammar backend). Exactly one of them is given (vLLM's
    ``StructuredOutputsParams``; ``GuidedDecodingParams`` is its older name).

    ``structural_tag`` (a JSON text or a dict): xgrammar's structural tag, as vLLM passes it:
    ``{"type": "structural_tag", "format": {...}}`` (xgrammar's format: tags, sequences,
    triggered tags, ...) or the older ``{"structures": [{"begin", "schema", "end"}, ...],
    "triggers": [...]}``: text is free until a trigger, then the tag's begin, its JSON
    schema and its end.

    ``disable_any_whitespace``: JSON without free whitespace between tokens. vLLM's
    ``whitespace_pattern`` is not supported (a ValueError)."""

    json: str | dict | None = None
    regex: str | None = None
    choice: list[str] | None = None
    grammar: str | None = None
    json_object: bool | None = None
    disable_any_whitespace: bool = False
    disable_fallback: bool = False  # accepted for vLLM parity: there is no fallback here
    disable_additional_properties: bool = False
    whitespace_pattern: str | None = None
    structural_tag: str | dict | None = None
    backend: str | None = None  # older vLLM's per-request backend: only xgrammar is here

    def __post_init__(self) -> None:
        given = [k for k in STRUCTURED_KINDS
                 if getattr(self, k) is not None and getattr(self, k) is not False]
        if len(given) != 1:
            raise ValueError(
                "structured outputs need exactly one constraint of json, regex, choice, "
                f"grammar, json_object or structural_tag; got {given or 'none'}"
            )
        if self.structural_tag is not None:
            self.structural_tag = _structural_tag_text(self.structural_tag)
        if self.whitespace_pattern is not None:
            raise ValueError("structured_outputs.whitespace_pattern is not supported (the "
                             "xgrammar backend has none); use disable_any_whitespace")
        if self.backend not in (None, "auto", "xgrammar") and not str(self.backend).startswith(
                "xgrammar:"):
            raise ValueError(f"structured outputs backend {self.backend!r} is not supported: "
                             "only xgrammar is")
        if self.json is not None:
            if isinstance(self.json, (dict, bool)):
                self.json = _json.dumps(self.json)
            elif not isinstance(self.json, str):
                raise ValueError("structured_outputs.json must be a JSON schema (a dict or its "
                                 f"JSON text), got {type(self.json).__name__}")
            else:
                try:
                    _json.loads(self.json)
                except ValueError as e:
                    raise ValueError(f"structured_outputs.json is not valid JSON: {e}") from None
        if self.regex is not None and not isinstance(self.regex, str):
            raise ValueError("structured_outputs.regex must be a string")
        if self.grammar is not None and not isinstance(self.grammar, str):
            raise ValueError("structured_outputs.grammar must be a string")
        if self.choice is not None:
            if (not isinstance(self.choice, (list, tuple)) or not self.choice
                    or not all(isinstance(c, str) for c in self.choice)):
                raise ValueError("structured_outputs.choice must be a non-empty list of strings")
            self.choice = list(self.choice)
        if self.json_object is not None and not isinstance(self.json_object, bool):
            raise ValueError("structured_outputs.json_object must be a boolean")

    @property
    def kind(self) -> str:
        return next(k for k in STRUCTURED_KINDS
                    if getattr(self, k) is not None and getattr(self, k) is not False)

    def to_dict(self) -> dict[str, Any]:
        """Plain data (the non-default fields) for the engine core."""
        out: dict[str, Any] = {self.kind: getattr(self, self.kind)}
        if self.disable_any_whitespace:
            out["disable_any_whitespace"] = True
        if self.disable_additional_properties:
            out["disable_additional_properties"] = True
        return out


# vLLM's older name (SamplingParams(guided_decoding=GuidedDecodingParams(...)))
GuidedDecodingParams = StructuredOutputsParams


class RequestOutputKind(enum.IntEnum):
    """What each output of a request holds while it runs (vLLM's): all text so far, only
    what is new since the last output, or nothing until it finishes. ``LLM.generate`` always
    returns finished outputs; ``LLMEngine.step()`` follows the request's choice."""

    CUMULATIVE = 0
    DELTA = 1
    FINAL_ONLY = 2

    @property
    def processor_kind(self) -> str:  # the output processor's name for it
        return ("cumulative", "delta", "final")[self.value]


@dataclass
class SamplingParams:
    n: int = 1
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0  # 0 or -1: disabled
    min_p: float = 0.0
    seed: int | None = None
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    max_tokens: int | None = 16
    min_tokens: int = 0
    stop: str | list[str] | None = None
    stop_token_ids: list[int] | None = None
    ignore_eos: bool = False
    include_stop_str_in_output: bool = False
    logprobs: int | None = None
    prompt_logprobs: int | None = None
    skip_special_tokens: bool = True
    detokenize: bool = True  # False: token ids only, the text stays empty (no stop strings)
    spaces_between_special_tokens: bool = True
    # token id -> a value added to its logit before sampling (OpenAI clamps to [-100, 100])
    logit_bias: dict[int, float] | None = None
    # only these token ids may be sampled (vLLM's allowed_token_ids; out-of-vocab ids and an
    # empty list are refused when the request is added)
    allowed_token_ids: list[int] | None = None
    # words never to generate: the frontend tokenizes each (as is and after a space) into
    # _bad_words_token_ids; the last token of a sequence is banned when the tokens before it
    # were just generated (vLLM's bad_words)
    bad_words: list[str] | None = None
    # keep only the last k prompt tokens (-1: the model's max length; None: keep all);
    # applied where the frontend builds the prompt ids, so the engine core never sees it
    truncate_prompt_tokens: int | None = None
    # vLLM V1 has no best-of-n selection: accepted only where it asks for nothing (None or n)
    best_of: int | None = None
    # structured outputs (vLLM's name; a StructuredOutputsParams or a dict of its fields)
    structured_outputs: StructuredOutputsParams | dict | None = None
    # vLLM's older name for structured_outputs
    guided_decoding: StructuredOutputsParams | dict | None = None
    # vLLM's: arguments for custom logits processors (modelport/logits_processor.py), plain
    # data (they cross to the engine core); the OpenAI field vllm_xargs fills it
    extra_args: dict[str, Any] | None = None
    output_kind: RequestOutputKind = RequestOutputKind.CUMULATIVE
    # vLLM V0's per-request callables: refused, as vLLM V1 refuses them (the engine takes
    # logits processor classes; an AdapterLogitsProcessor wraps per-request callables)
    logits_processors: list[Any] | None = None
    # filled by the engine
    _stop_list: list[str] = field(default_factory=list, init=False, repr=False, compare=False)
    # filled by the frontend's InputProcessor from bad_words (vLLM's name)
    _bad_words_token_ids: list[list[int]] | None = field(
        default=None, init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        def bad(name: str, allowed: str) -> ValueError:
            return ValueError(f"{name} must be {allowed}, got {getattr(self, name)!r}")

        if self.guided_decoding is not None:
            if self.structured_outputs is not None:
                raise ValueError("give structured_outputs or guided_decoding (its older name), "
                                 "not both")
            self.structured_outputs, self.guided_decoding = self.guided_decoding, None
        if isinstance(self.structured_outputs, dict):
            try:
                self.structured_outputs = StructuredOutputsParams(**self.structured_outputs)
            except TypeError as e:
                raise ValueError(f"structured_outputs: {e}") from None
        elif self.structured_outputs is not None and not isinstance(
                self.structured_outputs, StructuredOutputsParams):
            raise bad("structured_outputs", "a StructuredOutputsParams, a dict or None")

        if not isinstance(self.n, int) or not 1 <= self.n <= MAX_N:
            raise bad("n", f"an integer in [1, {MAX_N}]")
        if self.temperature < 0:
            raise bad("temperature", ">= 0")
        if not 0.0 < self.top_p <= 1.0:
            raise bad("top_p", "in (0, 1]")
        if self.top_k == -1:
            self.top_k = 0
        if not isinstance(self.top_k, int) or not 0 <= self.top_k < 2**31:
            raise bad("top_k", "0 or -1 (disabled) or a positive integer")
        if not 0.0 <= self.min_p <= 1.0:
            raise bad("min_p", "in [0, 1]")
        if not -2.0 <= self.presence_penalty <= 2.0:
            raise bad("presence_penalty", "in [-2, 2]")
        if not -2.0 <= self.frequency_penalty <= 2.0:
            raise bad("frequency_penalty", "in [-2, 2]")
        if not self.repetition_penalty > 0.0:  # as vLLM: any positive value
            raise bad("repetition_penalty", "> 0")
        if self.max_tokens is not None and (
            not isinstance(self.max_tokens, int) or not 1 <= self.max_tokens < 2**31
        ):
            raise bad("max_tokens", "an integer in [1, 2^31)")
        if not isinstance(self.min_tokens, int) or not 0 <= self.min_tokens < 2**31:
            raise bad("min_tokens", "an integer in [0, 2^31)")
        if self.max_tokens is not None and self.min_tokens > self.max_tokens:
            raise ValueError(
                f"min_tokens ({self.min_tokens}) must be <= max_tokens ({self.max_tokens})"
            )
        # -1: the whole vocabulary (vLLM); the upper bound is the engine's max_logprobs
        # (default 20; -1 there allows -1 here), checked when the request is added
        for name in ("logprobs", "prompt_logprobs"):
            k = getattr(self, name)
            if k is not None and (not _is_int(k) or (k < 0 and k != -1)):
                raise ValueError(f"{name} must be non-negative or -1, got {k!r}.")
        if self.seed is not None and (
            not isinstance(self.seed, int) or not -(2**63) <= self.seed < 2**63
        ):
            raise bad("seed", "a 64-bit signed integer")
        if self.truncate_prompt_tokens is not None and (
            not _is_int(self.truncate_prompt_tokens)
            or not (self.truncate_prompt_tokens >= 1 or self.truncate_prompt_tokens == -1)
        ):
            raise bad(
                "truncate_prompt_tokens", "None, -1 (the model's max length) or an integer >= 1"
            )
        if self.best_of is not None:
            if not _is_int(self.best_of) or self.best_of < self.n:
                raise bad("best_of", f"None or an integer >= n ({self.n})")
            if self.best_of > self.n:
                raise ValueError(
                    f"best_of ({self.best_of}) > n ({self.n}) is not supported (nor in vLLM V1): "
                    "leave best_of unset, or ask for n completions and pick among them"
                )
        if self.stop is None:
            self._stop_list = []
        else:
            stops = [self.stop] if isinstance(self.stop, str) else self.stop
            if not isinstance(stops, (list, tuple)) or not all(
                isinstance(s, str) for s in stops
            ):  # a number was "'int' object is not iterable"
                raise bad("stop", "a string or a list of strings")
            if not all(stops):  # it would match at once, everywhere (vLLM's words)
                raise ValueError("stop cannot contain an empty string.")
            self._stop_list = list(stops)
        if self._stop_list and not self.detokenize:
            raise ValueError("stop strings are only supported when detokenize is True. "
                             "Set detokenize=True to use stop.")
        if self.logit_bias is not None:
            if not isinstance(self.logit_bias, dict) or not all(
                _is_int(t) and 0 <= t < 2**31 and isinstance(v, (int, float))
                and not isinstance(v, bool) and math.isfinite(v)
                for t, v in self.logit_bias.items()
            ):
                raise bad("logit_bias", "a dict of token id (an integer >= 0) -> finite bias")
            self.logit_bias = {t: float(v) for t, v in self.logit_bias.items()} or None
        if self.allowed_token_ids is not None:
            if not all(_is_int(t) and 0 <= t < 2**31
                       for t in _iter_or_none(self.allowed_token_ids)):
                raise bad("allowed_token_ids", "None or a list of token ids (integers >= 0)")
            self.allowed_token_ids = list(self.allowed_token_ids)
        if self.bad_words is not None:
            if not all(isinstance(w, str) for w in _iter_or_none(self.bad_words)):
                raise bad("bad_words", "None or a list of strings")
            self.bad_words = list(self.bad_words)
        if self.extra_args is not None and not isinstance(self.extra_args, dict):
            raise bad("extra_args", "None or a dict")
        if self.logits_processors:
            raise ValueError(
                "per-request logits_processors are not supported (nor in vLLM V1): pass logits "
                "processor classes to the engine (LLM(logits_processors=[...]), modelport."
                "logits_processor) and their per-request arguments in extra_args"
            )
        try:
            self.output_kind = RequestOutputKind(self.output_kind)
        except ValueError:
            raise bad("output_kind", "a RequestOutputKind (CUMULATIVE, DELTA or FINAL_ONLY)") from None
        if self.stop_token_ids is not None and not all(
            isinstance(t, int) and 0 <= t < 2**31 for t in self.stop_token_ids
        ):
            raise bad("stop_token_ids", "a list of token ids (integers in [0, 2^31))")

    def clone(self) -> SamplingParams:
        """A deep copy (vLLM's), e.g. to change a field per request."""
        return copy.deepcopy(self)

    @classmethod
    def from_optional(cls, **kw: Any) -> SamplingParams:
        """vLLM's: the fields given as None take their defaults."""
        return cls(**{k: v for k, v in kw.items() if v is not None})

    @property
    def greedy(self) -> bool:
        return self.temperature < 1e-5

    @property
    def stop_strings(self) -> list[str]:
        return self._stop_list

    @property
    def bad_words_token_ids(self) -> list[list[int]] | None:
        """bad_words as token id sequences (set when the request is added; vLLM's name)."""
        return self._bad_words_token_ids

    @property
    def has_multi_token_bad_words(self) -> bool:
        """Whether banning a bad word depends on the tokens generated before it."""
        return any(len(w) > 1 for w in self._bad_words_token_ids or ())

    @property
    def needs_penalties(self) -> bool:
        return (
            self.presence_penalty != 0.0
            or self.frequency_penalty != 0.0
            or self.repetition_penalty != 1.0
        )


def num_logprobs(k: int, vocab: int) -> int:
    """A logprobs / prompt_logprobs / max_logprobs count, -1 (the whole vocabulary) resolved."""
    return vocab if k == -1 else k


def _iter_or_none(value: object) -> list:
    """value's items if it is a list or tuple, else [None] (which no item check accepts)."""
    return list(value) if isinstance(value, (list, tuple)) else [None]


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


@dataclass
class BeamSearchParams:
    """What ``LLM.beam_search()`` searches for (vLLM's ``BeamSearchParams``).

    ``beam_width`` beams are kept at each step; each is extended by ``max_tokens`` tokens at
    most; a beam that generates an end-of-sequence token is finished unless ``ignore_eos``.
    Beams are ranked by ``cum_logprob / len(tokens) ** length_penalty`` (tokens: the prompt
    plus the generated ones, a final EOS not counted), so ``length_penalty`` > 1 favours
    longer beams and < 1 shorter ones. ``temperature`` is that of each step's request (the
    candidates are always the top ``2 * beam_width`` tokens by log-probability).
    ``include_stop_str_in_output``: the final EOS token's text is kept in ``text``."""

    beam_width: int
    max_tokens: int
    ignore_eos: bool = False
    temperature: float = 0.0
    length_penalty: float = 1.0
    include_stop_str_in_output: bool = False
    # vLLM's newer field: constrained beam search is not supported here (only None)
    structured_outputs: StructuredOutputsParams | dict | None = None

    def __post_init__(self) -> None:
        if not _is_int(self.beam_width) or self.beam_width < 1:
            raise ValueError(f"beam_width must be an integer >= 1, got {self.beam_width!r}")
        if not _is_int(self.max_tokens) or not 1 <= self.max_tokens < 2**31:
            raise ValueError(f"max_tokens must be an integer in [1, 2^31), got {self.max_tokens!r}")
        if (not isinstance(self.temperature, (int, float)) or isinstance(self.temperature, bool)
                or not self.temperature >= 0):
            raise ValueError(f"temperature must be >= 0, got {self.temperature!r}")
        if (not isinstance(self.length_penalty, (int, float))
                or isinstance(self.length_penalty, bool)
                or not math.isfinite(self.length_penalty)):
            raise ValueError(f"length_penalty must be a finite number, got {self.length_penalty!r}")
        if self.structured_outputs is not None:
            raise ValueError("BeamSearchParams.structured_outputs is not supported: beam "
                             "search here is unconstrained (use generate() for structured outputs)")
