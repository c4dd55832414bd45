"""POST /v1/responses: OpenAI's Responses API for text models, as vLLM serves it.

A Responses request is translated into a chat completion request and served by ServingChat
(the same chat template, engine, sampling conversion, structured outputs, tools and
reasoning parsing); its answer, or its stream of chunks, is translated back into a
`response` object, or into the Responses API's typed SSE events.

No responses are stored (vLLM's default, without VLLM_ENABLE_RESPONSES_API_STORE): as vLLM,
`store: true` is served as `store: false`, `background` is refused, and `previous_response_id`
and GET / cancel of a response id answer 404 (no such response).
"""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import AsyncIterator
from typing import Any, Literal

from fastapi import Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import Field, ValidationError

from modelport.engine.async_llm import AsyncLLM
from modelport.entrypoints.openai.errors import OpenAIError
from modelport.entrypoints.openai.protocol import (
    ChatCompletionRequest,
    ChatMessage,
    ChatTool,
    FunctionCallIn,
    FunctionDefinition,
    NamedToolChoice,
    ResponseFormat,
    TextRequest,
    ToolCallIn,
)
from modelport.entrypoints.openai.serving_chat import ServingChat
from modelport.entrypoints.openai.tools import ToolSettings


def _id(prefix: str) -> str:
    return f"{prefix}_{uuid.uuid4().hex}"


class ResponsesRequest(TextRequest):
    """OpenAI's Responses API request: the fields served here (others are ignored)."""

    model: str | None = None
    input: str | list[dict[str, Any]]
    instructions: str | None = None
    max_output_tokens: int | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0.0, le=2.0)
    top_p: float | None = Field(None, gt=0.0, le=1.0)
    stream: bool = False
    text: dict[str, Any] | None = None
    metadata: dict[str, Any] | None = None
    user: str | None = None
    store: bool | None = True
    background: bool = False
    previous_response_id: str | None = None
    tools: list[dict[str, Any]] | None = None
    tool_choice: str | dict[str, Any] | None = None
    parallel_tool_calls: bool | None = None
    reasoning: dict[str, Any] | None = None
    truncation: Literal["auto", "disabled"] | None = None
    service_tier: str | None = None
    # vLLM's: arguments for the server's custom logits processors (SamplingParams.extra_args)
    vllm_xargs: dict[str, str | int | float | list[str | int | float]] | None = None


def not_found(response_id: str) -> OpenAIError:
    """vLLM's 404 for a response id it does not hold (here: none is stored)."""
    return OpenAIError(
        f"Response with id '{response_id}' not found. (This server stores no responses: "
        "send the whole conversation as input.)",
        404,
        param="response_id",
    )


# ---------------------------------------------------------------- request -> chat request


def _text_of(content: Any, where: str) -> str:
    if isinstance(content, str):
        return content
    if not isinstance(content, list):
        raise OpenAIError(f"{where} must be a string or a list of input_text parts", 400,
                          param=where)
    out = []
    for j, part in enumerate(content):
        kind = part.get("type") if isinstance(part, dict) else None
        if kind not in ("input_text", "output_text", "text") or not isinstance(
                part.get("text"), str):
            raise OpenAIError(
                f"{where}[{j}]: only text parts ({{'type': 'input_text', 'text': ...}}) are "
                f"supported; got type {kind!r} (this server serves text models)",
                400, param=f"{where}[{j}]",
            )
        out.append(part["text"])
    return "".join(out)


