"""The object a TorchServe handler lives in, inside its worker process.

Built by ProcessWorker in the child (`factory="modelport.torchserve.handler_service:
HandlerService"`). It resolves the handler the way TorchServe's backend does (a module-level
function, or the one class defined in the handler module, or a built-in `ts.torch_handler`
name), gives it a real `ts.context.Context`, and turns each batch into one response per
request. A handler error fails the batch, never the process.
"""

from __future__ import annotations

import dataclasses
import importlib
import inspect
import io
import json
import logging
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from modelport.torchserve.messages import BatchResult, InputParam, ItemResponse, RequestItem
from modelport.torchserve.streaming import StreamSocket

logger = logging.getLogger("modelport.torchserve.worker")


def _decode(param: InputParam) -> Any:
    ct = param.content_type.split(";")[0].strip().lower()
    if ct == "application/json":
        try:
            return json.loads(param.value.decode("utf-8"))
        except (ValueError, UnicodeDecodeError):
            return bytearray(param.value)
    if ct.startswith("text"):
        try:
            return param.value.decode("utf-8")
        except UnicodeDecodeError:
            return bytearray(param.value)
    return bytearray(param.value)


def _classes_defined_in(module: Any) -> list[type]:
    return [
        c for _, c in inspect.getmembers(module, inspect.isclass) if c.__module__ == module.__name__
    ]


def load_entry_point(handler: str) -> tuple[Callable, Callable]:
    """Return (entry(data, context), initialize(context)) for a manifest's handler string."""
    module_part, _, function_name = handler.partition(":")
    module_name = Path(module_part).name
    if module_name.endswith(".py"):
        module_name = module_name[:-3]
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as e:
        if e.name != module_name:
            raise
        # a TorchServe built-in handler name, e.g. "image_classifier"
        module = importlib.import_module(f"ts.torch_handler.{module_name}")
    function_name = function_name or "handle"
    fn = getattr(module, function_name, None)
    if callable(fn) and not inspect.isclass(fn):
        return fn, lambda ctx: fn(None, ctx)
    classes = _classes_defined_in(module)
    if len(classes) != 1:
        raise ValueError(
            f"handler {handler!r} must define a function {function_name!r} or exactly one "
            f"class, found {[c.__name__ for c in classes]}"
        )
    service = classes[0]()
    if hasattr(service, "handle"):
        return service.handle, service.initialize

    def pipeline(data: list, context: Any) -> Any:
        # a class with only initialize/preprocess/inference/postprocess (the seed's shape)
        service.context = context
        return service.postprocess(service.inference(service.preprocess(data)))

    return pipeline, service.initialize


def _metrics_cache(model_name: str, config_path: str | None = None) -> Any:
    import ts
    from ts.metrics.metric_cache_yaml_impl import MetricsCacheYamlImpl

    cache = MetricsCacheYamlImpl(
        config_path or os.path.join(os.path.dirname(ts.__file__), "configs", "metrics.yaml")
    )
    cache.initialize_cache()
    cache.model_name = model_name
    return cache


def _serialize(value: Any) -> tuple[bytes, str]:
    if isinstance(value, (bytes, bytearray)):
        return bytes(value), "application/octet-stream"
    if isinstance(value, str):
        return value.encode("utf-8"), "text/plain; charset=utf-8"
    if type(value).__module__.startswith("torch") and type(value).__name__ == "Tensor":
        import torch

        buf = io.BytesIO()
        torch.save(value, buf)
        return buf.getvalue(), "application/octet-stream"
    return json.dumps(value, indent=2).encode("utf-8"), "application/json"


