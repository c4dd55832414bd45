"""BigCode StarCoder2 (3B / 7B / 15B): a pre-norm decoder with LayerNorm (weight and bias),
GQA attention with biases on q/k/v and o (``use_bias``), rotary on the whole head, and a
plain two-matrix MLP ``c_proj(gelu_tanh(c_fc(x)))`` with biases; the LM head is usually tied.

``sliding_window`` (StarCoder2-3B / 7B: 4096) applies to every layer, as HF's StarCoder2
applies it. Under tensor parallelism ``c_fc`` is split by output rows and ``c_proj`` by input
columns (parallel/tensor_parallel.py), as gate_up / down are in Llama.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from modelport.config import ModelConfig
from modelport.layers.embedding import VocabEmbedding
from modelport.layers.layernorm import LayerNorm
from modelport.layers.linear import Linear, MergedLinear
from modelport.layers.rotary import RotaryEmbedding, rope_settings
from modelport.models.llama import LlamaAttention, LlamaDecoderLayer, LlamaForCausalLM
from modelport.models.llama import LlamaModel as _LlamaModel
from modelport.models.sliding import mistral_windows

# HF activation name -> F.gelu's approximate=
_GELU = {"gelu_pytorch_tanh": "tanh", "gelu_new": "tanh", "gelu_fast": "tanh", "gelu": "none"}


def _settings(config: ModelConfig) -> tuple[bool, float, str]:
    """(use_bias, norm_epsilon, the GeLU's approximate=) from config.json."""
    hf = config.hf_config
    act = hf.get("hidden_act", "gelu_pytorch_tanh")
    if act not in _GELU:
        raise ValueError(f"Starcoder2ForCausalLM: hidden_act={act!r} is not supported "
                         f"(supported: {', '.join(_GELU)})")
    return bool(hf.get("use_bias", True)), float(hf.get("norm_epsilon", 1e-5)), _GELU[act]


class Starcoder2MLP(nn.Module):
    def __init__(self, config: ModelConfig, bias: bool, approximate: str) -> None:
        super().__init__()
        i = config.intermediate_size
        # one shard: column-parallel like gate_up (tensor_parallel.COLUMN_PARALLEL)
        self.c_fc = MergedLinear(config.hidden_size, (i,), ("fc",), bias=bias)
        self.c_proj = Linear(i, config.hidden_size, bias=bias)
        self.approximate = approximate

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.c_proj(F.gelu(self.c_fc(x), approximate=self.approximate))


class Starcoder2DecoderLayer(LlamaDecoderLayer):
    """Llama's pre-norm layer with LayerNorms and the GeLU MLP (its own class, so the fused
    Llama decode layer and the CPU C decode path leave it alone)."""

    def __init__(self, config: ModelConfig, layer_idx: int, rotary_emb: RotaryEmbedding,
                 sliding_window: int | None) -> None:
        nn.Module.__init__(self)
        bias, eps, approximate = _settings(config)
        self.self_attn = LlamaAttention(config, layer_idx, bias, bias, rotary_emb,
                                        sliding_window=sliding_window)
        self.mlp = Starcoder2MLP(config, bias, approximate)
        self.input_layernorm = LayerNorm(config.hidden_size, eps)
        self.post_attention_layernorm = LayerNorm(config.hidden_size, eps)


class Starcoder2Model(_LlamaModel):
    def __init__(self, config: ModelConfig) -> None:
        nn.Module.__init__(self)
        self.embed_tokens = VocabEmbedding(config.vocab_size, config.hidden_size)
        rotary = RotaryEmbedding(config.head_dim, rope_settings(config))
        wins = mistral_windows(config)  # every layer, as HF's StarCoder2
        self.layers = nn.ModuleList(
            Starcoder2DecoderLayer(config, i, rotary, wins[i])
            for i in range(config.num_hidden_layers)
        )
        self.norm = LayerNorm(config.hidden_size, _settings(config)[1])


class Starcoder2ForCausalLM(LlamaForCausalLM):
    # q / k / v load into qkv_proj (Llama's table); c_fc / c_proj load as stored
    def _build_model(self, config: ModelConfig) -> _LlamaModel:
        return Starcoder2Model(config)
