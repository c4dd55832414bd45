"""Pydantic v2 models of the OpenAI wire format (plus vLLM's sampling extras).

These models live only at the HTTP edge: the server converts them to SamplingParams and token
ids before anything crosses into the engine. Unknown fields are ignored (as OpenAI does) so
clients that send newer fields keep working; value checks that need the model (context
length, vocabulary) happen in the serving layer, not here.
"""

from __future__ import annotations

import json
import os
import re
import time
import uuid
from json.encoder import encode_basestring  # type: ignore[attr-defined]  # the C one
from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    field_validator,
    model_serializer,
    model_validator,
)
from pydantic_core import PydanticCustomError


def random_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex}"


class OpenAIModel(BaseModel):
    model_config = ConfigDict(extra="ignore")


_SURROGATE = re.compile("[\ud800-\udfff]")


def _lone_surrogate(value: Any, path: str) -> str | None:
    """Where a string of a request holds a lone surrogate (a JSON escape such as "\\udcff"
    that pairs with nothing): such text is not Unicode, and no tokenizer takes it."""
    if isinstance(value, str):
        return path if _SURROGATE.search(value) else None
    if isinstance(value, dict):
        items = value.items()
    elif isinstance(value, list):
        items = enumerate(value)
    else:
        return None
    for k, v in items:
        if not isinstance(v, (str, dict, list)):
            continue  # numbers, bools, null: no text (a prompt of token ids is a long list)
        found = _lone_surrogate(v, f"{path}.{k}" if path else str(k))
        if found is not None:
            return found
    return None


class TextRequest(OpenAIModel):
    """A request whose text reaches the tokenizer: refuse text that is not valid Unicode
    (a 400 naming the field) instead of failing inside the tokenizer."""

    @model_validator(mode="before")
    @classmethod
    def _valid_unicode(cls, data: Any) -> Any:
        where = _lone_surrogate(data, "")
        if where is not None:
            raise ValueError(f"{where}: the text holds a lone UTF-16 surrogate (an unpaired "
                             "\\ud800-\\udfff escape), which is not valid Unicode")
        return data


# ---------------------------------------------------------------- errors


class ErrorInfo(OpenAIModel):
    message: str
    type: str
    param: str | None = None
    code: int | str | None = None


class ErrorResponse(OpenAIModel):
    error: ErrorInfo


# ---------------------------------------------------------------- shared pieces


class StreamOptions(OpenAIModel):
    include_usage: bool = False
    continuous_usage_stats: bool = False


class CompletionTokenUsageInfo(OpenAIModel):
    reasoning_tokens: int = 0


class PromptTokenUsageInfo(OpenAIModel):
    cached_tokens: int = 0


class UsageInfo(OpenAIModel):
    prompt_tokens: int = 0
    completion_tokens: int = 0
    total_tokens: int = 0
    # vLLM: only with --reasoning-parser (reasoning_tokens); left out otherwise
    completion_tokens_details: CompletionTokenUsageInfo | None = None
    # vLLM: only with --enable-prompt-tokens-details and a prefix-cache hit; left out otherwise
    prompt_tokens_details: PromptTokenUsageInfo | None = None

    @model_serializer(mode="wrap")
    def _leave_out_no_details(self, handler: Any) -> Any:
        out = handler(self)
        if isinstance(out, dict):
            for key in ("completion_tokens_details", "prompt_tokens_details"):
                if out.get(key) is None:
                    out.pop(key, None)
        return out


class ResponseFormat(OpenAIModel):
    """OpenAI's response_format: text, json_object or json_schema ({"name", "schema", ...}),
    and vLLM's structural_tag (xgrammar's ``format``, or the older ``structures`` +
    ``triggers``); all but text are served as structured outputs."""

    type: Literal["text", "json_object", "json_schema", "structural_tag"]
    json_schema: dict[str, Any] | None = None
    format: dict[str, Any] | None = None
    structures: list[Any] | None = None
    triggers: list[str] | None = None


NonNegInt = Annotated[int, Field(ge=0)]
TokenIds = Annotated[list[NonNegInt], Field(min_length=1)]

