"""BERT-family encoders (BERT, RoBERTa, XLM-RoBERTa): embeddings and cross-encoders.

An encoder reads each request's whole prompt in one forward with bidirectional attention,
so it keeps no KV cache: the engine runs it without chunked prefill or prefix caching
(engine/arg_utils.py) and the runner allocates no cache tensors (``uses_kv_cache``). The
step's tokens stay flat, [T, hidden]; attention is torch SDPA with a block-diagonal mask
(each token sees only its own request), the same code on CPU and CUDA.

Token types: a scored pair is ``[CLS] a [SEP] b [SEP]`` with types 0 for ``[CLS] a [SEP]``
and 1 after, as the tokenizer's pair encoding says. Only token ids reach the model, so the
pair's request carries where its second segment starts (models/token_types.py); every other
request is all type 0, a literal ``[SEP]`` inside one text included (transformers' types).
RoBERTa-style checkpoints have one token type, so there it is always 0.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator

import torch
import torch.nn.functional as F
from torch import nn

from modelport.config import ModelConfig
from modelport.layers.attention import get_forward_context
from modelport.models.encoder_config import position_offset
from modelport.models.token_types import current_type_starts
from modelport.models.weights import load_declared_weights
from modelport.pooling_params import num_labels

_ACTIVATIONS = {
    "gelu": lambda x: F.gelu(x),
    "gelu_new": lambda x: F.gelu(x, approximate="tanh"),
    "gelu_pytorch_tanh": lambda x: F.gelu(x, approximate="tanh"),
    "relu": F.relu,
    "silu": F.silu,
}


def _check(config: ModelConfig) -> None:
    """Options of BERT configs that this encoder does not implement: ValueError at load."""
    hf = config.hf_config
    if hf.get("is_decoder") or hf.get("add_cross_attention"):
        raise ValueError(f"{config.architecture}: is_decoder / add_cross_attention are not "
                         "supported; only the bidirectional encoder is")
    kind = hf.get("position_embedding_type", "absolute")
    if kind != "absolute":
        raise ValueError(f"{config.architecture}: position_embedding_type={kind!r} is not "
                         "supported; supported: 'absolute'")
    act = hf.get("hidden_act", "gelu")
    if act not in _ACTIVATIONS:
        raise ValueError(f"{config.architecture}: hidden_act={act!r} is not supported; "
                         f"supported: {', '.join(_ACTIVATIONS)}")
    if config.num_key_value_heads != config.num_attention_heads:
        raise ValueError(f"{config.architecture}: num_key_value_heads must equal "
                         "num_attention_heads")


class _Embeddings(nn.Module):
    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        hf, h = config.hf_config, config.hidden_size
        self.word_embeddings = nn.Embedding(config.vocab_size, h)
        self.position_embeddings = nn.Embedding(config.max_position_embeddings, h)
        self.token_type_embeddings = nn.Embedding(int(hf.get("type_vocab_size", 2)), h)
        self.LayerNorm = nn.LayerNorm(h, eps=float(hf.get("layer_norm_eps", 1e-12)))
        self.offset = position_offset(hf)

    def forward(self, ids: torch.Tensor, positions: torch.Tensor,
                types: torch.Tensor) -> torch.Tensor:
        x = (self.word_embeddings(ids) + self.position_embeddings(positions + self.offset)
             + self.token_type_embeddings(types))
        return self.LayerNorm(x)


class _SelfAttention(nn.Module):
    def __init__(self, h: int) -> None:
        super().__init__()
        self.query = nn.Linear(h, h)
        self.key = nn.Linear(h, h)
        self.value = nn.Linear(h, h)


class _Dense(nn.Module):
    """dense, then LayerNorm over (dense + residual): BERT's post-norm sublayer output."""

    def __init__(self, d_in: int, h: int, eps: float) -> None:
        super().__init__()
        self.dense = nn.Linear(d_in, h)
        self.LayerNorm = nn.LayerNorm(h, eps=eps)

    def forward(self, x: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
        return self.LayerNorm(self.dense(x) + residual)


class _Attention(nn.Module):
    def __init__(self, h: int, eps: float) -> None:
        super().__init__()
        self.self = _SelfAttention(h)
        self.output = _Dense(h, h, eps)


class _Intermediate(nn.Module):
    def __init__(self, h: int, i: int) -> None:
        super().__init__()
        self.dense = nn.Linear(h, i)


class _Layer(nn.Module):
    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        h, i = config.hidden_size, config.intermediate_size
        eps = float(config.hf_config.get("layer_norm_eps", 1e-12))
        self.heads = config.num_attention_heads
        self.act = _ACTIVATIONS[config.hf_config.get("hidden_act", "gelu")]
        self.attention = _Attention(h, eps)
        self.intermediate = _Intermediate(h, i)
        self.output = _Dense(i, h, eps)

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        sa = self.attention.self
        t, h = x.shape
        q, k, v = (lin(x).view(t, self.heads, h // self.heads).transpose(0, 1)
                   for lin in (sa.query, sa.key, sa.value))
        attn = F.scaled_dot_product_attention(q[None], k[None], v[None], attn_mask=mask)
        x = self.attention.output(attn[0].transpose(0, 1).reshape(t, h), x)
        return self.output(self.act(self.intermediate.dense(x)), x)


class _Encoder(nn.Module):
    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.layer = nn.ModuleList(_Layer(config) for _ in range(config.num_hidden_layers))


class _Pooler(nn.Module):
    """BERT's pooler: dense + tanh on the [CLS] row."""

    def __init__(self, h: int) -> None:
        super().__init__()
        self.dense = nn.Linear(h, h)

    def forward(self, cls_rows: torch.Tensor) -> torch.Tensor:
        return torch.tanh(self.dense(cls_rows))


def _segments(positions: torch.Tensor) -> list[int]:
    """Query start locations of the step: the runner's metadata, else (the memory-profiling
    forward, no metadata) a new request wherever the position restarts at 0."""
    meta = get_forward_context().attn_metadata
    if meta is None:
        starts = (positions == 0).nonzero().flatten().tolist()
        if not starts or starts[0] != 0:
            starts = [0]
        return [*starts, positions.shape[0]]
    qsl = meta.query_start_loc_cpu
    for i, seq_len in enumerate(meta.seq_lens_cpu):
        if qsl[i + 1] - qsl[i] != seq_len:
            raise RuntimeError("an encoder must see each request's whole prompt in one step "
                               "(chunked prefill / prefix caching must be off)")
    return list(qsl)


class EncoderBackbone(nn.Module):
    """Embeddings + post-LayerNorm blocks; the HF ``BertModel`` / ``RobertaModel`` names."""

    def __init__(self, config: ModelConfig, with_pooler: bool) -> None:
        super().__init__()
        _check(config)
        self.embeddings = _Embeddings(config)
        self.encoder = _Encoder(config)
        self.pooler = _Pooler(config.hidden_size) if with_pooler else None
        self.typed = self.embeddings.token_type_embeddings.num_embeddings > 1

    def _types(self, positions: torch.Tensor, lens: torch.Tensor) -> torch.Tensor:
        """Type 1 from each request's second-segment start on (its position restarts at 0:
        the whole prompt is in this step), else 0."""
        starts = current_type_starts()
        if not self.typed or starts is None or all(s is None for s in starts):
            return torch.zeros_like(positions)
        if len(starts) != lens.shape[0]:
            raise RuntimeError(f"{len(starts)} token type starts for {lens.shape[0]} requests")
        never = 1 << 30  # past any position: all type 0
        bounds = torch.tensor([never if s is None else s for s in starts],
                              device=positions.device)
        return (positions >= torch.repeat_interleave(bounds, lens)).long()

    def forward(self, ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        qsl = _segments(positions)
        lens = torch.tensor([b - a for a, b in zip(qsl, qsl[1:])], device=ids.device)
        seg = torch.repeat_interleave(torch.arange(len(lens), device=ids.device), lens)
        mask = seg[:, None] == seg[None, :]  # block-diagonal: a request sees only itself
        x = self.embeddings(ids, positions, self._types(positions, lens))
        for layer in self.encoder.layer:
            x = layer(x, mask)
        return x


def _renamed(weights: Iterable[tuple[str, torch.Tensor]], strip: tuple[str, ...]
             ) -> Iterator[tuple[str, torch.Tensor]]:
    """Checkpoint names as our modules spell them: a base-model prefix dropped (embedding
    checkpoints are saved both ways), TF-era LayerNorm gamma / beta as weight / bias."""
    for name, tensor in weights:
        for prefix in strip:
            if name.startswith(prefix):
                name = name[len(prefix):]
                break
        name = name.replace("LayerNorm.gamma", "LayerNorm.weight")
        name = name.replace("LayerNorm.beta", "LayerNorm.bias")
        yield name, tensor


# saved buffers, pre-training heads and (for embedding models) the unused pooler
_SKIP = ("position_ids", "cls.predictions", "cls.seq_relationship", "lm_head.")


class BertModel(EncoderBackbone):
    """An embedding model: the runner pools the last hidden states (see runner/pooler.py;
    the pooling comes from sentence-transformers' config, models/encoder_config.py)."""

    uses_kv_cache = False
    uses_token_types = True  # the runner passes each request's types (models/token_types.py)

    def __init__(self, config: ModelConfig) -> None:
        super().__init__(config, with_pooler=False)
        self.config = config

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """No LM head: the hidden states (what the runner's memory profile asks of a model)."""
        return hidden

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> set[str]:
        return load_declared_weights(self, _renamed(weights, ("bert.", "roberta.")), (),
                                     (*_SKIP, "pooler."))


class RobertaModel(BertModel):
    pass


class XLMRobertaModel(BertModel):
    pass


class BertForSequenceClassification(nn.Module):
    """A cross-encoder / classifier: BERT's pooler (dense + tanh on [CLS]) and a linear
    classifier. The runner pools the [CLS] row and calls :meth:`classify` on it."""

    uses_kv_cache = False
    uses_token_types = True
    base = "bert"

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.config = config
        self.num_labels = num_labels(config.hf_config)
        setattr(self, self.base, EncoderBackbone(config, with_pooler=self.base == "bert"))
        self.classifier = self._head(config.hidden_size)

    def _head(self, h: int) -> nn.Module:
        return nn.Linear(h, self.num_labels)

    def forward(self, ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        return getattr(self, self.base)(ids, positions)

    def classify(self, pooled: torch.Tensor) -> torch.Tensor:
        """Float32 logits [N, num_labels] of the [CLS] rows [N, hidden]."""
        x = pooled.to(self.classifier.weight.dtype)
        return self.classifier(self.bert.pooler(x)).float()

    def classify_tokens(self, rows: torch.Tensor) -> torch.Tensor:
        """Float32 logits [n, num_labels] of every token's row (token_classify): the linear
        classifier on each hidden state, as vLLM's; BERT's pooler (dense + tanh) is only for
        the [CLS] row."""
        return self.classifier(rows.to(self.classifier.weight.dtype)).float()

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.classify(hidden)

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> set[str]:
        return load_declared_weights(self, _renamed(weights, ()), (), _SKIP)


class _RobertaHead(nn.Module):
    """RoBERTa's classification head: dense + tanh + out_proj on <s>."""

    def __init__(self, h: int, n: int) -> None:
        super().__init__()
        self.dense = nn.Linear(h, h)
        self.out_proj = nn.Linear(h, n)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out_proj(torch.tanh(self.dense(x)))


class RobertaForSequenceClassification(BertForSequenceClassification):
    base = "roberta"

    def _head(self, h: int) -> nn.Module:
        return _RobertaHead(h, self.num_labels)

    def classify(self, pooled: torch.Tensor) -> torch.Tensor:
        return self.classifier(pooled.to(self.classifier.dense.weight.dtype)).float()

    def classify_tokens(self, rows: torch.Tensor) -> torch.Tensor:
        """The whole head (dense + tanh + out_proj) on each token's row, as vLLM's."""
        return self.classify(rows)


class XLMRobertaForSequenceClassification(RobertaForSequenceClassification):
    pass
