"""Model loading: resolve a source, read its config, build the model and fill its weights.

Submodules: source (where a model lives), default_model (the embedded GGUF), hf
(safetensors folders), gguf (GGUF files), dummy (random weights), cache (on-disk
conversions). This module wires them into the four calls the runner uses.
"""

from __future__ import annotations

import contextlib
import json
import logging
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import torch
from torch import nn

from modelport.config import LoadConfig, ModelConfig, auto_dtype
from modelport.loader.cache import build_entry, default_cache_dir, entry_dir
from modelport.loader.default_model import default_model_path
from modelport.loader.source import ModelSource, resolve_model

__all__ = [
    "ModelSource",
    "default_model_path",
    "resolve_model",
    "load_model_config",
    "load_model",
    "resolve_dtype",
    "gguf_cache_folder",
    "default_cache_dir",
]

logger = logging.getLogger(__name__)

# Dequantized GGUF weights are cached (float32) only up to this size: a 2 GiB write is
# cheaper than re-dequantizing on every start, an 8B model's 32 GiB is not.
MAX_CACHED_GGUF_BYTES = 2 << 30

_DTYPES = {
    "float32": torch.float32,
    "float": torch.float32,
    "fp32": torch.float32,
    "float16": torch.float16,
    "half": torch.float16,
    "fp16": torch.float16,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
}


def resolve_dtype(dtype: str, config: ModelConfig, device: torch.device) -> torch.dtype:
    """Resolve "auto": float32 on CPU; on CUDA the checkpoint dtype, with float32 -> bfloat16."""
    if dtype != "auto":
        try:
            return _DTYPES[dtype.lower()]
        except KeyError:
            raise ValueError(
                f"unsupported dtype {dtype!r}; expected auto, {', '.join(_DTYPES)}"
            ) from None
    return getattr(torch, auto_dtype(torch.device(device).type != "cpu", config.torch_dtype))


def gguf_cache_folder(path: Path, cache_dir: Path | None = None) -> Path:
    """Where the dequantized HF-style copy of a GGUF file lives (may not exist yet)."""
    return entry_dir(path, "gguf-model", cache_dir)


def _gguf_config_dict(path: Path) -> dict:
    from modelport.loader.gguf import gguf_hf_config, open_gguf

    return gguf_hf_config(open_gguf(path), path)


def load_model_config(src: ModelSource) -> ModelConfig:
    """ModelConfig from config.json or from GGUF metadata (the cached copy when present)."""
    from modelport.loader.hf import read_hf_config

    if src.kind == "hf":
        return read_hf_config(src.path)
    from modelport.loader.gguf import TENSOR_TABLE_KIND

    for cached in (gguf_cache_folder(src.path), entry_dir(src.path, TENSOR_TABLE_KIND)):
        if (cached / "config.json").is_file():
            return read_hf_config(cached)
    return ModelConfig.from_hf_dict(_gguf_config_dict(src.path))


@contextlib.contextmanager
def _build_defaults(dtype: torch.dtype, device: torch.device) -> Iterator[None]:
    """Create parameters directly on the target device and dtype (no CPU fp32 detour)."""
    old = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            yield
    finally:
        torch.set_default_dtype(old)


def _progress(weights: Iterator, total: int, desc: str) -> Iterator:
    from tqdm.auto import tqdm

    return iter(tqdm(weights, total=total, desc=desc, unit="tensor", leave=False))


def _write_gguf_cache(path: Path, target: Path) -> Path:
    from safetensors.torch import save_file

    from modelport.loader.gguf import gguf_hf_config, iter_gguf_weights, open_gguf

    reader = open_gguf(path)
    hf_config = gguf_hf_config(reader, path)

    def build(tmp: Path) -> None:
        tensors = dict(
            _progress(
                iter_gguf_weights(reader, hf_config),
                len(reader.tensors),
                f"Dequantizing {path.name}",
            )
        )
        save_file(tensors, str(tmp / "model.safetensors"), metadata={"source": str(path)})
        (tmp / "config.json").write_text(json.dumps(hf_config, indent=2))

    return build_entry(target, build)


