"""Python-style tool calls (vLLM's pythonic and llama4_pythonic parsers): the answer is a
list of calls with keyword arguments, read with `ast`; see PythonicToolParser."""

from __future__ import annotations

import ast
import json
import re
from typing import Any

from modelport.entrypoints.openai.tool_parsers import (
    PARSERS,
    ParsedCall,
    PartialCall,
    Scan,
    ToolParser,
    _skip_ws,
)
from modelport.entrypoints.openai.tool_parsers_more import _hold


class _NotLiteral(ValueError):
    pass


def _literal(node: ast.expr) -> Any:
    """A call argument's value: constants, lists and dicts of them (vLLM's rule), and
    negative numbers."""
    if isinstance(node, ast.Constant):
        if isinstance(node.value, (bytes, complex)) or node.value is Ellipsis:
            raise _NotLiteral("not a JSON value")
        return node.value
    if (
        isinstance(node, ast.UnaryOp)
        and isinstance(node.op, ast.USub)
        and isinstance(node.operand, ast.Constant)
        and type(node.operand.value) in (int, float)
    ):
        return -node.operand.value
    if isinstance(node, ast.List):
        return [_literal(e) for e in node.elts]
    if isinstance(node, ast.Dict):
        if not all(isinstance(k, ast.Constant) for k in node.keys):
            raise _NotLiteral("dict keys must be literals")
        return {k.value: _literal(v) for k, v in zip(node.keys, node.values)}  # type: ignore[union-attr]
    raise _NotLiteral("tool call arguments must be literals")


_PY_NAME = re.compile(r"[a-zA-Z]\w*")
_PY_OPEN, _PY_CLOSE = "([{", ")]}"


def _py_end(text: str, i: int) -> tuple[int | None, list[int]]:
    """Where the bracket opened at text[i] closes (its index), or None while the text ends
    inside it; and the positions of its top-level commas. Strings (quotes, triple quotes,
    escapes) are skipped. ValueError on a mismatched bracket."""
    stack = [text[i]]
    commas: list[int] = []
    j = i + 1
    while j < len(text):
        c = text[j]
        if c in "'\"":
            q = c * 3 if text.startswith(c * 3, j) else c
            j += len(q)
            while True:
                if j >= len(text):
                    return None, commas
                if text[j] == "\\":
                    j += 2
                elif text.startswith(q, j):
                    j += len(q)
                    break
                elif text[j] == "\n" and len(q) == 1:
                    raise ValueError("unterminated string")
                else:
                    j += 1
            continue
        if c in _PY_OPEN:
            stack.append(c)
        elif c in _PY_CLOSE:
            if _PY_OPEN[_PY_CLOSE.index(c)] != stack.pop():
                raise ValueError("mismatched bracket")
            if not stack:
                return j, commas
        elif c == "," and len(stack) == 1:
            commas.append(j)
        j += 1
    return None, commas


class PythonicToolParser(ToolParser):
    """Python-style calls (Llama 3.2, ToolACE, ...): the whole answer is a list of calls
    with keyword arguments, `[get_weather(city="Paris"), get_time()]`, read with `ast`:
    argument values must be literals. As vLLM: the answer must open with "[" (else it is
    all content), nothing else is content when it holds calls, and one that does not parse
    as calls is all content. A call streams its arguments one complete keyword at a time."""

    name = "pythonic"
    ENSURE_ASCII = False
    START = END = ""

    def _json(self, value: Any) -> str:
        return json.dumps(value, ensure_ascii=self.ENSURE_ASCII)

    def _body(self, text: str, final: bool) -> str | None:
        """The text without Llama 4's python tags; None while the answer's start is unknown."""
        return text

    def scan(self, text: str, final: bool) -> Scan:
        body = self._body(text, final)
        if body is None:
            return Scan("")
        if not body.startswith("["):
            if body is text:
                return Scan(text)
            return Scan(body if final else "")  # Llama 4's tags are dropped
        try:
            calls, partial, end = self._calls(body)
            if final and (end is None or body[end:].strip() or not calls):
                raise ValueError("not a list of calls")
        except (ValueError, SyntaxError, TypeError, RecursionError):
            return Scan(body if final else "")
        return Scan("", calls, None if final else partial)

    def _calls(self, body: str) -> tuple[list[ParsedCall], PartialCall | None, int | None]:
        calls: list[ParsedCall] = []
        pos = _skip_ws(body, 1)
        if pos < len(body) and body[pos] == "]":
            return calls, None, pos + 1
        while True:
            if pos >= len(body):
                return calls, None, None
            m = _PY_NAME.match(body, pos)
            if m is None:
                raise ValueError("expected a function name")
            paren = m.end()
            if paren >= len(body):
                return calls, None, None
            if body[paren] != "(":
                raise ValueError("expected '('")
            close, commas = _py_end(body, paren)
            if close is None:
                return calls, self._partial(body, pos, m.group(), paren, commas), None
            calls.append(ParsedCall(m.group(), self._arguments(body[pos : close + 1]), pos))
            pos = _skip_ws(body, close + 1)
            if pos >= len(body):
                return calls, None, None
            if body[pos] == "]":
                return calls, None, pos + 1
            if body[pos] != ",":
                raise ValueError("expected ','")
            pos = _skip_ws(body, pos + 1)

    def _keywords(self, call_src: str) -> list[tuple[str, Any]]:
        node = ast.parse(call_src.strip(), mode="eval").body
        if not isinstance(node, ast.Call) or node.args:
            raise ValueError("a call takes keyword arguments only")
        out = []
        for kw in node.keywords:
            if kw.arg is None or not _PY_NAME.fullmatch(kw.arg):
                raise ValueError("bad keyword")
            out.append((kw.arg, _literal(kw.value)))
        return out

    def _object(self, pairs: list[tuple[str, Any]]) -> str:
        return ", ".join(f"{self._json(k)}: {self._json(v)}" for k, v in pairs)

    def _arguments(self, call_src: str) -> str:
        return "{" + self._object(self._keywords(call_src)) + "}"

    def _partial(
        self, body: str, start: int, name: str, paren: int, commas: list[int]
    ) -> PartialCall | None:
        """The open call: its keywords before the last top-level comma are complete. None
        until its first argument shows a keyword (`f(1` is no call of this format)."""
        first = body[paren + 1 :].lstrip()
        if not first or not first[0].isalpha():
            return None
        if not commas:
            return PartialCall(start, name, "{")
        try:
            pairs = self._keywords(f"f({body[paren + 1 : commas[-1]]})")
        except (ValueError, SyntaxError, TypeError, RecursionError):
            return PartialCall(start, name, "{")  # malformed so far: the end will tell
        return PartialCall(start, name, "{" + self._object(pairs))


class Llama4PythonicToolParser(PythonicToolParser):
    """Llama 4's pythonic calls: the same, optionally wrapped in `<|python_start|>` ...
    `<|python_end|>` (dropped), and arguments with non-ASCII characters escaped (vLLM's
    llama4_pythonic serializes them with json.dumps' defaults)."""

    name = "llama4_pythonic"
    ENSURE_ASCII = True
    START, END = "<|python_start|>", "<|python_end|>"

    def _body(self, text: str, final: bool) -> str | None:
        if not text.startswith(self.START):
            if not final and self.START.startswith(text):
                return None  # the tag may be arriving
            return text
        body = text[len(self.START) :].replace(self.END, "")
        return _hold(body, final, self.END)


PARSERS.update({c.name: c for c in (PythonicToolParser, Llama4PythonicToolParser)})
