"""vLLM's torch-profiler routes: POST /start_profile and POST /stop_profile (200, empty body).

As in vLLM they exist only when the server starts with MODELPORT_TORCH_PROFILER_DIR (or
vLLM's VLLM_TORCH_PROFILER_DIR) set: otherwise both are 404s. The profiler runs where the
model runs (each data-parallel replica's engine core, each tensor-parallel rank), not in the
API server; /stop_profile answers once every trace is written (engine/torch_profiler.py).
A start while running, or a stop while not, is a 400 and the server serves on.
"""

from __future__ import annotations

import logging
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import Response

from modelport.engine.torch_profiler import TorchProfilerError, profiler_dir
from modelport.entrypoints.openai.errors import OpenAIError
from modelport.entrypoints.openai.serving_common import dead_engine_is_503

logger = logging.getLogger("modelport.openai")

PROFILE_PATHS = ("/start_profile", "/stop_profile")


def add_routes(api: APIRouter, engine_of: Any) -> None:
    """Mount the two routes when the profiler directory is set (else nothing: 404s)."""
    where = profiler_dir()
    if where is None:
        return
    logger.warning("torch profiler on: POST /start_profile and /stop_profile write traces to "
                   "%s (profiling slows the engine; not for production)", where)

    @api.post("/start_profile", tags=["profiler"])
    async def start_profile(request: Request) -> Response:
        engine = engine_of(request)
        logger.info("starting the torch profiler")
        with dead_engine_is_503():
            try:
                await engine.start_profile()
            except TorchProfilerError as e:
                raise OpenAIError(str(e), 400) from None
        return Response(status_code=200)

    @api.post("/stop_profile", tags=["profiler"])
    async def stop_profile(request: Request) -> Response:
        engine = engine_of(request)
        logger.info("stopping the torch profiler (writing the traces to %s)", where)
        with dead_engine_is_503():
            try:
                await engine.stop_profile()
            except TorchProfilerError as e:
                raise OpenAIError(str(e), 400) from None
        logger.info("torch profiler stopped; traces in %s", where)
        return Response(status_code=200)
