"""The model repository manager: discovery, load / unload / poll, and request routing.

Why one owner: load state (READY / UNAVAILABLE with a reason), the model control mode and
ensemble dependencies interact; keeping them in one place makes "a bad model never takes
the server down" a property of a single class. Protocol frontends only call `infer`,
`stream`, `index`, `load`, `unload`, `get`, `stats` and `server_ready`. Whether a model
that fails at start-up stops the server is the frontend's call (Triton's --exit-on-error):
the manager only records it in `startup_failures`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import shutil
import tempfile
from collections.abc import AsyncIterator, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tritonclient.grpc import model_config_pb2 as mc

from modelport.repository.backends import create_backend
from modelport.repository.backends.base import BackendContext
from modelport.repository.custom_metrics import CustomMetrics
from modelport.repository.ensemble import (
    EnsembleModel,
    Step,
    check_composing,
    check_decoupled_joins,
    ensemble_steps,
)
from modelport.repository.errors import (
    InvalidArgument,
    ModelConfigError,
    NotFound,
    ServingError,
    Unavailable,
    not_ready,
    unknown_model,
)
from modelport.repository.model import ModelVersion
from modelport.repository.model_config import read_config
from modelport.repository.resolve import resolve_config
from modelport.repository.tensors import InferRequest, InferResponse
from modelport.repository.trace import Tracer
from modelport.repository.versions import select_versions
from modelport.serving.rate_limiter import RateLimiter
from modelport.serving.response_cache import ResponseCache

logger = logging.getLogger("modelport.repository")

CONTROL_MODES = ("none", "explicit", "poll")
Served = ModelVersion | EnsembleModel
UNLOADED = "unloaded"
FOLDER_REMOVED = "model folder removed"
# reasons of models taken out on purpose: strict readiness does not wait for them
_DELIBERATELY_UNAVAILABLE = (UNLOADED, FOLDER_REMOVED)


FILE_PREFIX = "file:"  # load parameters that carry model files (Triton's file override)


def _version_of(text: str) -> int:
    """A version given as a string (pb_utils.is_model_ready): "" is the server's choice."""
    if not text:
        return -1
    try:
        version = int(text)
    except ValueError as e:
        raise InvalidArgument(
            f"failed to get model version from specified version string '{text}' (details: "
            f"{e}), version should be an integral value > 0"
        ) from None
    if version < 0:
        raise InvalidArgument(
            f"failed to get model version from specified version string '{text}', version "
            "should be an integral value > 0"
        )
    return version


def gpu_count() -> int:
    """GPUs visible to this process, without importing torch (cheap at startup)."""
    from modelport.engine.gpu_info import visible_entries

    try:
        found = len([p for p in os.listdir("/proc/driver/nvidia/gpus")])
    except OSError:
        return 0
    entries = visible_entries(os.environ.get("CUDA_VISIBLE_DEVICES"))
    return found if entries is None else min(found, len(entries))


@dataclass
class ModelEntry:
    name: str
    path: Path | None
    config: mc.ModelConfig | None = None
    versions: dict[int, Served] = field(default_factory=dict)
    state: str = ""  # "" (never loaded), READY, LOADING, UNLOADING, UNAVAILABLE
    reason: str = ""
    # versions served once and unloaded since (unload, or a reload under another version
    # policy): the repository index lists them, as Triton does, UNAVAILABLE "unloaded"
    retired: set[int] = field(default_factory=set)
    signature: tuple = ()
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    # the temporary model directory of a load with override files (served versions' files)
    override_dir: Path | None = None


def _signature(path: Path) -> tuple:
    """What poll mode compares: config and version-folder file names and mtimes."""
    items = []
    for root, dirs, files in os.walk(path):
        dirs[:] = [d for d in dirs if d != "__pycache__"]
        for f in files:
            p = Path(root) / f
            with contextlib.suppress(OSError):
                items.append((str(p.relative_to(path)), p.stat().st_mtime_ns))
    return tuple(sorted(items))


