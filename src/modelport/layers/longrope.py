"""LongRoPE (Phi-3 / Phi-3.5 / Phi-4-mini ``rope_scaling.type == "longrope"``).

Two sets of per-frequency divisors: ``short_factor`` for contexts up to
``original_max_position_embeddings`` and ``long_factor`` beyond it, and one attention
factor that scales cos and sin alike (sqrt(1 + ln(factor) / ln(original)) unless given).

The set is chosen once per engine, as vLLM does: the long factors rotate every position
when the engine's max_model_len exceeds the original length, the short factors otherwise.
HF transformers instead picks the set per forward by the sequence length and recomputes its
cache when a sequence grows past the original length; a static choice gives the same
rotation to a token wherever it is computed, so prefix-cached blocks stay valid, the table
is looked up by raw position (the Triton decode kernel's built-in rotary, CUDA graphs) and no
request is ever recomputed. The price: with max_model_len > original, short prompts are
rotated with the long factors (HF would use the short ones), which is logged once per model.
So HF's logits are matched exactly with max_model_len <= original (short factors) and, with a
larger max_model_len, for sequences longer than the original length (long factors in HF too).
"""

from __future__ import annotations

import dataclasses
import logging
import math
from collections.abc import Sequence

import torch

from modelport.config import ModelConfig
from modelport.layers.rotary import RopeSettings, RotaryEmbedding, rope_settings

logger = logging.getLogger(__name__)


def longrope_attention_factor(s: dict, max_position: int) -> float:
    orig = int(s["original_max_position_embeddings"])
    factor = s.get("factor")
    if factor is None:  # Phi-3 stretches max_position_embeddings instead of giving factor
        factor = max_position / orig
    given = s.get("attention_factor")
    if given is not None:
        return float(given)
    if factor <= 1.0:
        return 1.0
    return math.sqrt(1 + math.log(factor) / math.log(orig))


def _table(theta: float, ext: Sequence[float], rotary_dim: int, positions: int,
           scale: float) -> torch.Tensor:
    """[P, rotary_dim] = [cos | sin] * scale in float32, in HF's order of operations."""
    ext_t = torch.tensor([float(f) for f in ext], dtype=torch.float32, device="cpu")
    shape = torch.arange(0, rotary_dim, 2, dtype=torch.int64, device="cpu").float() / rotary_dim
    inv_freq = 1.0 / (ext_t * theta**shape)
    pos = torch.arange(positions, dtype=torch.int64, device="cpu").float()
    freqs = torch.outer(pos, inv_freq)
    return torch.cat((freqs.cos() * scale, freqs.sin() * scale), dim=-1)


def uses_long_factors(settings: RopeSettings, max_model_len: int) -> bool:
    return max_model_len > int(settings.scaling["original_max_position_embeddings"])


def longrope_rotary(head_dim: int, settings: RopeSettings, rotary_dim: int,
                    max_model_len: int) -> RotaryEmbedding:
    """A plain RotaryEmbedding whose table holds the chosen LongRoPE factors (scaled by the
    attention factor): every kernel that reads cos_sin_cache by position works unchanged,
    and the fused-op swaps, which match the exact class, still apply."""
    s = settings.scaling
    assert s is not None and s["rope_type"] == "longrope"
    for key in ("short_factor", "long_factor"):
        f = s.get(key)
        if not isinstance(f, (list, tuple)) or len(f) != rotary_dim // 2:
            raise ValueError(
                f"rope_scaling.{key} must be a list of {rotary_dim // 2} numbers "
                f"(rotary dim {rotary_dim} / 2) for longrope, got "
                f"{len(f) if isinstance(f, (list, tuple)) else f!r}"
            )
    orig = int(s["original_max_position_embeddings"])
    long = uses_long_factors(settings, max_model_len)
    if long:
        logger.warning(
            "LongRoPE: max_model_len %d > original_max_position_embeddings %d, so the long "
            "factors rotate every position (as vLLM does); output on prompts shorter than %d "
            "tokens may differ slightly from HF transformers, which uses the short factors "
            "there. Set max_model_len <= %d to use the short factors.",
            max_model_len, orig, orig, orig)
    table = _table(settings.theta, s["long_factor" if long else "short_factor"], rotary_dim,
                   settings.max_position, longrope_attention_factor(s, settings.max_position))
    rotary = RotaryEmbedding(head_dim, RopeSettings(settings.theta, None, settings.max_position),
                             rotary_dim)
    rotary.cos_sin_cache = table.to(rotary.cos_sin_cache)  # same device and dtype
    return rotary


def longrope_settings(config: ModelConfig) -> RopeSettings:
    """rope_settings, where Phi-3's old type names "su" and "yarn" mean longrope (as HF's
    Phi3Config reads them)."""
    settings = rope_settings(config)
    s = settings.scaling
    if config.architecture == "Phi3ForCausalLM" and s is not None and s["rope_type"] in (
            "su", "yarn"):
        orig = (config.hf_config.get("original_max_position_embeddings")
                or s.get("original_max_position_embeddings") or settings.max_position)
        s = {**s, "rope_type": "longrope", "original_max_position_embeddings": int(orig)}
        settings = dataclasses.replace(settings, scaling=s)
    return settings
