"""The set of registered models: name -> versions, a default version each, and the model store.

Registration resolves a `url` the way TorchServe does, with one stricter default: a plain
name is an archive in the model store; a local path or a remote URL is accepted only when it
matches one of the operator's `allowed_urls` patterns. Archives are unpacked into a private
work folder per version, which is removed on unregister.
"""

from __future__ import annotations

import asyncio
import logging
import re
import shutil
import subprocess
import sys
import tempfile
import uuid
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlsplit

from modelport.torchserve.archive import read_manifest, unpack
from modelport.torchserve.errors import (
    TSError,
    bad_request,
    conflict,
    model_not_found,
    version_not_found,
)
from modelport.torchserve.model import ModelVersion, WorkersFailedError
from modelport.torchserve.ts_config import (
    ModelEntry,
    ModelSettings,
    model_overrides,
    read_model_yaml,
)

logger = logging.getLogger("modelport.torchserve")

ARCHIVE_SUFFIXES = (".mar", ".tar.gz", ".tgz", ".zip")


def download_archive(url: str, target: Path, failure: str) -> Path:
    """Stream `url` into `target` (a .mar or .war in its store); on an HTTP error nothing is
    left behind and the error is TorchServe's DownloadArchiveException, `failure: <why>`."""
    import httpx

    try:
        with httpx.stream("GET", url, follow_redirects=False, timeout=60) as r:
            r.raise_for_status()
            with open(target, "wb") as f:
                for chunk in r.iter_bytes():
                    f.write(chunk)
    except httpx.HTTPError as e:
        target.unlink(missing_ok=True)
        raise TSError(400, "DownloadArchiveException", f"{failure}: {e}") from e
    return target


