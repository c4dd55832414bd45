"""Rotary position embedding (neox / rotate-half layout, as HF Llama and Qwen2 use).

Pairs are (i, i + rotary_dim/2) inside each head. The cos/sin table is precomputed for every
position up to max_position in float32 and then stored in the model dtype, which matches
HF's order of operations (angles in fp32, cast, then multiply) so logits agree bit-for-bit
in float32 and closely in bf16.

Rope scaling types built here: default, linear, llama3, freq_factors (per-frequency divisors
from GGUF), yarn and dynamic; LongRoPE (Phi-3) is layers/longrope.py.

YaRN (``rope_type: "yarn"``, Qwen2.5 / Qwen3 long-context configs) follows transformers 5's
``_compute_yarn_parameters``: each frequency is a blend of the interpolated one
(inv_freq / factor) and the original, by a linear ramp over the dimensions between the
correction range given by ``beta_fast`` (32) and ``beta_slow`` (1) rotations in
``original_max_position_embeddings`` (floored / ceiled unless ``truncate`` is false), and cos
and sin are multiplied by the attention factor (``attention_factor``, else from ``mscale`` /
``mscale_all_dim``, else 0.1 ln(factor) + 1). A missing ``factor`` is
max_position_embeddings / original_max_position_embeddings, as in transformers. YaRN does
not depend on the sequence length, so it matches HF at every length; the engine may run up
to max(max_position_embeddings, original * factor) tokens (vLLM's limit) and does by default.

Dynamic NTK (``rope_type: "dynamic"``): HF transformers keeps the plain frequencies while a
sequence fits max_position_embeddings and, past it, recomputes them each forward with the
base theta * (factor * L / max_pos - (factor - 1)) ** (d / (d - 2)) for the current length L
(keys already in its KV cache keep their old rotation). vLLM instead fixes the base for
L = max_pos * factor at every position. Here the rotation is also fixed per engine (prefix
caching, CUDA graphs and the Triton decode kernel's built-in rotary need one rotation per
position), but L is the engine's max_model_len: with max_model_len <= max_position_embeddings
(the default) the plain frequencies rotate every position, exactly as HF at those lengths; a
longer max_model_len (allowed up to max_pos * factor, where it equals vLLM's) scales the base
for that length at every position, which is HF's rotation for a sequence of exactly
max_model_len tokens, while shorter sequences (HF: a smaller or no base change) differ
slightly. That case is logged when the table is built.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from modelport.config import ModelConfig

logger = logging.getLogger(__name__)

# the rope scaling types compute_inv_freq builds (LongRoPE: layers/longrope.py)
ROPE_TYPES = ("default", "linear", "llama3", "freq_factors", "yarn", "dynamic")

# the types whose pretraining length sits in original_max_position_embeddings (HF's
# standardize_rope_params: a top-level key wins, else max_position_embeddings)
_WITH_ORIGINAL = ("llama3", "yarn", "longrope")


@dataclass(frozen=True)
class RopeSettings:
    theta: float
    scaling: dict[str, Any] | None
    max_position: int  # the model's max_position_embeddings
    # the engine's max_model_len (None: max_position): the table covers the larger of the
    # two, and dynamic NTK scales its base for it
    max_model_len: int | None = None

    @property
    def table_positions(self) -> int:
        return max(self.max_position, self.max_model_len or 0)


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
    if scaling is not None and scaling["rope_type"] in _WITH_ORIGINAL:
        # Phi-3 keeps its pretraining length at the top level, which wins (as in HF)
        orig = (config.hf_config.get("original_max_position_embeddings")
                or scaling.get("original_max_position_embeddings")
                or config.max_position_embeddings)
        scaling["original_max_position_embeddings"] = _positive_int(
            orig, f"rope {scaling['rope_type']} original_max_position_embeddings")
    return RopeSettings(theta, scaling, config.max_position_embeddings, config.max_model_len)


def _number(value: Any, what: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ValueError(f"{what} must be a number, got {value!r}")
    return float(value)


def _positive_int(value: Any, what: str) -> int:
    if _number(value, what) <= 0 or value != int(value):
        raise ValueError(f"{what} must be a positive integer, got {value!r}")
    return int(value)


@dataclass(frozen=True)
class YarnParams:
    factor: float
    original: int  # original_max_position_embeddings
    attention_factor: float
    beta_fast: float
    beta_slow: float
    truncate: bool


def _mscale(scale: float, mscale: float = 1.0) -> float:
    """YaRN's attention temperature 0.1 * mscale * ln(scale) + 1 (1 for scale <= 1)."""
    return 1.0 if scale <= 1 else 0.1 * mscale * math.log(scale) + 1.0


