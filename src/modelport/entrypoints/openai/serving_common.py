"""What completions and chat share: model check, admission, sampling params, SSE, disconnects.

Everything here turns user input into engine input exactly once and raises `OpenAIError`
with the protocol's status for anything wrong, so the serving classes stay about their
response shapes.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import math
from collections.abc import AsyncIterator, Awaitable, Sequence
from typing import Any, TypeVar

from fastapi import Request

from modelport.beam_search import BeamSearcher, beam_logprobs_error
from modelport.engine.async_llm import AsyncLLM, EngineDeadError, QueueFullError, RequestStream
from modelport.engine.generation_config import with_sampling_defaults
from modelport.engine.structured_output import validate as validate_structured_outputs
from modelport.entrypoints.openai.errors import OpenAIError, error_body, internal_error
from modelport.entrypoints.openai.protocol import (
    CompletionTokenUsageInfo,
    PromptLogprob,
    PromptLogprobs,
    PromptTokenUsageInfo,
    SamplingFields,
    UsageInfo,
)
from modelport.frontend.processor import logprobs_over_limit, max_tokens_too_large
from modelport.outputs import CompletionOutput, Logprob, LogprobsDict, RequestOutput
from modelport.sampling_params import (
    BeamSearchParams,
    SamplingParams,
    StructuredOutputsParams,
)

T = TypeVar("T")

SSE_DONE = "data: [DONE]\n\n"


def jsonable(value: Any) -> Any:
    """A value as JSON (the dev and tokenizer-info routes): dataclasses by their shown fields
    (a model's raw HF config.json is not shown), a tokenizers AddedToken as its text (as
    vLLM's), a class by its qualified name, paths, dtypes and other objects as text."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: jsonable(getattr(value, f.name))
                for f in dataclasses.fields(value) if f.repr}
    if hasattr(value, "content") and not isinstance(value, (str, bytes, dict, type)):
        return value.content
    if isinstance(value, dict):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple, set, frozenset)):
        return [jsonable(v) for v in value]
    if isinstance(value, type):
        return f"{value.__module__}.{value.__qualname__}"
    if value is None or isinstance(value, (str, int, float, bool)):
        return value
    return str(value)


def sse(payload: str) -> str:
    return f"data: {payload}\n\n"


def sse_error(message: str, status: int) -> str:
    return sse(json.dumps(error_body(message, status)))


class ClientGone(Exception):
    """The HTTP client disconnected before its answer was ready."""


def check_model(engine: AsyncLLM, name: str | None) -> str:
    """The served name to answer with; 404 for a model this server does not serve."""
    if name is None or name == "" or name in engine.served_model_names:
        return engine.served_model_names[0]
    if name in getattr(engine, "lora_requests", ()):  # a LoRA adapter (openai/lora.py)
        return name
    raise OpenAIError(
        f"The model `{name}` does not exist. Served: {', '.join(engine.served_model_names)}",
        404,
        param="model",
        code="model_not_found",
    )


def check_unsupported(req: Any) -> None:
    """Fields this server does not implement, or combinations OpenAI refuses: say so (400)."""
    if getattr(req, "suffix", None):
        raise OpenAIError("suffix is not supported", 400, param="suffix")
    if getattr(req, "prompt_embeds", None) is not None:
        # vLLM serves them only with --enable-prompt-embeds; ignoring them would answer
        # a different prompt than the one sent
        raise OpenAIError("prompt_embeds is not supported: send prompt (text or token ids)",
                          400, param="prompt_embeds")
    if getattr(req, "stream_options", None) is not None and not req.stream:
        raise OpenAIError(
            "stream_options is only allowed when stream is true", 400, param="stream_options"
        )
    best_of = getattr(req, "best_of", None)
    if best_of is not None and best_of != req.n:
        raise OpenAIError("best_of other than n is not supported", 400, param="best_of")
    # vLLM's rule and words: prompt_logprobs that would return something (> 0, or -1 for the
    # whole vocabulary) cannot stream; 0 is accepted and, as in vLLM, no chunk carries it
    if req.stream and req.prompt_logprobs is not None and (
        req.prompt_logprobs > 0 or req.prompt_logprobs == -1
    ):
        raise OpenAIError(
            "`prompt_logprobs` are not available when `stream=True`.",
            400,
            param="prompt_logprobs",
        )


