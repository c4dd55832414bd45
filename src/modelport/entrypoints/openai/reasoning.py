"""Reasoning outputs (vLLM's --reasoning-parser): a reasoning model's thinking, written
between `<think>` and `</think>`, is returned as `message.reasoning` apart from `content`
(streamed as `delta.reasoning`). `reasoning` is the field current vLLM emits; its older name
`reasoning_content` was removed from vLLM in 2026, so it is not sent.

The parsers read text, not token ids, so a tag split over several tokens or stream deltas
is found all the same. As with the tool parsers, one `split` serves streaming and
non-streaming: it says which part of the text so far is certainly reasoning and which is
certainly content (a tag that may still be arriving is held back), so a stream's deltas
reassemble to exactly the non-streaming answer.

vLLM's rules, per parser:
- deepseek_r1 (DeepSeek-R1, QwQ): everything up to `</think>` is reasoning; the opening
  `<think>` may be in the prompt (the chat template writes it), so it need not be generated
  (a generated one is dropped); without `</think>` all of the text is reasoning.
- qwen3: the same, but with `chat_template_kwargs: {"enable_thinking": false}` the answer is
  all content (the template then closes the thinking block in the prompt).
Either way, a prompt whose last think tag is `</think>` (reasoning already ended there)
leaves the whole answer to content, as vLLM does.

Structured outputs (and tool_choice naming a function or "required"), as vLLM's: the engine
lets the reasoning run unconstrained and starts the grammar after `</think>` (or from the first
token when the prompt ended the reasoning), so a constrained answer is split like any other
(engine/structured_output.py; `--structured-outputs-config '{"enable_in_reasoning": true}'`
constrains the thinking too).
"""

from __future__ import annotations

import contextlib
import weakref
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

START, END = "<think>", "</think>"


def _partial_at_end(text: str, marker: str) -> int:
    """Length of the longest suffix of `text` that is a proper prefix of `marker`."""
    for n in range(min(len(marker) - 1, len(text)), 0, -1):
        if text.endswith(marker[:n]):
            return n
    return 0


class ReasoningParser:
    """One model family's rules; `thinking_enabled` comes from the request's
    chat_template_kwargs (qwen3's enable_thinking)."""

    name = ""

    def __init__(self, chat_template_kwargs: dict[str, Any] | None = None) -> None:
        self.chat_template_kwargs = dict(chat_template_kwargs or {})

    def thinking_enabled(self) -> bool:
        return True

    def count_reasoning_tokens(self, token_ids: Sequence[int], start_id: int,
                               end_id: int) -> int:
        """usage.completion_tokens_details.reasoning_tokens, by token ids as vLLM counts
        (BaseThinkingReasoningParser): the tokens inside start/end tag spans, tags excluded;
        a stray end tag does not count below zero."""
        count = depth = 0
        for t in token_ids:
            if t == start_id:
                depth += 1
            elif t == end_id:
                depth = max(depth - 1, 0)
            elif depth:
                count += 1
        return count


class DeepSeekR1ReasoningParser(ReasoningParser):
    name = "deepseek_r1"

    def count_reasoning_tokens(self, token_ids: Sequence[int], start_id: int,
                               end_id: int) -> int:
        # vLLM's DeepSeekR1ReasoningParser: the opening tag is usually in the prompt, so
        # without a generated one the tokens before the end tag count; no end tag: 0
        if start_id in token_ids:
            return super().count_reasoning_tokens(token_ids, start_id, end_id)
        ids = list(token_ids)
        return ids.index(end_id) if end_id in ids else 0


class Qwen3ReasoningParser(ReasoningParser):
    name = "qwen3"

    def thinking_enabled(self) -> bool:
        # Qwen3 thinks by default; only an explicit enable_thinking: false turns it off
        return self.chat_template_kwargs.get("enable_thinking", True) is not False


REASONING_PARSERS: dict[str, type[ReasoningParser]] = {
    DeepSeekR1ReasoningParser.name: DeepSeekR1ReasoningParser,
    Qwen3ReasoningParser.name: Qwen3ReasoningParser,
}