def _messages(req: ResponsesRequest) -> list[ChatMessage]:
    """instructions (a system message first), then the input items, as chat messages."""
    msgs: list[ChatMessage] = []
    if req.instructions:
        msgs.append(ChatMessage(role="system", content=req.instructions))
    if isinstance(req.input, str):
        msgs.append(ChatMessage(role="user", content=req.input))
        return msgs
    if not req.input:
        raise OpenAIError("input must not be empty", 400, param="input")
    for i, item in enumerate(req.input):
        where = f"input[{i}]"
        kind = item.get("type", "message")
        if kind == "message":
            role = item.get("role")
            if role not in ("user", "system", "developer", "assistant"):
                raise OpenAIError(
                    f"{where}.role must be one of user, system, developer, assistant; "
                    f"got {role!r}", 400, param=f"{where}.role")
            msgs.append(ChatMessage(role=role, content=_text_of(item.get("content"),
                                                                f"{where}.content")))
        elif kind == "function_call":
            call = ToolCallIn(id=item.get("call_id"), function=FunctionCallIn(
                name=str(item.get("name", "")), arguments=item.get("arguments", "{}")))
            last = msgs[-1] if msgs else None
            if last is not None and last.role == "assistant" and last.tool_calls:
                last.tool_calls.append(call)  # parallel calls: one assistant message
            else:
                msgs.append(ChatMessage(role="assistant", content=None, tool_calls=[call]))
        elif kind == "function_call_output":
            output = item.get("output", "")
            msgs.append(ChatMessage(
                role="tool", tool_call_id=item.get("call_id"),
                content=output if isinstance(output, str) else _text_of(output,
                                                                        f"{where}.output")))
        elif kind == "reasoning":
            continue  # earlier thinking is not shown to the template (as vLLM)
        else:
            raise OpenAIError(
                f"{where}: input items of type {kind!r} are not supported; send messages, "
                "function_call or function_call_output items", 400, param=where)
    return msgs


def _response_format(req: ResponsesRequest) -> ResponseFormat | None:
    fmt = (req.text or {}).get("format")
    if fmt is None:
        return None
    kind = fmt.get("type") if isinstance(fmt, dict) else None
    if kind == "text":
        return None
    if kind == "json_object":
        return ResponseFormat(type="json_object")
    if kind == "json_schema":
        if not isinstance(fmt.get("schema"), dict):
            raise OpenAIError('text.format of type "json_schema" needs schema (the JSON schema '
                              "the output must follow)", 400, param="text.format.schema")
        return ResponseFormat(type="json_schema", json_schema={
            "name": fmt.get("name"), "schema": fmt["schema"], "strict": fmt.get("strict")})
    raise OpenAIError(f"text.format.type must be text, json_object or json_schema; got {kind!r}",
                      400, param="text.format.type")


def _tools(req: ResponsesRequest) -> list[ChatTool] | None:
    if not req.tools:
        return None
    out = []
    for i, t in enumerate(req.tools):
        if t.get("type") != "function":
            raise OpenAIError(
                f"tools[{i}]: tools of type {t.get('type')!r} are not supported; only "
                "function tools", 400, param=f"tools[{i}].type")
        try:
            out.append(ChatTool(function=FunctionDefinition(
                name=t.get("name"), description=t.get("description"),
                parameters=t.get("parameters"), strict=t.get("strict"))))
        except ValidationError:
            raise OpenAIError(f"tools[{i}] needs a name", 400, param=f"tools[{i}].name") from None
    return out


def _tool_choice(req: ResponsesRequest) -> Any:
    tc = req.tool_choice
    if tc is None or isinstance(tc, str):
        return tc
    if tc.get("type") == "function" and isinstance(tc.get("name"), str):
        return NamedToolChoice(function={"name": tc["name"]})
    raise OpenAIError('tool_choice must be "none", "auto", "required" or {"type": "function", '
                      '"name": ...}', 400, param="tool_choice")


