"""BGE-M3: an XLM-RoBERTa encoder with three retrieval outputs (arXiv 2402.03216).

- dense ("embed"): the [CLS] row, L2-normalized: the runner's CLS pooling, as any encoder;
- sparse ("token_classify"): one lexical weight per token, ``relu(sparse_linear(h))``;
- multi-vector ("token_embed"): ColBERT vectors ``colbert_linear(h)``, L2-normalized each.

The heads are not in model.safetensors: the loader adds ``sparse_linear.pt`` /
``colbert_linear.pt`` from beside it (``secondary_weight_files``), and each head exists only
if its file does (the engine config knows which from the same files:
models/bge_m3_config.py). A head's size comes from its weights (ColBERT's dim may differ
from hidden). Heads run in float32 whatever the backbone's dtype.

Which rows, as vLLM's BgeM3EmbeddingModel: ColBERT vectors drop the leading ``<s>`` (BOS);
sparse weights drop both the leading BOS and the closing ``</s>`` (EOS). FlagEmbedding's
lexical-weights dict (token id -> max weight) is built from the sparse rows by
modelport/lexical_weights.py.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable

import torch
from torch import nn

from modelport.config import ModelConfig
from modelport.models.bert import XLMRobertaModel
from modelport.models.bge_m3_config import HEAD_FILES

logger = logging.getLogger(__name__)

_PREFIXES = tuple(f"{module}." for module, _ in HEAD_FILES.values())


class BgeM3EmbeddingModel(XLMRobertaModel):
    # the loader streams these torch state dicts after the safetensors (loader/hf.py)
    secondary_weight_files = {f: f"{module}." for f, (module, _) in HEAD_FILES.items()}

    def __init__(self, config: ModelConfig) -> None:
        super().__init__(config)
        hf = config.hf_config
        self.bos_token_id = hf.get("bos_token_id", 0)
        self.eos_token_id = hf.get("eos_token_id", 2)
        self.sparse_linear: nn.Linear | None = None
        self.colbert_linear: nn.Linear | None = None

    @property
    def token_tasks(self) -> tuple[str, ...]:
        """The per-token pooling tasks whose head was loaded."""
        return tuple(task for module, task in HEAD_FILES.values()
                     if getattr(self, module) is not None)

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> set[str]:
        heads: dict[str, dict[str, torch.Tensor]] = {}

        def backbone() -> Iterable[tuple[str, torch.Tensor]]:
            for name, tensor in weights:
                if name.startswith(_PREFIXES):
                    module, _, key = name.partition(".")
                    heads.setdefault(module, {})[key] = tensor
                else:
                    yield name, tensor

        loaded = super().load_weights(backbone())
        for module, state in heads.items():
            loaded |= {f"{module}.{k}" for k in self._make_head(module, state)}
        if heads:
            logger.info("BgeM3EmbeddingModel: loaded %s", ", ".join(
                f"{m} ({tuple(self.get_submodule(m).weight.shape)})" for m in heads))
        return loaded

    def _make_head(self, module: str, state: dict[str, torch.Tensor]) -> list[str]:
        weight, bias = state.get("weight"), state.get("bias")
        if weight is None or weight.dim() != 2 or sorted(state) not in (["bias", "weight"],
                                                                        ["weight"]):
            raise ValueError(f"{module}.pt must hold an nn.Linear state dict (weight [out, "
                             f"in], bias [out]); got keys {sorted(state)}")
        out_dim, in_dim = weight.shape
        hidden = self.config.hidden_size
        if in_dim != hidden or (module == "sparse_linear" and out_dim != 1):
            want = "[1, hidden]" if module == "sparse_linear" else "[dim, hidden]"
            raise ValueError(f"{module}.pt: weight shape {list(weight.shape)} does not fit "
                             f"hidden_size {hidden}: expected {want}")
        if bias is not None and list(bias.shape) != [out_dim]:
            raise ValueError(f"{module}.pt: bias shape {list(bias.shape)}, expected [{out_dim}]")
        device = self.embeddings.word_embeddings.weight.device
        head = nn.Linear(in_dim, out_dim, bias=bias is not None, device=device,
                         dtype=torch.float32)
        with torch.no_grad():
            head.weight.copy_(weight)
            if bias is not None:
                head.bias.copy_(bias)
        setattr(self, module, head.eval())
        return list(state)

    def _rows(self, hidden: torch.Tensor, token_ids: list[int], drop_eos: bool
              ) -> torch.Tensor:
        lo = 1 if token_ids and token_ids[0] == self.bos_token_id else 0
        hi = len(token_ids)
        if drop_eos and hi > lo and token_ids[-1] == self.eos_token_id:
            hi -= 1
        return hidden[lo:hi].float()

    def token_classify(self, hidden: torch.Tensor, token_ids: list[int], activation: bool
                       ) -> torch.Tensor:
        """Sparse lexical weights [n, 1] of a prompt's rows (BOS and EOS dropped):
        ``relu(sparse_linear(h))``, or the raw projection without ``activation``."""
        assert self.sparse_linear is not None
        w = self.sparse_linear(self._rows(hidden, token_ids, drop_eos=True))
        return torch.relu(w) if activation else w

    def token_embed(self, hidden: torch.Tensor, token_ids: list[int], normalize: bool
                    ) -> torch.Tensor:
        """ColBERT vectors [n, dim] of a prompt's rows (BOS dropped), L2-normalized each."""
        assert self.colbert_linear is not None
        v = self.colbert_linear(self._rows(hidden, token_ids, drop_eos=False))
        return nn.functional.normalize(v, p=2, dim=-1) if normalize else v