def check_max_logprobs(engine: AsyncLLM, **requested: int | None) -> None:
    """400 naming the field when a request asks for more logprobs than --max-logprobs allows
    (vLLM's words and rule: -1 counts as the vocabulary's size, and --max-logprobs -1 is no
    cap; the engine checks the same)."""
    proc = engine.input_processor
    for param, k in requested.items():
        what = "prompt" if param == "prompt_logprobs" else "sample"
        why = logprobs_over_limit(what, k, proc.max_logprobs, proc.model_config.vocab_size)
        if why is not None:
            raise OpenAIError(why, 400, param=param)


def truncate_prompt(engine: AsyncLLM, ids: list[int], keep: int | None) -> list[int]:
    """vLLM's truncate_prompt_tokens (the engine's own truncation), as a 400 when invalid.

    Runs before the length checks, so a long prompt that is cut to fit is served.
    """
    if keep is None:
        return ids
    try:
        return engine.input_processor.truncate(ids, keep)
    except ValueError as e:
        raise OpenAIError(str(e), 400, param="truncate_prompt_tokens") from None


def sampling_defaults(engine: AsyncLLM) -> dict[str, Any]:
    """The generation config's sampling defaults (--generation-config, vLLM's
    default_sampling_params): SamplingParams field names -> values; {} when none."""
    cfg = getattr(engine, "engine_config", None)
    return getattr(cfg, "default_sampling_params", None) or {}


def check_prompt_ids(engine: AsyncLLM, ids: Sequence[int], max_tokens: int | None) -> int:
    """Validate one tokenized prompt; returns the max_tokens to use (default: what fits).

    As vLLM's get_max_tokens, the generation config's max_tokens (max_new_tokens) bounds
    the answer: the request's max_tokens or, left out, what fits, whichever is smaller."""
    if not ids:
        raise OpenAIError("prompt is empty (no tokens)", 400, param="prompt")
    vocab = engine.vocab_size
    if vocab and max(ids) >= vocab:
        raise OpenAIError(
            f"token id {max(ids)} is out of range for a vocabulary of {vocab}", 400, param="prompt"
        )
    limit = engine.max_model_len
    if len(ids) >= limit:  # vLLM's words (its 400s), so clients that parse them keep working
        raise OpenAIError(
            f"This model's maximum context length is {limit} tokens. However, your request has "
            f"{len(ids)} input tokens. Please reduce the length of the input messages.",
            400,
            param="prompt",
            code="context_length_exceeded",
        )
    cap = sampling_defaults(engine).get("max_tokens")
    if max_tokens is None:
        return min(limit - len(ids), cap or limit)
    if len(ids) + max_tokens > limit:
        raise OpenAIError(
            max_tokens_too_large(max_tokens, limit, len(ids)),
            400,
            param="max_tokens",
            code="context_length_exceeded",
        )
    return min(max_tokens, cap or max_tokens)


def usage_options(req: SamplingFields, force: bool = False) -> tuple[bool, bool]:
    """(send a usage chunk at the end, put the running usage in every chunk) for a stream.

    continuous_usage_stats implies include_usage unless that is sent as false: vLLM's
    include_usage defaults to true, and its continuous usage needs it. force: the server's
    --enable-force-include-usage, a final usage chunk whatever the request says.
    """
    opts = req.stream_options
    if opts is None:
        return force, False
    final = opts.include_usage
    if "include_usage" not in opts.model_fields_set:
        final = opts.continuous_usage_stats
    return final or force, final and opts.continuous_usage_stats


