"""Tensor parallelism for the mixture-of-experts blocks of models/moe.py (Mixtral, Qwen2-MoE,
Qwen3-MoE), applied by ``shard_model`` before it shards the dense layers.

Every expert is split as a dense MLP is: rank r of n keeps rows [r*I/n, (r+1)*I/n) of both the
gate half and the up half of the stacked ``w13`` (so each rank's w13 is again [gate | up],
[E, 2I/n, H], the layout the CPU reference and the Triton kernel read) and the same columns of
``w2`` ([E, H, I/n]). Each rank then runs all E experts on its slice for the tokens routed to
them and holds a partial sum of the block's output. The router and Qwen2-MoE's shared-expert
gate stay replicated (every rank routes identically, from identical hidden states).

The shared expert is split like a dense MLP, but its down projection is not all-reduced on
its own: its partial output is scaled by the replicated sigmoid gate (a per-token scalar, so
the scaling commutes with the sum over ranks) and added to the experts' partial output, and
the block all-reduces once.

Experts are most of an MoE model's bytes (Mixtral-8x7B: 45 of 47B parameters), so a rank
must not hold all of them even while loading: inside ``sharded_at_build(rank, size)``
(the runner's load of a tensor-parallel rank) models/moe.py builds each FusedMoE with this
rank's slice only (``experts_for_rank``) and the slice's loaders cut every checkpoint tensor
as it streams in. Attention and the shared expert are built as the rank's slice too
(parallel/tp_load.py); embeddings, norms and the router stay whole (replicated).

Expert parallelism (``enable_expert_parallel``, vLLM's ``--enable-expert-parallel``) splits the
experts instead: rank r of n keeps experts [r*E/n, (r+1)*E/n) whole (``FusedMoE.expert_offset``),
so n must divide E rather than the expert intermediate size. Every rank still routes every
token over all E experts (the replicated router); assignments to another rank's experts
weigh nothing here, and the block's one all-reduce sums each token's k terms from the ranks
that hold them. Attention, the dense MLPs and the shared expert stay split as above. Each
expert's weights are read by one rank only, where tensor parallelism has every rank read a
slice of every active expert: fewer, larger matrix products a rank.

Quantized experts (a GGUF file kept in its blocks, AWQ / GPTQ / FP8 checkpoints) are per-expert
layers (``FusedMoE.unstack``), built as this rank's slice like the dense quantized layers
(parallel/tp_quant_load.py): each expert's gate_up rows and down columns, codes, group scales
and zeros cut as each checkpoint tensor streams in. An expert layer its format cannot cut at
load loads whole and ``shard_experts`` records its slice through its LinearMethod
(``TPShard``), cut before repacking, or, on CUDA, before ``restack_experts`` stacks them.
With expert parallelism nothing of an expert is cut: a rank builds per-expert layers for its
share only, named by their global ids (the checkpoint's ``experts.<e>``, so every format's
per-layer lookups and loaders apply unchanged). The other ranks' experts' checkpoint
tensors are never read from an HF folder (``other_ranks_experts``, the safetensors reader's
skip); ``own_expert_weights`` drops them from other streams (GGUF) before they reach a
layer. ``FusedMoE.expert`` maps routing's local ids to those layers (on CPU), and on CUDA
``restack_experts`` stacks the rank's experts in local order, act-order GPTQ included (each
expert's groups are whole).
"""

from __future__ import annotations

import contextlib
import contextvars
import re
from collections.abc import Callable, Iterable, Iterator
from functools import partial

import torch
import torch.distributed as dist
from torch import nn

from modelport.layers.fused_moe import ExpertWeights, FusedMoE, SparseMoeBlock
from modelport.layers.linear import Linear, MergedLinear
from modelport.parallel.tensor_parallel import _shard_merged, _shard_row, _sliced

# (rank, size) while a tensor-parallel rank builds and loads its model; None otherwise
_BUILD_SHARD: contextvars.ContextVar[tuple[int, int] | None] = contextvars.ContextVar(
    "moe_build_shard", default=None)
# whether that rank keeps whole experts (expert parallelism) instead of slices of all
_BUILD_EXPERT_PARALLEL: contextvars.ContextVar[bool] = contextvars.ContextVar(
    "moe_build_expert_parallel", default=False)

# a checkpoint tensor of one routed expert: (the FusedMoE's module name, the expert's id)
_EXPERT_TENSOR = re.compile(r"^(.+\.experts)\.(\d+)\.")


