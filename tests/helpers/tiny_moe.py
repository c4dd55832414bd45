"""Tiny random MoE checkpoints (HF transformers, saved per expert) for the MoE tests: Mixtral
(experts only), Qwen2-MoE (q/k/v bias, a shared expert behind its sigmoid gate, layer 1 a
dense MLP), Qwen3-MoE (q/k norms; decoder_sparse_step 2: layers 1 and 3 sparse), OLMoE (q/k
norms over the whole projections) and GraniteMoE (Granite's multipliers; experts saved
stacked). Hidden 64, 4 heads / 2 KV heads, 8 experts, top-2."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from helpers.tiny_models import TINY_VOCAB, _save
from modelport.config import ModelConfig

COMMON = dict(vocab_size=TINY_VOCAB, hidden_size=64, num_attention_heads=4, num_key_value_heads=2,
              max_position_embeddings=512, rms_norm_eps=1e-6, bos_token_id=256, eos_token_id=257,
              pad_token_id=258, initializer_range=0.05, num_experts_per_tok=2)
ARCH_NAMES = {"mixtral": "MixtralForCausalLM", "qwen2_moe": "Qwen2MoeForCausalLM",
              "qwen3_moe": "Qwen3MoeForCausalLM", "olmoe": "OlmoeForCausalLM",
              "granitemoe": "GraniteMoeForCausalLM"}


def tiny_moe_hf_config(arch: str, **kw: Any) -> Any:
    import transformers as tf

    if arch == "mixtral":
        return tf.MixtralConfig(**{**COMMON, "num_hidden_layers": 2, "intermediate_size": 96,
                                   "num_local_experts": 8, **kw})
    if arch == "qwen2_moe":
        return tf.Qwen2MoeConfig(**{**COMMON, "num_hidden_layers": 3, "intermediate_size": 128,
                                    "moe_intermediate_size": 48,
                                    "shared_expert_intermediate_size": 80, "num_experts": 8,
                                    "mlp_only_layers": [1], **kw})
    if arch == "olmoe":  # q/k norms over the whole projections, norm_topk_prob off
        return tf.OlmoeConfig(**{**COMMON, "num_hidden_layers": 2, "intermediate_size": 48,
                                 "num_experts": 8, "tie_word_embeddings": False, **kw})
    if arch == "granitemoe":  # Granite's multipliers, experts stacked in the checkpoint
        return tf.GraniteMoeConfig(**{**COMMON, "num_hidden_layers": 2, "intermediate_size": 48,
                                      "num_local_experts": 8, "embedding_multiplier": 6.0,
                                      "residual_multiplier": 0.3, "attention_multiplier": 0.05,
                                      "logits_scaling": 4.0, "tie_word_embeddings": True, **kw})
    return tf.Qwen3MoeConfig(**{**COMMON, "num_hidden_layers": 4, "intermediate_size": 128,
                                "moe_intermediate_size": 48, "num_experts": 8, "head_dim": 32,
                                "decoder_sparse_step": 2, "norm_topk_prob": True, **kw})


def tiny_moe_config(arch: str, **kw: Any) -> ModelConfig:
    d = tiny_moe_hf_config(arch, **kw).to_dict()
    d["architectures"] = [ARCH_NAMES[arch]]
    return ModelConfig.from_hf_dict(d)


def make_tiny_moe_dir(path: Path, arch: str, seed: int = 0, **kw: Any) -> Path:
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(tiny_moe_hf_config(arch, **kw)).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith((".gate.weight", "shared_expert_gate.weight", ".router.weight")):
                p.mul_(20.0)  # decisive routing: no near-ties for rounding to flip
            elif name.endswith("_proj.bias"):
                p.normal_(0.0, 0.05)  # HF zero-initialises them: make their loading visible
            elif arch == "olmoe" and name.endswith(("q_norm.weight", "k_norm.weight")):
                p.normal_(1.0, 0.3)  # HF initialises them to ones: make their loading visible
    return _save(model, Path(path), with_tokenizer=True)


def random_quant_experts(g: torch.Generator, e: int, h: int, i: int, group: int,
                         fp8_std: float, scale_span: float, zero_span: float
                         ) -> tuple[list[tuple[torch.Tensor, ...]], list[tuple[Any, Any]]]:
    """e experts' random weights, drawn from g: per-channel FP8 (w13 [2i, h] and w2 [h, i]
    codes and scales, normal weights of std fp8_std) and 4-bit GroupQuant codes in groups
    of ``group`` (scales in [0.001, 0.001 + scale_span), zeros in (-zero_span, 0])."""
    from modelport.quantization.fp8 import quantize_fp8_per_channel
    from modelport.quantization.kernels import GroupQuant

    def gq(n: int, k: int) -> GroupQuant:
        return GroupQuant(torch.randint(0, 16, (n, k), generator=g, dtype=torch.uint8),
                          torch.rand(n, k // group, generator=g) * scale_span + 0.001,
                          -torch.rand(n, k // group, generator=g) * zero_span, group, 4)

    fp8 = []
    for _ in range(e):
        a = quantize_fp8_per_channel(torch.randn(2 * i, h, generator=g) * fp8_std)
        b = quantize_fp8_per_channel(torch.randn(h, i, generator=g) * fp8_std)
        fp8.append((a[0], a[1], b[0], b[1]))
    return fp8, [(gq(2 * i, h), gq(h, i)) for _ in range(e)]
