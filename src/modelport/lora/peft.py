"""A PEFT LoRA adapter folder, read and checked against the model it is meant for.

The folder holds ``adapter_config.json`` (r, lora_alpha, target_modules, use_rslora, bias)
and ``adapter_model.safetensors`` whose tensors are named
``base_model.model.<module>.lora_A.weight`` ([r, in]) and ``.lora_B.weight`` ([out, r]).
The model fuses q/k/v and gate/up into one projection each; the model class's declared
``stacked_params`` (the same table its checkpoint loading uses) says which slice of which
fused module a checkpoint module such as ``q_proj`` is, so an adapter needs no per-model code.

An adapter becomes, per fused module, one A stacked over its slices ([sum r, in]) and one
block-diagonal B with the scale folded in ([out, sum r]): ``y += (x @ A.T) @ B.T`` is then
two matmuls whatever the number of slices, and equals running ``W + scale * B_s @ A_s`` on
each slice s.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

_TENSOR = re.compile(r"^base_model\.model\.(?P<module>.+)\.lora_(?P<ab>[AB])(?:\.[^.]+)?\.weight$")


@dataclass
class LoRAAdapter:
    """An adapter's weights on the host: fused module name -> (A [R, in], B [out, R])."""

    name: str
    rank: int
    weights: dict[str, tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict)

    @property
    def num_bytes(self) -> int:
        return sum(
            a.numel() * a.element_size() + b.numel() * b.element_size()
            for a, b in self.weights.values()
        )


def _read_config(path: Path, name: str) -> dict:
    cfg_file = path / "adapter_config.json"
    if not path.is_dir():
        raise ValueError(f"LoRA adapter {name!r}: no such folder {str(path)!r}")
    if not cfg_file.is_file():
        raise ValueError(f"LoRA adapter {name!r}: {str(path)!r} has no adapter_config.json")
    try:
        cfg = json.loads(cfg_file.read_text())
    except ValueError as e:
        raise ValueError(f"LoRA adapter {name!r}: adapter_config.json is not JSON: {e}") from None
    if not isinstance(cfg, dict):
        raise ValueError(f"LoRA adapter {name!r}: adapter_config.json must be a JSON object")
    return cfg


def _read_tensors(path: Path, name: str) -> dict[str, torch.Tensor]:
    st = path / "adapter_model.safetensors"
    if st.is_file():
        from safetensors.torch import load_file

        return load_file(str(st))
    pt = path / "adapter_model.bin"
    if pt.is_file():
        return torch.load(str(pt), map_location="cpu", weights_only=True)
    raise ValueError(
        f"LoRA adapter {name!r}: {str(path)!r} has no adapter_model.safetensors "
        "(or adapter_model.bin)"
    )


def load_adapter(name: str, path: str, model: nn.Module, max_rank: int) -> LoRAAdapter:
    """Read the adapter at ``path`` for ``model``; ValueError says why it cannot serve it
    (unreadable, rank above ``max_rank``, a module the model lacks, shapes that differ)."""
    folder = Path(path).expanduser()
    cfg = _read_config(folder, name)
    if cfg.get("peft_type", "LORA") != "LORA":
        raise ValueError(f"LoRA adapter {name!r}: peft_type {cfg.get('peft_type')!r} is not LORA")
    r, alpha = cfg.get("r"), cfg.get("lora_alpha", cfg.get("r"))
    if not isinstance(r, int) or r < 1:
        raise ValueError(f"LoRA adapter {name!r}: adapter_config.json needs r >= 1, got {r!r}")
    if r > max_rank:
        raise ValueError(f"LoRA rank {r} is greater than max_lora_rank {max_rank}.")
    if cfg.get("bias", "none") != "none":
        raise ValueError(
            f"LoRA adapter {name!r}: bias {cfg['bias']!r} is not supported (only bias 'none')"
        )
    for key in ("rank_pattern", "alpha_pattern"):
        if cfg.get(key):
            raise ValueError(f"LoRA adapter {name!r}: {key} is not supported")
    if cfg.get("use_dora"):
        raise ValueError(f"LoRA adapter {name!r}: DoRA adapters are not supported")
    scale = alpha / (math.sqrt(r) if cfg.get("use_rslora") else r)
    pairs: dict[str, dict[str, torch.Tensor]] = {}
    for tname, t in _read_tensors(folder, name).items():
        m = _TENSOR.match(tname)
        if m is None:
            raise ValueError(
                f"LoRA adapter {name!r}: tensor {tname!r} is not a LoRA A/B weight "
                "(embedding, lm_head or modules_to_save tensors are not supported)"
            )
        pairs.setdefault(m["module"], {})[m["ab"]] = t
    if not pairs:
        raise ValueError(f"LoRA adapter {name!r}: no LoRA weights in {str(folder)!r}")
    slices = _resolve(name, model, pairs)
    adapter = LoRAAdapter(name=name, rank=r)
    for fused, (out_size, parts) in slices.items():
        adapter.weights[fused] = _stack(parts, out_size, scale)
    return adapter


