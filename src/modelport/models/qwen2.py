"""Qwen2 / Qwen2.5: the Llama decoder with bias on q, k and v (never on o_proj); with
``use_sliding_window`` the layers from ``max_window_layers`` on slide (models/sliding.py)."""

from __future__ import annotations

from modelport.config import ModelConfig
from modelport.models.llama import LlamaForCausalLM, LlamaModel
from modelport.models.sliding import qwen_windows


class Qwen2ForCausalLM(LlamaForCausalLM):
    def _build_model(self, config: ModelConfig) -> LlamaModel:
        return LlamaModel(config, qkv_bias=True, o_bias=False, layer_windows=qwen_windows(config))
