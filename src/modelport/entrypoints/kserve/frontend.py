"""`modelport serve --model-repository ...`: the KServe v2 / Triton frontend plug-in.

Mounts /v2 on the shared HTTP app; `Service.start()` loads the repository, then opens the
gRPC port (Triton's 8001) and the metrics port (8002); `Service.stop()` closes them and
unloads every model (finalizing python models and ending their processes).

Start-up failures follow Triton: with --exit-on-error (default) a model that fails to load
at start-up stops the server with an error; with --strict-readiness (default) the server
reports ready only while every model it tried to load is READY.
"""

from __future__ import annotations

import argparse
import functools
import logging

from fastapi import FastAPI

from modelport.entrypoints.kserve import triton_flags
from modelport.entrypoints.kserve.grpc_server import GrpcServer
from modelport.entrypoints.kserve.http_routes import mount
from modelport.entrypoints.kserve.log_settings import FORMATS, LogConfig, LogControl
from modelport.entrypoints.kserve.metrics import MetricsServer
from modelport.entrypoints.kserve.shared_memory import SharedMemoryRegistry
from modelport.entrypoints.kserve.triton_flags import triton_bool
from modelport.repository.manager import CONTROL_MODES, RepositoryManager
from modelport.repository.trace import Tracer, parse_trace_config
from modelport.serving.rate_limiter import RateLimiter, parse_resource_option
from modelport.serving.response_cache import parse_cache_config

logger = logging.getLogger("modelport.kserve")


class StartupFailed(SystemExit):
    """Models failed to load at start-up and --exit-on-error is on.

    A SystemExit so that `modelport serve` ends with status 1 and this message, after the
    services stopped (models unloaded, python model processes ended)."""

    def __init__(self, failures: dict[str, str]) -> None:
        self.failures = dict(failures)
        lines = "\n".join(f"  {name}: {why}" for name, why in sorted(failures.items()))
        n = len(failures)
        super().__init__(
            f"modelport serve: {n} model{'s' if n > 1 else ''} failed to load at start-up, "
            f"exiting (--exit-on-error=false serves the others):\n{lines}"
        )


