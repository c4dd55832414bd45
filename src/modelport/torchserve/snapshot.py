"""TorchServe's config snapshots: the server's models saved to `{LOG_LOCATION}/config/*.cfg`.

A snapshot is a config.properties file (written the way java.util.Properties.store writes
one, so TorchServe and modelport read each other's) whose `model_snapshot` key holds every
registered model version with its worker counts, batch settings and default flag. TorchServe
writes `<yyyyMMddHHmmssSSS>-startup.cfg` once started, `-snapshot.cfg` after each management
change and `-shutdown.cfg` at stop; a config with `model_snapshot` restores those models
instead of loading `load_models` (SnapshotManager.restore, ModelServer.initModelStore).
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlsplit

from modelport.torchserve.registry import ModelRegistry
from modelport.torchserve.ts_config import parse_properties

logger = logging.getLogger("modelport.torchserve")

SNAPSHOT_KEY = "model_snapshot"
_STAMP_LEN = 17  # yyyyMMddHHmmssSSS


def snapshot_dir(log_location: str | None) -> Path:
    """TorchServe's FSSnapshotSerializer: `{LOG_LOCATION}/config`, LOG_LOCATION being `logs`
    (relative to the working directory) when the environment does not set it."""
    return Path(log_location or "logs").absolute() / "config"


def _stamp(name: str) -> int | None:
    head = name.split("-", 1)[0]
    return int(head) if len(head) == _STAMP_LEN and head.isdigit() else None


def last_snapshot(directory: Path) -> Path | None:
    """The newest `<yyyyMMddHHmmssSSS>-*.cfg` file by its time stamp (TorchServe's
    getLastSnapshot); files of any other name are ignored (TorchServe fails on them)."""
    if not directory.is_dir():
        return None
    stamped = [(s, p) for p in directory.iterdir() if p.is_file() and (s := _stamp(p.name))]
    return max(stamped)[1] if stamped else None


# ---- java.util.Properties.store ------------------------------------------------------------


def _escape(text: str, is_key: bool) -> str:
    out = []
    for i, c in enumerate(text):
        if c == " " and (is_key or i == 0):
            out.append("\\ ")
        elif c in "\\=:#!":
            out.append("\\" + c)
        elif c in "\t\n\r\f":
            out.append({"\t": "\\t", "\n": "\\n", "\r": "\\r", "\f": "\\f"}[c])
        else:
            out.append(c)
    return "".join(out)


def store_properties(props: dict[str, str], comment: str, when: datetime) -> str:
    lines = [f"#{comment}", "#" + when.strftime("%a %b %d %H:%M:%S UTC %Y")]
    lines += [f"{_escape(k, True)}={_escape(v, False)}" for k, v in props.items()]
    return "\n".join(lines) + "\n"


# ---- the model_snapshot document -----------------------------------------------------------


@dataclass(frozen=True)
class SnapshotModel:
    """One version in `model_snapshot` (TorchServe's Model.getModelState)."""

    name: str
    version: str
    default: bool
    mar_name: str
    overrides: dict[str, Any]  # ModelSettings fields: workers, batch size/delay, timeout


_FIELDS = {
    "minWorkers": "min_workers",
    "maxWorkers": "max_workers",
    "batchSize": "batch_size",
    "maxBatchDelay": "max_batch_delay_ms",
    "responseTimeout": "response_timeout_s",
}


def parse_model_snapshot(text: str) -> list[SnapshotModel]:
    try:
        doc = json.loads(text)
        models = doc.get("models") or {}
        out = []
        for name, versions in models.items():
            for version, spec in versions.items():
                overrides = {
                    f: (float(spec[k]) if k == "responseTimeout" else int(spec[k]))
                    for k, f in _FIELDS.items()
                    if k in spec
                }
                out.append(
                    SnapshotModel(
                        name,
                        str(version),
                        bool(spec.get("defaultVersion", False)),
                        str(spec["marName"]),
                        overrides,
                    )
                )
        return out
    except (ValueError, TypeError, KeyError, AttributeError) as e:
        raise ValueError(f"config model_snapshot is not a valid snapshot: {e!r}") from e


def model_snapshot_doc(
    registry: ModelRegistry,
    name: str,
    created_ms: int,
    exclude: Callable[[str], bool] | None = None,
) -> dict[str, Any]:
    models: dict[str, dict[str, Any]] = {}
    for mv in registry.all_versions():
        if exclude is not None and exclude(mv.name):
            continue
        s = mv.settings
        models.setdefault(mv.name, {})[mv.version] = {
            "defaultVersion": registry.get(mv.name).version == mv.version,
            "marName": Path(unquote(urlsplit(mv.url).path)).name,
            "minWorkers": s.min_workers,
            "maxWorkers": s.max_workers,
            "batchSize": s.batch_size,
            "maxBatchDelay": s.max_batch_delay_ms,
            "responseTimeout": int(s.response_timeout_s),
            "runtimeType": mv.manifest.runtime,
        }
    count = sum(len(v) for v in models.values())
    return {"name": name, "modelCount": count, "created": created_ms, "models": models}


class SnapshotManager:
    """Writes snapshots of one registry and restores a config's `model_snapshot`.

    `enabled=False` (`--ncs`) writes none; restoring a given config still works, as in
    TorchServe, where --ncs only stops the writing and the pick-up of the last snapshot.
    """

    def __init__(
        self,
        registry: ModelRegistry,
        directory: Path,
        props: dict[str, str],
        *,
        enabled: bool = True,
    ) -> None:
        self.registry = registry
        self.directory = directory
        self.props = {k: v for k, v in props.items() if k != SNAPSHOT_KEY}
        self.enabled = enabled
        self.restore_from: list[SnapshotModel] | None = None  # set by build() when restoring
        self.source: str | None = None  # the config file restore_from came from
        # models left out of snapshots: a workflow's nodes (TorchServe's snapshots do not
        # support workflows, and its nodes are no archives of the model store)
        self.exclude: Callable[[str], bool] | None = None

    def save(self, kind: str = "snapshot") -> Path | None:
        """Write `<yyyyMMddHHmmssSSS>-<kind>.cfg`; a failure is logged, never raised (a full
        disk must not fail the management call that triggered it)."""
        if not self.enabled:
            return None
        try:
            self.directory.mkdir(parents=True, exist_ok=True)
            ms = int(time.time() * 1000)
            while True:  # one file per change, even two in the same millisecond
                when = datetime.fromtimestamp(ms / 1000, timezone.utc)
                name = when.strftime("%Y%m%d%H%M%S") + f"{ms % 1000:03d}-{kind}.cfg"
                path = self.directory / name
                if not path.exists():
                    break
                ms += 1
            doc = model_snapshot_doc(self.registry, name, ms, self.exclude)
            props = {**self.props, SNAPSHOT_KEY: json.dumps(doc, indent=2)}
            tmp = path.with_name(f".{name}.tmp")
            tmp.write_text(store_properties(props, "Saving snapshot", when), encoding="utf-8")
            tmp.replace(path)
            return path
        except (OSError, ValueError) as e:
            logger.error("saving config snapshot %s failed: %s", kind, e)
            return None

    def check_archives(self, models: list[SnapshotModel]) -> None:
        """TorchServe's SnapshotManager.validate: every marName is in the model store."""
        store = self.registry.model_store
        for m in models:
            if store is None or not (store / m.mar_name).exists():
                raise RuntimeError(
                    f"Model archive file for model :{m.name}, version :{m.version} "
                    f"not found in model store (restoring the model_snapshot of "
                    f"{self.source}; --ncs or --ts-config starts without the last snapshot)"
                )

    async def restore(self) -> None:
        """Register the snapshot's models with their own settings and default versions.

        As TorchServe's initModels: a model that fails to load is logged and skipped.
        """
        models = self.restore_from or []
        if not models:
            if self.restore_from is not None:
                logger.warning("model snapshot is empty: starting without models")
            return
        self.check_archives(models)
        results = await asyncio.gather(*(self._register(m) for m in models), return_exceptions=True)
        for m, r in zip(models, results):
            if isinstance(r, BaseException):
                logger.error("restoring model %s version %s failed: %s", m.name, m.version, r)

    async def _register(self, m: SnapshotModel) -> None:
        await self.registry.register(
            m.mar_name,
            model_name=m.name,
            overrides=dict(m.overrides),
            initial_workers=None,
            synchronous=True,
            loaded_at_startup=True,
            make_default=m.default,
            trusted=True,
        )
        logger.info("restored TorchServe model %s version %s from snapshot", m.name, m.version)


def read_snapshot_props(path: str | Path) -> dict[str, str]:
    """A config (or snapshot) file's properties, as read at startup."""
    return parse_properties(Path(path).read_text())