@contextlib.contextmanager
def sharded_at_build(rank: int, size: int, expert_parallel: bool = False) -> Iterator[None]:
    """Layers built (and loaded) inside hold only this rank's slice: MoE experts here (whole
    experts, a 1/size share of them, with ``expert_parallel``), the dense q/k/v, gate_up, o
    and down layers in parallel/tp_load.py."""
    if _BUILD_SHARD.get() is not None:
        raise RuntimeError("sharded_at_build does not nest")
    token = _BUILD_SHARD.set((rank, size))
    ep_token = _BUILD_EXPERT_PARALLEL.set(expert_parallel)
    try:
        yield
    finally:
        _BUILD_EXPERT_PARALLEL.reset(ep_token)
        _BUILD_SHARD.reset(token)


def experts_for_rank(num_experts: int, top_k: int, hidden_size: int, intermediate_size: int,
                     renormalize: bool) -> FusedMoE:
    """A FusedMoE as the model declares it; inside ``sharded_at_build`` one that
    holds (and loads) only this rank's intermediate channels."""
    shard = _BUILD_SHARD.get()
    if shard is None or shard[1] == 1:
        return FusedMoE(num_experts, top_k, hidden_size, intermediate_size, renormalize)
    rank, size = shard
    if _BUILD_EXPERT_PARALLEL.get():
        _check_experts_divide(num_experts, size)
        local = num_experts // size
        moe = FusedMoE(local, top_k, hidden_size, intermediate_size, renormalize)
        moe.ep_shard = (rank, size)
        moe.set_expert_range(rank * local, num_experts)
        for w in (moe.w13, moe.w2):
            w.weight.weight_loader = partial(_load_own_experts, w, rank * local, local)
            # the checkpoint's shard ids of this rank's experts (global numbering): the
            # declared loader counts the parameter loaded once these arrived
            w.expected_shards = {f"{int(e) + rank * local}.{part}"
                                 for e, part in (k.split(".", 1) for k in w.shard_ranges)}
        return moe
    _check_divides("expert intermediate size", intermediate_size, size)
    part = intermediate_size // size
    moe = FusedMoE(num_experts, top_k, hidden_size, part, renormalize)
    moe.tp_shard = (rank, size)  # shard_experts leaves it as it is
    moe.tp_whole_intermediate = intermediate_size  # a quantized load takes it whole again
    moe.w13.weight.weight_loader = partial(_load_w13_slice, moe.w13, rank, part)
    moe.w2.weight.weight_loader = partial(_load_w2_slice, moe.w2, rank, part)
    return moe


def whole_experts_for_quantization(experts: FusedMoE) -> None:
    """Give experts built as a rank's slice (``experts_for_rank``) their whole size again,
    before ``FusedMoE.unstack`` makes the per-expert layers of a quantized load (a GGUF file
    kept in its blocks, an AWQ / GPTQ / FP8 checkpoint): the per-expert layers start whole
    and parallel/tp_quant_load.py builds each as the rank's slice of it (the dense quantized
    layers' way). The stacked weights are only placeholders here (on meta: ``unstack`` reads
    their shapes and drops them). A rank's share of whole experts (expert parallelism) stays
    as built: ``unstack`` makes layers for those experts only."""
    built = getattr(experts, "tp_shard", None)
    if built is None:
        return
    whole = experts.tp_whole_intermediate
    e, _, h = experts.w13.weight.shape
    with torch.device("meta"):
        experts.w13 = ExpertWeights(e, (whole, whole), ("gate", "up"), h)
        experts.w2 = ExpertWeights(e, (h,), ("down",), whole)
    del experts.tp_shard


def _load_w13_slice(w: ExpertWeights, rank: int, part: int, param: nn.Parameter,
                    loaded: torch.Tensor, shard_id: str | None = None) -> None:
    """Rows [rank*part, (rank+1)*part) of a gate or up projection ([I, H], or stacked
    [E, 2I, H] as [gate; up])."""
    lo = rank * part
    if shard_id is None:
        inter = loaded.shape[1] // 2
        loaded = torch.cat([loaded[:, lo:lo + part], loaded[:, inter + lo:inter + lo + part]], 1)
    else:
        loaded = loaded[lo:lo + part]
    w.weight_loader(param, loaded, shard_id)


def _load_own_experts(w: ExpertWeights, first: int, count: int, param: nn.Parameter,
                      loaded: torch.Tensor, shard_id: str | None = None) -> None:
    """Experts [first, first + count) of a checkpoint: a stacked [E, ...] tensor's rows, or
    one expert's projection ("<e>.<part>") renumbered to its local index; other ranks'
    experts are skipped."""
    if shard_id is None:
        w.weight_loader(param, loaded[first:first + count], None)
        return
    expert, part = shard_id.split(".", 1)
    local = int(expert) - first
    if 0 <= local < count:
        w.weight_loader(param, loaded, f"{local}.{part}")


