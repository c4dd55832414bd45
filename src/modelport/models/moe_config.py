"""Mixture-of-experts settings read from an HF config, torch-free.

Shared by the MoE model files (what to build), the engine's argument check (which options an
MoE model refuses) and the planner (how many expert weights a layer holds), so the three
read the same keys the same way.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from modelport.config import ModelConfig

MOE_ARCHITECTURES = ("MixtralForCausalLM", "Qwen2MoeForCausalLM", "Qwen3MoeForCausalLM",
                     "OlmoeForCausalLM", "GraniteMoeForCausalLM")


@dataclass(frozen=True)
class MoeSpec:
    """The routed experts of one model (every sparse layer has the same shape)."""

    num_experts: int
    top_k: int
    expert_intermediate_size: int
    # renormalise the top-k probabilities to sum to 1 (Mixtral always; Qwen / OLMoE:
    # norm_topk_prob; GraniteMoE's softmax over the top-k logits is the same thing)
    renormalize: bool
    shared_intermediate_size: int  # Qwen2-MoE's always-on shared expert; 0 when absent
    sparse_layers: frozenset[int]  # the other layers have a dense MLP of intermediate_size

    def __post_init__(self) -> None:
        if self.num_experts <= 0 or self.expert_intermediate_size <= 0:
            raise ValueError(f"MoE config: num_experts ({self.num_experts}) and the expert "
                             f"intermediate size ({self.expert_intermediate_size}) must be > 0")
        if not 0 < self.top_k <= self.num_experts:
            raise ValueError(f"MoE config: num_experts_per_tok ({self.top_k}) must be in "
                             f"[1, num_experts={self.num_experts}]")


def _num_experts(d: dict[str, Any]) -> int:
    # Qwen checkpoints say num_experts; transformers 5 saves Qwen3-MoE's as num_local_experts
    return int(d.get("num_experts") or d.get("num_local_experts") or 0)


def moe_spec(config: ModelConfig) -> MoeSpec | None:
    """The model's experts, or None for a dense architecture. ValueError for settings the
    MoE models here do not implement (named, with what is supported)."""
    arch, d = config.architecture, config.hf_config
    if arch not in MOE_ARCHITECTURES:
        return None
    act = d.get("hidden_act", "silu")
    if act != "silu":
        raise ValueError(f"{arch}: hidden_act={act!r} is not supported (supported: 'silu')")
    layers = range(config.num_hidden_layers)
    if arch in ("MixtralForCausalLM", "GraniteMoeForCausalLM"):
        return MoeSpec(
            num_experts=int(d.get("num_local_experts", 8)),
            top_k=int(d.get("num_experts_per_tok", 2)),
            expert_intermediate_size=config.intermediate_size,
            renormalize=True,
            shared_intermediate_size=0,
            sparse_layers=frozenset(layers),
        )
    n = _num_experts(d)
    step = int(d.get("decoder_sparse_step", 1) or 1)
    dense_only = {int(i) for i in d.get("mlp_only_layers") or ()}
    sparse = frozenset(i for i in layers if n > 0 and i not in dense_only and (i + 1) % step == 0)
    if not sparse:
        raise ValueError(f"{arch}: no layer has experts (num_experts={n}, decoder_sparse_step="
                         f"{step}, mlp_only_layers={sorted(dense_only)}); load it as a dense "
                         "model instead")
    shared = int(d.get("shared_expert_intermediate_size", 0) or 0)
    return MoeSpec(
        num_experts=n,
        top_k=int(d.get("num_experts_per_tok", 2)),
        expert_intermediate_size=int(d.get("moe_intermediate_size") or config.intermediate_size),
        renormalize=bool(d.get("norm_topk_prob", False)),
        shared_intermediate_size=shared if arch == "Qwen2MoeForCausalLM" else 0,
        sparse_layers=sparse,
    )


def check_moe_options(
    config: ModelConfig,
    *,
    tensor_parallel_size: int = 1,
    # any format: quantized experts split (or, expert_parallel, share out) as float ones
    quantization: str | None = None,
    enable_lora: bool = False,
    expert_parallel: bool = False,
) -> None:
    """Refuse, before anything loads, the engine options the MoE models do not support."""
    spec = moe_spec(config)
    if spec is None:
        return
    arch = config.architecture
    why = moe_tp_refusal(config, tensor_parallel_size, expert_parallel)
    if why:
        raise ValueError(f"{arch}: {why}")
    if enable_lora:
        raise ValueError(f"{arch}: enable_lora is not supported for MoE models")


def moe_tp_refusal(config: ModelConfig, tp: int, expert_parallel: bool = False) -> str | None:
    """Why tensor parallel degree tp cannot split this MoE model's feed-forward layers, or
    None (the attention heads are checked as for every model). Each rank keeps an equal
    slice of every expert's intermediate channels, of the shared expert's and of the dense
    MLPs' (parallel/moe_parallel.py), so tp must divide each of those sizes; with
    ``expert_parallel`` a rank keeps whole experts, so tp must divide their number instead
    of their intermediate size."""
    spec = moe_spec(config)
    if spec is None or tp == 1:
        return None
    d = config.hf_config
    if expert_parallel:
        if spec.num_experts % tp:
            return (f"expert parallelism: tensor_parallel_size {tp} must divide the number of "
                    f"experts ({spec.num_experts}): each rank keeps an equal share of them")
        sizes = []
    else:
        expert_key = ("intermediate_size" if config.architecture in ("MixtralForCausalLM",
                                                                     "GraniteMoeForCausalLM")
                      or not d.get("moe_intermediate_size") else "moe_intermediate_size")
        sizes = [(expert_key, spec.expert_intermediate_size, "every expert's")]
    if spec.shared_intermediate_size:
        sizes.append(("shared_expert_intermediate_size", spec.shared_intermediate_size,
                      "the shared expert's"))
    if len(spec.sparse_layers) < config.num_hidden_layers:
        sizes.append(("intermediate_size", config.intermediate_size, "the dense MLP layers'"))
    bad = [f"{key}={n} ({whose} intermediate size)" for key, n, whose in sizes if n % tp]
    if not bad:
        return None
    return (f"tensor_parallel_size {tp} must divide {' and '.join(bad)}: each rank keeps an "
            "equal slice of the intermediate channels")


def moe_quant_tp_refusal(config: ModelConfig, tp: int, group_size: int | None,
                         method: str, expert_parallel: bool = False) -> str | None:
    """Why tp cannot split this MoE model's quantized intermediate channels, or None. A
    rank's input columns of every down projection (experts, shared expert, dense MLPs) must
    be whole quantization groups of ``group_size`` or lie inside one group, as for a dense
    quantized model (quantization/base.check_input_split); None group_size: per channel.
    ``expert_parallel``: the routed experts stay whole (a rank holds a share of them), so
    only the shared expert and the dense MLPs are split."""
    spec = moe_spec(config)
    if spec is None or tp == 1 or not group_size:
        return None
    sizes = [0 if expert_parallel else spec.expert_intermediate_size,
             spec.shared_intermediate_size]
    if len(spec.sparse_layers) < config.num_hidden_layers:
        sizes.append(config.intermediate_size)
    for n in sizes:
        part = n // tp
        if n and part % group_size and group_size % part:
            return (f"tensor_parallel_size {tp} splits {n} input columns of a down "
                    f"projection into {part} per rank, which is not a multiple of the "
                    f"{method} group size {group_size}; use a tensor_parallel_size that gives "
                    "each rank whole groups")
    return None


def moe_extra_params(config: ModelConfig) -> int:
    """What a model's experts add to the dense count of ``ModelConfig.num_params``: each
    sparse layer's dense MLP replaced by its router, every expert and the shared expert (with
    its one-row gate). 0 for a dense architecture."""
    spec = moe_spec(config)
    if spec is None:
        return 0
    h = config.hidden_size
    moe = h * spec.num_experts + spec.num_experts * 3 * h * spec.expert_intermediate_size
    if spec.shared_intermediate_size:
        moe += 3 * h * spec.shared_intermediate_size + h
    dense = 3 * h * config.intermediate_size
    return len(spec.sparse_layers) * (moe - dense)


def active_params(config: ModelConfig) -> int:
    """Parameters one token runs through (the planner's FLOPs): ``ModelConfig.num_params``
    less the experts a token does not visit (all but top-k of each sparse layer)."""
    spec = moe_spec(config)
    if spec is None:
        return config.num_params
    idle = (spec.num_experts - spec.top_k) * 3 * config.hidden_size * spec.expert_intermediate_size
    return config.num_params - len(spec.sparse_layers) * idle
