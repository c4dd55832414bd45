"""Further tool-call formats (vLLM's --tool-call-parser names): glm45, kimi_k2, xlam,
deepseek_v31, seed_oss, and the aliases qwen3_xml (qwen3_coder's XML) and llama4_json
(llama3_json), written from each model's published chat template.

Each follows the contract of tool_parsers.py: one `scan(text, final)` says which text is
certainly content, which calls are complete, and which call is being written (its name and
the settled prefix of its final `arguments`), so a stream's pieces reassemble to exactly the
non-streaming answer. Formats that carry the arguments as JSON text (kimi_k2, deepseek_v31)
return them as the model wrote them, as vLLM does; xlam re-serializes its JSON; the XML-style
formats (glm45, seed_oss, qwen3_xml) build a JSON object, each value typed by the request's
tool schema.
"""

from __future__ import annotations

import json
import re
from typing import Any

from modelport.entrypoints.openai.tool_parsers import (
    PARSERS,
    Llama3JsonToolParser,
    ParsedCall,
    PartialCall,
    Scan,
    ToolParser,
    _skip_ws,
    dump_json,
)
from modelport.entrypoints.openai.tool_parsers_more import _hold, _scan_array
from modelport.entrypoints.openai.tool_parsers_qwen3_coder import (
    Qwen3CoderToolParser,
    _convert,
    _pairs_json,
)


def _schema_properties(tools: list[dict[str, Any]] | None, fn_name: str) -> dict[str, Any]:
    """The `properties` of the request's tool named `fn_name` ({} when unknown)."""
    for tool in tools or []:
        fn = tool.get("function") if isinstance(tool, dict) else None
        if isinstance(fn, dict) and fn.get("name") == fn_name:
            params = fn.get("parameters")
            props = params.get("properties") if isinstance(params, dict) else None
            return props if isinstance(props, dict) else {}
    return {}


def _plausible(text: str, i: int, marker: str) -> bool:
    """text[i:] is the start of `marker` (the text ends inside it)."""
    return marker.startswith(text[i:])


# ---------------------------------------------------------------- glm45


class _Malformed(ValueError):
    pass


# a function name as OpenAI allows them (letters, digits, "_", "-"), and dotted names
_FN_NAME = re.compile(r"[\w.\-]+")


