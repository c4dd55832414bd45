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


def valid_tp_degrees(model: ModelConfig) -> list[int]:
    """Every degree that divides both the attention heads and the KV heads (MoE: and the
    expert, shared-expert and dense intermediate sizes)."""
    g = math.gcd(model.num_attention_heads, model.num_key_value_heads)
    return [d for d in range(1, g + 1) if g % d == 0 and moe_tp_refusal(model, d) is None]


def tp_refusal(model: ModelConfig, tp: int) -> str | None:
    """Why tp is not a valid degree for model, or None when it is."""
    bad = [
        f"{n} {what}"
        for what, n in (
            ("attention heads", model.num_attention_heads),
            ("KV heads", model.num_key_value_heads),
        )
        if n % tp
    ]
    moe = None if bad else moe_tp_refusal(model, tp)
    if not bad and not moe:
        return None
    valid = ", ".join(map(str, valid_tp_degrees(model)))
    if moe:
        return f"{model.architecture} (mixture of experts): {moe}; valid degrees: {valid}"
    return (
        f"tensor parallel degree {tp} does not divide the model's {' and '.join(bad)} "
        f"(each rank must own whole heads); valid degrees: {valid}"
    )


def resolve_parallelism(model: ModelConfig, num_gpus: int, tp: int | None) -> tuple[int, int]:
    """(tp, data-parallel replicas); tp defaults to all GPUs in one replica."""
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
    why = tp_refusal(model, degree)
    if why:
        raise PlanError(flag, why)
    return degree, num_gpus // degree
