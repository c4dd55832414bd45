"""Run the KServe frontend in a background thread (tests, benchmarks, notebooks).

Why: a test wants a real server on real sockets, started once per module, whose ports it
knows without racing for free ones (HTTP, gRPC and metrics all bind port 0 here).
"""

from __future__ import annotations

import argparse
import asyncio
import socket
import threading
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from modelport.entrypoints.kserve import frontend


class EmbeddedServer:
    def __init__(
        self,
        repositories: Sequence[str | Path],
        control_mode: str = "none",
        load_models: Sequence[str] = (),
        poll_secs: float = 15.0,
        host: str = "127.0.0.1",
        http_port: int = 0,
        grpc_port: int = 0,
        metrics_port: int = 0,
        exit_on_error: bool = True,
        strict_readiness: bool = True,
        cache_config: Sequence[str] = (),
        response_cache_byte_size: int = 0,
        trace_config: Sequence[str] = (),
        log_settings: Mapping[str, Any] | None = None,
        rate_limit: str = "off",
        rate_limit_resources: Sequence[str] = (),
        triton_flags: Mapping[str, Any] | None = None,
    ) -> None:
        """Ports 0 (the default) bind free ports; -1 turns gRPC or metrics off.

        exit_on_error / strict_readiness: as `modelport serve`'s flags (Triton's defaults);
        with exit_on_error a model failing at start-up makes start() raise StartupFailed.
        cache_config / response_cache_byte_size: --cache-config values ("local,size=N") and
        the older --response-cache-byte-size.
        trace_config: --trace-config values ("level=TIMESTAMPS", "triton,file=PATH", ...);
        log_settings: the --log-* flags by name without the prefix (verbose, info, warning,
        error, format, file); giving any takes the "modelport" loggers over until stop().
        rate_limit / rate_limit_resources: --rate-limit and its --rate-limit-resource values.
        triton_flags: tritonserver's other flags by dest (kserve/triton_flags.py), e.g.
        {"id": "triton", "allow_grpc": False, "http_address": "127.0.0.2"}."""
        self.args = argparse.Namespace(
            host=host,
            port=http_port,
            grpc_port=grpc_port,
            metrics_port=metrics_port,
            model_repository=[str(r) for r in repositories],
            model_control_mode=control_mode,
            load_model=list(load_models),
            repository_poll_secs=poll_secs,
            exit_on_error=exit_on_error,
            strict_readiness=strict_readiness,
            triton_cache_config=list(cache_config),
            response_cache_byte_size=response_cache_byte_size,
            trace_config=list(trace_config),
            rate_limit=rate_limit,
            rate_limit_resource=list(rate_limit_resources),
            **{f"log_{k}": v for k, v in (log_settings or {}).items()},
            **dict(triton_flags or {}),
        )
        self.host = host
        self.http_port = 0
        self.service: frontend.Service | None = None
        self.loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._started = threading.Event()
        self._error: BaseException | None = None
        self._uvicorn = None

    @property
    def http_url(self) -> str:
        return f"{self.host}:{self.http_port}"

    @property
    def grpc_url(self) -> str:
        assert self.service is not None and self.service.grpc is not None
        return f"{self.host}:{self.service.grpc.port}"

    @property
    def metrics_url(self) -> str:
        assert self.service is not None and self.service.metrics is not None
        return f"http://{self.host}:{self.service.metrics.port}/metrics"

    @property
    def manager(self):
        assert self.service is not None
        return self.service.manager

    def start(self, timeout: float = 180.0) -> EmbeddedServer:
        self._thread = threading.Thread(target=self._run, name="kserve-embedded", daemon=True)
        self._thread.start()
        if not self._started.wait(timeout):
            raise TimeoutError("the embedded server did not start in time")
        if self._error is not None:
            raise self._error
        return self

    def _run(self) -> None:
        try:
            asyncio.run(self._main())
        except BaseException as e:  # surfaced to start()
            self._error = e
            self._started.set()

    async def _main(self) -> None:
        import uvicorn
        from fastapi import FastAPI

        self.loop = asyncio.get_running_loop()
        app = FastAPI()
        self.service = await frontend.build(self.args, app)
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if self.service.listen is not None:  # --http-address
            self.host = self.service.listen[0]
        sock.bind((self.host, self.args.port))
        self.http_port = sock.getsockname()[1]
        config = uvicorn.Config(app, log_level="warning", lifespan="off")
        server = uvicorn.Server(config)
        self._uvicorn = server
        self.service.http_server = server
        try:
            await self.service.start()
            serve = asyncio.ensure_future(server.serve(sockets=[sock]))
            while not server.started and not serve.done():
                await asyncio.sleep(0.01)
            self._started.set()
            await serve
        finally:
            await self.service.stop()
            sock.close()

    def call(self, coro, timeout: float = 60.0):
        """Run a coroutine on the server's loop (e.g. manager.poll_once()) and wait."""
        assert self.loop is not None
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def stop(self, timeout: float = 30.0) -> None:
        if self._uvicorn is not None:
            self._uvicorn.should_exit = True
        if self._thread is not None:
            self._thread.join(timeout)

    def __enter__(self) -> EmbeddedServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
