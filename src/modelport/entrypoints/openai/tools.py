"""Tool calling on chat completions, as vLLM serves it.

- `tool_choice` naming a function, or "required": generation is constrained (structured
  outputs, a JSON schema) to that function's arguments, or to a JSON array of
  `{"name", "parameters"}` objects of the given tools, so the answer is always a valid call.
- "auto": the model decides; a tool-call parser (--tool-call-parser, enabled by
  --enable-auto-tool-choice) finds the calls in its text.
- "none" (or no tools): plain text; the tools still reach the chat template (not with
  --exclude-tools-when-tool-choice-none, as vLLM's).

`plan_tools` checks a request once (400s in vLLM's words) and says which of these applies;
`ToolChoiceOutput` turns each choice's text into the message (or stream deltas) to return.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any, Literal

from modelport.engine.structured_output import validate as validate_structured_outputs
from modelport.entrypoints.openai.errors import OpenAIError
from modelport.entrypoints.openai.protocol import (
    AssistantMessage,
    ChatCompletionRequest,
    ChatTool,
    DeltaFunctionCall,
    DeltaToolCall,
    FunctionCall,
    ToolCall,
    random_id,
)
from modelport.entrypoints.openai.tool_parsers import (
    PARSERS,
    ParsedCall,
    ToolCallStreamer,
    ToolParser,
    get_parser,
    scan_required,
)
from modelport.sampling_params import StructuredOutputsParams

Mode = Literal["none", "named", "required", "auto"]

AUTO_NEEDS_FLAGS = (
    '"auto" tool choice requires --enable-auto-tool-choice and --tool-call-parser to be set'
)
# an object that takes no arguments: what a function without `parameters` is called with
_NO_PARAMETERS = {"type": "object", "properties": {}}


@dataclass(frozen=True)
class ToolSettings:
    """The server's --enable-auto-tool-choice and --tool-call-parser."""

    enable_auto_tools: bool = False
    tool_call_parser: str | None = None
    # --exclude-tools-when-tool-choice-none: tool_choice "none" hides the tools from the
    # chat template (by default it still sees them, as vLLM's and OpenAI's)
    exclude_tools_when_none: bool = False

    def __post_init__(self) -> None:
        if self.tool_call_parser is not None:
            get_parser(self.tool_call_parser)  # ValueError naming the known ones
        if self.enable_auto_tools and self.tool_call_parser is None:
            raise ValueError("--enable-auto-tool-choice requires --tool-call-parser")


@dataclass(frozen=True)
class ToolPlan:
    mode: Mode
    template_tools: list[dict[str, Any]] | None  # what the chat template sees
    constraint: StructuredOutputsParams | None = None  # named / required
    function: str | None = None  # named: the function called
    parser_name: str | None = None  # auto
    parallel: bool = True  # false: keep only the first call


def template_tool(tool: ChatTool) -> dict[str, Any]:
    """A tool as the chat template sees it: vLLM passes each tool's model_dump, so
    description and parameters are there (null when not given)."""
    fn = {"name": tool.function.name, "description": tool.function.description,
          "parameters": tool.function.parameters}
    if tool.function.strict is not None:
        fn["strict"] = tool.function.strict
    return {"type": tool.type, "function": fn}


def plan_tools(req: ChatCompletionRequest, settings: ToolSettings) -> ToolPlan:
    """Which tool behaviour the request asks for; 400 (OpenAI-shaped, vLLM's words) when it
    cannot be served."""
    tools = req.tools
    shown = [template_tool(t) for t in tools] if tools else None
    choice = req.tool_choice
    if choice is None:  # vLLM's default: "auto" when tools are given
        choice = "auto" if tools else "none"
    if choice == "none":
        hide = settings.exclude_tools_when_none and req.tool_choice == "none"
        return ToolPlan("none", None if hide else shown)
    if tools is None:
        raise OpenAIError("When using `tool_choice`, `tools` must be set.", 400,
                          param="tool_choice")
    if settings.tool_call_parser and PARSERS[settings.tool_call_parser].KEEP_SPECIAL_TOKENS:
        # vLLM's adjust_request (mistral, internlm): the call token is a special token,
        # which the text must keep for the parser to find the calls
        req.skip_special_tokens = False
    if choice == "required" and not tools:  # as OpenAI (and vLLM): nothing to require
        return ToolPlan("none", None)
    parallel = req.parallel_tool_calls is not False
    if choice == "auto":
        if not (settings.enable_auto_tools and settings.tool_call_parser):
            raise OpenAIError(AUTO_NEEDS_FLAGS, 400, param="tool_choice")
        return ToolPlan("auto", shown, parser_name=settings.tool_call_parser, parallel=parallel)
    if choice == "required":
        for t in tools:
            _check_schema(t.function.name, t.function.parameters)
        schema = required_schema(tools)
        return ToolPlan("required", shown, constraint=_constraint(schema, "tools"),
                        parallel=parallel)
    name = choice.function.name
    by_name = {t.function.name: t for t in tools}
    if name not in by_name:
        raise OpenAIError(
            "The tool specified in `tool_choice` does not match any of the specified "
            f"`tools`: there is no function named {name!r} (tools: {', '.join(by_name)})",
            400, param="tool_choice",
        )
    params = by_name[name].function.parameters
    _check_schema(name, params)
    return ToolPlan("named", shown, constraint=_constraint(params or _NO_PARAMETERS, "tools"),
                    function=name)


def _check_schema(name: str, params: dict[str, Any] | None) -> None:
    if params is None:
        return
    _constraint(params, "tools", f"the parameters of the tool {name!r} are not a usable JSON "
                                 "schema")