class SamplingFields(TextRequest):
    """Sampling fields shared by completions and chat (OpenAI names, then vLLM extras)."""

    model: str | None = None
    n: int = Field(1, ge=1, le=128)
    temperature: float | None = Field(None, ge=0.0, le=2.0)
    top_p: float | None = Field(None, gt=0.0, le=1.0)
    stop: str | list[str] | None = None
    seed: int | None = Field(None, ge=-(2**63), le=2**64 - 1)
    presence_penalty: float = Field(0.0, ge=-2.0, le=2.0)
    frequency_penalty: float = Field(0.0, ge=-2.0, le=2.0)
    stream: bool = False
    stream_options: StreamOptions | None = None
    user: str | None = None
    # token id (as a string) -> bias added to its logit; clamped to [-100, 100] as OpenAI's
    logit_bias: dict[str, float] | None = None
    # vLLM extras
    top_k: int | None = Field(None, ge=-1)
    min_p: float | None = Field(None, ge=0.0, le=1.0)
    repetition_penalty: float | None = Field(None, gt=0.0)
    ignore_eos: bool = False
    min_tokens: int = Field(0, ge=0)
    stop_token_ids: list[NonNegInt] | None = None
    # only these token ids may be sampled (ids are checked against the vocabulary later)
    allowed_token_ids: list[int] | None = None
    # words never to generate (tokenized by the engine's input processor)
    bad_words: list[str] | None = None
    include_stop_str_in_output: bool = False
    # vLLM's beam-search fields: use_beam_search searches n beams (serving_common's
    # beam_search_params), ranked with length_penalty
    use_beam_search: bool = False
    length_penalty: float = 1.0
    skip_special_tokens: bool = True
    request_id: str | None = Field(None, max_length=256)
    # vLLM's: lower is served earlier under --scheduling-policy priority; else it must be 0
    priority: int = 0
    response_format: ResponseFormat | None = None
    # keep only the last k prompt tokens (-1: the last max_model_len)
    truncate_prompt_tokens: int | None = Field(None, ge=-1)
    # at most --max-logprobs (engine); -1: the whole vocabulary (needs --max-logprobs -1)
    prompt_logprobs: int | None = Field(None, ge=-1)
    # structured outputs: vLLM's structured_outputs object ({"json" | "regex" | "choice" |
    # "grammar" | "json_object": ...}) and its older guided_* fields (guided_decoding_backend:
    # only "auto" / "xgrammar"; guided_whitespace_pattern is refused; structural_tag: JSON)
    guided_json: Any = None
    guided_regex: Any = None
    guided_choice: Any = None
    guided_grammar: Any = None
    guided_decoding_backend: Any = None
    guided_whitespace_pattern: Any = None
    structured_outputs: Any = None
    structural_tag: Any = None
    # vLLM's: arguments for the server's custom logits processors (--logits-processors), as
    # SamplingParams.extra_args
    vllm_xargs: dict[str, str | int | float | list[str | int | float]] | None = None


# ---------------------------------------------------------------- completions


class CompletionRequest(SamplingFields):
    prompt: str | list[str] | TokenIds | list[TokenIds]
    max_tokens: int | None = Field(16, ge=1)
    logprobs: int | None = Field(None, ge=-1)  # as prompt_logprobs
    echo: bool = False
    suffix: str | None = None
    best_of: int | None = Field(None, ge=1)
    prompt_embeds: Any = None  # vLLM's (--enable-prompt-embeds): not served, a 400


class CompletionLogProbs(OpenAIModel):
    text_offset: list[int] = Field(default_factory=list)
    token_logprobs: list[float | None] = Field(default_factory=list)
    tokens: list[str] = Field(default_factory=list)
    top_logprobs: list[dict[str, float] | None] = Field(default_factory=list)


class PromptLogprob(OpenAIModel):
    """One candidate at one prompt position, as vLLM's `prompt_logprobs` entries."""

    logprob: float
    rank: int | None = None
    decoded_token: str | None = None


# per prompt token: None for the first (nothing predicts it), else token id -> candidate
PromptLogprobs = list[dict[int, PromptLogprob] | None]


class CompletionChoice(OpenAIModel):
    index: int
    text: str
    logprobs: CompletionLogProbs | None = None
    finish_reason: str | None = None
    stop_reason: int | str | None = None
    prompt_logprobs: PromptLogprobs | None = None  # not in stream chunks (as vLLM)


class CompletionResponse(OpenAIModel):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int = Field(default_factory=lambda: int(time.time()))
    model: str
    choices: list[CompletionChoice]
    usage: UsageInfo | None = None
    system_fingerprint: str | None = None


# ---------------------------------------------------------------- chat


class TextPart(OpenAIModel):
    type: Literal["text"]
    text: str


class FunctionCallIn(OpenAIModel):
    name: str
    # OpenAI sends a JSON string; a JSON object is taken too (some clients send one)
    arguments: str | dict[str, Any] = "{}"


class ToolCallIn(OpenAIModel):
    """A call in an earlier assistant message of the history."""

    id: str | None = None
    type: Literal["function"] = "function"
    function: FunctionCallIn


# content part types of OpenAI's (and vLLM's) chat API that carry no text -> what they are
_IMAGES, _AUDIO, _VIDEO = "images are", "audio input is", "video input is"
_NON_TEXT_PARTS = {"image_url": _IMAGES, "input_image": _IMAGES, "image": _IMAGES,
                   "image_pil": _IMAGES, "image_embeds": "image embeddings are",
                   "input_audio": _AUDIO, "audio_url": _AUDIO, "audio": _AUDIO,
                   "video_url": _VIDEO, "video": _VIDEO, "file": "files are"}