def yarn_params(s: dict[str, Any], max_position: int) -> YarnParams:
    """The YaRN parameters of a rope scaling dict, resolved and checked as transformers 5
    reads them (ValueError for a value it cannot use)."""
    orig = _positive_int(s.get("original_max_position_embeddings") or max_position,
                         "rope yarn original_max_position_embeddings")
    factor = s.get("factor")
    if factor is None:  # transformers: the ratio of the context lengths
        factor = max_position / orig
        if factor <= 1:
            raise ValueError(
                "rope yarn needs 'factor' (or an original_max_position_embeddings below "
                f"max_position_embeddings to derive it from; got {orig} and {max_position})")
    elif _number(factor, "rope yarn factor") <= 0:
        raise ValueError(f"rope yarn factor must be > 0, got {factor!r}")
    out: dict[str, float] = {}
    for key, default in (("beta_fast", 32), ("beta_slow", 1)):
        value = s.get(key)
        if value is not None:
            _number(value, f"rope yarn {key}")
        value = value or default  # transformers: 0 / null mean the default
        if value < 0:  # transformers' log of the rotations then fails
            raise ValueError(f"rope yarn {key} must be > 0, got {value!r}")
        out[key] = value
    attention = s.get("attention_factor")
    if attention is not None:
        attention = _number(attention, "rope yarn attention_factor")
    else:
        mscale, mscale_all = s.get("mscale"), s.get("mscale_all_dim")
        for key, value in (("mscale", mscale), ("mscale_all_dim", mscale_all)):
            if value is not None:
                _number(value, f"rope yarn {key}")
        if mscale and mscale_all:
            attention = float(_mscale(factor, mscale) / _mscale(factor, mscale_all))
        else:
            attention = _mscale(factor)
    return YarnParams(factor, orig, attention, out["beta_fast"], out["beta_slow"],
                      bool(s.get("truncate", True)))


def _factor(s: dict[str, Any], kind: str, long_name: str = "") -> float:
    """A scaling's ``factor``, checked (a number > 0); ``kind`` names the scaling."""
    factor = s.get("factor")
    if factor is None:
        raise ValueError(f"rope {long_name or kind} scaling needs 'factor'")
    if _number(factor, f"rope {kind} factor") <= 0:
        raise ValueError(f"rope {kind} factor must be > 0, got {factor!r}")
    return factor


def dynamic_factor(s: dict[str, Any]) -> float:
    return _factor(s, "dynamic", "dynamic (NTK)")


def linear_factor(s: dict[str, Any]) -> float:
    return float(_factor(s, "linear"))


def max_model_len_limit(config: ModelConfig) -> int:
    """The longest max_model_len the model's rotary serves: max_position_embeddings, or as
    vLLM allows, original_max_position_embeddings * factor for yarn and
    max_position_embeddings * factor for dynamic and linear when longer. Raises ValueError for a
    yarn / dynamic config that cannot be built."""
    max_pos = config.max_position_embeddings
    s = _own_scaling(config)
    if s is None:
        return max_pos
    if s["rope_type"] == "yarn":
        p = yarn_params(s, max_pos)
        return max(max_pos, int(p.original * p.factor))
    if s["rope_type"] == "dynamic":
        return max(max_pos, int(max_pos * dynamic_factor(s)))
    if s["rope_type"] == "linear":
        return max(max_pos, int(max_pos * linear_factor(s)))
    return max_pos


def default_max_model_len(config: ModelConfig) -> int:
    """max_model_len when none is given: max_position_embeddings; for yarn and linear, whose
    rotations do not depend on it, the longer length they reach (vLLM's default too). Dynamic
    NTK stays at max_position_embeddings, where it matches HF exactly (module docstring)."""
    s = _own_scaling(config)
    if s is not None and s["rope_type"] in ("yarn", "linear"):
        return max_model_len_limit(config)
    return config.max_position_embeddings


def _own_scaling(config: ModelConfig) -> dict[str, Any] | None:
    """rope_settings' scaling, None where it is not ours to extend: Phi-3's "su" / "yarn"
    mean LongRoPE (layers/longrope.py), which keeps max_position_embeddings; Gemma 3's
    max_position_embeddings already counts its scaling (its global layers' linear factor 8
    reaches 128k), as vLLM also assumes."""
    s = rope_settings(config).scaling
    if s is None or config.architecture.startswith("Gemma3") or (
            config.architecture == "Phi3ForCausalLM"
            and s["rope_type"] in ("su", "yarn", "longrope")):
        return None
    return s


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


def _exponents(rotary_dim: int) -> torch.Tensor:
    """2i / rotary_dim for each pair i, float32 (the exponent of theta)."""
    return torch.arange(0, rotary_dim, 2, dtype=torch.int64, device="cpu").float() / rotary_dim


