"""Resolve `--model`: a built-in preset, an HF config.json / model folder, or a .gguf file.

The result carries the normalised ModelConfig (the engine's own type) plus whatever a real
checkpoint tells us beyond the architecture: measured weight bytes and its quantization.
"""

from __future__ import annotations

import json
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from modelport.config import UNREAD_PREFIXES, ModelConfig
from modelport.models.moe_config import moe_spec
from modelport.planner.errors import PlanError
from modelport.planner.gguf_mix import LinearTensor
from modelport.planner.gguf_source import read_gguf
from modelport.planner.presets import find_model_preset, model_preset_names
from modelport.quantization.compressed_tensors import parse
from modelport.quantization.gguf_types import kept_on_cpu_by_default


@dataclass(frozen=True)
class ModelSource:
    name: str  # preset name or path as given
    kind: str  # "preset" | "hf" | "gguf"
    config: ModelConfig
    path: Path | None = None
    quantization: str | None = None  # what the checkpoint already is (awq, gptq, fp8, w4a16, gguf-..)
    # its quantization group along the input features, where config.json says it (-1: one
    # per output channel); None: --group-size decides
    group_size: int | None = None
    weight_bytes: int | None = None  # measured from the files, when there are files
    storage: dict[str, int] | None = None  # measured storage label -> tensor count
    file_bytes: int | None = None  # size on disk of the weight file(s)
    gguf_linear: tuple[LinearTensor, ...] = ()  # a .gguf file's linear weights and types
    gguf_tables: tuple[tuple[str, int], ...] = ()  # its embedding / LM head: name, file bytes
    num_params: int | None = None  # counted from a .gguf file's tensors

    # an HF config planned without its weights beside it (a bare .json, a folder of only
    # config.json): `modelport serve` cannot be pointed at this path
    weightless: bool = False
    hub_id: str | None = None  # the config's _name_or_path when it looks like org/name

    @property
    def gguf_moe(self) -> bool:
        """A .gguf file of a mixture-of-experts model: on a GPU the engine loads it
        dequantized to the compute dtype whatever its types (quantized experts run on CPU
        only: loading.resolve_quantization)."""
        return self.kind == "gguf" and moe_spec(self.config) is not None

    @property
    def gguf_cpu_keepable(self) -> bool:
        """A .gguf file whose linear weights are all types the kept path holds (Q4 to Q8):
        the engine keeps those quantized on an x86 CPU by default (loading.auto_keep_gguf)."""
        return kept_on_cpu_by_default([t.qtype for t in self.gguf_linear])


def _config(d: dict[str, Any], where: str) -> ModelConfig:
    try:
        return ModelConfig.from_hf_dict(d)
    except (ValueError, TypeError) as e:
        raise PlanError("--model", f"{where}: {e}") from None


def _hf_quantization(d: dict[str, Any]) -> str | None:
    return _hf_quantization_group(d)[0]


def _hf_quantization_group(d: dict[str, Any]) -> tuple[str | None, int | None]:
    """(storage format, group size) of an HF checkpoint's quantization_config. A
    compressed-tensors one is "fp8" (FP8 groups only) or "w4a16" / "w8a16" (integer
    weight-only groups, by their widest bits and finest group); one the loader refuses is
    None (planned as its float model)."""
    qc = d.get("quantization_config") or {}
    method = str(qc.get("quant_method", "")).lower()
    if method in ("awq", "gptq", "fp8"):
        return method, None
    if method != "compressed-tensors":
        return None, None
    try:
        ints = parse(qc).int_groups
    except ValueError:
        return None, None
    if not ints:
        return "fp8", None
    bits = max(g.weights.bits for g in ints)
    groups = [g.weights.group_size for g in ints if g.weights.group_size]
    return f"w{bits}a16", min(groups) if groups else -1


def _safetensors_bytes(folder: Path, unread: tuple[str, ...] = ()
                       ) -> tuple[int, dict[str, int], int] | None:
    """(tensor bytes, dtype -> count, file bytes) from the safetensors headers only; tensors
    named with an ``unread`` prefix (a vision tower served text-only) are not counted."""
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        return None
    data = disk = 0
    storage: dict[str, int] = {}
    for f in files:
        with f.open("rb") as fh:
            (n,) = struct.unpack("<Q", fh.read(8))
            header = json.loads(fh.read(n))
        for name, meta in header.items():
            if name == "__metadata__" or name.startswith(unread):
                continue
            start, end = meta["data_offsets"]
            data += end - start
            storage[meta["dtype"]] = storage.get(meta["dtype"], 0) + 1
        disk += f.stat().st_size
    return data, storage, disk


def _from_hf(path: Path) -> ModelSource:
    cfg_path = path / "config.json" if path.is_dir() else path
    if not cfg_path.is_file():
        raise PlanError("--model", f"{path}: no config.json in this folder")
    try:
        d = json.loads(cfg_path.read_text("utf-8"))
    except (OSError, json.JSONDecodeError) as e:
        raise PlanError("--model", f"{cfg_path}: not a readable config.json ({e})") from None
    if not isinstance(d, dict):
        raise PlanError("--model", f"{cfg_path}: config.json must be a JSON object")
    config = _config(d, str(cfg_path))
    measured = _safetensors_bytes(cfg_path.parent,
                                  UNREAD_PREFIXES.get(config.architecture, ()))
    quant, group = _hf_quantization_group(d)
    hub = d.get("_name_or_path")
    return ModelSource(
        name=str(path),
        kind="hf",
        config=config,
        path=cfg_path.parent,
        quantization=quant,
        group_size=group,
        weight_bytes=measured[0] if measured else None,
        storage=measured[1] if measured else None,
        file_bytes=measured[2] if measured else None,
        weightless=measured is None or cfg_path.name != "config.json",
        hub_id=hub if isinstance(hub, str) and hub.count("/") == 1 and not Path(hub).exists()
        else None,
    )


def _from_gguf(path: Path) -> ModelSource:
    info = read_gguf(path)
    return ModelSource(
        name=str(path),
        kind="gguf",
        config=_config(info.hf_config, str(path)),
        path=path,
        quantization=f"gguf-{info.file_type}" if info.file_type else None,
        weight_bytes=info.tensor_bytes,
        storage=info.storage,
        file_bytes=info.file_bytes,
        gguf_linear=info.linear,
        gguf_tables=info.tables,
        num_params=info.num_params,
    )


def resolve_model(spec: str) -> ModelSource:
    """Preset names win over paths; anything else must be an existing file or folder."""
    preset = find_model_preset(spec)
    if preset is not None:
        name, d = preset
        return ModelSource(name=name, kind="preset", config=_config(d, f"preset {name}"))
    path = Path(spec).expanduser()
    if not path.exists():
        raise PlanError(
            "--model",
            f"{spec!r} is neither a preset ({', '.join(model_preset_names())}) "
            "nor an existing config.json, model folder or .gguf file",
        )
    if path.is_file() and path.suffix.lower() == ".gguf":
        return _from_gguf(path)
    return _from_hf(path)
