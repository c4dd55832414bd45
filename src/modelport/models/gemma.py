"""Gemma, Gemma 2 and Gemma 3 (text-only) decoders.

All three: RMSNorm scaled by (1 + weight) in float32, a GeLU(tanh)-gated MLP, embeddings
multiplied by sqrt(hidden_size) rounded to the model dtype, head_dim from the config and
the LM head tied to the embedding.

Gemma 2 adds a norm after attention and a pair around the MLP, the attention scale
``query_pre_attn_scalar ** -0.5``, tanh soft-capping of attention scores
(``attn_logit_softcapping``) and of the final logits (``final_logit_softcapping``), and a
sliding window on every other layer (``layer_types``). Gemma 3 adds RMSNorms over each
head's q and k, a window on five layers of six (``sliding_window_pattern``), its own rope
base for the windowed layers (``rope_local_base_freq``) and rope scaling on the global ones;
like HF's Gemma 3 it applies no attention soft-cap.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from modelport.config import UNREAD_PREFIXES, ModelConfig
from modelport.layers.attention import Attention
from modelport.layers.embedding import VocabEmbedding
from modelport.layers.layernorm import ResidualNorm
from modelport.layers.linear import Linear, QKVLinear
from modelport.layers.rotary import RopeSettings, RotaryEmbedding, rope_settings
from modelport.models.llama import LlamaForCausalLM, LlamaMLP, attention_block
from modelport.models.sliding import layer_types, windows


class GemmaRMSNorm(ResidualNorm):
    """x / rms(x) * (1 + weight), all in float32 and cast once at the end (HF Gemma's
    rounding; Llama's RMSNorm casts before the weight). Same call as layers' RMSNorm:
    ``forward(x, residual)`` returns ``(norm(x + residual), x + residual)``."""

    def __init__(self, hidden_size: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.empty(hidden_size), requires_grad=False)

    def _norm(self, x: torch.Tensor) -> torch.Tensor:
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return (xf * (1.0 + self.weight.float())).to(x.dtype)



class GeluAndMul(nn.Module):
    """gelu(gate) * up over a fused [gate | up] projection ("tanh" or "none" GeLU)."""

    def __init__(self, approximate: str) -> None:
        super().__init__()
        self.approximate = approximate

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = x.chunk(2, dim=-1)
        return F.gelu(gate, approximate=self.approximate) * up


# HF activation name -> F.gelu's approximate= (Gemma 1's legacy "gelu" means tanh: its HF
# config rewrites it; Gemma 2 / 3 take "gelu" literally, as ACT2FN does)
_ACTIVATIONS = {"gelu_pytorch_tanh": "tanh", "gelu_new": "tanh", "gelu": "none"}


def _gelu_kind(config: ModelConfig, version: int) -> str:
    hf = config.hf_config
    key = "hidden_act" if version == 1 else "hidden_activation"
    name = hf.get(key) or "gelu_pytorch_tanh"
    if version == 1 and name == "gelu":
        return "tanh"
    if name not in _ACTIVATIONS:
        raise ValueError(f"Gemma {key}={name!r} is not supported; supported: "
                         f"{', '.join(_ACTIVATIONS)}")
    return _ACTIVATIONS[name]


def _soft_cap(config: ModelConfig, key: str) -> float | None:
    cap = config.hf_config.get(key)
    if cap is None:
        return None
    if isinstance(cap, bool) or not isinstance(cap, (int, float)) or cap <= 0:
        raise ValueError(f"{key} must be a positive number or null, got {cap!r}")
    return float(cap)


def _gemma3_ropes(config: ModelConfig) -> tuple[RopeSettings, RopeSettings]:
    """(global, local) rope settings of Gemma 3: transformers >= 5 nests them per layer type
    in ``rope_parameters``; older configs give rope_theta + rope_scaling (global) and
    rope_local_base_freq (local, never scaled)."""
    hf, max_pos = config.hf_config, config.max_position_embeddings
    params = hf.get("rope_parameters")
    if isinstance(params, dict) and ("full_attention" in params or "sliding_attention" in params):
        full = dict(params.get("full_attention") or {})
        local = dict(params.get("sliding_attention") or {})
    else:
        full = dict(hf.get("rope_scaling") or {})
        full["rope_theta"] = hf.get("rope_theta", 1_000_000.0)
        local = {"rope_theta": hf.get("rope_local_base_freq", 10_000.0)}

    def settings(p: dict[str, Any], default_theta: float) -> RopeSettings:
        theta = float(p.pop("rope_theta", default_theta))
        kind = p.get("rope_type", p.get("type", "default"))
        return RopeSettings(theta, None if kind == "default" else {**p, "rope_type": kind},
                            max_pos, config.max_model_len)

    return settings(full, 1_000_000.0), settings(local, 10_000.0)


class GemmaAttention(nn.Module):
    def __init__(
        self, config: ModelConfig, layer_idx: int, rotary_emb: RotaryEmbedding, scale: float,
        sliding_window: int | None = None, soft_cap: float | None = None,
        qk_norm: bool = False,
    ) -> None:
        super().__init__()
        h, d, kvh = config.num_attention_heads, config.head_dim, config.num_key_value_heads
        bias = config.attention_bias
        self.qkv_proj = QKVLinear(config.hidden_size, d, h, kvh, bias=bias)
        self.o_proj = Linear(h * d, config.hidden_size, bias=bias)
        self.rotary_emb = rotary_emb  # shared by the layers of one kind
        self.q_norm = GemmaRMSNorm(d, config.rms_norm_eps) if qk_norm else None
        self.k_norm = GemmaRMSNorm(d, config.rms_norm_eps) if qk_norm else None
        self.attn = Attention(h, d, kvh, layer_idx, scale, sliding_window=sliding_window,
                              logits_soft_cap=soft_cap)

    def forward(self, positions: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        q, k, v = self.qkv_proj.split(self.qkv_proj(x))
        if self.q_norm is not None and self.k_norm is not None:
            d = self.attn.head_dim
            q = self.q_norm(q.reshape(-1, d)).reshape(q.shape)
            k = self.k_norm(k.reshape(-1, d)).reshape(k.shape)
        return self.o_proj(self.attn.forward_rope(positions, q, k, v, self.rotary_emb))


class GemmaMLP(LlamaMLP):
    def __init__(self, config: ModelConfig, approximate: str) -> None:
        super().__init__(config)
        self.act = GeluAndMul(approximate)  # type: ignore[assignment]


class GemmaDecoderLayer(nn.Module):
    """Gemma 1: Llama's pre-norm layer. Gemma 2 / 3 (``sandwich``): each sub-block's output
    is normed again before the residual add, and the MLP has its own pre-norm."""

    def __init__(self, config: ModelConfig, attn: GemmaAttention, approximate: str,
                 sandwich: bool) -> None:
        super().__init__()
        h, eps = config.hidden_size, config.rms_norm_eps
        self.self_attn = attn
        self.mlp = GemmaMLP(config, approximate)
        self.input_layernorm = GemmaRMSNorm(h, eps)
        self.post_attention_layernorm = GemmaRMSNorm(h, eps)
        self.sandwich = sandwich
        if sandwich:
            self.pre_feedforward_layernorm = GemmaRMSNorm(h, eps)
            self.post_feedforward_layernorm = GemmaRMSNorm(h, eps)

    def forward(
        self, positions: torch.Tensor, x: torch.Tensor, residual: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        if self.sandwich:  # x is the residual stream itself (residual stays None)
            x = x + self.post_attention_layernorm(self.self_attn(positions, self.input_layernorm(x)))
            h = self.mlp(self.pre_feedforward_layernorm(x))
            return x + self.post_feedforward_layernorm(h), None
        x, residual = attention_block(self, positions, x, residual)
        return self.mlp(x), residual


class GemmaModel(nn.Module):
    def __init__(self, config: ModelConfig, version: int) -> None:
        super().__init__()
        hf, n = config.hf_config, config.num_hidden_layers
        if hf.get("use_bidirectional_attention"):
            raise ValueError("Gemma use_bidirectional_attention=true is not supported "
                             "(causal decoders only)")
        approximate = _gelu_kind(config, version)
        self.embed_tokens = VocabEmbedding(config.vocab_size, config.hidden_size)
        self.normalizer = config.hidden_size**0.5
        if version == 1:
            scale, cap, sliding = config.head_dim**-0.5, None, [False] * n
        else:
            scale = float(hf.get("query_pre_attn_scalar", 256)) ** -0.5
            if version == 2:
                cap = _soft_cap(config, "attn_logit_softcapping")
                sliding = layer_types(config, lambda i: (i + 1) % 2 != 0)
            else:
                cap = None  # HF's Gemma 3 attention ignores attn_logit_softcapping
                pattern = int(hf.get("sliding_window_pattern")
                              or hf.get("_sliding_window_pattern") or 6)
                sliding = layer_types(config, lambda i: (i + 1) % pattern != 0)
        wins = windows(config, sliding)
        if version == 3:  # windowed layers: the local rope base; global ones: maybe scaled
            glob, loc = _gemma3_ropes(config)
            full_rope = RotaryEmbedding(config.head_dim, glob)
            local_rope = RotaryEmbedding(config.head_dim, loc)
        else:
            full_rope = local_rope = RotaryEmbedding(config.head_dim, rope_settings(config))
        self.layers = nn.ModuleList(
            GemmaDecoderLayer(
                config,
                GemmaAttention(config, i, local_rope if sliding[i] else full_rope, scale,
                               sliding_window=wins[i], soft_cap=cap, qk_norm=version == 3),
                approximate,
                sandwich=version >= 2,
            )
            for i in range(n)
        )
        self.norm = GemmaRMSNorm(config.hidden_size, config.rms_norm_eps)

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        x = self.embed_tokens(input_ids)
        # sqrt(hidden) rounded to fp32, then to the model dtype (HF: 55.4256 -> 55.5 in bf16)
        x = x * torch.tensor(self.normalizer, dtype=torch.float32).to(x.dtype)
        residual = None
        for layer in self.layers:
            x, residual = layer(positions, x, residual)
        return self.norm(x) if residual is None else self.norm(x, residual)[0]


class GemmaForCausalLM(LlamaForCausalLM):
    """HF-compatible Gemma causal LM (tensor names as HF's; the tied head reuses the
    embedding); returns float32 logits, soft-capped where the config says so."""

    version = 1

    def _build_model(self, config: ModelConfig) -> GemmaModel:  # type: ignore[override]
        self.final_soft_cap = (_soft_cap(config, "final_logit_softcapping")
                               if self.version >= 2 else None)
        return GemmaModel(config, self.version)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        logits = self.lm_head(hidden)
        cap = self.final_soft_cap
        return logits if cap is None else torch.tanh(logits / cap) * cap


class Gemma2ForCausalLM(GemmaForCausalLM):
    version = 2


class Gemma3ForCausalLM(GemmaForCausalLM):
    """The text-only Gemma 3 (``model_type: gemma3_text``, e.g. gemma-3-1b / 270m)."""

    version = 3


class Gemma3ForConditionalGeneration(Gemma3ForCausalLM):
    """Gemma 3 4B / 12B / 27B checkpoints (``model_type: gemma3``) served text-only: the
    language model is Gemma 3's text decoder (config.json's ``text_config``, flattened by
    ModelConfig.from_hf_dict with HF's Gemma3TextConfig defaults). Its tensors are named
    ``language_model.model.*`` (the released checkpoints) or ``model.language_model.*``
    (transformers >= 4.52 saves); the vision tower and the multimodal projector are never
    read. Requests with images are refused (OpenAI server: 400; LLM.chat: ValueError).
    ``final_logit_softcapping`` (null in the released configs) applies as in the text model,
    as vLLM applies it; transformers' multimodal class leaves it out."""

    # checkpoint prefixes of the parts a text-only server does not run
    unread_prefixes: tuple[str, ...] = UNREAD_PREFIXES["Gemma3ForConditionalGeneration"]
    _renames: tuple[tuple[str, str], ...] = (
        ("language_model.model.", "model."),
        ("model.language_model.", "model."),
        ("language_model.lm_head.", "lm_head."),
    )

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> set[str]:
        return super().load_weights(self._text_weights(weights))

    def _text_weights(self, weights: Iterable[tuple[str, torch.Tensor]]
                      ) -> Iterator[tuple[str, torch.Tensor]]:
        for name, tensor in weights:
            if name.startswith(self.unread_prefixes):
                continue
            for old, new in self._renames:
                if name.startswith(old):
                    name = new + name[len(old):]
                    break
            yield name, tensor
