"""Tool-call parsers for `tool_choice: "auto"` (vLLM's --tool-call-parser): the model writes
its calls in its own format, and the parser finds them in the generated text.

A parser only answers one question: given the text generated so far (and whether it is
final), which part of it is certainly plain content, and which calls are complete. Streaming
and non-streaming use the same `scan`, so a stream's deltas reassemble to exactly the
non-streaming answer; `ToolCallStreamer` turns successive scans into deltas. A call is sent
once it is complete (its JSON closed), while the text around calls streams as content.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

_DECODER = json.JSONDecoder()


@dataclass(frozen=True)
class ParsedCall:
    name: str
    arguments: str  # a JSON object, as a string (OpenAI's function.arguments)


@dataclass
class Scan:
    """What a text holds so far. `content` only grows as the text grows (text that might
    still turn out to be part of a call is held back), and so do `calls`."""

    content: str
    calls: list[ParsedCall] = field(default_factory=list)


def _arguments(value: Any) -> str | None:
    if isinstance(value, str):  # some models write the arguments as a JSON string
        try:
            value = json.loads(value)
        except ValueError:
            return None
    if value is None:
        value = {}
    if not isinstance(value, dict):
        return None
    return json.dumps(value, ensure_ascii=False)


def call_of(obj: Any, *arg_keys: str) -> ParsedCall | None:
    """A call from a decoded {"name": ..., <arg key>: {...}} object; None if it is not one."""
    if not isinstance(obj, dict) or not isinstance(obj.get("name"), str) or not obj["name"]:
        return None
    for key in arg_keys:
        if key in obj:
            args = _arguments(obj[key])
            return None if args is None else ParsedCall(obj["name"], args)
    return ParsedCall(obj["name"], "{}")


def _partial_marker_at_end(text: str, marker: str) -> int:
    """Length of the longest suffix of `text` that is a proper prefix of `marker`."""
    for n in range(min(len(marker) - 1, len(text)), 0, -1):
        if text.endswith(marker[:n]):
            return n
    return 0


class ToolParser:
    """One model family's tool-call format."""

    name = ""

    def scan(self, text: str, final: bool) -> Scan:
        raise NotImplementedError

    def parse(self, text: str) -> tuple[str | None, list[ParsedCall]]:
        """(content, calls) of a finished text: as vLLM, content is None when the model only
        called tools (whitespace around the calls is not content), and the whole text when
        it called none."""
        s = self.scan(text, final=True)
        if not s.calls:
            return text, []
        content = s.content.rstrip()
        return (content or None), s.calls


class HermesToolParser(ToolParser):
    """Hermes / Qwen format: `<tool_call>{"name": ..., "arguments": {...}}</tool_call>`, any
    number of them, with text around. A block whose JSON is not a call stays content; a last
    block left open is a call if its JSON is complete."""

    name = "hermes"
    OPEN, CLOSE = "<tool_call>", "</tool_call>"

    def scan(self, text: str, final: bool) -> Scan:
        out = Scan("")
        pos = 0
        while True:
            start = text.find(self.OPEN, pos)
            if start < 0:
                rest = text[pos:]
                if not final:  # a marker may be arriving
                    rest = rest[: len(rest) - _partial_marker_at_end(rest, self.OPEN)]
                out.content += rest
                return out
            out.content += text[pos:start]
            body_at = start + len(self.OPEN)
            end = text.find(self.CLOSE, body_at)
            if end < 0:
                if not final:
                    return out  # the call is still being written
                body, after = text[body_at:], len(text)
            else:
                body, after = text[body_at:end], end + len(self.CLOSE)
            call = self._call(body)
            if call is None:
                out.content += text[start:after]
            else:
                out.calls.append(call)
            pos = after

    @staticmethod
    def _call(body: str) -> ParsedCall | None:
        try:
            obj = json.loads(body)
        except ValueError:
            return None
        return call_of(obj, "arguments", "parameters")


