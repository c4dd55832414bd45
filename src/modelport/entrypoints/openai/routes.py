"""The OpenAI-compatible routes, mounted on any FastAPI app (standalone or `modelport serve`).

`ServerState` is filled in when the engine finishes loading in the background, which is why
/health answers 503 until then and the /v1 routes answer 503 with Retry-After.
"""

from __future__ import annotations

import hmac
from dataclasses import dataclass, field
from typing import Any

from fastapi import APIRouter, Depends, FastAPI, Request
from fastapi.responses import Response

from modelport.engine import registry
from modelport.engine.async_llm import AsyncLLM
from modelport.entrypoints.anthropic.routes import add_routes as add_anthropic_routes
from modelport.entrypoints.openai.chat_template import request_chat_template
from modelport.entrypoints.openai.dev import DEV_PATHS
from modelport.entrypoints.openai.dev import add_routes as add_dev_routes
from modelport.entrypoints.openai.errors import OpenAIError
from modelport.entrypoints.openai.lora import add_routes as add_lora_routes
from modelport.entrypoints.openai.metrics import CONTENT_TYPE, ServerMetrics
from modelport.entrypoints.openai.profiler import PROFILE_PATHS
from modelport.entrypoints.openai.profiler import add_routes as add_profiler_routes
from modelport.entrypoints.openai.protocol import (
    ChatCompletionRequest,
    CompletionRequest,
    DetokenizeRequest,
    DetokenizeResponse,
    ErrorResponse,
    ModelCard,
    ModelList,
    TokenizeRequest,
    TokenizeResponse,
    VersionResponse,
)
from modelport.entrypoints.openai.sagemaker import add_routes as add_sagemaker_routes
from modelport.entrypoints.openai.serving_chat import (
    ServingChat,
    render_chat,
    with_default_kwargs,
)
from modelport.entrypoints.openai.serving_common import (
    check_model,
    dead_engine_is_503,
    engine_unavailable,
)
from modelport.entrypoints.openai.serving_completion import ServingCompletion
from modelport.entrypoints.openai.serving_embedding import add_routes as add_embedding_routes
from modelport.entrypoints.openai.serving_responses import (
    ResponsesRequest,
    ServingResponses,
    not_found,
)
from modelport.entrypoints.openai.serving_score import add_routes as add_score_routes
from modelport.entrypoints.openai.sleep import SLEEP_PATHS
from modelport.entrypoints.openai.sleep import add_routes as add_sleep_routes
from modelport.entrypoints.openai.tokenizer_info import TOKENIZER_INFO_PATHS
from modelport.entrypoints.openai.tokenizer_info import add_routes as add_tokenizer_info_routes
from modelport.entrypoints.openai.tools import ToolSettings, template_tool

_ERRORS: dict[int | str, dict[str, Any]] = {
    code: {"model": ErrorResponse} for code in (400, 401, 404, 500, 503)
}

# vLLM's APIs for classification / scoring models (serving_score.py's: a --runner pooling
# server's; /v1/embeddings and /pooling are serving_embedding.py's)
POOLING_PATHS = (
    "/classify",
    "/score",
    "/v1/score",
    "/rerank",
    "/v1/rerank",
    "/v2/rerank",
)


@dataclass
class ServerState:
    version: str
    api_key: str | list[str] | None = None  # --api-key: one key, or any of several
    engine: AsyncLLM | None = None
    metrics: ServerMetrics | None = None
    load_error: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)
    tool_settings: ToolSettings = field(default_factory=ToolSettings)
    reasoning_parser: str | None = None  # --reasoning-parser
    # --default-chat-template-kwargs: under each request's chat_template_kwargs
    default_chat_template_kwargs: dict[str, Any] = field(default_factory=dict)
    # --trust-request-chat-template: render with a request's chat_template (else a 400)
    trust_request_chat_template: bool = False
    chat_template: str | None = None  # --chat-template's text: the served model's template
    # --enable-tokenizer-info-endpoint: GET /tokenizer_info (else 404, as vLLM's)
    enable_tokenizer_info_endpoint: bool = False

    serve_own_engine: bool = True  # False: only engines that other frontends register

    def require_engine(self) -> AsyncLLM:
        if self.engine is None and not self.serve_own_engine:
            raise OpenAIError(
                f"no such model; served: {', '.join(_served_names(self)) or '(none)'}",
                404, param="model", code="model_not_found",
            )
        if self.engine is None:
            if self.load_error is not None:
                raise OpenAIError(f"the model failed to load: {self.load_error}", 503)
            raise OpenAIError("the model is still loading; retry shortly", 503, retry_after=5)
        err = engine_unavailable(self.engine)
        if err is not None:
            raise err
        return self.engine


