"""Linear layers with declared weight loading.

Every projection in a model is one of these classes rather than a bare nn.Linear, for two
reasons: (1) fused projections (q/k/v, gate/up) keep one matmul at run time while the
checkpoint still stores them apart, so the layer's ``weight_loader(param, tensor, shard_id)``
knows where a named shard goes (a method of the layer, not an attribute of the parameter:
a parameter pointing back at its module would form a reference cycle that keeps GPU
memory alive after ``del model`` until the garbage collector happens to run); (2) tensor parallelism and quantized methods can later replace
these classes (or their loaders) as a transformation of the built module, leaving model files
as plain single-device code.
"""

from __future__ import annotations

import contextvars
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

# True while a tensor-parallel rank builds its model (parallel/tp_load.py): linear weights are
# then created on the meta device and allocated later at the size of the rank's slice.
PARAMS_ON_META: contextvars.ContextVar[bool] = contextvars.ContextVar(
    "linear_params_on_meta", default=False)


def _param(*shape: int) -> nn.Parameter:
    # Uninitialised on the current default device/dtype: loaders overwrite every value, and
    # skipping the init keeps building an 8B model on the GPU instant.
    device = "meta" if PARAMS_ON_META.get() else None
    return nn.Parameter(torch.empty(*shape, device=device), requires_grad=False)


def _check_shape(name: str, dst: torch.Tensor, src: torch.Tensor) -> None:
    if tuple(dst.shape) != tuple(src.shape):
        raise ValueError(
            f"shape mismatch for {name}: checkpoint has {tuple(src.shape)}, "
            f"model expects {tuple(dst.shape)}"
        )


class Linear(nn.Module):
    """y = x W^T (+ b), with W stored [out, in] as in HF checkpoints."""

    def __init__(self, input_size: int, output_size: int, bias: bool = False) -> None:
        super().__init__()
        self.input_size = input_size
        self.output_size = output_size
        # Set by modelport.quantization (a LinearMethod: create weights, load shards, apply);
        # None keeps the dense weight below.
        self.quant_method = None
        self.weight = _param(output_size, input_size)
        if bias:
            self.bias = _param(output_size)
        else:
            self.register_parameter("bias", None)

    def weight_loader(
        self, param: nn.Parameter, loaded: torch.Tensor, shard_id: str | None = None
    ) -> None:
        if shard_id is not None:
            raise ValueError(f"{type(self).__name__} has no shard {shard_id!r}")
        _check_shape(type(self).__name__, param, loaded)
        param.data.copy_(loaded)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.quant_method is not None:
            return self.quant_method.apply(self, x, self.bias)
        return F.linear(x, self.weight, self.bias)

    def extra_repr(self) -> str:
        return f"in={self.input_size}, out={self.output_size}, bias={self.bias is not None}"


class MergedLinear(Linear):
    """Several projections of the same input stacked along the output dimension.

    ``shards`` names each slice in order (e.g. ("gate", "up")); the checkpoint loads each
    slice separately through ``weight_loader(param, tensor, shard_id)``.
    """

    def __init__(
        self,
        input_size: int,
        output_sizes: Sequence[int],
        shards: Sequence[str],
        bias: bool = False,
    ) -> None:
        if len(output_sizes) != len(shards):
            raise ValueError("MergedLinear: one shard name per output size")
        super().__init__(input_size, sum(output_sizes), bias)
        self.shard_ranges: dict[str, tuple[int, int]] = {}
        offset = 0
        for name, size in zip(shards, output_sizes):
            self.shard_ranges[name] = (offset, size)
            offset += size

    def weight_loader(
        self, param: nn.Parameter, loaded: torch.Tensor, shard_id: str | None = None
    ) -> None:
        if shard_id is None:  # an already-fused checkpoint tensor
            super().weight_loader(param, loaded)
            return
        if shard_id not in self.shard_ranges:
            raise ValueError(
                f"{type(self).__name__} has no shard {shard_id!r} "
                f"(shards: {', '.join(self.shard_ranges)})"
            )
        offset, size = self.shard_ranges[shard_id]
        dst = param.data.narrow(0, offset, size)
        _check_shape(f"{type(self).__name__} shard {shard_id!r}", dst, loaded)
        dst.copy_(loaded)


class QKVLinear(MergedLinear):
    """Fused query/key/value projection (shards "q", "k", "v"); GQA gives k and v fewer heads."""

    def __init__(
        self,
        hidden_size: int,
        head_dim: int,
        num_heads: int,
        num_kv_heads: int,
        bias: bool = False,
    ) -> None:
        self.head_dim = head_dim
        self.num_heads = num_heads
        self.num_kv_heads = num_kv_heads
        self.q_size = num_heads * head_dim
        self.kv_size = num_kv_heads * head_dim
        super().__init__(
            hidden_size, (self.q_size, self.kv_size, self.kv_size), ("q", "k", "v"), bias
        )

    def split(self, qkv: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        q, k, v = qkv.split((self.q_size, self.kv_size, self.kv_size), dim=-1)
        return q, k, v
