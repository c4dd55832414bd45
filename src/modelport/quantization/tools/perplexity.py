"""Perplexity of a model on a text, through the engine's prompt logprobs.

The text is tokenized once and cut into windows of ``max_length`` tokens (no overlap); each
window is one request with ``prompt_logprobs=0`` and ``max_tokens=1``, so every token after a
window's first is scored by the engine exactly as served (same kernels, same quantization).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class PerplexityResult:
    perplexity: float
    nll: float  # mean negative log-likelihood per scored token (nats)
    tokens: int  # scored tokens
    windows: int


def windows_of(ids: list[int], max_length: int) -> list[list[int]]:
    if max_length < 2:
        raise ValueError(f"max_length must be >= 2, got {max_length}")
    out = [ids[i : i + max_length] for i in range(0, len(ids), max_length)]
    return [w for w in out if len(w) >= 2]


def perplexity(llm: Any, text: str, max_length: int = 512) -> PerplexityResult:
    """``llm`` is a modelport.LLM; its tokenizer and engine score the text."""
    from modelport.sampling_params import SamplingParams

    engine_cfg = getattr(getattr(llm, "llm_engine", None), "config", None)
    if engine_cfg is not None:  # a window plus the one generated token must fit the context
        max_length = min(max_length, engine_cfg.scheduler_config.max_model_len - 1)
    tok = llm.get_tokenizer()
    ids = tok.encode(text, add_special_tokens=False) if hasattr(tok, "encode") else tok(text)
    wins = windows_of(list(ids), max_length)
    if not wins:
        raise ValueError("the text is too short to score (needs at least 2 tokens)")
    params = SamplingParams(temperature=0, max_tokens=1, prompt_logprobs=0)
    outs = llm.generate(prompt_token_ids=wins, sampling_params=params, use_tqdm=False)
    total, count = 0.0, 0
    for win, out in zip(wins, outs):
        lps = out.prompt_logprobs or []
        for pos, entry in enumerate(lps):
            if entry is None:
                continue
            total -= entry[win[pos]].logprob
            count += 1
    if count == 0:
        raise ValueError("the engine returned no prompt logprobs")
    nll = total / count
    return PerplexityResult(math.exp(nll), nll, count, len(wins))