def _state(request: Request) -> ServerState:
    return request.app.state.openai


def _engine_for(request: Request, model: str | None) -> AsyncLLM:
    """The engine serving `model`: one a model repository registered, else this server's own."""
    engine = registry.lookup(model)
    if engine is not None:
        err = engine_unavailable(engine)
        if err is not None:
            raise err
        return engine
    return _state(request).require_engine()


def _served_names(state: ServerState) -> list[str]:
    names = list(state.engine.served_model_names) if state.engine is not None else []
    return names + [n for e in registry.engines() for n in e.served_model_names]


def _all_cards(state: ServerState, aliases: bool = False) -> list[ModelCard]:
    """The cards /v1/models lists; with `aliases`, also those of names served unlisted."""
    engines = [state.require_engine()] if state.serve_own_engine else []
    cards = []
    for engine in [*engines, *registry.engines()]:
        cards.extend(_cards(engine, aliases))
    return cards


async def check_api_key(request: Request) -> None:
    """401 unless the request carries the --api-key (Authorization: Bearer, or api-key header)."""
    keys = _state(request).api_key
    if not keys:
        return
    if isinstance(keys, str):
        keys = [keys]
    given = request.headers.get("authorization", "")
    token = given[7:].strip() if given.lower().startswith("bearer ") else ""
    token = token or request.headers.get("api-key", "") or request.headers.get("x-api-key", "")
    # every key compared, so the time does not tell which one (or how many) matched
    matched = [hmac.compare_digest(token.encode(), k.encode()) for k in keys]
    if not token or not any(matched):
        raise OpenAIError(
            "Incorrect or missing API key: send it as 'Authorization: Bearer <key>'",
            401,
            code="invalid_api_key",
        )


def _cards(engine: AsyncLLM, aliases: bool = False) -> list[ModelCard]:
    from modelport.entrypoints.openai.lora import lora_cards

    root = getattr(engine, "model_root", None) or str(
        getattr(engine.engine_config.model_source, "name", engine.served_model_names[0]))
    listed = getattr(engine, "listed_model_names", None)
    names = engine.served_model_names if aliases or not listed else listed
    return [
        ModelCard(id=name, root=root, max_model_len=engine.max_model_len) for name in names
    ] + lora_cards(engine)


def _check_generative(engine: AsyncLLM, what: str) -> None:
    """vLLM's 400 for a generation API on a pooling (embedding) server."""
    if engine.runner_type != "generate":
        raise OpenAIError(f"The model does not support {what} API", 400)


def chat_for(request: Request, model: str | None, what: str = "Messages") -> ServingChat:
    """The chat server of the engine serving `model`, with this server's chat settings (the
    Anthropic Messages API is served through it too)."""
    engine = _engine_for(request, model)
    _check_generative(engine, what)
    state = _state(request)
    return ServingChat(engine, state.tool_settings, state.reasoning_parser,
                       state.default_chat_template_kwargs, state.trust_request_chat_template)


