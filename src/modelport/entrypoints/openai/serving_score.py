"""vLLM's classification and scoring APIs, for a ``--runner pooling`` server:

- POST /classify: a ``*ForSequenceClassification`` model's class probabilities per input;
- POST /score and /v1/score: one score per (text_1, text_2) pair, 1:1, 1:N or N:N (also as
  data_1 / data_2, queries / documents, queries / items);
- POST /rerank, /v1/rerank, /v2/rerank: the Jina / Cohere shape, documents by relevance
  (``top_n``, ``return_documents``; documents as strings or ``{"text": ...}`` objects).

A cross-encoder's pair is tokenized as its tokenizer joins a pair, token types included, and
``truncate_prompt_tokens`` truncates it as transformers does ('longest_first').

Scores come from a cross-encoder (a classification model with one label: the pair is one
prompt, see modelport/scoring.py) or, for an embedding model, the cosine similarity of the
two embeddings. Other servers answer with vLLM's 400.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

from fastapi import APIRouter, Request
from pydantic import Field, model_validator

from modelport.engine.async_llm import AsyncLLM
from modelport.entrypoints.openai.errors import OpenAIError
from modelport.entrypoints.openai.protocol import (
    ChatMessage,
    OpenAIModel,
    TextRequest,
    random_id,
)
from modelport.entrypoints.openai.serving_common import (
    check_model,
    dead_engine_is_503,
    truncate_prompt,
)
from modelport.entrypoints.openai.serving_embedding import (
    _fits,
    _prompts,
    _usage,
    pool_prompts,
)
from modelport.pooling_params import PoolingParams, id2label, num_labels
from modelport.scoring import cosine, pair_encoding, pair_truncation, score_pairs

ScoreInputs = str | list[str]


class _ClassifyParams(TextRequest):
    model: str | None = None
    user: str | None = None
    truncate_prompt_tokens: int | None = Field(default=None, ge=-1)
    priority: int = 0
    request_id: str | None = None
    use_activation: bool | None = None
    activation: bool | None = None  # vLLM's older names of use_activation
    softmax: bool | None = None

    def pooling_params(self, task: str) -> PoolingParams:
        return PoolingParams(
            task=task,
            use_activation=self.use_activation,
            activation=self.activation,
            softmax=self.softmax,
        )


class ClassificationRequest(_ClassifyParams):
    input: str | list[int] | list[str] | list[list[int]] | None = None
    messages: list[ChatMessage] | None = None  # vLLM's chat-style classification
    add_special_tokens: bool | None = None
    add_generation_prompt: bool = False
    continue_final_message: bool = False
    chat_template_kwargs: dict[str, Any] | None = None  # messages: template variables
    chat_template: str | None = None  # messages: as chat's (--trust-request-chat-template)


class ScoreRequest(_ClassifyParams):
    """vLLM's four spellings of the two sides: text_1 / text_2, data_1 / data_2, queries /
    documents, queries / items."""

    text_1: ScoreInputs | None = None
    text_2: ScoreInputs | None = None
    data_1: ScoreInputs | None = None
    data_2: ScoreInputs | None = None
    queries: ScoreInputs | None = None
    documents: ScoreInputs | None = None
    items: ScoreInputs | None = None

    @model_validator(mode="after")
    def _one_spelling(self) -> ScoreRequest:
        given = [
            (a, b)
            for a, b in (
                ("text_1", "text_2"),
                ("data_1", "data_2"),
                ("queries", "documents"),
                ("queries", "items"),
            )
            if getattr(self, a) is not None and getattr(self, b) is not None
        ]
        if len(given) != 1:
            raise ValueError(
                "give the two sides once: text_1 and text_2 (or data_1 and "
                "data_2, queries and documents, queries and items)"
            )
        return self

    def sides(self) -> tuple[ScoreInputs, ScoreInputs]:
        for a, b in (
            ("text_1", "text_2"),
            ("data_1", "data_2"),
            ("queries", "documents"),
            ("queries", "items"),
        ):
            if getattr(self, a) is not None and getattr(self, b) is not None:
                return getattr(self, a), getattr(self, b)
        raise AssertionError("validated")


class RerankDocument(OpenAIModel):
    """A document as Cohere's v1 and Jina's rerank APIs also accept it: ``{"text": ...}``."""

    text: str


class RerankRequest(_ClassifyParams):
    query: str
    documents: list[str | RerankDocument]
    top_n: int = 0  # 0: every document
    # Jina's switch (Cohere v1's too): vLLM always returns each document, so on by default
    return_documents: bool = True

    def document_texts(self) -> list[str]:
        return [d if isinstance(d, str) else d.text for d in self.documents]


async def _scores(
    engine: AsyncLLM, req: _ClassifyParams, first: ScoreInputs, second: ScoreInputs, prefix: str
) -> tuple[str, list[float], int]:
    """(request id, one score per pair in order, prompt tokens used)."""
    try:
        pairs = score_pairs(first, second)
    except ValueError as e:
        raise OpenAIError(str(e), 400) from None
    base = req.request_id or random_id(prefix)
    keep = req.truncate_prompt_tokens
    if engine.pooling_task == "classify":
        if num_labels(engine.engine_config.model_config.hf_config) != 1:
            raise OpenAIError("Score API is only enabled for num_labels == 1.", 400)
        prompts, type_starts = _pair_prompts(engine, pairs, keep)
        starts = iter(type_starts)  # pool_prompts asks for one params per prompt, in order

        def params() -> PoolingParams:
            p = req.pooling_params("score")
            p.token_type_start = next(starts)
            return p

        results = await pool_prompts(engine, prompts, params, base, req.priority)
        return base, [vec[0] for vec, _ in results], sum(len(p) for p in prompts)
    texts = list(dict.fromkeys(t for pair in pairs for t in pair))  # each text embedded once
    prompts = []
    for ids in await engine.encode_many_async(texts):
        if not ids:
            raise OpenAIError("score inputs must not be empty strings", 400)
        prompts.append(_fits(engine, truncate_prompt(engine, ids, keep), "score"))
    results = await pool_prompts(
        engine, prompts, lambda: PoolingParams(task="embed"), base, req.priority
    )
    vecs = dict(zip(texts, (vec for vec, _ in results)))
    # usage: every prompt that ran, once (a 1:N query is embedded once), as vLLM counts
    return base, [cosine(vecs[a], vecs[b]) for a, b in pairs], sum(len(p) for p in prompts)


def _pair_prompts(engine: AsyncLLM, pairs: list[tuple[str, str]], keep: int | None
                  ) -> tuple[list[list[int]], list[int | None]]:
    """The cross-encoder's prompts (truncated as transformers truncates a pair, when asked)
    and where each one's token type 1 starts."""
    try:
        limit = pair_truncation(keep, engine.max_model_len)
    except ValueError as e:
        raise OpenAIError(str(e), 400, param="truncate_prompt_tokens") from None
    prompts, starts = [], []
    for a, b in pairs:
        try:
            ids, start = pair_encoding(engine.tokenizer, a, b, limit)
        except ValueError as e:
            param = "truncate_prompt_tokens" if str(e).startswith("truncate") else None
            raise OpenAIError(str(e), 400, param=param) from None
        prompts.append(_fits(engine, ids, "score"))
        starts.append(start)
    return prompts, starts