def add_serve_args(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("Triton model repository (KServe v2 HTTP + gRPC)")
    g.add_argument(
        "--model-repository",
        action="append",
        default=[],
        metavar="PATH",
        help="Triton-style model repository (repeatable)",
    )
    g.add_argument("--grpc-port", type=int, default=8001, help="gRPC port (default 8001; -1: off)")
    g.add_argument(
        "--metrics-port",
        type=int,
        default=8002,
        help="Prometheus metrics port (default 8002; -1: off)",
    )
    g.add_argument("--model-control-mode", choices=CONTROL_MODES, default="none")
    g.add_argument(
        "--load-model",
        action="append",
        default=[],
        metavar="NAME",
        help="with --model-control-mode explicit: load NAME at startup ('*' for all; repeatable)",
    )
    g.add_argument(
        "--exit-on-error",
        type=triton_bool,
        nargs="?",
        const=True,
        default=True,
        metavar="BOOL",
        help="exit when a model fails to load at start-up (default true; "
        "--exit-on-error=false serves the models that loaded)",
    )
    g.add_argument(
        "--strict-readiness",
        type=triton_bool,
        nargs="?",
        const=True,
        default=True,
        metavar="BOOL",
        help="/v2/health/ready and gRPC ServerReady say ready only when every model the server "
        "tried to load is READY (default true; false: ready once started)",
    )
    g.add_argument(
        "--cache-config",
        dest="triton_cache_config",
        action="append",
        default=[],
        metavar="CACHE,KEY=VALUE",
        help="Triton's response cache: 'local,size=<bytes>' is an LRU of that many bytes in "
        "memory shared by all models; models opt in with response_cache { enable: true }",
    )
    g.add_argument(
        "--response-cache-byte-size",
        type=int,
        default=0,
        metavar="BYTES",
        help="deprecated (as in Triton): same as --cache-config local,size=BYTES",
    )
    g.add_argument(
        "--rate-limit",
        choices=("off", "execution_count"),
        default="off",
        help="Triton's rate limiter: with execution_count a model instance runs a batch only "
        "when the resources its instance_group's rate_limiter lists are free (priority "
        "orders waiting instances); off (default) ignores them",
    )
    g.add_argument(
        "--rate-limit-resource",
        action="append",
        default=[],
        metavar="NAME:COUNT[:DEVICE]",
        help="with --rate-limit execution_count: the count of a resource (no DEVICE: on every "
        "device); by default a resource counts the most any loaded instance needs (repeatable)",
    )
    g.add_argument(
        "--repository-poll-secs",
        type=float,
        default=15.0,
        help="with --model-control-mode poll: seconds between repository scans",
    )
    add_trace_log_args(parser)
    triton_flags.add_args(parser)


def add_trace_log_args(parser: argparse.ArgumentParser) -> None:
    """tritonserver's tracing and logging flags (Triton's trace and logging extensions)."""
    g = parser.add_argument_group("Triton tracing and logging")
    g.add_argument(
        "--trace-config",
        action="append",
        default=[],
        metavar="[triton,]SETTING=VALUE",
        help="request tracing, as tritonserver: level=OFF|TIMESTAMPS|TENSORS (repeatable), "
        "rate=N (trace 1 of N requests, default 1000), count=N (-1: no limit), "
        "triton,file=PATH, triton,log-frequency=N (N traces per PATH.<index> file; 0: "
        "all in PATH)",
    )
    # tritonserver's deprecated spellings, turned into --trace-config items
    for flag, key in (
        ("--trace-file", "file"),
        ("--trace-level", "level"),
        ("--trace-rate", "rate"),
        ("--trace-count", "count"),
        ("--trace-log-frequency", "log-frequency"),
    ):
        g.add_argument(
            flag,
            dest="trace_config",
            action="append",
            type=lambda v, key=key: f"{key}={v}",
            metavar="VALUE",
            help=f"deprecated: --trace-config {key}=VALUE",
        )
    g.add_argument(
        "--log-verbose", type=int, default=None, metavar="LEVEL", help="verbose level (>0: debug)"
    )
    for name in ("info", "warning", "error"):
        g.add_argument(
            f"--log-{name}",
            type=triton_bool,
            nargs="?",
            const=True,
            default=None,
            metavar="BOOL",
            help=f"log {name} messages (default true)",
        )
    g.add_argument("--log-format", choices=FORMATS, default=None, help="log line layout")
    g.add_argument("--log-file", default=None, metavar="PATH", help="log to PATH, not stderr")


def trace_log_settings(args: argparse.Namespace) -> tuple[Tracer, LogControl]:
    """The tracer and the log control the --trace-* / --log-* flags ask for (bad values end
    `modelport serve` with a message). Logging is taken over only if a --log-* flag is given."""
    try:
        tracer = Tracer(parse_trace_config(getattr(args, "trace_config", None) or []))
        given = {
            k: getattr(args, f"log_{k}", None)
            for k in ("verbose", "info", "warning", "error", "format", "file")
        }
        given = {k: v for k, v in given.items() if v is not None}
        config = LogConfig(**given)
    except ValueError as e:
        raise SystemExit(f"modelport serve: {e}") from None
    if given.get("file"):
        try:
            open(given["file"], "a").close()
        except OSError as e:
            raise SystemExit(f"modelport serve: --log-file: {e}") from None
    if tracer.config.level and not tracer.config.file:
        logger.warning("tracing is on but no trace file is set (--trace-config triton,file=PATH)")
    return tracer, LogControl(config, engage=bool(given))


def wants(args: argparse.Namespace) -> bool:
    return bool(getattr(args, "model_repository", None))


class Service:
    def __init__(
        self,
        manager: RepositoryManager,
        host: str,
        grpc_port: int,
        metrics_port: int,
        version: str,
        shm: SharedMemoryRegistry,
        exit_on_error: bool = True,
        logs: LogControl | None = None,
        grpc_host: str | None = None,
        metrics_host: str | None = None,
        server_name: str = "modelport",
        grpc_options: list[tuple[str, int]] | None = None,
        counter_latencies: bool = True,
        exit_timeout_secs: int | None = None,
        http: bool = True,
        listen: tuple[str, int] | None = None,
    ) -> None:
        """grpc_host / metrics_host: where those ports bind (default `host`); server_name:
        --id; exit_timeout_secs: the wait for in-flight requests at shutdown (None: HTTP
        waits for them, gRPC 1 s); http False: no HTTP port (--allow-http false); listen:
        where the shared HTTP app binds instead of --host/--port (--http-address)."""
        self.manager = manager
        self.shm = shm
        self.exit_on_error = exit_on_error
        self.logs = logs if logs is not None else LogControl()
        self.exit_timeout_secs = exit_timeout_secs
        self.http = http
        self.listen = listen
        self.http_server = None  # set by `modelport serve`: uvicorn's server
        self.grpc = (
            GrpcServer(
                manager,
                grpc_host or host,
                grpc_port,
                version,
                shm,
                self.logs,
                server_name=server_name,
                options=grpc_options,
                grace=1.0 if exit_timeout_secs is None else float(exit_timeout_secs),
            )
            if grpc_port >= 0
            else None
        )
        self.metrics = (
            MetricsServer(manager, metrics_host or host, metrics_port, counter_latencies)
            if metrics_port >= 0
            else None
        )

    async def start(self) -> None:
        if self.exit_timeout_secs is not None and self.http_server is not None:
            self.http_server.config.timeout_graceful_shutdown = self.exit_timeout_secs
        await self.manager.start()
        for row in self.manager.index():
            if row.get("state") and row["state"] != "READY":
                logger.warning("model '%s' is %s: %s", row["name"], row["state"], row.get("reason"))
        if self.exit_on_error and self.manager.startup_failures:
            raise StartupFailed(self.manager.startup_failures)
        if self.grpc is not None:
            await self.grpc.start()
            logger.info("gRPC (inference.GRPCInferenceService) on port %d", self.grpc.port)
        if self.metrics is not None:
            await self.metrics.start()
            logger.info("metrics on http://%s:%d/metrics", self.metrics.host, self.metrics.port)

    async def stop(self) -> None:
        if self.grpc is not None:
            await self.grpc.stop()
        if self.metrics is not None:
            await self.metrics.stop()
        await self.manager.stop()
        self.shm.close()
        self.logs.release()


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("modelport")
    except PackageNotFoundError:
        return "0.0.0"


def rate_limiter(args: argparse.Namespace) -> RateLimiter | None:
    """--rate-limit / --rate-limit-resource; None when off (resources are then ignored)."""
    mode = getattr(args, "rate_limit", None) or "off"
    if mode not in ("off", "execution_count"):
        raise SystemExit(
            f"modelport serve: --rate-limit must be 'off' or 'execution_count', got {mode!r}"
        )
    try:
        explicit = [parse_resource_option(a) for a in getattr(args, "rate_limit_resource", [])]
    except ValueError as e:
        raise SystemExit(f"modelport serve: {e}") from None
    if mode == "off":
        if explicit:
            logger.warning("--rate-limit-resource has no effect with --rate-limit off")
        return None
    return RateLimiter(explicit)


async def build(args: argparse.Namespace, app: FastAPI) -> Service:
    triton_flags.check(args)
    flag = functools.partial(getattr, args)  # tritonserver's flags: None when not given
    try:
        cache = parse_cache_config(
            getattr(args, "triton_cache_config", None) or [],
            getattr(args, "response_cache_byte_size", 0) or 0,
        )
    except ValueError as e:
        raise SystemExit(f"modelport serve: {e}") from None
    if cache is not None:
        logger.info("response cache: local, %d bytes", cache.size)
    limiter = rate_limiter(args)
    tracer, logs = trace_log_settings(args)
    try:
        manager = RepositoryManager(
            args.model_repository,
            control_mode=args.model_control_mode,
            startup_models=args.load_model,
            poll_secs=args.repository_poll_secs,
            strict_readiness=args.strict_readiness,
            response_cache=cache,
            tracer=tracer,
            rate_limiter=limiter,
            auto_complete=triton_flags.auto_complete(args),
            config_name=flag("model_config_name", None) or "",
            load_threads=flag("model_load_thread_count", None),
        )
    except (FileNotFoundError, ValueError) as e:
        logs.release()
        raise SystemExit(f"modelport serve: {e}") from None
    version = _version()
    shm = SharedMemoryRegistry()
    server_name = flag("id", None) or "modelport"
    mount(app, manager, shm, version, logs, server_name=server_name)
    http_address = flag("http_address", None)
    metrics_config = triton_flags.metrics_config(flag("metrics_config", None) or [])
    return Service(
        manager,
        args.host,
        -1 if flag("allow_grpc", None) is False else args.grpc_port,
        -1 if flag("allow_metrics", None) is False else args.metrics_port,
        version,
        shm,
        args.exit_on_error,
        logs,
        grpc_host=flag("grpc_address", None),
        metrics_host=flag("metrics_address", None) or http_address,
        server_name=server_name,
        grpc_options=triton_flags.grpc_options(args),
        counter_latencies=metrics_config.get("counter_latencies", "true") == "true",
        exit_timeout_secs=flag("exit_timeout_secs", None),
        http=flag("allow_http", None) is not False,
        listen=(http_address, args.port) if http_address else None,
    )
