"""Quantization as a transformation of a built model (model files stay format-agnostic).

``quantize_linear_layers`` hands every ``Linear`` (plain, merged gate/up, fused q/k/v) to
the config's LinearMethod, which replaces the layer's dense ``weight`` with the format's own
parameters; ``Linear.forward`` then calls ``quant_method.apply``. ``finish_loading`` runs each
method's ``process_weights_after_loading`` once all shards arrived. ``split`` /
``shard_ranges`` and the declared loading table keep working unchanged.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import nn

from modelport.quantization.base import QuantizationConfig

if TYPE_CHECKING:
    from modelport.parallel.tp_quant_load import RankSlices


def output_sizes(layer: nn.Module) -> list[int]:
    ranges = getattr(layer, "shard_ranges", None)
    if ranges:
        return [size for _, size in ranges.values()]
    return [int(layer.output_size)]


def quantize_linear_layers(
    model: nn.Module, config: QuantizationConfig, params_dtype: torch.dtype,
    device: torch.device | str = "cpu", rank_slices: RankSlices | None = None,
) -> int:
    """Give each linear layer its LinearMethod; returns how many layers were quantized.
    ``rank_slices``: a tensor-parallel rank's layers built as its slice
    (parallel/tp_quant_load.py)."""
    from modelport.layers.linear import Linear

    prepare = getattr(model, "prepare_quantization", None)
    if prepare is not None:  # a model whose layout changes when quantized (MoE experts)
        prepare(config, torch.device(device))
    if rank_slices is not None:
        rank_slices.mark(model)
    count = 0
    for prefix, layer in list(model.named_modules()):
        if not isinstance(layer, Linear) or getattr(layer, "quant_method", None) is not None:
            continue
        if getattr(layer, "keep_float", False):  # MoE routers: unquantized in checkpoints
            continue
        method = config.linear_method(prefix, layer)
        if method is None:
            continue
        cuts = rank_slices.prepare(layer, method) if rank_slices is not None else None
        del layer._parameters["weight"]
        layer.quant_method = method
        layer.quant_device = torch.device(device)
        with torch.device(device):
            method.create_weights(layer, int(layer.input_size), output_sizes(layer),
                                  params_dtype)
        if cuts is not None:
            rank_slices.wrap(layer, cuts)  # type: ignore[union-attr]
        count += 1
    if count == 0:
        raise ValueError(f"{config.name}: no linear layer of the model could be quantized")
    if rank_slices is not None:
        rank_slices.report()
    return count


@torch.no_grad()
def finish_loading(model: nn.Module) -> None:
    """Repack checkpoint tensors for the kernels (after every shard has been loaded).

    MoE layers whose quantized experts are restacked (CUDA) finish and stack them first
    (``FusedMoE.restack_experts``); their per-expert layers are gone before the loop below.
    """
    for layer in list(model.modules()):
        restack = getattr(layer, "restack_experts", None)
        if restack is not None:
            restack()
    for layer in model.modules():
        method = getattr(layer, "quant_method", None)
        if method is not None:
            method.process_weights_after_loading(layer)


def is_quantized(model: nn.Module) -> bool:
    return any(getattr(m, "quant_method", None) is not None for m in model.modules())