class Glm45ToolParser(ToolParser):
    """GLM-4.5 / 4.6: one block per call, the name on the block's first line, then each
    argument as a key/value pair:

        <tool_call>get_weather
        <arg_key>city</arg_key>
        <arg_value>Paris</arg_value>
        <arg_key>days</arg_key>
        <arg_value>3</arg_value>
        </tool_call>

    The template writes a string value as is and any other value as JSON, so a value (less
    surrounding whitespace) is a string where the tool's schema says "string", else its JSON
    decoding when it is JSON (else the schema's conversion, as qwen3_coder's, else the text
    itself). The text before the first block is content, and so is text between or after
    blocks (vLLM keeps only the text before); a block that is not a call (no name, stray
    text, an unclosed pair) stays content. A block cut off by the end of the text is a
    call when its pairs are all closed. A call streams one pair at a time."""

    name = "glm45"
    OPEN, CLOSE = "<tool_call>", "</tool_call>"
    KEY, KEY_END = "<arg_key>", "</arg_key>"
    VAL, VAL_END = "<arg_value>", "</arg_value>"

    def scan(self, text: str, final: bool) -> Scan:
        out = Scan("")
        pos = 0
        while True:
            start = text.find(self.OPEN, pos)
            if start < 0:
                out.content += _hold(text[pos:], final, self.OPEN)
                return out
            out.content += text[pos:start]
            body_at = start + len(self.OPEN)
            end = text.find(self.CLOSE, body_at)
            if end < 0 and not final:
                try:
                    name, pairs = self._body(text[body_at:], done=False)
                except _Malformed:
                    return out  # the end will tell (as content)
                if name is not None:
                    out.partial = PartialCall(start, name, "{" + _pairs_json(pairs))
                return out
            body_end, after = (end, end + len(self.CLOSE)) if end >= 0 else (len(text), len(text))
            try:
                name, pairs = self._body(text[body_at:body_end], done=True)
            except _Malformed:
                out.content += text[start:after]
            else:
                assert name is not None
                out.calls.append(ParsedCall(name, "{" + _pairs_json(pairs) + "}", start))
            pos = after

    def _body(self, body: str, done: bool) -> tuple[str | None, list[tuple[str, Any]]]:
        """(name, the closed pairs) of a block's body; name None while it is still being
        written. _Malformed when it is not this format."""
        stops = [i for i in (body.find("\n"), body.find(self.KEY)) if i >= 0]
        if not stops and not done:
            return None, []
        name = body[: min(stops) if stops else len(body)].strip()
        if not _FN_NAME.fullmatch(name):
            raise _Malformed("no function name")
        props = _schema_properties(self.tools, name)
        pairs: list[tuple[str, Any]] = []
        i = min(stops) if stops else len(body)
        while True:
            i = _skip_ws(body, i)
            if i >= len(body):
                return name, pairs
            key, i = self._tagged(body, i, self.KEY, self.KEY_END, done)
            if key is None:
                return name, pairs
            i = _skip_ws(body, i)
            if i >= len(body) and not done:
                return name, pairs
            value, i = self._tagged(body, i, self.VAL, self.VAL_END, done)
            if value is None:
                return name, pairs
            key = key.strip()
            pairs.append((key, self._value(value.strip(), key, props)))

    @staticmethod
    def _tagged(body: str, i: int, open_: str, close: str, done: bool) -> tuple[str | None, int]:
        """The text of the `open_`...`close` element at body[i] and where it ends; None while
        it is still being written."""
        if not body.startswith(open_, i):
            if not done and _plausible(body, i, open_):
                return None, i
            raise _Malformed(f"expected {open_}")
        end = body.find(close, i + len(open_))
        if end < 0:
            if done:
                raise _Malformed(f"no {close}")
            return None, i
        return body[i + len(open_) : end], end + len(close)

    @staticmethod
    def _value(value: str, key: str, props: dict[str, Any]) -> Any:
        spec = props.get(key)
        kind = spec.get("type") if isinstance(spec, dict) else None
        if kind == "string":
            return value
        try:
            return json.loads(value)
        except ValueError:
            pass
        return _convert(value, key, props) if kind is not None else value


# ---------------------------------------------------------------- kimi_k2


class KimiK2ToolParser(ToolParser):
    """Kimi K2: content, then a section of calls, each with the id the model gives it
    (`functions.NAME:IDX`, which is also the call's id in the answer) and its arguments as
    JSON text:

        <|tool_calls_section_begin|><|tool_call_begin|>functions.get_weather:0
        <|tool_call_argument_begin|>{"city": "Paris"}<|tool_call_end|><|tool_calls_section_end|>

    As vLLM: the content is the text before the section (text after it is dropped, and so
    is a call cut off before its end marker), the arguments are returned as written, and
    the section's tokens are special tokens, which the text must keep. The name is the id
    less its `functions.` prefix and `:IDX` suffix."""

    name = "kimi_k2"
    KEEP_SPECIAL_TOKENS = True
    SECTIONS = ("<|tool_calls_section_begin|>", "<|tool_call_section_begin|>")
    SECTION_END = "<|tool_calls_section_end|>"
    BEGIN, ARGS, END = "<|tool_call_begin|>", "<|tool_call_argument_begin|>", "<|tool_call_end|>"

    def scan(self, text: str, final: bool) -> Scan:
        found = [(i, m) for m in self.SECTIONS if (i := text.find(m)) >= 0]
        if not found:
            return Scan(_hold(text, final, *self.SECTIONS))
        at, marker = min(found)
        out = Scan(text[:at])
        pos = at + len(marker)
        while True:
            begin = text.find(self.BEGIN, pos)
            if begin < 0:
                return out
            id_at = begin + len(self.BEGIN)
            args_tag = text.find(self.ARGS, id_at)
            end = text.find(self.END, id_at)
            if args_tag < 0 or 0 <= end < args_tag:
                if end < 0:
                    return out  # the id is still being written, or the text ended
                pos = end + len(self.END)  # a call without arguments: not one (vLLM)
                continue
            call_id = text[id_at:args_tag].strip()
            name = self._name(call_id)
            args_at = args_tag + len(self.ARGS)
            if end < 0:
                if not final and name:
                    # surrounding whitespace is not part of the arguments: trailing
                    # whitespace so far is held back (strip)
                    args = _hold(text[args_at:], False, self.END).strip()
                    out.partial = PartialCall(begin, name, args, call_id)
                return out
            if name:
                args = text[args_at:end].strip()
                out.calls.append(ParsedCall(name, args, begin, call_id))
            pos = end + len(self.END)

    def parse(self, text: str) -> tuple[str | None, list[ParsedCall]]:
        return _section_parse(self, text, self.SECTIONS)

    @staticmethod
    def _name(call_id: str) -> str:
        name = call_id.split(":", 1)[0] if ":" in call_id else call_id
        return name.removeprefix("functions.").strip()


