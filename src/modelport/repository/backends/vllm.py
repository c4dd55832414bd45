"""The `vllm` backend: a model repository written for Triton's vLLM backend, served as is.

Such a repository holds, per model, a config.pbtxt that may name nothing but the backend

    backend: "vllm"
    instance_group [ { count: 1, kind: KIND_MODEL } ]

and ``<version>/model.json``: vLLM's engine arguments (``{"model": "/models/llama",
"gpu_memory_utilization": 0.9, "enforce_eager": true, ...}``), taken as ``LLM(**kwargs)``
takes them (entrypoints/vllm_engine_flags.py). As in Triton's vLLM backend:

* the config is completed with the backend's inputs (``text_input``; optional ``stream``,
  ``sampling_parameters``, ``exclude_input_in_output``, ``image``, ``return_*``) and outputs
  (``text_output``, ``finish_reason``, ``cumulative_logprob``, ``logprobs``,
  ``num_input_tokens``, ``num_output_tokens``) it leaves out, is decoupled, and has
  max_batch_size 0;
* sampling settings are vLLM's SamplingParams fields, from the ``sampling_parameters``
  input (a JSON string) or else the request's parameters; string values are converted to
  the field's type ("0.7" -> 0.7), nulls dropped; ``lora_name`` picks an adapter of
  ``multi_lora.json`` (name -> folder) when model.json has ``enable_lora``; unset fields
  keep vLLM's defaults (16 tokens at temperature 1), not generation_config.json's;
* ``stream`` (default false): true sends each new piece of text as it comes, false one
  response at the end;
* ``exclude_input_in_output`` (default false without streaming): the whole response's
  text starts with the prompt unless it is true; streaming with it false is refused;
* each ``return_*`` input set true adds that output to every response: the finish reason
  ("None" until the last), the cumulative logprob, the new tokens' logprobs as JSON
  (``[{token_id: {"logprob", "rank", "decoded_token"}}]``, "null" without ``logprobs``),
  the prompt's token count, and the number of tokens new in this response.

With ``parameters { key: "REPORT_CUSTOM_METRICS" value: { string_value: "true" } }`` in
config.pbtxt (and ``disable_log_stats`` not true in model.json), the engine's ``vllm:``
series are on the metrics endpoint with labels model and version (vllm_metrics.py); any
other value means off, as the backend's own check is ``value.lower() == "true"``.
``ENABLE_VLLM_HEALTH_CHECK`` (same rule) checks the engine before each batch of requests:
once its core has died, the requests are answered UNAVAILABLE ("Model is unavailable due to
unhealthy vLLM engine", HTTP 503) and, in explicit model control mode (as Triton's docs ask),
the model is unloaded, so it is no longer ready and later requests get "has no available
versions"; other modes refuse the unload (logged) and the model keeps answering UNAVAILABLE.
Without it, a dead engine fails each request with an internal error and the model stays
loaded. ``GPU_DEVICE_IDS`` ("0,2") runs a KIND_MODEL model's engine (and its tensor-parallel
ranks) on those GPUs only, as its CUDA_VISIBLE_DEVICES; checked as that backend checks it.
As there, each instance of the instance_group runs an engine of its own (requests go to the
one with the fewest in flight), and a ``KIND_GPU`` instance's engine sees only the GPU the
group places it on (``gpus: [0, 1]``: two engines, one a GPU); KIND_GPU refuses engines that
span several GPUs (tensor, pipeline or data parallel), asking for KIND_MODEL. The model's
OpenAI-compatible routes (/v1) reach the first instance's engine.

An embedding model (model.json ``"runner": "pooling"``, or ``"task": "embed"``) takes the
backend's ``embedding_request`` input, a JSON object ``{"input": "text" | [token ids],
"pooling_params": {"dimensions": [n]}}`` (``text_input`` is still required, and ignored):
one response whose ``text_output`` is the vector as a JSON list of floats
(``num_input_tokens`` / ``num_output_tokens``, 0, on request). As in that backend, a
generative model refuses ``embedding_request`` ("Model m does not support 'embed'
request") and an embedding model refuses requests without it ('generate').

Images are refused (no multimodal model behind this backend); a bad setting fails the
request alone with InvalidArgument (HTTP 400 / INVALID_ARGUMENT).
"""

