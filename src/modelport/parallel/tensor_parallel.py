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

A rank never holds a whole unquantized model: the runner builds it inside
``sharded_at_build`` and ``load_model`` then gives every q/k/v, gate_up, o and down
projection (shared experts included) only this rank's slice, computed by the functions
below, with weight loaders that cut each checkpoint tensor as it streams in
(parallel/tp_load.py). ``shard_model`` leaves those layers' weights alone (``tp_shard`` marks
them) and only wraps the row-parallel ones. Quantized layers are built as the rank's slice
too, their loaders cutting each packed checkpoint tensor (parallel/tp_quant_load.py); the
few a format cannot cut at load (an AWQ / GPTQ row slice inside one quantization group) load whole
and are cut here, through ``quant_method.shard``, before repacking.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn

from modelport.layers.attention import Attention
from modelport.layers.linear import Linear, MergedLinear, QKVLinear
from modelport.quantization.base import TPShard

# plus every QKVLinear; c_fc / c_proj: StarCoder2's GeLU MLP (models/starcoder2.py)
COLUMN_PARALLEL = ("gate_up_proj", "c_fc")
ROW_PARALLEL = ("o_proj", "down_proj", "c_proj")


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


def _sliced(m: Linear, rank: int, size: int) -> bool:
    """Whether m was built as rank's slice already (parallel/tp_load.py)."""
    built = getattr(m, "tp_shard", None)
    if built is not None and built != (rank, size):
        raise RuntimeError(f"{type(m).__name__} built for rank {built[0]} of {built[1]}, "
                           f"sharded for rank {rank} of {size}")
    return built is not None


def _cols(input_size: int, rank: int, size: int) -> tuple[int, int]:
    """(start, length) of this rank's input columns of a row-parallel layer."""
    part = input_size // size
    return rank * part, part


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
    m.tp_split = ("column", rank, size)
    if _sliced(m, rank, size):
        return
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
    m.tp_split = ("column", rank, size)
    if _sliced(m, rank, size):
        return
    names = list(m.shard_ranges)
    ranges = [m.shard_ranges[n] for n in names]
    _take_rows(m, _rows(ranges, rank, size), rank, size)
    offset = 0
    for n, (_, length) in zip(names, ranges):
        m.shard_ranges[n] = (offset, length // size)
        offset += length // size


def _shard_row(m: Linear, rank: int, size: int) -> None:
    m.tp_split = ("row", rank, size)
    if _sliced(m, rank, size):
        return
    start, part = _cols(m.input_size, rank, size)
    if m.quant_method is not None:
        idx = torch.arange(start, start + part)
        m.quant_method.shard(m, TPShard(1, idx, int(m.input_size), int(m.output_size), rank, size))
    else:
        w = m.weight.data[:, start : start + part]
        # a rank's own load slices meta weights: their clone() runs torch's Python reference
        # implementation, whose first use imports sympy (~0.4 s of every rank's start-up)
        m.weight = nn.Parameter(w.contiguous() if w.is_meta else w.clone(), requires_grad=False)
    m.input_size = part


def full_shape(m: Linear) -> tuple[int, int, dict[str, tuple[int, int]] | None]:
    """(output size, input size, shard ranges) of the whole layer that m is this rank's
    slice of (m itself when it is not split): what a LoRA adapter for the model is shaped
    by. Column slices hold 1/size of every shard range, row slices 1/size of the input."""
    ranges = dict(getattr(m, "shard_ranges", None) or {}) or None
    kind, _, size = getattr(m, "tp_split", (None, 0, 1))
    if kind == "column":
        ranges = {k: (o * size, n * size) for k, (o, n) in (ranges or {}).items()} or None
        return m.output_size * size, m.input_size, ranges
    if kind == "row":
        return m.output_size, m.input_size * size, ranges
    return m.output_size, m.input_size, ranges


def lora_slice(m: Linear, a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """This rank's part of a LoRA pair (A [r, in], B [out, r]) for the whole layer.

    Column slices keep B's rows of this rank's outputs (``x @ A.T`` is whole on every
    rank). Row slices keep A's columns of this rank's inputs: each rank adds
    ``(x_rank @ A_rank.T) @ B.T`` to its partial product, and the all-reduce after the
    layer sums them to ``(x @ A.T) @ B.T``."""
    kind, rank, size = getattr(m, "tp_split", (None, 0, 1))
    if kind == "column":
        out, _, ranges = full_shape(m)
        spans = list(ranges.values()) if ranges else [(0, out)]
        return a, b.index_select(0, _rows(spans, rank, size))
    if kind == "row":
        start, part = _cols(a.shape[1], rank, size)
        return a[:, start : start + part], b
    return a, b


def parallel_kind(name: str, module: nn.Module) -> str | None:
    """How a module outside mixture-of-experts blocks is split: "column" (q/k/v, gate_up:
    output rows), "row" (o, down: input columns) or None (replicated)."""
    leaf = name.rsplit(".", 1)[-1]
    if isinstance(module, QKVLinear) or (isinstance(module, MergedLinear)
                                         and leaf in COLUMN_PARALLEL):
        return "column"
    if isinstance(module, Linear) and leaf in ROW_PARALLEL:
        return "row"
    return None


def check_heads(m: QKVLinear, size: int) -> None:
    if m.num_heads % size or m.num_kv_heads % size:
        raise ValueError(
            f"tensor_parallel_size {size} must divide the attention heads "
            f"({m.num_heads}) and KV heads ({m.num_kv_heads})"
        )


def shard_model(model: nn.Module, rank: int, size: int, expert_parallel: bool = False) -> None:
    """Keep rank's slice of every parallel layer, in place. Requires heads % size == 0
    (and, for mixture-of-experts blocks, intermediate sizes % size == 0: moe_parallel.py).

    Quantized layers only record their slice here (see the module docstring): call this
    before ``finish_loading``, e.g. through ``load_model(..., transform=...)``.
    """
    if size == 1:
        return
    from modelport.parallel.moe_parallel import shard_moe_blocks

    # whole, with one all-reduce each; expert_parallel: a share of whole experts a rank
    moe_blocks = shard_moe_blocks(model, rank, size, expert_parallel)
    replace: list[tuple[nn.Module, str, nn.Module]] = []
    for name, module in model.named_modules():
        if moe_blocks and name.startswith(moe_blocks):
            continue
        leaf = name.rsplit(".", 1)[-1]
        kind = parallel_kind(name, module)
        if isinstance(module, QKVLinear):
            if not _sliced(module, rank, size):
                check_heads(module, size)
            _shard_qkv(module, rank, size)
        elif kind == "column":
            _shard_merged(module, rank, size)
        elif kind == "row":
            _shard_row(module, rank, size)
            parent = model.get_submodule(name.rsplit(".", 1)[0]) if "." in name else model
            replace.append((parent, leaf, module))
        elif isinstance(module, Attention):
            module.num_heads //= size
            module.num_kv_heads //= size
    for parent, leaf, module in replace:
        setattr(parent, leaf, AllReduceLinear(module, rank))