def usage(prompt_tokens: int, completion_tokens: int,
          reasoning_tokens: int | None = None, cached_tokens: int | None = None) -> UsageInfo:
    """reasoning_tokens: with --reasoning-parser (vLLM's completion_tokens_details);
    cached_tokens: with --enable-prompt-tokens-details (prompt_tokens_details), left out
    when 0 as vLLM does (see cached_tokens below)."""
    return UsageInfo(
        prompt_tokens=prompt_tokens,
        completion_tokens=completion_tokens,
        total_tokens=prompt_tokens + completion_tokens,
        completion_tokens_details=None if reasoning_tokens is None
        else CompletionTokenUsageInfo(reasoning_tokens=reasoning_tokens),
        prompt_tokens_details=PromptTokenUsageInfo(cached_tokens=cached_tokens)
        if cached_tokens else None,
    )


def cached_tokens(engine: AsyncLLM, outputs: Sequence[RequestOutput | None]) -> int | None:
    """usage.prompt_tokens_details.cached_tokens: the prompt tokens the prefix cache held,
    summed over the prompts' outputs; None unless --enable-prompt-tokens-details."""
    if not getattr(engine, "enable_prompt_tokens_details", False):
        return None
    return sum(getattr(o, "num_cached_tokens", 0) or 0 for o in outputs if o is not None)


# vLLM's older per-field names (removed in vLLM 0.12, still accepted here) -> the
# StructuredOutputsParams field each sets
_GUIDED_ALIASES = {
    "guided_json": "json",
    "guided_regex": "regex",
    "guided_choice": "choice",
    "guided_grammar": "grammar",
    "structural_tag": "structural_tag",  # a structural tag's JSON text (vLLM's older field)
}


def structured_outputs_of(req: SamplingFields) -> StructuredOutputsParams | None:
    """The request's output constraint, from response_format (json_object / json_schema),
    structured_outputs (vLLM's dict) or vLLM's older guided_* fields; 400 naming the field
    when it is invalid or when two of them ask for constraints."""
    sources: list[tuple[str, dict[str, Any]]] = []
    fmt = req.response_format
    if fmt is not None and fmt.type == "json_object":
        sources.append(("response_format", {"json_object": True}))
    elif fmt is not None and fmt.type == "json_schema":
        schema = (fmt.json_schema or {}).get("schema")
        if schema is None:
            raise OpenAIError(
                'response_format of type "json_schema" needs json_schema.schema (the JSON '
                "schema the output must follow)",
                400,
                param="response_format",
            )
        sources.append(("response_format", {"json": schema}))
    elif fmt is not None and fmt.type == "structural_tag":
        # vLLM's two shapes: xgrammar's {"type", "format"}, or {"structures", "triggers"}
        tag = fmt.model_dump(exclude_none=True, exclude={"json_schema"})
        sources.append(("response_format", {"structural_tag": tag}))
    so = req.structured_outputs
    if so is not None:
        if not isinstance(so, dict):
            raise OpenAIError("structured_outputs must be an object", 400,
                              param="structured_outputs")
        sources.append(("structured_outputs", dict(so)))
    if req.guided_whitespace_pattern is not None:
        raise OpenAIError("guided_whitespace_pattern is not supported (the xgrammar backend has "
                          "none): leave it out", 400, param="guided_whitespace_pattern")
    sources += [(name, {kind: getattr(req, name)}) for name, kind in _GUIDED_ALIASES.items()
                if getattr(req, name) is not None]
    backend = req.guided_decoding_backend
    if backend is not None and backend not in ("auto", "xgrammar") and not str(
            backend).startswith("xgrammar:"):
        raise OpenAIError(f"guided_decoding_backend {backend!r} is not supported: structured "
                          "outputs here use xgrammar", 400, param="guided_decoding_backend")
    if not sources:
        return None
    if len(sources) > 1:
        raise OpenAIError(
            "only one kind of structured output may be asked for; got "
            + ", ".join(n for n, _ in sources),
            400,
            param=sources[-1][0],
        )
    field, kwargs = sources[0]

    def named(msg: str) -> str:  # the field as the client sent it
        if field == "structured_outputs":
            return msg
        for kind in _KINDS:
            msg = msg.replace(f"structured_outputs.{kind}", field)
        return msg

    try:
        params = StructuredOutputsParams(**kwargs)
        validate_structured_outputs(params)
    except (ValueError, TypeError) as e:
        raise OpenAIError(named(str(e)), 400, param=field) from None
    return params