def _yarn_inv_freq(rotary_dim: int, theta: float, p: YarnParams) -> torch.Tensor:
    """YaRN's blend of interpolated and original frequencies (transformers' order of
    operations, so the result is bit-identical)."""
    pos_freqs = theta ** _exponents(rotary_dim)
    extrapolated = 1.0 / pos_freqs
    interpolated = 1.0 / (p.factor * pos_freqs)

    def dim_of(rotations: float) -> float:  # the dimension that turns `rotations` times
        return (rotary_dim * math.log(p.original / (rotations * 2 * math.pi))
                / (2 * math.log(theta)))

    low, high = dim_of(p.beta_fast), dim_of(p.beta_slow)
    if p.truncate:
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, rotary_dim - 1)
    if low == high:
        high += 0.001  # no zero width
    dims = torch.arange(rotary_dim // 2, dtype=torch.float32, device="cpu")
    ramp = ((dims - low) / (high - low)).clamp(0, 1)
    keep = 1 - ramp  # 1: the original frequency, 0: the interpolated one
    return interpolated * (1 - keep) + extrapolated * keep


def _dynamic_inv_freq(rotary_dim: int, settings: RopeSettings) -> torch.Tensor:
    """Dynamic NTK at the engine's length (module docstring), as transformers computes it
    for that length: with Python numbers up to max_position_embeddings (its initial
    frequencies), with a tensor length past it (its per-forward recomputation)."""
    s = settings.scaling
    assert s is not None
    factor = dynamic_factor(s)
    if rotary_dim <= 2:
        raise ValueError(f"rope dynamic scaling needs a rotary dimension > 2, got {rotary_dim}")
    orig = settings.max_position
    length: int | torch.Tensor = orig
    if (settings.max_model_len or 0) > orig:
        length = torch.tensor(settings.max_model_len, dtype=torch.int64, device="cpu")
    base = settings.theta * (
        (factor * length / orig) - (factor - 1)) ** (rotary_dim / (rotary_dim - 2))
    return 1.0 / (base ** _exponents(rotary_dim))


def compute_inv_freq(rotary_dim: int, settings: RopeSettings) -> torch.Tensor:
    """Inverse frequencies (float32, on CPU) after any rope scaling."""
    s = settings.scaling
    kind = s["rope_type"] if s is not None else "default"
    if kind == "yarn":
        return _yarn_inv_freq(rotary_dim, settings.theta, yarn_params(s, settings.max_position))
    if kind == "dynamic":
        return _dynamic_inv_freq(rotary_dim, settings)
    inv_freq = 1.0 / (settings.theta ** _exponents(rotary_dim))
    if s is None:
        return inv_freq
    if kind == "llama3":
        return _llama3_inv_freq(inv_freq, s)
    if kind == "linear":
        return inv_freq / linear_factor(s)
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


def rope_attention_factor(settings: RopeSettings) -> float:
    """The factor cos and sin are multiplied by (YaRN's; 1 for the other types here)."""
    s = settings.scaling
    if s is not None and s["rope_type"] == "yarn":
        return yarn_params(s, settings.max_position).attention_factor
    return 1.0


def _log_choices(settings: RopeSettings) -> None:
    """Once per table: what a yarn / dynamic config makes of HF transformers' behaviour."""
    s = settings.scaling
    if s is not None and s["rope_type"] == "yarn":
        p = yarn_params(s, settings.max_position)
        if p.beta_fast < p.beta_slow:  # transformers warns and goes on: so do we
            logger.warning("rope yarn: beta_fast (%s) is below beta_slow (%s); the ramp "
                           "between them runs backwards (as in HF transformers)",
                           p.beta_fast, p.beta_slow)
    if s is None or s["rope_type"] != "dynamic":
        return
    orig, n = settings.max_position, settings.max_model_len or settings.max_position
    if n > orig:
        logger.warning(
            "dynamic NTK rope: max_model_len %d > max_position_embeddings %d, so every "
            "position is rotated with the base HF transformers uses for a %d-token sequence "
            "(fixed per engine, as vLLM fixes it for %d); output on shorter sequences may "
            "differ slightly from HF, which scales less or not at all there. Set "
            "max_model_len <= %d to match HF exactly.",
            n, orig, n, int(orig * float(s["factor"])), orig)
    else:
        logger.info("dynamic NTK rope: max_model_len %d <= max_position_embeddings %d: the "
                    "unscaled frequencies (as HF at these lengths)", n, orig)


class RotaryEmbedding(nn.Module):
    """Applies rotary embedding to flat q [T, H*D] and k [T, KH*D] given positions [T]."""

    def __init__(self, head_dim: int, settings: RopeSettings, rotary_dim: int | None = None):
        super().__init__()
        self.head_dim = head_dim
        self.rotary_dim = rotary_dim or head_dim
        inv_freq = compute_inv_freq(self.rotary_dim, settings)
        scale = rope_attention_factor(settings)  # YaRN scales cos and sin alike
        _log_choices(settings)
        pos = torch.arange(settings.table_positions, dtype=torch.int64, device="cpu").float()
        freqs = torch.outer(pos, inv_freq)
        cos, sin = freqs.cos(), freqs.sin()
        if scale != 1.0:
            cos, sin = cos * scale, sin * scale
        cache = torch.cat((cos, sin), dim=-1)  # [P, rotary_dim]
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
