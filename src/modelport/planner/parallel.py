"""Tensor-parallel degree checks: a rank must own whole attention heads and whole KV heads
(and, in a mixture-of-experts model, an equal slice of each expert's intermediate channels).

The engine (EngineArgs.create_engine_config) applies the same rule, so a degree the planner
accepts is one the engine will accept.
"""

from __future__ import annotations

import math

from modelport.config import ModelConfig
from modelport.models.moe_config import moe_tp_refusal
from modelport.planner.errors import PlanError


def valid_tp_degrees(model: ModelConfig, expert_parallel: bool = False) -> list[int]:
    """Every degree that divides both the attention heads and the KV heads (MoE: and the
    expert, shared-expert and dense intermediate sizes; with ``expert_parallel`` the number
    of experts instead of their intermediate size)."""
    g = math.gcd(model.num_attention_heads, model.num_key_value_heads)
    return [d for d in range(1, g + 1)
            if g % d == 0 and moe_tp_refusal(model, d, expert_parallel) is None]


def tp_refusal(model: ModelConfig, tp: int, expert_parallel: bool = False) -> str | None:
    """Why tp is not a valid degree for model, or None when it is."""
    bad = [
        f"{n} {what}"
        for what, n in (
            ("attention heads", model.num_attention_heads),
            ("KV heads", model.num_key_value_heads),
        )
        if n % tp
    ]
    moe = None if bad else moe_tp_refusal(model, tp, expert_parallel)
    if not bad and not moe:
        return None
    valid = ", ".join(map(str, valid_tp_degrees(model, expert_parallel)))
    if moe:
        return f"{model.architecture} (mixture of experts): {moe}; valid degrees: {valid}"
    return (
        f"tensor parallel degree {tp} does not divide the model's {' and '.join(bad)} "
        f"(each rank must own whole heads); valid degrees: {valid}"
    )


def resolve_parallelism(model: ModelConfig, num_gpus: int, tp: int | None,
                        expert_parallel: bool = False) -> tuple[int, int]:
    """(tp, data-parallel replicas); tp defaults to all GPUs in one replica. With
    ``expert_parallel`` the experts are shared out over one replica's ranks, so the engine
    takes no data-parallel replicas beside it."""
    if num_gpus < 1:
        raise PlanError("--num-gpus", f"must be >= 1, got {num_gpus}")
    flag = "--tensor-parallel-size" if tp is not None else "--num-gpus"
    degree = num_gpus if tp is None else tp
    if degree < 1:
        raise PlanError(flag, f"must be >= 1, got {degree}")
    if degree > num_gpus:
        raise PlanError(
            flag,
            f"tensor parallel degree {degree} needs more than the {num_gpus} GPU(s) of --num-gpus",
        )
    why = tp_refusal(model, degree, expert_parallel)
    if why:
        raise PlanError(flag, why)
    if expert_parallel and num_gpus // degree > 1:
        raise PlanError("--enable-expert-parallel", f"{num_gpus // degree} data-parallel "
                        "replicas: the engine shares experts out over one replica's "
                        "tensor-parallel ranks only; leave --tensor-parallel-size at "
                        "--num-gpus, or drop --enable-expert-parallel")
    return degree, num_gpus // degree
