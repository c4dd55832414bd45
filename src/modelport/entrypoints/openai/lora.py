"""vLLM's LoRA serving on the OpenAI server: --lora-modules, adapters as models, runtime
/v1/load_lora_adapter and /v1/unload_lora_adapter.

An adapter is served under its name: a request whose ``model`` is that name runs with it,
and /v1/models lists it with ``parent`` the base model and ``root`` its folder. Adapters are
checked here, before they are listed, against the model's layout built on the meta device
(no weights), so a bad folder is the load request's 400 rather than every later request's;
the engine core reads the weights when a request first uses them. Under data parallelism
the adapters live here, in the one frontend: each request carries its adapter to whichever
replica takes it, which reads it on first use, so a name loaded at runtime serves on every
replica, and an unloaded one on none; unloading also makes every replica (and, under tensor
parallelism, every rank) free its copy and device slot. The runtime routes exist
only with VLLM_ALLOW_RUNTIME_LORA_UPDATING=True (or MODELPORT_ALLOW_RUNTIME_LORA_UPDATING),
as in vLLM: otherwise they are unknown paths (404).
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import os
from dataclasses import dataclass
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import PlainTextResponse
from pydantic import BaseModel

from modelport.entrypoints.openai.errors import OpenAIError
from modelport.entrypoints.openai.protocol import ModelCard
from modelport.lora.request import LoRARequest

ENV_FLAGS = ("VLLM_ALLOW_RUNTIME_LORA_UPDATING", "MODELPORT_ALLOW_RUNTIME_LORA_UPDATING")


@dataclass(frozen=True)
class LoRAModulePath:
    name: str
    path: str
    base_model_name: str | None = None


def parse_lora_module(text: str) -> LoRAModulePath:
    """An argparse type for --lora-modules: ``name=path`` or vLLM's JSON
    ``{"name": ..., "path": ..., "base_model_name": ...}``."""
    text = text.strip()
    if text.startswith("{"):
        try:
            d = json.loads(text)
        except ValueError as e:
            raise argparse.ArgumentTypeError(f"--lora-modules: not JSON: {e}") from None
        if not isinstance(d, dict) or not d.get("name") or not d.get("path"):
            raise argparse.ArgumentTypeError(
                f"--lora-modules: a JSON entry needs 'name' and 'path', got {text!r}"
            )
        return LoRAModulePath(str(d["name"]), str(d["path"]), d.get("base_model_name"))
    name, sep, path = text.partition("=")
    if not sep or not name or not path:
        raise argparse.ArgumentTypeError(
            f"--lora-modules: expected name=path or a JSON object, got {text!r}"
        )
    return LoRAModulePath(name, path)


def runtime_updating_allowed() -> bool:
    return any(os.environ.get(k, "").strip().lower() in ("1", "true") for k in ENV_FLAGS)


_ids = itertools.count(1)


class _Checker:
    """The served model's layout on the meta device, to check adapters against."""

    def __init__(self, engine: Any) -> None:
        import torch

        from modelport.models.registry import get_model_class

        mc = engine.engine_config.model_config
        with torch.device("meta"):
            self.model = get_model_class(mc.architecture)(mc)
        self.max_rank = engine.engine_config.lora_config.max_lora_rank

    def check(self, req: LoRARequest) -> None:
        from modelport.lora.peft import load_adapter

        load_adapter(req.lora_name, req.lora_path, self.model, self.max_rank)


def _checker(engine: Any) -> _Checker:
    checker = getattr(engine, "_lora_checker", None)
    if checker is None:
        checker = engine._lora_checker = _Checker(engine)
    return checker


def _loading(engine: Any) -> set[str]:
    """Names whose runtime load is being checked (off the event loop) right now."""
    names = getattr(engine, "_lora_loading", None)
    if names is None:
        names = engine._lora_loading = set()
    return names


def _base_name(engine: Any) -> str:
    return engine.served_model_names[0]


