"""Fused mixture-of-experts layer: router -> softmax -> top-k -> SwiGLU experts -> weighted sum.

Expert weights are stacked, one tensor per projection for all experts: ``w13`` [E, 2I, H]
(rows [0, I) the gate projection, [I, 2I) the up projection, as a dense MLP's gate_up_proj)
and ``w2`` [E, H, I] (down). Stacked, one kernel launch serves every expert on the GPU, and
the checkpoint's per-expert tensors still load one by one through ``weight_loader`` with a
shard id ``"<expert>.<gate|up|down>"``.

On CPU (and as the reference) tokens are sorted by expert and each active expert runs one
matmul over its tokens. On CUDA the Triton grouped GEMM in layers/triton_moe.py runs over
expert-sorted, block-padded token lists; every shape there follows from the token count, so
the step is safe inside CUDA-graph capture.

Quantized checkpoints (AWQ, GPTQ, GGUF kept in its blocks, ...) store each expert as its own
linear layers; ``FusedMoE.unstack`` replaces the stacked weights by one ``ExpertMLP`` per
expert (a gate/up ``MergedLinear`` and a down ``Linear``), so the quantization pass gives each
of them the format's LinearMethod like any dense layer, and each active expert runs its two
low-bit kernels over its tokens. On CPU that per-expert loop is the path (it reads the token
counts on the host). On CUDA, which needs the grouped GEMM inside CUDA graphs, FP8, AWQ,
GPTQ and compressed-tensors experts still load per expert, then ``restack_experts`` (run by
``quantization.apply.finish_loading``) stacks their canonical forms into ``QuantExperts``
(layers/moe_quant.py) for the weight-only grouped kernels of layers/triton_moe_quant.py and
frees the per-expert layers.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from modelport.layers.activation import SiluAndMul
from modelport.layers.linear import Linear, MergedLinear, _check_shape
from modelport.layers.moe_quant import QuantExperts


class ExpertWeights(nn.Module):
    """One stacked projection of all experts, [E, out, in]; shards "<e>.<name>" load rows."""

    def __init__(self, num_experts: int, out_sizes: tuple[int, ...], names: tuple[str, ...],
                 in_size: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(num_experts, sum(out_sizes), in_size),
                                   requires_grad=False)
        rows: dict[str, tuple[int, int]] = {}
        offset = 0
        for name, size in zip(names, out_sizes):
            rows[name] = (offset, size)
            offset += size
        self._rows = rows
        # every shard the declared loader must see before the parameter counts as loaded
        self.shard_ranges = {f"{e}.{n}": rows[n] for e in range(num_experts) for n in names}

    def weight_loader(self, param: nn.Parameter, loaded: torch.Tensor,
                      shard_id: str | None = None) -> None:
        if shard_id is None:  # an already-stacked checkpoint tensor
            _check_shape("ExpertWeights", param, loaded)
            param.data.copy_(loaded)
            return
        if shard_id not in self.shard_ranges:
            raise ValueError(f"expert weights have no shard {shard_id!r} "
                             f"({param.shape[0]} experts, parts {', '.join(self._rows)})")
        expert, _ = shard_id.split(".", 1)
        offset, size = self.shard_ranges[shard_id]
        dst = param.data[int(expert)].narrow(0, offset, size)
        _check_shape(f"expert shard {shard_id!r}", dst, loaded)
        dst.copy_(loaded)


def route(router_logits: torch.Tensor, top_k: int, renormalize: bool
          ) -> tuple[torch.Tensor, torch.Tensor]:
    """(weights [T, k] float32, expert ids [T, k] int64) as HF computes them: softmax in
    float32 over all experts, top-k, then (renormalize) divided by the top-k sum."""
    probs = torch.softmax(router_logits.float(), dim=-1)
    weights, ids = torch.topk(probs, top_k, dim=-1)
    if renormalize:
        weights = weights / weights.sum(dim=-1, keepdim=True)
    return weights, ids


def moe_reference(x: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor,
                  weights: torch.Tensor, ids: torch.Tensor, elsewhere: bool = False
                  ) -> torch.Tensor:
    """sum_j weights[t, j] * expert_{ids[t, j]}(x[t]); one matmul pair per active expert
    (``elsewhere``: ids == E marks assignments to experts another rank holds)."""

    def expert(e: int, xs: torch.Tensor) -> torch.Tensor:
        gate, up = F.linear(xs, w13[e]).chunk(2, dim=-1)
        return F.linear(F.silu(gate) * up, w2[e])

    return grouped_experts(x, w13.shape[0], expert, weights, ids, elsewhere)


def grouped_experts(x: torch.Tensor, num_experts: int,
                    expert: Callable[[int, torch.Tensor], torch.Tensor],
                    weights: torch.Tensor, ids: torch.Tensor,
                    elsewhere: bool = False) -> torch.Tensor:
    """The routed sum with each active expert called once on all of its tokens:
    ``expert(e, xs [n, H]) -> [n, H]``. ``elsewhere`` (expert parallelism): id
    ``num_experts`` marks an assignment to an expert another rank holds; it adds zero here."""
    t, k = ids.shape

    def run(e: int, xs: torch.Tensor) -> torch.Tensor:
        if e == num_experts and elsewhere:
            return xs.new_zeros(xs.shape[0], x.shape[1])
        return expert(e, xs)

    if t == 1:  # one token (single-stream decode): its k experts in turn, the same sums
        ys = torch.cat([run(e, x) for e in ids[0].tolist()]).float()
        ys *= weights.reshape(-1, 1).float()
        return ys.view(1, k, -1).sum(dim=1).to(x.dtype)
    flat = ids.reshape(-1)
    order = torch.argsort(flat, stable=True)  # assignments grouped by expert
    counts = torch.bincount(flat, minlength=num_experts).tolist()
    token = order // k
    xs = x.index_select(0, token)
    ys = torch.empty(t * k, x.shape[1], dtype=torch.float32, device=x.device)
    start = 0
    for e, c in enumerate(counts):
        if c == 0:
            continue
        ys[start:start + c] = run(e, xs[start:start + c]).float()
        start += c
    ys *= weights.reshape(-1)[order].float().unsqueeze(1)
    per_assignment = torch.empty_like(ys)
    per_assignment[order] = ys  # back to (token, j) order: the k terms of a token side by side
    return per_assignment.view(t, k, -1).sum(dim=1).to(x.dtype)


class ExpertMLP(nn.Module):
    """One expert as its own linear layers (what a quantization method can take over)."""

    def __init__(self, hidden_size: int, intermediate_size: int) -> None:
        super().__init__()
        i = intermediate_size
        self.gate_up_proj = MergedLinear(hidden_size, (i, i), ("gate", "up"))
        self.down_proj = Linear(i, hidden_size)
        self.act = SiluAndMul()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(self.act(self.gate_up_proj(x)))


class FusedMoE(nn.Module):
    """The routed experts of one layer. ``forward(x [T, H]) -> [T, H]``."""

    def __init__(self, num_experts: int, top_k: int, hidden_size: int,
                 intermediate_size: int, renormalize: bool) -> None:
        super().__init__()
        self.num_experts, self.top_k, self.renormalize = num_experts, top_k, renormalize
        i = intermediate_size
        self.w13 = ExpertWeights(num_experts, (i, i), ("gate", "up"), hidden_size)
        self.w2 = ExpertWeights(num_experts, (hidden_size,), ("down",), i)
        self.stacked = True  # False once unstack() split the experts into ExpertMLPs
        self.restack_pending = False  # unstack(restack=True): restack_experts after loading
        self.quant_experts: QuantExperts | None = None  # the restacked quantized experts
        # expert parallelism (parallel/moe_parallel.py): this layer holds experts
        # [expert_offset, expert_offset + num_experts) of the router's global_experts
        self.expert_offset: int | None = None
        self.global_experts = num_experts

    def set_expert_range(self, first: int, total: int) -> None:
        """Hold experts [first, first + num_experts) of the router's ``total`` (expert
        parallelism); assignments to the others add nothing here."""
        if not 0 <= first <= total - self.num_experts:
            raise ValueError(f"experts [{first}, {first + self.num_experts}) are not within "
                             f"the router's {total}")
        self.expert_offset, self.global_experts = first, total

    def _own_assignments(self, weights: torch.Tensor, ids: torch.Tensor, elsewhere: int
                         ) -> tuple[torch.Tensor, torch.Tensor]:
        """Global expert ids -> this rank's local ids; another rank's experts get id
        ``elsewhere`` and weight 0 (the block's all-reduce adds their terms from there)."""
        assert self.expert_offset is not None
        local = ids - self.expert_offset
        own = (local >= 0) & (local < self.num_experts)
        return (torch.where(own, weights, torch.zeros_like(weights)),
                torch.where(own, local, torch.full_like(local, elsewhere)))

    def unstack(self, restack: bool = False) -> None:
        """Replace the stacked weights by one ExpertMLP per expert, named "0", "1", ... (the
        checkpoints' ``experts.<e>.<proj>``) for a quantization method to take over; a
        rank's share of the experts (expert parallelism) by their global ids,
        "<expert_offset>", ... (``expert``). ``restack``: after loading, stack them again
        (``restack_experts``; CUDA)."""
        if self.stacked is False:
            return
        e, two_i, h = self.w13.weight.shape
        del self.w13, self.w2
        first = self.expert_offset or 0
        for i in range(e):
            mlp = ExpertMLP(h, two_i // 2)
            if restack:  # the LinearMethods keep their canonical form instead of a kernel
                mlp.gate_up_proj.keep_for_stacking = True
                mlp.down_proj.keep_for_stacking = True
            self.add_module(str(first + i), mlp)
        self.stacked = False
        self.restack_pending = restack

    def expert(self, e: int) -> nn.Module:
        """Per-expert layers (``unstack``) of local expert e, the one routing's local id e
        picks: named by its global id (the checkpoint's), ``expert_offset + e`` under expert
        parallelism."""
        return self.get_submodule(str(e + (self.expert_offset or 0)))

    @torch.no_grad()
    def restack_experts(self) -> None:
        """After loading: finish each expert's layers, stack them into ``QuantExperts`` and
        free the per-expert modules (one layer's experts at a time, bounding peak memory)."""
        if not self.restack_pending:
            return
        layers = []
        for i in range(self.num_experts):
            mlp = self.expert(i)
            for lin in (mlp.gate_up_proj, mlp.down_proj):
                if getattr(lin, "quant_method", None) is None:
                    raise ValueError("quantized MoE experts on CUDA: an expert layer was left "
                                     "unquantized (modules_to_not_convert?); use --device cpu")
                lin.quant_method.process_weights_after_loading(lin)
            layers.append((mlp.gate_up_proj, mlp.down_proj))
        self.quant_experts = QuantExperts.from_layers(layers)
        del layers
        first = self.expert_offset or 0
        for i in range(self.num_experts):
            delattr(self, str(first + i))
        self.restack_pending = False

    def forward(self, x: torch.Tensor, router_logits: torch.Tensor) -> torch.Tensor:
        if x.is_cuda and self._few_tokens(x.shape[0]):  # decode: one launch for the routing
            from modelport.layers.triton_moe import route_topk

            weights, ids = route_topk(router_logits, self.top_k, self.renormalize)
        else:
            weights, ids = route(router_logits, self.top_k, self.renormalize)
        elsewhere = self.expert_offset is not None
        if elsewhere:  # another rank's assignments: id num_experts, weight 0, skipped
            weights, ids = self._own_assignments(weights, ids, self.num_experts)
        if self.quant_experts is not None:  # restacked FP8 / AWQ / GPTQ experts
            return self.quant_experts(x, weights, ids, elsewhere)
        if not self.stacked:
            if x.is_cuda:  # restacked on CUDA at load; a clear error if reached anyway
                raise RuntimeError("per-expert quantized MoE layers run on CPU only (on CUDA "
                                   "FP8 / AWQ / GPTQ experts are restacked at load)")
            return grouped_experts(x, self.num_experts, lambda e, xs: self.expert(e)(xs),
                                   weights, ids, elsewhere)
        if x.is_cuda:
            try:
                from modelport.layers.triton_moe import fused_experts
            except ImportError as e:
                raise RuntimeError(f"MoE layers on CUDA need triton ({e})") from e
            return fused_experts(x, self.w13.weight, self.w2.weight, weights, ids,
                                 elsewhere=elsewhere)
        return moe_reference(x, self.w13.weight, self.w2.weight, weights, ids, elsewhere)

    def _few_tokens(self, tokens: int) -> bool:
        """Whether the Triton few-token path (triton_moe.small_batch_experts and its FP8 /
        integer-code counterparts) serves this call: stacked float experts or restacked
        quantized ones, few enough (token, expert) assignments."""
        if not self.stacked and self.quant_experts is None:
            return False
        try:
            from modelport.layers.triton_moe import moe_gemv_applies
        except ImportError:
            return False
        integer = self.quant_experts is not None and self.quant_experts.kind != "fp8"
        return moe_gemv_applies(tokens, self.top_k, integer)

    def extra_repr(self) -> str:
        held = (f", holds [{self.expert_offset}, {self.expert_offset + self.num_experts}) of "
                f"{self.global_experts}" if self.expert_offset is not None else "")
        if self.quant_experts is not None:
            return f"experts={self.num_experts}, top_k={self.top_k}, restacked{held}"
        if not self.stacked:
            return f"experts={self.num_experts}, top_k={self.top_k}, per-expert layers{held}"
        e, two_i, h = self.w13.weight.shape
        return (f"experts={e}, top_k={self.top_k}, hidden={h}, intermediate={two_i // 2}, "
                f"renormalize={self.renormalize}{held}")


class GateLinear(Linear):
    """The router (E outputs) and the shared-expert gate (1 output): its own class so the
    CUDA swaps of exact Linear classes (Triton GEMV for decode) leave these tiny outputs on
    F.linear, and quantization leaves them in floats (checkpoints keep routers unquantized)."""

    keep_float = True


class SparseMoeBlock(nn.Module):
    """Router + experts (+ Qwen2-MoE's shared expert, scaled by a sigmoid gate)."""

    def __init__(self, hidden_size: int, experts: FusedMoE,
                 shared_expert: nn.Module | None = None) -> None:
        super().__init__()
        self.gate = GateLinear(hidden_size, experts.global_experts)
        self.experts = experts
        self.shared_expert = shared_expert
        self.shared_expert_gate = (GateLinear(hidden_size, 1) if shared_expert is not None
                                   else None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.experts(x, self.gate(x))
        if self.shared_expert is not None:
            out = out + torch.sigmoid(self.shared_expert_gate(x)) * self.shared_expert(x)
        return out