class HandlerService:
    """Loads one model version's handler and runs batches through it."""

    def __init__(
        self,
        model_name: str,
        model_dir: str,
        handler: str,
        batch_size: int = 1,
        gpu_id: int | None = None,
        envelope: str | None = None,
        model_yaml_config: dict | None = None,
        extra_sys_path: list[str] | None = None,
        metrics_config: str | None = None,
    ) -> None:
        from ts.context import Context

        # the handler's metrics (ts.metrics logs them) go back to the server with each batch
        self._metric_lines = _MetricLines()
        metrics_logger = logging.getLogger("ts.metrics.caching_metric")
        metrics_logger.addHandler(self._metric_lines)
        metrics_logger.setLevel(logging.INFO)

        # TorchServe runs each worker with the model folder as cwd and on sys.path
        os.chdir(model_dir)
        for p in [model_dir, *(extra_sys_path or [])][::-1]:
            if p not in sys.path:
                sys.path.insert(0, p)
        manifest_path = Path(model_dir) / "MAR-INF" / "MANIFEST.json"
        manifest = json.loads(manifest_path.read_text()) if manifest_path.is_file() else None
        entry, initialize = load_entry_point(handler)
        if envelope:
            env_module = importlib.import_module(f"ts.torch_handler.request_envelope.{envelope}")
            (env_cls,) = _classes_defined_in(env_module)
            entry = env_cls(entry).handle
        self.model_name = model_name
        self.context = Context(
            model_name,
            model_dir,
            manifest,
            batch_size,
            gpu_id,
            _ts_version(),
            True,
            _metrics_cache(model_name, metrics_config),
            model_yaml_config or {},
        )
        self.context.cl_socket = StreamSocket()  # send_intermediate_predict_response target
        self._entry = entry
        initialize(self.context)

    def execute(self, batch: list[RequestItem]) -> BatchResult:
        result = self._run(batch)
        lines = self._metric_lines.drain()
        return dataclasses.replace(result, metrics=lines) if lines else result

    def _run(self, batch: list[RequestItem]) -> BatchResult:
        from ts.context import RequestProcessor
        from ts.utils.util import PredictionException

        inputs, processors = [], []
        for item in batch:
            inputs.append({p.name: _decode(p) for p in item.params})
            headers = _RequestHeaders({p.name: {"content-type": p.content_type} for p in item.params})
            headers.update(item.headers)
            processors.append(RequestProcessor(headers))
        ids = {i: item.request_id for i, item in enumerate(batch)}
        self.context.request_ids = ids
        self.context.request_processor = processors
        self.context.metrics.set_request_ids(ids)
        start = time.perf_counter()
        try:
            ret = self._entry(inputs, self.context)
        except PredictionException as e:
            return BatchResult(None, e.error_code, e.message, handler_error=True)
        except MemoryError:
            return BatchResult(None, 507, "Out of resources")
        except Exception as e:
            # TorchServe's backend (ts/service.py): a CUDA error is taken for running out of
            # GPU memory (507); any other handler error is 503 "Prediction failed"
            logger.exception("handler of model %s failed", self.model_name)
            code = 507 if "CUDA" in str(e) else 503
            return BatchResult(None, code, f"{type(e).__name__}: {e}")
        if not isinstance(ret, list):
            return BatchResult(None, 503, f"Invalid model predict output: {type(ret).__name__}")
        if len(ret) != len(batch):
            return BatchResult(
                None,
                503,
                f"number of batch response mismatched, expect: {len(batch)}, got: {len(ret)}",
            )
        self.context.metrics.add_time(
            "PredictionTime", round((time.perf_counter() - start) * 1000, 2)
        )
        out = []
        for i, value in enumerate(ret):
            try:
                body, default_ct = _serialize(value)
            except TypeError:
                return BatchResult(None, 503, "Unsupported model output data type.")
            headers = dict(processors[i].get_response_headers())
            headers.pop("ts_stream_next", None)  # left over from intermediate responses
            ct = headers.pop("content-type", None) or default_ct
            code = processors[i].get_response_status_code() or 200
            phrase = processors[i].get_response_status_phrase()
            out.append(
                ItemResponse(code, body, ct, {k: str(v) for k, v in headers.items()}, phrase)
            )
        return BatchResult(out)


class _RequestHeaders(dict):
    """A request's headers as `context.get_request_header` reads them, found whatever the case
    of the name asked for.

    TorchServe's frontend hands the backend each header as the client wrote its name, so a
    handler asks for `X-Token` or `Content-Type`; HTTP servers here get names lowercased
    (ASGI), so an exact lookup would miss. Keys are kept as they are.
    """

    def _key(self, key: object) -> object:
        if dict.__contains__(self, key) or not isinstance(key, str):
            return key
        low = key.lower()
        return next((k for k in self if isinstance(k, str) and k.lower() == low), key)

    def __getitem__(self, key: object) -> Any:
        return dict.__getitem__(self, self._key(key))

    def __contains__(self, key: object) -> bool:
        return dict.__contains__(self, self._key(key))

    def get(self, key: object, default: Any = None) -> Any:
        return dict.get(self, self._key(key), default)


class _MetricLines(logging.Handler):
    """Collects the `[METRICS]` lines ts.metrics.caching_metric logs in this worker."""

    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        msg = record.getMessage()
        if "[METRICS]" in msg:
            self.lines.append(msg)

    def drain(self) -> tuple[str, ...]:
        out, self.lines = tuple(self.lines), []
        return out


def _ts_version() -> str:
    try:
        import ts

        return str(ts.__version__)
    except Exception:
        return "0.0.0"
