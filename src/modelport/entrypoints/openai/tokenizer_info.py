"""vLLM's GET /tokenizer_info (--enable-tokenizer-info-endpoint): the served tokenizer's
configuration, as its tokenizer_config.json holds it.

As vLLM's: the Hugging Face tokenizer's init kwargs (model_max_length, the special tokens,
added_tokens_decoder, ...) less the vocab_file / merges_file paths, values made JSON (a
special token's AddedToken becomes its text), plus "tokenizer_class" (the HF tokenizer's
class name) and "chat_template": the template the server renders chats with (--chat-template
when given), where there is one. vLLM's flag help once named the path /get_tokenizer_info;
both paths answer. Without the flag neither exists (404): the answer may expose the chat
template and other configuration.
"""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse

from modelport.entrypoints.openai.errors import OpenAIError
from modelport.entrypoints.openai.serving_common import jsonable

TOKENIZER_INFO_PATHS = ("/tokenizer_info", "/get_tokenizer_info")


def tokenizer_info(tokenizer: Any) -> dict[str, Any]:
    """The /tokenizer_info answer for one of our Tokenizers (or a bare HF tokenizer)."""
    hf = getattr(tokenizer, "hf", tokenizer)
    config = dict(getattr(hf, "init_kwargs", None) or {})
    config.pop("vocab_file", None)
    config.pop("merges_file", None)
    info = jsonable(config)
    info["tokenizer_class"] = type(hf).__name__
    template = getattr(tokenizer, "chat_template", None)
    if template:  # the served one: --chat-template replaces the tokenizer's
        info["chat_template"] = jsonable(template)
    return info


def add_routes(api: APIRouter, engine_of: Any) -> None:
    """Mount GET /tokenizer_info and its /get_tokenizer_info alias."""

    async def get_tokenizer_info(request: Request) -> JSONResponse:
        engine = engine_of(request)
        try:
            info = tokenizer_info(engine.tokenizer)
        except Exception as e:  # noqa: BLE001 - vLLM's "Failed to get tokenizer info"
            raise OpenAIError(f"Failed to get tokenizer info: {e}", 500) from None
        return JSONResponse(info)

    for path in TOKENIZER_INFO_PATHS:
        api.add_api_route(path, get_tokenizer_info, methods=["GET"], tags=["tokenizer"])
