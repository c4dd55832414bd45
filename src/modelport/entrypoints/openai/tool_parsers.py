"""Tool-call parsers for `tool_choice: "auto"` (vLLM's --tool-call-parser): the model writes
its calls in its own format, and the parser finds them in the generated text.

A parser only answers one question: given the text generated so far (and whether it is
final), which part of it is certainly plain content, and which calls are complete. Streaming
and non-streaming use the same `scan`, so a stream's deltas reassemble to exactly the
non-streaming answer; `ToolCallStreamer` turns successive scans into deltas. As vLLM, a call
streams while it is written: a first delta with its name once the name is known and its
arguments object has begun, then the arguments as fragments. The fragments are the settled
prefix of the call's final `arguments` string (the arguments re-serialized by `dump_json`):
what could still change (an unfinished string escape, a number or literal still being
written) is held back, so they concatenate to exactly the non-streamed `arguments`. A call
whose name comes after its arguments, or whose arguments are a JSON string, is sent whole
once complete. Limitation (as in vLLM): a call that started streaming but then proves not to
be a call (malformed JSON, or cut off by max_tokens) cannot be taken back.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from json.decoder import scanstring
from typing import Any


class _Obj(dict):
    """A decoded JSON object that also keeps its members in order, duplicates included
    (`pairs`), so that `dump_json` writes back exactly what a stream sent."""

    pairs: list[tuple[str, Any]]


def _obj(pairs: list[tuple[str, Any]]) -> _Obj:
    o = _Obj(pairs)
    o.pairs = pairs
    return o


_DECODER = json.JSONDecoder(object_pairs_hook=_obj)


def loads(text: str) -> Any:
    return _DECODER.decode(text)


def dump_json(value: Any) -> str:
    """`json.dumps(value, ensure_ascii=False)`, except that an object decoded here keeps a
    repeated key as written (a reader still takes the last value, as json.loads does)."""
    if isinstance(value, _Obj):
        return "{" + ", ".join(
            f"{json.dumps(k, ensure_ascii=False)}: {dump_json(v)}" for k, v in value.pairs) + "}"
    if isinstance(value, dict):
        return "{" + ", ".join(
            f"{json.dumps(k, ensure_ascii=False)}: {dump_json(v)}" for k, v in value.items()) + "}"
    if isinstance(value, list):
        return "[" + ", ".join(dump_json(v) for v in value) + "]"
    return json.dumps(value, ensure_ascii=False)


@dataclass(frozen=True)
class ParsedCall:
    name: str
    arguments: str  # a JSON object, as a string (OpenAI's function.arguments)
    start: int = field(default=-1, compare=False)  # where the call starts in the text
    # the call's id when the format writes one (kimi_k2's functions.NAME:IDX); None: the
    # parser's call_id()
    id: str | None = field(default=None, compare=False)


@dataclass(frozen=True)
class PartialCall:
    """A call still being written: its name, and the settled prefix of its `arguments`."""

    start: int
    name: str
    arguments: str
    id: str | None = None  # as ParsedCall.id


@dataclass
class Scan:
    """What a text holds so far. `content` only grows as the text grows (text that might
    still turn out to be part of a call is held back), and so do `calls`; `partial` is the
    call being written after them, once it can stream."""

    content: str
    calls: list[ParsedCall] = field(default_factory=list)
    partial: PartialCall | None = None


def _arguments(value: Any) -> str | None:
    if isinstance(value, str):  # some models write the arguments as a JSON string
        try:
            value = loads(value)
        except ValueError:
            return None
    if value is None:
        value = {}
    if not isinstance(value, dict):
        return None
    return dump_json(value)


# ---------------------------------------------------------------- streaming a call's JSON

_WS = " \t\n\r"
_NUMBER = re.compile(r"-?(?:0|[1-9]\d*)(?:\.\d+)?(?:[eE][-+]?\d+)?")
_NUMBER_CHARS = set("-+.eE0123456789")
_LITERALS = ("true", "false", "null", "NaN", "Infinity", "-Infinity")


class _Incomplete(Exception):
    """The text ends inside the key or value being read."""


def _skip_ws(text: str, i: int) -> int:
    while i < len(text) and text[i] in _WS:
        i += 1
    return i


def _settled_string(raw: str) -> int:
    """How much of a string's unfinished body (after its opening quote) can be decoded now
    without its decoding changing later: not a trailing half escape, nor a high-surrogate
    escape whose low half may follow. ValueError for an invalid escape."""
    k = safe = 0
    while k < len(raw):
        if raw[k] != "\\":
            k += 1
        elif k + 1 >= len(raw):
            break
        elif raw[k + 1] == "u":
            if k + 6 > len(raw):
                break
            code = int(raw[k + 2 : k + 6], 16)  # ValueError if not hex
            if 0xD800 <= code <= 0xDBFF and k + 12 > len(raw):
                break  # a low surrogate may pair with it
            k += 6
        elif raw[k + 1] in '"\\/bfnrt':
            k += 2
        else:
            raise ValueError("invalid escape")
        safe = k
    return safe


def _emit_string(text: str, i: int) -> tuple[str, int | None]:
    j = i + 1
    while j < len(text):
        if text[j] == '"':
            value, end = scanstring(text, i + 1, True)
            return json.dumps(value, ensure_ascii=False), end
        j += 2 if text[j] == "\\" else 1
    raw = text[i + 1 :]
    decoded = json.loads('"' + raw[: _settled_string(raw)] + '"')
    return '"' + json.dumps(decoded, ensure_ascii=False)[1:-1], None


def emit_json(text: str, i: int) -> tuple[str, int | None]:
    """The settled prefix of `dump_json(<the JSON value at text[i:]>)` and where the value
    ends (None while it is unfinished). ValueError when the text is not JSON."""
    if i >= len(text):
        return "", None
    c = text[i]
    if c == '"':
        return _emit_string(text, i)
    if c in "{[":
        close = "}" if c == "{" else "]"
        out = [c]
        i += 1
        first = True
        while True:
            i = _skip_ws(text, i)
            if i >= len(text):
                return "".join(out), None
            if text[i] == close and first:
                return c + close, i + 1
            if not first:
                if text[i] == close:
                    out.append(close)
                    return "".join(out), i + 1
                if text[i] != ",":
                    raise ValueError("expected ','")
                out.append(", ")
                i = _skip_ws(text, i + 1)
                if i >= len(text):
                    return "".join(out), None
            first = False
            if c == "{":
                if text[i] != '"':
                    raise ValueError("expected a key")
                key, end = _emit_string(text, i)
                out.append(key)
                if end is None:
                    return "".join(out), None
                i = _skip_ws(text, end)
                if i >= len(text):
                    return "".join(out), None
                if text[i] != ":":
                    raise ValueError("expected ':'")
                out.append(": ")
                i = _skip_ws(text, i + 1)
            piece, end = emit_json(text, i)
            out.append(piece)
            if end is None:
                return "".join(out), None
            i = end
    for lit in _LITERALS:
        if text.startswith(lit, i):
            return dump_json(json.loads(lit)), i + len(lit)
        if lit.startswith(text[i:]):
            return "", None
    m = _NUMBER.match(text, i)
    end = m.end() if m else i
    if end < len(text) and m and (text[end] in _WS or text[end] in ",]}"):
        return dump_json(json.loads(m.group())), end
    if all(ch in _NUMBER_CHARS for ch in text[i:]):
        return "", None  # a number still being written
    raise ValueError("not JSON")


def partial_call(text: str, start: int, arg_keys: tuple[str, ...]) -> PartialCall | None:
    """The call being written at text[start:] (`{"name": ..., <arg key>: {...`), once its
    name is complete and its arguments object has begun; None before that, or if it cannot
    stream (arguments first or not an object, or not JSON)."""
    i = _skip_ws(text, start)
    if i >= len(text) or text[i] != "{":
        return None
    i += 1
    name: str | None = None
    first = True
    try:
        while True:
            i = _skip_ws(text, i)
            if i >= len(text) or text[i] == "}":
                return None
            if not first:
                if text[i] != ",":
                    return None
                i = _skip_ws(text, i + 1)
            first = False
            if i >= len(text) or text[i] != '"':
                return None
            try:
                key, i = scanstring(text, i + 1, True)
            except ValueError:
                return None  # unfinished (or invalid) key
            i = _skip_ws(text, i)
            if i >= len(text) or text[i] != ":":
                return None
            i = _skip_ws(text, i + 1)
            if i >= len(text):
                return None
            if key in arg_keys:
                if name is None or text[i] != "{":
                    return None
                args, _ = emit_json(text, i)
                return PartialCall(start, name, args)
            value, i = _DECODER.raw_decode(text, i)
            if key == "name":
                if not isinstance(value, str) or not value or name is not None:
                    return None
                name = value
    except ValueError:
        return None


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
    # the format's call marker is a special token: requests with tools keep special tokens
    # in the text (vLLM's adjust_request for mistral and internlm)
    KEEP_SPECIAL_TOKENS = False

    def __init__(self, tools: list[dict[str, Any]] | None = None) -> None:
        # the request's tools as the chat template sees them ({"type", "function": {"name",
        # "parameters", ...}}): parsers that convert values by the tool's schema read them
        self.tools = tools

    def call_id(self) -> str | None:
        """A new call's id in this model's style; None: the server's usual one."""
        return None

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
                if not final:  # the call is still being written
                    out.partial = partial_call(text, body_at, self.ARG_KEYS)
                    return out
                body, after = text[body_at:], len(text)
            else:
                body, after = text[body_at:end], end + len(self.CLOSE)
            call = self._call(body, body_at)
            if call is None:
                out.content += text[start:after]
            else:
                out.calls.append(call)
            pos = after

    ARG_KEYS = ("arguments", "parameters")

    @classmethod
    def _call(cls, body: str, start: int) -> ParsedCall | None:
        try:
            obj = loads(body)
        except ValueError:
            return None
        call = call_of(obj, *cls.ARG_KEYS)
        return None if call is None else ParsedCall(call.name, call.arguments, start)


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
        offset = len(text) - len(region)
        calls = [ParsedCall(c.name, c.arguments, c.start + offset) for c in calls]
        partial = None
        if state == "open":
            partial = partial_call(text, offset + rest, ("parameters", "arguments"))
        if not calls:
            # not (yet) known to be calls: all of it is content once the text is final
            return Scan(text if final else head, partial=partial)
        if state == "stop":  # calls, then something else: that is content
            return Scan(head + region[rest:], calls)
        return Scan(head, calls, partial)

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
            calls.append(ParsedCall(call.name, call.arguments, pos))
            pos = end


