"""Structured outputs (guided decoding) with xgrammar, as vLLM's xgrammar backend.

The frontend checks a request's constraint without a tokenizer (``validate``: a bad schema,
regex or grammar is a ValueError naming the field when the request is added); the engine core
compiles it against the model's vocabulary (``StructuredOutputManager``, one per core, with the
tokenizer loaded on first use and compiled grammars cached by spec) in a small thread pool, off
the engine loop: the request waits (WAITING_FOR_FSM) while the others step on, and a compile
failure finishes only that request. Each request (each of its n samples) gets its own
``GrammarMatcher``. The sampler masks each constrained row's logits with its matcher's token
bitmask (min_tokens gives way when the grammar allows nothing but a stop token); the scheduler
advances the matcher with each accepted token, never emits a token the grammar refuses, and
finishes the request ("stop") once the grammar has terminated.

With a reasoning parser (vLLM's --reasoning-parser), a grammar constrains only the answer after
the reasoning, as vLLM's: while a request is still reasoning its grammar neither masks nor
advances; the token that ends the reasoning (``</think>``) is not fed to it, and the grammar
constrains from the next token on. A prompt that already ended the reasoning (its last think
tag is ``</think>``: Qwen3's template with enable_thinking false) leaves the grammar on from the
first token. ``ReasoningEnd`` tells, by token ids, when the reasoning has ended;
enable_in_reasoning (vLLM's structured_outputs_config) keeps the grammar on throughout.

xgrammar is imported only here and only when a request asks for structured output, so
everything else runs where it is not installed.
"""

from __future__ import annotations

import json
import os
import re
import threading
from collections import OrderedDict
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

from modelport.sampling_params import StructuredOutputsParams

_CACHE_SIZE = 256  # compiled grammars kept per core
# xgrammar's C++ errors start with "[time] /path/file.cc:line: "
_ERR_PREFIX = re.compile(r"^\s*\[[^\]]*\]\s*\S+:\d+:\s*")
_WHAT = {"json": "JSON schema", "regex": "regex", "choice": "choice", "grammar": "grammar",
         "json_object": "json_object", "structural_tag": "structural tag"}


# each reasoning parser's think tags (entrypoints/openai/reasoning.py reads the same tags in
# text); each must be one token of the model's vocabulary, as vLLM's think-tag parsers need.
# None: the parser reads phrases (granite's "Here is my response:"), which token ids cannot
# show, so its grammar constrains from the first token (vLLM's granite parser has no
# token-level end of reasoning at all)
REASONING_TAGS: dict[str, tuple[str, str] | None] = {
    "deepseek_r1": ("<think>", "</think>"),
    "qwen3": ("<think>", "</think>"),
    "mistral": ("[THINK]", "[/THINK]"),
    "granite": None,
    # GLM-4.5's template writes <think></think> after every <|assistant|>: the reasoning has
    # ended when a </think> follows the last <|assistant|> (vLLM's is_reasoning_end)
    "glm45": ("<|assistant|>", "</think>"),
    "deepseek_v3": ("<think>", "</think>"),
    "seed_oss": ("<seed:think>", "</seed:think>"),
    # Hunyuan-A13B's tags are several tokens each: as granite, constrained from the start
    "hunyuan_a13b": None,
}
_PARSER_CLASSES = {"deepseek_r1": "DeepSeekR1", "qwen3": "Qwen3", "mistral": "Mistral",
                   "granite": "Granite", "glm45": "Glm45", "deepseek_v3": "DeepSeekV3",
                   "seed_oss": "SeedOSS", "hunyuan_a13b": "HunyuanA13B"}


@dataclass(frozen=True)
class ReasoningEnd:
    """When a request's reasoning has ended, by token ids, as vLLM's think-tag parsers'
    ``is_reasoning_end``: the last think tag in the ids is the end tag."""

    start_id: int
    end_id: int

    def ended(self, token_ids: Sequence[int]) -> bool:
        for t in reversed(token_ids):
            if t == self.start_id:
                return False
            if t == self.end_id:
                return True
        return False

    @classmethod
    def from_vocab(cls, parser: str, vocab: dict[str, int]) -> ReasoningEnd | None:
        """RuntimeError (vLLM's message) when a tag is not one token of the vocabulary;
        None for a parser without tags (the grammar is not held back)."""
        if parser not in REASONING_TAGS:
            raise ValueError(f"unknown reasoning parser {parser!r}; choose from "
                             f"{', '.join(sorted(REASONING_TAGS))}")
        tags = REASONING_TAGS[parser]
        if tags is None:
            return None
        start, end = (vocab.get(t) for t in tags)
        if start is None or end is None:
            raise RuntimeError(
                f"{_PARSER_CLASSES[parser]}ReasoningParser reasoning parser could not locate "
                "think start/end tokens in the tokenizer!")
        return cls(start, end)


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


