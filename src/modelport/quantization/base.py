"""The LinearMethod interface every quantized format implements, and its config base.

A model file builds plain ``Linear`` / ``MergedLinear`` / ``QKVLinear`` layers; quantization
is a transformation of the built module (gpt-fast style) that gives each linear layer a
``LinearMethod``. The method owns the layer's parameters from then on:

* ``create_weights`` registers the checkpoint's own tensors (qweight/qzeros/scales, an FP8
  weight and its scale, raw GGUF blocks, ...), each carrying a ``weight_loader`` so the
  model's declared loading table (q/k/v -> qkv shards) works unchanged;
* ``process_weights_after_loading`` turns what the checkpoint stored into what the kernel
  reads (repacking, act-order permutation, fused-shard scale reconciliation);
* ``apply`` runs the matmul;
* ``shard`` keeps one tensor-parallel rank's slice of the layer (``TPShard``: output rows for
  column-parallel layers, a contiguous range of input columns for row-parallel ones). It is
  called after loading and before ``process_weights_after_loading``, so a method may record
  the slice and cut its canonical form before building the kernel's packed layout;
* ``slice_cuts`` (optional) lets a tensor-parallel rank build the layer as its slice instead:
  how each whole checkpoint tensor is cut to the rank's part as it streams in
  (parallel/tp_quant_load.py), so the rank never holds the whole layer.

Parameters packed along the output dimension carry ``output_dim`` and ``pack_factor``
attributes, so one generic shard loader (here) narrows fused q/k/v or gate/up slices for
every format; the same metadata is what a tensor-parallel split of a packed weight needs.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn


class QuantizationConfig(ABC):
    """What a checkpoint's ``quantization_config`` (or a GGUF file, or the user) asks for."""

    name: str = ""

    @abstractmethod
    def linear_method(self, prefix: str, layer: nn.Module) -> LinearMethod | None:
        """The method for one linear layer (None keeps it unquantized)."""

    def use_stacked_params(self, stacked_params: Sequence[Any]) -> None:  # noqa: B027
        """The model's loading table, when its layout changed for quantization (a format
        that looks up checkpoint names per layer reads it)."""

    def check_device(self, device: torch.device) -> None:  # noqa: B027 - optional hook
        """Raise ValueError naming an alternative when the format cannot run on ``device``."""

    def hf_dict(self) -> dict[str, Any]:
        """config.json ``quantization_config`` for this method (writers use it)."""
        return {"quant_method": self.name}


@dataclass(frozen=True)
class TPShard:
    """One tensor-parallel rank's slice of a linear layer, in the unsharded layer's coordinates.

    dim 0 (column parallel): keep output rows ``index`` (for fused q/k/v or gate/up: this
    rank's part of every sub-shard, in order); dim 1 (row parallel): keep input columns
    ``index``, a contiguous range. ``input_size`` / ``output_size`` are the layer's sizes
    before sharding (``shard_model`` updates the layer's own afterwards).
    """

    dim: int
    index: torch.Tensor
    input_size: int
    output_size: int
    rank: int
    size: int
    # the fused layer's (offset, size) per sub-shard before sharding (None: not fused)
    shard_ranges: dict[str, tuple[int, int]] | None = None

    @property
    def start(self) -> int:
        return int(self.index[0])

    @property
    def length(self) -> int:
        return int(self.index.numel())


def check_input_split(input_size: int, part: int, tp_size: int, group_size: int,
                      what: str) -> None:
    """Row parallelism cuts K; each rank's columns must be whole groups (or lie inside one)."""
    if part % group_size and group_size % part:
        raise ValueError(
            f"{what}: tensor_parallel_size {tp_size} splits {input_size} input columns into "
            f"{part} per rank, which is not a multiple of the group size {group_size}; use a "
            "tensor_parallel_size (or a checkpoint group size) that gives each rank whole groups"
        )


# A whole checkpoint tensor (of a shard, or None: the whole, possibly fused, layer) -> the part
# a tensor-parallel rank keeps (a view where possible; the weight loader copies it)
Cut = Callable[[torch.Tensor, "str | None"], torch.Tensor]


