"""Mixture-of-experts decoders: Mixtral, Qwen2-MoE (Qwen1.5-MoE, Qwen2-57B-A14B), Qwen3-MoE,
OLMoE and GraniteMoE.

Each is a Llama-family decoder (Llama attention; Qwen3's q/k norms for Qwen3-MoE, OLMo 2's
whole-projection q/k norms for OLMoE, Granite's multipliers for GraniteMoE) whose MLP
is, in its sparse layers, a router over stacked experts (layers/fused_moe.py). The HF
checkpoints store one tensor per expert and projection; ``stacked_params`` maps each onto its
slice of the stacked ``w13`` / ``w2`` weights, so the declared loader loads them as it loads
q/k/v into qkv_proj. Tensor parallelism splits each expert's intermediate channels over the
ranks (parallel/moe_parallel.py), quantized experts included (expert parallelism: a share
of whole experts a rank instead); LoRA is refused at load (models/moe_config.py says what
is supported).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable
from typing import cast

import torch
from torch import nn

from modelport.config import ModelConfig
from modelport.layers.embedding import VocabEmbedding
from modelport.layers.fused_moe import FusedMoE, SparseMoeBlock
from modelport.layers.layernorm import RMSNorm
from modelport.layers.rotary import RotaryEmbedding, rope_settings
from modelport.models.granite import GraniteModel, ScaledLMHead, scaled_residual_forward
from modelport.models.granite import multiplier as granite_multiplier
from modelport.models.llama import (
    LlamaAttention,
    LlamaForCausalLM,
    LlamaMLP,
    LlamaModel,
    attention_block,
)
from modelport.models.moe_config import MoeSpec, check_moe_options, moe_spec
from modelport.models.olmo2 import Olmo2Attention
from modelport.models.qwen3 import Qwen3Attention
from modelport.models.weights import StackedParam
from modelport.parallel.moe_parallel import (
    experts_for_rank,
    own_expert_weights,
    whole_experts_for_quantization,
)
from modelport.quantization.base import QuantizationConfig


class MoeDecoderLayer(nn.Module):
    """Pre-norm attention + feed-forward; the feed-forward module's attribute name is the
    checkpoint's (Mixtral: ``block_sparse_moe``, Qwen: ``mlp``)."""

    def __init__(self, config: ModelConfig, attn: nn.Module, ffn_name: str, ffn: nn.Module) -> None:
        super().__init__()
        self.self_attn = attn
        self.ffn_name = ffn_name
        setattr(self, ffn_name, ffn)
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)

    def forward(
        self, positions: torch.Tensor, x: torch.Tensor, residual: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        x, residual = attention_block(self, positions, x, residual)
        return getattr(self, self.ffn_name)(x), residual


class MoeModel(LlamaModel):
    """LlamaModel's forward (the CPU C step takes MoE blocks too: cpu_moe_step.py) over
    layers built by the MoE model classes."""

    def __init__(self, config: ModelConfig, layers: list[MoeDecoderLayer]) -> None:
        nn.Module.__init__(self)
        self.embed_tokens = VocabEmbedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(layers)
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)


def _expert_params(num_experts: int, gate: str, up: str, down: str) -> tuple[StackedParam, ...]:
    # transformers 5's own stacked layout (gate_up_proj [E, 2I, H], down_proj [E, H, I]) loads
    # whole: shard None means the tensor is the parameter
    whole = cast(str, None)
    out: list[StackedParam] = [(".experts.w13.weight", ".experts.gate_up_proj", whole),
                               (".experts.w2.weight", ".experts.down_proj", whole)]
    for e in range(num_experts):
        out += [(".experts.w13.", f".experts.{e}.{gate}.", f"{e}.gate"),
                (".experts.w13.", f".experts.{e}.{up}.", f"{e}.up"),
                (".experts.w2.", f".experts.{e}.{down}.", f"{e}.down")]
    return tuple(out)