_KINDS = ("json", "regex", "choice", "grammar", "json_object", "structural_tag")


def make_sampling_params(
    req: SamplingFields, max_tokens: int, logprobs: int | None, prompt_logprobs: int | None = None,
    tool_constraint: StructuredOutputsParams | None = None,
    defaults: dict[str, Any] | None = None,
) -> SamplingParams:
    """tool_constraint: the schema a tool_choice (a named function, "required") puts on the
    output; the request may then ask for no other constraint (vLLM's rule and words).
    defaults: the generation config's (``sampling_defaults``), for the sampling fields the
    request leaves out (null or absent, as vLLM's), before the neutral ones."""
    structured = structured_outputs_of(req)  # its own 400s, naming the field sent
    if tool_constraint is not None:
        if structured is not None:
            raise OpenAIError("You can only either use guided decoding or tools, not both.",
                              400, param="tool_choice")
        structured = tool_constraint
    # max_tokens was bounded by the generation config's in check_prompt_ids already
    sampling = with_sampling_defaults(
        {"temperature": req.temperature, "top_p": req.top_p, "top_k": req.top_k,
         "min_p": req.min_p, "repetition_penalty": req.repetition_penalty,
         "max_tokens": max_tokens}, defaults)
    try:
        return SamplingParams(
            n=req.n,
            **sampling,
            seed=None if req.seed is None else int(req.seed) % (2**63),
            presence_penalty=req.presence_penalty,
            frequency_penalty=req.frequency_penalty,
            min_tokens=req.min_tokens,
            stop=req.stop,
            stop_token_ids=req.stop_token_ids,
            ignore_eos=req.ignore_eos,
            include_stop_str_in_output=req.include_stop_str_in_output,
            logprobs=logprobs,
            prompt_logprobs=prompt_logprobs,
            skip_special_tokens=req.skip_special_tokens,
            logit_bias=logit_bias(req),
            allowed_token_ids=req.allowed_token_ids,
            bad_words=req.bad_words,
            structured_outputs=structured,
            extra_args=dict(req.vllm_xargs) if req.vllm_xargs else None,
        )
    except (ValueError, TypeError) as e:
        field = str(e).split(" ", 1)[0]  # SamplingParams' messages start with the field
        raise OpenAIError(str(e), 400,
                          param=field if field in type(req).model_fields else None) from None


def logit_bias(req: SamplingFields) -> dict[int, float] | None:
    """OpenAI's logit_bias (string token ids) as SamplingParams' (int ids, each in [-100, 100])."""
    if not req.logit_bias:
        return None
    out = {}
    for key, bias in req.logit_bias.items():
        try:
            token = int(key)
        except ValueError:
            raise OpenAIError(f"logit_bias keys must be token ids, got {key!r}", 400,
                              param="logit_bias") from None
        if not math.isfinite(bias):  # NaN would pass the clamp below as -100
            raise OpenAIError(f"logit_bias values must be finite numbers, got {bias} for "
                              f"token {key}", 400, param="logit_bias")
        out[token] = min(100.0, max(-100.0, bias))
    return out


def admit(engine: AsyncLLM, n_requests: int) -> None:
    """503 with Retry-After when the bounded waiting queue cannot take these requests."""
    try:
        engine.check_admission(n_requests)
    except QueueFullError as e:
        raise OpenAIError(str(e), 503, code="queue_full", retry_after=1) from None


