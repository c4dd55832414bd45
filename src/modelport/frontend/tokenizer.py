"""Tokenizer: a thin wrapper over a transformers fast tokenizer, from an HF folder or a GGUF.

GGUF files carry their vocabulary, merges and chat template in metadata; transformers can
build a fast tokenizer from them, but that takes seconds (SmolLM2: ~7 s), so the converted
tokenizer is saved in the modelport cache and later starts load it in ~0.4 s.

Chat templates come from model files, i.e. from whoever published the model, so they run in
Jinja's ImmutableSandboxedEnvironment: no access to Python internals and no mutation of the
objects we pass in. The globals and filters mirror what HF templates expect
(raise_exception, strftime_now, tojson keeping non-ASCII).
"""

from __future__ import annotations

import functools
import json
import logging
from datetime import datetime
from pathlib import Path
from typing import Any

import jinja2
import jinja2.nodes
from jinja2.sandbox import ImmutableSandboxedEnvironment

from modelport.loader.cache import build_entry, entry_dir
from modelport.loader.source import ModelSource

logger = logging.getLogger(__name__)


def _raise(message: str) -> None:
    raise jinja2.TemplateError(message)


def _tojson(
    value: Any,
    indent: int | None = None,
    ensure_ascii: bool = False,
    sort_keys: bool = False,
    separators: Any = None,
) -> str:
    return json.dumps(
        value, indent=indent, ensure_ascii=ensure_ascii, sort_keys=sort_keys, separators=separators
    )


@functools.lru_cache(maxsize=8)
def _compile(template: str) -> jinja2.Template:
    env = ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols"]
    )
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    return env.from_string(template)


def compile_chat_template(template: str) -> None:
    """Check that ``template`` compiles (ValueError naming Jinja's error and line), as a
    server does with its --chat-template at startup."""
    try:
        _compile(template)
    except jinja2.TemplateError as e:
        line = getattr(e, "lineno", None)
        where = f" (line {line})" if line else ""
        raise ValueError(f"chat template error{where}: {e}") from None