def get_reasoning_parser(
    name: str, chat_template_kwargs: dict[str, Any] | None = None
) -> ReasoningParser:
    try:
        cls = REASONING_PARSERS[name]
    except KeyError:
        raise ValueError(
            f"unknown reasoning parser {name!r}; choose from {', '.join(sorted(REASONING_PARSERS))}"
        ) from None
    return cls(chat_template_kwargs)


def think_token_ids(name: str, tokenizer: Any) -> tuple[int, int]:
    """The ids of `<think>` and `</think>`, each one token of the tokenizer's vocabulary.

    vLLM's think-tag parsers (BaseThinkingReasoningParser) look both up in the vocabulary
    when they are made and refuse a tokenizer that lacks either, so the server does not
    start; this server's parsers read text, but refuse the same tokenizers, with vLLM's
    message. The ids also count usage's reasoning_tokens.
    """
    try:
        return _THINK_IDS[tokenizer]
    except (KeyError, TypeError):
        pass
    vocab = tokenizer.get_vocab()  # the added tokens too
    start, end = vocab.get(START), vocab.get(END)
    if start is None or end is None:
        cls = REASONING_PARSERS.get(name, ReasoningParser)
        raise RuntimeError(
            f"{cls.__name__} reasoning parser could not locate think start/end tokens in "
            "the tokenizer!"
        )
    with contextlib.suppress(TypeError):  # a vocabulary is read once per tokenizer
        _THINK_IDS[tokenizer] = (start, end)
    return start, end


_THINK_IDS: weakref.WeakKeyDictionary[Any, tuple[int, int]] = weakref.WeakKeyDictionary()


def prompt_ends_reasoning(prompt: str | None) -> bool:
    """The prompt already closed a thinking block (its last think tag is `</think>`), as
    Qwen3's template does for enable_thinking: false: the answer is all content."""
    if not prompt:
        return False
    return prompt.rfind(END) > prompt.rfind(START)


@dataclass(frozen=True)
class ReasoningPlan:
    """How one request's answers are split.

    parse: False when the answer is all content: thinking off, or ended in the prompt.
    include: the request's include_reasoning (false: the reasoning is dropped).
    """

    parse: bool = True
    include: bool = True

    @staticmethod
    def for_request(parser: ReasoningParser, prompt: str | None, include: bool) -> ReasoningPlan:
        parse = parser.thinking_enabled() and not prompt_ends_reasoning(prompt)
        return ReasoningPlan(parse=parse, include=include)

    def split(self, text: str, final: bool) -> tuple[str | None, str]:
        """(reasoning, content) of the text so far; reasoning None when the text is not
        (or not yet known to be) reasoning. Both only grow as the text grows; a tag that
        may be arriving is held back until `final`."""
        if not self.parse:
            return None, text
        stripped = text.lstrip()
        if stripped.startswith(START):
            body = stripped[len(START):]  # a generated opening tag is dropped
        elif not final and START.startswith(stripped):
            return None, ""  # blank so far, or "<think>" arriving: undecided
        else:
            body = text  # the opening tag was in the prompt
        end = body.find(END)
        if end >= 0:
            return body[:end], body[end + len(END):]
        if final:
            return body, ""  # no end tag: all of it is reasoning (vLLM: truncated thinking)
        return body[: len(body) - _partial_at_end(body, END)], ""

    def extract(self, text: str) -> tuple[str | None, str | None]:
        """vLLM's non-streaming (reasoning, content): content None when empty after
        reasoning; reasoning None when there is none (then content is the text as is)."""
        reasoning, content = self.split(text, final=True)
        if reasoning is None:
            return None, content
        return reasoning, content or None


class ReasoningStreamer:
    """One choice's stream: successive texts -> (reasoning delta, content so far)."""

    def __init__(self, plan: ReasoningPlan) -> None:
        self.plan = plan
        self._reasoning_sent = 0

    def feed(self, text: str, final: bool) -> tuple[str, str]:
        reasoning, content = self.plan.split(text, final)
        reasoning = reasoning or ""
        fresh = reasoning[self._reasoning_sent:]
        self._reasoning_sent = len(reasoning)
        return fresh, content
