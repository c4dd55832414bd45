"""HF folders: config.json -> ModelConfig, *.safetensors -> (name, tensor) stream."""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch

from modelport.config import ModelConfig


def read_hf_config(folder: Path) -> ModelConfig:
    path = folder / "config.json"
    try:
        raw = json.loads(path.read_text())
    except FileNotFoundError:
        raise ValueError(f"{folder} has no config.json") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"cannot read {path}: {e}") from None
    if not isinstance(raw, dict):
        raise ValueError(f"{path} is not a JSON object")
    try:
        return ModelConfig.from_hf_dict(raw)
    except (TypeError, KeyError) as e:
        raise ValueError(f"{path}: invalid model config ({e})") from None


def read_generation_eos(folder: Path) -> tuple[int, ...]:
    """EOS ids from generation_config.json (Llama 3 lists several there), if present."""
    try:
        eos = json.loads((folder / "generation_config.json").read_text()).get("eos_token_id")
    except (OSError, ValueError, AttributeError):
        return ()
    if eos is None:
        return ()
    return tuple(int(e) for e in (eos if isinstance(eos, list) else [eos]))


def safetensors_files(folder: Path) -> list[Path]:
    """The checkpoint's weight files: those its index names, else every *.safetensors.

    The index matters for folders that also hold a second copy of the weights in another
    naming scheme (Mistral's consolidated.safetensors next to the HF shards).
    """
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        try:
            names = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
            raise ValueError(f"cannot read {index}: {e}") from None
        missing = [n for n in names if not (folder / n).is_file()]
        if missing:
            raise ValueError(f"{index.name} lists missing files: {', '.join(missing)}")
        return [folder / n for n in names]
    files = sorted(folder.glob("*.safetensors"))
    if len(files) > 1:
        files = [f for f in files if not f.name.startswith("consolidated")] or files
    if not files:
        other = [p.name for p in folder.iterdir() if p.suffix in (".bin", ".pt", ".pth")]
        hint = f" (found {', '.join(other)}: PyTorch pickles are not loaded)" if other else ""
        raise ValueError(f"no *.safetensors weights in {folder}{hint}")
    return files


def _open(path: Path) -> Any:
    from safetensors import SafetensorError, safe_open

    try:
        return safe_open(str(path), framework="pt", device="cpu")
    except (SafetensorError, OSError, ValueError) as e:
        raise ValueError(f"cannot read weights file {path}: corrupt or truncated ({e})") from None


def count_tensors(files: list[Path], skip: Callable[[str], bool] | None = None) -> int:
    total = 0
    for path in files:
        with _open(path) as f:
            total += sum(1 for name in f.keys() if skip is None or not skip(name))
    return total


def iter_safetensors(files: list[Path], skip: Callable[[str], bool] | None = None
                     ) -> Iterator[tuple[str, torch.Tensor]]:
    """Tensors one at a time (memory-mapped), so peak host memory stays ~one tensor; those
    ``skip`` names (another expert-parallel rank's experts) are never read."""
    from safetensors import SafetensorError

    for path in files:
        with _open(path) as f:
            for name in f.keys():
                if skip is not None and skip(name):
                    continue
                try:
                    tensor = f.get_tensor(name)
                except (SafetensorError, OSError, RuntimeError) as e:
                    raise ValueError(f"cannot read tensor {name!r} from {path}: {e}") from None
                yield name, tensor


def iter_secondary_weights(folder: Path, files: dict[str, str]
                           ) -> Iterator[tuple[str, torch.Tensor]]:
    """Weights kept beside the safetensors as torch state dicts (BGE-M3's sparse_linear.pt):
    ``{file name: name prefix}``; each present file's ``(prefix + key, tensor)``. Read with
    ``weights_only=True``: a pickle that is more than tensors is refused, never run."""
    for name, prefix in files.items():
        path = folder / name
        if not path.is_file():
            continue
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as e:  # noqa: BLE001 - any unpickling failure names the file
            raise ValueError(f"cannot read {path} as a torch state dict: {e}") from None
        if not isinstance(state, dict) or not all(
                isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in state.items()):
            raise ValueError(f"{path} is not a state dict of tensors")
        for key, tensor in state.items():
            yield prefix + key, tensor
