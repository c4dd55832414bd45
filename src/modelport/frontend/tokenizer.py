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


def render_chat_template(
    template: str,
    messages: list[dict[str, Any]],
    *,
    add_generation_prompt: bool = True,
    tools: list[dict[str, Any]] | None = None,
    special_tokens: dict[str, str | None] | None = None,
    **kwargs: Any,
) -> str:
    """Render ``messages`` with ``template``; template errors become ValueError."""
    try:
        return _compile(template).render(
            messages=flatten_content(messages),
            add_generation_prompt=add_generation_prompt,
            tools=tools,
            **(special_tokens or {}),
            **kwargs,
        )
    except jinja2.TemplateError as e:
        raise ValueError(f"chat template error: {e}") from None


class Tokenizer:
    """What the frontend needs from a tokenizer, independent of where it came from.

    Decoding never applies ``clean_up_tokenization_spaces``: that legacy rewrite (" ." ->
    ".") would corrupt code and make incremental detokenization disagree with a full decode.
    """

    def __init__(self, hf: Any, extra_eos_token_ids: tuple[int, ...] = ()) -> None:
        self.hf = hf
        eos = [hf.eos_token_id] if hf.eos_token_id is not None else []
        self.eos_token_ids: tuple[int, ...] = tuple(dict.fromkeys([*eos, *extra_eos_token_ids]))
        self.bos_token_id: int | None = hf.bos_token_id
        self.vocab_size: int = len(hf)
        self.chat_template: str | dict | None = getattr(hf, "chat_template", None)
        # a fast tokenizer's Rust object decodes ~5x faster than the Python wrapper around
        # it (which adds only argument conversion when clean-up is off): detokenization runs
        # twice per generated token
        self._rust = getattr(hf, "backend_tokenizer", None) if getattr(hf, "is_fast", False) else None

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return list(self.hf.encode(text, add_special_tokens=add_special_tokens))

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        if self._rust is not None:
            return self._rust.decode(list(ids), skip_special_tokens=skip_special_tokens)
        return self.hf.decode(
            list(ids), skip_special_tokens=skip_special_tokens, clean_up_tokenization_spaces=False
        )

    def convert_ids_to_tokens(self, ids: list[int]) -> list[str]:
        return list(self.hf.convert_ids_to_tokens(list(ids)))

    def _template(self, tools: Any) -> str:
        tpl = self.chat_template
        if isinstance(tpl, dict):  # named templates (e.g. "default", "tool_use")
            tpl = tpl.get("tool_use") if tools and "tool_use" in tpl else tpl.get("default")
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
        **kw: Any,
    ) -> str:
        """Render the model's chat template in a sandboxed Jinja environment."""
        special = {
            name: getattr(self.hf, name, None)
            for name in ("bos_token", "eos_token", "unk_token", "pad_token")
        }
        return render_chat_template(
            self._template(tools),
            messages,
            add_generation_prompt=add_generation_prompt,
            tools=tools,
            special_tokens=special,
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
        raise ValueError(f"cannot build a tokenizer from GGUF file {path}: {e}") from None
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
