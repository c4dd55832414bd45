"""vLLM's prompt types (``vllm.inputs``) for code written against them: typed dicts, so a
``TokensPrompt(prompt_token_ids=[...])`` is the plain dict ``LLM.generate`` already takes.
The keys modelport has no feature for (multimodal data, prompt embeddings, ...) are refused
when the prompt is used (frontend/prompts.py), not here."""

from __future__ import annotations

from typing import TypedDict

from modelport.frontend.prompts import PromptInput

PromptType = PromptInput

__all__ = ["PromptType", "TextPrompt", "TokensPrompt"]


class TextPrompt(TypedDict):
    prompt: str


class _TokenIds(TypedDict):
    prompt_token_ids: list[int]


class TokensPrompt(_TokenIds, total=False):
    prompt: str  # the text the ids came from (optional), echoed in the output