def to_chat_request(req: ResponsesRequest) -> ChatCompletionRequest:
    if req.background:
        raise OpenAIError(
            "This server does not support `store=True` and therefore does not support the "
            "background mode.", 400, param="background")
    if req.previous_response_id is not None:
        raise not_found(req.previous_response_id)
    if req.truncation == "auto":
        raise OpenAIError('truncation "auto" is not supported: leave it out (or "disabled")',
                          400, param="truncation")
    try:
        return ChatCompletionRequest(
            model=req.model,
            messages=_messages(req),
            temperature=req.temperature,
            top_p=req.top_p,
            max_completion_tokens=req.max_output_tokens,
            stream=req.stream,
            stream_options={"include_usage": True} if req.stream else None,
            user=req.user,
            response_format=_response_format(req),
            tools=_tools(req),
            tool_choice=_tool_choice(req),
            parallel_tool_calls=req.parallel_tool_calls,
            vllm_xargs=req.vllm_xargs,
        )
    except ValidationError as e:
        err = e.errors()[0]
        where = ".".join(str(p) for p in err.get("loc", ()))
        raise OpenAIError(f"{where}: {err.get('msg')}", 400, param=where or None) from None


# chat field -> the Responses field a client sent
_PARAMS = {
    "messages": "input", "prompt": "input", "max_tokens": "max_output_tokens",
    "max_completion_tokens": "max_output_tokens", "response_format": "text.format",
}


def _renamed(e: OpenAIError) -> OpenAIError:
    if e.param in _PARAMS:
        e.param = _PARAMS[e.param]
    return e


# ---------------------------------------------------------------- the response object


def _usage(u: dict[str, Any] | None) -> dict[str, Any] | None:
    """The chat usage (with its details, where the chat path gives them), as Responses'."""
    if u is None:
        return None
    cached = ((u.get("prompt_tokens_details") or {}).get("cached_tokens")) or 0
    reasoning_tokens = (u.get("completion_tokens_details") or {}).get("reasoning_tokens") or 0
    return {
        "input_tokens": u.get("prompt_tokens", 0),
        "input_tokens_details": {"cached_tokens": cached},
        "output_tokens": u.get("completion_tokens", 0),
        "output_tokens_details": {"reasoning_tokens": reasoning_tokens},
        "total_tokens": u.get("total_tokens", 0),
    }


def _message_item(text: str, status: str = "completed", item_id: str | None = None) -> dict:
    return {"id": item_id or _id("msg"), "type": "message", "status": status,
            "role": "assistant", "content": [_text_part(text)]}


def _text_part(text: str) -> dict[str, Any]:
    return {"type": "output_text", "text": text, "annotations": [], "logprobs": []}


def _reasoning_item(text: str, item_id: str | None = None) -> dict[str, Any]:
    return {"id": item_id or _id("rs"), "type": "reasoning", "summary": [],
            "content": [{"type": "reasoning_text", "text": text}], "status": None}


def _call_item(call_id: str, name: str, arguments: str, status: str = "completed",
               item_id: str | None = None) -> dict[str, Any]:
    return {"id": item_id or _id("fc"), "type": "function_call", "status": status,
            "call_id": call_id, "name": name, "arguments": arguments}