class ModelRegistry:
    """Registered model versions. All methods run on the server's event loop."""

    def __init__(
        self,
        model_store: Path | None,
        *,
        allowed_urls: tuple[str, ...] = (),
        default_settings: ModelSettings | None = None,
        install_py_dep_per_model: bool = False,
        work_dir: Path | None = None,
    ) -> None:
        self.model_store = Path(model_store).resolve() if model_store else None
        self.allowed_urls = tuple(re.compile(p) for p in allowed_urls)
        self.default_settings = default_settings or ModelSettings()
        self.install_py_dep_per_model = install_py_dep_per_model
        self.work_dir = Path(work_dir or tempfile.mkdtemp(prefix="modelport-ts-"))
        self._models: dict[str, dict[str, ModelVersion]] = {}
        self._defaults: dict[str, str] = {}
        self._lock = asyncio.Lock()
        # TorchServe metrics: the handlers' metrics.yaml and the sink of their metric lines
        self.metrics_config: str | None = None
        self.metrics_sink: Callable[[tuple[str, ...]], None] | None = None
        # config.properties number_of_gpu (None: every GPU there is)
        self.max_gpus: int | None = None
        # config.properties service_envelope (None: each archive's own, if any)
        self.service_envelope: str | None = None

    # -- lookup --

    def get(self, name: str, version: str | None = None) -> ModelVersion:
        versions = self._models.get(name)
        if not versions:
            raise model_not_found(f"Model not found: {name}")
        if version is None:
            return versions[self._defaults[name]]
        if version not in versions:
            raise version_not_found(f"Model version: {version} does not exist for model: {name}")
        return versions[version]

    def versions(self, name: str) -> list[ModelVersion]:
        if name not in self._models:
            raise model_not_found(f"Model not found: {name}")
        return list(self._models[name].values())

    def names(self) -> list[str]:
        return sorted(self._models)

    def all_versions(self) -> list[ModelVersion]:
        return [v for name in self.names() for v in self._models[name].values()]

    def default_versions(self) -> list[ModelVersion]:
        return [self._models[name][self._defaults[name]] for name in self.names()]

    # -- url resolution --

    def _allowed(self, url: str) -> bool:
        return any(p.fullmatch(url) for p in self.allowed_urls)

    def resolve_url(self, url: str, trusted: bool = False) -> Path:
        """Map a registration `url` to a local archive path (downloading if allowed).

        `trusted` is for archives the operator named on the command line or in
        config.properties: any local path is accepted for those, only API calls are confined.
        """
        if not url or not url.strip():
            raise bad_request("Parameter url is required.")
        try:
            parts = urlsplit(url)
            _ = parts.port
        except ValueError as e:
            raise bad_request(f"Invalid model url: {url} ({e})") from e
        scheme = parts.scheme.lower()
        if scheme in ("http", "https"):
            if not parts.hostname:
                raise bad_request(f"Invalid model url: {url}")
            if not self._allowed(url):
                raise model_not_found(f"Given URL {url} does not match any allowed URL(s)")
            return self._download(url)
        if scheme not in ("", "file"):
            raise bad_request(f"Invalid model url: {url} (unsupported scheme {parts.scheme!r})")
        raw = unquote(parts.path) if scheme == "file" else url
        if trusted:
            in_store = self.model_store / raw if self.model_store else None
            local = in_store if in_store is not None and in_store.exists() else Path(raw)
            if not local.exists():
                raise model_not_found(f"Model not found: {url}")
            return local.resolve()
        if ".." in Path(raw).parts:
            raise model_not_found(f"Relative path is not allowed in url: {url}")
        path = Path(raw)
        if not path.is_absolute():
            if self.model_store is None:
                raise model_not_found(f"Model not found in model store: {url} (no model store)")
            path = self.model_store / path
            if not path.exists():
                raise model_not_found(f"Model not found in model store: {url}")
            return path
        resolved = path.resolve()
        in_store = self.model_store is not None and (
            resolved == self.model_store or self.model_store in resolved.parents
        )
        if not in_store and not self._allowed(f"file://{resolved}"):
            raise model_not_found(f"Given URL {url} does not match any allowed URL(s)")
        if not resolved.exists():
            raise model_not_found(f"Model not found: {url}")
        return resolved

    def _download(self, url: str) -> Path:
        if self.model_store is None:
            raise bad_request("Cannot download a model archive without a model store")
        name = Path(unquote(urlsplit(url).path)).name
        if not name or not name.endswith(ARCHIVE_SUFFIXES):
            raise bad_request(f"Invalid model url: {url} (does not name an archive)")
        target = self.model_store / name
        if target.exists():
            raise conflict(f"Model file {name} already exists in model store")
        return download_archive(url, target, f"Failed to download archive from: {url}")

    # -- registration --

    async def register(
        self,
        url: str,
        *,
        model_name: str | None = None,
        handler: str | None = None,
        overrides: dict[str, Any] | None = None,
        initial_workers: int | None = None,
        synchronous: bool = True,
        loaded_at_startup: bool = False,
        version: str | None = None,
        make_default: bool = False,
        trusted: bool = False,
        config_entry: Callable[[str, str], ModelEntry | None] | None = None,
    ) -> ModelVersion:
        """Register one archive.

        `config_entry(name, version)` finds the config.properties `models=` entry of the model
        once its manifest is read (TorchServe's lookup by name and version). At startup the
        entry's settings apply where `overrides` leaves them unset, its minWorkers replaces
        `initial_workers` and its defaultVersion makes this version the default; over the
        management API it fills batch size, batch delay and response timeout only, with
        TorchServe's precedence (see `_management_fields`).
        """
        src = await asyncio.to_thread(self.resolve_url, url, trusted)
        dest = self.work_dir / uuid.uuid4().hex
        model_dir = await asyncio.to_thread(unpack, src, dest)
        try:
            mv, entry = await self._load(
                url,
                src,
                model_dir,
                model_name,
                handler,
                overrides or {},
                initial_workers,
                loaded_at_startup,
                version,
                config_entry,
            )
        except BaseException:
            shutil.rmtree(dest, ignore_errors=True)
            raise
        # the entry's defaultVersion counts at startup only (TorchServe's registerAndUpdateModel)
        make_default = make_default or bool(loaded_at_startup and entry and entry.default)
        name = mv.name
        async with self._lock:
            if mv.version in self._models.get(name, {}):
                shutil.rmtree(dest, ignore_errors=True)
                raise conflict(f"Model version {mv.version} is already registered for model {name}")
            self._models.setdefault(name, {})[mv.version] = mv
            if name not in self._defaults or make_default:
                self._defaults[name] = mv.version
        task = asyncio.get_running_loop().create_task(mv.scale(mv.settings.min_workers))
        if synchronous:
            try:
                await task
            except WorkersFailedError as e:
                # TorchServe: a registration over the API that cannot start its workers is
                # undone (ApiUtils' onError unregisters it); a model loaded at startup stays,
                # its workers retried for maxRetryTimeoutInSec (ModelServer.initModelStore)
                if not loaded_at_startup:
                    await self._remove(name, mv.version)
                    raise
                logger.warning("model %s version %s: %s; retrying its workers",
                               name, mv.version, e)  # fmt: skip
            except BaseException:
                await self._remove(name, mv.version)
                raise
        else:
            task.add_done_callback(_log_failure(name))
        return mv

    async def _load(
        self,
        url: str,
        src: Path,
        model_dir: Path,
        model_name: str | None,
        handler: str | None,
        overrides: dict[str, Any],
        initial_workers: int | None,
        loaded_at_startup: bool,
        version: str | None,
        config_entry: Callable[[str, str], ModelEntry | None] | None,
    ) -> tuple[ModelVersion, ModelEntry | None]:
        manifest = read_manifest(model_dir)
        model_yaml: dict = {}
        if manifest.config_file:
            try:
                model_yaml = read_model_yaml(model_dir / manifest.config_file)
            except (OSError, ValueError) as e:
                raise TSError(400, "InvalidModelException", f"bad model config: {e}") from e
        name = model_name or manifest.model_name
        if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.\-]*", name):
            raise bad_request(f"Invalid model name: {name!r}")
        version = version or manifest.model_version
        entry = config_entry(name, version) if config_entry else None
        from_yaml = model_overrides(model_yaml)
        if loaded_at_startup:
            fields = self._startup_fields(from_yaml, entry, overrides, initial_workers)
        else:
            fields = _management_fields(from_yaml, entry, overrides, initial_workers)
        if fields.get("min_workers", self.default_settings.min_workers) > fields.get(
            "max_workers", self.default_settings.max_workers
        ):
            fields["max_workers"] = fields["min_workers"]
        try:
            settings = replace(self.default_settings, **fields)
        except ValueError as e:
            raise bad_request(f"Invalid model parameters: {e}") from e
        extra_path = await self._install_requirements(model_dir, manifest.requirements_file)
        mv = ModelVersion(
            name,
            version,
            url,
            model_dir,
            manifest,
            settings,
            handler=handler,
            model_yaml=model_yaml,
            loaded_at_startup=loaded_at_startup,
            extra_sys_path=extra_path,
        )
        mv.metrics_config, mv.metrics_sink = self.metrics_config, self.metrics_sink
        mv.max_gpus = self.max_gpus
        mv.service_envelope = self.service_envelope
        return mv, entry

    @staticmethod
    def _startup_fields(
        from_yaml: dict[str, Any],
        entry: ModelEntry | None,
        overrides: dict[str, Any],
        initial_workers: int | None,
    ) -> dict[str, Any]:
        """Settings of a model loaded at startup.

        TorchServe (ModelManager.createModel, ModelServer.initModelStore): the archive's own
        YAML wins over its config.properties `models=` entry: batchSize, maxBatchDelay,
        responseTimeout and jobQueueSize where > 0, minWorkers/maxWorkers where 0 < minWorkers
        <= maxWorkers; explicit overrides win over both. Workers the YAML does not set are the
        entry's minWorkers and maxWorkers, each `initial_workers` (the startup default) where
        the entry leaves it out (None: the registry's defaults, as a snapshot restores).
        """
        yaml_wins = {k: v for k, v in from_yaml.items() if v > 0 and k in (
            "batch_size", "max_batch_delay_ms", "response_timeout_s", "job_queue_size")}
        y_min, y_max = from_yaml.get("min_workers", 0), from_yaml.get("max_workers", 0)
        if 0 < y_min <= y_max:
            yaml_wins.update(min_workers=y_min, max_workers=y_max)
        from_entry = dict(entry.overrides) if entry is not None else {}
        if initial_workers is not None:
            from_entry.setdefault("min_workers", initial_workers)
            from_entry.setdefault("max_workers", initial_workers)
        return {**from_yaml, **from_entry, **yaml_wins, **overrides}

    async def _install_requirements(self, model_dir: Path, req: str | None) -> list[str]:
        if not req:
            return []
        if not self.install_py_dep_per_model:
            logger.warning(
                "model requirements file %s not installed (install_py_dep_per_model=false)", req
            )
            return []
        target = model_dir / ".modelport-deps"
        cmd = [
            sys.executable, "-m", "pip", "install", "--disable-pip-version-check", "--no-input",
            "--target", str(target), "-r", str(model_dir / req),
        ]  # fmt: skip
        proc = await asyncio.to_thread(subprocess.run, cmd, capture_output=True, text=True)
        if proc.returncode != 0:
            raise TSError(
                400, "ModelException", f"installing {req} failed: {proc.stderr.strip()[-500:]}"
            )
        return [str(target)]

    # -- management --

    def set_default(self, name: str, version: str) -> None:
        """TorchServe's set-default: 404 ModelNotFoundException / ModelVersionNotFoundException."""
        versions = self._models.get(name)
        if not versions:
            raise model_not_found(f"Model not found: {name}")
        if version not in versions:
            # TorchServe 0.12's ModelVersionedRefs.setDefaultVersion words (checked against it)
            raise version_not_found(f"Model version {version} does not exist for model {name}")
        self._defaults[name] = version

    async def scale(
        self, name: str, version: str | None, min_worker: int, max_worker: int | None
    ) -> ModelVersion:
        mv = self.get(name, version)
        max_worker = max(max_worker if max_worker is not None else min_worker, min_worker)
        try:
            mv.settings = replace(mv.settings, min_workers=min_worker, max_workers=max_worker)
        except ValueError as e:
            raise bad_request(f"Invalid worker params: {e}") from e
        await mv.scale(min_worker, max_worker)
        return mv

    async def unregister(self, name: str, version: str | None = None) -> ModelVersion:
        mv = self.get(name, version)
        # TorchServe (ModelVersionedRefs.removeVersionModel): the default version goes last,
        # whether it is named or implied by an unversioned DELETE /models/{name}
        if self._defaults[name] == mv.version and len(self._models[name]) > 1:
            raise TSError(
                403,
                "InvalidModelVersionException",
                f"Cannot remove default version for model {name}",
            )
        await self._remove(name, mv.version)
        return mv

    async def _remove(self, name: str, version: str) -> None:
        async with self._lock:
            versions = self._models.get(name, {})
            mv = versions.pop(version, None)
            if not versions:
                self._models.pop(name, None)
                self._defaults.pop(name, None)
            elif self._defaults.get(name) == version:
                self._defaults[name] = next(iter(versions))
        if mv is not None:
            await mv.stop()
            if self.work_dir in mv.model_dir.parents:
                shutil.rmtree(
                    self.work_dir / mv.model_dir.relative_to(self.work_dir).parts[0],
                    ignore_errors=True,
                )

    async def stop(self) -> None:
        await asyncio.gather(
            *(self._remove(mv.name, mv.version) for mv in self.all_versions()),
            return_exceptions=True,
        )
        shutil.rmtree(self.work_dir, ignore_errors=True)


