"""AllenAI OLMo 2: a Llama-shaped decoder with its norms moved after the sublayers.

Each block is ``h = x + norm_a(attn(x)); out = h + norm_f(mlp(h))``: no norm before
attention or MLP; the norm is applied to the sublayer's output before the residual add.
``q_norm`` / ``k_norm`` are RMSNorms over the whole q and k projections (all heads at once,
weights of num_heads * head_dim), applied before the rotary. OLMo 2's RMSNorm multiplies by
its weight in float32 and casts after (Llama casts first): the same in fp32, not in bf16.

Tensor parallelism is refused: a rank holds only its heads' part of q and k, while the
norm's statistics span all of them.
"""

from __future__ import annotations

import torch
from torch import nn

from modelport.config import ModelConfig
from modelport.layers.embedding import VocabEmbedding
from modelport.layers.layernorm import RMSNorm
from modelport.layers.rotary import RotaryEmbedding, rope_settings
from modelport.models.llama import LlamaAttention, LlamaForCausalLM, LlamaMLP
from modelport.models.llama import LlamaModel as _LlamaModel
from modelport.models.phi3 import check_silu


class Olmo2RMSNorm(RMSNorm):
    def _norm(self, x: torch.Tensor) -> torch.Tensor:
        if x.dtype == torch.float32 and self.weight.dtype == torch.float32:
            return super()._norm(x)  # the two orders agree in fp32
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return (self.weight * xf).to(x.dtype)


class Olmo2Attention(LlamaAttention):
    def __init__(
        self, config: ModelConfig, layer_idx: int, bias: bool, rotary_emb: RotaryEmbedding
    ) -> None:
        super().__init__(config, layer_idx, bias, bias, rotary_emb)
        self.q_norm = Olmo2RMSNorm(self.qkv_proj.q_size, config.rms_norm_eps)
        self.k_norm = Olmo2RMSNorm(self.qkv_proj.kv_size, config.rms_norm_eps)

    def forward(self, positions: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        q, k, v = self.qkv_proj.split(self.qkv_proj(x))
        if q.shape[-1] != self.q_norm.weight.shape[0]:
            raise ValueError("OLMo 2 does not support tensor parallelism (q_norm spans all heads)")
        q, k = self.q_norm(q), self.k_norm(k)
        return self.o_proj(self.attn.forward_rope(positions, q, k, v, self.rotary_emb))


class Olmo2DecoderLayer(nn.Module):
    def __init__(self, config: ModelConfig, layer_idx: int, rotary_emb: RotaryEmbedding) -> None:
        super().__init__()
        self.self_attn = Olmo2Attention(config, layer_idx, config.attention_bias, rotary_emb)
        self.mlp = LlamaMLP(config)
        self.post_attention_layernorm = Olmo2RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.post_feedforward_layernorm = Olmo2RMSNorm(config.hidden_size, config.rms_norm_eps)

    def forward(
        self, positions: torch.Tensor, x: torch.Tensor, residual: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(x, residual) -> (mlp part, stream so far): the caller (next layer or the final
        norm) adds them, as LlamaModel expects of its layers."""
        h = x if residual is None else x + residual
        h = h + self.post_attention_layernorm(self.self_attn(positions, h))
        return self.post_feedforward_layernorm(self.mlp(h)), h


class Olmo2Model(_LlamaModel):
    def __init__(self, config: ModelConfig) -> None:
        nn.Module.__init__(self)
        self.embed_tokens = VocabEmbedding(config.vocab_size, config.hidden_size)
        rotary = RotaryEmbedding(config.head_dim, rope_settings(config))
        self.layers = nn.ModuleList(
            Olmo2DecoderLayer(config, i, rotary) for i in range(config.num_hidden_layers)
        )
        self.norm = Olmo2RMSNorm(config.hidden_size, config.rms_norm_eps)


class Olmo2ForCausalLM(LlamaForCausalLM):
    # checked before the engine starts (engine/arg_utils.py)
    tensor_parallel_refusal = (
        "OLMo 2 (Olmo2ForCausalLM) does not support tensor_parallel_size > 1: its q_norm / "
        "k_norm span all attention heads; use tensor_parallel_size=1"
    )

    def _build_model(self, config: ModelConfig) -> _LlamaModel:
        check_silu(config)
        return Olmo2Model(config)