def _weights_for(src: ModelSource, skip: Callable[[str], bool] | None = None
                 ) -> tuple[Iterator[tuple[str, torch.Tensor]], int]:
    """The (HF name, tensor) stream of a source and its length (for the progress bar);
    an HF folder's tensors that ``skip`` names are not read."""
    from modelport.loader import hf

    if src.kind == "hf":
        files = hf.safetensors_files(src.path)
        return hf.iter_safetensors(files, skip), hf.count_tensors(files, skip)
    from modelport.loader.gguf import dequantized_numel, iter_gguf_weights, open_gguf

    cached = gguf_cache_folder(src.path)
    if not (cached / "model.safetensors").is_file():
        reader = open_gguf(src.path)
        direct = iter_gguf_weights(reader, _gguf_config_dict(src.path)), len(reader.tensors)
        if dequantized_numel(reader) * 4 > MAX_CACHED_GGUF_BYTES:
            return direct
        t0 = time.perf_counter()
        try:
            _write_gguf_cache(src.path, cached)
        except OSError as e:  # read-only or full cache folder: load without caching
            logger.warning(
                "cannot cache %s in %s (%s); loading it directly", src.path.name, cached, e
            )
            return direct
        logger.info(
            "cached dequantized %s in %s (%.1f s)", src.path.name, cached, time.perf_counter() - t0
        )
    files = [cached / "model.safetensors"]
    return hf.iter_safetensors(files), hf.count_tensors(files)


def _unread(model: nn.Module, skip: Callable[[str], bool] | None
            ) -> Callable[[str], bool] | None:
    """``skip`` plus the checkpoint prefixes the model never runs (``unread_prefixes``, e.g.
    a multimodal checkpoint's vision tower served text-only): those tensors are not read."""
    prefixes = tuple(getattr(model, "unread_prefixes", ()))
    if not prefixes:
        return skip
    return lambda name: name.startswith(prefixes) or (skip is not None and skip(name))


def load_model(
    src: ModelSource,
    config: ModelConfig,
    load_config: LoadConfig,
    dtype: torch.dtype,
    device: torch.device,
    transform: Callable[[nn.Module], None] | None = None,
) -> nn.Module:
    """Build the registered model class on device/dtype and fill its weights; returns eval().

    ``transform`` (e.g. tensor-parallel sharding) runs once the weights are loaded; for a
    quantized model, before the kernels repack them (so packed layouts are cut correctly).
    """
    from modelport.models.registry import get_model_class

    cls = get_model_class(config.architecture)
    device = torch.device(device)
    fmt = load_config.load_format
    if fmt == "safetensors" and src.kind != "hf":
        raise ValueError(f"load_format='safetensors' needs an HF folder, got a {src.kind} file")
    if fmt == "gguf" and src.kind != "gguf":
        raise ValueError(f"load_format='gguf' needs a .gguf file, got {src.path}")
    from modelport.quantization.loading import resolve_quantization

    plan = resolve_quantization(load_config.quantization, src, config, device, fmt)
    if plan is not None:  # quantized checkpoint or --quantization: see quantization/loading.py
        return plan.load(cls, config, fmt, load_config.seed, dtype, device, transform)
    from modelport.parallel.tp_load import build_for_rank

    with _build_defaults(dtype, device):  # a tensor-parallel rank: only its slices (tp_load)
        model = build_for_rank(lambda: cls(config), device)
    expected = {name for name, _ in model.named_parameters()}
    if fmt == "dummy":
        from modelport.loader.dummy import init_dummy_weights

        init_dummy_weights(model, load_config.seed)
        if transform is not None:
            transform(model)
        return model.eval()
    from modelport.parallel.moe_parallel import other_ranks_experts

    # expert parallelism: another rank's experts are not even read
    weights, total = _weights_for(src, _unread(model, other_ranks_experts(model)))
    secondary = getattr(cls, "secondary_weight_files", None)  # e.g. models/bge_m3.py
    if secondary and src.kind == "hf":
        import itertools

        from modelport.loader.hf import iter_secondary_weights

        weights = itertools.chain(weights, iter_secondary_weights(src.path, secondary))
    with torch.no_grad():
        loaded = model.load_weights(_progress(weights, total, f"Loading {src.name}"))
    missing = sorted(expected - loaded)
    if missing:
        shown = ", ".join(missing[:5]) + (
            f" and {len(missing) - 5} more" if len(missing) > 5 else ""
        )
        raise ValueError(f"{src.path}: checkpoint is missing weights for {shown}")
    if transform is not None:
        transform(model)
    return model.eval()