class ChatMessage(OpenAIModel):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[TextPart] | None = None
    name: str | None = None
    tool_calls: list[ToolCallIn] | None = None  # assistant messages
    tool_call_id: str | None = None  # tool messages: the call this answers

    @field_validator("content", mode="before")
    @classmethod
    def _text_parts_only(cls, value: Any) -> Any:
        """An image (audio, video, file) part is a 400 that says so, not a schema error about
        the 'text' type: the models served here read text only (a multimodal checkpoint such
        as Gemma 3 4B-27B is served text-only)."""
        if not isinstance(value, list):
            return value
        for i, part in enumerate(value):
            kind = part.get("type") if isinstance(part, dict) else None
            if isinstance(kind, str) and kind != "text":
                what = _NON_TEXT_PARTS.get(kind)
                why = (f"{what} not supported for this model" if what else
                       f"content parts of type {kind!r} are not supported")
                raise PydanticCustomError(
                    "unsupported_content_part",
                    f"content part {i} has type {kind!r}: {why} (it is served text-only; "
                    "send content as a string or parts of type 'text')")
        return value

    def text(self) -> str:
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        return "".join(p.text for p in self.content)


class FunctionDefinition(OpenAIModel):
    name: str
    description: str | None = None
    parameters: dict[str, Any] | None = None
    strict: bool | None = None


class ChatTool(OpenAIModel):
    type: Literal["function"] = "function"
    function: FunctionDefinition


class FunctionName(OpenAIModel):
    name: str


class NamedToolChoice(OpenAIModel):
    type: Literal["function"] = "function"
    function: FunctionName


class ChatCompletionRequest(SamplingFields):
    messages: list[ChatMessage] = Field(min_length=1)
    tools: list[ChatTool] | None = None
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = None
    parallel_tool_calls: bool | None = None  # false: at most one call per answer
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=-1)  # as prompt_logprobs
    add_generation_prompt: bool = True
    continue_final_message: bool = False
    echo: bool = False
    # extra variables for the chat template (vLLM's; e.g. Qwen3's {"enable_thinking": false})
    chat_template_kwargs: dict[str, Any] | None = None
    # vLLM's: rendered in place of the model's template with --trust-request-chat-template
    # (entrypoints/openai/chat_template.py), else a 400
    chat_template: str | None = None
    # vLLM's: false drops the reasoning (--reasoning-parser) from the answer
    include_reasoning: bool = True


class TopLogprob(OpenAIModel):
    token: str
    logprob: float
    bytes: list[int] | None = None


class TokenLogprob(TopLogprob):
    top_logprobs: list[TopLogprob] = Field(default_factory=list)


class ChoiceLogprobs(OpenAIModel):
    content: list[TokenLogprob] | None = None


class FunctionCall(OpenAIModel):
    name: str
    arguments: str  # a JSON object, as a string


class ToolCall(OpenAIModel):
    id: str
    type: Literal["function"] = "function"
    function: FunctionCall


class AssistantMessage(OpenAIModel):
    # --response-role (vLLM's): assistant unless the server names another; with
    # add_generation_prompt false, the role of the request's last message
    role: str = "assistant"
    # the thinking, apart from content: only with --reasoning-parser (set, even to null, by
    # the server then); absent otherwise, as vLLM ("not present" for other models)
    reasoning: str | None = None
    content: str | None = None
    tool_calls: list[ToolCall] = Field(default_factory=list)  # vLLM sends [] when none

    @model_serializer(mode="wrap")
    def _reasoning_when_set(self, handler: Any) -> dict[str, Any]:
        out = handler(self)
        if "reasoning" not in self.model_fields_set:
            out.pop("reasoning", None)
        return out


class ChatChoice(OpenAIModel):
    index: int
    message: AssistantMessage
    logprobs: ChoiceLogprobs | None = None
    finish_reason: str | None = None
    stop_reason: int | str | None = None


