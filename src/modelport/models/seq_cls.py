"""Sequence classification heads on the decoders (HF ``*ForSequenceClassification``).

The checkpoint is the decoder (``model.*``) plus ``score.weight`` [num_labels, hidden], no
bias, no LM head. ``forward`` returns the final-norm hidden states like the causal LMs; the
pooling runner pools them (LAST token by default, as HF reads the last non-pad token) and
applies :meth:`classify`, so the head runs on one row per request; the per-token task
``token_classify`` runs it on every prompt token's row (:meth:`classify_tokens`).
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn

from modelport.config import ModelConfig
from modelport.models.llama import LlamaForCausalLM, MistralForCausalLM
from modelport.models.qwen2 import Qwen2ForCausalLM
from modelport.models.qwen3 import Qwen3ForCausalLM
from modelport.models.weights import load_declared_weights
from modelport.pooling_params import num_labels


class _SequenceClassification:
    """Mixin over a *ForCausalLM class: its decoder and weight declarations, the LM head
    replaced by ``score``. A plain nn.Linear: the head is tiny and never quantized or split
    across tensor-parallel ranks (each rank computes the whole [num_labels] row)."""

    config: ModelConfig

    def __init__(self, config: ModelConfig) -> None:
        nn.Module.__init__(self)  # type: ignore[arg-type]
        self._check(config)
        self.config = config
        self.model = self._build_model(config)  # type: ignore[attr-defined]
        self.num_labels = num_labels(config.hf_config)
        self.score = nn.Linear(config.hidden_size, self.num_labels, bias=False)

    def _check(self, config: ModelConfig) -> None:
        pass

    def classify(self, pooled: torch.Tensor) -> torch.Tensor:
        """Float32 logits [N, num_labels] of pooled hidden states [N, hidden]."""
        return self.score(pooled.to(self.score.weight.dtype)).float()

    def classify_tokens(self, rows: torch.Tensor) -> torch.Tensor:
        """The head on every token's row [n, hidden] (token_classify): [n, num_labels]."""
        return self.classify(rows)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """The class logits (what the runner's memory profile asks of any model)."""
        return self.classify(hidden)

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> set[str]:
        return load_declared_weights(
            self,
            weights,
            self.stacked_params,  # type: ignore[arg-type,attr-defined]
            (*self.skip_weights, "lm_head."),
        )  # type: ignore[attr-defined]


class LlamaForSequenceClassification(_SequenceClassification, LlamaForCausalLM):
    pass


class MistralForSequenceClassification(_SequenceClassification, MistralForCausalLM):
    pass  # its sliding window: MistralForCausalLM._build_model


class Qwen2ForSequenceClassification(_SequenceClassification, Qwen2ForCausalLM):
    pass


class Qwen3ForSequenceClassification(_SequenceClassification, Qwen3ForCausalLM):
    pass
