"""IBM Granite 3.x (dense): the Llama decoder with four scalars.

``embedding_multiplier`` scales the token embeddings, ``residual_multiplier`` each sublayer
output before its residual add, ``attention_multiplier`` is the attention scale (instead of
head_dim**-0.5) and the logits are divided by ``logits_scaling``. The decoder layer is its
own class, so the fused Llama decode layer (an exact-class swap that knows no multiplier)
never replaces it; the CPU fast paths of LlamaAttention read the scale from Attention.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from modelport.config import ModelConfig
from modelport.layers.embedding import LMHead, VocabEmbedding
from modelport.layers.layernorm import RMSNorm
from modelport.layers.rotary import RotaryEmbedding, rope_settings
from modelport.models.llama import LlamaAttention, LlamaDecoderLayer, LlamaForCausalLM, LlamaMLP
from modelport.models.llama import LlamaModel as _LlamaModel
from modelport.models.phi3 import check_silu


def multiplier(config: ModelConfig, name: str) -> float:
    value = float(config.hf_config.get(name, 1.0))
    if name == "logits_scaling" and value == 0.0:
        raise ValueError("Granite logits_scaling must not be 0 (the logits are divided by it)")
    return value


class GraniteDecoderLayer(LlamaDecoderLayer):
    def __init__(self, config: ModelConfig, layer_idx: int, rotary_emb: RotaryEmbedding) -> None:
        nn.Module.__init__(self)
        bias = config.attention_bias
        self.self_attn = LlamaAttention(config, layer_idx, bias, bias, rotary_emb)
        self.self_attn.attn.scale = multiplier(config, "attention_multiplier")
        self.mlp = LlamaMLP(config, bool(config.hf_config.get("mlp_bias", False)))
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.residual_multiplier = multiplier(config, "residual_multiplier")

    def forward(
        self, positions: torch.Tensor, x: torch.Tensor, residual: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        return scaled_residual_forward(self, self.mlp, positions, x, residual)


def scaled_residual_forward(
    layer: nn.Module, ffn: nn.Module, positions: torch.Tensor, x: torch.Tensor,
    residual: torch.Tensor | None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """A Granite layer's step (GraniteMoE's too, ``ffn`` its experts): each sublayer's output
    times ``layer.residual_multiplier`` before its residual add."""
    if residual is None:
        residual = x
        x = layer.input_layernorm(x)
    else:
        x, residual = layer.input_layernorm(x, residual)
    x = layer.self_attn(positions, x) * layer.residual_multiplier
    x, residual = layer.post_attention_layernorm(x, residual)
    # the next norm adds residual: residual + ffn * multiplier, as HF
    return ffn(x) * layer.residual_multiplier, residual


class GraniteModel(_LlamaModel):
    def __init__(self, config: ModelConfig) -> None:
        nn.Module.__init__(self)
        self.embed_tokens = VocabEmbedding(config.vocab_size, config.hidden_size)
        self.embedding_multiplier = multiplier(config, "embedding_multiplier")
        rotary = RotaryEmbedding(config.head_dim, rope_settings(config))
        self.layers = nn.ModuleList(
            GraniteDecoderLayer(config, i, rotary) for i in range(config.num_hidden_layers)
        )
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        x = self.embed_tokens(input_ids) * self.embedding_multiplier
        residual = None
        if not x.is_cuda:
            self.layers[0].self_attn.rotary_emb.forget_positions()  # see rotate_joint
        for layer in self.layers:
            x, residual = layer(positions, x, residual)
        return self.norm(x) if residual is None else self.norm(x, residual)[0]


class ScaledLMHead(LMHead):
    """Logits divided by ``logits_scaling``, as HF divides the head's output."""

    def __init__(self, config: ModelConfig, tied_to: VocabEmbedding | None) -> None:
        super().__init__(config.vocab_size, config.hidden_size, tied_to=tied_to)
        self.logits_scaling = multiplier(config, "logits_scaling")

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        if self.exact_weight is not None:  # a narrowed head refined in fp32 (see LMHead)
            return super().forward(hidden) / self.logits_scaling
        # HF divides in the head's dtype, then generate reads the logits as float32
        logits = F.linear(hidden.to(self.weight.dtype), self.weight)
        return (logits / self.logits_scaling).float()

    def greedy(self, hidden: torch.Tensor) -> torch.Tensor | None:
        # the division can round two near-equal logits to a tie: take the full head
        return None if self.logits_scaling != 1.0 else super().greedy(hidden)


class GraniteForCausalLM(LlamaForCausalLM):
    def __init__(self, config: ModelConfig) -> None:
        super().__init__(config)
        tied = self.model.embed_tokens if config.tie_word_embeddings else None
        self.lm_head = ScaledLMHead(config, tied)

    def _build_model(self, config: ModelConfig) -> _LlamaModel:
        check_silu(config)
        return GraniteModel(config)