def build_routers(sagemaker: bool = False, tokenizer_info: bool = False
                  ) -> tuple[APIRouter, APIRouter]:
    """(routes behind --api-key, public probes); ``sagemaker``: also vLLM's /ping and
    /invocations (sagemaker.py); ``tokenizer_info``: vLLM's GET /tokenizer_info."""
    api = APIRouter(dependencies=[Depends(check_api_key)], responses=_ERRORS)
    public = APIRouter()

    @api.post("/v1/completions", tags=["openai"])
    async def completions(body: CompletionRequest, request: Request) -> Response:
        engine = _engine_for(request, body.model)
        _check_generative(engine, "Completions")
        with dead_engine_is_503():
            return await ServingCompletion(engine).create(body, request)

    @api.post("/v1/chat/completions", tags=["openai"])
    async def chat_completions(body: ChatCompletionRequest, request: Request) -> Response:
        chat = chat_for(request, body.model, "Chat Completions")
        with dead_engine_is_503():
            return await chat.create(body, request)

    @api.post("/v1/responses", tags=["openai"])
    async def responses(body: ResponsesRequest, request: Request) -> Response:
        engine = _engine_for(request, body.model)
        _check_generative(engine, "Responses")
        with dead_engine_is_503():
            state = _state(request)
            return await ServingResponses(
                engine, state.tool_settings, state.reasoning_parser,
                state.default_chat_template_kwargs).create(body, request)

    # no response is stored (vLLM without VLLM_ENABLE_RESPONSES_API_STORE): its 404
    @api.get("/v1/responses/{response_id}", tags=["openai"])
    async def get_response(response_id: str) -> Response:
        raise not_found(response_id)

    @api.post("/v1/responses/{response_id}/cancel", tags=["openai"])
    async def cancel_response(response_id: str) -> Response:
        raise not_found(response_id)

    @api.get("/v1/models", tags=["openai"])
    async def models(request: Request) -> ModelList:
        return ModelList(data=_all_cards(_state(request)))

    @api.get("/v1/models/{model_id:path}", tags=["openai"])
    async def model_card(model_id: str, request: Request) -> ModelCard:
        for card in _all_cards(_state(request), aliases=True):
            if card.id == model_id:
                return card
        raise OpenAIError(
            f"The model `{model_id}` does not exist.", 404, param="model", code="model_not_found"
        )

    @api.post("/tokenize", tags=["tokenizer"])
    async def tokenize(body: TokenizeRequest, request: Request) -> TokenizeResponse:
        engine = _engine_for(request, body.model)
        check_model(engine, body.model)
        if (body.prompt is None) == (body.messages is None):
            raise OpenAIError("give exactly one of prompt or messages", 400, param="prompt")
        if body.messages is not None:
            chat_template = request_chat_template(
                body, _state(request).trust_request_chat_template)
            if not body.messages:
                raise OpenAIError("messages must not be empty", 400, param="messages")
            tools = [template_tool(t) for t in body.tools] if body.tools else None
            ids = render_chat(
                engine,
                body.messages,
                body.add_generation_prompt,
                tools,
                continue_final_message=body.continue_final_message,
                chat_template_kwargs=with_default_kwargs(
                    _state(request).default_chat_template_kwargs, body.chat_template_kwargs),
                chat_template=chat_template,
            )
        else:
            ids = engine.encode(body.prompt or "", add_special_tokens=body.add_special_tokens)
        return TokenizeResponse(count=len(ids), max_model_len=engine.max_model_len, tokens=ids)

    @api.post("/detokenize", tags=["tokenizer"])
    async def detokenize(body: DetokenizeRequest, request: Request) -> DetokenizeResponse:
        engine = _engine_for(request, body.model)
        check_model(engine, body.model)
        bad = [t for t in body.tokens if t >= engine.vocab_size]
        if bad:
            raise OpenAIError(
                f"token ids must be < {engine.vocab_size}; got {bad[:5]}", 400, param="tokens"
            )
        return DetokenizeResponse(prompt=engine.decode(body.tokens))

    add_embedding_routes(api, _engine_for,
                         lambda request: _state(request).trust_request_chat_template)
    add_lora_routes(api, lambda request: _state(request).require_engine())
    add_sleep_routes(api, lambda request: _state(request).require_engine())
    # vLLM's /start_profile, /stop_profile: mounted only with VLLM_TORCH_PROFILER_DIR set
    add_profiler_routes(api, lambda request: _state(request).require_engine())
    # vLLM's dev-mode routes (/reset_prefix_cache, /server_info, ...): mounted only with
    # VLLM_SERVER_DEV_MODE=1 (or MODELPORT_SERVER_DEV_MODE=1)
    add_dev_routes(api, lambda request: _state(request).require_engine(),
                   lambda request: _state(request).version)
    if tokenizer_info:
        add_tokenizer_info_routes(api, lambda request: _state(request).require_engine())
    add_score_routes(api, _engine_for,
                     lambda request: _state(request).trust_request_chat_template)

    @public.get("/health", tags=["server"], responses={503: {"model": ErrorResponse}})
    async def health(request: Request) -> Response:
        state = _state(request)
        if not state.serve_own_engine or (state.engine is not None and state.engine.is_ready):
            return Response(status_code=200)
        try:
            state.require_engine()
        except OpenAIError as e:
            return e.response()
        return Response(status_code=200)

    if sagemaker:
        add_sagemaker_routes(api, public, _engine_for, health)

    @public.get("/version", tags=["server"])
    async def version(request: Request) -> VersionResponse:
        return VersionResponse(version=_state(request).version)

    @public.get("/metrics", tags=["server"])
    async def metrics(request: Request) -> Response:
        m = _state(request).metrics
        return Response(m.render() if m is not None else b"", media_type=CONTENT_TYPE)

    return api, public


OPENAI_PATHS = ("/v1/", "/tokenize", "/detokenize", "/health", "/version", "/metrics",
                *SLEEP_PATHS, *PROFILE_PATHS, *DEV_PATHS, *TOKENIZER_INFO_PATHS)


def mount(app: FastAPI, state: ServerState, sagemaker: bool = False) -> None:
    app.state.openai = state
    api, public = build_routers(sagemaker, state.enable_tokenizer_info_endpoint)
    app.include_router(api)
    app.include_router(public)
    add_anthropic_routes(app, chat_for, check_api_key)