def _constraint(schema: dict[str, Any], param: str, what: str = "") -> StructuredOutputsParams:
    try:
        so = StructuredOutputsParams(json=schema)
        validate_structured_outputs(so)
    except (ValueError, TypeError) as e:
        msg = str(e).replace("in structured_outputs.json", "").replace("structured_outputs.json",
                                                                       "the schema")
        raise OpenAIError(f"{what}: {msg}" if what else msg, 400, param=param) from None
    return so


def required_schema(tools: list[ChatTool]) -> dict[str, Any]:
    """vLLM's schema for tool_choice "required": a non-empty array of calls, each
    {"name": <one tool>, "parameters": <that tool's schema>}. Each tool's `$defs` move to the
    top, where its `$ref`s ("#/$defs/...") then point; two tools defining one name
    differently cannot share them (400)."""
    defs: dict[str, Any] = {}
    cases = []
    for t in tools:
        params = copy.deepcopy(t.function.parameters) if t.function.parameters else None
        for def_name, def_schema in ((params or {}).pop("$defs", None) or {}).items():
            if def_name in defs and defs[def_name] != def_schema:
                raise OpenAIError(
                    f"Tool definition '{def_name}' has multiple schemas, which is not "
                    "supported.", 400, param="tools",
                )
            defs[def_name] = def_schema
        cases.append({
            "properties": {
                "name": {"type": "string", "enum": [t.function.name]},
                "parameters": params or _NO_PARAMETERS,
            },
            "required": ["name", "parameters"],
        })
    schema: dict[str, Any] = {
        "type": "array", "minItems": 1, "items": {"type": "object", "anyOf": cases},
    }
    if defs:
        schema["$defs"] = defs
    return schema


def new_call_id() -> str:
    return random_id("chatcmpl-tool")


def _call(c: ParsedCall, call_id: str | None = None) -> ToolCall:
    return ToolCall(id=call_id or new_call_id(),
                    function=FunctionCall(name=c.name, arguments=c.arguments))


class ToolChoiceOutput:
    """One choice's answer under a ToolPlan: the whole message (`message`), or stream deltas
    (`feed`, with the text so far) and the finish reason (`finish_reason`).

    vLLM's finish reasons: "tool_calls" when "auto" found calls or "required" answered (a
    stream: once a call was sent; else only when generation stopped, not on length), and
    the engine's reason for a named function (OpenAI's "stop").
    """

    def __init__(self, plan: ToolPlan) -> None:
        self.plan = plan
        self._parser: ToolParser | None = None
        self._streamer: ToolCallStreamer | None = None
        if plan.mode == "auto":
            assert plan.parser_name is not None
            self._parser = get_parser(plan.parser_name, plan.template_tools)
            self._streamer = ToolCallStreamer(self._parser.scan, None if plan.parallel else 1)
        elif plan.mode == "required":
            self._streamer = ToolCallStreamer(scan_required, None if plan.parallel else 1)
        self._args_sent = 0  # named: characters of the arguments sent
        self._calls_sent = 0

    def message(self, text: str, finish_reason: str | None) -> tuple[AssistantMessage, str | None]:
        plan = self.plan
        if plan.mode == "none":
            return AssistantMessage(content=text), finish_reason
        if plan.mode == "named":
            assert plan.function is not None
            call = ParsedCall(plan.function, text)
            return AssistantMessage(content="", tool_calls=[_call(call)]), finish_reason
        if plan.mode == "required":
            calls = self._limit(scan_required(text, True).calls)
            reason = "tool_calls" if finish_reason == "stop" else finish_reason
            return AssistantMessage(content="", tool_calls=[_call(c) for c in calls]), reason
        assert self._parser is not None
        content, calls = self._parser.parse(text)
        calls = self._limit(calls)
        if not calls:
            return AssistantMessage(content=content), finish_reason
        return AssistantMessage(content=content, tool_calls=[
            _call(c, c.id or self._parser.call_id()) for c in calls]), "tool_calls"

    def feed(self, text: str, final: bool) -> tuple[str | None, list[DeltaToolCall]]:
        """(content delta or None, tool-call deltas) for the choice's text so far."""
        plan = self.plan
        if plan.mode == "named":
            fresh = text[self._args_sent :]
            if self._args_sent == 0 and self._calls_sent == 0:
                if not fresh and not final:
                    return None, []
                self._args_sent, self._calls_sent = len(text), 1
                return None, [DeltaToolCall(
                    index=0, id=new_call_id(), type="function",
                    function=DeltaFunctionCall(name=plan.function, arguments=fresh))]
            self._args_sent = len(text)
            if not fresh:
                return None, []
            return None, [DeltaToolCall(index=0, function=DeltaFunctionCall(arguments=fresh))]
        assert self._streamer is not None
        content, pieces = self._streamer.feed(text, final)
        deltas = []
        for d in pieces:  # as vLLM: id, type and name in a call's first delta only
            if d.name is not None:
                call_id = d.id or (self._parser.call_id() if self._parser is not None else None)
                deltas.append(DeltaToolCall(
                    index=d.index, id=call_id or new_call_id(), type="function",
                    function=DeltaFunctionCall(name=d.name, arguments=d.arguments)))
            else:
                deltas.append(DeltaToolCall(
                    index=d.index, function=DeltaFunctionCall(arguments=d.arguments)))
        self._calls_sent = self._streamer.calls_sent
        return (content or None), deltas

    def finish_reason(self, engine_reason: str | None) -> str | None:
        """A stream's finish reason, once the engine's is known."""
        if self.plan.mode in ("auto", "required") and self._calls_sent:
            return "tool_calls"
        return engine_reason

    def _limit(self, calls: list[ParsedCall]) -> list[ParsedCall]:
        return calls if self.plan.parallel else calls[:1]

