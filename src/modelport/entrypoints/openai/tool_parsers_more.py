"""More tool-call formats (vLLM's --tool-call-parser names) written as JSON: mistral,
deepseek_v3, granite, phi4_mini_json and internlm (pythonic / llama4_pythonic and
qwen3_coder have modules of their own).

Each follows the contract of tool_parsers.py: one `scan(text, final)` says which text is
certainly content, which calls are complete, and which call is being written (its name and
the settled prefix of its final `arguments`), so streamed pieces reassemble to exactly the
non-streaming answer. What counts as a call, and what is content around it, is vLLM's rule
for that parser (noted per class, with the few places where this one differs). Formats whose
arguments vLLM returns as written (Mistral's `name{...}` form, DeepSeek-V3) stream the raw
text; the others stream re-serialized JSON.
"""

from __future__ import annotations

import json
import random
import re
import string
from collections.abc import Callable
from typing import Any

from modelport.entrypoints.openai.tool_parsers import (
    PARSERS,
    ParsedCall,
    PartialCall,
    Scan,
    ToolParser,
    _partial_marker_at_end,
    _skip_ws,
    dump_json,
    emit_json,
    loads,
    partial_call,
)


def _hold(text: str, final: bool, *markers: str) -> str:
    """`text` less a tail that may be the start of one of `markers` (nothing once final)."""
    if final:
        return text
    n = max(_partial_marker_at_end(text, m) for m in markers)
    return text[: len(text) - n]


def _scan_array(
    text: str, i: int, make: Callable[[Any, int], ParsedCall | None], arg_keys: tuple[str, ...]
) -> tuple[list[ParsedCall], PartialCall | None, int | None]:
    """The calls of the JSON array that opens at text[i] ("["): (complete calls, the call
    being written, where the array ends or None while it is open). ValueError when it is
    not (the start of) an array of call objects."""
    calls: list[ParsedCall] = []
    pos = _skip_ws(text, i + 1)
    if pos < len(text) and text[pos] == "]":
        return calls, None, pos + 1
    while True:
        if pos >= len(text):
            return calls, None, None
        if text[pos] != "{":
            raise ValueError("expected a call object")
        _, end = emit_json(text, pos)
        if end is None:
            return calls, partial_call(text, pos, arg_keys), None
        call = make(loads(text[pos:end]), pos)
        if call is None:
            raise ValueError("not a call")
        calls.append(call)
        pos = _skip_ws(text, end)
        if pos >= len(text):
            return calls, None, None
        if text[pos] == "]":
            return calls, None, pos + 1
        if text[pos] != ",":
            raise ValueError("expected ','")
        pos = _skip_ws(text, pos + 1)


# ---------------------------------------------------------------- mistral

_ALNUM = string.ascii_letters + string.digits


class MistralToolParser(ToolParser):
    """Mistral: content, then `[TOOL_CALLS]` and either a JSON array of
    {"name", "arguments"} objects (tokenizers before v11) or, from v11, one
    `[TOOL_CALLS]name{...}` per call (`name[ARGS]{...}` as HF tokenizers write v13's
    [ARGS] token). vLLM picks the form by tokenizer version; here it is read from the text
    (an array opens with "["). vLLM's rules: in the name form a call's arguments are the
    text from "{" to the next [TOOL_CALLS] (or the end) as written, even if not JSON, and a
    segment with no "{" is skipped; the array form may be followed by other text. Call ids
    are 9 letters and digits, as Mistral's templates require."""

    name = "mistral"
    BOT, ARGS = "[TOOL_CALLS]", "[ARGS]"
    KEEP_SPECIAL_TOKENS = True

    def call_id(self) -> str | None:
        return "".join(random.choices(_ALNUM, k=9))

    def scan(self, text: str, final: bool) -> Scan:
        start = text.find(self.BOT)
        if start < 0:
            return Scan(_hold(text, final, self.BOT))
        head = text[:start]
        at = _skip_ws(text, start + len(self.BOT))
        if at >= len(text):
            return Scan(head)
        if text[at] == "[":
            return self._array(text, head, at, final)
        return self._named(text, head, start, final)

    def _array(self, text: str, head: str, at: int, final: bool) -> Scan:
        def make(obj: Any, pos: int) -> ParsedCall | None:
            if not isinstance(obj, dict) or not isinstance(obj.get("name"), str):
                return None
            return ParsedCall(obj["name"], dump_json(obj.get("arguments", {})), pos)

        try:
            calls, partial, end = _scan_array(text, at, make, ("arguments",))
        except ValueError:
            calls, partial, end = [], None, -1
        if end is not None and end >= 0 or not final:
            return Scan(head, calls, None if final else partial)
        # not a complete array: vLLM's fallback takes the widest "[{...}]" in the text
        m = re.search(r"\[\{.*\}\]", text[at:], re.DOTALL)
        if m is not None:
            try:
                found = _scan_array(m.group(), 0, make, ("arguments",))
            except ValueError:
                found = None
            if found is not None and found[2] == len(m.group()):
                return Scan(
                    head,
                    [ParsedCall(c.name, c.arguments, c.start + at + m.start()) for c in found[0]],
                )
        return Scan(text)  # malformed: all of it is content

    def _named(self, text: str, head: str, start: int, final: bool) -> Scan:
        out = Scan(head)
        pos = start
        while pos >= 0:
            seg_at = pos + len(self.BOT)
            nxt = text.find(self.BOT, seg_at)
            last = nxt < 0
            seg = text[seg_at:] if last else text[seg_at:nxt]
            brace = seg.find("{")
            if brace >= 0:
                name = seg[:brace].replace(self.ARGS, "")
                if last and not final:  # still being written: hold a [TOOL_CALLS] arriving
                    args = _hold(seg[brace:], False, self.BOT)
                    out.partial = PartialCall(seg_at, name, args)
                else:
                    out.calls.append(ParsedCall(name, seg[brace:], seg_at))
            pos = nxt
        return out

    def parse(self, text: str) -> tuple[str | None, list[ParsedCall]]:
        content, calls = super().parse(text)
        if not calls and self.BOT in text and self.scan(text, True).content != text:
            # vLLM: [TOOL_CALLS] without a usable call leaves the text before it
            return (text[: text.find(self.BOT)] or None), []
        return content, calls


