"""Build a tensor-parallel rank's model with only its slice of the dense projections.

Inside ``sharded_at_build(rank, size)`` (the runner's load of a rank when
tensor_parallel_size > 1) ``build_for_rank`` builds the model with every ``Linear`` weight on
the meta device (no memory), then, for each layer that ``shard_model`` would cut:

- column-parallel (every QKVLinear, gate_up_proj): runs shard_model's own ``_shard_qkv`` /
  ``_shard_merged`` on the meta weights, which sets the slice's shapes, head counts and
  ``shard_ranges`` exactly as cutting a loaded layer does; the rows each rank keeps are
  ``_rows`` of the same ranges, so there is one definition of a rank's slice;
- row-parallel (o_proj, down_proj): ``_shard_row`` likewise, columns from ``_cols``;
- shared experts of mixture-of-experts blocks: their gate_up / down projections as above
  (the block's single all-reduce is added later by ``shard_moe_blocks``).

Every other meta parameter (LM head, router, ...) is then allocated whole on the device;
the sliced ones at their slice's size, each with a ``weight_loader`` that cuts an incoming
checkpoint tensor (per q/k/v or gate/up shard, or an already-fused tensor) to the rank's rows
or columns before copying. So a rank holds its slice of these weights plus the one checkpoint
tensor being read. The layers are marked ``tp_shard = (rank, size)``; ``shard_model`` (the
load's transform) then leaves their weights alone and only wraps the row-parallel layers in
``AllReduceLinear`` and divides the attention heads, giving the same model as loading whole
and cutting. Dummy weights (load_format="dummy") fill the slice-sized parameters directly
(random values, identical replicated weights on every rank, not the slices of a TP=1 model).

Quantized models do not come here (``load_model`` hands them to their quantization plan): their
layers are built as the rank's slice by parallel/tp_quant_load.py, reusing ``_slice`` and
``_materialize`` from here.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial

import torch
from torch import nn

from modelport.layers.fused_moe import SparseMoeBlock
from modelport.layers.linear import PARAMS_ON_META, Linear, MergedLinear, QKVLinear, _check_shape
from modelport.parallel.moe_parallel import _BUILD_SHARD, _check_divides
from modelport.parallel.tensor_parallel import (
    _cols,
    _head_ranges,
    _rows,
    _shard_merged,
    _shard_qkv,
    _shard_row,
    check_heads,
    parallel_kind,
)


def build_for_rank(build: Callable[[], nn.Module], device: torch.device) -> nn.Module:
    """``build()`` as is outside ``sharded_at_build`` (or with one rank); inside, the
    model with this rank's slice of every parallel linear layer (module docstring).
    Call under the load's default dtype / device."""
    shard = _BUILD_SHARD.get()
    if shard is None or shard[1] == 1:
        return build()
    rank, size = shard
    token = PARAMS_ON_META.set(True)
    try:
        model = build()
    finally:
        PARAMS_ON_META.reset(token)
    if not any(getattr(m, "quant_method", None) is not None for m in model.modules()):
        for kind, m in _parallel_layers(model, size):
            _slice(kind, m, rank, size)
    _materialize(model, torch.device(device))
    return model


def _parallel_layers(model: nn.Module, size: int) -> list[tuple[str, Linear]]:
    """(kind, layer) for each linear layer shard_model (or shard_moe_blocks) cuts."""
    blocks = [(n, m) for n, m in model.named_modules() if isinstance(m, SparseMoeBlock)]
    inside = tuple(f"{n}." for n, _ in blocks)
    found: list[tuple[str, Linear]] = []
    for name, block in blocks:
        mlp = block.shared_expert
        if mlp is None:
            continue
        gate_up, down = getattr(mlp, "gate_up_proj", None), getattr(mlp, "down_proj", None)
        if isinstance(gate_up, MergedLinear) and type(down) is Linear:  # else shard_model refuses
            _check_divides(f"shared expert intermediate size of {name}.shared_expert",
                           down.input_size, size)
            found += [("column", gate_up), ("row", down)]
    for name, m in model.named_modules():
        if inside and name.startswith(inside):
            continue
        kind = parallel_kind(name, m)
        if kind is not None:
            found.append((kind, m))
    return found