class Llama3JsonToolParser(ToolParser):
    """Llama 3.x JSON format: `{"name": ..., "parameters": {...}}` objects (or "arguments"),
    several separated by `;`, after `<|python_tag|>` or as the whole answer. Text before the
    tag is content; a run of JSON that is not all calls is content too."""

    name = "llama3_json"
    TAG = "<|python_tag|>"

    def scan(self, text: str, final: bool) -> Scan:
        tag = text.find(self.TAG)
        if tag >= 0:
            head, region = text[:tag], text[tag + len(self.TAG) :]
        elif text.lstrip().startswith("{"):
            head, region = "", text
        else:  # plain text so far; a python tag may still come
            hold = 0 if final else _partial_marker_at_end(text, self.TAG)
            if not final and not text.strip():
                hold = len(text)  # the answer may yet open with "{"
            return Scan(text[: len(text) - hold])
        calls, rest, state = self._calls(region, final)
        if not calls:
            # not (yet) known to be calls: all of it is content once the text is final
            return Scan(text if final else head)
        if state == "stop":  # calls, then something else: that is content
            return Scan(head + region[rest:], calls)
        return Scan(head, calls)

    @staticmethod
    def _calls(region: str, final: bool) -> tuple[list[ParsedCall], int, str]:
        """(calls, where they end, state): state "end" (the region is all calls), "open"
        (a JSON object is still being written) or "stop" (something that is not a call
        starts at the returned position)."""
        calls: list[ParsedCall] = []
        pos = 0
        while True:
            while pos < len(region) and (region[pos].isspace() or region[pos] == ";"):
                pos += 1
            if pos == len(region):
                return calls, pos, "end"
            if region[pos] != "{":
                return calls, pos, "stop"
            try:
                obj, end = _DECODER.raw_decode(region, pos)
            except ValueError:
                return calls, pos, "stop" if final else "open"
            call = call_of(obj, "parameters", "arguments")
            if call is None:
                return calls, pos, "stop"
            calls.append(call)
            pos = end


PARSERS: dict[str, type[ToolParser]] = {
    HermesToolParser.name: HermesToolParser,
    Llama3JsonToolParser.name: Llama3JsonToolParser,
}


def get_parser(name: str) -> ToolParser:
    try:
        return PARSERS[name]()
    except KeyError:
        raise ValueError(
            f"unknown tool call parser {name!r}; choose from {', '.join(sorted(PARSERS))}"
        ) from None


def scan_required(text: str, final: bool) -> Scan:
    """The calls of `tool_choice: "required"` output: a JSON array of {"name", "parameters"}
    objects (the constraint vLLM uses); each call counts once its object is closed."""
    out = Scan("")
    pos = text.find("[")
    if pos < 0:
        return out
    pos += 1
    while True:
        while pos < len(text) and (text[pos].isspace() or text[pos] == ","):
            pos += 1
        if pos >= len(text) or text[pos] != "{":
            return out
        try:
            obj, pos = _DECODER.raw_decode(text, pos)
        except ValueError:
            return out
        call = call_of(obj, "parameters", "arguments")
        if call is not None:
            out.calls.append(call)


class ToolCallStreamer:
    """Turns the growing text of one choice into (content delta, new calls).

    Whitespace is held back until non-space content follows, so a stream's content matches
    `ToolParser.parse` (no trailing whitespace once there are calls); at the end, held
    whitespace is sent only when no call was made (then the content is the text as is).
    """

    def __init__(self, scan: Any) -> None:
        self._scan = scan  # (text, final) -> Scan
        self._content_seen = 0
        self._content_sent = ""
        self._held = ""
        self.calls_sent = 0

    def feed(self, text: str, final: bool) -> tuple[str, list[ParsedCall]]:
        s = self._scan(text, final)
        fresh = s.content[self._content_seen :]
        self._content_seen = len(s.content)
        pending = self._held + fresh
        if final and not s.calls:
            out, self._held = pending, ""
        else:
            body = pending.rstrip()
            out, self._held = body, pending[len(body) :]
        new_calls = s.calls[self.calls_sent :]
        self.calls_sent = len(s.calls)
        return out, new_calls


def history_for_template(messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Messages for a chat template, with earlier calls' arguments as objects: OpenAI sends
    them as JSON strings, while HF chat templates (Llama 3.1, Qwen, Hermes) expect a dict
    (`arguments | tojson`), as vLLM gives them. Arguments that are not a JSON object stay as
    sent. The input is not changed."""
    out = []
    for m in messages:
        calls = m.get("tool_calls") if isinstance(m, dict) else None
        if isinstance(calls, list) and calls:
            m = {**m, "tool_calls": [_with_object_arguments(c) for c in calls]}
        out.append(m)
    return out


def _with_object_arguments(call: Any) -> Any:
    fn = call.get("function") if isinstance(call, dict) else None
    if not isinstance(fn, dict) or not isinstance(fn.get("arguments"), str):
        return call
    try:
        args = json.loads(fn["arguments"])
    except ValueError:
        return call
    if not isinstance(args, dict):
        return call
    return {**call, "function": {**fn, "arguments": args}}
