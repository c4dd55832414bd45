"""POST /v1/embeddings (OpenAI's shape, plus vLLM's chat-style ``messages``) and vLLM's
/pooling, for a server started with ``--runner pooling`` (or ``--task embed`` /
``--convert embed``). A generative or a classification server answers both with vLLM's 400
(a classifier's APIs are serving_score.py's).

/pooling's ``task`` (vLLM's): "embed" (the default, one vector each), or a per-token task,
``data`` one row per prompt token: "token_embed" (an embedding model's final hidden states;
BGE-M3's ColBERT vectors [n, dim]) or "token_classify" (a classifier's class probabilities
per token, also on a classification server; BGE-M3's sparse weights [n, 1]); base64 packs
the rows one after another. ``dimensions`` (a matryoshka model) truncates each token_embed
row before it is normalized; ``use_activation: false`` gives token_classify's raw logits."""

from __future__ import annotations

import asyncio
import base64
import struct
import time
from collections.abc import Callable
from typing import Any, Literal

from fastapi import APIRouter, Request
from pydantic import Field

from modelport.engine.async_llm import AsyncLLM, QueueFullError
from modelport.entrypoints.openai.chat_template import request_chat_template
from modelport.entrypoints.openai.errors import OpenAIError
from modelport.entrypoints.openai.protocol import ChatMessage, TextRequest, random_id
from modelport.entrypoints.openai.serving_common import (
    admit,
    check_model,
    dead_engine_is_503,
    truncate_prompt,
)
from modelport.pooling_params import TOKEN_TASKS, PoolingParams

EmbeddingInput = str | list[int] | list[str] | list[list[int]]


class EmbeddingRequest(TextRequest):
    model: str | None = None
    input: EmbeddingInput | None = None
    # vLLM's chat-style embeddings request: messages through the chat template
    messages: list[ChatMessage] | None = None
    encoding_format: Literal["float", "base64"] = "float"
    dimensions: int | None = None
    user: str | None = None
    # vLLM's extras
    truncate_prompt_tokens: int | None = Field(default=None)
    # for input (default True); for messages default False (the template's own specials)
    add_special_tokens: bool | None = None
    chat_template_kwargs: dict[str, Any] | None = None  # messages: template variables
    chat_template: str | None = None  # messages: as chat's (--trust-request-chat-template)
    add_generation_prompt: bool = False
    continue_final_message: bool = False
    normalize: bool | None = None
    priority: int = 0
    request_id: str | None = None


class PoolingRequest(EmbeddingRequest):
    task: Literal["embed", "token_embed", "token_classify"] = "embed"
    # token_classify: false gives the head's raw logits (no softmax / sigmoid), as vLLM's
    use_activation: bool | None = None


async def _prompts(engine: AsyncLLM, req: EmbeddingRequest,
                   operation: str = "embedding generation",
                   trust_chat_template: bool = False) -> list[list[int]]:
    """Each input's token ids (long texts, or many together, encoded off the event loop:
    ``AsyncLLM.encode_many_async``)."""
    if (req.input is None) == (req.messages is None):
        raise OpenAIError("give exactly one of input or messages", 400, param="input")
    if req.messages is not None:
        from modelport.entrypoints.openai.serving_chat import render_chat_prompt_async

        chat_template = request_chat_template(req, trust_chat_template)
        if not req.messages:
            raise OpenAIError("messages must not be empty", 400, param="messages")
        try:
            ids, text = await render_chat_prompt_async(
                engine, req.messages, req.add_generation_prompt,
                continue_final_message=req.continue_final_message,
                chat_template_kwargs=getattr(req, "chat_template_kwargs", None),
                chat_template=chat_template)
        except ValueError as e:
            raise OpenAIError(str(e), 400, param="messages") from None
        if req.add_special_tokens and text is not None:
            # vLLM's add_special_tokens=True: the rendered text with the tokenizer's specials
            # (an encoder's [CLS] ... [SEP], which a chat template seldom writes)
            ids = await engine.encode_async(text, add_special_tokens=True)
        return [_fits(engine, truncate_prompt(engine, list(ids), req.truncate_prompt_tokens),
                      operation)]
    inp = req.input
    if isinstance(inp, str):
        items: list = [inp]
    elif inp and all(isinstance(t, int) for t in inp):
        items = [inp]
    else:
        items = list(inp)
    if not items:
        raise OpenAIError("input must not be empty", 400, param="input")
    special = True if req.add_special_tokens is None else req.add_special_tokens
    encoded = iter(await engine.encode_many_async([t for t in items if isinstance(t, str)],
                                                  add_special_tokens=special))
    out = []
    for item in items:
        ids = next(encoded) if isinstance(item, str) else list(item)
        if not ids:
            raise OpenAIError("input must not contain empty strings or token lists", 400,
                              param="input")
        out.append(_fits(engine, truncate_prompt(engine, ids, req.truncate_prompt_tokens),
                         operation))
    return out


def _fits(engine: AsyncLLM, ids: list[int], operation: str = "embedding generation",
          param: str = "input") -> list[int]:
    limit = engine.max_model_len
    if len(ids) > limit:  # vLLM's words
        raise OpenAIError(
            f"This model's maximum context length is {limit} tokens. However, you requested "
            f"{len(ids)} tokens in the input for {operation}. Please reduce the "
            "length of the input.", 400, param=param)
    return ids