class ChatCompletionResponse(OpenAIModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int = Field(default_factory=lambda: int(time.time()))
    model: str
    choices: list[ChatChoice]
    usage: UsageInfo
    system_fingerprint: str | None = None
    prompt_logprobs: PromptLogprobs | None = None


class _OmitNone(OpenAIModel):
    @model_serializer(mode="wrap")
    def _omit_none(self, handler: Any) -> dict[str, Any]:
        # deltas carry only what changed: OpenAI never sends "role": null or "id": null
        return {k: v for k, v in handler(self).items() if v is not None}


class DeltaFunctionCall(_OmitNone):
    name: str | None = None  # in a call's first delta only
    arguments: str | None = None


class DeltaToolCall(_OmitNone):
    index: int  # the call's position in the message; its deltas share it
    id: str | None = None  # first delta only
    type: Literal["function"] | None = None
    function: DeltaFunctionCall | None = None


class DeltaMessage(_OmitNone):
    role: str | None = None
    reasoning: str | None = None  # --reasoning-parser: the thinking's increment
    content: str | None = None
    tool_calls: list[DeltaToolCall] | None = None


class ChatStreamChoice(OpenAIModel):
    index: int
    delta: DeltaMessage
    logprobs: ChoiceLogprobs | None = None
    finish_reason: str | None = None
    stop_reason: int | str | None = None


class ChatCompletionChunk(OpenAIModel):
    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int = Field(default_factory=lambda: int(time.time()))
    model: str
    choices: list[ChatStreamChoice]
    usage: UsageInfo | None = None


# ---------------------------------------------------------------- models, tokenize


class ModelCard(OpenAIModel):
    id: str
    object: Literal["model"] = "model"
    created: int = Field(default_factory=lambda: int(time.time()))
    owned_by: str = "modelport"
    root: str | None = None
    parent: str | None = None  # a LoRA adapter's base model (vLLM's)
    max_model_len: int | None = None


class ModelList(OpenAIModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class TokenizeRequest(TextRequest):
    model: str | None = None
    prompt: str | None = None
    messages: list[ChatMessage] | None = None
    tools: list[ChatTool] | None = None  # shown to a tool-aware chat template
    add_special_tokens: bool = True
    add_generation_prompt: bool = True
    continue_final_message: bool = False
    chat_template_kwargs: dict[str, Any] | None = None
    chat_template: str | None = None  # as on chat


class TokenizeResponse(OpenAIModel):
    count: int
    max_model_len: int
    tokens: list[int]


class DetokenizeRequest(OpenAIModel):
    model: str | None = None
    tokens: list[NonNegInt]


class DetokenizeResponse(OpenAIModel):
    prompt: str


class VersionResponse(OpenAIModel):
    version: str


def dump(model: BaseModel, **kw: Any) -> str:
    """Compact JSON for SSE chunks (None fields kept: OpenAI sends finish_reason: null)."""
    return model.model_dump_json(**kw)


# ---------------------------------------------------------------- streamed chunks, fast

# MODELPORT_SSE_FASTPATH=0: every streamed chunk is built as the pydantic models above and
# dumped (the reference the fast path is tested against)
SSE_FASTPATH = os.environ.get("MODELPORT_SSE_FASTPATH", "1") != "0"


def _scalar(v: Any) -> str:
    """A JSON scalar (null, a string, an int) as pydantic writes it."""
    if v is None:
        return "null"
    if type(v) is str:
        return encode_basestring(v)
    if type(v) is int:
        return str(v)
    return json.dumps(v, ensure_ascii=False, separators=(",", ":"))


class ChunkJSON:
    """One stream's chunks as the JSON pydantic dumps of ChatCompletionChunk (usage left out)
    or CompletionResponse (usage and prompt_logprobs left out) are, byte for byte, without
    building the models: a streamed token costs a dozen model validations and a
    serialization otherwise. `created` is read for each chunk, as the models' default is."""

    def __init__(self, obj: str, request_id: str, model: str) -> None:
        self._head = f'{{"id":{_scalar(request_id)},"object":"{obj}","created":'
        self._model = f',"model":{_scalar(model)},"choices":['
        self._tail = "]}" if obj == "chat.completion.chunk" else '],"system_fingerprint":null}'

    def chunk(self, choices: list[str]) -> str:
        return self._head + str(int(time.time())) + self._model + ",".join(choices) + self._tail


def chat_choice_json(index: int, content: str, logprobs: BaseModel | None,
                     finish_reason: str | None, stop_reason: int | str | None,
                     role: str | None = None) -> str:
    """A ChatStreamChoice whose delta is content (and role), as pydantic dumps it."""
    delta = f'{{"role":{_scalar(role)},"content":' if role is not None else '{"content":'
    lp = "null" if logprobs is None else logprobs.model_dump_json()
    return (f'{{"index":{index},"delta":{delta}{encode_basestring(content)}}},"logprobs":{lp},'
            f'"finish_reason":{_scalar(finish_reason)},"stop_reason":{_scalar(stop_reason)}}}')


def completion_choice_json(index: int, text: str, logprobs: BaseModel | None,
                           finish_reason: str | None, stop_reason: int | str | None) -> str:
    """A streamed CompletionChoice (prompt_logprobs left out), as pydantic dumps it."""
    lp = "null" if logprobs is None else logprobs.model_dump_json()
    return (f'{{"index":{index},"text":{encode_basestring(text)},"logprobs":{lp},'
            f'"finish_reason":{_scalar(finish_reason)},"stop_reason":{_scalar(stop_reason)}}}')