def _section_parse(
    parser: ToolParser, text: str, markers: tuple[str, ...]
) -> tuple[str | None, list[ParsedCall]]:
    """parse() of a format whose calls follow a section marker, after which nothing is
    content (as deepseek_v3's): once the marker is there, the content is the text before
    it, calls or not (as a stream sends it)."""
    if not any(m in text for m in markers):
        return text, []
    s = parser.scan(text, final=True)
    content = s.content.rstrip() if s.calls else s.content
    return (content or None), s.calls


# ---------------------------------------------------------------- deepseek_v31

_DS_CALLS_BEGIN = "<｜tool▁calls▁begin｜>"
_DS_CALL_BEGIN, _DS_SEP, _DS_CALL_END = (
    "<｜tool▁call▁begin｜>",
    "<｜tool▁sep｜>",
    "<｜tool▁call▁end｜>",
)


class DeepSeekV31ToolParser(ToolParser):
    """DeepSeek-V3.1's calls: the name right after the call's begin token (no "function"
    type, no ```json fence, unlike V3), then its arguments as JSON text:

        <｜tool▁calls▁begin｜><｜tool▁call▁begin｜>get_weather<｜tool▁sep｜>{"city": "Paris"}
        <｜tool▁call▁end｜><｜tool▁calls▁end｜>

    As vLLM: the content is the text before <｜tool▁calls▁begin｜> (text after the calls is
    dropped, and so is a call cut off before its end token), and the arguments are returned
    as written (less surrounding whitespace)."""

    name = "deepseek_v31"

    def scan(self, text: str, final: bool) -> Scan:
        begin = text.find(_DS_CALLS_BEGIN)
        if begin < 0:
            return Scan(_hold(text, final, _DS_CALLS_BEGIN))
        out = Scan(text[:begin])
        pos = begin + len(_DS_CALLS_BEGIN)
        while True:
            at = text.find(_DS_CALL_BEGIN, pos)
            if at < 0:
                return out
            name_at = at + len(_DS_CALL_BEGIN)
            sep = text.find(_DS_SEP, name_at)
            end = text.find(_DS_CALL_END, name_at)
            if sep < 0 or 0 <= end < sep:
                if end < 0:
                    return out
                pos = end + len(_DS_CALL_END)  # no separator: not a call
                continue
            name = text[name_at:sep].strip()
            args_at = sep + len(_DS_SEP)
            if end < 0:
                if not final and name:
                    args = _hold(text[args_at:], False, _DS_CALL_END).strip()
                    out.partial = PartialCall(at, name, args)
                return out
            if name:
                out.calls.append(ParsedCall(name, text[args_at:end].strip(), at))
            pos = end + len(_DS_CALL_END)

    def parse(self, text: str) -> tuple[str | None, list[ParsedCall]]:
        return _section_parse(self, text, (_DS_CALLS_BEGIN,))


# ---------------------------------------------------------------- xlam


