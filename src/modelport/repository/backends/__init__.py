"""Backend registry: backend name (config.pbtxt `backend`) -> factory.

Why lazy strings: importing torch or onnxruntime costs seconds; a repository of python
models should not pay for them. Other parts of modelport (the LLM engine's `llm` backend)
call `register_backend` with a factory; an unknown name is a load error listing the known.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from typing import Any

from modelport.repository.backends.base import Backend, BackendContext
from modelport.repository.errors import ModelConfigError

BackendFactory = Callable[[BackendContext], Backend]

_REGISTRY: dict[str, str | BackendFactory] = {
    "python": "modelport.repository.backends.python_backend:PythonBackend",
    "pytorch": "modelport.repository.backends.pytorch:TorchScriptBackend",
    "onnxruntime": "modelport.repository.backends.onnx:OnnxRuntimeBackend",
    "llm": "modelport.repository.backends.llm:LLMBackend",
    "vllm": "modelport.repository.backends.vllm:VLLMBackend",  # Triton's vLLM backend's repos
}
# handled by the repository itself (ensemble scheduling), listed so configs validate
BUILTIN_SCHEDULERS = ("ensemble",)


def register_backend(name: str, factory: str | BackendFactory) -> None:
    """Make `backend: "<name>"` loadable; factory is a callable or "module:attr"."""
    if name in BUILTIN_SCHEDULERS:
        raise ValueError(f"backend name {name!r} is reserved")
    _REGISTRY[name] = factory


def backend_names() -> list[str]:
    return sorted([*_REGISTRY, *BUILTIN_SCHEDULERS])


def create_backend(name: str, ctx: BackendContext) -> Backend:
    try:
        factory: Any = _REGISTRY[name]
    except KeyError:
        raise ModelConfigError(
            f"model '{ctx.config.name}': unknown backend '{name}'; available backends: "
            f"{backend_names()}"
        ) from None
    if isinstance(factory, str):
        module, _, attr = factory.partition(":")
        factory = getattr(importlib.import_module(module), attr)
    return factory(ctx)