class _MoeForCausalLM(LlamaForCausalLM):
    """Shared by the MoE models: builds layers from a MoeSpec, refuses what MoE does not support."""

    expert_names = ("gate_proj", "up_proj", "down_proj")  # checkpoint names of w1 / w3 / w2

    def __init__(self, config: ModelConfig) -> None:
        check_moe_options(config)
        self.spec = moe_spec(config)
        assert self.spec is not None
        super().__init__(config)
        # per-expert entries first: "experts.3.gate_proj." must not match the dense ".gate_proj."
        self.stacked_params = (_expert_params(self.spec.num_experts, *self.expert_names)
                               + type(self).stacked_params)

    def _experts(self, config: ModelConfig) -> FusedMoE:
        s: MoeSpec = self.spec
        # a tensor-parallel rank's load builds (and loads) its slice only: parallel/moe_parallel
        return experts_for_rank(s.num_experts, s.top_k, config.hidden_size,
                                s.expert_intermediate_size, s.renormalize)

    def _build_model(self, config: ModelConfig) -> MoeModel:
        rotary = RotaryEmbedding(config.head_dim, rope_settings(config))
        return MoeModel(config, [self._layer(config, i, rotary)
                                 for i in range(config.num_hidden_layers)])

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> set[str]:
        # expert parallelism: the other ranks' experts' tensors are skipped, never loaded
        return super().load_weights(own_expert_weights(self, weights))

    def _layer(self, config: ModelConfig, i: int, rotary: RotaryEmbedding) -> MoeDecoderLayer:
        raise NotImplementedError

    def prepare_quantization(self, quant_config: QuantizationConfig,
                             device: torch.device | None = None) -> None:
        """Quantized checkpoints store each expert's projections as linear layers of their
        own: split the stacked experts into per-expert layers (FusedMoE.unstack) and load
        the checkpoint's ``experts.<e>.<gate|up|down>`` names into them. On CUDA they are
        stacked again after loading for the grouped kernels (FusedMoE.restack_experts).
        A tensor-parallel rank builds and loads each as its slice (the dense quantized layers'
        way: parallel/tp_quant_load.py); with expert parallelism, layers for its share of the
        experts only, whole, named by their global ids (parallel/moe_parallel.py)."""
        restack = device is not None and device.type == "cuda"
        for m in self.modules():
            if isinstance(m, FusedMoE):
                whole_experts_for_quantization(m)
                m.unstack(restack=restack)
        gate, up, down = self.expert_names
        whole = cast(str, None)
        renamed: tuple[StackedParam, ...] = ()
        if gate != "gate_proj":  # Mixtral's w1 / w3 / w2
            renamed = ((".gate_up_proj.", f".{gate}.", "gate"), (".gate_up_proj.", f".{up}.", "up"),
                       (".down_proj.", f".{down}.", whole))
        self.stacked_params = renamed + type(self).stacked_params
        quant_config.use_stacked_params(self.stacked_params)


def _refuse_window(config: ModelConfig, name: str) -> None:
    d = config.hf_config
    window = d.get("sliding_window")
    if name == "Mixtral":
        windowed = bool(window) and int(window) < config.max_position_embeddings
    else:
        windowed = bool(d.get("use_sliding_window"))
    if windowed:
        raise ValueError(f"{name} with sliding_window={window} is not supported (full attention "
                         "only: sliding_window null, or >= max_position_embeddings)")


class MixtralForCausalLM(_MoeForCausalLM):
    """Mixtral 8x7B / 8x22B: Llama attention, every layer sparse, top-k always renormalised."""

    expert_names = ("w1", "w3", "w2")

    def __init__(self, config: ModelConfig) -> None:
        _refuse_window(config, "Mixtral")
        super().__init__(config)

    def _layer(self, config: ModelConfig, i: int, rotary: RotaryEmbedding) -> MoeDecoderLayer:
        bias = config.attention_bias
        attn = LlamaAttention(config, i, bias, bias, rotary)
        moe = SparseMoeBlock(config.hidden_size, self._experts(config))
        return MoeDecoderLayer(config, attn, "block_sparse_moe", moe)


class Qwen2MoeForCausalLM(_MoeForCausalLM):
    """Qwen1.5-MoE / Qwen2-MoE: q/k/v bias, a shared expert behind a sigmoid gate, dense MLPs
    in ``mlp_only_layers`` and off the ``decoder_sparse_step`` grid."""

    def __init__(self, config: ModelConfig) -> None:
        _refuse_window(config, "Qwen2-MoE")
        super().__init__(config)

    def _layer(self, config: ModelConfig, i: int, rotary: RotaryEmbedding) -> MoeDecoderLayer:
        qkv_bias = bool(config.hf_config.get("qkv_bias", True))
        attn = LlamaAttention(config, i, qkv_bias, False, rotary)
        return MoeDecoderLayer(config, attn, "mlp", self._qwen_ffn(config, i))

    def _qwen_ffn(self, config: ModelConfig, i: int) -> nn.Module:
        s: MoeSpec = self.spec
        if i not in s.sparse_layers:
            return LlamaMLP(config)
        shared = None
        if s.shared_intermediate_size:
            shared = LlamaMLP(dataclasses.replace(
                config, intermediate_size=s.shared_intermediate_size))
        return SparseMoeBlock(config.hidden_size, self._experts(config), shared)


class Qwen3MoeForCausalLM(Qwen2MoeForCausalLM):
    """Qwen3-MoE (30B-A3B, 235B-A22B): Qwen3 attention (q/k RMSNorm), no shared expert."""

    def __init__(self, config: ModelConfig) -> None:
        _refuse_window(config, "Qwen3-MoE")
        _MoeForCausalLM.__init__(self, config)

    def _layer(self, config: ModelConfig, i: int, rotary: RotaryEmbedding) -> MoeDecoderLayer:
        attn = Qwen3Attention(config, i, config.attention_bias, rotary)
        return MoeDecoderLayer(config, attn, "mlp", self._qwen_ffn(config, i))


