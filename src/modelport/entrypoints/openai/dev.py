"""vLLM's dev-mode routes (VLLM_SERVER_DEV_MODE=1, or MODELPORT_SERVER_DEV_MODE=1): mounted
only with the variable set, else 404s, as in vLLM.

POST /reset_prefix_cache: every data-parallel replica forgets its cached prefix blocks; 200
with an empty body, as vLLM's. As vLLM's engine, a replica whose blocks are held by requests
in flight resets nothing (the engine's reset is all or nothing), and as vLLM the failure is
logged, not answered. ?reset_external=true is accepted (there is no external, connector-
managed cache here); ?reset_running_requests=true (vLLM preempts the running requests to
reset anyway) is a 400: requests in flight are not preempted here.

POST /reset_mm_cache, /reset_encoder_cache: 200, nothing to reset: modelport serves no
multimodal inputs, so it has no multimodal or encoder cache (vLLM's are no-ops for a
text-only model too).

GET /server_info: the served model, the engine's configuration (model, cache, scheduler,
parallel, load), the KV cache as allocated, and the VLLM_* / MODELPORT_* environment
variables (names holding KEY, TOKEN, SECRET or PASSWORD left out). vLLM answers with its own
VllmConfig, which modelport does not have; the keys here are modelport's.
"""

from __future__ import annotations

import logging
import os
from typing import Any

from fastapi import APIRouter, Query, Request
from fastapi.responses import JSONResponse, Response

from modelport.entrypoints.openai.errors import OpenAIError
from modelport.entrypoints.openai.serving_common import dead_engine_is_503, jsonable
from modelport.envs import env_flag

logger = logging.getLogger("modelport.openai")

DEV_PATHS = ("/reset_prefix_cache", "/reset_mm_cache", "/reset_encoder_cache", "/server_info")
_SECRET_WORDS = ("KEY", "TOKEN", "SECRET", "PASSWORD")


def dev_mode() -> bool:
    """MODELPORT_SERVER_DEV_MODE, else VLLM_SERVER_DEV_MODE, set on (not 0 / false / no /
    off)."""
    return env_flag("SERVER_DEV_MODE", False)


def _env() -> dict[str, str]:
    return {k: v for k, v in sorted(os.environ.items())
            if k.startswith(("VLLM_", "MODELPORT_"))
            and not any(w in k.upper() for w in _SECRET_WORDS)}


def server_info(engine: Any, version: str) -> dict[str, Any]:
    cfg = engine.engine_config
    ready = engine.ready
    return {
        "version": version,
        "model": {
            "served_model_names": list(engine.served_model_names),
            "model": getattr(engine, "model_root", None) or str(cfg.model_source.path),
            "architecture": cfg.model_config.architecture,
            "runner": engine.runner_type,
            "max_model_len": engine.max_model_len,
            "dtype": cfg.dtype,
            "device": cfg.device,
        },
        "kv_cache": None if ready is None else {
            "num_blocks": ready.num_kv_blocks,  # summed over data-parallel replicas
            "block_size": ready.block_size,
            "num_tokens": ready.num_kv_blocks * ready.block_size,
            "devices": ready.device,
        },
        "engine_config": jsonable(cfg),
        "env": _env(),
    }


def add_routes(api: APIRouter, engine_of: Any, version_of: Any) -> None:
    """Mount the dev-mode routes when the variable is set (else nothing: 404s)."""
    if not dev_mode():
        return
    logger.warning("server dev mode on (VLLM_SERVER_DEV_MODE / MODELPORT_SERVER_DEV_MODE): "
                   "POST /reset_prefix_cache, /reset_mm_cache, /reset_encoder_cache and GET "
                   "/server_info are served; not for production")

    @api.post("/reset_prefix_cache", tags=["dev"])
    async def reset_prefix_cache(request: Request,
                                 reset_running_requests: bool = Query(False),
                                 reset_external: bool = Query(False)) -> Response:
        engine = engine_of(request)
        if reset_running_requests:
            raise OpenAIError("reset_running_requests=true is not supported: requests in "
                              "flight are not preempted; reset once they have finished",
                              400, param="reset_running_requests")
        # reset_external: no KV connector here, so no external cache to reset
        logger.info("resetting the prefix cache")
        with dead_engine_is_503():
            answer = await engine.reset_prefix_cache()
        if not answer.reset:
            replicas = answer.failed_replicas
            where = (f" on data-parallel replica(s) {', '.join(map(str, replicas))}"
                     if engine.engine_config.parallel_config.data_parallel_size > 1 else "")
            logger.warning("failed to reset the prefix cache%s: requests in flight hold KV "
                           "blocks; nothing was reset there (retry once they have finished)",
                           where)
        return Response(status_code=200)

    @api.post("/reset_mm_cache", tags=["dev"])
    async def reset_mm_cache(request: Request) -> Response:
        engine_of(request)
        return Response(status_code=200)  # no multimodal inputs, so no cache of them

    @api.post("/reset_encoder_cache", tags=["dev"])
    async def reset_encoder_cache(request: Request) -> Response:
        engine_of(request)
        return Response(status_code=200)  # no multimodal encoder, so no cache of it

    @api.get("/server_info", tags=["dev"])
    async def show_server_info(request: Request) -> JSONResponse:
        engine = engine_of(request)
        return JSONResponse(server_info(engine, version_of(request)))
