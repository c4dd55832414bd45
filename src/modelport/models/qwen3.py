"""Qwen3 (dense): the Llama decoder plus an RMSNorm over each head's q and k (``q_norm`` /
``k_norm``, one weight of head_dim shared by the heads) before the rotary embedding."""

from __future__ import annotations

import torch
from torch import nn

from modelport.config import ModelConfig
from modelport.layers.embedding import VocabEmbedding
from modelport.layers.layernorm import RMSNorm
from modelport.layers.rotary import RotaryEmbedding, rope_settings
from modelport.models.llama import LlamaAttention, LlamaDecoderLayer, LlamaForCausalLM, LlamaMLP
from modelport.models.llama import LlamaModel as _LlamaModel
from modelport.models.sliding import qwen_windows


class Qwen3Attention(LlamaAttention):
    def __init__(
        self, config: ModelConfig, layer_idx: int, bias: bool, rotary_emb: RotaryEmbedding,
        sliding_window: int | None = None,
    ) -> None:
        super().__init__(config, layer_idx, bias, bias, rotary_emb, sliding_window=sliding_window)
        self.q_norm = RMSNorm(config.head_dim, config.rms_norm_eps)
        self.k_norm = RMSNorm(config.head_dim, config.rms_norm_eps)

    def forward(self, positions: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        q, k, v = self.qkv_proj.split(self.qkv_proj(x))
        d = self.q_norm.weight.shape[0]
        q = self.q_norm(q.reshape(-1, d)).reshape(q.shape)
        k = self.k_norm(k.reshape(-1, d)).reshape(k.shape)
        return self.o_proj(self.attn.forward_rope(positions, q, k, v, self.rotary_emb))


class Qwen3DecoderLayer(LlamaDecoderLayer):
    """Its own class, so the fused Llama decode layer (exact-class swap) leaves it alone."""

    def __init__(
        self, config: ModelConfig, layer_idx: int, bias: bool, rotary_emb: RotaryEmbedding,
        sliding_window: int | None = None,
    ) -> None:
        nn.Module.__init__(self)
        self.self_attn = Qwen3Attention(config, layer_idx, bias, rotary_emb,
                                        sliding_window=sliding_window)
        self.mlp = LlamaMLP(config)
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)


class Qwen3Model(_LlamaModel):
    def __init__(self, config: ModelConfig) -> None:
        nn.Module.__init__(self)
        self.embed_tokens = VocabEmbedding(config.vocab_size, config.hidden_size)
        rotary = RotaryEmbedding(config.head_dim, rope_settings(config))
        windows = qwen_windows(config)
        self.layers = nn.ModuleList(
            Qwen3DecoderLayer(config, i, config.attention_bias, rotary, sliding_window=windows[i])
            for i in range(config.num_hidden_layers)
        )
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)


class Qwen3ForCausalLM(LlamaForCausalLM):
    def _build_model(self, config: ModelConfig) -> _LlamaModel:
        return Qwen3Model(config)
