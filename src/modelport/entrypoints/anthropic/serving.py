"""POST /v1/messages and /v1/messages/count_tokens: Anthropic's Messages API, as vLLM and
llama.cpp's server serve it.

A Messages request is translated into a chat completion request and served by ServingChat
(the same chat template, sampling, tools, tool-call parser and reasoning parser); its
answer, or its stream of chunks, is translated back into a `message` object, or into
Anthropic's SSE events (message_start, content_block_*, message_delta, message_stop).
A final assistant message is continued (Anthropic's prefill), as continue_final_message.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import AsyncIterator, Callable
from typing import Any

from fastapi import Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import ValidationError

from modelport.engine.structured_output import validate as validate_structured_outputs
from modelport.entrypoints.anthropic.protocol import (
    CountTokensRequest,
    MessagesRequest,
    validation_message,
)
from modelport.entrypoints.openai.errors import OpenAIError
from modelport.entrypoints.openai.protocol import (
    ChatCompletionRequest,
    ChatMessage,
    ChatTool,
    FunctionCallIn,
    FunctionDefinition,
    NamedToolChoice,
    ResponseFormat,
    TextPart,
    ToolCallIn,
)
from modelport.entrypoints.openai.serving_chat import (
    ServingChat,
    render_chat_prompt,
    with_default_kwargs,
)
from modelport.entrypoints.openai.tools import template_tool
from modelport.sampling_params import StructuredOutputsParams

# (request, model) -> the ServingChat of the engine serving that model
ChatFactory = Callable[[Request, str | None], ServingChat]

_UNSERVED_BLOCKS = {
    "image": "image blocks are not supported: this server serves text models",
    "document": "document blocks are not supported: send the text as a text block",
}


def _text(block: dict[str, Any], where: str) -> str:
    text = block.get("text")
    if not isinstance(text, str):
        raise OpenAIError(f"{where}.text: a text block needs a string text", 400)
    return text


def _refuse(kind: Any, where: str, allowed: str) -> OpenAIError:
    why = _UNSERVED_BLOCKS.get(kind) if isinstance(kind, str) else None
    return OpenAIError(f"{where}: {why or f'blocks of type {kind!r} are not supported'}; "
                       f"send {allowed}", 400)


def _text_blocks(content: Any, where: str) -> list[str]:
    """A string, or a list of text blocks (system prompts, tool results)."""
    if isinstance(content, str):
        return [content]
    if not isinstance(content, list):
        raise OpenAIError(f"{where}: must be a string or a list of text blocks", 400)
    out = []
    for j, block in enumerate(content):
        kind = block.get("type") if isinstance(block, dict) else None
        if kind != "text":
            raise _refuse(kind, f"{where}[{j}]", "text blocks")
        out.append(_text(block, f"{where}[{j}]"))
    return out


def _tool_result(block: dict[str, Any], where: str) -> ChatMessage:
    use_id = block.get("tool_use_id")
    if not isinstance(use_id, str) or not use_id:
        raise OpenAIError(f"{where}.tool_use_id: a tool_result needs the id of the tool_use "
                          "it answers", 400)
    content = block.get("content", "")
    text = "".join(_text_blocks(content, f"{where}.content"))
    return ChatMessage(role="tool", tool_call_id=use_id, content=text)


def _tool_use(block: dict[str, Any], where: str) -> ToolCallIn:
    name, args = block.get("name"), block.get("input", {})
    if not isinstance(name, str) or not name or not isinstance(args, dict):
        raise OpenAIError(f"{where}: a tool_use block needs a name and an input object", 400)
    return ToolCallIn(id=block.get("id"), function=FunctionCallIn(name=name,
                                                                   arguments=json.dumps(args)))


def _turn(role: str, content: list[dict[str, Any]], where: str) -> list[ChatMessage]:
    """One Anthropic message of blocks -> chat messages: a user turn's tool results become
    tool messages (first, as Anthropic puts them), an assistant turn's tool uses its
    tool_calls; earlier thinking is not shown to the template (as vLLM's Responses)."""
    texts: list[TextPart] = []
    calls: list[ToolCallIn] = []
    results: list[ChatMessage] = []
    for j, block in enumerate(content):
        at = f"{where}[{j}]"
        kind = block.get("type") if isinstance(block, dict) else None
        if kind == "text":
            texts.append(TextPart(type="text", text=_text(block, at)))
        elif kind == "tool_use" and role == "assistant":
            calls.append(_tool_use(block, at))
        elif kind == "tool_result" and role == "user":
            results.append(_tool_result(block, at))
        elif kind in ("thinking", "redacted_thinking") and role == "assistant":
            continue
        else:
            allowed = ("text and tool_use blocks" if role == "assistant"
                       else "text and tool_result blocks")
            raise _refuse(kind, at, allowed)
    if role == "assistant":
        return [ChatMessage(role="assistant", content=texts or None, tool_calls=calls or None)]
    return results + ([ChatMessage(role="user", content=texts)] if texts else [])


def chat_messages(req: CountTokensRequest) -> list[ChatMessage]:
    """system (a string or text blocks, and any role "system" messages, as vLLM), then the
    turns, as chat messages."""
    system = _text_blocks(req.system, "system") if req.system is not None else []
    turns: list[ChatMessage] = []
    for i, m in enumerate(req.messages):
        where = f"messages[{i}].content"
        if m.role == "system":
            system += _text_blocks(m.content, where)
        elif isinstance(m.content, str):
            turns.append(ChatMessage(role=m.role, content=m.content))
        elif not m.content:
            raise OpenAIError(f"{where}: must not be empty", 400)
        else:
            turns += _turn(m.role, m.content, where)
    if not turns:
        raise OpenAIError("messages: at least one user or assistant message is needed", 400)
    head = [ChatMessage(role="system", content="".join(system))] if system else []
    return head + turns


def _prefill(messages: list[ChatMessage]) -> bool:
    """A final assistant message of text is Anthropic's prefill: the answer continues it."""
    last = messages[-1]
    return last.role == "assistant" and not last.tool_calls


def _tools(req: CountTokensRequest) -> list[ChatTool] | None:
    if not req.tools:
        return None
    out = []
    for i, t in enumerate(req.tools):
        if t.type not in (None, "custom"):
            raise OpenAIError(f"tools[{i}]: tools of type {t.type!r} (Anthropic's server "
                              "tools) are not supported; only client tools (name, "
                              "description, input_schema)", 400)
        if t.input_schema is None:
            raise OpenAIError(f"tools.{i}.input_schema: Field required", 400)
        out.append(ChatTool(function=FunctionDefinition(
            name=t.name, description=t.description, parameters=t.input_schema)))
    return out


def _tool_choice(req: CountTokensRequest) -> Any:
    tc = req.tool_choice
    if tc is None:
        return None
    if tc.type == "tool":
        if not tc.name:
            raise OpenAIError('tool_choice: type "tool" needs the name of the tool', 400)
        return NamedToolChoice(function={"name": tc.name})
    return {"auto": "auto", "any": "required", "none": "none"}[tc.type]


def _response_format(req: MessagesRequest) -> ResponseFormat | None:
    """output_config.format (structured outputs) as chat's json_schema response_format;
    an unusable schema is a 400 naming output_config.format.schema."""
    fmt = req.output_config.format if req.output_config is not None else None
    if fmt is None:
        return None
    try:
        validate_structured_outputs(StructuredOutputsParams(json=fmt.json_schema))
    except (ValueError, TypeError) as e:
        msg = str(e).replace("structured_outputs.json", "output_config.format.schema")
        raise OpenAIError(msg, 400) from None
    return ResponseFormat(type="json_schema",
                          json_schema={"name": "output", "schema": fmt.json_schema})


def to_chat_request(req: MessagesRequest) -> ChatCompletionRequest:
    messages = chat_messages(req)
    prefill = _prefill(messages)
    user = (req.metadata or {}).get("user_id")
    tc = req.tool_choice
    try:
        return ChatCompletionRequest(
            model=req.model,
            messages=messages,
            max_tokens=req.max_tokens,
            stop=req.stop_sequences or None,
            temperature=req.temperature,
            top_p=req.top_p,
            top_k=req.top_k,
            stream=req.stream,
            # continuous usage: message_start carries the prompt's input_tokens
            stream_options={"include_usage": True, "continuous_usage_stats": True}
            if req.stream else None,
            user=user if isinstance(user, str) else None,
            tools=_tools(req),
            tool_choice=_tool_choice(req),
            parallel_tool_calls=False if tc is not None and tc.disable_parallel_tool_use
            else None,
            add_generation_prompt=not prefill,
            continue_final_message=prefill,
            include_reasoning=req.thinking is None or req.thinking.type != "disabled",
            response_format=_response_format(req),
        )
    except ValidationError as e:
        raise OpenAIError(validation_message(e), 400) from None


def count_tokens(chat: ServingChat, req: CountTokensRequest) -> int:
    """The prompt's tokens as /v1/messages renders it (its usage.input_tokens)."""
    messages = chat_messages(req)
    prefill = _prefill(messages)
    tools = _tools(req)
    ids, _ = render_chat_prompt(
        chat.engine, messages, not prefill, [template_tool(t) for t in tools] if tools else None,
        prefill, with_default_kwargs(chat.default_chat_template_kwargs, None))
    return len(ids)


# ---------------------------------------------------------------- the answer


def _stop(finish_reason: str | None, matched: Any, stop_sequences: list[str] | None,
          called: bool) -> tuple[str, str | None]:
    """(stop_reason, stop_sequence) of a chat choice's finish."""
    if finish_reason == "length":
        return "max_tokens", None
    if called:  # a forced call (tool_choice tool / any) too, as Anthropic
        return "tool_use", None
    if isinstance(matched, str) and matched in (stop_sequences or ()):
        return "stop_sequence", matched
    return "end_turn", None


def _tool_input(arguments: str) -> Any:
    try:
        return json.loads(arguments) if arguments else {}
    except json.JSONDecodeError:
        return {"arguments": arguments}  # never a parser's output: kept rather than lost


def _message(msg_id: str, model: str, content: list[dict[str, Any]], stop: str | None,
             stop_sequence: str | None, n_in: int, n_out: int) -> dict[str, Any]:
    return {"id": msg_id, "type": "message", "role": "assistant", "content": content,
            "model": model, "stop_reason": stop, "stop_sequence": stop_sequence,
            "usage": {"input_tokens": n_in, "output_tokens": n_out}}


class ServingMessages:
    def __init__(self, chat: ServingChat) -> None:
        self.chat = chat

    async def create(self, req: MessagesRequest, raw: Request) -> Response:
        answer = await self.chat.create(to_chat_request(req), raw)
        msg_id = f"msg_{uuid.uuid4().hex}"
        if isinstance(answer, StreamingResponse):
            return StreamingResponse(self._stream(req, msg_id, answer.body_iterator),
                                     media_type="text/event-stream")
        if not isinstance(answer, JSONResponse):
            return answer  # the client went away (499)
        body = json.loads(bytes(answer.body))
        choice = body["choices"][0]
        msg = choice["message"]
        content: list[dict[str, Any]] = []
        if msg.get("reasoning"):
            content.append({"type": "thinking", "thinking": msg["reasoning"], "signature": ""})
        if msg.get("content"):
            content.append({"type": "text", "text": msg["content"]})
        for c in msg.get("tool_calls") or []:
            content.append({"type": "tool_use", "id": c["id"], "name": c["function"]["name"],
                            "input": _tool_input(c["function"]["arguments"])})
        stop, seq = _stop(choice.get("finish_reason"), choice.get("stop_reason"),
                          req.stop_sequences, bool(msg.get("tool_calls")))
        u = body["usage"]
        return JSONResponse(_message(msg_id, body["model"], content, stop, seq,
                                     u["prompt_tokens"], u["completion_tokens"]))

    async def _stream(self, req: MessagesRequest, msg_id: str,
                      chunks: AsyncIterator[Any]) -> AsyncIterator[str]:
        writer = _EventWriter(msg_id, req.stop_sequences)
        try:
            async for raw in chunks:
                text = raw if isinstance(raw, str) else bytes(raw).decode()
                for line in text.splitlines():
                    if not line.startswith("data: ") or line == "data: [DONE]":
                        continue
                    for e in writer.feed(json.loads(line[6:])):
                        yield e
                    if writer.failed:
                        return
            for e in writer.finish():
                yield e
        finally:
            aclose = getattr(chunks, "aclose", None)
            if aclose is not None:
                await aclose()  # ends the engine request when the client goes away


# an in-band chat stream error's OpenAI type -> Anthropic's (others: api_error)
_ERROR_TYPES = {"invalid_request_error": "invalid_request_error",
                "not_found_error": "not_found_error",
                "service_unavailable_error": "overloaded_error"}


def _event(kind: str, **data: Any) -> str:
    return f"event: {kind}\ndata: {json.dumps({'type': kind, **data})}\n\n"


class _EventWriter:
    """Chat completion chunks -> Anthropic's stream events. Blocks open and close in
    order (thinking, text, each tool_use); a block's index is its place in the content."""

    def __init__(self, msg_id: str, stop_sequences: list[str] | None) -> None:
        self.msg_id = msg_id
        self.stop_sequences = stop_sequences
        self.started = False
        self.failed = False
        self.n_blocks = 0
        self.open: tuple[str, int] | None = None  # (kind, index) of the open block
        self.calls: dict[int, int] = {}  # chat tool call index -> block index
        self.finish_reason: str | None = None
        self.matched: Any = None
        self.n_in = self.n_out = 0

    def feed(self, chunk: dict[str, Any]) -> list[str]:
        events: list[str] = []
        if "error" in chunk:  # the chat stream failed after it began
            self.failed = True
            err = chunk["error"]
            kind = _ERROR_TYPES.get(err.get("type"), "api_error")
            return self.close() + [_event("error", error={"type": kind,
                                                          "message": err.get("message", "")})]
        if chunk.get("usage"):
            self.n_in = chunk["usage"]["prompt_tokens"]
            self.n_out = chunk["usage"]["completion_tokens"]
        if not self.started:
            self.started = True
            events.append(_event("message_start", message=_message(
                self.msg_id, chunk["model"], [], None, None, self.n_in, 0)))
            events.append(_event("ping"))
        for choice in chunk.get("choices") or []:
            if choice.get("finish_reason") is not None:
                self.finish_reason = choice["finish_reason"]
                self.matched = choice.get("stop_reason")
            delta = choice.get("delta") or {}
            calls = delta.get("tool_calls") or []
            # a step may end a call and write text after it: the call's last arguments go
            # to its block before that block stops (then the text, then any new calls)
            going_on = [c for c in calls if c.get("index") in self.calls]
            if delta.get("reasoning"):
                events += self._delta("thinking", {"type": "thinking_delta",
                                                   "thinking": delta["reasoning"]})
            for call in going_on:
                events += self._call(call)
            if delta.get("content"):
                events += self._delta("text", {"type": "text_delta", "text": delta["content"]})
            for call in calls:
                if not any(call is c for c in going_on):
                    events += self._call(call)
        return events

    def _start(self, kind: str, block: dict[str, Any]) -> list[str]:
        events = self.close()
        self.open = (kind, self.n_blocks)
        self.n_blocks += 1
        return events + [_event("content_block_start", index=self.open[1],
                                content_block=block)]

    def _delta(self, kind: str, delta: dict[str, Any]) -> list[str]:
        events: list[str] = []
        if self.open is None or self.open[0] != kind:
            block = ({"type": "text", "text": ""} if kind == "text"
                     else {"type": "thinking", "thinking": "", "signature": ""})
            events = self._start(kind, block)
        assert self.open is not None
        return events + [_event("content_block_delta", index=self.open[1], delta=delta)]

    def _call(self, call: dict[str, Any]) -> list[str]:
        events: list[str] = []
        fn = call.get("function") or {}
        if call["index"] not in self.calls:
            events = self._start("tool_use", {"type": "tool_use", "id": call.get("id"),
                                              "name": fn.get("name", ""), "input": {}})
            assert self.open is not None
            self.calls[call["index"]] = self.open[1]
        if fn.get("arguments"):
            events.append(_event("content_block_delta", index=self.calls[call["index"]],
                                 delta={"type": "input_json_delta",
                                        "partial_json": fn["arguments"]}))
        return events

    def close(self) -> list[str]:
        if self.open is None:
            return []
        index, self.open = self.open[1], None
        return [_event("content_block_stop", index=index)]

    def finish(self) -> list[str]:
        stop, seq = _stop(self.finish_reason, self.matched, self.stop_sequences,
                          bool(self.calls))
        return self.close() + [
            _event("message_delta", delta={"stop_reason": stop, "stop_sequence": seq},
                   usage={"input_tokens": self.n_in, "output_tokens": self.n_out}),
            _event("message_stop"),
        ]
