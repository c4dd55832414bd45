"""Checking a speculative step's draft tokens against the model (speculative sampling).

Row i of a request's logits follows its last token and drafts[:i]. A greedy request keeps a
draft while it equals the argmax there, so its output is exactly what plain decoding gives.
A sampled request keeps draft i with probability p_i(draft_i) (p after temperature and the
top-k / top-p / min-p filters) and otherwise draws from p_i without draft_i: for a proposal
that is one token (an n-gram guess) this is the speculative-sampling rule of Leviathan et
al. / Chen et al., so each emitted token is distributed as p, whatever the drafts were.
The row after the last kept draft gives one more token: the first rejected position's
redraw, or, when every draft is kept, a sample from the row after them.
"""

from __future__ import annotations

import torch

from modelport.runner.sampler import (
    add_logit_bias,
    apply_top_k_top_p_min_p,
    banned_bad_words,
    greedy_tokens,
    keep_only,
    to_device,
)
from modelport.sampling_params import SamplingParams


def verify(logits: torch.Tensor, draft: list[int], params: SamplingParams,
           generator: torch.Generator | None,
           output_token_ids: list[int] | None = None) -> torch.Tensor:
    """logits [d + 1, V] float32 -> [2d + 1] int64 on the logits' device: d keep flags (1/0)
    for the drafts, then d + 1 alternative tokens (row i's token if draft i is the first
    rejected; the last row's if none is). output_token_ids: the request's tokens so far
    (multi-token bad_words look at them, and at the drafts before each row)."""
    d = len(draft)
    dev = logits.device
    # every row is a position the request samples at: each gets what the sampler applies
    if params.allowed_token_ids or params.bad_words_token_ids or params.logit_bias:
        logits = logits.clone()
    if params.allowed_token_ids:
        keep_only(logits, params.allowed_token_ids)
    if params.bad_words_token_ids:
        m = max(len(w) for w in params.bad_words_token_ids) - 1  # tokens a word looks back
        past = list(output_token_ids or ())[-m:] if m else []
        ban_rows: list[int] = []
        ban_cols: list[int] = []
        for i in range(d + 1):  # row i follows the drafts before it
            banned = banned_bad_words(params.bad_words_token_ids, past + draft[:i])
            ban_rows += [i] * len(banned)
            ban_cols += banned
        if ban_cols:
            logits[to_device(torch.tensor(ban_rows), dev),
                   to_device(torch.tensor(ban_cols), dev)] = float("-inf")
    if params.logit_bias:
        add_logit_bias(logits, params.logit_bias)
    draft_t = to_device(torch.tensor(draft, dtype=torch.long), dev)
    if params.greedy:
        alt = greedy_tokens(logits)
        keep = alt[:d] == draft_t
        return torch.cat([keep.long(), alt])
    n = d + 1
    scaled = logits / params.temperature
    scaled = apply_top_k_top_p_min_p(
        scaled,
        torch.full((n,), params.top_k, dtype=torch.long, device=dev),
        torch.full((n,), params.top_p, dtype=scaled.dtype, device=dev),
        torch.full((n,), params.min_p, dtype=scaled.dtype, device=dev),
        need_sort=params.top_k > 0 or params.top_p < 1.0, need_min_p=params.min_p > 0,
    )
    probs = scaled.softmax(dim=-1)
    rows = torch.arange(d, device=dev)
    p_draft = probs[rows, draft_t]
    u = torch.rand(d, device=dev, generator=generator)
    keep = u < p_draft
    residual = probs.clone()
    residual[rows, draft_t] = 0.0  # the draft was rejected: draw from p without it
    q = torch.empty_like(residual).exponential_(generator=generator)
    alt = (residual / q).argmax(dim=-1)  # exponential race: a draw from residual / its sum
    return torch.cat([keep.long(), alt])


def accepted_tokens(result: list[int], draft: list[int]) -> list[int]:
    """verify()'s result on the host -> the kept drafts followed by the model's token."""
    d = len(draft)
    keep, alt = result[:d], result[d:]
    a = next((i for i, k in enumerate(keep) if not k), d)
    return [*draft[:a], alt[a]]