# ---------------------------------------------------------------- deepseek_v3

_DS_CALLS_BEGIN = "<｜tool▁calls▁begin｜>"
_DS_CALL_BEGIN, _DS_SEP, _DS_CALL_END = (
    "<｜tool▁call▁begin｜>",
    "<｜tool▁sep｜>",
    "<｜tool▁call▁end｜>",
)
_DS_JSON_OPEN, _DS_JSON_CLOSE = "\n```json\n", "\n```" + _DS_CALL_END
# one call: type, name and arguments each on one line (vLLM's pattern has no DOTALL)
_DS_CALL = re.compile(
    re.escape(_DS_CALL_BEGIN)
    + r"(?P<type>.*)"
    + re.escape(_DS_SEP)
    + r"(?P<name>.*)"
    + re.escape(_DS_JSON_OPEN)
    + r"(?P<args>.*)"
    + re.escape(_DS_JSON_CLOSE)
)


class DeepSeekV3ToolParser(ToolParser):
    """DeepSeek-V3's calls:

        <｜tool▁calls▁begin｜><｜tool▁call▁begin｜>function<｜tool▁sep｜>get_weather
        ```json
        {"city": "Paris"}
        ```<｜tool▁call▁end｜><｜tool▁calls▁end｜>

    As vLLM: the content is the text before <｜tool▁calls▁begin｜>; the arguments are
    returned as the model wrote them (on one line); a call that does not match the pattern
    is dropped, and text after the calls is not content."""

    name = "deepseek_v3"

    def scan(self, text: str, final: bool) -> Scan:
        begin = text.find(_DS_CALLS_BEGIN)
        if begin < 0:
            return Scan(_hold(text, final, _DS_CALLS_BEGIN))
        out = Scan(text[:begin])
        pos = begin
        for m in _DS_CALL.finditer(text, begin):
            out.calls.append(ParsedCall(m["name"], m["args"], m.start()))
            pos = m.end()
        if final:
            return out
        open_at = text.rfind(_DS_CALL_BEGIN)
        if open_at < pos or text.find(_DS_CALL_END, open_at) >= 0:
            return out
        head = text[open_at + len(_DS_CALL_BEGIN) :]
        sep = head.find(_DS_SEP)
        if sep < 0 or "\n" in head[:sep]:
            return out
        rest = head[sep + len(_DS_SEP) :]
        nl = rest.find("\n")
        if nl < 0 or not rest.startswith(_DS_JSON_OPEN, nl):
            return out
        args = rest[nl + len(_DS_JSON_OPEN) :]
        cut = args.find("\n")
        if cut >= 0:
            if not _DS_JSON_CLOSE.startswith(args[cut:]):
                return out  # not this format: nothing more streams
            args = args[:cut]
        out.partial = PartialCall(open_at, rest[:nl], args)
        return out

    def parse(self, text: str) -> tuple[str | None, list[ParsedCall]]:
        if _DS_CALLS_BEGIN not in text:
            return text, []
        s = self.scan(text, final=True)
        content = s.content.rstrip() if s.calls else s.content
        return (content or None), s.calls


# ---------------------------------------------------------------- granite


