"""Llama family decoder (Llama 2/3/3.1, Mistral, SmolLM): GQA, RMSNorm, SwiGLU, rotary.

Single-device code over flat token batches: ``forward(input_ids [T], positions [T])``.
Attention reads its paged KV cache and metadata from the forward context, so the same
module serves prefill chunks and decode steps of many requests in one call.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence

import torch
from torch import nn

from modelport.config import ModelConfig
from modelport.layers import cpu_fast, cpu_kernels
from modelport.layers.activation import SiluAndMul
from modelport.layers.attention import Attention
from modelport.layers.embedding import LMHead, VocabEmbedding
from modelport.layers.layernorm import RMSNorm
from modelport.layers.linear import Linear, MergedLinear, QKVLinear
from modelport.layers.rotary import RotaryEmbedding, rope_settings
from modelport.models.weights import StackedParam, load_declared_weights


class LlamaAttention(nn.Module):
    def __init__(
        self,
        config: ModelConfig,
        layer_idx: int,
        qkv_bias: bool,
        o_bias: bool,
        rotary_emb: RotaryEmbedding,
        sliding_window: int | None = None,
    ) -> None:
        super().__init__()
        h, d = config.num_attention_heads, config.head_dim
        kvh = config.num_key_value_heads
        self.qkv_proj = QKVLinear(config.hidden_size, d, h, kvh, bias=qkv_bias)
        self.o_proj = Linear(h * d, config.hidden_size, bias=o_bias)
        self.rotary_emb = rotary_emb  # one instance shared by all layers
        self.attn = Attention(h, d, kvh, layer_idx, scale=d**-0.5, sliding_window=sliding_window)

    def forward(self, positions: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        qkv = self.qkv_proj(x)
        if not qkv.is_cuda and cpu_fast.ENABLED and self.attn._rope_fits is None:
            # CPU: q and k rotated together in one pass over the qkv output (same values)
            p = self.qkv_proj
            qk_size = p.q_size + p.kv_size
            q, k = self.rotary_emb.rotate_joint(positions, qkv[:, :qk_size]).split(
                (p.q_size, p.kv_size), dim=-1)
            return self.o_proj(self.attn.forward(q, k, qkv[:, qk_size:]))
        q, k, v = self.qkv_proj.split(qkv)
        return self.o_proj(self.attn.forward_rope(positions, q, k, v, self.rotary_emb))


class LlamaMLP(nn.Module):
    def __init__(self, config: ModelConfig, bias: bool = False) -> None:
        super().__init__()
        i = config.intermediate_size
        self.gate_up_proj = MergedLinear(config.hidden_size, (i, i), ("gate", "up"), bias=bias)
        self.down_proj = Linear(i, config.hidden_size, bias=bias)
        self.act = SiluAndMul()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(self.act(self.gate_up_proj(x)))


class LlamaDecoderLayer(nn.Module):
    def __init__(
        self,
        config: ModelConfig,
        layer_idx: int,
        qkv_bias: bool,
        o_bias: bool,
        mlp_bias: bool,
        rotary_emb: RotaryEmbedding,
        sliding_window: int | None = None,
    ) -> None:
        super().__init__()
        self.self_attn = LlamaAttention(config, layer_idx, qkv_bias, o_bias, rotary_emb,
                                        sliding_window=sliding_window)
        self.mlp = LlamaMLP(config, mlp_bias)
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)

    def forward(
        self, positions: torch.Tensor, x: torch.Tensor, residual: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        x, residual = attention_block(self, positions, x, residual)
        return self.mlp(x), residual


def attention_block(layer: nn.Module, positions: torch.Tensor, x: torch.Tensor,
                    residual: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """A pre-norm decoder layer up to its feed-forward: input norm (adding the residual
    stream, except in the first layer), attention, post-attention norm (adding it again).
    Returns (the feed-forward's input, the residual stream)."""
    if residual is None:
        residual = x
        x = layer.input_layernorm(x)
    else:
        x, residual = layer.input_layernorm(x, residual)
    x = layer.self_attn(positions, x)
    return layer.post_attention_layernorm(x, residual)


class LlamaModel(nn.Module):
    # EAGLE-3 (models/eagle3_llama.py): the residual streams entering these layers (sorted),
    # concatenated, are left in ``aux_hidden`` by each forward; () keeps nothing
    aux_layers: tuple[int, ...] = ()

    def __init__(
        self, config: ModelConfig, qkv_bias: bool, o_bias: bool, mlp_bias: bool = False,
        layer_windows: Sequence[int | None] | None = None,
    ) -> None:
        super().__init__()
        self.embed_tokens = VocabEmbedding(config.vocab_size, config.hidden_size)
        # one cos/sin table for the whole model (Llama 3.1: 131072 positions x 128 dims)
        rotary = RotaryEmbedding(config.head_dim, rope_settings(config))
        windows = layer_windows or [None] * config.num_hidden_layers  # per layer, see sliding.py
        self.layers = nn.ModuleList(
            LlamaDecoderLayer(config, i, qkv_bias, o_bias, mlp_bias, rotary,
                              sliding_window=windows[i])
            for i in range(config.num_hidden_layers)
        )
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)

    def _shared_rotary(self) -> RotaryEmbedding | None:
        """The rotary embedding the layers share (None: none of them rotates)."""
        if self.layers and hasattr(self.layers[0], "self_attn"):
            return self.layers[0].self_attn.rotary_emb
        return None

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        x = self.embed_tokens(input_ids)
        # a CPU step of plain int4 layers: small ops fused in C (it keeps no per-layer
        # streams, so not while an EAGLE-3 head reads them)
        if not x.is_cuda and not self.aux_layers:
            out = cpu_kernels.decode(self, x, positions)
            if out is not None:
                return out
        residual = None
        if not x.is_cuda:
            rotary = self._shared_rotary()
            if rotary is not None:
                rotary.forget_positions()  # see rotate_joint
        kept = []  # aux_layers' streams: id j is HF's hidden_states[j], layer j's input
        for i, layer in enumerate(self.layers):
            if i in self.aux_layers:
                kept.append(x if residual is None else x + residual)
            x, residual = layer(positions, x, residual)
        if kept:
            self.aux_hidden = torch.cat(kept, dim=-1)
        # a fused decode layer (layers/fused_decode.py) hands on the residual stream as x
        return self.norm(x) if residual is None else self.norm(x, residual)[0]