async def _pool_all(engine: AsyncLLM, req: EmbeddingRequest, prefix: str,
                    trust_chat_template: bool = False
                    ) -> tuple[str, list[tuple[list[float], int]], list[list[int]]]:
    """Send every prompt (all validated first: a bad one is a 400 before any runs) and wait
    for all the pooled vectors. Returns (request id, [(vector, cached)], prompts)."""
    prompts = await _prompts(engine, req, trust_chat_template=trust_chat_template)
    base = req.request_id or random_id(prefix)

    task = getattr(req, "task", "embed")

    def params() -> PoolingParams:
        return PoolingParams(dimensions=req.dimensions, normalize=req.normalize, task=task,
                             use_activation=getattr(req, "use_activation", None))

    results = await pool_prompts(engine, prompts, params, base, req.priority)
    return base, results, prompts


async def pool_prompts(engine: AsyncLLM, prompts: list[list[int]],
                       params: Callable[[], PoolingParams], base: str, priority: int = 0
                       ) -> list[tuple[list[float], int]]:
    """Send every prompt as ``{base}-{i}`` with fresh ``params()`` and wait for all of them:
    [(pooled floats, cached prompt tokens)] in order. An invalid one is a 400 and aborts
    the others; a full queue is a 503."""
    admit(engine, len(prompts))
    futs: list[tuple[str, asyncio.Future]] = []
    try:
        for i, ids in enumerate(prompts):
            rid = f"{base}-{i}"
            futs.append((rid, engine.submit_pooling(ids, params(), rid, priority=priority)))
    except ValueError as e:
        for rid, _ in futs:
            engine._abort_pooling(rid)
        msg = str(e)
        param = "task" if "pooling task" in msg else \
            "use_activation" if "use_activation" in msg else \
            "dimensions" if "dimensions" in msg.lower() or "matryoshka" in msg else "input"
        raise OpenAIError(str(e), 400, param=param) from None
    except BaseException:
        for rid, _ in futs:
            engine._abort_pooling(rid)
        raise
    try:
        return list(await asyncio.gather(*(engine.wait_pooling(rid, f) for rid, f in futs)))
    except ValueError as e:
        raise OpenAIError(str(e), 400) from None
    except QueueFullError as e:
        raise OpenAIError(str(e), 503, code="queue_full", retry_after=1) from None
    finally:
        for rid, _ in futs:  # any still in flight (one failed, or the client went away)
            engine._abort_pooling(rid)


def _encode(vec: list[float] | list[list[float]], fmt: str
            ) -> list[float] | list[list[float]] | str:
    if fmt == "base64":  # little-endian float32, as OpenAI's and vLLM's base64 embeddings
        flat = [x for row in vec for x in row] if vec and isinstance(vec[0], list) else vec
        return base64.b64encode(struct.pack(f"<{len(flat)}f", *flat)).decode("ascii")
    return vec


def _usage(prompts: list[list[int]]) -> dict[str, Any]:
    n = sum(len(p) for p in prompts)
    return {"prompt_tokens": n, "total_tokens": n, "completion_tokens": 0,
            "prompt_tokens_details": None}


def add_routes(api: APIRouter, engine_for: Callable[[Request, str | None], AsyncLLM],
               trusts_chat_template: Callable[[Request], bool] = lambda request: False
               ) -> None:
    """Mount /v1/embeddings and /pooling on the OpenAI router (``trusts_chat_template``:
    whether the server takes a request's chat_template)."""

    def pooling_engine(request: Request, model: str | None, what: str,
                       task: str = "embed") -> AsyncLLM:
        engine = engine_for(request, model)
        served = engine.pooling_task
        # generative, or a classifier asked for embeddings (its per-token task is served)
        if served is None or (served != "embed" and task not in TOKEN_TASKS):
            raise OpenAIError(f"The model does not support {what} API", 400)
        return engine

    @api.post("/v1/embeddings", tags=["openai"])
    async def embeddings(body: EmbeddingRequest, request: Request) -> dict:
        engine = pooling_engine(request, body.model, "Embeddings")
        model = check_model(engine, body.model)
        with dead_engine_is_503():
            rid, results, prompts = await _pool_all(engine, body, "embd",
                                                    trusts_chat_template(request))
        data = [{"index": i, "object": "embedding",
                 "embedding": _encode(vec, body.encoding_format)}
                for i, (vec, _) in enumerate(results)]
        return {"id": rid, "object": "list", "created": int(time.time()), "model": model,
                "data": data, "usage": _usage(prompts)}

    @api.post("/pooling", tags=["vllm"])
    async def pooling(body: PoolingRequest, request: Request) -> dict:
        engine = pooling_engine(request, body.model, "Pooling", body.task)
        model = check_model(engine, body.model)
        with dead_engine_is_503():
            rid, results, prompts = await _pool_all(engine, body, "pool",
                                                    trusts_chat_template(request))
        data = [{"index": i, "object": "pooling", "data": _encode(vec, body.encoding_format)}
                for i, (vec, _) in enumerate(results)]
        return {"id": rid, "object": "list", "created": int(time.time()), "model": model,
                "data": data, "usage": _usage(prompts)}
