"""POST /v1/chat/completions: messages through the model's chat template, chat objects out.

The template comes with the model (GGUF metadata or tokenizer_config.json), so it is
untrusted input: the tokenizer renders it in a sandboxed jinja2 environment, and any
template failure is the request's 400, never the server's 500.
"""

from __future__ import annotations

import asyncio
import inspect
from collections.abc import AsyncIterator, Callable
from typing import Any

from fastapi import Request
from fastapi.responses import JSONResponse, Response, StreamingResponse

from modelport.engine.async_llm import AsyncLLM, RequestStream
from modelport.entrypoints.openai import protocol
from modelport.entrypoints.openai.chat_template import request_chat_template
from modelport.entrypoints.openai.errors import OpenAIError
from modelport.entrypoints.openai.lora import lora_for
from modelport.entrypoints.openai.protocol import (
    AssistantMessage,
    ChatChoice,
    ChatCompletionChunk,
    ChatCompletionRequest,
    ChatCompletionResponse,
    ChatMessage,
    ChatStreamChoice,
    ChoiceLogprobs,
    ChunkJSON,
    DeltaMessage,
    DeltaToolCall,
    TokenLogprob,
    TopLogprob,
    chat_choice_json,
    dump,
    random_id,
)
from modelport.entrypoints.openai.reasoning import (
    ReasoningParser,
    ReasoningPlan,
    ReasoningStreamer,
    get_reasoning_parser,
    think_token_ids,
)
from modelport.entrypoints.openai.serving_common import (
    SSE_DONE,
    BeamSearchStream,
    ClientGone,
    admit,
    beam_search_params,
    cached_tokens,
    check_max_logprobs,
    check_model,
    check_priority,
    check_prompt_ids,
    check_unsupported,
    collect_final,
    known_error,
    make_sampling_params,
    prompt_logprobs_out,
    sampling_defaults,
    sse,
    start_streams,
    stream_error,
    token_text,
    top_entries,
    truncate_prompt,
    unless_disconnected,
    usage,
    usage_options,
)
from modelport.entrypoints.openai.tool_parsers import history_for_template
from modelport.entrypoints.openai.tools import (
    ToolChoiceOutput,
    ToolPlan,
    ToolSettings,
    plan_tools,
)
from modelport.outputs import LogprobsDict, RequestOutput

# Appended to the final message when it is to be continued: the rendered prompt is cut where
# the marker lands, so whatever the template puts after that message (end of turn, a new
# generation prompt) is dropped. Plain letters survive trim, escaping and tojson filters.
_CONTINUE_MARK = "MODELPORTCONTINUEHEREq7Zx"


# chat_template_kwargs that would override what the server itself passes (or switch the
# tokenizer to HF's own rendering): dropped
_RESERVED_TEMPLATE_KWARGS = frozenset({
    "messages", "conversation", "tools", "add_generation_prompt", "chat_template",
    "tokenize", "return_dict", "padding", "truncation", "max_length", "return_tensors",
    "return_assistant_tokens_mask", "tokenizer_kwargs", "continue_final_message",
    "sanitize_control_tokens",
})


def render_chat(
    engine: AsyncLLM,
    messages: list[ChatMessage],
    add_generation_prompt: bool = True,
    tools: list[dict[str, Any]] | None = None,
    continue_final_message: bool = False,
    chat_template_kwargs: dict[str, Any] | None = None,
    chat_template: str | None = None,
) -> list[int]:
    """Messages (and tools, for a tool-aware template) -> prompt token ids via the model's
    (sandboxed) chat template.

    continue_final_message leaves the final (assistant) message open, so the model goes on
    writing it ("prefill") instead of starting a new turn. chat_template_kwargs become
    template variables (vLLM's; e.g. enable_thinking). chat_template (a request's, with
    --trust-request-chat-template) replaces the model's template.
    """
    return render_chat_prompt(engine, messages, add_generation_prompt, tools,
                              continue_final_message, chat_template_kwargs, chat_template)[0]


