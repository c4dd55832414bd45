"""The weight tensors of a llama-style decoder, derived from its ModelConfig.

Names follow GGUF's convention (token_embd, blk.N.attn_q, output, ...) because llama.cpp's
quantization mixes are keyed on them. Each tensor also says how tensor parallelism shards it,
so per-GPU weight bytes come from the same list as the totals.
"""

from __future__ import annotations

from dataclasses import dataclass

from modelport.config import O_PROJ_BIAS, ModelConfig
from modelport.models.moe_config import moe_spec

# How a tensor is split across TP ranks.
COLUMN = "column"  # output features split (q/k/v, gate/up)
ROW = "row"  # input features split (o_proj, down_proj)
KV = "kv"  # k/v projections: split by KV head, replicated when tp exceeds the KV head count
REPLICATED = "replicated"  # norms, the embedding and the LM head


@dataclass(frozen=True)
class TensorSpec:
    """One weight tensor. shape is (out_features, in_features) for matrices, (n,) for vectors."""

    name: str
    kind: str  # "embed" | "output" | "linear" | "norm" | "bias"
    shape: tuple[int, ...]
    split: str
    layer: int | None = None

    @property
    def numel(self) -> int:
        n = 1
        for d in self.shape:
            n *= d
        return n

    @property
    def row_length(self) -> int:
        """Elements per contiguous row (GGUF's ne[0]): block quantizers need it divisible."""
        return self.shape[-1]


def decoder_tensors(model: ModelConfig) -> list[TensorSpec]:
    """Every weight of the model, embedding to lm head (the lm head is absent when tied)."""
    h, inter = model.hidden_size, model.intermediate_size
    q = model.num_attention_heads * model.head_dim
    kv = model.num_key_value_heads * model.head_dim
    # the embedding and the LM head stay whole on every rank (parallel/tensor_parallel.py)
    out = [TensorSpec("token_embd.weight", "embed", (model.vocab_size, h), REPLICATED)]
    starcoder2 = model.architecture == "Starcoder2ForCausalLM"
    for i in range(model.num_hidden_layers):
        p = f"blk.{i}."
        out += [
            TensorSpec(p + "attn_norm.weight", "norm", (h,), REPLICATED, i),
            TensorSpec(p + "attn_q.weight", "linear", (q, h), COLUMN, i),
            TensorSpec(p + "attn_k.weight", "linear", (kv, h), KV, i),
            TensorSpec(p + "attn_v.weight", "linear", (kv, h), KV, i),
            TensorSpec(p + "attn_output.weight", "linear", (h, q), ROW, i),
            TensorSpec(p + "ffn_norm.weight", "norm", (h,), REPLICATED, i),
        ]
        out += _ffn_tensors(model, i, inter)
        if model.attention_bias:
            out += [
                TensorSpec(p + "attn_q.bias", "bias", (q,), COLUMN, i),
                TensorSpec(p + "attn_k.bias", "bias", (kv,), KV, i),
                TensorSpec(p + "attn_v.bias", "bias", (kv,), KV, i),
            ]
            if model.architecture in O_PROJ_BIAS:
                out.append(TensorSpec(p + "attn_output.bias", "bias", (h,), REPLICATED, i))
        if starcoder2:  # LayerNorm biases; use_bias: o, c_fc and c_proj biases too
            out += [TensorSpec(p + "attn_norm.bias", "bias", (h,), REPLICATED, i),
                    TensorSpec(p + "ffn_norm.bias", "bias", (h,), REPLICATED, i)]
            if model.attention_bias:
                out += [TensorSpec(p + "attn_output.bias", "bias", (h,), REPLICATED, i),
                        TensorSpec(p + "ffn_up.bias", "bias", (inter,), COLUMN, i),
                        TensorSpec(p + "ffn_down.bias", "bias", (h,), REPLICATED, i)]
    out.append(TensorSpec("output_norm.weight", "norm", (h,), REPLICATED))
    if starcoder2:
        out.append(TensorSpec("output_norm.bias", "bias", (h,), REPLICATED))
    if not model.tie_word_embeddings:
        out.append(TensorSpec("output.weight", "output", (model.vocab_size, h), REPLICATED))
    return out


def _ffn_tensors(model: ModelConfig, i: int, inter: int) -> list[TensorSpec]:
    """Layer i's feed-forward weights: a SwiGLU MLP, or a mixture-of-experts layer's router,
    every expert (one 2-D spec each, as the rest of the planner expects) and shared expert."""
    h, p = model.hidden_size, f"blk.{i}."

    def mlp(tag: str, size: int) -> list[TensorSpec]:
        return [TensorSpec(p + f"ffn_gate{tag}.weight", "linear", (size, h), COLUMN, i),
                TensorSpec(p + f"ffn_up{tag}.weight", "linear", (size, h), COLUMN, i),
                TensorSpec(p + f"ffn_down{tag}.weight", "linear", (h, size), ROW, i)]

    moe = moe_spec(model)
    if model.architecture == "Starcoder2ForCausalLM":  # c_fc, c_proj: no gate
        return mlp("", inter)[1:]
    if moe is None or i not in moe.sparse_layers:
        return mlp("", inter)
    out = [TensorSpec(p + "ffn_gate_inp.weight", "linear", (moe.num_experts, h), REPLICATED, i)]
    for e in range(moe.num_experts):
        out += mlp(f"_exps.{e}", moe.expert_intermediate_size)
    if moe.shared_intermediate_size:
        out += mlp("_shexp", moe.shared_intermediate_size)
        out.append(TensorSpec(p + "ffn_gate_inp_shexp.weight", "linear", (1, h), REPLICATED, i))
    return out


def tp_share(t: TensorSpec, model: ModelConfig, tp: int) -> float:
    """Fraction of the tensor's bytes that one of tp ranks holds."""
    if t.split == REPLICATED or tp == 1:
        return 1.0
    if t.split == KV:
        kv_heads = model.num_key_value_heads
        return max(1, kv_heads // tp) / kv_heads
    return 1.0 / tp
