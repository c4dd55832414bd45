"""Build a tensor-parallel rank's quantized layers as its slice, cut as the checkpoint streams in.

Inside ``sharded_at_build(rank, size)`` a quantized load (``QuantPlan.load``) builds the model
with its linear weights on the meta device and hands ``quantize_linear_layers`` a
``RankSlices``. For every layer that ``shard_model`` cuts (q/k/v, gate_up, o, down, shared
experts: tp_load's ``_parallel_layers``; and each routed expert's gate_up / down once
``FusedMoE.unstack`` made them layers) the LinearMethod is asked for ``slice_cuts``, given the
rank's ``TPShard`` exactly as ``shard_model`` computes it for a whole layer. Where it gives
them:

- the layer takes its slice's shapes, head counts and ``shard_ranges`` from tp_load's
  ``_slice`` (the unquantized path's own code, on the meta weight), which also cuts a
  column-parallel bias as it loads, and is marked ``tp_shard = (rank, size)``, so
  ``shard_model`` leaves its weights alone;
- ``create_weights`` then allocates the format's tensors at the slice's sizes, and each
  tensor's ``weight_loader`` first cuts the whole checkpoint tensor (of a q/k/v or gate/up
  shard, or of the fused layer) to the rank's part, then loads that as usual.

So a rank holds its part of every quantized layer plus the one checkpoint tensor being read,
and the repacked result is the same, bit for bit, as loading the layer whole and cutting its
canonical form (tests/test_tp_quant_sharded_load.py). NF4 cuts its flat bytes and block absmax
(quantization/nf4.py). A method that cannot cut a layer as it streams (an AWQ / GPTQ row slice
inside one quantization group; act-order GPTQ likewise; output slices that split a packed word;
an NF4 column split of half a byte) returns None: that layer loads whole on every rank and
is cut before repacking, as before; the load logs how many layers took that path.
"""

from __future__ import annotations

import logging
from functools import partial

import torch
from torch import nn

from modelport.layers.fused_moe import FusedMoE
from modelport.layers.linear import Linear, QKVLinear
from modelport.parallel.tensor_parallel import _cols, _head_ranges, _rows, check_heads
from modelport.parallel.tp_load import _parallel_layers, _slice
from modelport.quantization.base import Cut, LinearMethod, TPShard

logger = logging.getLogger(__name__)


class RankSlices:
    """The layers of one model that a rank builds as its slice, and their loaders' cuts."""

    def __init__(self, rank: int, size: int) -> None:
        self.rank, self.size = rank, size
        self.kinds: dict[int, str] = {}  # id(layer) -> "column" / "row"
        self.whole: list[str] = []  # method names of layers left to load whole

    def mark(self, model: nn.Module) -> None:
        """Find the parallel layers (after ``prepare_quantization`` unstacked the experts)."""
        self.kinds = {id(m): kind for kind, m in _parallel_layers(model, self.size)}
        for moe in model.modules():
            # a rank's share of whole experts (expert parallelism) is not cut: loads whole
            if isinstance(moe, FusedMoE) and not moe.stacked and moe.expert_offset is None:
                for e in range(moe.num_experts):
                    mlp = moe.expert(e)
                    self.kinds[id(mlp.gate_up_proj)] = "column"
                    self.kinds[id(mlp.down_proj)] = "row"

    def prepare(self, layer: Linear, method: LinearMethod) -> dict[str, Cut] | None:
        """Before ``create_weights``: give the layer its slice's sizes and return the cuts of
        its checkpoint tensors, or None when it loads whole (not parallel, or the method
        cannot cut it at load)."""
        kind = self.kinds.get(id(layer))
        if kind is None:
            return None
        cuts = method.slice_cuts(layer, whole_spec(layer, kind, self.rank, self.size))
        if cuts is None:
            self.whole.append(type(method).__name__.removesuffix("LinearMethod"))
            return None
        _slice(kind, layer, self.rank, self.size)
        return cuts

    def wrap(self, layer: Linear, cuts: dict[str, Cut]) -> None:
        """After ``create_weights``: every cut parameter's loader takes a whole tensor."""
        for name, cut in cuts.items():
            param = layer._parameters[name]
            param.weight_loader = partial(_cut_then_load, param.weight_loader, cut)

    def report(self) -> None:
        if self.whole:
            logger.info("tensor-parallel rank %d: %d quantized layers (%s) cannot be cut as they "
                        "load (a slice inside one quantization group, an output split inside a "
                        "packed word, or a format without slice_cuts): they load whole and are "
                        "cut before repacking", self.rank, len(self.whole),
                        ", ".join(sorted(set(self.whole))))


def _cut_then_load(load: object, cut: Cut, param: nn.Parameter, loaded: torch.Tensor,
                   shard_id: str | None = None) -> None:
    load(param, cut(loaded, shard_id), shard_id)  # type: ignore[operator]


def whole_spec(m: Linear, kind: str, rank: int, size: int) -> TPShard:
    """The TPShard ``shard_model`` gives the whole layer m (tensor_parallel._take_rows /
    _shard_row): the same rows or columns, computed by the same functions."""
    k, n = int(m.input_size), int(m.output_size)
    if kind == "row":
        start, part = _cols(k, rank, size)
        return TPShard(1, torch.arange(start, start + part), k, n, rank, size)
    if isinstance(m, QKVLinear):
        check_heads(m, size)
        ranges = _head_ranges(m)
    else:
        ranges = list(m.shard_ranges.values())
    return TPShard(0, _rows(ranges, rank, size), k, n, rank, size, dict(m.shard_ranges))