def render_chat_prompt(engine: AsyncLLM, *args: Any, **kw: Any) -> tuple[list[int], str | None]:
    """render_chat's ids and the rendered prompt text (None when the template gave ids);
    the arguments are ``render_chat_text``'s."""
    rendered = render_chat_text(engine, *args, **kw)
    if isinstance(rendered, str):
        return engine.encode(rendered, add_special_tokens=False), rendered
    return rendered, None


async def render_chat_prompt_async(engine: AsyncLLM, *args: Any, **kw: Any
                                   ) -> tuple[list[int], str | None]:
    """render_chat_prompt with a long rendered prompt encoded off the event loop
    (``AsyncLLM.encode_async``)."""
    rendered = render_chat_text(engine, *args, **kw)
    if isinstance(rendered, str):
        return await engine.encode_async(rendered, add_special_tokens=False), rendered
    return rendered, None


def render_chat_text(
    engine: AsyncLLM,
    messages: list[ChatMessage],
    add_generation_prompt: bool = True,
    tools: list[dict[str, Any]] | None = None,
    continue_final_message: bool = False,
    chat_template_kwargs: dict[str, Any] | None = None,
    chat_template: str | None = None,
) -> str | list[int]:
    """The chat template's prompt text (or the ids a template returned directly)."""
    parts = _content_as_parts(engine.tokenizer, tools, chat_template)
    convo = history_for_template([template_message(m, parts) for m in messages])
    if continue_final_message:
        check_continue(messages, add_generation_prompt)
        last = convo[-1]
        if isinstance(last["content"], list):  # after the final text part
            texts = [i for i, p in enumerate(last["content"]) if p.get("type") == "text"]
            if texts:
                i = texts[-1]
                part = last["content"][i]
                last["content"][i] = {**part, "text": part["text"] + _CONTINUE_MARK}
            else:
                last["content"].append({"type": "text", "text": _CONTINUE_MARK})
        else:
            last["content"] = (last["content"] or "") + _CONTINUE_MARK
    apply = engine.tokenizer.apply_chat_template
    kw: dict[str, Any] = {
        k: v for k, v in (chat_template_kwargs or {}).items()
        if k not in _RESERVED_TEMPLATE_KWARGS
    }
    kw["add_generation_prompt"] = add_generation_prompt
    if tools and _takes_tools(apply):
        kw["tools"] = tools
    if chat_template is not None:
        kw["chat_template"] = chat_template
    try:
        rendered = apply(convo, **kw)
    except Exception as e:  # jinja2 SecurityError/TemplateError, missing template, ...
        if chat_template is not None:  # the request's own template failed
            raise OpenAIError(
                f"chat_template: the request's chat template failed to render: "
                f"{type(e).__name__}: {e}", 400, param="chat_template") from None
        raise OpenAIError(
            f"could not apply the chat template: {type(e).__name__}: {e}", 400, param="messages"
        ) from None
    if continue_final_message:
        if not isinstance(rendered, str) or _CONTINUE_MARK not in rendered:
            raise OpenAIError(
                "continue_final_message: the chat template does not render the final "
                "message's text, so it cannot be continued",
                400,
                param="messages",
            )
        rendered = rendered[: rendered.rindex(_CONTINUE_MARK)]
    return rendered if isinstance(rendered, str) else list(rendered)


def check_continue(messages: list[ChatMessage], add_generation_prompt: bool) -> None:
    """What continuing the final message needs (frontend/processor.py's rules), as a 400."""
    from modelport.frontend.processor import InvalidField, check_continue_final

    try:
        check_continue_final(messages[-1].role if messages else None, add_generation_prompt)
    except InvalidField as e:
        raise OpenAIError(str(e), 400, param=e.param) from None


def _takes_tools(fn: Any) -> bool:
    try:
        params = inspect.signature(fn).parameters.values()
    except (TypeError, ValueError):
        return False
    return any(p.name == "tools" or p.kind is p.VAR_KEYWORD for p in params)