def _usage_n(n: int) -> dict[str, Any]:
    return {
        "prompt_tokens": n,
        "total_tokens": n,
        "completion_tokens": 0,
        "prompt_tokens_details": None,
    }


def add_routes(api: APIRouter, engine_for: Callable[[Request, str | None], AsyncLLM],
               trusts_chat_template: Callable[[Request], bool] = lambda request: False
               ) -> None:
    """Mount /classify, /score, /v1/score, /rerank, /v1/rerank and /v2/rerank
    (``trusts_chat_template``: whether /classify's messages may bring their chat_template)."""

    def engine_doing(
        request: Request, model: str | None, what: str, tasks: tuple[str, ...]
    ) -> AsyncLLM:
        engine = engine_for(request, model)
        if engine.pooling_task not in tasks:
            raise OpenAIError(f"The model does not support {what} API", 400)
        return engine

    @api.post("/classify", tags=["vllm"])
    async def classify(body: ClassificationRequest, request: Request) -> dict:
        engine = engine_doing(request, body.model, "Classification", ("classify",))
        model = check_model(engine, body.model)
        labels = id2label(engine.engine_config.model_config.hf_config)
        with dead_engine_is_503():
            prompts = await _prompts(engine, body, "classification",  # type: ignore[arg-type]
                                     trust_chat_template=trusts_chat_template(request))
            rid = body.request_id or random_id("classify")
            results = await pool_prompts(
                engine, prompts, lambda: body.pooling_params("classify"), rid, body.priority
            )
        data = []
        for i, (probs, _) in enumerate(results):
            best = max(range(len(probs)), key=probs.__getitem__)
            data.append(
                {"index": i, "label": labels.get(best), "probs": probs, "num_classes": len(probs)}
            )
        return {
            "id": rid,
            "object": "list",
            "created": int(time.time()),
            "model": model,
            "data": data,
            "usage": _usage(prompts),
        }

    async def score(body: ScoreRequest, request: Request) -> dict:
        engine = engine_doing(request, body.model, "Score", ("classify", "embed"))
        model = check_model(engine, body.model)
        first, second = body.sides()
        with dead_engine_is_503():
            rid, scores, n_tokens = await _scores(engine, body, first, second, "score")
        data = [{"index": i, "object": "score", "score": s} for i, s in enumerate(scores)]
        return {
            "id": rid,
            "object": "list",
            "created": int(time.time()),
            "model": model,
            "data": data,
            "usage": _usage_n(n_tokens),
        }

    async def rerank(body: RerankRequest, request: Request) -> dict:
        engine = engine_doing(request, body.model, "Score", ("classify", "embed"))
        model = check_model(engine, body.model)
        if not body.documents:
            raise OpenAIError("documents must not be empty", 400, param="documents")
        if body.top_n < 0:
            raise OpenAIError(
                f"top_n must be >= 0 (0: every document), got {body.top_n}", 400, param="top_n"
            )
        texts = body.document_texts()
        with dead_engine_is_503():
            rid, scores, n_tokens = await _scores(engine, body, body.query, texts, "rerank")
        order = sorted(range(len(scores)), key=lambda i: scores[i], reverse=True)
        if body.top_n:
            order = order[: body.top_n]
        results = []
        for i in order:
            item: dict[str, Any] = {"index": i, "relevance_score": scores[i]}
            if body.return_documents:
                item["document"] = {"text": texts[i]}
            results.append(item)
        return {
            "id": rid,
            "model": model,
            "usage": {"prompt_tokens": n_tokens, "total_tokens": n_tokens},
            "results": results,
        }

    for path in ("/score", "/v1/score"):
        api.add_api_route(path, score, methods=["POST"], tags=["vllm"])
    for path in ("/rerank", "/v1/rerank", "/v2/rerank"):
        api.add_api_route(path, rerank, methods=["POST"], tags=["vllm"])
