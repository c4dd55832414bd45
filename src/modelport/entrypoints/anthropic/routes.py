"""The Anthropic routes, mounted beside the OpenAI ones (openai/routes.py's mount).

Every failure leaves these routes in Anthropic's error shape, so the body is parsed here
(not by FastAPI, whose validation errors the OpenAI handlers would answer) and the API key
is checked inside the route.
"""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable

from fastapi import APIRouter, FastAPI, Request
from fastapi.responses import JSONResponse, Response

from modelport.entrypoints.anthropic.protocol import (
    CountTokensRequest,
    MessagesRequest,
    error_response,
    from_openai,
    make_request,
)
from modelport.entrypoints.anthropic.serving import (
    ChatFactory,
    ServingMessages,
    count_tokens,
)
from modelport.entrypoints.openai.errors import OpenAIError, internal_error
from modelport.entrypoints.openai.serving_common import check_model, dead_engine_is_503

_ERRORS = {code: {"description": "an Anthropic error: {type: error, error: {type, message}}"}
           for code in (400, 401, 404, 500, 503)}


async def _body(request: Request) -> object:
    raw = await request.body()
    if not raw:
        raise OpenAIError("the request body is missing: send a JSON object", 400)
    try:
        return json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise OpenAIError(f"the request body is not valid JSON: {e}", 400) from None


async def _anthropic(where: str, request: Request,
                     check_key: Callable[[Request], Awaitable[None]],
                     answer: Callable[[], Awaitable[Response]]) -> Response:
    """answer(), with the API key checked first and any error in Anthropic's shape."""
    try:
        try:
            await check_key(request)
        except OpenAIError as e:
            raise OpenAIError("invalid x-api-key: send the server's --api-key in the x-api-key "
                              "header (or as Authorization: Bearer <key>)", e.status) from None
        with dead_engine_is_503():
            return await answer()
    except OpenAIError as e:
        return from_openai(e)
    except Exception as e:  # logged under an id, which the 500 names
        said = json.loads(bytes(internal_error(where, e).body))["error"]["message"]
        return error_response(said, 500)


def add_routes(app: FastAPI, chat_for: ChatFactory,
               check_key: Callable[[Request], Awaitable[None]]) -> None:
    """chat_for(request, model): the ServingChat of the engine serving `model` (404 / 503
    as the OpenAI routes); check_key: the --api-key check (x-api-key is one of its headers)."""
    router = APIRouter(responses=_ERRORS)

    @router.post("/v1/messages", tags=["anthropic"])
    async def messages(request: Request) -> Response:
        async def answer() -> Response:
            req = make_request(MessagesRequest, await _body(request))
            return await ServingMessages(chat_for(request, req.model)).create(req, request)

        return await _anthropic("/v1/messages", request, check_key, answer)

    @router.post("/v1/messages/count_tokens", tags=["anthropic"])
    async def messages_count_tokens(request: Request) -> Response:
        async def answer() -> Response:
            req = make_request(CountTokensRequest, await _body(request))
            chat = chat_for(request, req.model)
            check_model(chat.engine, req.model)
            return JSONResponse({"input_tokens": count_tokens(chat, req)})

        return await _anthropic("/v1/messages/count_tokens", request, check_key, answer)

    app.include_router(router)