def output_runs(spec: TPShard, shard_id: str | None) -> list[tuple[int, int]]:
    """(start, length) of the rank's output rows in a checkpoint tensor of shard ``shard_id``
    (None: of the whole layer, fused shards one after another): the rows ``spec.index`` keeps."""
    ranges = spec.shard_ranges
    if shard_id is not None:
        if not ranges or shard_id not in ranges:
            raise ValueError(f"tensor-parallel layer has no shard {shard_id!r}")
        part = ranges[shard_id][1] // spec.size
        return [(spec.rank * part, part)]
    if not ranges:
        part = spec.output_size // spec.size
        return [(spec.rank * part, part)]
    return [(off + spec.rank * (n // spec.size), n // spec.size) for off, n in ranges.values()]


def outputs_aligned(spec: TPShard, pack: int) -> bool:
    """Whether every run of the rank's output rows starts and ends on a packed word."""
    ids: list[str | None] = [*(spec.shard_ranges or {}), None]
    return all(start % pack == 0 and n % pack == 0
               for sid in ids for start, n in output_runs(spec, sid))


def output_cut(spec: TPShard, dim: int, pack: int = 1) -> Cut:
    """Cut: the rank's output rows along ``dim`` of a tensor packing ``pack`` outputs per
    element there (check ``outputs_aligned`` first)."""
    def cut(t: torch.Tensor, shard_id: str | None) -> torch.Tensor:
        runs = output_runs(spec, shard_id)
        total = spec.shard_ranges[shard_id][1] if shard_id is not None else spec.output_size
        if t.shape[dim] * pack != total:
            raise ValueError(f"tensor-parallel cut: checkpoint tensor {tuple(t.shape)} holds "
                             f"{t.shape[dim] * pack} outputs along dim {dim}, expected {total}")
        parts = [t.narrow(dim, start // pack, n // pack) for start, n in runs]
        return parts[0] if len(parts) == 1 else torch.cat(parts, dim)
    return cut


def input_cut(start: int, length: int, total: int, dim: int) -> Cut:
    """Cut: elements [start, start + length) of ``dim`` (of ``total``) of a tensor."""
    def cut(t: torch.Tensor, shard_id: str | None) -> torch.Tensor:
        if t.shape[dim] != total:
            raise ValueError(f"tensor-parallel cut: checkpoint tensor {tuple(t.shape)} has "
                             f"{t.shape[dim]} along dim {dim}, expected {total}")
        return t.narrow(dim, start, length)
    return cut


class LinearMethod(ABC):
    """create_weights -> weight_loader (per shard) -> process_weights_after_loading -> apply."""

    @abstractmethod
    def create_weights(
        self,
        layer: nn.Module,
        input_size: int,
        output_sizes: Sequence[int],
        params_dtype: torch.dtype,
    ) -> None:
        """Register this format's parameters on ``layer`` (output_sizes: one per shard)."""

    def process_weights_after_loading(self, layer: nn.Module) -> None:  # noqa: B027
        """Convert checkpoint tensors into the kernel's layout (default: nothing to do)."""

    @abstractmethod
    def apply(
        self, layer: nn.Module, x: torch.Tensor, bias: torch.Tensor | None
    ) -> torch.Tensor:
        """y = x W^T (+ bias) for x [..., input_size]."""

    def shard(self, layer: nn.Module, spec: TPShard) -> None:
        """Keep ``spec``'s slice of this layer (tensor parallelism); see ``TPShard``."""
        raise ValueError(
            f"tensor parallelism is not supported with {type(self).__name__.removesuffix('LinearMethod')} "
            "weights yet; use tensor_parallel_size=1, or an AWQ, GPTQ, FP8, GGUF or NF4 checkpoint"
        )

    def slice_cuts(self, layer: nn.Module, spec: TPShard) -> dict[str, Cut] | None:
        """Build the layer as ``spec``'s slice (parallel/tp_quant_load.py): per parameter name,
        how a whole checkpoint tensor becomes the rank's part as it streams in. Called on the
        whole layer before ``create_weights``, which then gets the slice's sizes (the method
        may keep what its layout needs beyond them). None: the layer loads whole and ``shard``
        cuts it before repacking. Raises where ``shard`` would refuse the slice."""
        return None


def new_param(
    layer: nn.Module,
    name: str,
    data: torch.Tensor,
    *,
    output_dim: int | None = None,
    pack_factor: int = 1,
    loader: Any = None,
) -> nn.Parameter:
    """Register a frozen parameter with its sharding metadata and the generic shard loader."""
    p = nn.Parameter(data, requires_grad=False)
    p.output_dim = output_dim  # type: ignore[attr-defined]
    p.pack_factor = pack_factor  # type: ignore[attr-defined]
    p.weight_loader = loader or (  # type: ignore[attr-defined]
        lambda param, loaded, shard_id=None: load_shard(layer, name, param, loaded, shard_id)
    )
    layer.register_parameter(name, p)
    return p


def shard_slice(layer: nn.Module, shard_id: str | None) -> tuple[int, int] | None:
    """(offset, size) of a named shard in output units; None for a whole (fused) tensor."""
    if shard_id is None:
        return None
    ranges: dict[str, tuple[int, int]] = getattr(layer, "shard_ranges", None) or {}
    if shard_id not in ranges:
        known = ", ".join(ranges) or "none"
        raise ValueError(f"{type(layer).__name__} has no shard {shard_id!r} (shards: {known})")
    return ranges[shard_id]


def load_shard(
    layer: nn.Module,
    name: str,
    param: nn.Parameter,
    loaded: torch.Tensor,
    shard_id: str | None,
) -> None:
    """Copy ``loaded`` into its slice of ``param`` along the (possibly packed) output dim."""
    dst = param.data
    sl = shard_slice(layer, shard_id)
    out_dim = getattr(param, "output_dim", None)
    if sl is not None and out_dim is not None:
        offset, size = sl
        pf = getattr(param, "pack_factor", 1)
        if offset % pf or size % pf:
            raise ValueError(
                f"{name}: shard {shard_id!r} ({size} outputs at {offset}) is not a multiple of "
                f"the packing factor {pf}"
            )
        dst = dst.narrow(out_dim, offset // pf, size // pf)
    if tuple(dst.shape) != tuple(loaded.shape):
        where = f" shard {shard_id!r}" if shard_id else ""
        raise ValueError(
            f"shape mismatch for {name}{where}: checkpoint has {tuple(loaded.shape)}, "
            f"the layer expects {tuple(dst.shape)} (wrong bits or group size in "
            "quantization_config?)"
        )
    if loaded.dtype != dst.dtype and not (loaded.is_floating_point() and dst.is_floating_point()):
        raise ValueError(
            f"dtype mismatch for {name}: checkpoint has {loaded.dtype}, expected {dst.dtype}"
        )
    dst.copy_(loaded)
