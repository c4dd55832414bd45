"""Qwen2 / Qwen2.5: the Llama decoder with bias on q, k and v (never on o_proj)."""

from __future__ import annotations

from modelport.config import ModelConfig
from modelport.models.llama import LlamaForCausalLM, LlamaModel


class Qwen2ForCausalLM(LlamaForCausalLM):
    def _build_model(self, config: ModelConfig) -> LlamaModel:
        if config.hf_config.get("use_sliding_window"):
            raise ValueError(
                "Qwen2 with use_sliding_window=true is not supported (full attention only)"
            )
        return LlamaModel(config, qkv_bias=True, o_bias=False)