PARSERS: dict[str, type[ToolParser]] = {
    HermesToolParser.name: HermesToolParser,
    Llama3JsonToolParser.name: Llama3JsonToolParser,
}


def get_parser(name: str, tools: list[dict[str, Any]] | None = None) -> ToolParser:
    try:
        return PARSERS[name](tools)
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


@dataclass(frozen=True)
class CallDelta:
    """One piece of a streamed call: `index` its position among the stream's calls; `name`
    set on its first piece only; `arguments` a fragment (None: none in this piece)."""

    index: int
    name: str | None = None
    arguments: str | None = None
    id: str | None = None  # with the name: the id the model wrote for the call, if any


class ToolCallStreamer:
    """Turns the growing text of one choice into (content delta, call deltas).

    Whitespace is held back until non-space content follows, so a stream's content matches
    `ToolParser.parse` (no trailing whitespace once there are calls); at the end, held
    whitespace is sent only when no call was made (then the content is the text as is).
    With `max_calls` 1 only the first call is sent.
    """

    def __init__(self, scan: Any, max_calls: int | None = None) -> None:
        self._scan = scan  # (text, final) -> Scan
        self._max_calls = max_calls
        self._content_seen = 0
        self._content_sent = ""
        self._held = ""
        self._calls_done = 0  # complete calls of the scan dealt with
        self.calls_sent = 0  # calls the stream has begun (its next call's index)
        self._open: tuple[int, int] | None = None  # (start, index) of the call streaming
        self._args_sent = ""

    def _room(self) -> bool:
        return self._max_calls is None or self.calls_sent < self._max_calls

    def feed(self, text: str, final: bool) -> tuple[str, list[CallDelta]]:
        s = self._scan(text, final)
        fresh = s.content[self._content_seen :]
        self._content_seen = len(s.content)
        pending = self._held + fresh
        if final and not s.calls and self._open is None:
            out, self._held = pending, ""
        else:
            body = pending.rstrip()
            out, self._held = body, pending[len(body) :]
        deltas: list[CallDelta] = []
        for c in s.calls[self._calls_done :]:
            if self._open is not None and self._open[0] == c.start:  # the streaming one ends
                index = self._open[1]
                rest = (c.arguments[len(self._args_sent) :]
                        if c.arguments.startswith(self._args_sent) else "")
                if rest:
                    deltas.append(CallDelta(index, arguments=rest))
                self._open = None
            elif self._room():
                self._open = None  # one that stopped being a call is left as it was
                deltas.append(CallDelta(self.calls_sent, c.name, c.arguments, c.id))
                self.calls_sent += 1
        self._calls_done = len(s.calls)
        p = s.partial
        if p is not None and (self._open is None or self._open[0] != p.start) and self._room():
            self._open, self._args_sent = (p.start, self.calls_sent), ""
            deltas.append(CallDelta(self.calls_sent, p.name, id=p.id))
            self.calls_sent += 1
        if p is not None and self._open is not None and self._open[0] == p.start:
            if p.arguments.startswith(self._args_sent) and len(p.arguments) > len(self._args_sent):
                deltas.append(CallDelta(self._open[1], arguments=p.arguments[len(self._args_sent):]))
                self._args_sent = p.arguments
        return out, deltas


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


# the other formats (mistral, pythonic, qwen3_coder, deepseek_v3, granite, ...) add
# themselves to PARSERS; imported last, as they build on the definitions above
import modelport.entrypoints.openai.tool_parsers_more  # noqa: E402, F401, I001
import modelport.entrypoints.openai.tool_parsers_pythonic  # noqa: E402, F401, I001
import modelport.entrypoints.openai.tool_parsers_qwen3_coder  # noqa: E402, F401, I001
import modelport.entrypoints.openai.tool_parsers_extra  # noqa: E402, F401, I001
