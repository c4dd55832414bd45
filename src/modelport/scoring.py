"""What LLM.score and the /score and /rerank routes share: vLLM's pairing rules, the
cross-encoder's pair tokenization and the bi-encoder's cosine score.

A cross-encoder (a classification model with one label) reads the pair as one prompt, the
way its tokenizer joins a text pair (``tokenizer(text, text_pair)``: BOS / SEP / EOS as the
tokenizer's post-processor says), and its sigmoid is the score. An embedding model embeds
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
    return list(tokenizer(first, text_pair=second, add_special_tokens=True)["input_ids"])


def cosine(a: Sequence[float], b: Sequence[float]) -> float:
    """Cosine similarity in float32 (vLLM's bi-encoder score)."""
    import torch
    import torch.nn.functional as F

    x = torch.as_tensor(a, dtype=torch.float32)
    y = torch.as_tensor(b, dtype=torch.float32)
    return float(F.cosine_similarity(x, y, dim=0).item())
