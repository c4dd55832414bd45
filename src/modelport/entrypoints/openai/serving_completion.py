"""POST /v1/completions: prompts (text, batches, token ids) in, text_completion objects out.

Several prompts become independent engine requests (ids `<id>-<i>`) that run concurrently;
choice index is prompt_index * n + output index, as OpenAI numbers them. Outputs from the
engine are cumulative, so streaming sends, per choice, whatever text is new since the last
chunk; the concatenation of the chunks is therefore the non-streamed text.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

from fastapi import Request
from fastapi.responses import JSONResponse, Response, StreamingResponse

from modelport.engine.async_llm import AsyncLLM, RequestStream
from modelport.entrypoints.openai import protocol
from modelport.entrypoints.openai.errors import OpenAIError
from modelport.entrypoints.openai.lora import lora_for
from modelport.entrypoints.openai.protocol import (
    ChunkJSON,
    CompletionChoice,
    CompletionLogProbs,
    CompletionRequest,
    CompletionResponse,
    completion_choice_json,
    dump,
    random_id,
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
    merge_streams,
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
from modelport.outputs import CompletionOutput, LogprobsDict, RequestOutput


class ServingCompletion:
    def __init__(self, engine: AsyncLLM) -> None:
        self.engine = engine

    async def _prompts(self, req: CompletionRequest) -> list[tuple[str | None, list[int]]]:
        p = req.prompt
        if isinstance(p, str):
            texts: list = [p]
        elif p and isinstance(p[0], int):
            texts = [p]
        else:
            texts = list(p)
        if not texts:
            raise OpenAIError("prompt must not be an empty list", 400, param="prompt")
        out: list[tuple[str | None, list[int]]] = []
        for item in texts:
            if isinstance(item, str):
                text, ids = item, await self.engine.encode_async(item)
            else:
                text, ids = None, list(item)
            kept = truncate_prompt(self.engine, ids, req.truncate_prompt_tokens)
            # a cut prompt is what the model sees (and echo returns): its text is decoded
            out.append((text if len(kept) == len(ids) else None, kept))
        return out

    async def create(self, req: CompletionRequest, raw: Request) -> Response:
        engine = self.engine
        model = check_model(engine, req.model)
        check_unsupported(req)
        check_max_logprobs(engine, logprobs=req.logprobs, prompt_logprobs=req.prompt_logprobs)
        prompts = await self._prompts(req)
        params_list = []
        echo_k = req.logprobs if (req.echo and req.logprobs is not None) else None
        # a stream never sends prompt_logprobs (only 0 gets this far): not computed
        asked = None if req.stream else req.prompt_logprobs
        wanted = [k for k in (echo_k, asked) if k is not None]
        prompt_k = (-1 if -1 in wanted else max(wanted)) if wanted else None  # -1: all
        defaults = sampling_defaults(engine)
        for _, ids in prompts:
            max_tokens = check_prompt_ids(engine, ids, req.max_tokens)
            if req.use_beam_search:
                params_list.append(beam_search_params(engine, req, max_tokens))
            else:
                params_list.append(make_sampling_params(req, max_tokens, req.logprobs, prompt_k,
                                                        defaults=defaults))
        check_priority(engine, req.priority)
        admit(engine, len(prompts) * req.n)
        base_id = req.request_id or random_id("cmpl")
        requests = [
            (ids, params, f"{base_id}-{i}", text)
            for i, ((text, ids), params) in enumerate(zip(prompts, params_list, strict=True))
        ]
        lora = lora_for(engine, model)  # None unless 'model' names a LoRA adapter
        if req.use_beam_search:  # each prompt searched on its own, concurrently
            streams: list = [BeamSearchStream(engine, *r, lora_request=lora,
                                              priority=req.priority) for r in requests]
        else:
            streams = start_streams(engine, requests, lora, req.priority)
        # vLLM streams no beam search: with stream true the whole response goes out as
        # one SSE event (the CompletionResponse itself), then [DONE]
        if req.stream and not req.use_beam_search:
            gen = self._stream(req, model, base_id, prompts, streams)
            return StreamingResponse(gen, media_type="text/event-stream")
        try:
            finals = await unless_disconnected(raw, collect_final(streams))
        except ClientGone:
            return Response(status_code=499)
        except Exception as e:
            raise (known_error(e) or e) from None
        choices: list[CompletionChoice] = []
        n_prompt = n_gen = 0
        for i, final in enumerate(finals):
            n_prompt += len(final.prompt_token_ids)
            for o in sorted(final.outputs, key=lambda o: o.index):
                n_gen += len(o.token_ids)
                choices.append(self._choice(req, i * req.n + o.index, prompts[i], final, o))
        body = CompletionResponse(
            id=base_id, model=model, choices=choices,
            usage=usage(n_prompt, n_gen, cached_tokens=cached_tokens(engine, finals)),
        )
        if req.stream:  # beam search (see above)
            return StreamingResponse(_one_event_stream(body.model_dump_json()),
                                     media_type="text/event-stream")
        return JSONResponse(body.model_dump())

    # -- non-streaming pieces

    def _choice(
        self,
        req: CompletionRequest,
        index: int,
        prompt: tuple[str | None, list[int]],
        final: RequestOutput,
        o: CompletionOutput,
    ) -> CompletionChoice:
        text = o.text
        logprobs = None
        if req.echo:
            prompt_text = self._prompt_text(prompt)
            text = prompt_text + text
        if req.logprobs is not None:
            logprobs = CompletionLogProbs()
            offset = 0
            if req.echo:
                offset = self._add_prompt_logprobs(logprobs, prompt[1], final, req.logprobs)
            self._add_logprobs(logprobs, o.token_ids, o.logprobs, req.logprobs, offset)
        prompt_logprobs = None
        # a beam search computes no prompt logprobs: null, as in vLLM
        if req.prompt_logprobs is not None and not req.use_beam_search:
            prompt_logprobs = prompt_logprobs_out(
                self.engine, prompt[1], final.prompt_logprobs, req.prompt_logprobs
            )
        return CompletionChoice(
            index=index,
            text=text,
            logprobs=logprobs,
            finish_reason=o.finish_reason,
            stop_reason=o.stop_reason,
            prompt_logprobs=prompt_logprobs,
        )

    def _prompt_text(self, prompt: tuple[str | None, list[int]]) -> str:
        return prompt[0] if prompt[0] is not None else self.engine.decode(prompt[1])

    def _add_prompt_logprobs(
        self, lp: CompletionLogProbs, ids: list[int], final: RequestOutput, k: int
    ) -> int:
        positions = final.prompt_logprobs or [None] * len(ids)
        offset = 0
        for tid, pos in zip(ids, positions, strict=False):
            tok = token_text(self.engine, tid, pos.get(tid) if pos else None)
            lp.tokens.append(tok)
            lp.text_offset.append(offset)
            offset += len(tok)
            if pos is None or tid not in pos:
                lp.token_logprobs.append(None)
                lp.top_logprobs.append(None)
            else:
                lp.token_logprobs.append(pos[tid].logprob)
                top = {t: v for _, t, v in top_entries(self.engine, pos, k)}
                # the prompt token itself too, as for generated ones (vLLM: the top k + 1)
                top.setdefault(tok, pos[tid].logprob)
                lp.top_logprobs.append(top)
        return offset

    def _add_logprobs(
        self,
        lp: CompletionLogProbs,
        token_ids: list[int],
        positions: list[LogprobsDict] | None,
        k: int,
        offset: int,
    ) -> int:
        """Append one entry per token; returns the text offset after the last one."""
        for j, tid in enumerate(token_ids):
            pos = positions[j] if positions is not None and j < len(positions) else {}
            chosen = pos.get(tid)
            tok = token_text(self.engine, tid, chosen)
            lp.tokens.append(tok)
            lp.text_offset.append(offset)
            offset += len(tok)
            lp.token_logprobs.append(chosen.logprob if chosen is not None else None)
            top = {t: v for _, t, v in top_entries(self.engine, pos, k)} if pos else {}
            if chosen is not None:
                top.setdefault(tok, chosen.logprob)
            lp.top_logprobs.append(top)
        return offset

    # -- streaming

    async def _stream(
        self,
        req: CompletionRequest,
        model: str,
        base_id: str,
        prompts: list[tuple[str | None, list[int]]],
        streams: list[RequestStream],
    ) -> AsyncIterator[str]:
        n = req.n
        sent_text: dict[int, int] = {}
        sent_tokens: dict[int, int] = {}
        offsets: dict[int, int] = {}
        finished: set[int] = set()
        gen_tokens: dict[int, int] = {}
        last: dict[int, RequestOutput] = {}  # each prompt's latest output (its cached tokens)
        include_usage, continuous_usage = usage_options(
            req, getattr(self.engine, "force_include_usage", False))
        # every prompt counts once (not once per choice), from the first chunk on
        n_prompt = sum(len(ids) for _, ids in prompts)
        # chunks written as JSON text (protocol.ChunkJSON) unless every one carries usage
        fast = protocol.SSE_FASTPATH and not continuous_usage
        writer = ChunkJSON("text_completion", base_id, model)
        try:
            async for i, out in merge_streams(streams):
                last[i] = out
                choices = []
                for o in out.outputs:
                    idx = i * n + o.index
                    if idx in finished:
                        continue
                    first = idx not in sent_text
                    text = o.text[sent_text.get(idx, 0) :]
                    new_ids = o.token_ids[sent_tokens.get(idx, 0) :]
                    logprobs = None
                    if req.logprobs is not None:
                        logprobs = CompletionLogProbs()
                        off = offsets.get(idx, 0)
                        if first and req.echo:
                            off = self._add_prompt_logprobs(
                                logprobs, prompts[i][1], out, req.logprobs
                            )
                        lps = o.logprobs[sent_tokens.get(idx, 0) :] if o.logprobs else None
                        offsets[idx] = self._add_logprobs(logprobs, new_ids, lps, req.logprobs, off)
                    if first and req.echo:
                        text = self._prompt_text(prompts[i]) + text
                    sent_text[idx] = len(o.text)
                    sent_tokens[idx] = len(o.token_ids)
                    gen_tokens[idx] = len(o.token_ids)
                    if o.finish_reason is not None:
                        finished.add(idx)
                    if not text and o.finish_reason is None and not new_ids:
                        continue
                    if fast:
                        choices.append(completion_choice_json(idx, text, logprobs,
                                                              o.finish_reason, o.stop_reason))
                        continue
                    choices.append(
                        CompletionChoice(
                            index=idx,
                            text=text,
                            logprobs=logprobs,
                            finish_reason=o.finish_reason,
                            stop_reason=o.stop_reason,
                        )
                    )
                for choice in choices:  # one choice a chunk, as vLLM and OpenAI stream n > 1
                    if fast:
                        yield sse(writer.chunk([choice]))
                        continue
                    chunk = CompletionResponse(id=base_id, model=model, choices=[choice])
                    exclude: dict = {"choices": {"__all__": {"prompt_logprobs"}}}
                    if continuous_usage:
                        chunk.usage = usage(n_prompt, sum(gen_tokens.values()))
                    else:
                        exclude["usage"] = True
                    yield sse(dump(chunk, exclude=exclude))
            if include_usage:
                final = usage(n_prompt, sum(gen_tokens.values()),
                              cached_tokens=cached_tokens(self.engine, list(last.values())))
                chunk = CompletionResponse(id=base_id, model=model, choices=[], usage=final)
                yield sse(dump(chunk, exclude={"choices": {"__all__": {"prompt_logprobs"}}}))
        except asyncio.CancelledError:
            raise
        except Exception as e:  # an answer already started: report in-band, then end cleanly
            yield stream_error("/v1/completions (stream)", e)
        yield SSE_DONE


async def _one_event_stream(response_json: str) -> AsyncIterator[str]:
    yield f"data: {response_json}\n\n"
    yield "data: [DONE]\n\n"
