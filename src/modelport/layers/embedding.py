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


REFINE_TOPK = 8  # logits recomputed from exact_weight per row (see LMHead)


class LMHead(nn.Module):
    """Projects hidden states to vocabulary logits, always returned as float32 for sampling.

    With tied embeddings the head holds no weight of its own: it reuses the embedding's
    Parameter object, so loading and moving the model keep the two identical.

    ``exact_weight`` (a plain attribute, None by default): a wider copy of a narrowed weight
    (the fp32 embedding table behind a bf16 head). The REFINE_TOPK largest logits of each
    row are then recomputed from it in fp32, so greedy picks and the top logprobs are those
    of the wide head while the matmul over the whole vocabulary reads half the bytes.
    """

    exact_weight: torch.Tensor | None = None
    # an int8 copy of exact_weight for greedy steps (layers/cpu_fast.py Int8GreedyHead)
    int8_greedy: object | None = None

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
        logits = F.linear(hidden.to(self.weight.dtype), self.weight).float()
        exact = self.exact_weight
        if exact is not None and logits.shape[0]:
            top = logits.topk(min(REFINE_TOPK, logits.shape[-1]), dim=-1).indices
            wide = torch.einsum("td,tkd->tk", hidden.to(exact.dtype), exact[top])
            logits.scatter_(1, top, wide.float())
        return logits

    def greedy(self, hidden: torch.Tensor) -> torch.Tensor | None:
        """The argmax of forward(hidden) for each row of a plain-greedy CPU step, without the
        full-vocabulary bf16 matmul (see cpu_fast.Int8GreedyHead): the fp32 refine's argmax
        over every token an int8 screen cannot rule out. None: use forward (no exact weight,
        the switch off, or a row with too many candidates)."""
        from modelport.layers import cpu_fast

        exact = self.exact_weight
        if (exact is None or not cpu_fast.GREEDY_INT8_HEAD or hidden.device.type != "cpu"
                or not hidden.shape[0]):
            return None
        if self.int8_greedy is None:
            self.int8_greedy = cpu_fast.Int8GreedyHead.calibrated(exact, hidden)
        cands = self.int8_greedy.candidates(hidden)  # type: ignore[attr-defined]
        if cands is None:
            return None
        return cpu_fast.greedy_from_candidates(hidden, exact, cands, REFINE_TOPK)
