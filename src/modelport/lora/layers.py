"""The linear layers' LoRA forward, and the step's adapter mapping it reads.

``enable_lora`` swaps the class of each decoder-layer projection for a subclass of its own
class (as the CUDA GEMV swap does): the base forward runs unchanged, then, only while a step
with LoRA requests runs, each active adapter adds ``(x[rows] @ A.T) @ B.T`` to its rows.
Without LoRA requests in the step (and whenever CUDA graphs are captured) no mapping is
active and the subclass adds nothing, so the graphs hold the base model only; the runner
runs LoRA steps eagerly.

The mapping is set for one forward by ``lora_mapping()``, which refuses nesting: an
explicit forward context, not a long-lived module global.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass, field

import torch
from torch import nn


@dataclass
class LoRAMapping:
    """One step's rows per adapter: (device slot, row indices of the flat token batch, or
    None for every row)."""

    groups: list[tuple[int, torch.Tensor | None]]
    # the same as host lists (what rank 0 sends to the other tensor-parallel ranks)
    spec: list[tuple[int, list[int] | None]] = field(default_factory=list)


_ACTIVE: LoRAMapping | None = None


@contextlib.contextmanager
def lora_mapping(mapping: LoRAMapping) -> Iterator[None]:
    global _ACTIVE
    if _ACTIVE is not None:
        raise RuntimeError("a LoRA mapping is already active: forwards do not nest")
    _ACTIVE = mapping
    try:
        yield
    finally:
        _ACTIVE = None


def _apply(mod: nn.Module, x: torch.Tensor, y: torch.Tensor, mapping: LoRAMapping) -> torch.Tensor:
    slots: dict[int, tuple[torch.Tensor, torch.Tensor]] = mod.lora_slots
    for slot, rows in mapping.groups:
        w = slots.get(slot)
        if w is None:  # the adapter leaves this module alone
            continue
        a, b = w
        if rows is None:
            y.add_((x @ a.t()) @ b.t())
        else:
            y.index_add_(0, rows, (x.index_select(0, rows) @ a.t()) @ b.t())
    return y


_LORA_CLASSES: dict[type, type] = {}


def _lora_class(base: type) -> type:
    if base not in _LORA_CLASSES:

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            y = base.forward(self, x)
            mapping = _ACTIVE
            if mapping is None:
                return y
            return _apply(self, x, y, mapping)

        _LORA_CLASSES[base] = type(f"LoRA{base.__name__}", (base,), {"forward": forward})
    return _LORA_CLASSES[base]


def add_lora_layers(model: nn.Module) -> dict[str, nn.Module]:
    """Swap every decoder-layer linear projection for its LoRA subclass; returns them by
    their module name (the names adapters are resolved to, see peft.py)."""
    from modelport.layers.linear import Linear

    out = {}
    for name, mod in model.named_modules():
        if isinstance(mod, Linear) and ".layers." in f".{name}":
            mod.__class__ = _lora_class(type(mod))
            mod.lora_slots = {}
            out[name] = mod
    return out