def _management_fields(
    from_yaml: dict[str, Any],
    entry: ModelEntry | None,
    query: dict[str, Any],
    initial_workers: int | None,
) -> dict[str, Any]:
    """Settings of a model registered over the management API (`POST /models?url=...`).

    TorchServe's ModelManager.createModel: batch_size and max_batch_delay given in the query
    win; left out, the archive's YAML (where > 0), then the config.properties `models=` entry
    of the model's name and version, then the defaults. response_timeout: the YAML (> 0), then
    the entry, then the query. Workers (ApiUtils.handleRegister): the YAML's
    minWorkers/maxWorkers where 0 < minWorkers <= maxWorkers, else initial_workers for both
    (None: the defaults); the entry's worker counts apply only at startup.
    """
    from_entry = entry.overrides if entry is not None else {}
    fields: dict[str, Any] = {}
    for key in ("batch_size", "max_batch_delay_ms"):
        if key in query:
            fields[key] = query[key]
        elif from_yaml.get(key, 0) > 0:
            fields[key] = from_yaml[key]
        elif key in from_entry:
            fields[key] = from_entry[key]
    key = "response_timeout_s"
    if from_yaml.get(key, 0) > 0:
        fields[key] = from_yaml[key]
    elif key in from_entry:
        fields[key] = from_entry[key]
    elif key in query:
        fields[key] = query[key]
    if from_yaml.get("job_queue_size", 0) > 0:  # else config.properties' job_queue_size
        fields["job_queue_size"] = from_yaml["job_queue_size"]
    y_min, y_max = from_yaml.get("min_workers", 0), from_yaml.get("max_workers", 0)
    if 0 < y_min <= y_max:
        fields.update(min_workers=y_min, max_workers=y_max)
    elif initial_workers is not None:  # None: the registry's default settings
        fields.update(min_workers=initial_workers, max_workers=initial_workers)
    return fields


def _log_failure(name: str) -> Any:
    def done(task: asyncio.Task) -> None:
        if not task.cancelled() and task.exception() is not None:
            logger.error("starting workers for model %s failed: %s", name, task.exception())

    return done