from __future__ import annotations

import asyncio
import copy
import dataclasses
import json
import logging
import os
import typing
from pathlib import Path
from typing import Any

import numpy as np
from tritonclient.grpc import model_config_pb2 as mc

from modelport.repository.backends.base import (
    STREAM_END,
    BackendContext,
    BatchItem,
    expand_instances,
)
from modelport.repository.backends.llm import _KIND, LLMBackend, _cast, string_tensor
from modelport.repository.errors import ModelConfigError, ServingError, Unavailable
from modelport.repository.tensors import InferRequest, InferResponse, InferTensor

logger = logging.getLogger(__name__)

ENGINE_ARGS_FILE = "model.json"
LORA_FILE = "multi_lora.json"

_S, _B, _F, _U = mc.TYPE_STRING, mc.TYPE_BOOL, mc.TYPE_FP32, mc.TYPE_UINT32
# (name, type, dims, optional) as Triton's vLLM backend declares them
INPUTS = [("text_input", _S, [1], False), ("image", _S, [-1], True), ("stream", _B, [1], True),
          ("sampling_parameters", _S, [1], True), ("exclude_input_in_output", _B, [1], True),
          ("return_finish_reason", _B, [1], True), ("return_cumulative_logprob", _B, [1], True),
          ("return_logprobs", _B, [1], True), ("return_num_input_tokens", _B, [1], True),
          ("return_num_output_tokens", _B, [1], True),
          ("embedding_request", _S, [1], True)]
OUTPUTS = [("text_output", _S, [-1]), ("finish_reason", _S, [-1]),
           ("cumulative_logprob", _F, [-1]), ("logprobs", _S, [-1]),
           ("num_input_tokens", _U, [1]), ("num_output_tokens", _U, [-1])]
EXTRA_OUTPUTS = ("finish_reason", "cumulative_logprob", "logprobs", "num_input_tokens",
                 "num_output_tokens")
# config.pbtxt parameters Triton's vLLM backend reads for itself, not engine arguments
BACKEND_PARAMETERS = ("REPORT_CUSTOM_METRICS", "ENABLE_VLLM_HEALTH_CHECK", "GPU_DEVICE_IDS")
# what every request gets once ENABLE_VLLM_HEALTH_CHECK found the engine dead (UNAVAILABLE)
UNHEALTHY = "Model is unavailable due to unhealthy vLLM engine"
# model.json keys about vLLM's own logging: nothing to set here
_LOGGING_KEYS = ("disable_log_requests", "enable_log_requests", "disable_log_stats")


def autocomplete_vllm(cfg: mc.ModelConfig) -> mc.ModelConfig:
    """What Triton's vLLM backend adds to a config: the inputs and outputs it leaves out,
    decoupled transactions, no Triton batching (the engine batches)."""
    out = mc.ModelConfig()
    out.CopyFrom(cfg)
    have = {i.name for i in out.input}
    for name, dtype, dims, optional in INPUTS:
        if name not in have:
            out.input.add(name=name, data_type=dtype, dims=dims, optional=optional)
    have = {o.name for o in out.output}
    for name, dtype, dims in OUTPUTS:
        if name not in have:
            out.output.add(name=name, data_type=dtype, dims=dims)
    out.model_transaction_policy.decoupled = True
    out.max_batch_size = 0
    return out