class LlamaForCausalLM(nn.Module):
    """HF-compatible Llama causal LM: loads HF tensor names, returns float32 logits."""

    # checkpoint sub-name -> (fused sub-name, shard): loading is declared here, once
    stacked_params: tuple[StackedParam, ...] = (
        (".qkv_proj.", ".q_proj.", "q"),
        (".qkv_proj.", ".k_proj.", "k"),
        (".qkv_proj.", ".v_proj.", "v"),
        (".gate_up_proj.", ".gate_proj.", "gate"),
        (".gate_up_proj.", ".up_proj.", "up"),
    )
    skip_weights: tuple[str, ...] = ("rotary_emb.inv_freq",)

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.config = config
        self.model = self._build_model(config)
        tied = self.model.embed_tokens if config.tie_word_embeddings else None
        self.lm_head = LMHead(config.vocab_size, config.hidden_size, tied_to=tied)

    def _build_model(self, config: ModelConfig) -> LlamaModel:
        bias = config.attention_bias
        return LlamaModel(
            config,
            qkv_bias=bias,
            o_bias=bias,
            mlp_bias=bool(config.hf_config.get("mlp_bias", False)),
            layer_windows=self._layer_windows(config),
        )

    def _layer_windows(self, config: ModelConfig) -> list[int | None] | None:
        """Each layer's sliding window (None: full attention everywhere)."""
        return None

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        return self.model(input_ids, positions)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.lm_head(hidden)

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> set[str]:
        """Load HF-named tensors; returns the names of our parameters that were fully set."""
        if self.config.tie_word_embeddings:
            weights = _tied_embedding(weights)
        return load_declared_weights(self, weights, self.stacked_params, self.skip_weights)


class MistralForCausalLM(LlamaForCausalLM):
    """Mistral is Llama's architecture plus Mistral-7B-v0.1's sliding window (every layer,
    as HF runs it; ``layer_types`` is ignored, as HF's Mistral ignores it)."""

    def _layer_windows(self, config: ModelConfig) -> list[int | None] | None:
        from modelport.models.sliding import mistral_windows

        return mistral_windows(config)


EMBED, HEAD = "model.embed_tokens.weight", "lm_head.weight"


def _tied_embedding(weights: Iterable[tuple[str, torch.Tensor]]) -> Iterator[tuple[str, torch.Tensor]]:
    """A tied checkpoint's tensors with its one shared matrix under the embedding's name.

    Most tied checkpoints store ``model.embed_tokens.weight`` (some also a copy as
    ``lm_head.weight``, dropped here); a few store only ``lm_head.weight`` (what
    ``safetensors.torch.save_model`` keeps of a tied pair). Like HF transformers, the
    embedding wins when both are present; the head's copy is used only when it is alone.
    """
    head = None
    seen_embed = False
    for name, tensor in weights:
        if name == HEAD:
            head = tensor
            continue
        seen_embed = seen_embed or name == EMBED
        yield name, tensor
    if head is not None and not seen_embed:
        yield EMBED, head
