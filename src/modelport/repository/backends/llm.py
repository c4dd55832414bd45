"""The `llm` backend: modelport's LLM engine inside a Triton model repository.

config.pbtxt:
    backend: "llm"
    max_batch_size: 0                      # the engine batches continuously by itself
    model_transaction_policy { decoupled: true }   # stream tokens (generate_stream,
                                                   # ModelStreamInfer); false: one response
    input [ { name: "text_input" data_type: TYPE_STRING dims: [ 1 ] } ]   # + optional
        # max_tokens (INT32), temperature / top_p (FP32), top_k / seed (INT32), ignore_eos (BOOL),
        # stream (BOOL; false: a decoupled model sends one whole response, as vLLM's backend)
    output [ { name: "text_output" data_type: TYPE_STRING dims: [ -1 ] } ]
    parameters { key: "model" value: { string_value: "/path/to/hf-folder-or.gguf" } }
    # other keys: EngineArgs names (max_model_len, kv_cache_memory, dtype, max_num_seqs, ...)

Sampling settings come from the optional input tensors, or from the request's `parameters`
(Triton's generate extension puts them there); those a request leaves out take the model's
generation_config.json defaults (the `generation_config` / `override_generation_config`
parameters, as vLLM's flags; engine/generation_config.py), as on /v1. A decoupled model sends the text in pieces,
each a delta, with the last response marked final.

A request the engine refuses (bad sampling value, prompt too long) fails with
InvalidArgument: HTTP 400 / gRPC INVALID_ARGUMENT on every path, streaming or not. Anything
else that goes wrong is an internal error of that request only.
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
from typing import Any

import numpy as np

from modelport.repository.backends.base import STREAM_END, Backend, BackendContext, BatchItem
from modelport.repository.errors import InvalidArgument, ModelConfigError, ServingError
from modelport.repository.tensors import InferRequest, InferResponse, InferTensor

_SAMPLING_KEYS = {
    "max_tokens": int,
    "temperature": float,
    "top_p": float,
    "top_k": int,
    "min_p": float,
    "seed": int,
    "ignore_eos": bool,
    "min_tokens": int,
    "presence_penalty": float,
    "frequency_penalty": float,
    "repetition_penalty": float,
}


def _engine_args(ctx: BackendContext) -> Any:
    from modelport.engine.arg_utils import EngineArgs, parse_json_dict

    fields = {f.name: f for f in dataclasses.fields(EngineArgs)}
    kw: dict[str, Any] = {}
    for key, p in ctx.config.parameters.items():
        if key not in fields:
            raise ModelConfigError(
                f"model '{ctx.config.name}': unknown llm parameter '{key}'; known: {sorted(fields)}"
            )
        raw = p.string_value
        default = fields[key].default
        try:
            if isinstance(default, bool):
                kw[key] = raw.strip().lower() in ("1", "true", "yes", "on")
            elif key == "override_generation_config":  # a JSON object, as vLLM's flag
                kw[key] = parse_json_dict(raw)
            elif isinstance(default, int) or key in (
                "max_model_len",
                "kv_cache_memory",
                "max_num_batched_tokens",
            ):
                kw[key] = int(raw)
            elif isinstance(default, float):
                kw[key] = float(raw)
            else:
                kw[key] = raw
        except (ValueError, argparse.ArgumentTypeError):
            raise ModelConfigError(
                f"model '{ctx.config.name}': llm parameter '{key}' has invalid value {raw!r}"
            ) from None
    if "model" in kw and not kw["model"].startswith("/"):
        # a path relative to the version folder where one is there; else the name as given,
        # as --model takes it (the embedded default's name, an id in the local HF cache)
        local = ctx.version_dir / kw["model"]
        if local.exists():
            kw["model"] = str(local.resolve())
    return EngineArgs(**kw)


_KIND = {int: "an integer", float: "a number", bool: "a boolean"}


def _cast(value: Any, cast: type) -> Any:
    """A JSON / tensor value as the sampling field's type, refusing lossy or odd conversions
    (3.7 as max_tokens, "false" as true)."""
    if cast is bool:
        if isinstance(value, (bool, np.bool_)):
            return bool(value)
        if isinstance(value, str) and value.strip().lower() in ("true", "false"):
            return value.strip().lower() == "true"
        raise ValueError(value)
    if isinstance(value, bool):
        raise TypeError(value)
    if cast is int:
        if isinstance(value, float) and not value.is_integer():
            raise ValueError(value)
        if isinstance(value, str):
            return int(value.strip())
        return int(value)
    return float(value)


class LLMBackend(Backend):
    def __init__(self, ctx: BackendContext) -> None:
        super().__init__(ctx)
        names = {i.name for i in ctx.config.input}
        if "text_input" not in names:
            raise ModelConfigError(
                f"model '{ctx.config.name}': the llm backend needs a TYPE_STRING input 'text_input'"
            )
        if "text_output" not in {o.name for o in ctx.config.output}:
            raise ModelConfigError(
                f"model '{ctx.config.name}': the llm backend needs a TYPE_STRING output "
                "'text_output'"
            )
        self.llm: Any = None  # the first engine: the one /v1 reaches
        self.engines: list[Any] = []
        self._ids = itertools.count()
        self._turns = itertools.count()
        self._configure(ctx)

    def _configure(self, ctx: BackendContext) -> None:
        """The engine's arguments: the config's parameters (EngineArgs names)."""
        self.args = _engine_args(ctx)

    def _engine_args_each(self) -> list[Any]:
        """EngineArgs of each engine to start (one here: the engine batches internally)."""
        return [self.args]

    @property
    def num_instances(self) -> int:
        # the engines batch internally: let the queue hand them as many requests as they run
        return max(1, self.args.max_num_seqs) * len(self._engine_args_each())

    async def load(self) -> None:
        from modelport.engine import registry
        from modelport.engine.async_llm import AsyncLLM

        try:
            for args in self._engine_args_each():
                self.engines.append(await AsyncLLM.from_engine_args(
                    args, served_model_names=[self.config.name]))
        except BaseException as e:
            for llm in self.engines:
                llm.shutdown()
            self.engines = []
            if isinstance(e, ValueError):
                raise ModelConfigError(f"model '{self.config.name}': {e}") from None
            raise
        self.llm = self.engines[0]
        registry.register(self.config.name, self.llm)  # reachable through /v1 as well
        self._mark_ready()

    async def unload(self) -> None:
        from modelport.engine import registry

        if self.llm is not None:
            registry.unregister(self.config.name, self.llm)
        for llm in self.engines:
            llm.shutdown()
        self.engines = []
        self.llm = None

    def _pick(self) -> Any:
        """The engine for the next request: the one with the fewest sequences in flight,
        ties taken in turn."""
        if len(self.engines) <= 1:
            if not self.engines:
                raise RuntimeError(f"model '{self.config.name}' is not loaded")
            return self.engines[0]
        start = next(self._turns) % len(self.engines)
        return min(self.engines[start:] + self.engines[:start],
                   key=lambda llm: llm.num_inflight_seqs)

    async def execute(self, items: list[BatchItem]) -> list[Any]:
        import asyncio

        return list(await asyncio.gather(*(self._one(it) for it in items)))

    async def run_batch(self, instance: int, items: list[BatchItem]) -> list[Any]:
        return await self.execute(items)

    def _params(self, req: InferRequest) -> Any:
        from modelport.engine.generation_config import with_sampling_defaults
        from modelport.sampling_params import SamplingParams

        kw: dict[str, Any] = {}
        for key, cast in _SAMPLING_KEYS.items():
            if key in req.inputs:
                value = np.asarray(req.inputs[key].data).reshape(-1)[0].item()
            elif key in req.parameters:
                value = req.parameters[key]
            else:
                continue
            try:
                kw[key] = _cast(value, cast)
            except (TypeError, ValueError):
                raise ValueError(f"{key} must be {_KIND[cast]}, got {value!r}") from None
        stop = req.parameters.get("stop")
        if stop is not None:
            kw["stop"] = stop
        return SamplingParams(**with_sampling_defaults(
            kw, self.llm.engine_config.default_sampling_params))

    async def _one(self, item: BatchItem) -> Any:
        req = item.request
        try:  # everything here reads the client's request
            raw = np.asarray(req.inputs["text_input"].data).reshape(-1)
            if raw.size != 1:
                raise ValueError(f"text_input must hold one string, got {raw.size}")
            value = raw[0]
            text = value.decode("utf-8") if isinstance(value, bytes) else str(value)
            params = self._params(req)
            # vLLM's Triton backend's "stream" (a BOOL input or a parameter): false on a
            # decoupled model sends the whole text as one final response, so /generate works
            if "stream" in req.inputs:
                streaming = np.asarray(req.inputs["stream"].data).reshape(-1)[0].item()
            else:
                streaming = req.parameters.get("stream", True)
            try:
                streaming = _cast(streaming, bool)
            except (TypeError, ValueError):
                raise ValueError(f"stream must be a boolean, got {streaming!r}") from None
        except (ValueError, TypeError, UnicodeDecodeError) as e:
            return self._fail(item, self._invalid(e))
        stream, refused = self._submit(item, text, params)
        if stream is None:  # the failure is already answered
            return refused
        sent = 0
        last = None
        try:
            async for out in stream:
                last = out
                if item.stream is not None and streaming:
                    full = out.outputs[0].text
                    if len(full) > sent or out.finished:
                        item.stream.put_nowait(self._response(req, full[sent:], out.finished))
                        sent = len(full)
        except Exception as e:  # engine died / aborted: fail this request only
            msg = f"model '{self.config.name}': generation failed: {type(e).__name__}: {e}"
            return self._fail(item, ServingError(msg))
        whole = self._response(req, last.outputs[0].text if last else "", True)
        if item.stream is not None:
            if not streaming:
                item.stream.put_nowait(whole)
            item.stream.put_nowait(STREAM_END)
            return None
        return whole

    def _submit(self, item: BatchItem, text: str, params: Any,
                lora: Any = None) -> tuple[Any, Any]:
        """(the engine's output stream for the request, None), or, when the engine refuses
        it or cannot take it, (None, what ``_fail`` answered)."""
        try:
            llm = self._pick()
            ids = llm.encode(text)
            rid = f"triton-{item.request.id or ''}-{next(self._ids)}"
            return llm.generate(ids, params, rid, prompt_text=text, lora_request=lora), None
        except ValueError as e:  # the engine refused it (e.g. longer than max_model_len)
            return None, self._fail(item, self._invalid(e))
        except Exception as e:  # engine dead, a bug: not the client's fault
            return None, self._fail(
                item, ServingError(f"model '{self.config.name}': {type(e).__name__}: {e}")
            )

    def _invalid(self, e: Exception) -> InvalidArgument:
        return InvalidArgument(f"model '{self.config.name}': {e}")

    def _fail(self, item: BatchItem, err: Exception) -> Any:
        return self._finish(item, err)

    def _finish(self, item: BatchItem, answer: Any) -> Any:
        """The request's last answer (a response or an error): put on its stream, which it
        ends, or returned for a one-response request."""
        if item.stream is not None:
            item.stream.put_nowait(answer)
            item.stream.put_nowait(STREAM_END)
            return None
        return answer

    def _response(self, req: InferRequest, text: str, final: bool) -> InferResponse:
        return InferResponse(self.config.name, req.model_version,
                             {"text_output": string_tensor("text_output", text)},
                             id=req.id, final=final)


def string_tensor(name: str, text: str) -> InferTensor:
    """A BYTES tensor of one UTF-8 string."""
    arr = np.empty((1,), dtype=np.object_)
    arr[0] = text.encode("utf-8")
    return InferTensor(name, "BYTES", arr)
