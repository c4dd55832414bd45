"""vLLM's SageMaker endpoints on the OpenAI server: ``GET|POST /ping`` (the health check
SageMaker polls) and ``POST /invocations`` (one path for every API: the body picks it).

As vLLM picks it: of the APIs the model serves, in the order chat completions, completions,
embeddings, classification, score, rerank, pooling, the first whose request the body is runs
it, answering as that API does (streaming included); a body that is none of them is a 400
listing what was expected. `modelport serve` leaves both paths to the TorchServe frontend
when it serves that on the same port (TorchServe has its own /ping and /invocations).
"""

from __future__ import annotations

import json
from typing import Any

import pydantic
from fastapi import APIRouter, Request
from fastapi.responses import Response
from fastapi.routing import APIRoute

from modelport.entrypoints.openai.errors import OpenAIError

SAGEMAKER_PATHS = ("/ping", "/invocations")


def _apis() -> list[tuple[str, type[pydantic.BaseModel], tuple[str | None, ...], Any]]:
    """(path, request model, the engine kinds serving it: None generative, else the pooling
    task, the fields a body of it must have) in vLLM's order. The fields stand in for vLLM's
    required ones (our request models leave them optional, e.g. `input` or `messages`)."""
    from modelport.entrypoints.openai.protocol import ChatCompletionRequest, CompletionRequest
    from modelport.entrypoints.openai.serving_embedding import EmbeddingRequest, PoolingRequest
    from modelport.entrypoints.openai.serving_score import (
        ClassificationRequest,
        RerankRequest,
        ScoreRequest,
    )

    def has(*names: str) -> Any:
        return lambda body: any(n in body for n in names)

    pooling, inputs = ("embed", "classify"), has("input", "messages")
    return [("/v1/chat/completions", ChatCompletionRequest, (None,), has("messages")),
            ("/v1/completions", CompletionRequest, (None,), has("prompt")),
            ("/v1/embeddings", EmbeddingRequest, ("embed",), inputs),
            ("/classify", ClassificationRequest, ("classify",), inputs),
            ("/score", ScoreRequest, pooling, has("text_1", "data_1", "queries")),
            ("/rerank", RerankRequest, pooling,
             lambda body: "query" in body and "documents" in body),
            ("/pooling", PoolingRequest, pooling, inputs)]


def add_routes(api: APIRouter, public: APIRouter, engine_for: Any, health: Any) -> None:
    """Mount /ping on ``public`` (as /health) and /invocations on ``api`` (behind the API
    key); ``engine_for(request, model)`` finds the engine, ``health(request)`` answers
    /health."""
    @public.api_route("/ping", methods=["GET", "POST"], tags=["sagemaker"])
    async def ping(request: Request) -> Response:
        return await health(request)

    @api.post("/invocations", tags=["sagemaker"])
    async def invocations(request: Request) -> Any:
        try:
            body = json.loads(await request.body())
        except ValueError as e:
            raise OpenAIError(f"the body is not valid JSON: {e}", 400) from None
        if not isinstance(body, dict):
            raise OpenAIError("the body must be a JSON object", 400)
        model = body.get("model")
        kind = engine_for(request, model if isinstance(model, str) else None).pooling_task
        served = [(path, cls, fits) for path, cls, kinds, fits in _apis() if kind in kinds]
        for path, cls, fits in served:
            if not fits(body):
                continue
            try:
                parsed = cls.model_validate(body)
            except pydantic.ValidationError:
                continue
            return await _endpoint(api, path)(parsed, request)
        names = ", ".join(cls.__name__ for _, cls, _ in served)
        raise OpenAIError("Cannot find suitable handler for request. Expected one of: "
                          f"{names}", 400)


def _endpoint(api: APIRouter, path: str) -> Any:
    """The function serving POST ``path`` among ``api``'s routes (all these APIs are
    mounted on it)."""
    for route in api.routes:
        if isinstance(route, APIRoute) and route.path == path and "POST" in route.methods:
            return route.endpoint
    raise OpenAIError(f"{path} is not served here", 404)
