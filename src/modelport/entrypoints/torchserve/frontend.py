"""The TorchServe plug-in of `modelport serve` (see entrypoints/cli_serve.py for the contract).

Inference routes go on the shared app (the main --port) and, with --inference-port or a
config.properties inference_address, on an app of their own; the management API always has
its own port (127.0.0.1:8081 by default), as in TorchServe, so exposing inference never
exposes model management. When TorchServe is the only frontend, config.properties gives an
inference_address and --port is not given, the shared app listens there instead of --port:
TorchServe binds the addresses of its config and no other.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import os
import socket
from collections.abc import Iterator
from dataclasses import dataclass, replace
from pathlib import Path

import uvicorn
from fastapi import FastAPI

from modelport.entrypoints.torchserve import start_stop
from modelport.entrypoints.torchserve.common import (
    INFERENCE_PREFIXES,
    TSState,
    install_http_error_handler,
)
from modelport.entrypoints.torchserve.grpc_api import (
    GrpcPlan,
    GrpcServers,
    add_grpc_args,
    grpc_plan,
)
from modelport.entrypoints.torchserve.inference import make_inference_app, make_inference_router
from modelport.entrypoints.torchserve.management import make_management_app, make_metrics_app
from modelport.entrypoints.torchserve.metrics_modes import metrics_for
from modelport.entrypoints.torchserve.reason_phrase import http_protocol
from modelport.entrypoints.torchserve.snapshots import (
    add_snapshot_args,
    config_path,
    make_snapshot_manager,
)
from modelport.entrypoints.torchserve.workflows import (
    add_workflow_args,
    make_workflow_registry,
    start_workflows,
    stop_workflows,
    wants_workflows,
)
from modelport.torchserve import model as ts_model
from modelport.torchserve.archive import MANIFEST_PATH
from modelport.torchserve.auth import TokenAuth
from modelport.torchserve.model import ModelVersion
from modelport.torchserve.registry import ARCHIVE_SUFFIXES, ModelRegistry
from modelport.torchserve.snapshot import SnapshotManager
from modelport.torchserve.ts_config import ModelSettings, TSConfig, load_ts_config

logger = logging.getLogger("modelport.torchserve")

# TorchServe's default metrics_address (http://127.0.0.1:8082)
DEFAULT_METRICS_ADDRESS = ("127.0.0.1", 8082)


def add_serve_args(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("TorchServe (.mar archives)")
    g.add_argument("--model-store", dest="model_store", help="folder of .mar archives")
    g.add_argument(
        "--models",
        dest="models",
        nargs="+",
        metavar="NAME=FILE.mar",
        help="archives to load at startup: NAME=FILE, FILE, or 'all' (everything in the store)",
    )
    g.add_argument(
        "--ts-config",
        dest="ts_config",
        help="TorchServe config.properties (served alone and without --port, its "
        "inference_address replaces --port)",
    )
    g.add_argument(
        "--inference-port",
        dest="ts_inference_port",
        type=int,
        default=None,
        help="also serve the inference API alone on this port (it is always on --port)",
    )
    g.add_argument(
        "--management-port",
        dest="ts_management_port",
        type=int,
        default=None,
        help="management API port (default 8081)",
    )
    g.add_argument(
        "--management-host",
        dest="ts_management_host",
        default=None,
        help="management API address (default 127.0.0.1)",
    )
    g.add_argument(
        "--disable-token-auth",
        dest="ts_disable_token_auth",
        action="store_true",
        help="serve without TorchServe's token authorization (keys in --ts-key-file)",
    )
    g.add_argument(
        "--allowed-urls",
        dest="ts_allowed_urls",
        nargs="+",
        metavar="REGEX",
        help="model URLs/paths outside the model store that may be registered",
    )
    g.add_argument(
        "--ts-key-file",
        dest="ts_key_file",
        default=None,
        help="where to write the token key file (default ./key_file.json)",
    )
    g.add_argument(
        "--ts-workers",
        dest="ts_workers",
        type=int,
        default=None,
        help="workers per model loaded at startup (default: config.properties "
        "default_workers_per_model, else one per GPU, else one per CPU, as TorchServe)",
    )
    g.add_argument(
        "--enable-model-api",
        dest="ts_enable_model_api",
        action="store_true",
        help="allow register/unregister over the management API even where config.properties "
        "says enable_model_api=false (here they are allowed by default; TorchServe 0.12 "
        "needs this flag)",
    )
    add_grpc_args(g)
    add_workflow_args(g)
    add_snapshot_args(g)
    start_stop.add_args(g)


def wants(args: argparse.Namespace) -> bool:
    return bool(
        getattr(args, "model_store", None)
        or getattr(args, "models", None)
        or getattr(args, "ts_config", None)
        or wants_workflows(args)
    )


@dataclass(frozen=True)
class _Plan:
    """Everything the service needs, resolved from the CLI over config.properties."""

    management: tuple[str, int]
    inference: tuple[str, int] | None  # an extra inference-only server, besides --port
    listen: tuple[str, int] | None  # where the shared app listens instead of --host/--port
    # a metrics-only server: config metrics_address, else (TorchServe alone) its default
    metrics: tuple[str, int] | None
    startup: tuple[tuple[str | None, str], ...]  # (name or None, url)
    config: TSConfig
    workers: int | None  # per startup model; None: TorchServe's default (default_workers)
    grpc: GrpcPlan | None = None  # TorchServe's gRPC APIs (on unless --disable-grpc)
    # metrics is TorchServe's default 127.0.0.1:8082, not configured: a busy port is skipped
    # with a warning (as the gRPC defaults), where a configured one must bind
    metrics_default: bool = False


def _plan(args: argparse.Namespace, cfg: TSConfig) -> _Plan:
    mhost, mport = cfg.management_address or ("127.0.0.1", 8081)
    management = (args.ts_management_host or mhost, _pick(args.ts_management_port, mport))
    inference = listen = None
    # the shared app is ours alone (cli_serve names the frontends it chose) and --port was
    # not typed: config.properties' inference_address replaces it (else TorchServe's default
    # 127.0.0.1:8080), so TorchServe clients find it where TorchServe listens
    alone = tuple(getattr(args, "serve_frontends", ())) == (__name__,)
    port_given = getattr(args, "port_given", True)
    if args.ts_inference_port is not None:
        host = cfg.inference_address[0] if cfg.inference_address else args.host
        inference = (host, args.ts_inference_port)
    elif alone and not port_given:  # TorchServe's inference address: the config's, or 8080
        listen = cfg.inference_address or (args.host, 8080)
    elif cfg.inference_address and cfg.inference_address[1] != args.port:
        inference = cfg.inference_address  # config.properties' own inference port
    # TorchServe's metrics API: config.properties' metrics_address, else (alone, as the
    # inference address) TorchServe's default 127.0.0.1:8082
    metrics_default = alone and cfg.metrics_address is None
    metrics = DEFAULT_METRICS_ADDRESS if metrics_default else cfg.metrics_address
    specs = list(args.models or cfg.load_models)
    startup: list[tuple[str | None, str]] = []
    for spec in specs:
        name, sep, url = spec.partition("=")
        if spec == "all" or (not sep and spec == "ALL"):
            startup.extend((None, u) for u in _store_archives(args.model_store or cfg.model_store))
        elif sep:
            startup.append((name, url))
        else:
            startup.append((None, spec))
    # as TorchServe (ModelServer.initModelStore): only load_models (or --models) loads models
    # at startup; `models=` alone configures the models that get loaded, and loads none
    workers = args.ts_workers or cfg.default_workers_per_model or None
    return _Plan(
        management,
        inference,
        listen,
        metrics,
        tuple(startup),
        cfg,
        workers,
        grpc_plan(args, cfg),
        metrics_default,
    )


def default_workers(number_of_gpu: int | None) -> int:
    """TorchServe's ConfigManager.getDefaultWorkers, where default_workers_per_model is not
    set: one worker per GPU the workers may use (config number_of_gpu caps the GPUs there
    are), else one per CPU this process may run on."""
    gpus = ts_model.gpu_count()
    if number_of_gpu is not None:
        gpus = min(gpus, number_of_gpu)
    return gpus or _cpu_count()


def _cpu_count() -> int:
    try:
        return len(os.sched_getaffinity(0)) or 1  # what Java's availableProcessors counts
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def _pick(cli: int | None, default: int) -> int:
    return default if cli is None else cli


def _store_archives(store: str | None) -> list[str]:
    if not store:
        raise SystemExit("--models all needs --model-store")
    out = []
    for p in sorted(Path(store).iterdir()):
        if p.is_file() and p.name.endswith(ARCHIVE_SUFFIXES) or (p / MANIFEST_PATH).is_file():
            out.append(p.name)
    return out


class _QuietServer(uvicorn.Server):
    """A uvicorn server that leaves signal handling to the main server of the process."""

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield


def _bind(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as e:
        sock.close()
        raise OSError(f"cannot bind TorchServe API to {host}:{port}: {e}") from e
    sock.set_inheritable(True)
    return sock


class TorchServeService:
    """Loads startup models and runs the management (and extra inference) servers."""

    def __init__(self, state: TSState, plan: _Plan, log_level: str) -> None:
        self.state = state
        self.plan = plan
        self.log_level = log_level
        self._servers: list[tuple[uvicorn.Server, asyncio.Task]] = []
        self.management_port: int | None = None
        self.inference_port: int | None = None
        self.metrics_port: int | None = None
        self.grpc: GrpcServers | None = None
        self.listen = plan.listen  # read by cli_serve: where the shared app listens
        self.snapshots: SnapshotManager | None = None  # TorchServe's config snapshots
        # uvicorn's HTTP protocol for every server with inference routes, the shared one
        # included (cli_serve reads it): it puts a handler's reason phrase on the status line
        self.http_protocol = http_protocol()

    async def start(self) -> None:
        if self.snapshots is not None:
            try:
                await self.snapshots.restore()
            except BaseException:
                await self.state.registry.stop()
                raise
        workers = self.plan.workers
        if workers is None and self.plan.startup:  # the GPU count imports torch: only if needed
            workers = await asyncio.to_thread(default_workers, self.plan.config.number_of_gpu)
            logger.info("default_workers_per_model not set: %d workers per startup model "
                        "(one per GPU, else one per CPU, as TorchServe)", workers)  # fmt: skip
        # load startup models concurrently: each spends seconds importing in its workers
        results = await asyncio.gather(
            *(self._load(name, url, workers or 1) for name, url in self.plan.startup),
            return_exceptions=True,
        )
        loaded = []
        for (_, url), r in zip(self.plan.startup, results):
            if isinstance(r, Exception):  # TorchServe's initModelStore: warn, serve the rest
                logger.warning("Failed to load model: %s: %s", url, r)
            elif isinstance(r, BaseException):  # cancelled, interrupted
                await self.state.registry.stop()
                raise r
            else:
                loaded.append(r)
        self._startup_defaults(loaded)
        await start_workflows(self.state)
        self.management_port = await self._serve(
            make_management_app(self.state), *self.plan.management
        )
        logger.info(
            "TorchServe management API on http://%s:%d",
            self.plan.management[0],
            self.management_port,
        )
        if self.plan.inference is not None:
            app = make_inference_app(self.state)
            self.inference_port = await self._serve(app, *self.plan.inference)
            logger.info(
                "TorchServe inference API on http://%s:%d",
                self.plan.inference[0],
                self.inference_port,
            )
        if self.plan.metrics is not None:
            await self._serve_metrics()
        if self.plan.grpc is not None:
            self.grpc = await GrpcServers.start(self.state, self.plan.grpc)
        if self.snapshots is not None:
            self.snapshots.save("startup")

    def _startup_defaults(self, loaded: list) -> None:
        """Each model's default version as TorchServe's one-after-the-other startup leaves it:
        the first version loaded, unless a later one's `models=` entry says defaultVersion
        (the last such wins). The archives load concurrently here, so whichever finished
        first would otherwise be the default."""
        chosen: dict[str, str] = {}
        for mv, marked in loaded:
            if marked or mv.name not in chosen:
                chosen[mv.name] = mv.version
        for name, version in chosen.items():
            self.state.registry.set_default(name, version)

    async def _load(self, name: str | None, url: str, workers: int) -> tuple[ModelVersion, bool]:
        """Load one startup archive with its config.properties `models=` settings.

        The entry is the one whose marName is this archive (`load_models=echo.mar`, `all`,
        --models); failing that, the one keyed by the model's name and version once the
        archive is open, which is TorchServe's own lookup.
        """
        cfg = self.plan.config
        by_mar = cfg.entry_for_archive(url, name)
        mv = await self.state.registry.register(
            url,
            model_name=by_mar.name if by_mar else name,
            version=by_mar.version if by_mar else None,
            initial_workers=workers,
            synchronous=True,
            loaded_at_startup=True,
            trusted=True,
            config_entry=(lambda *_: by_mar) if by_mar else cfg.entry_for_model,
        )
        logger.info("loaded TorchServe model %s version %s", mv.name, mv.version)
        entry = by_mar or cfg.entry_for_model(mv.name, mv.version)
        return mv, bool(entry and entry.default)

    async def _serve_metrics(self) -> None:
        host, port = self.plan.metrics
        try:
            self.metrics_port = await self._serve(make_metrics_app(self.state), host, port)
        except OSError as e:
            if not self.plan.metrics_default:
                raise
            logger.warning("TorchServe metrics API not started: %s (set metrics_address in "
                           "config.properties)", e)
            return
        logger.info("TorchServe metrics API on http://%s:%d", host, self.metrics_port)

    async def _serve(self, app: FastAPI, host: str, port: int) -> int:
        sock = _bind(host, port)
        config = uvicorn.Config(
            app, log_level=self.log_level, lifespan="off", http=self.http_protocol
        )
        server = _QuietServer(config)
        task = asyncio.get_running_loop().create_task(server.serve(sockets=[sock]))
        self._servers.append((server, task))
        while not server.started:
            if task.done():
                task.result()
                raise RuntimeError(f"server on {host}:{port} exited at startup")
            await asyncio.sleep(0.01)
        return sock.getsockname()[1]

    async def stop(self) -> None:
        for server, _ in self._servers:
            server.should_exit = True
        for _, task in self._servers:
            with contextlib.suppress(BaseException):
                await asyncio.wait_for(task, 10)
        await stop_workflows(self.state)
        if self.grpc is not None:
            await self.grpc.stop()
        if self.snapshots is not None:
            self.snapshots.save("shutdown")
        await self.state.registry.stop()
        if hasattr(self.state.metrics, "close"):  # metrics_mode log's files
            self.state.metrics.close()
        if self.state.auth is not None:
            self.state.auth.remove_key_file()


async def build(args: argparse.Namespace, app: FastAPI) -> TorchServeService:
    path = config_path(args)  # --ts-config, else the last config snapshot
    cfg = load_ts_config(path) if path else TSConfig()
    plan = _plan(args, cfg)
    store = args.model_store or cfg.model_store
    defaults = ModelSettings(
        response_timeout_s=cfg.default_response_timeout, job_queue_size=cfg.job_queue_size
    )
    registry = ModelRegistry(
        Path(store) if store else None,
        allowed_urls=tuple(args.ts_allowed_urls or cfg.allowed_urls),
        default_settings=defaults,
        install_py_dep_per_model=cfg.install_py_dep_per_model,
    )
    registry.max_gpus = cfg.number_of_gpu
    registry.service_envelope = cfg.service_envelope
    auth = None
    if not (args.ts_disable_token_auth or cfg.disable_token_authorization):
        key_file = Path(args.ts_key_file or os.path.join(os.getcwd(), "key_file.json"))
        auth = TokenAuth(key_file, cfg.token_expiration_min)
        logger.info("TorchServe token authorization on; keys in %s", key_file)
    metrics = metrics_for(cfg)  # metrics_mode / metrics_config / model_metrics_auto_detect
    metrics_yaml = cfg.extra.get("metrics_config")  # the workers run in their model folders
    registry.metrics_config = str(Path(metrics_yaml).absolute()) if metrics_yaml else None
    registry.metrics_sink = metrics.backend_metrics
    state = TSState(
        registry=registry,
        metrics=metrics,
        auth=auth,
        model_api=cfg.enable_model_api or bool(getattr(args, "ts_enable_model_api", False)),
        default_workers=cfg.default_workers_per_model or 0,
        config_entry=cfg.entry_for_model,
        max_request_size=cfg.max_request_size,
    )
    state.workflows = make_workflow_registry(args, cfg, registry)
    snapshots = make_snapshot_manager(args, path, cfg, registry, state.workflows)
    if snapshots.restore_from is not None:  # model_snapshot replaces load_models / --models
        plan = replace(plan, startup=())
    state.on_change = snapshots.save
    app.include_router(make_inference_router(state))
    alone = tuple(getattr(args, "serve_frontends", ())) == (__name__,)
    install_http_error_handler(app, ("/",) if alone else INFERENCE_PREFIXES)
    service = TorchServeService(state, plan, getattr(args, "log_level", "info"))
    service.snapshots = snapshots
    return service
