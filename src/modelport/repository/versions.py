"""Which numbered version folders of a model are served (Triton's version_policy)."""

from __future__ import annotations

from pathlib import Path

from tritonclient.grpc import model_config_pb2 as mc

from modelport.repository.errors import ModelConfigError


def available_versions(model_dir: Path) -> list[int]:
    """Numeric sub-folders, ascending (other folders, like `tokenizer/`, are ignored)."""
    out = []
    for p in model_dir.iterdir():
        if p.is_dir() and p.name.isdigit() and not p.name.startswith("0"):
            out.append(int(p.name))
    return sorted(out)


def select_versions(cfg: mc.ModelConfig, model_dir: Path) -> list[int]:
    """Apply the version policy; an ensemble has no folders and serves version 1."""
    have = available_versions(model_dir)
    if cfg.backend == "ensemble" and not have:
        have = [1]
    policy = cfg.version_policy.WhichOneof("policy_choice") or "latest"
    if policy == "all":
        chosen = have
    elif policy == "specific":
        wanted = sorted(set(cfg.version_policy.specific.versions))
        missing = [v for v in wanted if v not in have]
        if missing:
            raise ModelConfigError(
                f"model '{cfg.name}': version_policy names version(s) {missing} that have no "
                f"folder (found {have})"
            )
        chosen = wanted
    else:
        n = cfg.version_policy.latest.num_versions or 1
        chosen = have[-n:]
    if not chosen:
        raise ModelConfigError(
            f"model '{cfg.name}': at least one version must be available under the version "
            f"policy (no numeric version folder in {model_dir})"
        )
    return chosen
