"""What LLM.score and the /score and /rerank routes share: vLLM's pairing rules, the
cross-encoder's pair tokenization and the bi-encoder's cosine score.

A cross-encoder (a classification model with one label) reads the pair as one prompt, the
way its tokenizer joins a text pair (``tokenizer(text, text_pair)``: BOS / SEP / EOS as the
tokenizer's post-processor says, token types as it says them), and its sigmoid is the
score. ``truncate_prompt_tokens`` truncates the pair as transformers does ('longest_first'),
never by cutting the joined ids. An embedding model embeds
each side and scores by the cosine similarity of the two vectors.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any


def score_pairs(data_1: str | Sequence[str], data_2: str | Sequence[str]) -> list[tuple[str, str]]:
    """vLLM's 1:1, 1:N and N:N rules: one first text goes with every second text; N first
    texts go one to one with N second texts. ValueError (vLLM's words) otherwise."""
    firsts = [data_1] if isinstance(data_1, str) else list(data_1)
    seconds = [data_2] if isinstance(data_2, str) else list(data_2)
    for side in (firsts, seconds):
        bad = [t for t in side if not isinstance(t, str)]
        if bad:
            raise ValueError(f"score inputs must be strings, got {type(bad[0]).__name__}")
    if len(firsts) > 1 and len(firsts) != len(seconds):
        raise ValueError("Input lengths must be either 1:1, 1:N or N:N")
    if not firsts:
        raise ValueError("At least one text element must be given")
    if not seconds:
        raise ValueError("At least one text_pair element must be given")
    if len(firsts) == 1:
        firsts = firsts * len(seconds)
    return list(zip(firsts, seconds))


def pair_token_ids(tokenizer: Any, first: str, second: str) -> list[int]:
    """The cross-encoder's prompt: the tokenizer's own encoding of the text pair."""
    return pair_encoding(tokenizer, first, second)[0]


def pair_encoding(tokenizer: Any, first: str, second: str, max_length: int | None = None
                  ) -> tuple[list[int], int | None]:
    """The tokenizer's encoding of the text pair: (ids, where token type 1 starts, None when
    the tokenizer gives no types or all 0; see models/token_types.py).

    ``max_length``: truncate as transformers does by default (``truncation=True``, i.e.
    'longest_first': a token at a time from the longer text) to at most that many tokens,
    specials included. ValueError when the pair's special tokens alone do not fit."""
    from modelport.models.token_types import compress_token_types

    kw: dict[str, Any] = {}
    if max_length is not None:
        kw = {"truncation": "longest_first", "max_length": max_length}
    enc = tokenizer(first, text_pair=second, add_special_tokens=True, **kw)
    ids = list(enc["input_ids"])
    if max_length is not None and len(ids) > max_length:  # the tokenizer gave up (logged)
        raise ValueError(f"truncate_prompt_tokens ({max_length}) is too small for this text "
                         f"pair: it cannot be truncated below {len(ids)} tokens")
    types = enc.get("token_type_ids") if hasattr(enc, "get") else None
    return ids, compress_token_types(types, len(ids))


def pair_truncation(keep: int | None, max_model_len: int) -> int | None:
    """The length a scored pair is truncated to, from vLLM's ``truncate_prompt_tokens``
    (None: no truncation, -1: max_model_len); ValueError as the single-prompt truncation."""
    if keep is None:
        return None
    if keep == -1:
        return max_model_len
    if keep < 1:
        raise ValueError(f"truncate_prompt_tokens must be -1 (max_model_len) or >= 1, got {keep}")
    if keep > max_model_len:
        raise ValueError(f"truncate_prompt_tokens ({keep}) is greater than max_model_len "
                         f"({max_model_len}); give a smaller value, or -1 for max_model_len")
    return keep


def cosine(a: Sequence[float], b: Sequence[float]) -> float:
    """Cosine similarity in float32 (vLLM's bi-encoder score)."""
    import torch
    import torch.nn.functional as F

    x = torch.as_tensor(a, dtype=torch.float32)
    y = torch.as_tensor(b, dtype=torch.float32)
    return float(F.cosine_similarity(x, y, dim=0).item())