def other_ranks_experts(model: nn.Module) -> Callable[[str], bool] | None:
    """For a model built for expert parallelism, a test that a checkpoint tensor belongs to
    another rank's expert (``<layer>.experts.<e>.<proj>...`` with e outside this rank's
    share), so the weight stream can pass it by unread; None without such a share."""
    shares = {name: (m.expert_offset, m.expert_offset + m.num_experts)
              for name, m in model.named_modules()
              if isinstance(m, FusedMoE) and m.expert_offset is not None}
    if not shares:
        return None

    def other(name: str) -> bool:
        m = _EXPERT_TENSOR.match(name)
        share = shares.get(m.group(1)) if m is not None else None
        return share is not None and not share[0] <= int(m.group(2)) < share[1]

    return other


def own_expert_weights(model: nn.Module, weights: Iterable[tuple[str, torch.Tensor]]
                       ) -> Iterator[tuple[str, torch.Tensor]]:
    """The checkpoint stream without the per-expert tensors of experts another rank holds
    (expert parallelism; ``other_ranks_experts``). The safetensors reader already skips
    them unread for float checkpoints; quantized loads and GGUF streams drop them here."""
    other = other_ranks_experts(model)
    if other is None:
        yield from weights
        return
    for name, tensor in weights:
        if not other(name):
            yield name, tensor


def _load_w2_slice(w: ExpertWeights, rank: int, part: int, param: nn.Parameter,
                   loaded: torch.Tensor, shard_id: str | None = None) -> None:
    """Input columns [rank*part, (rank+1)*part) of a down projection ([H, I] or [E, H, I])."""
    w.weight_loader(param, loaded[..., rank * part:(rank + 1) * part], shard_id)


class AllReduceMoeBlock(nn.Module):
    """A sharded SparseMoeBlock: the ranks' partial outputs summed by one all-reduce."""

    def __init__(self, block: SparseMoeBlock) -> None:
        super().__init__()
        self.block = block

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.block(x)
        dist.all_reduce(y)
        return y


def _refuse_restacked(name: str, experts: FusedMoE) -> None:
    """Stacked float weights split by rows / columns, per-expert (quantized) layers through
    their LinearMethods; experts already restacked for CUDA (``QuantExperts``) are past the
    point where a slice can be recorded."""
    if experts.quant_experts is not None:
        raise ValueError(f"{name}: shard quantized MoE experts before they are restacked "
                         "(load_model(..., transform=...) shards between loading and repacking)")
    if experts.stacked:
        for part in ("w13", "w2"):
            w = getattr(experts, part, None)
            weight = getattr(w, "weight", None)
            if (type(w) is not ExpertWeights or not isinstance(weight, torch.Tensor)
                    or not weight.is_floating_point() or weight.dim() != 3):
                raise ValueError(f"{name}: stacked experts of {type(weight).__name__} cannot be "
                                 "split for tensor parallelism (float [E, out, in] expected)")


def _check_experts_divide(num_experts: int, tp: int) -> None:
    if num_experts % tp:
        raise ValueError(f"expert parallelism: tensor_parallel_size {tp} must divide the number "
                         f"of experts ({num_experts}): each rank keeps an equal share of them")


def _check_divides(what: str, size: int, tp: int) -> None:
    if size % tp:
        raise ValueError(f"tensor_parallel_size {tp} must divide the {what} ({size}): each rank "
                         "keeps an equal slice of it")


def _keep_rows(w: ExpertWeights, idx: torch.Tensor, ranges: dict[str, tuple[int, int]]) -> None:
    data = w.weight.data.index_select(1, idx.to(w.weight.device)).contiguous()
    w.weight = nn.Parameter(data, requires_grad=False)
    w.shard_ranges = {k: ranges[k.split(".", 1)[1]] for k in w.shard_ranges}
    w._rows = ranges


def _keep_columns(w: ExpertWeights, start: int, length: int) -> None:
    data = w.weight.data[:, :, start:start + length].contiguous()
    w.weight = nn.Parameter(data, requires_grad=False)


def shard_experts(name: str, experts: FusedMoE, rank: int, size: int,
                  expert_parallel: bool = False) -> None:
    """Keep rank's slice of every expert's intermediate channels (``expert_parallel``: rank's
    share of the experts, whole), in place (experts built by ``experts_for_rank`` hold it
    already)."""
    _refuse_restacked(name, experts)
    if expert_parallel:
        _keep_own_experts(name, experts, rank, size)
        return
    if getattr(experts, "ep_shard", None) is not None:
        raise RuntimeError(f"{name}: experts built for expert parallelism, sharded without it")
    if not experts.stacked:
        _shard_expert_layers(name, experts, rank, size)
        return
    if _built_for(name, experts, "tp_shard", rank, size):
        return
    e, two_i, h = experts.w13.weight.shape
    inter = two_i // 2
    _check_divides(f"expert intermediate size of {name}", inter, size)
    part = inter // size
    own = torch.arange(rank * part, (rank + 1) * part)
    _keep_rows(experts.w13, torch.cat([own, own + inter]),
               {"gate": (0, part), "up": (part, part)})
    _keep_columns(experts.w2, rank * part, part)


