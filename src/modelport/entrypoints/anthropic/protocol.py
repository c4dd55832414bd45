"""Anthropic's Messages API wire format: the requests served, and Anthropic-shaped errors.

Content blocks stay plain dicts here: serving.py checks each one itself so that a block
this server cannot serve (an image, a server tool) gets a 400 naming exactly where it is.
"""

from __future__ import annotations

from typing import Any, Literal

from fastapi.responses import JSONResponse
from pydantic import Field, ValidationError

from modelport.entrypoints.openai.errors import OpenAIError
from modelport.entrypoints.openai.protocol import OpenAIModel, TextRequest

# HTTP status -> Anthropic's error type (https://docs.anthropic.com/en/api/errors)
_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    413: "request_too_large",
    429: "rate_limit_error",
    500: "api_error",
    503: "overloaded_error",
    529: "overloaded_error",
}


def error_response(message: str, status: int, retry_after: int | None = None) -> JSONResponse:
    """{"type": "error", "error": {"type", "message"}} with the status it stands for."""
    body = {"type": "error",
            "error": {"type": _TYPES.get(status, "api_error" if status >= 500
                                         else "invalid_request_error"),
                      "message": message}}
    headers = {"Retry-After": str(retry_after)} if retry_after is not None else None
    return JSONResponse(body, status_code=status, headers=headers)


def from_openai(e: OpenAIError) -> JSONResponse:
    return error_response(e.message, e.status, e.retry_after)


def validation_message(e: ValidationError) -> str:
    """'max_tokens: Field required' for the first problem (and how many more there are)."""
    errs = e.errors()
    first = errs[0]
    where = ".".join(str(p) for p in first.get("loc", ()))
    more = f" (and {len(errs) - 1} more errors)" if len(errs) > 1 else ""
    msg = first.get("msg", "invalid value")
    return f"{where}: {msg}{more}" if where else f"{msg}{more}"


def make_request(model_cls: type[CountTokensRequest], body: Any) -> Any:
    """The parsed request (a 400 naming the field when it does not validate)."""
    if not isinstance(body, dict):
        raise OpenAIError("the request body must be a JSON object", 400)
    try:
        return model_cls.model_validate(body)
    except ValidationError as e:
        raise OpenAIError(validation_message(e), 400) from None


class Message(OpenAIModel):
    # "system" is not Anthropic's, but vLLM takes it (folded into the system prompt)
    role: Literal["user", "assistant", "system"]
    content: str | list[dict[str, Any]]


class Tool(OpenAIModel):
    """A client tool; a server tool (type "bash_...", "web_search_...") is refused later."""

    name: str = Field(min_length=1)
    description: str | None = None
    input_schema: dict[str, Any] | None = None  # a client tool's: required (serving.py)
    type: str | None = None


class ToolChoice(OpenAIModel):
    type: Literal["auto", "any", "tool", "none"]
    name: str | None = None  # type "tool": the tool to call
    disable_parallel_tool_use: bool | None = None


class Thinking(OpenAIModel):
    """Served by the --reasoning-parser: its reasoning comes back as thinking blocks;
    "disabled" leaves them out. budget_tokens is taken and not enforced."""

    type: Literal["enabled", "disabled", "adaptive"]
    budget_tokens: int | None = Field(None, ge=0)


class OutputFormat(OpenAIModel):
    """Anthropic's structured outputs: the answer is JSON following `schema`."""

    type: Literal["json_schema"]
    json_schema: dict[str, Any] = Field(alias="schema")


class OutputConfig(OpenAIModel):
    format: OutputFormat | None = None
    # taken, no effect: there is no reasoning-effort setting here
    effort: Literal["low", "medium", "high", "xhigh", "max"] | None = None


class CountTokensRequest(TextRequest):
    model: str
    messages: list[Message] = Field(min_length=1)
    system: str | list[dict[str, Any]] | None = None
    tools: list[Tool] | None = None
    tool_choice: ToolChoice | None = None
    thinking: Thinking | None = None


class MessagesRequest(CountTokensRequest):
    max_tokens: int = Field(ge=1)
    stop_sequences: list[str] | None = None
    temperature: float | None = Field(None, ge=0.0, le=1.0)
    top_p: float | None = Field(None, gt=0.0, le=1.0)
    top_k: int | None = Field(None, ge=0)
    stream: bool = False
    metadata: dict[str, Any] | None = None
    output_config: OutputConfig | None = None
    service_tier: str | None = None  # taken, no effect: there is one tier here