def _slice(kind: str, m: Linear, rank: int, size: int) -> None:
    """Give meta-weight layer m this rank's shapes and a loader that cuts what it is given."""
    if kind == "row":
        full = (int(m.output_size), int(m.input_size))
        start, part = _cols(m.input_size, rank, size)
        _shard_row(m, rank, size)
        m.weight.weight_loader = partial(_load_columns, full, start, part)
    else:
        if isinstance(m, QKVLinear):
            check_heads(m, size)
            ranges = dict(zip(("q", "k", "v"), _head_ranges(m)))
            _shard_qkv(m, rank, size)
        else:
            ranges = dict(m.shard_ranges)
            _shard_merged(m, rank, size)
        src = {n: _rows([(0, length)], rank, size) for n, (_, length) in ranges.items()}
        fused = _rows(list(ranges.values()), rank, size)
        lengths = {n: length for n, (_, length) in ranges.items()}
        loader = partial(_load_rows, lengths, src, fused, dict(m.shard_ranges),
                         sum(lengths.values()))
        m.weight.weight_loader = loader
        if m.bias is not None:
            m.bias.weight_loader = loader
    m.tp_shard = (rank, size)


def _materialize(model: nn.Module, device: torch.device) -> None:
    """Allocate every meta parameter on device (uninitialised, as Linear's own), keeping its
    attributes (weight loaders) and any sharing between modules."""
    done: dict[int, nn.Parameter] = {}
    for module in model.modules():
        for name, p in list(module._parameters.items()):
            if p is None or p.device.type != "meta":
                continue
            new = done.get(id(p))
            if new is None:
                new = nn.Parameter(torch.empty(p.shape, dtype=p.dtype, device=device),
                                   requires_grad=p.requires_grad)
                new.__dict__.update(p.__dict__)
                done[id(p)] = new
            module._parameters[name] = new


def _take(t: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """Rows idx of t: a view when they are consecutive (they are, per shard)."""
    n = len(idx)
    if n and int(idx[-1]) - int(idx[0]) == n - 1:
        return t.narrow(0, int(idx[0]), n)
    return t.index_select(0, idx.to(t.device))


def _load_rows(lengths: dict[str, int], src: dict[str, torch.Tensor], fused: torch.Tensor,
               dst: dict[str, tuple[int, int]], total: int, param: nn.Parameter,
               loaded: torch.Tensor, shard_id: str | None = None) -> None:
    """A column-parallel weight or bias: this rank's rows of a q/k/v or gate/up shard (or of
    the already-fused tensor) copied into its place. Holds no reference to the layer."""
    if shard_id is None:
        if loaded.shape[0] != total:
            _check_shape("tensor-parallel fused projection", param.new_empty(
                (total, *param.shape[1:]), device="meta"), loaded)
        part = _take(loaded, fused)
        _check_shape("tensor-parallel fused projection slice", param, part)
        param.data.copy_(part)
        return
    if shard_id not in src:
        raise ValueError(f"tensor-parallel projection has no shard {shard_id!r} "
                         f"(shards: {', '.join(src)})")
    offset, size = dst[shard_id]
    target = param.data.narrow(0, offset, size)
    if loaded.shape[0] != lengths[shard_id]:
        _check_shape(f"shard {shard_id!r}", target.new_empty(
            (lengths[shard_id], *target.shape[1:]), device="meta"), loaded)
    part = _take(loaded, src[shard_id])
    _check_shape(f"tensor-parallel shard {shard_id!r} slice", target, part)
    target.copy_(part)


def _load_columns(full: tuple[int, int], start: int, part: int, param: nn.Parameter,
                  loaded: torch.Tensor, shard_id: str | None = None) -> None:
    """A row-parallel weight: this rank's input columns of the checkpoint's [out, in]."""
    if shard_id is not None:
        raise ValueError(f"Linear has no shard {shard_id!r}")
    _check_shape("tensor-parallel row projection", torch.empty(full, device="meta"), loaded)
    param.data.copy_(loaded[:, start:start + part])