class ServingResponses:
    def __init__(self, engine: AsyncLLM, tool_settings: ToolSettings | None = None,
                 reasoning_parser: str | None = None,
                 default_chat_template_kwargs: dict[str, Any] | None = None) -> None:
        # a Responses request has no chat_template (vLLM's has none either): the model's,
        # or the server's --chat-template, renders it
        self.chat = ServingChat(engine, tool_settings, reasoning_parser,
                                default_chat_template_kwargs)

    def _response(self, req: ResponsesRequest, rid: str, created: int, model: str,
                  status: str, output: list[dict], usage: dict | None,
                  finish_reason: str | None = None) -> dict[str, Any]:
        incomplete = None
        if finish_reason == "length":
            status, incomplete = "incomplete", {"reason": "max_output_tokens"}
        return {
            "id": rid,
            "object": "response",
            "created_at": created,
            "status": status,
            "background": False,
            "error": None,
            "incomplete_details": incomplete,
            "instructions": req.instructions,
            "max_output_tokens": req.max_output_tokens,
            "metadata": req.metadata,
            "model": model,
            "output": output,
            "parallel_tool_calls": True if req.parallel_tool_calls is None
            else req.parallel_tool_calls,
            "previous_response_id": None,
            "reasoning": req.reasoning,
            "service_tier": "auto",
            "store": False,  # as vLLM without its store: store: true is served as false
            "temperature": 1.0 if req.temperature is None else req.temperature,
            "text": {"format": (req.text or {}).get("format") or {"type": "text"}},
            "tool_choice": req.tool_choice or "auto",
            "tools": req.tools or [],
            "top_p": 1.0 if req.top_p is None else req.top_p,
            "truncation": req.truncation or "disabled",
            "usage": usage,
            "user": req.user,
        }

    async def create(self, req: ResponsesRequest, raw: Request) -> Response:
        chat_req = to_chat_request(req)
        try:
            answer = await self.chat.create(chat_req, raw)
        except OpenAIError as e:
            raise _renamed(e) from None
        rid = _id("resp")
        created = int(time.time())
        if isinstance(answer, StreamingResponse):
            model = self.chat.engine.served_model_names[0]  # as check_model answers
            return StreamingResponse(
                self._stream(req, rid, created, model, answer.body_iterator),
                media_type="text/event-stream",
            )
        if not isinstance(answer, JSONResponse):
            return answer  # the client went away (499)
        body = json.loads(bytes(answer.body))
        choice = body["choices"][0]
        msg = choice["message"]
        output: list[dict[str, Any]] = []
        if msg.get("reasoning"):
            output.append(_reasoning_item(msg["reasoning"]))
        if msg.get("content"):
            output.append(_message_item(msg["content"]))
        for c in msg.get("tool_calls") or []:
            output.append(_call_item(c["id"], c["function"]["name"], c["function"]["arguments"]))
        out = self._response(req, rid, created, body["model"], "completed", output,
                             _usage(body.get("usage")), choice.get("finish_reason"))
        return JSONResponse(out)

    async def _stream(self, req: ResponsesRequest, rid: str, created: int, model: str,
                      chunks: AsyncIterator[Any]) -> AsyncIterator[str]:
        seq = 0
        output: list[dict[str, Any]] = []
        cur: dict[str, Any] | None = None  # the open output item
        calls: dict[int, dict[str, Any]] = {}  # tool call index -> its item
        usage: dict[str, Any] | None = None
        finish_reason: str | None = None

        def event(kind: str, **data: Any) -> str:
            nonlocal seq
            payload = {"type": kind, "sequence_number": seq, **data}
            seq += 1
            return f"event: {kind}\ndata: {json.dumps(payload)}\n\n"

        def open_item(item: dict[str, Any]) -> list[str]:
            nonlocal cur
            events = close_item()
            cur = item
            output.append(item)
            idx = len(output) - 1
            shown = {**item, "status": "in_progress"}
            if item["type"] == "message":
                shown["content"] = []
            if item["type"] == "reasoning":
                shown["content"] = []
            events.append(event("response.output_item.added", output_index=idx, item=shown))
            if item["type"] == "message":
                events.append(event("response.content_part.added", item_id=item["id"],
                                    output_index=idx, content_index=0, part=_text_part("")))
            elif item["type"] == "reasoning":
                events.append(event("response.content_part.added", item_id=item["id"],
                                    output_index=idx, content_index=0,
                                    part={"type": "reasoning_text", "text": ""}))
            return events

        def close_item() -> list[str]:
            nonlocal cur
            if cur is None:
                return []
            item, cur = cur, None
            idx = output.index(item)
            events = []
            if item["type"] == "message":
                part = item["content"][0]
                events.append(event("response.output_text.done", item_id=item["id"],
                                    output_index=idx, content_index=0, text=part["text"],
                                    logprobs=[]))
                events.append(event("response.content_part.done", item_id=item["id"],
                                    output_index=idx, content_index=0, part=part))
            elif item["type"] == "reasoning":
                part = item["content"][0]
                events.append(event("response.reasoning_text.done", item_id=item["id"],
                                    output_index=idx, content_index=0, text=part["text"]))
                events.append(event("response.content_part.done", item_id=item["id"],
                                    output_index=idx, content_index=0, part=part))
            else:
                events.append(event("response.function_call_arguments.done",
                                    item_id=item["id"], output_index=idx, name=item["name"],
                                    arguments=item["arguments"]))
            item["status"] = "completed"
            events.append(event("response.output_item.done", output_index=idx, item=item))
            return events

        start = self._response(req, rid, created, model, "in_progress", [], None)
        yield event("response.created", response=start)
        yield event("response.in_progress", response=start)
        try:
            async for raw in chunks:
                text = raw if isinstance(raw, str) else bytes(raw).decode()
                for line in text.splitlines():
                    if not line.startswith("data: ") or line == "data: [DONE]":
                        continue
                    chunk = json.loads(line[6:])
                    if "error" in chunk:  # the chat stream failed after it began
                        err = chunk["error"]
                        for e in close_item():
                            yield e
                        yield event("error", code=err.get("code"), message=err.get("message"),
                                    param=err.get("param"))
                        failed = self._response(req, rid, created, model, "failed", output,
                                                _usage(usage))
                        failed["error"] = {"code": "server_error" if err.get("code") is None
                                           else str(err["code"]),
                                           "message": err.get("message", "")}
                        yield event("response.failed", response=failed)
                        return
                    if chunk.get("usage"):
                        usage = chunk["usage"]
                    for choice in chunk.get("choices") or []:
                        finish_reason = choice.get("finish_reason") or finish_reason
                        delta = choice.get("delta") or {}
                        for e in self._feed(delta, event, open_item, calls, output,
                                            lambda: cur):
                            yield e
            for e in close_item():
                yield e
            done = self._response(req, rid, created, model, "completed", output,
                                  _usage(usage), finish_reason)
            yield event(f"response.{done['status']}", response=done)
        finally:
            aclose = getattr(chunks, "aclose", None)
            if aclose is not None:
                await aclose()  # ends the engine request when the client goes away

    @staticmethod
    def _feed(delta: dict[str, Any], event: Any, open_item: Any, calls: dict[int, dict],
              output: list[dict], current: Any) -> list[str]:
        events: list[str] = []
        thought = delta.get("reasoning")
        if thought:
            cur = current()
            if cur is None or cur["type"] != "reasoning":
                events += open_item(_reasoning_item(""))
                cur = current()
            cur["content"][0]["text"] += thought
            events.append(event("response.reasoning_text.delta", item_id=cur["id"],
                                output_index=output.index(cur), content_index=0,
                                delta=thought))
        deltas = delta.get("tool_calls") or []
        # a step may end a call and write text after it: the call's last arguments go to
        # its item before that item is done (then the text, then any new calls)
        going_on = [d for d in deltas if d.get("index") in calls]
        events += ServingResponses._feed_calls(going_on, event, open_item, calls, output)
        content = delta.get("content")
        if content:
            cur = current()
            if cur is None or cur["type"] != "message":
                events += open_item(_message_item("", status="in_progress"))
                cur = current()
            cur["content"][0]["text"] += content
            events.append(event("response.output_text.delta", item_id=cur["id"],
                                output_index=output.index(cur), content_index=0,
                                delta=content, logprobs=[]))
        fresh = [d for d in deltas if not any(d is g for g in going_on)]
        return events + ServingResponses._feed_calls(fresh, event, open_item, calls, output)

    @staticmethod
    def _feed_calls(deltas: list[dict[str, Any]], event: Any, open_item: Any,
                    calls: dict[int, dict], output: list[dict]) -> list[str]:
        events: list[str] = []
        for d in deltas:
            fn = d.get("function") or {}
            if d["index"] not in calls:
                item = _call_item(d.get("id") or _id("call"), fn.get("name", ""), "",
                                  status="in_progress")
                calls[d["index"]] = item
                events += open_item(item)
            item = calls[d["index"]]
            args = fn.get("arguments")
            if args:
                item["arguments"] += args
                events.append(event("response.function_call_arguments.delta",
                                    item_id=item["id"], output_index=output.index(item),
                                    delta=args))
        return events
