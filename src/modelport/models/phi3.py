"""Phi-3 / Phi-3.5 / Phi-4-mini: the Llama decoder with a partial rotary option and LongRoPE.

The checkpoint stores the projections already fused (``qkv_proj``: q rows, then k, then v;
``gate_up_proj``: gate rows, then up), the layout of our QKVLinear / MergedLinear, so those
tensors load as they are; tensor parallelism still slices q, k and v by their own ranges.
``partial_rotary_factor`` (Phi-4-mini: 0.75) rotates only the first part of each head.
LongRoPE scaling: layers/longrope.py (its factors are chosen by the engine's max_model_len).
``sliding_window`` (Phi-3-mini-4k: 2047) applies to every layer, as HF's Phi-3 applies it: a
query at position p sees keys at positions > p - sliding_window; ``layer_types`` is ignored.
"""

from __future__ import annotations

from torch import nn

from modelport.config import ModelConfig
from modelport.layers.embedding import VocabEmbedding
from modelport.layers.layernorm import RMSNorm
from modelport.layers.longrope import longrope_rotary, longrope_settings
from modelport.layers.rotary import RotaryEmbedding, compute_inv_freq
from modelport.models.llama import LlamaAttention, LlamaDecoderLayer, LlamaForCausalLM, LlamaMLP
from modelport.models.llama import LlamaModel as _LlamaModel
from modelport.models.sliding import mistral_windows


def check_silu(config: ModelConfig) -> None:
    act = config.hf_config.get("hidden_act", "silu")
    if act != "silu":
        raise ValueError(
            f"{config.architecture}: hidden_act={act!r} is not supported (supported: 'silu')"
        )


def partial_rotary_dim(config: ModelConfig) -> int:
    params = config.hf_config.get("rope_parameters")
    factor = params.get("partial_rotary_factor") if isinstance(params, dict) else None
    if factor is None:
        factor = config.hf_config.get("partial_rotary_factor", 1.0)
    factor = float(factor)
    dim = int(config.head_dim * factor)
    if not 0.0 < factor <= 1.0 or dim < 2 or dim % 2:
        raise ValueError(
            f"partial_rotary_factor={factor} is not supported: it must be in (0, 1] and give "
            f"an even rotary dimension of head_dim {config.head_dim} (got {dim})"
        )
    return dim


def phi3_rotary(config: ModelConfig) -> RotaryEmbedding:
    settings = longrope_settings(config)
    dim = partial_rotary_dim(config)
    if settings.scaling is not None and settings.scaling["rope_type"] == "longrope":
        max_len = config.max_model_len or config.max_position_embeddings
        return longrope_rotary(config.head_dim, settings, dim, max_len)
    compute_inv_freq(dim, settings)  # an unsupported rope type fails here with its name
    return RotaryEmbedding(config.head_dim, settings, dim)


class Phi3DecoderLayer(LlamaDecoderLayer):
    """Its own class, so the fused Llama decode layer (exact-class swap) leaves it alone."""

    def __init__(self, config: ModelConfig, layer_idx: int, rotary_emb: RotaryEmbedding,
                 sliding_window: int | None) -> None:
        nn.Module.__init__(self)
        self.self_attn = LlamaAttention(config, layer_idx, False, False, rotary_emb,
                                        sliding_window=sliding_window)
        self.mlp = LlamaMLP(config)
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)


class Phi3Model(_LlamaModel):
    def __init__(self, config: ModelConfig) -> None:
        nn.Module.__init__(self)
        self.embed_tokens = VocabEmbedding(config.vocab_size, config.hidden_size)
        rotary = phi3_rotary(config)
        windows = mistral_windows(config)  # HF's Phi-3 windows every layer, as Mistral's does
        self.layers = nn.ModuleList(
            Phi3DecoderLayer(config, i, rotary, windows[i])
            for i in range(config.num_hidden_layers)
        )
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)


class Phi3ForCausalLM(LlamaForCausalLM):
    def _build_model(self, config: ModelConfig) -> _LlamaModel:
        check_silu(config)
        if config.attention_bias:
            raise ValueError("Phi-3 with attention_bias=true is not supported (no biases)")
        return Phi3Model(config)
