"""Lazy model registry: HF architecture name -> (module, class), imported on first use.

Lazy so that importing the registry (e.g. to validate a config in the HTTP process) costs
nothing and a broken optional model file cannot break the others.
"""

from __future__ import annotations

import importlib

from torch import nn

_MODELS: dict[str, tuple[str, str]] = {
    "LlamaForCausalLM": ("modelport.models.llama", "LlamaForCausalLM"),
    "MistralForCausalLM": ("modelport.models.llama", "MistralForCausalLM"),
    "SmolLM3ForCausalLM": ("modelport.models.smollm3", "SmolLM3ForCausalLM"),
    "Qwen2ForCausalLM": ("modelport.models.qwen2", "Qwen2ForCausalLM"),
    "Qwen3ForCausalLM": ("modelport.models.qwen3", "Qwen3ForCausalLM"),
    # Gemma 1 / 2 / 3 (text): see models/gemma.py
    "GemmaForCausalLM": ("modelport.models.gemma", "GemmaForCausalLM"),
    "Gemma2ForCausalLM": ("modelport.models.gemma", "Gemma2ForCausalLM"),
    "Gemma3ForCausalLM": ("modelport.models.gemma", "Gemma3ForCausalLM"),
    # Gemma 3 4B / 12B / 27B (multimodal checkpoints) served text-only
    "Gemma3ForConditionalGeneration": ("modelport.models.gemma", "Gemma3ForConditionalGeneration"),
    # mixture of experts: see models/moe.py
    "MixtralForCausalLM": ("modelport.models.moe", "MixtralForCausalLM"),
    "Qwen2MoeForCausalLM": ("modelport.models.moe", "Qwen2MoeForCausalLM"),
    "Qwen3MoeForCausalLM": ("modelport.models.moe", "Qwen3MoeForCausalLM"),
    "OlmoeForCausalLM": ("modelport.models.moe", "OlmoeForCausalLM"),
    "GraniteMoeForCausalLM": ("modelport.models.moe", "GraniteMoeForCausalLM"),
    "Phi3ForCausalLM": ("modelport.models.phi3", "Phi3ForCausalLM"),
    "GraniteForCausalLM": ("modelport.models.granite", "GraniteForCausalLM"),
    "Olmo2ForCausalLM": ("modelport.models.olmo2", "Olmo2ForCausalLM"),
    "Starcoder2ForCausalLM": ("modelport.models.starcoder2", "Starcoder2ForCausalLM"),
    # classification heads (runner "pooling"): see models/seq_cls.py
    "LlamaForSequenceClassification": (
        "modelport.models.seq_cls",
        "LlamaForSequenceClassification",
    ),
    "MistralForSequenceClassification": (
        "modelport.models.seq_cls",
        "MistralForSequenceClassification",
    ),
    "Qwen2ForSequenceClassification": (
        "modelport.models.seq_cls",
        "Qwen2ForSequenceClassification",
    ),
    "Qwen3ForSequenceClassification": (
        "modelport.models.seq_cls",
        "Qwen3ForSequenceClassification",
    ),
    # BERT-family encoders (runner "pooling"): see models/bert.py
    "BertModel": ("modelport.models.bert", "BertModel"),
    "RobertaModel": ("modelport.models.bert", "RobertaModel"),
    "XLMRobertaModel": ("modelport.models.bert", "XLMRobertaModel"),
    "BgeM3EmbeddingModel": ("modelport.models.bge_m3", "BgeM3EmbeddingModel"),
    "BertForSequenceClassification": ("modelport.models.bert", "BertForSequenceClassification"),
    "RobertaForSequenceClassification": (
        "modelport.models.bert",
        "RobertaForSequenceClassification",
    ),
    "XLMRobertaForSequenceClassification": (
        "modelport.models.bert",
        "XLMRobertaForSequenceClassification",
    ),
}

SUPPORTED_ARCHITECTURES: tuple[str, ...] = tuple(_MODELS)


def get_model_class(architecture: str) -> type[nn.Module]:
    """The model class for an HF ``architectures[0]`` name; ValueError lists what we support."""
    try:
        module_name, class_name = _MODELS[architecture]
    except KeyError:
        raise ValueError(
            f"unsupported model architecture {architecture!r}; supported: "
            f"{', '.join(SUPPORTED_ARCHITECTURES)}"
        ) from None
    return getattr(importlib.import_module(module_name), class_name)
