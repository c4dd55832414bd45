"""Rotary position embedding (neox / rotate-half layout, as HF Llama and Qwen2 use).

Pairs are (i, i + rotary_dim/2) inside each head. The cos/sin table is precomputed for every
position up to max_position in float32 and then stored in the model dtype, which matches
HF's order of operations (angles in fp32, cast, then multiply) so logits agree bit-for-bit
in float32 and closely in bf16.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from modelport.config import ModelConfig

# the rope scaling types compute_inv_freq builds (LongRoPE: layers/longrope.py)
ROPE_TYPES = ("default", "linear", "llama3", "freq_factors")


@dataclass(frozen=True)
class RopeSettings:
    theta: float
    scaling: dict[str, Any] | None
    max_position: int


def rope_settings(config: ModelConfig) -> RopeSettings:
    """Rope parameters of a model, accepting both config styles.

    transformers >= 5 writes ``rope_parameters`` (theta inside it) instead of ``rope_theta``
    plus ``rope_scaling``; older configs and GGUF-derived configs use the latter.
    """
    params = config.hf_config.get("rope_parameters")
    if isinstance(params, dict) and params:
        theta = float(params.get("rope_theta", config.rope_theta))
        scaling = {k: v for k, v in params.items() if k != "rope_theta"}
    else:
        theta = config.rope_theta
        scaling = dict(config.rope_scaling) if config.rope_scaling else None
    if scaling is not None:
        kind = scaling.get("rope_type", scaling.get("type", "default"))
        scaling = None if kind == "default" else {**scaling, "rope_type": kind}
    if scaling is not None and scaling["rope_type"] == "longrope":
        # Phi-3 keeps its pretraining length at the top level, which wins (as in HF)
        orig = (config.hf_config.get("original_max_position_embeddings")
                or scaling.get("original_max_position_embeddings")
                or config.max_position_embeddings)
        scaling["original_max_position_embeddings"] = int(orig)
    return RopeSettings(theta, scaling, config.max_position_embeddings)


def _llama3_inv_freq(inv_freq: torch.Tensor, s: dict[str, Any]) -> torch.Tensor:
    """Llama 3.1 frequency-dependent scaling.

    Long wavelengths (beyond the original context / low_freq_factor) are slowed down by
    ``factor``; short ones (below original context / high_freq_factor) are kept; in between
    the two are blended linearly in 1/wavelength.
    """
    factor = float(s["factor"])
    low, high = float(s["low_freq_factor"]), float(s["high_freq_factor"])
    orig = float(s["original_max_position_embeddings"])
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > orig / low, inv_freq / factor, inv_freq)
    blend = (orig / wavelen - low) / (high - low)
    blended = (1 - blend) * scaled / factor + blend * scaled
    in_band = (wavelen >= orig / high) & (wavelen <= orig / low)
    return torch.where(in_band, blended, scaled)


def compute_inv_freq(rotary_dim: int, settings: RopeSettings) -> torch.Tensor:
    """Inverse frequencies (float32, on CPU) after any rope scaling."""
    inv_freq = 1.0 / (
        settings.theta
        ** (torch.arange(0, rotary_dim, 2, dtype=torch.int64, device="cpu").float() / rotary_dim)
    )
    s = settings.scaling
    if s is None:
        return inv_freq
    kind = s["rope_type"]
    if kind == "llama3":
        return _llama3_inv_freq(inv_freq, s)
    if kind == "linear":
        return inv_freq / float(s["factor"])
    if kind == "freq_factors":  # explicit per-frequency divisors (Llama 3.1 GGUF files)
        factors = torch.tensor(s["factors"], dtype=torch.float32, device="cpu")
        if factors.shape != inv_freq.shape:
            raise ValueError(
                f"rope freq_factors has {factors.numel()} entries, expected {inv_freq.numel()}"
            )
        return inv_freq / factors
    raise ValueError(
        f"unsupported rope scaling type {kind!r}; supported: {', '.join(ROPE_TYPES)}"
    )


class RotaryEmbedding(nn.Module):
    """Applies rotary embedding to flat q [T, H*D] and k [T, KH*D] given positions [T]."""

    def __init__(self, head_dim: int, settings: RopeSettings, rotary_dim: int | None = None):
        super().__init__()
        self.head_dim = head_dim
        self.rotary_dim = rotary_dim or head_dim
        inv_freq = compute_inv_freq(self.rotary_dim, settings)
        pos = torch.arange(settings.max_position, dtype=torch.int64, device="cpu").float()
        freqs = torch.outer(pos, inv_freq)
        cache = torch.cat((freqs.cos(), freqs.sin()), dim=-1)  # [P, rotary_dim]
        device = torch.empty(0).device  # honours an enclosing `with torch.device(...)`
        self.register_buffer(
            "cos_sin_cache",
            cache.to(device=device, dtype=torch.get_default_dtype()),
            persistent=False,
        )
        self._last_cos_sin: tuple | None = None  # rotate_joint's cos/sin of the last positions

    def _rotate(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        t = x.shape[0]
        x = x.view(t, -1, self.head_dim)
        rot, rest = x[..., : self.rotary_dim], x[..., self.rotary_dim :]
        x1, x2 = rot.chunk(2, dim=-1)
        # (x1, x2) -> (x1 cos - x2 sin, x2 cos + x1 sin), i.e. x*cos + rotate_half(x)*sin
        out = torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)
        if rest.shape[-1]:
            out = torch.cat((out, rest), dim=-1)
        return out.reshape(t, -1)

    def rotate_joint(self, positions: torch.Tensor, qk: torch.Tensor) -> torch.Tensor:
        """forward() on q and k side by side ([T, (H + KH) * D], e.g. a slice of the fused
        qkv output): one rotation instead of two, the same values (elementwise ops)."""
        # every layer of a forward passes the same positions tensor: cos/sin once per forward
        # (the model calls forget_positions() as a forward starts; the tensor is kept, so
        # `is` cannot match a new one)
        last = self._last_cos_sin
        if last is not None and last[0] is positions and last[1] == qk.dtype:
            cos, sin = last[2]
        else:
            cos_sin = self.cos_sin_cache.index_select(0, positions)
            cos, sin = cos_sin.to(qk.dtype).unsqueeze(1).chunk(2, dim=-1)
            self._last_cos_sin = (positions, qk.dtype, (cos, sin))
        return self._rotate(qk, cos, sin)

    def forget_positions(self) -> None:
        """Drop rotate_joint's cos/sin of the previous forward (positions may change in place
        between forwards)."""
        self._last_cos_sin = None

    def forward(
        self, positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        cos_sin = self.cos_sin_cache.index_select(0, positions)
        cos, sin = cos_sin.to(q.dtype).unsqueeze(1).chunk(2, dim=-1)  # [T, 1, rotary_dim/2]
        return self._rotate(q, cos, sin), self._rotate(k, cos, sin)