class OlmoeAttention(Olmo2Attention):
    """OLMo 2's attention (q_norm / k_norm over the whole q and k projections, before the
    rotary) with OLMoE's RMSNorm, which casts to the input dtype before the weight (Llama's
    order; OLMo 2 multiplies in float32)."""

    def __init__(self, config: ModelConfig, layer_idx: int, rotary: RotaryEmbedding) -> None:
        super().__init__(config, layer_idx, config.attention_bias, rotary)
        self.q_norm = RMSNorm(self.qkv_proj.q_size, config.rms_norm_eps)
        self.k_norm = RMSNorm(self.qkv_proj.kv_size, config.rms_norm_eps)


class OlmoeForCausalLM(_MoeForCausalLM):
    """AllenAI OLMoE (OLMoE-1B-7B): pre-norm Llama layers, q/k RMSNorm over all heads, every
    layer sparse (softmax, top-k, renormalised when norm_topk_prob)."""

    # checked before the engine starts (engine/arg_utils.py)
    tensor_parallel_refusal = (
        "OLMoE (OlmoeForCausalLM) does not support tensor_parallel_size > 1: its q_norm / "
        "k_norm span all attention heads; use tensor_parallel_size=1"
    )

    def __init__(self, config: ModelConfig) -> None:
        clip = config.hf_config.get("clip_qkv")
        if clip is not None:
            raise ValueError(f"OLMoE with clip_qkv={clip} is not supported (clip_qkv null only)")
        super().__init__(config)

    def _layer(self, config: ModelConfig, i: int, rotary: RotaryEmbedding) -> MoeDecoderLayer:
        moe = SparseMoeBlock(config.hidden_size, self._experts(config))
        return MoeDecoderLayer(config, OlmoeAttention(config, i, rotary), "mlp", moe)


class GraniteMoeDecoderLayer(MoeDecoderLayer):
    """Granite's layer (each sublayer's output times residual_multiplier before its residual
    add) with the experts as ``block_sparse_moe``."""

    def __init__(self, config: ModelConfig, attn: LlamaAttention, moe: SparseMoeBlock) -> None:
        super().__init__(config, attn, "block_sparse_moe", moe)
        self.residual_multiplier = granite_multiplier(config, "residual_multiplier")

    def forward(
        self, positions: torch.Tensor, x: torch.Tensor, residual: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        return scaled_residual_forward(self, self.block_sparse_moe, positions, x, residual)


class GraniteMoeModel(GraniteModel):
    """GraniteModel's forward (embedding_multiplier) over GraniteMoE layers."""

    def __init__(self, config: ModelConfig, layers: list[GraniteMoeDecoderLayer]) -> None:
        nn.Module.__init__(self)
        self.embed_tokens = VocabEmbedding(config.vocab_size, config.hidden_size)
        self.embedding_multiplier = granite_multiplier(config, "embedding_multiplier")
        self.layers = nn.ModuleList(layers)
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)


class GraniteMoeForCausalLM(_MoeForCausalLM):
    """IBM Granite 3.0 MoE (granite-3.0-1b-a400m, 3b-a800m): Granite's four multipliers
    (models/granite.py) around Mixtral-like layers. The checkpoints store the experts stacked
    (``input_linear`` [E, 2I, H], gate rows first; ``output_linear`` [E, H, I]) and load whole;
    the router takes the top-k logits and a softmax over them, which is the softmax over all
    experts renormalised over the top k."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__(config)
        whole = cast(str, None)
        moe = ".block_sparse_moe."
        self.stacked_params = ((f"{moe}experts.w13.weight", f"{moe}input_linear.weight", whole),
                               (f"{moe}experts.w2.weight", f"{moe}output_linear.weight", whole),
                               (f"{moe}gate.weight", f"{moe}router.layer.weight", whole),
                               (f"{moe}gate.weight", f"{moe}router.weight", whole),
                               *self.stacked_params)
        tied = self.model.embed_tokens if config.tie_word_embeddings else None
        self.lm_head = ScaledLMHead(config, tied)

    def _build_model(self, config: ModelConfig) -> MoeModel:
        rotary = RotaryEmbedding(config.head_dim, rope_settings(config))
        return cast(MoeModel, GraniteMoeModel(config, [self._layer(config, i, rotary)
                                                      for i in range(config.num_hidden_layers)]))

    def _layer(self, config: ModelConfig, i: int, rotary: RotaryEmbedding) -> MoeDecoderLayer:
        bias = config.attention_bias
        attn = LlamaAttention(config, i, bias, bias, rotary)
        attn.attn.scale = granite_multiplier(config, "attention_multiplier")
        moe = SparseMoeBlock(config.hidden_size, self._experts(config))
        return GraniteMoeDecoderLayer(config, attn, moe)

    def prepare_quantization(self, quant_config: QuantizationConfig,
                             device: torch.device | None = None) -> None:
        raise ValueError("GraniteMoE (GraniteMoeForCausalLM): quantized checkpoints are not "
                         "supported (float checkpoints only)")