def flatten_content(messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """OpenAI-style content lists made only of text parts become one string.

    Most chat templates index ``message['content']`` as a string; multimodal parts are left
    alone for templates that understand them.
    """
    out = []
    for m in messages:
        content = m.get("content")
        if isinstance(content, list) and all(
            isinstance(p, dict) and p.get("type") == "text" for p in content
        ):
            m = {**m, "content": "\n".join(str(p.get("text", "")) for p in content)}
        out.append(m)
    return out


# vLLM's chat_template_content_format: how a message's content reaches the template
CONTENT_FORMATS = ("auto", "string", "openai")


def _is_content(node: Any) -> bool:
    """``x['content']`` or ``x.content`` (through filters, e.g. ``x['content'] | list``)."""
    while isinstance(node, jinja2.nodes.Filter) and node.node is not None:
        node = node.node
    if isinstance(node, jinja2.nodes.Getitem):
        return isinstance(node.arg, jinja2.nodes.Const) and node.arg.value == "content"
    return isinstance(node, jinja2.nodes.Getattr) and node.attr == "content"


@functools.lru_cache(maxsize=32)
def detect_content_format(template: str) -> str:
    """vLLM's "auto": "openai" when the template loops over a message's content (``{% for
    part in message['content'] %}``, also through a variable set from it), else "string"."""
    try:
        ast = ImmutableSandboxedEnvironment(extensions=["jinja2.ext.loopcontrols"]).parse(template)
    except jinja2.TemplateError:
        return "string"
    aliases = {
        t.name
        for node in ast.find_all(jinja2.nodes.Assign)
        if _is_content(node.node)
        for t in [node.target]
        if isinstance(t, jinja2.nodes.Name)
    }
    for loop in ast.find_all(jinja2.nodes.For):
        it = loop.iter
        while isinstance(it, jinja2.nodes.Filter) and it.node is not None:
            it = it.node
        if _is_content(it) or (isinstance(it, jinja2.nodes.Name) and it.name in aliases):
            return "openai"
    return "string"


def content_as_parts(messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The "openai" content format: every message's content a list of parts, a string
    becoming ``[{"type": "text", "text": ...}]`` and no content an empty list."""
    out = []
    for m in messages:
        if isinstance(m, dict) and "content" in m and not isinstance(m["content"], list):
            c = m["content"]
            m = {**m, "content": [] if c is None else [{"type": "text", "text": str(c)}]}
        out.append(m)
    return out


def with_content_format(messages: list[dict[str, Any]], content_format: str,
                        template: str) -> list[dict[str, Any]]:
    """``messages`` as the template gets them: "string" (text parts joined into one string),
    "openai" (lists of parts) or "auto" (which the template reads: detect_content_format)."""
    if content_format not in CONTENT_FORMATS:
        raise ValueError(f"chat_template_content_format must be one of {CONTENT_FORMATS}, "
                         f"got {content_format!r}")
    if content_format == "auto":
        content_format = detect_content_format(template)
    if content_format == "openai":
        return content_as_parts(messages)
    return flatten_content(messages)


def render_chat_template(
    template: str,
    messages: list[dict[str, Any]],
    *,
    add_generation_prompt: bool = True,
    tools: list[dict[str, Any]] | None = None,
    special_tokens: dict[str, str | None] | None = None,
    content_format: str = "string",
    **kwargs: Any,
) -> str:
    """Render ``messages`` with ``template``; template errors become ValueError.
    ``content_format``: see with_content_format."""
    try:
        return _compile(template).render(
            messages=with_content_format(messages, content_format, template),
            add_generation_prompt=add_generation_prompt,
            tools=tools,
            **(special_tokens or {}),
            **kwargs,
        )
    except jinja2.TemplateError as e:
        raise ValueError(f"chat template error: {e}") from None


# apply_chat_template options that only the HF tokenizer implements: a call giving one is
# rendered by HF (with our template), as the caller asked for HF's behaviour
_HF_CHAT_OPTIONS = frozenset(
    {
        "tokenize",
        "return_dict",
        "padding",
        "truncation",
        "max_length",
        "return_tensors",
        "return_assistant_tokens_mask",
        "tokenizer_kwargs",
        "continue_final_message",
        "sanitize_control_tokens",
    }
)
# attributes this class sets itself; any other attribute write goes to the HF tokenizer
_OWN_ATTRS = frozenset({"hf", "eos_token_ids", "vocab_size", "chat_template",
                        "chat_template_content_format", "_rust"})


class Tokenizer:
    """What the frontend needs from a tokenizer, independent of where it came from, and
    otherwise the Hugging Face tokenizer it wraps.

    ``llm.get_tokenizer()`` returns this object, where vLLM returns the HF tokenizer, so
    everything this class does not define is the HF tokenizer's: ``tok(text)``,
    ``tok.eos_token_id``, ``tok.pad_token``, ``tok.batch_decode``, ``len(tok)``... (reads
    and writes of those attributes reach the HF object; ``tok.hf`` is the HF object itself,
    for code that checks its class). GGUF models have an HF tokenizer too, converted from
    the GGUF vocabulary, so this holds for every model.

    Its own members keep the meanings the engine relies on, which differ from HF's:

    * ``decode`` skips special tokens unless told otherwise, and never applies
      ``clean_up_tokenization_spaces``: that legacy rewrite (" ." -> ".") would corrupt
      code and make incremental detokenization disagree with a full decode;
    * ``encode`` returns a plain list of ids;
    * ``apply_chat_template`` adds the generation prompt and returns text, rendered in our
      sandbox (HF's defaults are the opposite); given ``tokenize=True`` or another option
      only HF has, HF renders the same template and answers as HF;
    * ``vocab_size`` counts added tokens too (``len(tok)``; HF's excludes them);
    * ``eos_token_ids`` (no HF counterpart) also holds the model's own end ids.
    """

    def __init__(self, hf: Any, extra_eos_token_ids: tuple[int, ...] = ()) -> None:
        self.hf = hf
        eos = [hf.eos_token_id] if hf.eos_token_id is not None else []
        self.eos_token_ids: tuple[int, ...] = tuple(dict.fromkeys([*eos, *extra_eos_token_ids]))
        self.vocab_size: int = len(hf)
        self.chat_template: str | dict | None = getattr(hf, "chat_template", None)
        # vLLM's --chat-template-content-format: "auto" (the template's own), "string" or
        # "openai"; apply_chat_template's chat_template_content_format overrides it
        self.chat_template_content_format = "auto"
        # a fast tokenizer's Rust object decodes ~5x faster than the Python wrapper around
        # it (which adds only argument conversion when clean-up is off): detokenization runs
        # twice per generated token
        self._rust = (
            getattr(hf, "backend_tokenizer", None) if getattr(hf, "is_fast", False) else None
        )

    # ------------------------------------------------------------ the HF tokenizer's API

    def __getattr__(self, name: str) -> Any:
        # only called for names this object lacks; "hf" itself missing means a half-built
        # object (copy, pickle), which must not recurse
        if name == "hf" or name.startswith("__"):
            raise AttributeError(name)
        return getattr(self.hf, name)

    def __setattr__(self, name: str, value: Any) -> None:
        if name in _OWN_ATTRS or hasattr(type(self), name):
            object.__setattr__(self, name, value)
        else:
            setattr(self.hf, name, value)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self.hf(*args, **kwargs)

    def __len__(self) -> int:
        return len(self.hf)

    def __dir__(self) -> list[str]:
        return sorted({*super().__dir__(), *dir(self.hf)})

    def __repr__(self) -> str:
        return f"modelport Tokenizer over {self.hf!r}"

    # ------------------------------------------------------------ what the engine uses

    def encode(self, text: str, add_special_tokens: bool = True, **kwargs: Any) -> Any:
        """A list of ids; HF's other options (``return_tensors``, ...) pass through."""
        out = self.hf.encode(text, add_special_tokens=add_special_tokens, **kwargs)
        return out if kwargs else list(out)

    def decode(self, ids: Any, skip_special_tokens: bool = True, **kwargs: Any) -> Any:
        """Text of ``ids`` (a list, an int, an array or tensor); a list of lists gives a list."""
        if type(ids) is not list:
            ids = ids.tolist() if hasattr(ids, "tolist") else ids
            ids = [ids] if isinstance(ids, int) else list(ids)
        if ids and isinstance(ids[0], list):
            return [self.decode(x, skip_special_tokens, **kwargs) for x in ids]
        if self._rust is not None and not kwargs:
            return self._rust.decode(ids, skip_special_tokens=skip_special_tokens)
        kwargs.setdefault("clean_up_tokenization_spaces", False)
        return self.hf.decode(ids, skip_special_tokens=skip_special_tokens, **kwargs)

    def convert_ids_to_tokens(self, ids: Any, skip_special_tokens: bool = False) -> Any:
        if isinstance(ids, int):
            return self.hf.convert_ids_to_tokens(ids, skip_special_tokens=skip_special_tokens)
        return list(
            self.hf.convert_ids_to_tokens(list(ids), skip_special_tokens=skip_special_tokens)
        )

    def _template(self, tools: Any, name: str | None = None) -> str:
        tpl = self.chat_template
        if isinstance(tpl, dict):  # named templates (e.g. "default", "tool_use")
            if name is not None and name in tpl:
                return tpl[name]
            tpl = tpl.get("tool_use") if tools and "tool_use" in tpl else tpl.get("default")
        if name is not None:  # not a known name: the template text itself, as HF reads it
            return name
        if not tpl:
            raise ValueError(
                "this model has no chat template; use a completion request, or give a model "
                "whose tokenizer defines chat_template"
            )
        return tpl

    def apply_chat_template(
        self,
        messages: list[dict[str, Any]],
        add_generation_prompt: bool = True,
        tools: list[dict[str, Any]] | None = None,
        *,
        chat_template: str | None = None,
        chat_template_content_format: str | None = None,
        **kw: Any,
    ) -> Any:
        """Render the model's chat template (or ``chat_template``: a name or the template
        text) in a sandboxed Jinja environment; other keywords become template variables.
        ``chat_template_content_format`` (vLLM's; default: this tokenizer's
        ``chat_template_content_format``, "auto"): a message's content reaches the template as
        one string ("string"), as a list of ``{"type": "text", "text": ...}`` parts
        ("openai"), or as the template reads it ("auto": a template that loops over
        ``message['content']`` gets parts).

        Given one of HF's own options (``tokenize=True``, ``continue_final_message``,
        ``return_dict``, ...), HF's apply_chat_template answers, with the same template.
        """
        template = self._template(tools, chat_template)
        content_format = chat_template_content_format or self.chat_template_content_format
        hf_options = {k: kw.pop(k) for k in _HF_CHAT_OPTIONS & kw.keys()}
        tokenize = hf_options.pop("tokenize", False)
        if tokenize or hf_options:
            convo = messages
            if messages and isinstance(messages[0], dict):
                convo = with_content_format(messages, content_format, template)
            return self.hf.apply_chat_template(
                convo, tools=tools, chat_template=template, tokenize=tokenize,
                add_generation_prompt=add_generation_prompt, **hf_options, **kw,
            )  # fmt: skip
        special = {
            name: getattr(self.hf, name, None)
            for name in ("bos_token", "eos_token", "unk_token", "pad_token")
        }
        return render_chat_template(
            template,
            messages,
            add_generation_prompt=add_generation_prompt,
            tools=tools,
            special_tokens=special,
            content_format=content_format,
            **kw,
        )


def _from_folder(folder: Path) -> Any:
    from transformers import AutoTokenizer

    try:
        hf = AutoTokenizer.from_pretrained(str(folder), local_files_only=True)
    except Exception as e:  # transformers raises OSError/ValueError/KeyError/...
        raise ValueError(f"cannot load a tokenizer from {folder}: {e}") from None
    if not getattr(hf, "is_fast", False):
        raise ValueError(f"{folder}: only fast (tokenizer.json) tokenizers are supported")
    return hf


def _from_gguf(path: Path, cache_dir: Path | None = None) -> Any:
    cached = entry_dir(path, "gguf-tokenizer", cache_dir)
    if (cached / "tokenizer.json").is_file():
        return _from_folder(cached)

    from transformers import AutoTokenizer

    logger.info("converting the tokenizer of %s (cached in %s)", path.name, cached)
    try:
        hf = AutoTokenizer.from_pretrained(
            str(path.parent), gguf_file=path.name, local_files_only=True
        )
    except Exception as e:  # transformers raises many types for a bad file
        if "is not supported yet" not in str(e):
            raise ValueError(f"cannot build a tokenizer from GGUF file {path}: {e}") from None
        # an architecture transformers' GGUF config reader lacks (Gemma 1): the tokenizer
        # alone is built from the file's tokenizer.ggml.* fields
        from transformers import PreTrainedTokenizerFast

        try:
            hf = PreTrainedTokenizerFast.from_pretrained(
                str(path.parent), gguf_file=path.name, local_files_only=True
            )
        except Exception as e2:
            raise ValueError(f"cannot build a tokenizer from GGUF file {path}: {e2}") from None
    try:
        build_entry(cached, lambda tmp: hf.save_pretrained(str(tmp)))
    except OSError as e:  # read-only or full cache folder: works, only slower next time
        logger.warning("cannot cache the tokenizer of %s in %s: %s", path.name, cached, e)
    return hf


def load_tokenizer(src: ModelSource, cache_dir: Path | None = None) -> Tokenizer:
    """The tokenizer of a model source (HF folder files, or GGUF metadata via the cache).

    Its ``eos_token_ids`` also hold the model's own end ids (config.json and
    generation_config.json eos lists, GGUF eos/eot ids): chat models often end a turn with
    a token other than the tokenizer's eos (Llama 3's <|eot_id|>).
    """
    from modelport.loader import load_model_config
    from modelport.loader.hf import read_generation_eos

    if src.kind == "gguf":
        hf = _from_gguf(src.path, cache_dir)
        return Tokenizer(hf, load_model_config(src).eos_token_ids)
    hf = _from_folder(src.path)
    model_eos = load_model_config(src).eos_token_ids
    return Tokenizer(hf, (*model_eos, *read_generation_eos(src.path)))