def _built_for(name: str, experts: FusedMoE, attr: str, rank: int, size: int) -> bool:
    """Whether ``experts_for_rank`` built them as this rank's part already (``attr``:
    "tp_shard" for slices, "ep_shard" for a share); another rank's part is an error."""
    built = getattr(experts, attr, None)
    if built is not None and built != (rank, size):
        raise RuntimeError(f"{name}: experts built for rank {built[0]} of {built[1]}, "
                           f"sharded for rank {rank} of {size}")
    return built is not None


def _keep_own_experts(name: str, experts: FusedMoE, rank: int, size: int) -> None:
    if _built_for(name, experts, "ep_shard", rank, size):
        return
    if getattr(experts, "tp_shard", None) is not None:
        raise RuntimeError(f"{name}: experts built as tensor-parallel slices, sharded for "
                           "expert parallelism")
    total = experts.num_experts
    _check_experts_divide(total, size)
    local = total // size
    first = rank * local
    if not experts.stacked:  # per-expert (quantized) layers, named by global id: keep ours
        for e in range(total):
            if not first <= e < first + local:
                delattr(experts, str(e))
    else:
        for w in (experts.w13, experts.w2):
            data = w.weight.data[first:first + local].contiguous()
            w.weight = nn.Parameter(data, requires_grad=False)
            w.shard_ranges = {k: v for k, v in w.shard_ranges.items()
                              if int(k.split(".", 1)[0]) < local}
    experts.num_experts = local
    experts.ep_shard = (rank, size)
    experts.set_expert_range(first, total)


def _shard_expert_layers(name: str, experts: FusedMoE, rank: int, size: int) -> None:
    """Per-expert layers (``FusedMoE.unstack``; quantized): each expert's gate_up split by
    rows (this rank's gate rows, then the same up rows) and its down by input columns, as a
    dense MLP's, through the quantized-linear sharding (``TPShard``) of tensor_parallel.py; no
    per-layer all-reduce (the block adds one). On CUDA ``restack_experts`` then stacks the
    rank's slices, each cut from its canonical form as it finishes loading."""
    for e in range(experts.num_experts):
        mlp = experts.expert(e)
        if not _sliced(mlp.down_proj, rank, size):
            _check_divides(f"expert intermediate size of {name}", int(mlp.down_proj.input_size),
                           size)
        _shard_merged(mlp.gate_up_proj, rank, size)
        _shard_row(mlp.down_proj, rank, size)


def _shard_shared_expert(name: str, mlp: nn.Module, rank: int, size: int) -> None:
    """A dense SwiGLU MLP split column / row, without the row layer's all-reduce."""
    gate_up, down = getattr(mlp, "gate_up_proj", None), getattr(mlp, "down_proj", None)
    if not isinstance(gate_up, MergedLinear) or type(down) is not Linear:
        raise ValueError(f"{name}: the shared expert ({type(mlp).__name__}) cannot be split "
                         "for tensor parallelism (a gate_up_proj + down_proj MLP is expected)")
    if not _sliced(down, rank, size):  # else built as this rank's slice (tp_load.py)
        _check_divides(f"shared expert intermediate size of {name}", down.input_size, size)
    _shard_merged(gate_up, rank, size)
    _shard_row(down, rank, size)
    if down.bias is not None and rank != 0:
        down.bias = None  # added once, by rank 0, before the block's all-reduce


def shard_moe_blocks(model: nn.Module, rank: int, size: int,
                     expert_parallel: bool = False) -> tuple[str, ...]:
    """Shard every SparseMoeBlock of model and wrap it in an AllReduceMoeBlock, in place
    (``expert_parallel``: each rank keeps whole experts, a 1/size share of them).

    Returns the blocks' module names with a trailing dot: ``shard_model`` leaves the modules
    under them alone (the shared expert's down projection must not all-reduce by itself).
    """
    blocks = [(n, m) for n, m in model.named_modules() if isinstance(m, SparseMoeBlock)]
    for name, block in blocks:
        shard_experts(name, block.experts, rank, size, expert_parallel)
        if block.shared_expert is not None:
            _shard_shared_expert(f"{name}.shared_expert", block.shared_expert, rank, size)
        parent_name, _, leaf = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, leaf, AllReduceMoeBlock(block))
    return tuple(f"{n}." for n, _ in blocks)
