"""Tensor parallelism as a transformation of a built, loaded model (gpt-fast's approach).

Model files stay single-device code. After the full weights are loaded, each rank keeps
its slice: q/k/v and gate/up are split by output rows (heads / intermediate channels),
o_proj and down_proj by input columns with a sum over ranks (all-reduce) after them.
Embeddings, norms and the LM head stay replicated, so every rank holds whole hidden states
and rank 0 alone computes logits and samples.

Quantized layers shard through their LinearMethod (``quant_method.shard`` with a
``TPShard``): the method records the slice, and ``process_weights_after_loading`` cuts the
format's canonical weight before packing it for the kernel. So a quantized model must be
sharded between loading and repacking: ``load_model(..., transform=...)`` (what the runner
does) calls ``shard_model`` at that point; plain models may also be sharded after loading.

Mixture-of-experts blocks (router, stacked experts, shared expert) are split first, each as
one unit with a single all-reduce: parallel/moe_parallel.py.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn

from modelport.layers.attention import Attention
from modelport.layers.linear import Linear, MergedLinear, QKVLinear
from modelport.quantization.base import TPShard

COLUMN_PARALLEL = ("gate_up_proj",)  # plus every QKVLinear
ROW_PARALLEL = ("o_proj", "down_proj")


class AllReduceLinear(nn.Module):
    """A row-parallel slice of a linear layer: partial products summed across ranks."""

    def __init__(self, inner: Linear, rank: int) -> None:
        super().__init__()
        self.inner = inner
        self.bias = inner.bias if rank == 0 else None  # added once, by rank 0
        inner.bias = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.inner(x)
        if self.bias is not None:
            y = y + self.bias
        dist.all_reduce(y)
        return y


def _rows(ranges: list[tuple[int, int]], rank: int, size: int) -> torch.Tensor:
    """Row indices of this rank's share of each (offset, length) range."""
    idx = []
    for offset, length in ranges:
        part = length // size
        idx.append(torch.arange(offset + rank * part, offset + (rank + 1) * part))
    return torch.cat(idx)


def _take_rows(m: Linear, idx: torch.Tensor, rank: int, size: int) -> None:
    if m.quant_method is not None:
        ranges = dict(getattr(m, "shard_ranges", None) or {}) or None
        m.quant_method.shard(m, TPShard(0, idx, int(m.input_size), int(m.output_size), rank, size,
                                        ranges))
    else:
        m.weight = nn.Parameter(m.weight.data.index_select(0, idx.to(m.weight.device)).clone(),
                                requires_grad=False)
    if m.bias is not None:
        m.bias = nn.Parameter(m.bias.data.index_select(0, idx.to(m.bias.device)).clone(),
                              requires_grad=False)
    m.output_size = len(idx)


def _shard_qkv(m: QKVLinear, rank: int, size: int) -> None:
    d = m.head_dim
    _take_rows(m, _rows(_head_ranges(m), rank, size), rank, size)
    m.num_heads //= size
    m.num_kv_heads //= size
    m.q_size, m.kv_size = m.num_heads * d, m.num_kv_heads * d
    m.shard_ranges = {"q": (0, m.q_size), "k": (m.q_size, m.kv_size),
                      "v": (m.q_size + m.kv_size, m.kv_size)}


def _head_ranges(m: QKVLinear) -> list[tuple[int, int]]:
    return [(0, m.q_size), (m.q_size, m.kv_size), (m.q_size + m.kv_size, m.kv_size)]


def _shard_merged(m: MergedLinear, rank: int, size: int) -> None:
    names = list(m.shard_ranges)
    ranges = [m.shard_ranges[n] for n in names]
    _take_rows(m, _rows(ranges, rank, size), rank, size)
    offset = 0
    for n, (_, length) in zip(names, ranges):
        m.shard_ranges[n] = (offset, length // size)
        offset += length // size


def _shard_row(m: Linear, rank: int, size: int) -> None:
    part = m.input_size // size
    if m.quant_method is not None:
        idx = torch.arange(rank * part, (rank + 1) * part)
        m.quant_method.shard(m, TPShard(1, idx, int(m.input_size), int(m.output_size), rank, size))
    else:
        w = m.weight.data[:, rank * part : (rank + 1) * part].clone()
        m.weight = nn.Parameter(w, requires_grad=False)
    m.input_size = part


def shard_model(model: nn.Module, rank: int, size: int) -> None:
    """Keep rank's slice of every parallel layer, in place. Requires heads % size == 0
    (and, for mixture-of-experts blocks, intermediate sizes % size == 0: moe_parallel.py).

    Quantized layers only record their slice here (see the module docstring): call this
    before ``finish_loading``, e.g. through ``load_model(..., transform=...)``.
    """
    if size == 1:
        return
    from modelport.parallel.moe_parallel import shard_moe_blocks

    moe_blocks = shard_moe_blocks(model, rank, size)  # whole, with one all-reduce each
    replace: list[tuple[nn.Module, str, nn.Module]] = []
    for name, module in model.named_modules():
        if moe_blocks and name.startswith(moe_blocks):
            continue
        leaf = name.rsplit(".", 1)[-1]
        if isinstance(module, QKVLinear):
            if module.num_heads % size or module.num_kv_heads % size:
                raise ValueError(
                    f"tensor_parallel_size {size} must divide the attention heads "
                    f"({module.num_heads}) and KV heads ({module.num_kv_heads})"
                )
            _shard_qkv(module, rank, size)
        elif isinstance(module, MergedLinear) and leaf in COLUMN_PARALLEL:
            _shard_merged(module, rank, size)
        elif isinstance(module, Linear) and leaf in ROW_PARALLEL:
            _shard_row(module, rank, size)
            parent = model.get_submodule(name.rsplit(".", 1)[0]) if "." in name else model
            replace.append((parent, leaf, module))
        elif isinstance(module, Attention):
            module.num_heads //= size
            module.num_kv_heads //= size
    for parent, leaf, module in replace:
        setattr(parent, leaf, AllReduceLinear(module, rank))
