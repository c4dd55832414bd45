"""vLLM's sleep-mode routes: POST /sleep?level=1|2, POST /wake_up[?tags=weights&tags=kv_cache],
GET /is_sleeping -> {"is_sleeping": bool}.

vLLM mounts them in its dev mode (VLLM_SERVER_DEV_MODE=1) and serves them with
--enable-sleep-mode; here they are always mounted and answer a 400 in OpenAI's error shape
unless the engine runs with --enable-sleep-mode, so a client learns which flag is missing.

Requests while asleep: /sleep waits for the requests already in the engine to finish;
requests that arrive from then on are queued in the engine (not refused) and run once
/wake_up has restored both the weights and the KV cache.
"""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Query, Request
from fastapi.responses import JSONResponse, Response

from modelport.entrypoints.openai.errors import OpenAIError

SLEEP_PATHS = ("/sleep", "/wake_up", "/is_sleeping")


def _sleep_engine(engine: Any) -> Any:
    if not getattr(engine.engine_config, "enable_sleep_mode", False):
        raise OpenAIError("sleep mode is off: start the server with --enable-sleep-mode to use "
                          "/sleep, /wake_up and /is_sleeping", 400)
    return engine


def add_routes(api: APIRouter, engine_of: Any) -> None:
    @api.post("/sleep", tags=["sleep"])
    async def sleep(request: Request, level: int = Query(1)) -> Response:
        engine = _sleep_engine(engine_of(request))
        if level not in (1, 2):
            raise OpenAIError(f"level must be 1 or 2, got {level}", 400, param="level")
        try:
            await engine.sleep(level)
        except ValueError as e:
            raise OpenAIError(str(e), 400) from None
        return Response(status_code=200)

    @api.post("/wake_up", tags=["sleep"])
    async def wake_up(request: Request, tags: list[str] | None = Query(None)) -> Response:
        engine = _sleep_engine(engine_of(request))
        try:
            await engine.wake_up(tags or None)
        except ValueError as e:
            raise OpenAIError(str(e), 400, param="tags") from None
        return Response(status_code=200)

    @api.get("/is_sleeping", tags=["sleep"])
    async def is_sleeping(request: Request) -> JSONResponse:
        engine = _sleep_engine(engine_of(request))
        return JSONResponse({"is_sleeping": await engine.is_sleeping()})