def _content_as_parts(tok: Any, tools: Any, chat_template: str | None) -> bool:
    """Whether the template gets a message's content as a list of text parts (vLLM's
    --chat-template-content-format openai, or auto with a template that loops over it)."""
    fmt = getattr(tok, "chat_template_content_format", "string")
    if fmt == "auto":
        from modelport.frontend.tokenizer import detect_content_format

        try:
            template = tok._template(tools, chat_template)
        except (AttributeError, ValueError):  # no template: apply_chat_template says so
            return False
        fmt = detect_content_format(template) if isinstance(template, str) else "string"
    return fmt == "openai"


def template_message(m: ChatMessage, parts: bool = False) -> dict[str, Any]:
    """One message as the chat template sees it (vLLM's fields: name, an assistant's
    tool_calls, a tool message's tool_call_id); ``parts``: the content as a list of
    ``{"type": "text", "text": ...}`` parts (a string one part, none an empty list), else
    one string."""
    content: Any = m.text()
    if parts:
        if isinstance(m.content, list):
            content = [{"type": "text", "text": p.text} for p in m.content]
        else:
            content = [] if m.content is None else [{"type": "text", "text": m.content}]
    d: dict[str, Any] = {"role": m.role, "content": content}
    if m.name is not None:
        d["name"] = m.name
    if m.tool_calls:
        d["tool_calls"] = [c.model_dump(exclude_none=True) for c in m.tool_calls]
    if m.tool_call_id is not None:
        d["tool_call_id"] = m.tool_call_id
    return d


def with_default_kwargs(
    defaults: dict[str, Any] | None, request_kwargs: dict[str, Any] | None
) -> dict[str, Any] | None:
    """vLLM's --default-chat-template-kwargs: the server's defaults under the request's
    chat_template_kwargs (a key the request gives wins; a shallow merge)."""
    if not defaults:
        return request_kwargs
    return {**defaults, **(request_kwargs or {})}


def one_entry_per_call(calls: list[DeltaToolCall]) -> list[list[DeltaToolCall]]:
    """A step's tool-call deltas split into successive chunks' worth, each holding at most
    one entry per call: as vLLM and OpenAI stream them, so that a client reading
    ``delta.tool_calls[0]`` misses nothing (a call's name and its first arguments may come
    in one step; the name goes first, alone, as vLLM sends it). Always one list at least."""
    groups: list[list[DeltaToolCall]] = [[]]
    for c in calls:
        if any(d.index == c.index for d in groups[-1]):
            groups.append([])
        groups[-1].append(c)
    return groups