class XLamToolParser(ToolParser):
    """Salesforce xLAM: a JSON array of {"name", "arguments"} objects, as the whole answer,
    or in a ```json (or bare ```) fence, after `[TOOL_CALLS]`, or in `<tool_call>` ...
    `</tool_call>`. The text before and after the array (fence or tags dropped) is content.
    An array that is not all calls, or not closed when the text ends, leaves all of the
    text content. The arguments are re-serialized JSON (an arguments string holding a
    JSON object is decoded)."""

    name = "xlam"
    FENCE, TOOL_CALLS, TAG, TAG_END = "```", "[TOOL_CALLS]", "<tool_call>", "</tool_call>"

    def scan(self, text: str, final: bool) -> Scan:
        opened = self._opener(text, final)
        if opened is None:
            return Scan(text if final else self._held_content(text))
        head_end, at, close = opened
        if at is None:  # an opener still being written
            return Scan(text[:head_end] if not final else text)
        head = text[:head_end]

        def make(obj: Any, pos: int) -> ParsedCall | None:
            if not isinstance(obj, dict) or not isinstance(obj.get("name"), str):
                return None
            if not obj["name"] or "arguments" not in obj:
                return None
            args = obj["arguments"]
            if isinstance(args, str):
                try:
                    args = json.loads(args)
                except ValueError:
                    return None
            if not isinstance(args, dict):
                return None
            return ParsedCall(obj["name"], dump_json(args), pos)

        try:
            calls, partial, end = _scan_array(text, at, make, ("arguments",))
        except ValueError:
            return Scan(text if final else head)
        if end is None:
            return Scan(text, []) if final else Scan(head, calls, partial)
        if not calls:
            return Scan(text if final else head)
        i = _skip_ws(text, end)
        if close:
            if text.startswith(close, i):
                end = i + len(close)
            elif not final and _plausible(text, i, close):
                return Scan(head, calls)
        tail = text[end:]
        return Scan(head + (tail if final else _hold(tail, False, self.FENCE)), calls)

    def _held_content(self, text: str) -> str:
        if not text.strip() or self.TOOL_CALLS.startswith(text.lstrip()):
            return ""  # the answer may yet open with "[" (or "[TOOL_CALLS]")
        return _hold(text, False, self.FENCE, self.TOOL_CALLS, self.TAG)

    def _opener(self, text: str, final: bool) -> tuple[int, int | None, str] | None:
        """Where the calls' array opens: (end of the content before it, index of its "["
        or None while an opener is still being written, the closing marker expected after
        it). None: no array so far."""
        first = _skip_ws(text, 0)
        if text.startswith("[", first) and not text.startswith(self.TOOL_CALLS, first):
            if final or not _plausible(text, first, self.TOOL_CALLS):
                return first, first, ""
        pos = 0
        while True:
            found = [(i, m) for m in (self.FENCE, self.TOOL_CALLS, self.TAG)
                     if (i := text.find(m, pos)) >= 0]
            if not found:
                return None
            i, marker = min(found)
            j = i + len(marker)
            if marker == self.FENCE:
                if text.startswith("json", j):
                    j += 4
                elif not final and _plausible(text, j, "json"):
                    return i, None, ""
            j = _skip_ws(text, j)
            if j < len(text) and text[j] == "[" and not text.startswith(self.TOOL_CALLS, j):
                close = {self.FENCE: self.FENCE, self.TAG: self.TAG_END}.get(marker, "")
                return i, j, close
            if j >= len(text) and not final:
                return i, None, ""
            pos = i + len(marker)


# ---------------------------------------------------------------- the XML aliases


class Qwen3XmlToolParser(Qwen3CoderToolParser):
    """vLLM's qwen3_xml: the same calls as qwen3_coder (<tool_call><function=...>
    <parameter=...>), read by a streaming XML parser there; the same rules here."""

    name = "qwen3_xml"


class SeedOssToolParser(Qwen3CoderToolParser):
    """ByteDance Seed-OSS: qwen3_coder's XML calls inside `<seed:tool_call>` ...
    `</seed:tool_call>`:

        <seed:tool_call>
        <function=get_weather>
        <parameter=city>Paris</parameter>
        </function>
        </seed:tool_call>

    with qwen3_coder's rules (values typed by the tool's schema, text before the first call
    kept as content)."""

    name = "seed_oss"
    TC_OPEN, TC_CLOSE = "<seed:tool_call>", "</seed:tool_call>"


class Llama4JsonToolParser(Llama3JsonToolParser):
    """vLLM's llama4_json: Llama 3's JSON calls (llama3_json), under Llama 4's name."""

    name = "llama4_json"


EXTRA_PARSERS: dict[str, type[ToolParser]] = {
    cls.name: cls
    for cls in (
        Glm45ToolParser,
        KimiK2ToolParser,
        DeepSeekV31ToolParser,
        XLamToolParser,
        Qwen3XmlToolParser,
        SeedOssToolParser,
        Llama4JsonToolParser,
    )
}
PARSERS.update(EXTRA_PARSERS)