def check_priority(engine: AsyncLLM, priority: int) -> None:
    """vLLM's 400 for a nonzero priority when the server schedules first come, first served."""
    if priority:
        try:
            engine.engine_config.scheduler_config.verify_priority(priority)
        except ValueError as e:
            raise OpenAIError(str(e), 400, param="priority") from None


def start_streams(
    engine: AsyncLLM, requests: list[tuple[list[int], SamplingParams, str, str | None]],
    lora_request: Any = None, priority: int = 0,
) -> list[RequestStream]:
    """Send every request (ids, params, request id, prompt text) or none of them; with a
    LoRA adapter's request (the 'model' named one), all run with it."""
    streams: list[RequestStream] = []
    try:
        for ids, params, rid, text in requests:
            streams.append(engine.generate(ids, params, rid, prompt_text=text,
                                           lora_request=lora_request, priority=priority))
    except BaseException as e:
        for s in streams:
            engine.abort_now(s.request_id)
        mapped = known_error(e)
        if mapped is None:
            raise
        raise mapped from None
    return streams


def known_error(e: BaseException) -> OpenAIError | None:
    """The client-facing error for a failure the server understands; None for a real fault."""
    if isinstance(e, OpenAIError):
        return e
    if isinstance(e, EngineDeadError):
        return OpenAIError(f"engine failed: {e}", 500, code="engine_dead")
    if isinstance(e, QueueFullError):
        return OpenAIError(str(e), 503, code="queue_full", retry_after=1)
    if isinstance(e, ValueError):  # the input processor's InvalidField names its field
        return OpenAIError(str(e), 400, param=getattr(e, "param", None))
    return None


def stream_error(where: str, e: Exception) -> str:
    """An error after a stream began: reported in-band as an SSE event (status already sent)."""
    mapped = known_error(e)
    if mapped is None:
        internal_error(where, e)
        return sse_error(f"internal error: {type(e).__name__}", 500)
    return sse_error(mapped.message, mapped.status)


@contextlib.contextmanager
def dead_engine_is_503() -> Any:
    """Around a route's call into the engine: an engine that died before the answer began is
    a 503 the client may retry (one that dies mid-stream is reported in-band)."""
    try:
        yield
    except EngineDeadError as e:
        raise OpenAIError(f"engine is not available: {e}", 503, retry_after=5) from None


def engine_unavailable(engine: AsyncLLM) -> OpenAIError | None:
    if engine.dead_reason is not None:
        return OpenAIError(f"engine is not available: {engine.dead_reason}", 503, retry_after=5)
    return None


# ---------------------------------------------------------------- beam search (vLLM's use_beam_search)

def beam_search_params(engine: AsyncLLM, req: SamplingFields, max_tokens: int) -> BeamSearchParams:
    """vLLM's use_beam_search (its ``to_beam_search_params``): beam width n, the request's
    temperature (default: the generation config's, else 1.0, as vLLM's),
    length_penalty (default 1.0), ignore_eos and include_stop_str_in_output. As in vLLM no
    other field is refused: the sampling fields beam search has no use for (stop, top_p,
    top_k, min_p, penalties, logit_bias, guided / structured outputs, prompt_logprobs, ...)
    are ignored. 400 for an n whose 2 * n logprobs per step are more than --max-logprobs
    allows (the engine's limit)."""
    limit = engine.input_processor.max_logprobs
    why = beam_logprobs_error(req.n, limit)
    if why is not None:  # the beam width is n here
        raise OpenAIError(
            f"use_beam_search with n={req.n}: {why}; use n <= {limit // 2}, or start the "
            f"server with --max-logprobs {2 * req.n}",
            400,
            param="n",
        )
    try:
        return BeamSearchParams(
            beam_width=req.n,
            max_tokens=max_tokens,
            ignore_eos=req.ignore_eos,
            temperature=with_sampling_defaults({"temperature": req.temperature},
                                               sampling_defaults(engine)).get("temperature", 1.0),
            length_penalty=req.length_penalty,
            include_stop_str_in_output=req.include_stop_str_in_output,
        )
    except ValueError as e:
        field = str(e).split(" ", 1)[0]
        raise OpenAIError(str(e), 400, param=field if field != "beam_width" else "n") from None