def spec_key(so: StructuredOutputsParams, no_whitespace: bool = False) -> tuple:
    """The cache key of a spec; ``no_whitespace``: the engine's disable_any_whitespace."""
    value = getattr(so, so.kind)
    if isinstance(value, list):
        value = tuple(value)
    return (so.kind, value, bool(so.disable_any_whitespace or no_whitespace))


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
        if kind == "structural_tag":
            return _structural_tag_grammar(xgr, value)
        return xgr.Grammar.from_ebnf(value)
    except (RuntimeError, ValueError, TypeError, KeyError) as e:
        raise ValueError(
            f"invalid {_WHAT[kind]} in structured_outputs.{kind}: {_message(e)}"
        ) from None


def _structural_tag_grammar(xgr: Any, text: str) -> Any:
    """xgrammar's structural tag (``{"type": "structural_tag", "format": ...}``), or the older
    ``structures`` + ``triggers`` form that vLLM also takes: each structure is a begin
    string, a JSON schema and an end string, and text is free until one of the triggers."""
    tag = json.loads(text)
    if "structures" not in tag:
        return xgr.Grammar.from_structural_tag(text)
    items = []
    for s in tag["structures"]:
        if not isinstance(s, dict) or not {"begin", "end"} <= s.keys():
            raise ValueError("each of structures needs begin, schema and end")
        schema = s.get("schema", {})
        items.append(xgr.StructuralTagItem(
            begin=s["begin"], end=s["end"],
            schema=schema if isinstance(schema, str) else json.dumps(schema)))
    return xgr.Grammar.from_structural_tag(items, list(tag["triggers"]))


@lru_cache(maxsize=_CACHE_SIZE)
def _validate_key(key: tuple) -> None:
    _grammar(key)


def validate(so: StructuredOutputsParams) -> None:
    """Raise ValueError if the constraint cannot be compiled (bad schema, regex, grammar)."""
    _validate_key(spec_key(so))


