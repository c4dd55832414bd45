"""HuggingFace SmolLM3: the Llama decoder where some layers use no position embedding (NoPE).

``no_rope_layers`` lists one flag per layer, 1 where the layer rotates q and k and 0 where it
does not (the name is HF's); without the list, every ``no_rope_layer_interval``-th layer
(default 4: layers 3, 7, 11, ...) is NoPE, as HF's config builds it. A NoPE layer's attention
holds no rotary embedding at all (``rotary_emb`` is None) and calls ``Attention.forward``,
never ``forward_rope``: no backend is ever handed a rotary for it, so neither the CPU paths,
the Triton decode kernel's built-in rotary (``rope_fits``) nor a CUDA-graph capture can
rotate its q or k. Rope layers are Llama's.

Sliding windows follow ``layer_types`` (HF's default: the NoPE layers slide when
``use_sliding_window`` and ``sliding_window`` are set; the released checkpoints use none).
The decoder layer is its own class, so the fused Llama decode layer and the CPU C decode path
(exact-class checks) leave these models alone.
"""

from __future__ import annotations

import torch
from torch import nn

from modelport.config import ModelConfig
from modelport.layers.embedding import VocabEmbedding
from modelport.layers.layernorm import RMSNorm
from modelport.layers.rotary import RotaryEmbedding, rope_settings
from modelport.models.llama import LlamaAttention, LlamaDecoderLayer, LlamaForCausalLM, LlamaMLP
from modelport.models.llama import LlamaModel as _LlamaModel
from modelport.models.phi3 import check_silu
from modelport.models.sliding import layer_types, windows


def rope_layers(config: ModelConfig) -> list[bool]:
    """Per layer, whether it applies the rotary embedding (HF's ``no_rope_layers`` rule)."""
    hf, n = config.hf_config, config.num_hidden_layers
    flags = hf.get("no_rope_layers")
    if flags is None:
        interval = hf.get("no_rope_layer_interval", 4)
        if isinstance(interval, bool) or not isinstance(interval, int) or interval < 1:
            raise ValueError(f"no_rope_layer_interval must be a positive integer, got {interval!r}")
        return [(i + 1) % interval != 0 for i in range(n)]
    if (not isinstance(flags, list) or len(flags) != n
            or any(f not in (0, 1) or isinstance(f, float) for f in flags)):
        raise ValueError(f"no_rope_layers must list a 0 or 1 per layer ({n}), got {flags!r}")
    return [bool(f) for f in flags]


def smollm3_windows(config: ModelConfig, rope: list[bool]) -> list[int | None]:
    hf = config.hf_config
    use = bool(hf.get("use_sliding_window")) and hf.get("sliding_window") is not None
    return windows(config, layer_types(config, lambda i: use and not rope[i]))


class SmolLM3Attention(LlamaAttention):
    """Llama's attention; with ``rotary_emb`` None (a NoPE layer) q and k go to attention
    as projected."""

    def __init__(self, config: ModelConfig, layer_idx: int, rotary_emb: RotaryEmbedding | None,
                 sliding_window: int | None) -> None:
        bias = config.attention_bias
        super().__init__(config, layer_idx, bias, bias, rotary_emb,  # type: ignore[arg-type]
                         sliding_window=sliding_window)

    def forward(self, positions: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        if self.rotary_emb is not None:
            return super().forward(positions, x)
        q, k, v = self.qkv_proj.split(self.qkv_proj(x))
        return self.o_proj(self.attn.forward(q, k, v))  # no rotary reaches the backend


class SmolLM3DecoderLayer(LlamaDecoderLayer):
    def __init__(self, config: ModelConfig, layer_idx: int, rotary_emb: RotaryEmbedding | None,
                 sliding_window: int | None) -> None:
        nn.Module.__init__(self)
        self.self_attn = SmolLM3Attention(config, layer_idx, rotary_emb, sliding_window)
        self.mlp = LlamaMLP(config, bool(config.hf_config.get("mlp_bias", False)))
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)


class SmolLM3Model(_LlamaModel):
    def __init__(self, config: ModelConfig) -> None:
        nn.Module.__init__(self)
        self.embed_tokens = VocabEmbedding(config.vocab_size, config.hidden_size)
        rope = rope_layers(config)
        # one table shared by the rope layers
        rotary = RotaryEmbedding(config.head_dim, rope_settings(config)) if any(rope) else None
        wins = smollm3_windows(config, rope)
        self.layers = nn.ModuleList(
            SmolLM3DecoderLayer(config, i, rotary if rope[i] else None, wins[i])
            for i in range(config.num_hidden_layers)
        )
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)

    def _shared_rotary(self) -> RotaryEmbedding | None:
        # layer 0 may be a NoPE layer: the first that rotates
        return next((layer.self_attn.rotary_emb for layer in self.layers
                     if layer.self_attn.rotary_emb is not None), None)


class SmolLM3ForCausalLM(LlamaForCausalLM):
    def _build_model(self, config: ModelConfig) -> _LlamaModel:
        check_silu(config)
        return SmolLM3Model(config)
