"""ModelConfig.num_params (the server's start-up log line) equals the real parameter count of
tiny random HF models: every expert, router and shared expert of the MoE families, and the
extra norms / biases / tied heads of the dense ones."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from modelport.loader import load_model_config, resolve_model
from modelport.models.moe_config import active_params, moe_spec

COMMON = dict(vocab_size=259, hidden_size=64, num_attention_heads=4, num_key_value_heads=2,
              max_position_embeddings=256, num_hidden_layers=2, bos_token_id=256,
              eos_token_id=257, pad_token_id=258)


def _hf_config(family: str) -> Any:
    import transformers as tf

    dense = dict(COMMON, intermediate_size=128)
    moe = dict(COMMON, num_experts_per_tok=2)
    return {
        "llama": lambda: tf.LlamaConfig(**dense),
        "llama_bias": lambda: tf.LlamaConfig(attention_bias=True, **dense),  # o_proj's too
        "qwen2": lambda: tf.Qwen2Config(**dense),
        "qwen3": lambda: tf.Qwen3Config(head_dim=16, **dense),
        "gemma": lambda: tf.GemmaConfig(head_dim=16, **dense),
        "gemma2": lambda: tf.Gemma2Config(head_dim=16, **dense),
        "gemma3": lambda: tf.Gemma3TextConfig(head_dim=16, **dense),
        "phi3": lambda: tf.Phi3Config(**dense),
        "granite": lambda: tf.GraniteConfig(**dense),
        "olmo2": lambda: tf.Olmo2Config(**dense),
        "mistral": lambda: tf.MistralConfig(**dense),
        "smollm3": lambda: tf.SmolLM3Config(**dense),
        "smollm3_bias": lambda: tf.SmolLM3Config(attention_bias=True, **dense),
        "starcoder2": lambda: tf.Starcoder2Config(**dense),  # biases, LayerNorms, no gate
        "starcoder2_nobias": lambda: tf.Starcoder2Config(use_bias=False, **dense),
        "mixtral": lambda: tf.MixtralConfig(intermediate_size=64, num_local_experts=4, **moe),
        # layer 1 dense, a shared expert (and its gate) on layer 0, q/k/v biases
        "qwen2_moe": lambda: tf.Qwen2MoeConfig(
            intermediate_size=128, moe_intermediate_size=48, shared_expert_intermediate_size=96,
            num_experts=4, mlp_only_layers=[1], **moe),
        "qwen3_moe": lambda: tf.Qwen3MoeConfig(intermediate_size=128, moe_intermediate_size=64,
                                               num_experts=6, head_dim=16, **moe),
        # q/k norms over the whole projections
        "olmoe": lambda: tf.OlmoeConfig(intermediate_size=48, num_experts=4, **moe),
        "granitemoe": lambda: tf.GraniteMoeConfig(intermediate_size=48, num_local_experts=4,
                                                  **moe),
    }[family]()


FAMILIES = ("llama", "llama_bias", "qwen2", "qwen3", "gemma", "gemma2", "gemma3", "phi3", "granite", "olmo2",
            "mistral", "smollm3", "smollm3_bias", "starcoder2", "starcoder2_nobias", "mixtral", "qwen2_moe",
            "qwen3_moe", "olmoe", "granitemoe")


@pytest.mark.parametrize("family", FAMILIES)
def test_num_params_is_the_checkpoints_count(family: str, tmp_path: Path) -> None:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_config(_hf_config(family))
    model.save_pretrained(tmp_path)
    real = sum(p.numel() for p in model.parameters())  # a tied head is one parameter
    cfg = load_model_config(resolve_model(str(tmp_path)))
    assert cfg.num_params == real
    spec = moe_spec(cfg)
    if spec is None:
        assert active_params(cfg) == real
        return
    # a token visits top-k experts of each sparse layer; the count above holds all of them
    experts = {n: p.numel() for n, p in model.named_parameters() if ".experts." in n}
    per_expert = sum(experts.values()) // (spec.num_experts * len(spec.sparse_layers))
    idle = (spec.num_experts - spec.top_k) * per_expert * len(spec.sparse_layers)
    assert active_params(cfg) == real - idle < real