def _engine_args(ctx: BackendContext) -> tuple[Any, dict[str, str], bool]:
    """EngineArgs from ``<version>/model.json`` (vLLM's names), the LoRA adapters of
    multi_lora.json when it enables LoRA, and whether model.json sets disable_log_stats
    (which turns REPORT_CUSTOM_METRICS off, as the engine then collects no stats)."""
    from modelport.engine.arg_utils import EngineArgs
    from modelport.entrypoints.vllm_engine_flags import llm_kwargs

    name, path = ctx.config.name, ctx.version_dir / ENGINE_ARGS_FILE
    if not path.is_file():
        raise ModelConfigError(f"model '{name}': '{ENGINE_ARGS_FILE}' containing vllm engine "
                               f"args must be provided in '{ctx.version_dir}'")
    try:
        given = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise ModelConfigError(f"model '{name}': {path}: {e}") from None
    if not isinstance(given, dict) or not isinstance(given.get("model"), str):
        raise ModelConfigError(f"model '{name}': {path} must be a JSON object with a 'model'")
    no_stats = given.get("disable_log_stats", False)
    no_stats = no_stats.strip().lower() == "true" if isinstance(no_stats, str) else bool(no_stats)
    for key in [*_LOGGING_KEYS, "served_model_name"]:
        given.pop(key, None)
    if "kv_cache_memory_bytes" in given:  # vLLM's name
        given["kv_cache_memory"] = given.pop("kv_cache_memory_bytes")
    own = {f.name for f in dataclasses.fields(EngineArgs)} - {"usage_context",
                                                              "cuda_visible_devices"}
    kw = {k: v for k, v in given.items() if k in own}
    lora = str(kw.get("enable_lora", False)).lower() == "true"  # a bool or a string there
    kw["enable_lora"] = lora
    try:
        extra = llm_kwargs({k: v for k, v in given.items() if k not in own}, own=kw)
        args = EngineArgs(**kw, usage_context="server")
    except (TypeError, ValueError) as e:
        raise ModelConfigError(f"model '{name}': {path}: {e}") from None
    for k, v in extra.items():
        setattr(args, k, v)
    local = ctx.version_dir / args.model
    if not Path(args.model).is_absolute() and local.exists():
        args.model = str(local.resolve())
    adapters: dict[str, str] = {}
    if lora:
        lora_path = ctx.version_dir / LORA_FILE
        try:
            adapters = json.loads(lora_path.read_text())
        except FileNotFoundError:
            raise ModelConfigError(f"model '{name}': enable_lora is set but {lora_path} is "
                                   "missing") from None
        except ValueError as e:
            raise ModelConfigError(f"model '{name}': {lora_path}: {e}") from None
        if not isinstance(adapters, dict) or not all(
                isinstance(v, str) for v in adapters.values()):
            raise ModelConfigError(f"model '{name}': {lora_path} must map adapter names to "
                                   "folders")
    return args, adapters, no_stats


def _gpu_device_ids(ctx: BackendContext, args: Any) -> str | None:
    """GPU_DEVICE_IDS ("0,2"): the GPUs a KIND_MODEL model's engine runs on, checked as
    Triton's vLLM backend checks them (integers, none negative or twice, as many as the
    ranks when there are several: tensor-parallel ranks of every data-parallel replica, which
    takes the next tensor_parallel_size of them); None when not given."""
    param = ctx.config.parameters.get("GPU_DEVICE_IDS")
    text = "" if param is None else param.string_value
    if not text:
        return None
    name = ctx.config.name
    kinds = {g.kind for g in ctx.config.instance_group}
    if kinds and kinds != {mc.ModelInstanceGroup.KIND_MODEL}:
        logger.warning("model '%s': GPU_DEVICE_IDS is read for KIND_MODEL instances only; "
                       "ignored", name)
        return None
    try:
        ids = [int(x.strip()) for x in text.split(",")]
    except ValueError:
        raise ModelConfigError(
            f"model '{name}': invalid value for GPU_DEVICE_IDS: '{text}'; expected a "
            "comma-separated list of integer GPU IDs (e.g. '0,1,2')") from None
    if any(i < 0 for i in ids):
        raise ModelConfigError(f"model '{name}': GPU_DEVICE_IDS contains invalid GPU ID(s): "
                               f"{[i for i in ids if i < 0]}; GPU IDs must be non-negative")
    twice = sorted({i for i in ids if ids.count(i) > 1})
    if twice:
        raise ModelConfigError(f"model '{name}': GPU_DEVICE_IDS contains duplicate GPU "
                               f"ID(s): {twice}; each GPU ID must be unique")
    tp, dp = args.tensor_parallel_size, args.data_parallel_size
    if tp * dp > 1 and len(ids) != tp * dp:
        raise ModelConfigError(
            f"model '{name}': GPU_DEVICE_IDS names {len(ids)} GPU(s) but "
            f"tensor_parallel_size {tp} x data_parallel_size {dp} ranks need {tp * dp}; "
            "give one GPU ID per rank")
    return ",".join(map(str, ids))


