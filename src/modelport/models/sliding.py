"""Which layers attend through a sliding window, read from an HF config the way HF does.

Each function returns one entry per layer: the window (a query at position p sees keys at
positions > p - window) or None for full attention. A window that covers every position
the model can hold is returned as None, so such layers keep the plain attention kernels.
Bad values raise ValueError at load time, naming the option.
"""

from __future__ import annotations

from collections.abc import Callable

from modelport.config import ModelConfig

SLIDING, FULL = "sliding_attention", "full_attention"


def _window(config: ModelConfig) -> int | None:
    raw = config.hf_config.get("sliding_window")
    if raw is None:
        return None
    if isinstance(raw, bool) or not isinstance(raw, int) or raw < 1:
        raise ValueError(f"sliding_window must be a positive integer or null, got {raw!r}")
    return None if raw >= config.max_position_embeddings else raw


def layer_types(config: ModelConfig, default: Callable[[int], bool]) -> list[bool]:
    """Per layer, whether it is a sliding layer: config.json's ``layer_types`` when present,
    else ``default(layer_index)`` (the rule HF applies to configs without the list)."""
    n = config.num_hidden_layers
    types = config.hf_config.get("layer_types")
    if types is None:
        return [bool(default(i)) for i in range(n)]
    if not isinstance(types, list) or len(types) != n:
        raise ValueError(f"layer_types must list one entry per layer ({n}), got {types!r}")
    bad = sorted({t for t in types if t not in (SLIDING, FULL)}, key=str)
    if bad:
        raise ValueError(
            f"unsupported layer_types entries {bad}; supported: {SLIDING!r}, {FULL!r}"
        )
    return [t == SLIDING for t in types]


def windows(config: ModelConfig, sliding: list[bool]) -> list[int | None]:
    w = _window(config)
    return [w if s else None for s in sliding]


def mistral_windows(config: ModelConfig) -> list[int | None]:
    """Mistral: ``sliding_window`` on every layer (HF's Mistral ignores ``layer_types``)."""
    return [_window(config)] * config.num_hidden_layers


def qwen_windows(config: ModelConfig) -> list[int | None]:
    """Qwen2 / Qwen3: only with ``use_sliding_window``; then the layers from
    ``max_window_layers`` on slide (or as ``layer_types`` says)."""
    hf = config.hf_config
    if not hf.get("use_sliding_window"):
        return [None] * config.num_hidden_layers
    first = int(hf.get("max_window_layers", 28))
    return windows(config, layer_types(config, lambda i: i >= first))


def model_window(config: ModelConfig) -> int | None:
    """The sliding window some layer of the model attends through (None: every layer sees
    the whole sequence), by vLLM's rule: ``sliding_window`` unless ``use_sliding_window`` is
    false, or ``layer_types`` names no sliding layer. HF configs give one window for all the
    sliding layers, so this is also the smallest."""
    hf = config.hf_config
    if "use_sliding_window" in hf and not hf.get("use_sliding_window"):
        return None
    types = hf.get("layer_types")
    if isinstance(types, list) and SLIDING not in types:
        return None
    return _window(config)


def without_sliding_window(config: ModelConfig) -> ModelConfig:
    """The config with the window turned off on every layer (vLLM's disable_sliding_window:
    ``sliding_window`` null, and ``use_sliding_window`` false where the config has it); every
    model reads its windows from these keys (this module, models/moe.py)."""
    from dataclasses import replace

    hf = {**config.hf_config, "sliding_window": None}
    if "use_sliding_window" in hf:
        hf["use_sliding_window"] = False
    return replace(config, hf_config=hf)