def _resolve(
    name: str, model: nn.Module, pairs: dict[str, dict[str, torch.Tensor]]
) -> dict[str, tuple[int, list[tuple[int, int, torch.Tensor, torch.Tensor]]]]:
    """Fused module -> (its output size, [(slice offset, slice size, A, B)]), checked."""
    from modelport.layers.linear import Linear
    from modelport.parallel.tensor_parallel import full_shape

    stacked = getattr(type(model), "stacked_params", ())
    modules = dict(model.named_modules())
    out: dict[str, tuple[int, list[tuple[int, int, torch.Tensor, torch.Tensor]]]] = {}
    for module, ab in sorted(pairs.items()):
        if set(ab) != {"A", "B"}:
            raise ValueError(
                f"LoRA adapter {name!r}: module {module!r} lacks lora_{'B' if 'A' in ab else 'A'}"
            )
        a, b = ab["A"], ab["B"]
        target, shard = module + ".", None
        for fused, part, shard_id in stacked:
            if part in target:
                target, shard = target.replace(part, fused), shard_id
                break
        target = target[:-1]
        mod = modules.get(target)
        inner = getattr(mod, "inner", None)  # a row-parallel slice's wrapper (tensor parallel)
        if isinstance(inner, Linear):
            target, mod = f"{target}.inner", inner
        if not isinstance(mod, Linear) or ".layers." not in f".{target}":
            raise ValueError(
                f"LoRA adapter {name!r}: target module {module!r} is not a linear "
                f"projection of {type(model).__name__}'s decoder layers "
                "(q/k/v/o and gate/up/down projections are supported)"
            )
        # under tensor parallelism the adapter is for the whole layer: each rank takes its
        # part when the adapter is placed (parallel/tensor_parallel.lora_slice)
        out_size, in_size, ranges = full_shape(mod)
        if shard is None:
            offset, size = 0, out_size
        else:
            offset, size = ranges[shard]
        if a.dim() != 2 or b.dim() != 2 or a.shape[0] != b.shape[1]:
            raise ValueError(
                f"LoRA adapter {name!r}: module {module!r} has lora_A "
                f"{tuple(a.shape)} and lora_B {tuple(b.shape)}, not [r, in] and "
                "[out, r]"
            )
        if a.shape[1] != in_size or b.shape[0] != size:
            raise ValueError(
                f"LoRA adapter {name!r}: module {module!r} has shape "
                f"[{b.shape[0]}, {a.shape[1]}] but the model's is [{size}, "
                f"{in_size}]: the adapter is for another model"
            )
        out.setdefault(target, (out_size, []))[1].append((offset, size, a, b))
    return out


def _stack(
    parts: list[tuple[int, int, torch.Tensor, torch.Tensor]], out_size: int, scale: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """One A over every slice's rank and the block-diagonal, pre-scaled B (zero rows for
    the slices the adapter leaves alone)."""
    total_r = sum(a.shape[0] for _, _, a, _ in parts)
    in_size = parts[0][2].shape[1]
    a_all = torch.zeros(total_r, in_size, dtype=torch.float32)
    b_all = torch.zeros(out_size, total_r, dtype=torch.float32)
    col = 0
    for off, size, a, b in parts:
        r = a.shape[0]
        a_all[col : col + r] = a.float()
        b_all[off : off + size, col : col + r] = b.float() * scale
        col += r
    return a_all, b_all