async def run_beam_search(
    engine: AsyncLLM, ids: list[int], params: BeamSearchParams, request_id: str,
    prompt_text: str | None = None, lora_request: Any = None, priority: int = 0,
) -> RequestOutput:
    """The beam search of one prompt on AsyncLLM: every step sends each live beam as a
    one-token request (ids ``<request_id>-beam<step>-<j>``, run concurrently) to the shared
    BeamSearcher. The answer is one finished RequestOutput whose outputs are the best
    ``beam_width`` beams, best first (index 0 best); their text is the generated part."""
    tok = engine.tokenizer
    searcher = BeamSearcher(
        [ids], params.beam_width, tok.eos_token_ids, length_penalty=params.length_penalty,
        ignore_eos=params.ignore_eos, temperature=params.temperature,
        max_model_len=engine.max_model_len)
    for step in range(params.max_tokens):
        live = searcher.live_beams()
        if not live:
            break
        streams = start_streams(engine, [
            (beam.tokens, searcher.step_params, f"{request_id}-beam{step}-{j}", None)
            for j, (_, beam) in enumerate(live)], lora_request, priority)
        searcher.advance(live, await collect_final(streams))
    outputs = []
    for i, beam in enumerate(searcher.best()[0]):
        # vLLM (EngineClient / OpenAIServing.beam_search): a beam ended by EOS keeps that
        # token in its token_ids only with include_stop_str_in_output, and its text never
        # holds the EOS (the final decode drops a trailing EOS either way)
        token_ids = beam.output_token_ids
        if beam.finish_reason == "stop" and not params.include_stop_str_in_output:
            token_ids = token_ids[:-1]
        text = searcher.text(beam, tok, False, False)
        outputs.append(CompletionOutput(
            index=i, text=text, token_ids=token_ids,
            cumulative_logprob=beam.cum_logprob, logprobs=beam.logprobs,
            finish_reason=beam.finish_reason, stop_reason=beam.stop_reason))
    return RequestOutput(request_id=request_id, prompt=prompt_text, prompt_token_ids=list(ids),
                         outputs=outputs, finished=True)


class BeamSearchStream:
    """A beam search as a request stream (what the serving classes iterate): one finished
    output, when the search ends (vLLM's beam_search yields only the final RequestOutput).
    Cancelling the iteration cancels the search, which aborts its step requests."""

    def __init__(self, engine: AsyncLLM, ids: list[int], params: BeamSearchParams,
                 request_id: str, prompt_text: str | None = None,
                 lora_request: Any = None, priority: int = 0) -> None:
        self.request_id = request_id
        self._run = (engine, list(ids), params, request_id, prompt_text, lora_request, priority)
        self.done = False

    def __aiter__(self) -> BeamSearchStream:
        return self

    async def __anext__(self) -> RequestOutput:
        if self.done:
            raise StopAsyncIteration
        self.done = True
        return await run_beam_search(*self._run)

    async def aclose(self) -> None:
        self.done = True


# ---------------------------------------------------------------- logprobs


def token_text(engine: AsyncLLM, token_id: int, lp: Logprob | None) -> str:
    if getattr(engine, "return_tokens_as_token_ids", False):  # vLLM's flag of that name
        return f"token_id:{token_id}"
    if lp is not None and lp.decoded_token is not None:
        return lp.decoded_token
    return engine.decode_token(token_id)