def add_lora(engine: Any, name: str, path: str, base_model_name: str | None = None) -> None:
    """Check the adapter and serve it under ``name``; ValueError says why not."""
    if getattr(engine.engine_config, "lora_config", None) is None:
        raise ValueError("LoRA adapters need a server started with --enable-lora")
    if name in engine.served_model_names:
        raise ValueError(f"the LoRA adapter name {name!r} is the base model's name")
    if base_model_name not in engine.served_model_names:
        base_model_name = None  # as vLLM: a name not served is ignored (parent: the base)
    req = LoRARequest(name, next(_ids), path, base_model_name)
    _checker(engine).check(req)
    engine.lora_requests[name] = req


def lora_for(engine: Any, model: str | None) -> LoRARequest | None:
    """The adapter a request's ``model`` names (None: the base model)."""
    return getattr(engine, "lora_requests", {}).get(model) if model else None


def lora_cards(engine: Any) -> list[ModelCard]:
    """vLLM's /v1/models entries of the adapters: parent is the base model."""
    return [
        ModelCard(id=name, root=req.lora_path, parent=req.base_model_name or _base_name(engine))
        for name, req in getattr(engine, "lora_requests", {}).items()
    ]


class LoadLoRAAdapterRequest(BaseModel):
    lora_name: str = ""
    lora_path: str = ""
    # vLLM's in-place reload (RL loops): a loaded name takes the new folder's weights
    load_inplace: bool = False


class UnloadLoRAAdapterRequest(BaseModel):
    lora_name: str = ""
    lora_int_id: int | None = None


def add_routes(api: APIRouter, engine_of: Any) -> None:
    """Mount the runtime routes when the environment allows them (vLLM's rule)."""
    if not runtime_updating_allowed():
        return

    @api.post("/v1/load_lora_adapter", tags=["lora"])
    async def load_lora_adapter(body: LoadLoRAAdapterRequest, request: Request) -> Any:
        engine = engine_of(request)
        if not body.lora_name or not body.lora_path:
            raise OpenAIError("Both 'lora_name' and 'lora_path' must be provided.", 400)
        old = engine.lora_requests.get(body.lora_name)
        if (old is not None and not body.load_inplace) or body.lora_name in _loading(engine):
            raise OpenAIError(f"The lora adapter '{body.lora_name}' has already been loaded.", 400)
        _loading(engine).add(body.lora_name)  # a second load of the name meanwhile: the 400
        try:
            await asyncio.to_thread(
                add_lora, engine, body.lora_name, body.lora_path,
                old.base_model_name if old is not None else None)
        except ValueError as e:
            # vLLM's 404 ("No adapter found") is for a path with no adapter config to read
            # (no such folder, or one without adapter_config.json); other failures are 400s
            status = 404 if "no such folder" in str(e) or "has no adapter_config" in str(e) else 400
            raise OpenAIError(
                f"Failed to load LoRA adapter '{body.lora_name}': {e}", status
            ) from None
        finally:
            _loading(engine).discard(body.lora_name)
        if old is not None:
            # load_inplace: later requests run the new weights (a new id, so no KV cached
            # under the old ones is reused); running ones finish on the old, which every
            # replica then frees
            remove = getattr(engine, "remove_lora", None)
            if remove is not None:
                remove(old.lora_int_id)
        return PlainTextResponse(f"Success: LoRA adapter '{body.lora_name}' added successfully.")

    @api.post("/v1/unload_lora_adapter", tags=["lora"])
    async def unload_lora_adapter(body: UnloadLoRAAdapterRequest, request: Request) -> Any:
        engine = engine_of(request)
        if not body.lora_name and body.lora_int_id is None:
            raise OpenAIError("Either 'lora_name' or 'lora_int_id' needs to be provided.", 400)
        name = body.lora_name or next(
            (n for n, r in engine.lora_requests.items() if r.lora_int_id == body.lora_int_id), ""
        )
        if name not in engine.lora_requests:
            raise OpenAIError(
                f"The lora adapter '{body.lora_name or body.lora_int_id}' cannot be found.", 404
            )
        req = engine.lora_requests.pop(name)
        remove = getattr(engine, "remove_lora", None)
        if remove is not None:
            remove(req.lora_int_id)  # every replica frees its copy and device slot
        return PlainTextResponse(f"Success: LoRA adapter '{name}' removed successfully.")
