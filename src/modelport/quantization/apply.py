"""Quantization as a transformation of a built model (model files stay format-agnostic).

``quantize_linear_layers`` hands every ``Linear`` (plain, merged gate/up, fused q/k/v) to
the config's LinearMethod, which replaces the layer's dense ``weight`` with the format's own
parameters; ``finish_loading`` runs each method's ``process_weights_after_loading`` once all
shards arrived. The layer's class is swapped for a subclass whose forward calls the method,
as ``torch.nn.utils.parametrize`` does, so ``split`` / ``shard_ranges`` and the declared
loading table keep working and the unquantized classes are untouched.
"""

from __future__ import annotations

import torch
from torch import nn

from modelport.quantization.base import QuantizationConfig

_CLASSES: dict[type, type] = {}


def _quantized_forward(self: nn.Module, x: torch.Tensor) -> torch.Tensor:
    return self.quant_method.apply(self, x, self.bias)


def _quantized_class(cls: type) -> type:
    if cls not in _CLASSES:
        _CLASSES[cls] = type(f"Quantized{cls.__name__}", (cls,),
                             {"forward": _quantized_forward, "__module__": __name__})
    return _CLASSES[cls]


def output_sizes(layer: nn.Module) -> list[int]:
    ranges = getattr(layer, "shard_ranges", None)
    if ranges:
        return [size for _, size in ranges.values()]
    return [int(layer.output_size)]


def quantize_linear_layers(
    model: nn.Module, config: QuantizationConfig, params_dtype: torch.dtype,
    device: torch.device | str = "cpu",
) -> int:
    """Give each linear layer its LinearMethod; returns how many layers were quantized."""
    from modelport.layers.linear import Linear

    count = 0
    for prefix, layer in list(model.named_modules()):
        if not isinstance(layer, Linear) or hasattr(layer, "quant_method"):
            continue
        method = config.linear_method(prefix, layer)
        if method is None:
            continue
        del layer._parameters["weight"]
        layer.quant_method = method
        layer.quant_device = torch.device(device)
        with torch.device(device):
            method.create_weights(layer, int(layer.input_size), output_sizes(layer),
                                  params_dtype)
        layer.__class__ = _quantized_class(type(layer))
        count += 1
    if count == 0:
        raise ValueError(f"{config.name}: no linear layer of the model could be quantized")
    return count


@torch.no_grad()
def finish_loading(model: nn.Module) -> None:
    """Repack checkpoint tensors for the kernels (after every shard has been loaded)."""
    for layer in model.modules():
        method = getattr(layer, "quant_method", None)
        if method is not None:
            method.process_weights_after_loading(layer)


def is_quantized(model: nn.Module) -> bool:
    return any(hasattr(m, "quant_method") for m in model.modules())