class RepositoryManager:
    def __init__(
        self,
        repositories: Iterable[str | Path],
        control_mode: str = "none",
        startup_models: Iterable[str] = (),
        poll_secs: float = 15.0,
        gpus: int | None = None,
        strict_readiness: bool = True,
        response_cache: ResponseCache | None = None,
        tracer: Tracer | None = None,
        rate_limiter: RateLimiter | None = None,
        auto_complete: bool = True,
        config_name: str = "",
        load_threads: int | None = None,
    ) -> None:
        """auto_complete: False is Triton's --disable-auto-complete-config; config_name:
        --model-config-name (configs/<name>.pbtxt where a model has it); load_threads:
        --model-load-thread-count (None: every model at once);
        strict_readiness: Triton's --strict-readiness (see `server_ready`);
        response_cache: the server's cache (--cache-config), used by the models whose config
        enables `response_cache`; tracer: request tracing (--trace-config, /v2/trace);
        rate_limiter: --rate-limit execution_count (None: off, instance resources ignored)."""
        if control_mode not in CONTROL_MODES:
            raise ValueError(f"model control mode must be one of {CONTROL_MODES}")
        self.repositories = [Path(r) for r in repositories]
        for r in self.repositories:
            if not r.is_dir():
                raise FileNotFoundError(f"model repository {r} is not a directory")
        self.control_mode = control_mode
        self.startup_models = list(startup_models)
        self.poll_secs = poll_secs
        self.gpus = gpu_count() if gpus is None else gpus
        self.strict_readiness = strict_readiness
        self.response_cache = response_cache
        self.tracer = tracer if tracer is not None else Tracer()
        self.rate_limiter = rate_limiter
        self.auto_complete = auto_complete
        self.config_name = config_name
        self._load_slots = asyncio.Semaphore(load_threads) if load_threads else None
        self.entries: dict[str, ModelEntry] = {}
        self.ready = False  # started and not stopping; `server_ready` adds the model check
        # models asked for at start-up that failed to load: name -> why
        self.startup_failures: dict[str, str] = {}
        self._poll_task: asyncio.Task | None = None
        # python models' pb_utils.MetricFamily series, shown on the metrics endpoint
        self.custom_metrics = CustomMetrics()

    # -- discovery --

    def discover(self) -> dict[str, Path | None]:
        """Model name -> folder (None when the name is in two repositories)."""
        found: dict[str, Path | None] = {}
        for repo in self.repositories:
            for p in sorted(repo.iterdir()):
                if not p.is_dir() or p.name.startswith("."):
                    continue
                found[p.name] = None if p.name in found else p
        for name, path in found.items():
            entry = self.entries.get(name)
            if entry is None:
                self.entries[name] = ModelEntry(name, path)
            else:
                entry.path = path
        return found

    # -- lifecycle --

    async def start(self) -> None:
        found = self.discover()
        if self.control_mode == "explicit":
            names = list(found) if "*" in self.startup_models else self.startup_models
        else:
            names = list(found)
        self.startup_failures = await self.load_many(names)
        if self.control_mode == "poll":
            self._poll_task = asyncio.get_running_loop().create_task(self._poll())
        self.ready = True

    async def stop(self) -> None:
        self.ready = False
        if self._poll_task is not None:
            self._poll_task.cancel()
            with contextlib.suppress(BaseException):
                await self._poll_task
        await asyncio.gather(
            *(self._unload(e) for e in self.entries.values() if e.versions), return_exceptions=True
        )
        self.tracer.close()

    async def load_many(self, names: Iterable[str]) -> dict[str, str]:
        """Load plain models in parallel, then ensembles once their steps are loaded.

        Returns the models that failed: name -> the load error."""
        plain, ensembles = [], {}
        for name in names:
            entry = self.entries.get(name)
            cfg = None
            if entry is not None and entry.path is not None:
                with contextlib.suppress(ServingError):
                    cfg = read_config(entry.path, self.config_name)
            if cfg is not None and cfg.platform == "ensemble":
                ensembles[name] = {s.model_name for s in cfg.ensemble_scheduling.step}
            else:
                plain.append(name)
        errors = await asyncio.gather(*(self._load_slot(n) for n in plain))
        failed = {n: e for n, e in zip(plain, errors, strict=True) if e is not None}
        while ensembles:  # nested ensembles: load those whose steps are settled first
            ready = [n for n, deps in ensembles.items() if not deps & set(ensembles)]
            for name in ready or list(ensembles):  # no progress possible: let each fail
                ensembles.pop(name)
                error = await self._load_logged(name)
                if error is not None:
                    failed[name] = error
        return failed

    async def _load_slot(self, name: str) -> str | None:
        """`_load_logged` within --model-load-thread-count."""
        if self._load_slots is None:
            return await self._load_logged(name)
        async with self._load_slots:
            return await self._load_logged(name)

    async def _load_logged(self, name: str) -> str | None:
        """Load one model; None when it loaded, else why not (logged here)."""
        try:
            await self.load(name)
        except ServingError as e:
            logger.error("%s", e)  # "failed to load '<name>'...": names model and reason
            entry = self.entries.get(name)
            return entry.reason if entry is not None and entry.reason else str(e)
        return None

    async def _poll(self) -> None:
        while True:
            await asyncio.sleep(self.poll_secs)
            with contextlib.suppress(Exception):
                await self.poll_once()

    async def poll_once(self) -> None:
        """Load new or changed models, unload removed ones (poll mode)."""
        found = self.discover()
        for name, entry in list(self.entries.items()):
            if name not in found and entry.state and entry.reason != FOLDER_REMOVED:
                if entry.versions:
                    await self._unload(entry)
                entry.state, entry.reason = "UNAVAILABLE", FOLDER_REMOVED
                await self._unload_broken_ensembles()
        changed = [
            n
            for n, p in found.items()
            if p is not None
            and (not self.entries[n].state or _signature(p) != self.entries[n].signature)
        ]
        if changed:
            await self.load_many(changed)

    # -- explicit control --

    def _check_control(self) -> None:
        if self.control_mode != "explicit":
            # Triton's status (UNAVAILABLE) and words, which clients match on
            raise Unavailable(
                "explicit model load / unload is not allowed if polling is enabled (model "
                f"control mode is '{self.control_mode}': start with --model-control-mode "
                "explicit)"
            )

    async def request_load(
        self, name: str, config_json: str | None = None, files: dict[str, bytes] | None = None
    ) -> None:
        """Load (or reload) a model; `files` ({"file:<path>": bytes}) form the model directory
        to load from instead of the repository's, with `config_json` its config (Triton's
        model file override)."""
        self._check_control()
        self.discover()
        await self.load(name, config_json, files)

    async def request_unload(
        self,
        name: str,
        unload_dependents: bool = False,
        stopped_serving: asyncio.Event | None = None,
    ) -> None:
        """Unload a model; `stopped_serving` is set once it no longer takes requests (its
        instances may still be finishing)."""
        self._check_control()
        entry = self.entries.get(name)
        if entry is None:
            raise unknown_model(name)
        steps = _steps(entry.config) if entry.versions else set()
        await self._unload(entry, stopped_serving)
        if unload_dependents:  # Triton: also the models it was loaded with (an ensemble's)
            while steps:
                users = {s for e in self.entries.values() if e.versions for s in _steps(e.config)}
                done = [self.entries[s] for s in steps - users if self._loaded(s)]
                steps = set().union(*(_steps(e.config) for e in done)) if done else set()
                for e in done:
                    await self._unload(e)
        await self._unload_broken_ensembles()

    def _loaded(self, name: str) -> bool:
        return name in self.entries and bool(self.entries[name].versions)

    async def _unload_broken_ensembles(self) -> None:
        """Unload each loaded ensemble a step of which is no longer loaded (Triton's dependency
        tracking): it would say ready while every request fails."""
        while True:  # again after each unload: an ensemble may call the one just unloaded
            for name, e in list(self.entries.items()):
                missing = sorted(s for s in _steps(e.config) if not self._loaded(s)) \
                    if e.versions else []
                if missing:
                    logger.info("unloading ensemble '%s': its step '%s' is no longer loaded",
                                name, missing[0])
                    await self._unload(e)
                    break
            else:
                return

    async def _model_control(self, caller: str, op: str, args: dict[str, Any]) -> Any:
        """A python model's pb_utils.load_model / unload_model / is_model_ready (Triton's
        model loading API: the same server calls as the repository API's)."""
        name = args.get("name", "")
        if op == "ready":
            return self.is_ready(name, _version_of(args.get("version", "")))
        if op == "load":
            self._check_control()
            entry = self.entries.get(name)
            if name == caller and entry is not None and entry.lock.locked():
                raise Unavailable(
                    f"failed to load '{name}': a model cannot load itself while it is being "
                    "loaded or unloaded"
                )
            await self.request_load(name, args.get("config") or None, args.get("files") or None)
            return None
        if op == "unload":
            # as Triton's: returns once the model stopped serving, without waiting for its
            # instances to finish (a model may unload itself from execute())
            stopped = asyncio.Event()
            task = asyncio.get_running_loop().create_task(
                self.request_unload(name, bool(args.get("unload_dependents")), stopped)
            )
            waiter = asyncio.get_running_loop().create_task(stopped.wait())
            try:
                await asyncio.wait({task, waiter}, return_when=asyncio.FIRST_COMPLETED)
            finally:
                waiter.cancel()
            if task.done():
                task.result()
            else:
                task.add_done_callback(lambda t: t.cancelled() or t.exception())
            return None
        raise InvalidArgument(f"unknown model control request '{op}'")

    # -- loading --

    async def load(
        self, name: str, config_json: str | None = None, files: dict[str, bytes] | None = None
    ) -> None:
        files = {k: v for k, v in (files or {}).items() if k.startswith(FILE_PREFIX)}
        if files:
            return await self._load_override(name, config_json, files)
        entry = self.entries.get(name)
        if entry is None or entry.path is None:
            found = self.discover()
            entry = self.entries.get(name)
            if entry is not None and name in found and found[name] is None:
                entry.state, entry.reason = (
                    "UNAVAILABLE",
                    "model name appears in several repositories",
                )
                raise ModelConfigError(
                    f"failed to load '{name}': model name appears in several repositories"
                )
        if entry is None or entry.path is None:  # (a model once loaded from override files)
            raise NotFound(f"failed to load '{name}', no version is available")
        await self._load_from(entry, entry.path, config_json)

    async def _load_override(self, name: str, config_json: str | None, files: dict) -> None:
        """Triton's model file override: the files, written to a temporary directory, are the
        model directory; the config must come with them."""
        if not config_json:
            raise InvalidArgument("Load parameter 'config' must be specified for model file override")
        tmp = Path(tempfile.mkdtemp(prefix="modelport-override-"))
        model_dir = (tmp / name).resolve()
        try:
            model_dir.mkdir()
            for key, content in files.items():
                target = Path(os.path.normpath(model_dir / key[len(FILE_PREFIX) :]))
                if target != model_dir and model_dir not in target.parents:
                    raise InvalidArgument(
                        f"Invalid file parameter '{key}' with normalized path '{target}' must "
                        "stay within model directory."
                    )
                if target.parent.exists() and not target.parent.is_dir():
                    raise InvalidArgument(
                        f"Invalid file parameter '{key}', directory has been created as a file"
                    )
                target.parent.mkdir(parents=True, exist_ok=True)
                target.write_bytes(content)
            entry = self.entries.get(name)
            if entry is None:  # a model not in any repository: it exists while loaded
                entry = self.entries[name] = ModelEntry(name, None)
            await self._load_from(entry, model_dir, config_json, override=tmp)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise

    async def _load_from(
        self, entry: ModelEntry, path: Path, config_json: str | None, override: Path | None = None
    ) -> None:
        name = entry.name
        async with entry.lock:
            entry.state, entry.reason = "LOADING", ""
            new: dict[int, Served] = {}
            try:
                cfg = await resolve_config(
                    path, config_json, self.gpus, self.auto_complete, self.config_name
                )
                if override is None:
                    entry.signature = _signature(path)
                versions = select_versions(cfg, path)
                if cfg.response_cache.enable and self.response_cache is None:
                    # as Triton: the model loads and is served without a cache
                    logger.info(
                        "model '%s' enables response_cache but the server has no cache "
                        "(--cache-config local,size=<bytes>): its responses are not cached",
                        name,
                    )
                if cfg.backend == "ensemble":
                    steps = ensemble_steps(cfg)
                    await self._ensure_dependencies(cfg, steps)
                    configs = {s.model_name: self.entries[s.model_name].config for s in steps}
                    check_composing(cfg, steps, configs)  # type: ignore[arg-type]
                    decoupled = {s.index for s in steps if self._serves_decoupled(s)}
                    check_decoupled_joins(cfg, steps, decoupled)
                    for v in versions:
                        new[v] = EnsembleModel(
                            cfg,
                            v,
                            steps,
                            self.infer,
                            cache=self.response_cache,
                            tracer=self.tracer,
                            stream_step=self.stream,
                            decoupled_steps=decoupled,
                        )
                else:
                    for v in versions:
                        ctx = BackendContext(
                            cfg,
                            path,
                            v,
                            bls=self.stream,  # a BLS call's responses as they come
                            metrics=self.custom_metrics,
                            model_control=self._model_control,
                        )
                        model = ModelVersion(
                            cfg,
                            v,
                            create_backend(cfg.backend, ctx),
                            cache=self.response_cache,
                            tracer=self.tracer,
                            rate_limiter=self.rate_limiter,
                        )
                        await model.start()
                        new[v] = model
            except Exception as e:
                for m in new.values():
                    with contextlib.suppress(Exception):
                        await m.stop()
                reason = str(e) if isinstance(e, ServingError) else f"{type(e).__name__}: {e}"
                old = entry.versions
                entry.state = "READY" if old else "UNAVAILABLE"
                entry.reason = "" if old else reason
                if isinstance(e, ServingError):
                    raise ModelConfigError(f"failed to load '{name}': {reason}") from None
                raise ModelConfigError(f"failed to load '{name}': {reason}") from e
            old, entry.versions, entry.config = entry.versions, new, cfg
            entry.state, entry.reason = "READY", ""
            entry.retired = (entry.retired | set(old)) - set(new)
            old_override, entry.override_dir = entry.override_dir, override
        for m in old.values():
            with contextlib.suppress(Exception):
                await m.stop()
        if old_override is not None:
            shutil.rmtree(old_override, ignore_errors=True)

    async def _ensure_dependencies(self, cfg: mc.ModelConfig, steps: list) -> None:
        for name in dict.fromkeys(s.model_name for s in steps):
            entry = self.entries.get(name)
            if entry is None:
                raise ModelConfigError(
                    f"ensemble '{cfg.name}' depends on '{name}' which is not in the repository"
                )
            if entry.state == "LOADING":
                raise ModelConfigError(
                    f"ensemble '{cfg.name}' depends on '{name}' which is still loading "
                    "(ensembles that contain each other?)"
                )
            if entry.state != "READY" and self.control_mode == "explicit":
                with contextlib.suppress(ServingError):
                    await self.load(name)
            if entry.state != "READY" or entry.config is None:
                why = f": {entry.reason}" if entry.reason else ""
                raise ModelConfigError(
                    f"ensemble '{cfg.name}' depends on '{name}' which is not available{why}"
                )

    def _serves_decoupled(self, step: Step) -> bool:
        """Whether a step's model answers in a stream: a decoupled model, or an ensemble that
        is decoupled through one of its own steps (its config does not say so)."""
        try:
            return self.get(step.model_name, step.model_version).decoupled
        except ServingError:  # a version not served: the request will say so
            entry = self.entries[step.model_name]
            return any(m.decoupled for m in entry.versions.values())

    async def _unload(self, entry: ModelEntry, stopped_serving: asyncio.Event | None = None) -> None:
        async with entry.lock:
            old, entry.versions = entry.versions, {}
            entry.state, entry.reason = "UNLOADING", ""
            entry.retired |= set(old)
            if stopped_serving is not None:
                stopped_serving.set()
            for m in old.values():
                with contextlib.suppress(Exception):
                    await m.stop()
            entry.state, entry.reason = "UNAVAILABLE", UNLOADED
            override, entry.override_dir = entry.override_dir, None
        if override is not None:
            shutil.rmtree(override, ignore_errors=True)

    # -- readiness --

    def server_ready(self) -> bool:
        """Triton's server readiness: started, and with strict readiness also no model the
        server tried to load left unavailable (`unready_models`)."""
        if not self.ready:
            return False
        return not self.strict_readiness or not self.unready_models()

    def unready_models(self) -> dict[str, str]:
        """What keeps a strict server from being ready: model name -> state and reason.

        Why every attempted model and not only the start-up ones: like Triton, a model that a
        later load (explicit request, poll) failed to bring up makes the server not ready
        too; models never asked for, or unloaded / removed on purpose, do not count."""
        out = {}
        for name, error in self.startup_failures.items():
            if name not in self.entries:  # asked for at start-up, not in any repository
                out[name] = f"UNAVAILABLE: {error}"
        for name, e in self.entries.items():
            if e.versions and all(m.ready for m in e.versions.values()):
                continue  # READY, or reloading while the old versions serve
            if not e.state or (e.state == "UNAVAILABLE" and e.reason in _DELIBERATELY_UNAVAILABLE):
                continue
            out[name] = f"{e.state}: {e.reason}" if e.reason else e.state
        return out

    # -- lookup and inference --

    def get(self, name: str, version: int = -1) -> Served:
        """The served model version, or Triton's not-found / not-ready error."""
        entry = self.entries.get(name)
        if entry is None or not entry.state:  # unknown, or known but never loaded
            raise unknown_model(name, version)
        if not entry.versions:
            raise not_ready(name, version)
        if version is None or version < 0:
            model = entry.versions[max(entry.versions)]
        else:
            model = entry.versions.get(version)
            if model is None:
                raise unknown_model(name, version)
        if not model.ready:
            raise not_ready(name, version)
        return model

    def config(self, name: str, version: int = -1) -> mc.ModelConfig:
        return self.get(name, version).config

    def is_ready(self, name: str, version: int = -1) -> bool:
        try:
            self.get(name, version)
        except ServingError:
            return False
        return True

    async def infer(self, req: InferRequest) -> InferResponse:
        return await self.get(req.model_name, req.model_version).infer(req)

    async def stream(self, req: InferRequest) -> AsyncIterator[InferResponse]:
        model = self.get(req.model_name, req.model_version)
        async for r in model.stream(req):
            yield r

    # -- repository API --

    def index(self, ready_only: bool = False) -> list[dict[str, Any]]:
        self.discover()
        rows: list[dict[str, Any]] = []
        for name in sorted(self.entries):
            e = self.entries[name]
            unloaded = e.state == "UNAVAILABLE" and e.reason == UNLOADED
            if e.versions or (unloaded and e.retired):
                states = {v: ("UNAVAILABLE", UNLOADED) for v in e.retired}
                for v, m in e.versions.items():
                    states[v] = ("READY" if m.ready else "UNAVAILABLE", "")
                for v, (state, reason) in sorted(states.items()):
                    row: dict[str, Any] = {"name": name, "version": str(v), "state": state}
                    if reason:  # Triton leaves an empty reason out
                        row["reason"] = reason
                    rows.append(row)
            elif not ready_only:
                row = {"name": name}
                if e.state:
                    row.update(state=e.state, reason=e.reason)
                rows.append(row)
        if ready_only:
            rows = [r for r in rows if r.get("state") == "READY"]
        return rows

    def stats(self, name: str = "", version: int = -1) -> list[dict[str, Any]]:
        if name:
            entry = self.entries.get(name)
            if entry is None or not entry.versions:
                raise NotFound(f"requested model '{name}' is not available")
            models = list(entry.versions.values())
            if version is not None and version >= 0:
                models = [m for m in models if m.version == version]
                if not models:
                    raise NotFound(f"requested model '{name}' version {version} is not available")
            return [m.stats.as_dict() for m in models]
        out = []
        for entry in self.entries.values():
            out.extend(m.stats.as_dict() for m in entry.versions.values())
        return out

    def served(self) -> list[Served]:
        return [m for e in self.entries.values() for m in e.versions.values()]


__all__ = ["RepositoryManager", "Unavailable", "gpu_count"]


def _steps(cfg: mc.ModelConfig | None) -> set[str]:
    """The models an ensemble's steps call (none for another model)."""
    if cfg is None or cfg.platform != "ensemble":
        return set()
    return {step.model_name for step in cfg.ensemble_scheduling.step}