class StructuredOutputManager:
    """The engine core's grammar compiler, off the engine loop (as vLLM's): ``submit`` hands a
    spec to a small thread pool (xgrammar's compiler releases the GIL) and returns a Future of
    its CompiledGrammar, so a big schema never stalls the other requests' steps. One
    TokenizerInfo (built on first use, in a worker, from the model's tokenizer); compiled
    grammars cached by spec key (an LRU of ``_CACHE_SIZE``), and a spec being compiled is
    compiled once however many requests ask for it meanwhile. ``matcher`` makes a request's
    own GrammarMatcher from a compiled grammar.

    A failed compile sets its Future's exception to a ValueError naming the field; failures
    are not cached (the next request with that spec tries again).
    """

    def __init__(self, load_tokenizer: Callable[[], Any], vocab_size: int,
                 max_workers: int | None = None, disable_any_whitespace: bool = False) -> None:
        self._load_tokenizer = load_tokenizer
        self.vocab_size = vocab_size
        self.disable_any_whitespace = disable_any_whitespace  # for every request's JSON
        self._compiler: Any = None
        self._compiler_lock = threading.Lock()
        self._lock = threading.Lock()  # guards _cache and _inflight (workers and the core)
        self._cache: OrderedDict[tuple, Any] = OrderedDict()
        self._inflight: dict[tuple, Future] = {}
        # vLLM's sizing: half the cores, at most 8
        self._max_workers = max_workers or max(1, min(8, (os.cpu_count() or 2) // 2))
        self._executor: ThreadPoolExecutor | None = None
        self.num_compiles = 0  # compilations actually run (not served from the cache)

    def _get_compiler(self) -> Any:
        with self._compiler_lock:
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
                # our own cache keys by spec; xgrammar's would hold the same grammars twice
                self._compiler = xgr.GrammarCompiler(
                    info, max_threads=max(1, min(8, os.cpu_count() or 1)), cache_enabled=False)
            return self._compiler

    def _compile(self, key: tuple) -> Any:
        """Compile one spec key (runs in a worker thread). Tests patch this seam."""
        compiler = self._get_compiler()
        grammar = _grammar(key)  # a clear ValueError for a bad spec
        try:
            return compiler.compile_grammar(grammar)
        except (RuntimeError, ValueError) as e:
            raise ValueError(f"cannot compile structured_outputs.{key[0]}: {_message(e)}") from None

    def _run(self, key: tuple) -> Any:
        try:
            compiled = self._compile(key)
        except ValueError:
            with self._lock:
                self._inflight.pop(key, None)
            raise
        except Exception as e:  # anything else is still this request's failure, not the core's
            with self._lock:
                self._inflight.pop(key, None)
            raise ValueError(f"cannot compile structured_outputs.{key[0]}: "
                             f"{type(e).__name__}: {e}") from e
        with self._lock:
            self._inflight.pop(key, None)
            self._cache[key] = compiled
            self._cache.move_to_end(key)
            while len(self._cache) > _CACHE_SIZE:
                self._cache.popitem(last=False)
        return compiled

    def submit(self, so: StructuredOutputsParams) -> Future:
        """A Future of the spec's CompiledGrammar: done at once for a cached spec, shared with
        the requests already waiting for the same spec, else compiled in the pool."""
        key = spec_key(so, self.disable_any_whitespace)
        with self._lock:
            compiled = self._cache.get(key)
            if compiled is not None:
                self._cache.move_to_end(key)
                done: Future = Future()
                done.set_result(compiled)
                return done
            fut = self._inflight.get(key)
            if fut is None:
                if self._executor is None:
                    self._executor = ThreadPoolExecutor(
                        max_workers=self._max_workers, thread_name_prefix="grammar-compile")
                self.num_compiles += 1
                fut = self._executor.submit(self._run, key)
                self._inflight[key] = fut
            return fut

    def cancel(self, fut: Future) -> None:
        """Drop a compile no request waits for any more, if it has not started (a started one
        runs to the end and its grammar is cached)."""
        with self._lock:
            if fut.cancel():
                for key in [k for k, f in self._inflight.items() if f is fut]:
                    del self._inflight[key]

    def compile(self, so: StructuredOutputsParams) -> Any:
        """Compile synchronously (through the pool and the cache); ValueError if it fails."""
        return self.submit(so).result()

    @staticmethod
    def matcher(compiled: Any) -> Any:
        return xgrammar().GrammarMatcher(compiled)

    def new_matcher(self, so: StructuredOutputsParams) -> Any:
        return self.matcher(self.compile(so))

    @property
    def num_inflight(self) -> int:
        with self._lock:
            return len(self._inflight)

    def shutdown(self) -> None:
        if self._executor is not None:
            self._executor.shutdown(wait=False, cancel_futures=True)
            self._executor = None


def apply_grammar_bitmask(logits: Any, rows: list[tuple[int, Any]]) -> Any:
    """Mask each (row, matcher)'s [N, V] logits row to the tokens its grammar allows next.

    Returns the host bitmask (int32, one row per entry of ``rows``, xgrammar's layout)."""
    if not rows:
        return None
    import torch

    xgr = xgrammar()
    vocab = logits.shape[-1]
    bitmask = xgr.allocate_token_bitmask(len(rows), vocab)
    for j, (_, matcher) in enumerate(rows):
        matcher.fill_next_token_bitmask(bitmask, j)
    # unpack the bits on the logits' device: one masked_fill, any device or dtype
    bits = bitmask.to(logits.device, non_blocking=True)
    allowed = unpack_bitmask(bits, vocab)
    idx = torch.tensor([i for i, _ in rows], dtype=torch.long, device=logits.device)
    logits[idx] = logits[idx].masked_fill(~allowed, float("-inf"))
    return bitmask


def unpack_bitmask(bitmask: Any, vocab: int) -> Any:
    """[N, ceil(V/32)] int32 bitmask -> [N, V] bool (True: allowed)."""
    import torch

    shifts = torch.arange(32, device=bitmask.device, dtype=torch.int32)
    return ((bitmask.unsqueeze(-1) >> shifts) & 1).bool().reshape(bitmask.shape[0], -1)[:, :vocab]


def allows_only(bitmask_row: Any, token_ids: list[int], vocab: int) -> bool:
    """Whether a host bitmask row allows no token outside ``token_ids`` (e.g. a terminated
    grammar, which allows only its stop tokens)."""
    allowed = unpack_bitmask(bitmask_row.reshape(1, -1), vocab)[0].clone()
    ids = [t for t in token_ids if 0 <= t < vocab]
    if ids:
        allowed[ids] = False
    return not bool(allowed.any())
