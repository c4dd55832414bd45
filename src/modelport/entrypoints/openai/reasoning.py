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
- mistral (Magistral): `[THINK]` ... `[/THINK]`; no generated `[THINK]`: all content.
- glm45 (GLM-4.5): `<think>` ... `</think>`, both generated; no `<think>`: all content.
- granite (Granite 3.x): the phrases "Here is my thought process:" / "Here is my response:"
  (see GraniteReasoningParser for where vLLM's stream and non-streamed answer differ).
- deepseek_v3 (DeepSeek-V3.1/3.2): deepseek_r1's rules when chat_template_kwargs has
  `thinking: true`; otherwise all content.
- seed_oss (Seed-OSS): deepseek_r1's rules with `<seed:think>` ... `</seed:think>`.
- hunyuan_a13b (Hunyuan-A13B): `<think>` ... `</think>` then `<answer>` ... `</answer>`,
  the content being the answer's body.

Structured outputs (and tool_choice naming a function or "required"), as vLLM's: the engine
lets the reasoning run unconstrained and starts the grammar after `</think>` (or from the first
token when the prompt ended the reasoning), so a constrained answer is split like any other
(engine/structured_output.py; `--structured-outputs-config '{"enable_in_reasoning": true}'`
constrains the thinking too).
"""

from __future__ import annotations

import contextlib
import re
import weakref
from collections.abc import Sequence
from dataclasses import dataclass, field
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
    chat_template_kwargs (qwen3's enable_thinking). START/END are its tags, each one token
    of the vocabulary (None: the parser reads phrases, not tokens)."""

    name = ""
    START: str | None = START
    END: str | None = END

    def __init__(self, chat_template_kwargs: dict[str, Any] | None = None) -> None:
        self.chat_template_kwargs = dict(chat_template_kwargs or {})

    def thinking_enabled(self) -> bool:
        return True

    def prompt_ends(self, prompt: str | None) -> bool:
        """The prompt already ended the reasoning: the answer is all content."""
        return prompt_ends_reasoning(prompt)

    def split(self, text: str, final: bool) -> tuple[str | None, str]:
        """(reasoning, content) of the text so far; reasoning None when the text is not
        (or not yet known to be) reasoning. Both only grow as the text grows; a tag that
        may be arriving is held back until `final`. The think-tag rules (deepseek_r1,
        qwen3, and seed_oss's own tags): the opening tag may be in the prompt."""
        start, end_tag = self.START or START, self.END or END
        stripped = text.lstrip()
        if stripped.startswith(start):
            body = stripped[len(start):]  # a generated opening tag is dropped
        elif not final and start.startswith(stripped):
            return None, ""  # blank so far, or "<think>" arriving: undecided
        else:
            body = text  # the opening tag was in the prompt
        end = body.find(end_tag)
        if end >= 0:
            return body[:end], body[end + len(end_tag):]
        if final:
            return body, ""  # no end tag: all of it is reasoning (vLLM: truncated thinking)
        return body[: len(body) - _partial_at_end(body, end_tag)], ""

    def extract(self, text: str) -> tuple[str | None, str | None]:
        """vLLM's non-streaming (reasoning, content): content None when empty after
        reasoning; reasoning None when there is none (then content is the text as is)."""
        reasoning, content = self.split(text, final=True)
        if reasoning is None:
            return None, content
        return reasoning, content or None

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


class MistralReasoningParser(ReasoningParser):
    """Magistral / Mistral: `[THINK]` ... `[/THINK]`, each one token. As vLLM: without a
    generated [THINK] the answer is all content (a stray [/THINK] is dropped); text before
    [THINK] is content, and with no [/THINK] after it the rest is reasoning. The prompt
    does not decide (Mistral's system prompts may themselves hold the tags)."""

    name = "mistral"
    START, END = "[THINK]", "[/THINK]"

    def prompt_ends(self, prompt: str | None) -> bool:
        return False

    def split(self, text: str, final: bool) -> tuple[str | None, str]:
        start, end = self.START, self.END
        b = text.find(start)
        if b < 0:
            e = text.find(end)
            content = text if e < 0 else text[:e] + text[e + len(end):]
            if not final:
                content = content[: len(content) - max(_partial_at_end(content, start),
                                                        _partial_at_end(content, end))]
            return None, content
        before, body = text[:b], text[b + len(start):]
        e = body.find(end)
        if e >= 0:
            return body[:e], before + body[e + len(end):]
        if not final:
            body = body[: len(body) - _partial_at_end(body, end)]
        return body, before


class GraniteReasoningParser(ReasoningParser):
    """IBM Granite 3.x: plain phrases, not tokens: "Here is my thought process:" (or
    "Here's ...") opens the thinking and "Here is my response:" (or "Here's ...") the
    answer. As vLLM: a stream is reasoning only when it opens with the first phrase (else all
    content), and a non-streamed answer is split only when it holds both phrases (else it
    is all content, text before the first phrase dropped). The engine cannot see a phrase
    in token ids, so structured outputs constrain from the first token (REASONING_TAGS)."""

    name = "granite"
    START = END = None
    THINK = ("Here's my thought process:", "Here is my thought process:")
    RESPONSE = ("Here's my response:", "Here is my response:")
    _PATTERN = re.compile(r"(?:Here's|Here is) my thought process:(.*?)"
                          r"(?:Here's|Here is) my response:(.*)", re.DOTALL)

    def prompt_ends(self, prompt: str | None) -> bool:
        return False

    def count_reasoning_tokens(self, token_ids: Sequence[int], start_id: int,
                               end_id: int) -> int:
        return 0  # vLLM: parsers without think tokens count none

    def split(self, text: str, final: bool) -> tuple[str | None, str]:
        think = next((t for t in self.THINK if text.startswith(t)), None)
        if think is None:
            if not final and any(t.startswith(text) for t in self.THINK):
                return None, ""  # the phrase may be arriving
            return None, text
        body = text[len(think):]
        found = [(i, r) for r in self.RESPONSE if (i := body.find(r)) >= 0]
        if found:
            i, r = min(found)
            return body[:i], body[i + len(r):]
        if not final:
            body = body[: len(body) - max(_partial_at_end(body, r) for r in self.RESPONSE)]
        return body, ""

    def extract(self, text: str) -> tuple[str | None, str | None]:
        m = self._PATTERN.search(text)
        if m is None:
            return None, text
        return m.group(1), m.group(2) or None


class Glm45ReasoningParser(ReasoningParser):
    """GLM-4.5 / 4.6: `<think>` ... `</think>`, the opening tag generated (the template
    writes `<think></think>` into the prompt when thinking is off). As vLLM: a stream is
    content until `<think>`, reasoning until `</think>`, then content; a non-streamed
    answer is split only when it holds both tags (else all content), text before `<think>`
    dropped. The engine ends the reasoning at a `</think>` after the last `<|assistant|>`
    (REASONING_TAGS), so the tokenizer needs all three tokens, as vLLM's parser does."""

    name = "glm45"

    def prompt_ends(self, prompt: str | None) -> bool:
        return False  # decided by the answer's own tags

    def split(self, text: str, final: bool) -> tuple[str | None, str]:
        b = text.find(START)
        if b < 0:
            return None, text if final else text[: len(text) - _partial_at_end(text, START)]
        before, body = text[:b], text[b + len(START):]
        e = body.find(END)
        if e >= 0:
            return body[:e], before + body[e + len(END):]
        return (body if final else body[: len(body) - _partial_at_end(body, END)]), before

    def extract(self, text: str) -> tuple[str | None, str | None]:
        if START not in text or END not in text:
            return None, text
        body = text.partition(START)[2]
        if END not in body:
            return None, body
        reasoning, _, content = body.partition(END)
        return reasoning, content or None


class DeepSeekV3ReasoningParser(DeepSeekR1ReasoningParser):
    """DeepSeek-V3.1 / V3.2 (hybrid thinking): as vLLM, the answer is reasoning only when the
    request turns thinking on (chat_template_kwargs `{"thinking": true}`, which the template
    reads; `enable_thinking` is taken too), then split as deepseek_r1's; otherwise it is all
    content."""

    name = "deepseek_v3"

    def thinking_enabled(self) -> bool:
        kw = self.chat_template_kwargs
        return bool(kw.get("thinking", kw.get("enable_thinking", False)))


class SeedOssReasoningParser(ReasoningParser):
    """ByteDance Seed-OSS: `<seed:think>` ... `</seed:think>`, each one token, with
    deepseek_r1's rules (the opening tag may be in the prompt; without the end tag all of the
    text is reasoning; a prompt whose last tag is the end tag leaves the answer to content)."""

    name = "seed_oss"
    START, END = "<seed:think>", "</seed:think>"

    def prompt_ends(self, prompt: str | None) -> bool:
        return bool(prompt) and prompt.rfind(self.END) > prompt.rfind(self.START)


def _inner(body: str, close: str, final: bool) -> tuple[str, int]:
    """The text of an element whose body starts at `body` and ends at `close`, less one
    newline after the opening tag and one before `close` (Hunyuan writes each tag on its own
    line), and where the text after `close` starts (-1 while it is open; what may be `close`
    or the newline before it arriving is held back until `final`)."""
    skip = 1 if body.startswith("\n") else 0
    body = body[skip:]
    e = body.find(close)
    if e >= 0:
        inner = body[:e]
        return (inner[:-1] if inner.endswith("\n") else inner), skip + e + len(close)
    if final:
        return body, -1
    held = max(_partial_at_end(body, "\n" + close), _partial_at_end(body, close))
    return body[: len(body) - held], -1


class HunyuanA13BReasoningParser(ReasoningParser):
    """Tencent Hunyuan-A13B: `<think>` reasoning `</think>`, then the answer in `<answer>`
    ... `</answer>`, each tag on its own line; the content is the answer's body (text after
    `</answer>` dropped). Without `<think>` (fast thinking: the template closed it in the
    prompt) the answer is all content, its `<answer>` tags dropped; a text with neither tag
    is content as is; no `</think>`: all of it is reasoning. The tags are several tokens
    each in Hunyuan's vocabulary, so the parser reads text only, as granite's: the engine
    cannot see the end of the reasoning, and structured outputs constrain from the first
    token (REASONING_TAGS)."""

    name = "hunyuan_a13b"
    START = END = None
    THINK, THINK_END, ANSWER, ANSWER_END = "<think>", "</think>", "<answer>", "</answer>"

    def prompt_ends(self, prompt: str | None) -> bool:
        return False  # decided by the answer's own tags

    def count_reasoning_tokens(self, token_ids: Sequence[int], start_id: int,
                               end_id: int) -> int:
        return 0  # no single-token tags to count by, as granite

    def split(self, text: str, final: bool) -> tuple[str | None, str]:
        stripped = text.lstrip()
        if stripped.startswith(self.THINK):
            reasoning, after = _inner(stripped[len(self.THINK):], self.THINK_END, final)
            if after < 0:
                return reasoning, ""
            return reasoning, self._answer(stripped[len(self.THINK):][after:], final)
        if not final and (self.THINK.startswith(stripped) or self.ANSWER.startswith(stripped)):
            return None, ""  # a tag may be arriving
        return None, self._answer(text, final)

    def _answer(self, text: str, final: bool) -> str:
        stripped = text.lstrip()
        if stripped.startswith(self.ANSWER):
            return _inner(stripped[len(self.ANSWER):], self.ANSWER_END, final)[0]
        if not final and self.ANSWER.startswith(stripped):
            return ""
        return text


REASONING_PARSERS: dict[str, type[ReasoningParser]] = {
    DeepSeekR1ReasoningParser.name: DeepSeekR1ReasoningParser,
    Qwen3ReasoningParser.name: Qwen3ReasoningParser,
    MistralReasoningParser.name: MistralReasoningParser,
    GraniteReasoningParser.name: GraniteReasoningParser,
    Glm45ReasoningParser.name: Glm45ReasoningParser,
    DeepSeekV3ReasoningParser.name: DeepSeekV3ReasoningParser,
    SeedOssReasoningParser.name: SeedOssReasoningParser,
    HunyuanA13BReasoningParser.name: HunyuanA13BReasoningParser,
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
    """The ids of the parser's tags (`<think>` and `</think>`; mistral's `[THINK]` and
    `[/THINK]`), each one token of the tokenizer's vocabulary; (-1, -1) for a parser that
    reads phrases (granite), which any tokenizer serves.

    vLLM's think-tag parsers (BaseThinkingReasoningParser) look both up in the vocabulary
    when they are made and refuse a tokenizer that lacks either, so the server does not
    start; this server's parsers read text, but refuse the same tokenizers, with vLLM's
    message. The ids also count usage's reasoning_tokens.
    """
    cls = REASONING_PARSERS.get(name, ReasoningParser)
    if cls.START is None or cls.END is None:
        return -1, -1
    tags = (cls.START, cls.END)
    try:
        return _THINK_IDS[tokenizer][tags]
    except (KeyError, TypeError):
        pass
    vocab = tokenizer.get_vocab()  # the added tokens too
    start, end = vocab.get(tags[0]), vocab.get(tags[1])
    if start is None or end is None:
        who = "Mistral" if cls is MistralReasoningParser else cls.__name__
        raise RuntimeError(
            f"{who} reasoning parser could not locate think start/end tokens in "
            "the tokenizer!"
        )
    with contextlib.suppress(TypeError):  # a vocabulary is read once per tokenizer
        _THINK_IDS.setdefault(tokenizer, {})[tags] = (start, end)
    return start, end


_THINK_IDS: weakref.WeakKeyDictionary[Any, dict[tuple[str, str], tuple[int, int]]] = (
    weakref.WeakKeyDictionary())


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
    # the parser whose rules split the text (None: the think-tag rules)
    parser: ReasoningParser | None = field(default=None, compare=False)

    @staticmethod
    def for_request(parser: ReasoningParser, prompt: str | None, include: bool) -> ReasoningPlan:
        parse = parser.thinking_enabled() and not parser.prompt_ends(prompt)
        return ReasoningPlan(parse=parse, include=include, parser=parser)

    def split(self, text: str, final: bool) -> tuple[str | None, str]:
        """The parser's split (ReasoningParser.split) of the text so far; all of it is
        content when the plan does not parse."""
        if not self.parse:
            return None, text
        return (self.parser or _THINK_TAGS).split(text, final)

    def extract(self, text: str) -> tuple[str | None, str | None]:
        """vLLM's non-streaming (reasoning, content) (ReasoningParser.extract)."""
        if not self.parse:
            return None, text
        return (self.parser or _THINK_TAGS).extract(text)


_THINK_TAGS = ReasoningParser()


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
