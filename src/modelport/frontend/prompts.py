"""The prompt forms of vLLM's offline API, reduced to (text, token ids).

A prompt is a string, a list of token ids, or one of vLLM's prompt dicts: a TextPrompt
``{"prompt": str}`` or a TokensPrompt ``{"prompt_token_ids": list[int]}`` (which may carry
the ``"prompt"`` text it came from, for the output). vLLM's other keys name features
modelport does not have; a dict using one is refused with the key named rather than
generating as if it were absent (a prompt whose image is silently dropped still "works").
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

# vLLM's prompt-dict keys with no modelport feature behind them -> what is missing
UNSUPPORTED_KEYS = {
    "multi_modal_data": "multimodal input is not supported",
    "mm_processor_kwargs": "multimodal input is not supported",
    "multi_modal_uuids": "multimodal input is not supported",
    "prompt_embeds": "prompt embeddings are not supported",
    "token_type_ids": "token type ids are not supported",
    "cache_salt": "prefix-cache salts are not supported",
    "encoder_prompt": "encoder-decoder prompts are not supported",
    "decoder_prompt": "encoder-decoder prompts are not supported",
    "data": "data prompts are not supported",
    "data_format": "data prompts are not supported",
}
_KNOWN_KEYS = ("prompt", "prompt_token_ids")

PromptInput = str | list[int] | Mapping[str, Any]  # vLLM's TextPrompt / TokensPrompt dicts


@dataclass(frozen=True)
class ParsedPrompt:
    """``token_ids`` is None when ``text`` still has to be tokenized."""

    text: str | None
    token_ids: list[int] | None


def is_token_ids(value: Any) -> bool:
    return isinstance(value, (list, tuple)) and all(
        isinstance(t, int) and not isinstance(t, bool) for t in value
    )


def parse_prompt(prompt: Any) -> ParsedPrompt:
    """Raises ValueError for anything that is not one of the prompt forms above."""
    if isinstance(prompt, str):
        return ParsedPrompt(prompt, None)
    if isinstance(prompt, Mapping):
        return _parse_dict(prompt)
    if is_token_ids(prompt):
        return ParsedPrompt(None, list(prompt))
    raise ValueError(
        "prompt must be a string, a list of token ids, or a dict with 'prompt' (text) or "
        f"'prompt_token_ids'; got {type(prompt).__name__}"
    )


def _parse_dict(d: Mapping) -> ParsedPrompt:
    for key, value in d.items():
        if key in _KNOWN_KEYS or value is None:  # vLLM reads a None value as absent
            continue
        why = UNSUPPORTED_KEYS.get(key)
        if why is not None:
            raise ValueError(f"prompt key {key!r}: {why}")
        raise ValueError(
            f"unknown prompt key {key!r}: a prompt dict takes 'prompt' (text) or 'prompt_token_ids'"
        )
    text = d.get("prompt")
    ids = d.get("prompt_token_ids")
    if text is None and ids is None:
        raise ValueError(
            "a prompt dict needs 'prompt' (text) or 'prompt_token_ids' (a list of token ids)"
        )
    if text is not None and not isinstance(text, str):
        raise ValueError(f"'prompt' must be a string, got {type(text).__name__}")
    if ids is None:
        return ParsedPrompt(text, None)
    if not is_token_ids(ids):
        raise ValueError("'prompt_token_ids' must be a list of token ids (integers)")
    return ParsedPrompt(text, list(ids))
