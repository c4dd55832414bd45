"""Declared weight loading: checkpoint tensor names -> (parameter, shard) by a small table.

A model declares ``stacked_params`` (checkpoint sub-name -> fused sub-name, shard id) and
``skip_weights`` (checkpoint names that carry nothing we need); this one function does the
rest for every model, and checks that each fused parameter received all of its shards.

Where a tensor goes is decided by, in order: a ``weight_loader`` attribute on the parameter
(quantized methods attach their own), the owning module's ``weight_loader`` method (the
linear layers), else a plain shape-checked copy.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import torch
from torch import nn

# (fused param sub-name, checkpoint sub-name, shard id)
StackedParam = tuple[str, str, str]


def _shard_names(module: nn.Module) -> set[str]:
    expected = getattr(module, "expected_shards", None)  # e.g. a rank's share of experts
    if expected is not None:
        return set(expected)
    ranges = getattr(module, "shard_ranges", None)
    return set(ranges) if ranges else set()


def load_declared_weights(
    model: nn.Module,
    weights: Iterable[tuple[str, torch.Tensor]],
    stacked_params: Sequence[StackedParam],
    skip_substrings: Sequence[str] = (),
) -> set[str]:
    """Copy checkpoint tensors into ``model``; return the model parameter names fully loaded.

    A fused parameter counts as loaded only once every one of its shards arrived, so the
    caller can compare the result with ``named_parameters()`` to find missing tensors.
    Unknown checkpoint names raise ValueError: silently ignoring them hides name-mapping bugs.
    """
    params = dict(model.named_parameters())
    owners = {name: model.get_submodule(name.rsplit(".", 1)[0]) for name in params}
    shards_seen: dict[str, set[str]] = {}
    loaded: set[str] = set()
    for ckpt_name, tensor in weights:
        if any(s in ckpt_name for s in skip_substrings):
            continue
        target, shard = ckpt_name, None
        for fused, part, shard_id in stacked_params:
            if part in ckpt_name:
                target, shard = ckpt_name.replace(part, fused), shard_id
                break
        param = params.get(target)
        if param is None:
            raise ValueError(
                f"checkpoint tensor {ckpt_name!r} matches no parameter of {type(model).__name__}"
            )
        owner = owners[target]
        loader = getattr(param, "weight_loader", None) or getattr(owner, "weight_loader", None)
        if shard is not None:
            if loader is None:
                raise ValueError(f"parameter {target!r} cannot take shard {shard!r}")
            loader(param, tensor, shard)
            shards_seen.setdefault(target, set()).add(shard)
            if shards_seen[target] >= _shard_names(owner):
                loaded.add(target)
        elif loader is not None:
            loader(param, tensor)
            loaded.add(target)
        else:
            if tuple(param.shape) != tuple(tensor.shape):
                raise ValueError(
                    f"shape mismatch for {target}: checkpoint has {tuple(tensor.shape)}, "
                    f"model expects {tuple(param.shape)}"
                )
            param.data.copy_(tensor)
            loaded.add(target)
    return loaded