class GraniteToolParser(ToolParser):
    """Granite 3.0/3.1: the answer is `<|tool_call|>` (3.0's token) or `<tool_call>`
    (3.1's text), then a JSON array of {"name", "arguments"} objects, and nothing else.
    As vLLM: an answer that does not open that way is all content, and one whose rest is
    not a JSON array of calls is all content too."""

    name = "granite"
    MARKERS = ("<|tool_call|>", "<tool_call>")

    def scan(self, text: str, final: bool) -> Scan:
        at = _skip_ws(text, 0)
        for marker in self.MARKERS:
            if text.startswith(marker, at):
                at = _skip_ws(text, at + len(marker))
        if at >= len(text) or (not final and any(m.startswith(text[at:]) for m in self.MARKERS)):
            return Scan(text if final else "")
        if text[at] != "[":
            return Scan(text)

        def make(obj: Any, pos: int) -> ParsedCall | None:
            if not isinstance(obj, dict) or "name" not in obj or "arguments" not in obj:
                return None
            if not isinstance(obj["name"], str):
                return None
            return ParsedCall(obj["name"], dump_json(obj["arguments"]), pos)

        try:
            calls, partial, end = _scan_array(text, at, make, ("arguments",))
        except ValueError:
            return Scan(text if final else "")
        if not final:
            if end is not None and text[end:].strip():
                return Scan("")  # something after the array: the end will tell
            return Scan("", calls, partial)
        if end is None or text[end:].strip() or not calls:
            return Scan(text)
        return Scan("", calls)


# ---------------------------------------------------------------- phi4_mini_json


class Phi4MiniJsonToolParser(ToolParser):
    """Phi-4-mini: `functools[{"name": ..., "arguments": {...}}, ...]` (or "parameters").
    As vLLM: the calls may come anywhere in the text and text after them is dropped.
    Unlike vLLM (whose stream sends nothing and whose non-streamed answer drops it), the
    text before `functools[` is kept as content, and the array is read as JSON, so
    arguments holding arrays work (vLLM cuts the array at its first "]")."""

    name = "phi4_mini_json"
    BOT = "functools["

    def scan(self, text: str, final: bool) -> Scan:
        start = text.find(self.BOT)
        if start < 0:
            return Scan(_hold(text, final, self.BOT))
        head = text[:start]

        def make(obj: Any, pos: int) -> ParsedCall | None:
            if not isinstance(obj, dict) or not isinstance(obj.get("name"), str):
                return None
            for key in ("arguments", "parameters"):
                if key in obj:
                    return ParsedCall(obj["name"], dump_json(obj[key]), pos)
            return None

        try:
            calls, partial, end = _scan_array(
                text, start + len(self.BOT) - 1, make, ("arguments", "parameters")
            )
        except ValueError:
            return Scan(text if final else head)
        if final:
            return Scan(head, calls) if end is not None and calls else Scan(text)
        return Scan(head, calls, partial)


# ---------------------------------------------------------------- internlm

_NON_ASCII = re.compile(r"[^\x00-\x7f]")


def _ascii(s: str) -> str:
    """json.dumps' ensure_ascii escapes on JSON text written without them (non-ASCII
    characters only occur inside its strings)."""
    return _NON_ASCII.sub(lambda m: json.dumps(m.group())[1:-1], s)


class InternLMToolParser(ToolParser):
    """InternLM2/2.5: content, then one call `<|action_start|><|plugin|>{"name": ...,
    "parameters": {...}}<|action_end|>` (or "arguments"). As vLLM: one call per answer, text
    after it dropped, its JSON read from the first "{", and the arguments serialized with
    non-ASCII characters escaped."""

    name = "internlm"
    KEEP_SPECIAL_TOKENS = True
    BOT, EOT = "<|action_start|><|plugin|>", "<|action_end|>"
    ARG_KEYS = ("parameters", "arguments")

    def scan(self, text: str, final: bool) -> Scan:
        start = text.find(self.BOT)
        if start < 0:
            return Scan(_hold(text, final, self.BOT))
        head = text[:start]
        at = text.find("{", start + len(self.BOT))
        stop = text.find(self.EOT, start + len(self.BOT))
        if at < 0 or 0 <= stop < at:
            return Scan(text if final else head)
        body = text[: stop if stop >= 0 else len(text)]
        try:
            _, end = emit_json(body, at)
        except ValueError:
            return Scan(text if final else head)
        if end is None:
            if final or stop >= 0:
                return Scan(text if final else head)
            p = partial_call(body, at, self.ARG_KEYS)
            if p is not None:
                p = PartialCall(p.start, p.name, _ascii(p.arguments))
            return Scan(head, partial=p)
        obj = loads(body[at:end])
        if not isinstance(obj, dict) or not isinstance(obj.get("name"), str):
            return Scan(text if final else head)
        args = next((obj[k] for k in self.ARG_KEYS if k in obj), {})
        return Scan(head, [ParsedCall(obj["name"], _ascii(dump_json(args)), at)])


MORE_PARSERS: dict[str, type[ToolParser]] = {
    cls.name: cls
    for cls in (
        MistralToolParser,
        DeepSeekV3ToolParser,
        GraniteToolParser,
        Phi4MiniJsonToolParser,
        InternLMToolParser,
    )
}
PARSERS.update(MORE_PARSERS)