def _instance_args(ctx: BackendContext, args: Any) -> list[Any]:
    """EngineArgs of each model instance: as in Triton's vLLM backend, every instance of the
    instance_group runs its own engine, and a KIND_GPU instance's engine sees only the GPU
    Triton placed it on (its CUDA_VISIBLE_DEVICES); KIND_GPU is for single-GPU engines."""
    each = []
    for spec in expand_instances(ctx.config):
        one = copy.copy(args)  # the attributes model.json set beyond the fields too
        if spec.kind == "GPU":
            world = args.tensor_parallel_size * args.pipeline_parallel_size \
                * args.data_parallel_size
            if world > 1:
                raise ModelConfigError(
                    f"model '{ctx.config.name}': KIND_GPU is currently for single-GPU models, "
                    "please specify KIND_MODEL in the model's config.pbtxt for multi-GPU "
                    f"models (tensor_parallel_size x pipeline_parallel_size x "
                    f"data_parallel_size is {world})")
            one.cuda_visible_devices = _server_gpu(spec.device_id)
            logger.info("model '%s': KIND_GPU instance %s runs its engine on GPU %d "
                        "(CUDA_VISIBLE_DEVICES=%s)", ctx.config.name, spec.name,
                        spec.device_id, one.cuda_visible_devices)
        each.append(one)
    return each


def _server_gpu(device_id: int) -> str:
    """The CUDA_VISIBLE_DEVICES entry of the server's GPU ``device_id`` (gpus count the GPUs
    the server sees: under CUDA_VISIBLE_DEVICES=2,3, GPU 1 is physical 3, or its UUID)."""
    from modelport.engine.gpu_info import visible_entries

    entries = visible_entries(os.environ.get("CUDA_VISIBLE_DEVICES"))
    if entries is None or device_id >= len(entries):  # the repository checked the count
        return str(device_id)
    return entries[device_id]


def _switch(ctx: BackendContext, key: str, what: str) -> bool:
    """A switch of the config's parameters as Triton's vLLM backend reads it: on for "true"
    in any case, off for anything else (a warning here for what is neither true nor false)."""
    param = ctx.config.parameters.get(key)
    if param is None:
        return False
    value = param.string_value.lower()  # no strip(): " true" is off there too
    if value not in ("true", "false"):
        logger.warning("model '%s': %s is %r, not \"true\" or \"false\": %s",
                       ctx.config.name, key, param.string_value, what)
    return value == "true"


def _field_types() -> dict[str, Any]:
    from modelport.sampling_params import SamplingParams

    hints = typing.get_type_hints(SamplingParams)
    return {f.name: hints[f.name] for f in dataclasses.fields(SamplingParams) if f.init}


def _convert(key: str, value: Any, hint: Any) -> Any:
    """A JSON value as the SamplingParams field's scalar type, strings included ("0.7",
    "16", "true"), as the vLLM backend converts them (the llm backend's checks); other values
    are passed as they are."""
    scalars = [t for t in typing.get_args(hint) or (hint,) if t in (int, float, bool, str)]
    if len(scalars) != 1 or isinstance(value, (list, dict)):
        return value
    if scalars[0] is str:
        return str(value)
    if scalars[0] is bool and type(value) is int:  # vLLM's bool(1)
        return bool(value)
    given = value
    if scalars[0] is int and isinstance(value, str):  # "16" and "16.0" alike
        try:
            given = float(value)
        except ValueError:
            pass
    try:
        return _cast(given, scalars[0])
    except (TypeError, ValueError):
        raise ValueError(f"{key} must be {_KIND[scalars[0]]}, got {value!r}") from None