def top_entries(engine: AsyncLLM, pos: LogprobsDict, k: int) -> list[tuple[int, str, float]]:
    """The k most likely (token id, text, logprob) of one position, best first (k = -1:
    all of them, vLLM's whole-vocabulary logprobs)."""
    ranked = sorted(
        pos.items(),
        key=lambda kv: (kv[1].rank if kv[1].rank is not None else 1 << 30, -kv[1].logprob),
    )
    if k != -1:
        ranked = ranked[:k]
    return [(tid, token_text(engine, tid, lp), lp.logprob) for tid, lp in ranked]


# JSON has no -inf: a token the model rules out entirely gets this logprob (vLLM does the same)
MIN_LOGPROB = -9999.0


def prompt_logprobs_out(
    engine: AsyncLLM, ids: Sequence[int], positions: list[LogprobsDict | None] | None, k: int
) -> PromptLogprobs:
    """vLLM's `prompt_logprobs`: per prompt token, that token and the k most likely ones
    (k = -1: every token of the vocabulary).

    The engine may have computed more candidates (echo asks for its own k): the extra ones
    are left out, so the answer depends only on this request's prompt_logprobs.
    """
    positions = positions or []
    out: PromptLogprobs = []
    for j, tid in enumerate(ids):
        pos = positions[j] if j < len(positions) else None
        if not pos:
            out.append(None)
            continue
        entry = {}
        for cand, lp in pos.items():
            if cand == tid or k == -1 or (lp.rank is not None and lp.rank <= k):
                entry[cand] = PromptLogprob(
                    logprob=max(lp.logprob, MIN_LOGPROB),
                    rank=lp.rank,
                    decoded_token=token_text(engine, cand, lp),
                )
        out.append(entry)
    return out


# ---------------------------------------------------------------- async plumbing


async def wait_disconnect(request: Request) -> None:
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            return


async def unless_disconnected(request: Request, work: Awaitable[T]) -> T:
    """Run `work`; if the client goes away first, cancel it (which aborts its requests)."""
    task = asyncio.ensure_future(work)
    watcher = asyncio.ensure_future(wait_disconnect(request))
    try:
        done, _ = await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
    except asyncio.CancelledError:
        task.cancel()
        watcher.cancel()
        raise
    if task in done:
        watcher.cancel()
        return task.result()
    task.cancel()
    with contextlib.suppress(BaseException):
        await task
    raise ClientGone()


async def merge_streams(streams: list[RequestStream]) -> AsyncIterator[tuple[int, RequestOutput]]:
    """Interleave several request streams as outputs arrive, tagged with the stream index.

    Closing the merged iterator early (client gone) closes, and so aborts, every stream.
    """
    if len(streams) == 1:
        try:
            async for item in streams[0]:
                yield 0, item
        finally:
            await streams[0].aclose()
        return
    queue: asyncio.Queue[tuple[int, Any]] = asyncio.Queue()
    _end = object()

    async def pump(i: int, it: RequestStream) -> None:
        try:
            async for item in it:
                await queue.put((i, item))
            await queue.put((i, _end))
        except BaseException as e:  # forwarded to the consumer
            await queue.put((i, e))

    tasks = [asyncio.ensure_future(pump(i, s)) for i, s in enumerate(streams)]
    remaining = len(tasks)
    try:
        while remaining:
            i, item = await queue.get()
            if item is _end:
                remaining -= 1
            elif isinstance(item, BaseException):
                raise item
            else:
                yield i, item
    finally:
        for t in tasks:
            t.cancel()
        for t in tasks:
            with contextlib.suppress(BaseException):
                await t
        for s in streams:
            await s.aclose()


async def collect_final(streams: list[RequestStream]) -> list[RequestOutput]:
    """The final output of each stream (all run concurrently); aborts the rest on failure."""

    async def last(it: RequestStream) -> RequestOutput:
        final = None
        async for out in it:
            final = out
        assert final is not None, "engine produced no output"
        return final

    tasks = [asyncio.ensure_future(last(s)) for s in streams]
    try:
        return list(await asyncio.gather(*tasks))
    finally:
        for t in tasks:
            t.cancel()
        for s in streams:
            await s.aclose()
