"""Token embedding and LM head; kept apart from nn.Embedding so vocab parallelism can swap them."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class VocabEmbedding(nn.Module):
    def __init__(self, vocab_size: int, hidden_size: int) -> None:
        super().__init__()
        self.vocab_size = vocab_size
        self.weight = nn.Parameter(torch.empty(vocab_size, hidden_size), requires_grad=False)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return F.embedding(input_ids, self.weight)


class LMHead(nn.Module):
    """Projects hidden states to vocabulary logits, always returned as float32 for sampling.

    With tied embeddings the head holds no weight of its own: it reuses the embedding's
    Parameter object, so loading and moving the model keep the two identical.
    """

    def __init__(
        self, vocab_size: int, hidden_size: int, tied_to: VocabEmbedding | None = None
    ) -> None:
        super().__init__()
        if tied_to is not None:
            self.weight = tied_to.weight
        else:
            self.weight = nn.Parameter(torch.empty(vocab_size, hidden_size), requires_grad=False)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        # the weight may be narrower than the activations (a bf16 head beside a kept-GGUF
        # model's fp32 activations on CPU): the matmul runs in the weight's dtype
        return F.linear(hidden.to(self.weight.dtype), self.weight).float()
