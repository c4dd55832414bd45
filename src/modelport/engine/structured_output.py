"""Structured outputs (guided decoding) with xgrammar, as vLLM's xgrammar backend.

The frontend checks a request's constraint without a tokenizer (``validate``: a bad schema,
regex or grammar is a ValueError naming the field when the request is added); the engine core
compiles it against the model's vocabulary (``StructuredOutputManager``, one per core, with the
tokenizer loaded on first use and compiled grammars cached by spec) and gives each request
(each of its n samples) its own ``GrammarMatcher``. The sampler masks each constrained row's
logits with its matcher's token bitmask; the scheduler advances the matcher with each accepted
token and finishes the request ("stop") once the grammar has terminated.

xgrammar is imported only here and only when a request asks for structured output, so
everything else runs where it is not installed.
"""

from __future__ import annotations

import json
import os
import re
from collections import OrderedDict
from collections.abc import Callable
from functools import lru_cache
from typing import Any

from modelport.sampling_params import StructuredOutputsParams

_CACHE_SIZE = 256  # compiled grammars kept per core
# xgrammar's C++ errors start with "[time] /path/file.cc:line: "
_ERR_PREFIX = re.compile(r"^\s*\[[^\]]*\]\s*\S+:\d+:\s*")
_WHAT = {"json": "JSON schema", "regex": "regex", "choice": "choice", "grammar": "grammar",
         "json_object": "json_object"}


def xgrammar() -> Any:
    try:
        import xgrammar as xgr
    except ImportError:
        raise ValueError(
            "structured outputs need the xgrammar package, which is not installed here "
            "(pip install xgrammar)"
        ) from None
    return xgr


def _message(e: Exception) -> str:
    lines = [ln for ln in str(e).splitlines() if ln.strip()]
    return _ERR_PREFIX.sub("", lines[0]).strip() if lines else type(e).__name__


def choice_grammar(choices: list[str]) -> str:
    """An EBNF grammar whose language is exactly ``choices`` (JSON string escapes)."""
    return "root ::= " + " | ".join(json.dumps(c, ensure_ascii=False) for c in choices)


def spec_key(so: StructuredOutputsParams) -> tuple:
    value = getattr(so, so.kind)
    if isinstance(value, list):
        value = tuple(value)
    return (so.kind, value, bool(so.disable_any_whitespace))


def _grammar(key: tuple) -> Any:
    """The tokenizer-free xgrammar Grammar of a spec (ValueError naming the field)."""
    xgr = xgrammar()
    kind, value, no_ws = key
    try:
        if kind == "json":
            return xgr.Grammar.from_json_schema(value, any_whitespace=not no_ws)
        if kind == "json_object":  # an object, as OpenAI's json_object (and vLLM's)
            return xgr.Grammar.from_json_schema('{"type": "object"}', any_whitespace=not no_ws)
        if kind == "regex":
            return xgr.Grammar.from_regex(value)
        if kind == "choice":
            return xgr.Grammar.from_ebnf(choice_grammar(list(value)))
        return xgr.Grammar.from_ebnf(value)
    except (RuntimeError, ValueError, TypeError) as e:
        raise ValueError(
            f"invalid {_WHAT[kind]} in structured_outputs.{kind}: {_message(e)}"
        ) from None


@lru_cache(maxsize=_CACHE_SIZE)
def _validate_key(key: tuple) -> None:
    _grammar(key)


def validate(so: StructuredOutputsParams) -> None:
    """Raise ValueError if the constraint cannot be compiled (bad schema, regex, grammar)."""
    _validate_key(spec_key(so))


class StructuredOutputManager:
    """The engine core's grammar compiler: one TokenizerInfo (built on first use from the
    model's tokenizer), compiled grammars cached by spec, a fresh matcher per request."""

    def __init__(self, load_tokenizer: Callable[[], Any], vocab_size: int) -> None:
        self._load_tokenizer = load_tokenizer
        self.vocab_size = vocab_size
        self._compiler: Any = None
        self._cache: OrderedDict[tuple, Any] = OrderedDict()

    def _get_compiler(self) -> Any:
        if self._compiler is None:
            xgr = xgrammar()
            tok = self._load_tokenizer()
            if tok is None:
                raise ValueError("structured outputs need the model's tokenizer, and this "
                                 "engine has none")
            info = xgr.TokenizerInfo.from_huggingface(
                tok.hf, vocab_size=max(self.vocab_size, len(tok.hf)),
                stop_token_ids=list(tok.eos_token_ids) or None,
            )
            self._compiler = xgr.GrammarCompiler(
                info, max_threads=max(1, min(8, os.cpu_count() or 1)), cache_enabled=False)
        return self._compiler

    def compile(self, so: StructuredOutputsParams) -> Any:
        key = spec_key(so)
        compiled = self._cache.get(key)
        if compiled is not None:
            self._cache.move_to_end(key)
            return compiled
        compiler = self._get_compiler()
        grammar = _grammar(key)  # a clear ValueError for a bad spec
        try:
            compiled = compiler.compile_grammar(grammar)
        except (RuntimeError, ValueError) as e:
            raise ValueError(f"cannot compile structured_outputs.{key[0]}: {_message(e)}") from None
        self._cache[key] = compiled
        if len(self._cache) > _CACHE_SIZE:
            self._cache.popitem(last=False)
        return compiled

    def new_matcher(self, so: StructuredOutputsParams) -> Any:
        return xgrammar().GrammarMatcher(self.compile(so))


def apply_grammar_bitmask(logits: Any, rows: list[tuple[int, Any]]) -> None:
    """Mask each (row, matcher)'s [N, V] logits row to the tokens its grammar allows next."""
    if not rows:
        return
    import torch

    xgr = xgrammar()
    vocab = logits.shape[-1]
    bitmask = xgr.allocate_token_bitmask(len(rows), vocab)
    for j, (_, matcher) in enumerate(rows):
        matcher.fill_next_token_bitmask(bitmask, j)
    # unpack the bits on the logits' device: one masked_fill, any device or dtype
    bits = bitmask.to(logits.device, non_blocking=True)
    shifts = torch.arange(32, device=logits.device, dtype=torch.int32)
    allowed = ((bits.unsqueeze(-1) >> shifts) & 1).bool().reshape(len(rows), -1)[:, :vocab]
    idx = torch.tensor([i for i, _ in rows], dtype=torch.long, device=logits.device)
    logits[idx] = logits[idx].masked_fill(~allowed, float("-inf"))