class VLLMBackend(LLMBackend):
    def _configure(self, ctx: BackendContext) -> None:
        """The engine's arguments from model.json; the config's parameters are the
        backend's own switches only."""
        if not ctx.config.model_transaction_policy.decoupled:
            raise ModelConfigError(f"model '{ctx.config.name}': the vllm backend must be "
                                   "configured to use decoupled model transaction policy")
        for key in ctx.config.parameters:
            if key not in BACKEND_PARAMETERS:
                raise ModelConfigError(
                    f"model '{ctx.config.name}': unknown vllm backend parameter '{key}' (engine "
                    f"arguments go in {ENGINE_ARGS_FILE}; known: {', '.join(BACKEND_PARAMETERS)})")
        self.args, self.adapters, no_stats = _engine_args(ctx)
        self.args.cuda_visible_devices = _gpu_device_ids(ctx, self.args)
        self._each = _instance_args(ctx, self.args)
        self._fields = _field_types()
        self._report_metrics = _switch(ctx, "REPORT_CUSTOM_METRICS",
                                       "the vLLM metrics are not reported") and not no_stats
        self._health_check = _switch(ctx, "ENABLE_VLLM_HEALTH_CHECK",
                                     "the engine's health is not checked")
        self._healthy = True
        self._unloading: Any = None
        self._metrics: Any = None

    def _engine_args_each(self) -> list[Any]:
        return self._each

    async def load(self) -> None:
        await super().load()
        if not self._report_metrics:
            return
        if self.ctx.metrics is None:  # no metrics in this server (Triton: "not supported")
            logger.info("model '%s': metrics not supported, REPORT_CUSTOM_METRICS ignored",
                        self.config.name)
            return
        from modelport.repository.backends.vllm_metrics import TritonVllmMetrics
        from modelport.repository.custom_metrics import CustomMetricError

        try:
            self._metrics = TritonVllmMetrics(self.ctx.metrics, self.config.name,
                                              self.ctx.version, self.llm.max_model_len)
        except CustomMetricError as e:
            await super().unload()
            raise ModelConfigError(f"model '{self.config.name}': REPORT_CUSTOM_METRICS: "
                                   f"{e}") from None
        for llm in self.engines:  # one set of series for the model's instances
            llm.stat_logger = self._metrics

    async def unload(self) -> None:
        await super().unload()
        if self._metrics is not None:
            self._metrics.release()
            self._metrics = None

    # -- ENABLE_VLLM_HEALTH_CHECK -----------------------------------------------------------
    async def execute(self, items: list[BatchItem]) -> list[Any]:
        if self._health_check and not self._check_health():
            err = Unavailable(UNHEALTHY)
            return [self._fail(item, err) for item in items]
        return await super().execute(items)

    def _check_health(self) -> bool:
        """Whether the engine still runs; the first time it does not, the model's unload is
        started (it does not wait here: the model may not be unloaded by its own request)."""
        dead = [llm.dead_reason for llm in self.engines if llm.dead_reason is not None]
        if self._healthy and dead:
            self._healthy = False
            logger.error("model '%s': the vLLM engine is not healthy and the model will be "
                         "unloaded: %s", self.config.name, dead[0])
            if self.ctx.model_control is not None:
                self._unloading = asyncio.get_running_loop().create_task(
                    self.ctx.model_control(self.config.name, "unload",
                                           {"name": self.config.name}))
                self._unloading.add_done_callback(self._unloaded)
        return self._healthy

    def _unloaded(self, task: asyncio.Task) -> None:
        if not task.cancelled() and task.exception() is not None:
            logger.error("model '%s': unloading it after the engine failed: %s",
                         self.config.name, task.exception())

    # -- one request ------------------------------------------------------------------------
    def _flag(self, req: InferRequest, name: str) -> bool | None:
        if name not in req.inputs:
            return None
        return bool(np.asarray(req.inputs[name].data).reshape(-1)[0])

    def _sampling(self, req: InferRequest) -> tuple[Any, Any]:
        """(SamplingParams, LoRARequest or None) from sampling_parameters or parameters."""
        from modelport.sampling_params import SamplingParams

        if "sampling_parameters" in req.inputs:
            raw = np.asarray(req.inputs["sampling_parameters"].data).reshape(-1)[0]
            raw = raw.decode("utf-8") if isinstance(raw, bytes) else str(raw)
            try:
                given = json.loads(raw)
            except ValueError as e:
                raise ValueError(f"sampling_parameters is not valid JSON: {e}") from None
            if not isinstance(given, dict):
                raise ValueError("sampling_parameters must be a JSON object")
        else:
            given = dict(req.parameters)
        given = {k: v for k, v in given.items() if v is not None}
        lora_name = given.pop("lora_name", None)
        for key in ("guided_decoding", "structured_outputs"):
            if isinstance(given.get(key), str):  # the backend takes these as JSON text too
                try:
                    given[key] = json.loads(given[key])
                except ValueError as e:
                    raise ValueError(f"{key} is not valid JSON: {e}") from None
        if isinstance(given.get("guided_decoding"), dict):
            given["guided_decoding"] = {k: v for k, v in given["guided_decoding"].items()
                                        if k != "backend"}
        unknown = sorted(set(given) - set(self._fields))
        if unknown:
            raise ValueError(f"unknown sampling parameter(s): {', '.join(unknown)}")
        kw = {k: _convert(k, v, self._fields[k]) for k, v in given.items()}
        params = SamplingParams(**kw)
        return params, self._lora(lora_name)

    def _lora(self, name: Any) -> Any:
        if name is None:
            return None
        if not self.adapters:
            raise ValueError("LoRA feature is not enabled.")
        if name not in self.adapters:
            raise ValueError(f"LoRA {name} is not supported, we currently support "
                             f"{list(self.adapters)}")
        from modelport.lora.request import LoRARequest

        path = Path(self.adapters[name])
        if not path.is_absolute():
            path = self.ctx.version_dir / path
        return LoRARequest(str(name), list(self.adapters).index(name) + 1, str(path))

    def _task(self, req: InferRequest) -> str:
        """The request's task, "embed" with an embedding_request input, else "generate";
        ValueError (Triton's words) when the engine does not do it."""
        task = "embed" if "embedding_request" in req.inputs else "generate"
        served = self.llm.pooling_task or "generate"
        if task != served:
            raise ValueError(f"Model {self.config.name} does not support '{task}' request")
        return task

    async def _one(self, item: BatchItem) -> Any:
        req = item.request
        try:  # everything here reads the client's request
            if "image" in req.inputs:
                raise ValueError("images are not supported by this model")
            if self._task(req) == "embed":
                return await self._embed(item)
            raw = np.asarray(req.inputs["text_input"].data).reshape(-1)
            if raw.size != 1:
                raise ValueError(f"text_input must hold one string, got {raw.size}")
            text = raw[0].decode("utf-8") if isinstance(raw[0], bytes) else str(raw[0])
            streaming = bool(self._flag(req, "stream"))
            exclude = self._flag(req, "exclude_input_in_output")
            prepend = not exclude if exclude is not None else not streaming
            if prepend and streaming:
                raise ValueError("When streaming, `exclude_input_in_output` = False is not "
                                 "allowed.")
            extra = {o for o in EXTRA_OUTPUTS if self._flag(req, f"return_{o}")}
            params, lora = self._sampling(req)
        except (ValueError, TypeError, UnicodeDecodeError) as e:
            return self._fail(item, self._invalid(e))
        stream, refused = self._submit(item, text, params, lora)
        if stream is None:  # the failure is already answered
            return refused
        seen = {"text": 0, "tokens": 0, "logprobs": 0}
        last = None
        try:
            async for out in stream:
                last = out
                if streaming and item.stream is not None:
                    item.stream.put_nowait(self._reply(req, out, extra, seen, ""))
        except Exception as e:  # engine died / aborted: fail this request only
            msg = f"model '{self.config.name}': generation failed: {type(e).__name__}: {e}"
            return self._fail(item, ServingError(msg))
        if streaming:
            if item.stream is not None:
                item.stream.put_nowait(STREAM_END)
                return None
            return self._reply(req, last, extra, {"text": 0, "tokens": 0, "logprobs": 0}, "")
        whole = self._reply(req, last, extra, {"text": 0, "tokens": 0, "logprobs": 0},
                            text if prepend else "")
        return self._finish(item, whole)

    # -- embedding_request ------------------------------------------------------------------
    def _embedding_request(self, req: InferRequest, llm: Any) -> tuple[list[int], Any]:
        """(prompt token ids, PoolingParams) from the embedding_request JSON."""
        from modelport.pooling_params import PoolingParams

        raw = np.asarray(req.inputs["embedding_request"].data).reshape(-1)
        if raw.size != 1:
            raise ValueError(f"embedding_request must hold one string, got {raw.size}")
        doc = raw[0].decode("utf-8") if isinstance(raw[0], bytes) else str(raw[0])
        try:
            body = json.loads(doc)
        except ValueError as e:
            raise ValueError(f"embedding_request is not valid JSON: {e}") from None
        if not isinstance(body, dict) or "input" not in body:
            raise ValueError("embedding_request must be a JSON object with an 'input'")
        given = body["input"]
        if isinstance(given, str):
            ids = llm.encode(given)
        elif (isinstance(given, list) and given
              and all(isinstance(t, int) and not isinstance(t, bool) for t in given)):
            ids = list(given)
        else:
            raise ValueError("embedding_request 'input' must be a string or a non-empty list "
                             f"of token ids, got {given!r:.80}")
        pooling = body.get("pooling_params") or {}
        if not isinstance(pooling, dict):
            raise ValueError("embedding_request 'pooling_params' must be a JSON object")
        dims = pooling.get("dimensions")
        if isinstance(dims, list):  # the backend reads dimensions[0]
            if not dims:
                raise ValueError("embedding_request 'dimensions' is an empty list")
            dims = dims[0]
        return ids, PoolingParams(dimensions=dims, task="embed")

    async def _embed(self, item: BatchItem) -> Any:
        """One embedding_request: one final response, its vector as JSON in text_output."""
        req = item.request
        llm = self._pick()
        ids, params = self._embedding_request(req, llm)  # ValueError: the caller's 400
        extra = {o for o in ("num_input_tokens", "num_output_tokens")
                 if self._flag(req, f"return_{o}")}
        try:
            vec, _ = await llm.pool(ids, params, f"triton-{req.id or ''}-{next(self._ids)}")
        except ValueError as e:  # the engine refused it (too long, bad dimensions)
            return self._fail(item, self._invalid(e))
        except Exception as e:  # engine dead or died, a bug: not the client's fault
            return self._fail(item, ServingError(
                f"model '{self.config.name}': embedding failed: {type(e).__name__}: {e}"))
        tensors = {"text_output": string_tensor("text_output", json.dumps(vec))}
        counts = {"num_input_tokens": len(ids), "num_output_tokens": 0}
        for name in sorted(extra):
            tensors[name] = InferTensor(name, "UINT32", np.asarray([counts[name]], np.uint32))
        return self._finish(item, InferResponse(self.config.name, req.model_version, tensors,
                                                id=req.id, final=True))

    def _reply(self, req: InferRequest, out: Any, extra: set[str], seen: dict[str, int],
               prefix: str) -> InferResponse:
        """One response: the text (and tokens, logprobs) new since ``seen``, which it moves on."""
        c = out.outputs[0]
        tensors = {"text_output": string_tensor("text_output", prefix + c.text[seen["text"]:])}
        if "finish_reason" in extra:
            tensors["finish_reason"] = string_tensor("finish_reason", str(c.finish_reason))
        if "cumulative_logprob" in extra:
            tensors["cumulative_logprob"] = InferTensor(
                "cumulative_logprob", "FP32", np.asarray(
                    [np.nan if c.cumulative_logprob is None else c.cumulative_logprob],
                    dtype=np.float32))
        if "logprobs" in extra:
            if c.logprobs is None:
                doc = "null"
            else:
                doc = json.dumps([{str(tok): {"logprob": lp.logprob, "rank": lp.rank,
                                              "decoded_token": lp.decoded_token}
                                   for tok, lp in d.items()}
                                  for d in list(c.logprobs)[seen["logprobs"]:]])
                seen["logprobs"] = len(c.logprobs)
            tensors["logprobs"] = string_tensor("logprobs", doc)
        if "num_input_tokens" in extra:
            tensors["num_input_tokens"] = InferTensor(
                "num_input_tokens", "UINT32", np.asarray([len(out.prompt_token_ids)],
                                                         dtype=np.uint32))
        if "num_output_tokens" in extra:
            tensors["num_output_tokens"] = InferTensor(
                "num_output_tokens", "UINT32", np.asarray([len(c.token_ids) - seen["tokens"]],
                                                          dtype=np.uint32))
        seen["text"], seen["tokens"] = len(c.text), len(c.token_ids)
        return InferResponse(self.config.name, req.model_version, tensors, id=req.id,
                             final=out.finished)

