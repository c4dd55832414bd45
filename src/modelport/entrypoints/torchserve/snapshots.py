"""`modelport serve`'s side of TorchServe's config snapshots (see torchserve/snapshot.py).

Which config the server starts from: --ts-config when given; otherwise, with snapshots on and
no --models, the newest snapshot in `{LOG_LOCATION}/config` (TorchServe's ConfigManager reads
it in place of config.properties). TorchServe also restores that last snapshot when --models
is given and ignores --models; modelport loads the --models asked for instead.
"""

from __future__ import annotations

import argparse
import logging
import os
from pathlib import Path

from modelport.torchserve.registry import ModelRegistry
from modelport.torchserve.snapshot import (
    SNAPSHOT_KEY,
    SnapshotManager,
    last_snapshot,
    parse_model_snapshot,
    read_snapshot_props,
    snapshot_dir,
)
from modelport.torchserve.ts_config import TSConfig
from modelport.torchserve.workflow import WorkflowRegistry

logger = logging.getLogger("modelport.torchserve")


def add_snapshot_args(g: argparse._ArgumentGroup) -> None:
    g.add_argument(
        "--ncs",
        "--no-config-snapshots",
        dest="ts_no_config_snapshots",
        action="store_true",
        help="write no config snapshots to $LOG_LOCATION/config (default ./logs/config) and "
        "do not restore the last one at startup",
    )


def _directory() -> Path:
    return snapshot_dir(os.environ.get("LOG_LOCATION"))


def config_path(args: argparse.Namespace) -> str | None:
    """The config file to start from: --ts-config, else the last snapshot (if any)."""
    given = getattr(args, "ts_config", None)
    if given or getattr(args, "ts_no_config_snapshots", False) or getattr(args, "models", None):
        return given
    last = last_snapshot(_directory())
    if last is not None:
        logger.info("TorchServe: starting from the last config snapshot %s", last)
        return str(last)
    return None


def make_snapshot_manager(
    args: argparse.Namespace,
    path: str | None,
    cfg: TSConfig,
    registry: ModelRegistry,
    workflows: WorkflowRegistry | None = None,
) -> SnapshotManager:
    props = read_snapshot_props(path) if path else {}
    props.pop("tsConfigFile", None)
    store = getattr(args, "model_store", None) or cfg.model_store
    if store:
        props["model_store"] = store
    if getattr(args, "models", None):
        props["load_models"] = ",".join(args.models)
    if getattr(args, "ts_enable_model_api", False):
        props["enable_model_api"] = "true"
    if path:
        props["tsConfigFile"] = path
    manager = SnapshotManager(
        registry,
        _directory(),
        props,
        enabled=not getattr(args, "ts_no_config_snapshots", False),
    )
    if workflows is not None:  # a workflow's node models are `<workflow>__<node>`
        wfs = workflows
        manager.exclude = lambda name: any(name.startswith(f"{w}__") for w in wfs.names())
    raw = cfg.extra.get(SNAPSHOT_KEY)
    if raw:
        manager.restore_from = parse_model_snapshot(raw)
        manager.source = path
        if getattr(args, "models", None):
            logger.warning("--models ignored: restoring the models of %s's model_snapshot", path)
    return manager