class ServingChat:
    def __init__(self, engine: AsyncLLM, tool_settings: ToolSettings | None = None,
                 reasoning_parser: str | None = None,
                 default_chat_template_kwargs: dict[str, Any] | None = None,
                 trust_request_chat_template: bool = False) -> None:
        self.engine = engine
        self.tool_settings = tool_settings or ToolSettings()
        self.reasoning_parser = reasoning_parser  # --reasoning-parser
        self.default_chat_template_kwargs = default_chat_template_kwargs or {}
        self.trust_request_chat_template = trust_request_chat_template

    async def create(self, req: ChatCompletionRequest, raw: Request) -> Response:
        engine = self.engine
        model = check_model(engine, req.model)
        check_unsupported(req)
        chat_template = request_chat_template(req, self.trust_request_chat_template)
        if req.echo:
            raise OpenAIError("echo is not supported for chat completions", 400, param="echo")
        plan = plan_tools(req, self.tool_settings)
        if plan.constraint is not None and req.use_beam_search:
            raise OpenAIError(
                "use_beam_search cannot answer with a tool call (tool_choice naming a function "
                'or "required" constrains sampling): leave use_beam_search out',
                400, param="use_beam_search",
            )
        template_kwargs = with_default_kwargs(self.default_chat_template_kwargs,
                                              req.chat_template_kwargs)
        ids, prompt_text = await render_chat_prompt_async(
            engine, req.messages, req.add_generation_prompt, plan.template_tools,
            req.continue_final_message, template_kwargs, chat_template,
        )
        ids = truncate_prompt(engine, ids, req.truncate_prompt_tokens)
        requested = req.max_completion_tokens or req.max_tokens
        max_tokens = check_prompt_ids(engine, ids, requested)
        k = None
        if req.logprobs:
            k = req.top_logprobs or 0
        elif req.top_logprobs:
            raise OpenAIError(
                "top_logprobs requires logprobs to be true", 400, param="top_logprobs"
            )
        check_max_logprobs(engine, top_logprobs=k, prompt_logprobs=req.prompt_logprobs)
        # a stream never sends prompt_logprobs (only 0 gets this far): not computed
        rid = req.request_id or random_id("chatcmpl")
        stream: Any
        check_priority(engine, req.priority)
        if req.use_beam_search:
            stream = BeamSearchStream(engine, ids, beam_search_params(engine, req, max_tokens), rid,
                                      lora_request=lora_for(engine, model),
                                      priority=req.priority)
            admit(engine, req.n)
        else:
            params = make_sampling_params(req, max_tokens, k,
                                          None if req.stream else req.prompt_logprobs,
                                          tool_constraint=plan.constraint,
                                          defaults=sampling_defaults(engine))
            admit(engine, req.n)
            stream = start_streams(engine, [(ids, params, rid, None)],
                                   lora_for(engine, model), req.priority)[0]
        reasoning = None
        count_reasoning = None
        if self.reasoning_parser is not None:
            parser = get_reasoning_parser(self.reasoning_parser, template_kwargs)
            reasoning = ReasoningPlan.for_request(parser, prompt_text, req.include_reasoning)
            count_reasoning = self._reasoning_counter(parser, reasoning)
        if req.stream:
            return StreamingResponse(
                self._stream(req, model, rid, stream, len(ids), plan, reasoning,
                             count_reasoning),
                media_type="text/event-stream",
            )
        try:
            final = (await unless_disconnected(raw, collect_final([stream])))[0]
        except ClientGone:
            return Response(status_code=499)
        except Exception as e:
            raise (known_error(e) or e) from None
        choices = []
        n_gen = n_reasoning = 0
        role = self.response_role(req)
        for o in sorted(final.outputs, key=lambda o: o.index):
            n_gen += len(o.token_ids)
            if count_reasoning is not None:
                n_reasoning += count_reasoning(o.token_ids)
            logprobs = None
            # vLLM: with include_reasoning false no logprobs either (they would show it)
            if k is not None and (reasoning is None or reasoning.include):
                logprobs = ChoiceLogprobs(content=self._logprobs(o.token_ids, o.logprobs, k))
            if reasoning is None:
                message, finish_reason = ToolChoiceOutput(plan).message(o.text, o.finish_reason)
            else:  # the tool parser sees the content only (as vLLM's)
                thought, content = reasoning.extract(o.text)
                if content is None and plan.mode in ("none", "auto"):
                    message, finish_reason = AssistantMessage(content=None), o.finish_reason
                else:
                    message, finish_reason = ToolChoiceOutput(plan).message(
                        content or "", o.finish_reason)
                message.reasoning = thought if reasoning.include else None
            message.role = role
            choices.append(
                ChatChoice(
                    index=o.index,
                    message=message,
                    logprobs=logprobs,
                    finish_reason=finish_reason,
                    stop_reason=o.stop_reason,
                )
            )
        prompt_logprobs = None
        # a beam search computes no prompt logprobs: null, as in vLLM
        if req.prompt_logprobs is not None and not req.use_beam_search:
            prompt_logprobs = prompt_logprobs_out(
                engine, ids, final.prompt_logprobs, req.prompt_logprobs
            )
        body = ChatCompletionResponse(
            id=rid,
            model=model,
            choices=choices,
            usage=usage(len(final.prompt_token_ids), n_gen,
                        None if count_reasoning is None else n_reasoning,
                        cached_tokens(engine, [final])),
            prompt_logprobs=prompt_logprobs,
        )
        return JSONResponse(body.model_dump())

    def response_role(self, req: ChatCompletionRequest) -> str:
        """vLLM's: --response-role when the prompt ends in a generation prompt, else the
        role of the message being written (the request's last)."""
        if req.add_generation_prompt:
            return getattr(self.engine, "response_role", None) or "assistant"
        return req.messages[-1].role

    def _reasoning_counter(
        self, parser: ReasoningParser, plan: ReasoningPlan
    ) -> Callable[[list[int]], int]:
        """usage.completion_tokens_details.reasoning_tokens of one choice's token ids, as
        vLLM counts them (by the think tags' ids; see ReasoningParser.count_reasoning_tokens).
        An answer that is all content (thinking off, ended in the prompt, constrained)
        has none."""
        if not plan.parse:
            return lambda ids: 0
        start, end = think_token_ids(parser.name, self.engine.tokenizer)
        return lambda ids: parser.count_reasoning_tokens(ids, start, end)

    def _logprobs(
        self, token_ids: list[int], positions: list[LogprobsDict] | None, k: int
    ) -> list[TokenLogprob]:
        out = []
        for j, tid in enumerate(token_ids):
            pos = positions[j] if positions is not None and j < len(positions) else {}
            chosen = pos.get(tid)
            tok = token_text(self.engine, tid, chosen)
            tops = [
                TopLogprob(token=t, logprob=v, bytes=list(t.encode("utf-8")))
                for _, t, v in top_entries(self.engine, pos, k)
            ]
            out.append(
                TokenLogprob(
                    token=tok,
                    logprob=chosen.logprob if chosen is not None else float("-inf"),
                    bytes=list(tok.encode("utf-8")),
                    top_logprobs=tops,
                )
            )
        return out

    async def _stream(
        self,
        req: ChatCompletionRequest,
        model: str,
        rid: str,
        stream: RequestStream,
        n_prompt: int,
        plan: ToolPlan,
        reasoning: ReasoningPlan | None = None,
        count_reasoning: Callable[[list[int]], int] | None = None,
    ) -> AsyncIterator[str]:
        k = (req.top_logprobs or 0) if req.logprobs else None
        if reasoning is not None and not reasoning.include:
            k = None  # vLLM: no logprobs when the reasoning is hidden (they would show it)
        tool_outputs = {i: ToolChoiceOutput(plan) for i in range(req.n)}
        thinking = {i: ReasoningStreamer(reasoning) for i in range(req.n)} if reasoning else {}
        sent_content: dict[int, int] = {}
        sent_text: dict[int, int] = {}
        sent_tokens: dict[int, int] = {}
        finished: set[int] = set()
        token_ids: dict[int, list[int]] = {}  # each choice's so far (reasoning_tokens)
        include_usage, continuous_usage = usage_options(
            req, getattr(self.engine, "force_include_usage", False))
        last: RequestOutput | None = None
        # plain content deltas: their chunks are written as JSON text (protocol.ChunkJSON)
        fast = (protocol.SSE_FASTPATH and plan.mode == "none" and reasoning is None
                and not continuous_usage)
        writer = ChunkJSON("chat.completion.chunk", rid, model)

        def chunk(choices: list[Any]) -> str:
            if fast:
                return sse(writer.chunk(choices))
            body = ChatCompletionChunk(id=rid, model=model, choices=choices)
            if not continuous_usage:
                return sse(dump(body, exclude={"usage"}))
            r = None
            if count_reasoning is not None:
                r = sum(count_reasoning(ids) for ids in token_ids.values())
            body.usage = usage(n_prompt, sum(sent_tokens.values()), r)
            return sse(dump(body))

        role = self.response_role(req)
        try:
            for i in range(req.n):  # one choice a chunk, as vLLM and OpenAI stream n > 1
                yield chunk([
                    chat_choice_json(i, "", None, None, None, role=role) if fast else
                    ChatStreamChoice(index=i, delta=DeltaMessage(role=role, content=""))
                ])
            async for out in stream:
                last = out
                choices = []
                for o in out.outputs:
                    if o.index in finished:
                        continue
                    text = o.text[sent_text.get(o.index, 0) :]
                    start = sent_tokens.get(o.index, 0)
                    new_ids = o.token_ids[start:]
                    sent_text[o.index] = len(o.text)
                    sent_tokens[o.index] = len(o.token_ids)
                    token_ids[o.index] = o.token_ids
                    if o.finish_reason is not None:
                        finished.add(o.index)
                    finish_reason = o.finish_reason
                    final = o.finish_reason is not None
                    thought: str | None = None
                    answer = o.text  # what content and tool calls are read from
                    more: list[list[DeltaToolCall]] = []  # further deltas, a chunk each
                    if reasoning is not None:
                        streamer = thinking.setdefault(o.index, ReasoningStreamer(reasoning))
                        thought, answer = streamer.feed(o.text, final)
                        thought = (thought or None) if reasoning.include else None
                    if fast:
                        pass  # the delta is the text: written below
                    elif plan.mode == "none":
                        if reasoning is None:
                            delta = DeltaMessage(content=text)
                        else:
                            fresh = answer[sent_content.get(o.index, 0) :]
                            sent_content[o.index] = len(answer)
                            delta = DeltaMessage(reasoning=thought, content=fresh or None)
                            if not fresh and thought is None and not final and k is None:
                                continue  # held back: a think tag may be arriving
                    else:  # text becomes content and tool-call deltas
                        out_i = tool_outputs.setdefault(o.index, ToolChoiceOutput(plan))
                        content, calls = out_i.feed(answer, final)
                        calls, *more = one_entry_per_call(calls)
                        delta = DeltaMessage(reasoning=thought, content=content,
                                             tool_calls=calls or None)
                        if final:
                            finish_reason = out_i.finish_reason(o.finish_reason)
                        elif content is None and not calls and thought is None and k is None:
                            continue  # nothing to send yet (a call is still being written)
                    if not text and o.finish_reason is None:
                        continue
                    logprobs = None
                    if k is not None and new_ids:
                        lps = o.logprobs[start:] if o.logprobs is not None else None
                        logprobs = ChoiceLogprobs(content=self._logprobs(new_ids, lps, k))
                    if fast:
                        choices.append(chat_choice_json(o.index, text, logprobs, finish_reason,
                                                        o.stop_reason))
                        continue
                    deltas = [delta, *(DeltaMessage(tool_calls=m) for m in more)]
                    for j, d in enumerate(deltas):  # the finish reason on the last
                        last_one = j == len(deltas) - 1
                        choices.append(
                            ChatStreamChoice(
                                index=o.index,
                                delta=d,
                                logprobs=logprobs if j == 0 else None,
                                finish_reason=finish_reason if last_one else None,
                                stop_reason=o.stop_reason if last_one else None,
                            )
                        )
                for choice in choices:
                    yield chunk([choice])
            if include_usage and last is not None:
                g = sum(len(o.token_ids) for o in last.outputs)
                r = None  # vLLM: reasoning_tokens in the final usage with --reasoning-parser
                if count_reasoning is not None:
                    r = sum(count_reasoning(ids) for ids in token_ids.values())
                body = ChatCompletionChunk(
                    id=rid, model=model, choices=[],
                    usage=usage(n_prompt, g, r, cached_tokens(self.engine, [last])),
                )
                yield sse(dump(body))
        except asyncio.CancelledError:
            raise
        except Exception as e:  # an answer already started: report in-band, then end cleanly
            yield stream_error("/v1/chat/completions (stream)", e)
        finally:
            await stream.aclose()
        yield SSE_DONE
