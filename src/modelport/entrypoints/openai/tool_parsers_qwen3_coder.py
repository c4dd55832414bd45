"""Qwen3-Coder's XML tool calls (vLLM's qwen3_coder parser), with each parameter's text
converted by the type the request's tool schema gives it; see Qwen3CoderToolParser."""

from __future__ import annotations

import ast
import json
from typing import Any

from modelport.entrypoints.openai.tool_parsers import (
    PARSERS,
    ParsedCall,
    PartialCall,
    Scan,
    ToolParser,
)
from modelport.entrypoints.openai.tool_parsers_more import _hold


class Qwen3CoderToolParser(ToolParser):
    """Qwen3-Coder's XML calls:

        <tool_call>
        <function=get_weather>
        <parameter=city>
        Paris
        </parameter>
        </function>
        </tool_call>

    Each parameter's text (less one leading and one trailing newline) is converted by the
    type the request's tool gives it in its JSON schema, as vLLM does: integer, number,
    boolean, object/array (JSON, else a Python literal), "null" for any type; a parameter
    the schema does not know stays a string. The content is the text before the first
    <tool_call> (or <function= when there is no tool_call tag); as vLLM, text after the
    calls is dropped. A parameter streams once it is closed."""

    name = "qwen3_coder"
    TC_OPEN, TC_CLOSE = "<tool_call>", "</tool_call>"
    FN, FN_END = "<function=", "</function>"
    P, P_END = "<parameter=", "</parameter>"

    def scan(self, text: str, final: bool) -> Scan:
        tc, fn = text.find(self.TC_OPEN), text.find(self.FN)
        if tc < 0 and fn < 0:
            return Scan(_hold(text, final, self.TC_OPEN, self.FN))
        head = text[: tc if tc >= 0 else fn]
        if fn < 0:
            return Scan(text if final else head)
        out = Scan(head)
        try:
            for bs, be, closed in self._blocks(text, tc >= 0):
                self._functions(text, bs, be, closed or final, out)
        except ValueError:
            return Scan(text if final else head)  # vLLM: a broken call makes it all content
        if final:
            if not out.calls:
                return Scan(text)
            out.partial = None
        return out

    def _blocks(self, text: str, tagged: bool) -> list[tuple[int, int, bool]]:
        if not tagged:
            return [(0, len(text), False)]
        blocks = []
        pos = text.find(self.TC_OPEN)
        while pos >= 0:
            body = pos + len(self.TC_OPEN)
            end = text.find(self.TC_CLOSE, body)
            if end < 0:
                blocks.append((body, len(text), False))
                break
            blocks.append((body, end, True))
            pos = text.find(self.TC_OPEN, end + len(self.TC_CLOSE))
        return blocks

    def _functions(self, text: str, bs: int, be: int, done: bool, out: Scan) -> None:
        pos = text.find(self.FN, bs, be)
        while pos >= 0:
            at = pos + len(self.FN)
            end = text.find(self.FN_END, at, be)
            body = text[at : end if end >= 0 else be]
            gt = body.find(">")
            if end >= 0 or done:
                if gt < 0:
                    raise ValueError("a function without '>'")
                name = body[:gt]
                pairs = self._params(name, body[gt + 1 :], True)
                out.calls.append(ParsedCall(name, "{" + _pairs_json(pairs) + "}", pos))
            elif gt >= 0:  # the call being written (the last thing in the text)
                name = body[:gt]
                out.partial = PartialCall(
                    pos, name, "{" + _pairs_json(self._params(name, body[gt + 1 :], False))
                )
                return
            else:
                return
            if end < 0:
                return
            pos = text.find(self.FN, end + len(self.FN_END), be)

    def _params(self, fn_name: str, text: str, done: bool) -> list[tuple[str, Any]]:
        """The parameters in a function's body: each ends at </parameter>, the next
        <parameter= (or the end of a finished call)."""
        config = self._schema_properties(fn_name)
        out = []
        pos = text.find(self.P)
        while pos >= 0:
            at = pos + len(self.P)
            ends = [
                (i, n)
                for i, n in (
                    (text.find(self.P_END, at), len(self.P_END)),
                    (text.find(self.P, at), 0),
                )
                if i >= 0
            ]
            if ends:
                stop, skip = min(ends)
            elif done:
                stop, skip = len(text), 0
            else:
                break  # still being written
            raw = text[at:stop]
            gt = raw.find(">")
            if gt < 0:
                raise ValueError("a parameter without '>'")
            value = raw[gt + 1 :]
            value = value[1:] if value.startswith("\n") else value
            value = value[:-1] if value.endswith("\n") else value
            out.append((raw[:gt], _convert(value, raw[:gt], config)))
            pos = text.find(self.P, stop + skip)
        return out

    def _schema_properties(self, fn_name: str) -> dict[str, Any]:
        for tool in self.tools or []:
            fn = tool.get("function") if isinstance(tool, dict) else None
            if isinstance(fn, dict) and fn.get("name") == fn_name:
                params = fn.get("parameters")
                if isinstance(params, dict):
                    props = params.get("properties", params)
                    return props if isinstance(props, dict) else {}
                return {}
        return {}


def _pairs_json(pairs: list[tuple[str, Any]]) -> str:
    return ", ".join(f"{json.dumps(k, ensure_ascii=False)}: {_json_value(v)}" for k, v in pairs)


def _json_value(v: Any) -> str:
    try:
        return json.dumps(v, ensure_ascii=False)
    except (TypeError, ValueError):
        return json.dumps(str(v), ensure_ascii=False)


def _convert(value: str, name: str, config: dict[str, Any]) -> Any:
    """A qwen3_coder parameter's value by its schema type (vLLM's conversions)."""
    if value.lower() == "null":
        return None
    if name not in config:
        return value
    spec = config[name]
    kind = (
        str(spec["type"]).strip().lower() if isinstance(spec, dict) and "type" in spec else "string"
    )
    if kind in ("string", "str", "text", "varchar", "char", "enum"):
        return value
    if kind.startswith(("int", "uint", "long", "short", "unsigned")):
        try:
            return int(value)
        except ValueError:
            return value
    if kind.startswith(("num", "float")):
        try:
            f = float(value)
            return f if f - int(f) != 0 else int(f)
        except (ValueError, OverflowError):
            return value
    if kind in ("boolean", "bool", "binary"):
        return value.lower() == "true"
    if kind in ("object", "array", "arr") or kind.startswith(("dict", "list")):
        try:
            return json.loads(value)
        except ValueError:
            pass
    try:
        return ast.literal_eval(value)
    except (ValueError, SyntaxError, TypeError, MemoryError, RecursionError):
        return value


PARSERS[Qwen3CoderToolParser.name] = Qwen3CoderToolParser
