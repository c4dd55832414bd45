"""BGE-M3's lexical weights as FlagEmbedding's ``BGEM3FlagModel.encode(return_sparse=True)``
gives them: ``{token id (a string): weight}``, each token's largest weight over its
occurrences, leaving out the special tokens (CLS / BOS, EOS, PAD, UNK) and zero weights.

The server and ``LLM.encode(..., pooling_task="token_classify")`` answer with vLLM's rows (one
weight per prompt token, the leading BOS and closing EOS dropped: models/bge_m3.py); this
turns one such output into the dict, on the client's side, as vLLM's users do. Pure Python.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any


def lexical_weights(prompt_token_ids: Sequence[int], weights: Any, tokenizer: Any
                    ) -> dict[str, float]:
    """The lexical-weights dict of one prompt.

    ``weights``: its token_classify output (``PoolingRequestOutput.outputs.data`` [n, 1] or
    the server's ``data``), ``prompt_token_ids`` the prompt it came from, ``tokenizer`` the
    model's (``LLM.get_tokenizer()`` or a Hugging Face tokenizer): its special token ids are
    the ones left out."""
    rows = weights.tolist() if hasattr(weights, "tolist") else list(weights)
    values = [float(r[0]) if isinstance(r, (list, tuple)) else float(r) for r in rows]
    ids = list(prompt_token_ids)
    bos = _token_id(tokenizer, "bos_token_id", "cls_token_id")
    eos = _token_id(tokenizer, "eos_token_id", "sep_token_id")
    lo = 1 if ids and ids[0] == bos else 0
    hi = len(ids) - 1 if len(ids) > lo and ids[-1] == eos else len(ids)
    kept = ids[lo:hi]
    if len(kept) != len(values):
        raise ValueError(f"{len(values)} weights for {len(kept)} prompt tokens (after the "
                         "leading BOS and closing EOS): give the token_classify output of "
                         "this prompt")
    skip = {_token_id(tokenizer, name) for name in
            ("cls_token_id", "bos_token_id", "eos_token_id", "pad_token_id", "unk_token_id")}
    skip.discard(None)
    out: dict[str, float] = {}
    for tid, w in zip(kept, values):
        if tid in skip or w <= 0:
            continue
        key = str(tid)
        if w > out.get(key, 0.0):
            out[key] = w
    return out


def _token_id(tokenizer: Any, *names: str) -> int | None:
    for name in names:
        value = getattr(tokenizer, name, None)
        if isinstance(value, int):
            return value
    return None
