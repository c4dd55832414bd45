"""Sampling on the logits' device: structured outputs' grammar masks, allowed_token_ids,
bad_words, logit_bias, penalties, min_tokens, custom logits processors (runner/
logits_processors.py), temperature, top-k/top-p/min-p, logprobs.

Seeded requests draw from their own torch.Generator with the exponential-race trick
(argmax(p / q), q ~ Exp(1)), so a seeded request's tokens do not depend on which other
requests share its batch.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from modelport import config
from modelport.engine.messages import TokenLogprobs
from modelport.sampling_params import SamplingParams, num_logprobs


@dataclass
class SamplingRow:
    request_id: str
    params: SamplingParams
    prompt_token_ids: list[int]
    output_token_ids: list[int]  # tokens generated so far (not including the one sampled now)
    eos_token_ids: tuple[int, ...]
    generator: torch.Generator | None
    # structured outputs: the request's xgrammar GrammarMatcher (None: unconstrained)
    grammar: object | None = None


def add_logit_bias(logits: torch.Tensor, bias: dict[int, float]) -> None:
    """Add a request's logit_bias to each row of its [N, V] logits (in place)."""
    ids = torch.tensor(list(bias), dtype=torch.long)
    vals = torch.tensor(list(bias.values()), dtype=logits.dtype)
    logits[:, to_device(ids, logits.device)] += to_device(vals, logits.device)


def keep_only(logits: torch.Tensor, allowed: list[int]) -> None:
    """Mask every token of each row of [N, V] logits but ``allowed`` to -inf (in place)."""
    ids = to_device(torch.tensor(allowed, dtype=torch.long), logits.device)
    vals = logits[:, ids]
    logits.fill_(float("-inf"))
    logits[:, ids] = vals


def banned_bad_words(bad_words: list[list[int]], past: list[int]) -> list[int]:
    """The tokens bad_words bans after the generated tokens ``past`` (vLLM's rule): a word's
    last token when the tokens before it end ``past`` (a one-token word: always)."""
    out = []
    for word in bad_words:
        k = len(word) - 1
        if k == 0 or (k <= len(past) and past[-k:] == word[:-1]):
            out.append(word[-1])
    return out


def apply_allowed_and_bad_words(logits: torch.Tensor, rows: list[SamplingRow]) -> None:
    for i, r in enumerate(rows):
        p = r.params
        if p.allowed_token_ids:
            keep_only(logits[i : i + 1], p.allowed_token_ids)
        if p.bad_words_token_ids:
            banned = banned_bad_words(p.bad_words_token_ids, r.output_token_ids)
            if banned:
                logits[i, to_device(torch.tensor(banned), logits.device)] = float("-inf")


def apply_logit_bias(logits: torch.Tensor, rows: list[SamplingRow]) -> None:
    for i, r in enumerate(rows):
        if r.params.logit_bias:
            add_logit_bias(logits[i : i + 1], r.params.logit_bias)


def apply_penalties(logits: torch.Tensor, rows: list[SamplingRow]) -> None:
    vocab = logits.shape[-1]
    for i, r in enumerate(rows):
        p = r.params
        if not p.needs_penalties:
            continue
        row = logits[i]
        if p.repetition_penalty != 1.0:
            seen = torch.tensor(
                sorted({t for t in r.prompt_token_ids + r.output_token_ids if t < vocab}),
                dtype=torch.long, device=logits.device,
            )
            if seen.numel():
                vals = row[seen]
                row[seen] = torch.where(
                    vals > 0, vals / p.repetition_penalty, vals * p.repetition_penalty
                )
        if r.output_token_ids and (p.presence_penalty or p.frequency_penalty):
            ids = torch.tensor(r.output_token_ids, dtype=torch.long, device=logits.device)
            counts = torch.bincount(ids, minlength=vocab)[:vocab].to(row.dtype)
            row -= p.frequency_penalty * counts + p.presence_penalty * (counts > 0).to(row.dtype)


def min_tokens_banned(r: SamplingRow, vocab: int) -> list[int]:
    """The stop tokens min_tokens bans from row r now ([] once it has min_tokens)."""
    p = r.params
    if len(r.output_token_ids) >= p.min_tokens:
        return []
    banned = list(p.stop_token_ids or ())
    if not p.ignore_eos:
        banned += list(r.eos_token_ids)
    return [t for t in banned if t < vocab]


def plain_greedy(r: SamplingRow, vocab: int) -> bool:
    """Whether the Sampler's token for row r is the argmax of the raw logits and nothing else
    reads them: greedy, no logprobs / prompt logprobs, no grammar or structured output, no
    allowed_token_ids, bad_words, logit_bias, penalties, nor a min_tokens ban now."""
    p = r.params
    return (p.greedy and p.logprobs is None and p.prompt_logprobs is None and r.grammar is None
            and p.structured_outputs is None and not p.allowed_token_ids
            and not p.bad_words_token_ids and not p.logit_bias and not p.needs_penalties
            and not min_tokens_banned(r, vocab))


def apply_min_tokens(logits: torch.Tensor, rows: list[SamplingRow],
                     exempt: set[int] | frozenset[int] = frozenset()) -> None:
    """Ban stop tokens from rows short of min_tokens, but rows in ``exempt`` (a grammar that
    allows nothing but a stop token: the grammar wins, as vLLM's, so the request ends there
    rather than sampling a token the grammar refuses)."""
    for i, r in enumerate(rows):
        if i in exempt:
            continue
        banned = min_tokens_banned(r, logits.shape[-1])
        if banned:
            logits[i, banned] = float("-inf")


def apply_top_k_top_p_min_p(
    logits: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor, min_p: torch.Tensor,
    need_sort: bool | None = None, need_min_p: bool | None = None,
) -> torch.Tensor:
    """Mask filtered tokens to -inf. top_k: [N] int (0 = off); top_p, min_p: [N] float.

    need_sort / need_min_p: the caller's host-side answer to "is any filter on?"; passing
    them saves the device-to-host syncs of asking the tensors.
    """
    vocab = logits.shape[-1]
    if need_sort is None:
        need_sort = bool((top_k > 0).any()) or bool((top_p < 1.0).any())
    if need_min_p is None:
        need_min_p = bool((min_p > 0).any())
    if need_sort:
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        mask = torch.zeros_like(sorted_logits, dtype=torch.bool)
        k = torch.where(top_k > 0, top_k, torch.full_like(top_k, vocab)).clamp(max=vocab)
        ranks = torch.arange(vocab, device=logits.device).unsqueeze(0)
        mask |= ranks >= k.unsqueeze(1)
        probs = sorted_logits.masked_fill(mask, float("-inf")).softmax(dim=-1)
        cum_before = probs.cumsum(dim=-1) - probs  # mass strictly above this token
        mask |= cum_before >= top_p.unsqueeze(1)
        mask[:, 0] = False  # always keep the most likely token
        logits = logits.scatter(1, order, sorted_logits.masked_fill(mask, float("-inf")))
    if need_min_p:
        probs = logits.softmax(dim=-1)
        thresh = probs.max(dim=-1, keepdim=True).values * min_p.unsqueeze(1)
        logits = logits.masked_fill(probs < thresh, float("-inf"))
    return logits


def compute_logprobs(
    logprobs: torch.Tensor, token_ids: torch.Tensor, k: int
) -> list[TokenLogprobs]:
    """For each row: the chosen token's logprob and rank, then the top-k (k at most the
    vocabulary)."""
    k = min(k, logprobs.shape[-1])
    chosen = logprobs.gather(1, token_ids.view(-1, 1))
    ranks = (logprobs > chosen).sum(dim=-1) + 1
    top_vals, top_ids = logprobs.topk(k, dim=-1) if k > 0 else (None, None)
    chosen_l, ranks_l, ids_l = chosen.squeeze(1).tolist(), ranks.tolist(), token_ids.tolist()
    tv = top_vals.tolist() if top_vals is not None else None
    ti = top_ids.tolist() if top_ids is not None else None
    out = []
    for i in range(len(ids_l)):
        t_ids, t_lp, t_rk = [ids_l[i]], [chosen_l[i]], [ranks_l[i]]
        if tv is not None:
            t_ids += ti[i]
            t_lp += tv[i]
            t_rk += list(range(1, k + 1))
        out.append(TokenLogprobs(t_ids, t_lp, t_rk))
    return out


# Greedy argmax over the vocabulary for a few rows on CUDA: torch.argmax reduces a row in one
# block (31 us for one float32 row of 128,256 logits on the H200, 28 us for 8); a max per
# ARGMAX_CHUNK-wide chunk and then an argmax over the chunk maxima takes 12 / 15 us
# (bench/gpu/bw_probe.py argmax, bench/results/2026-12-04-h200-bw-probe.jsonl). From 256
# rows torch.argmax is faster (48 vs 94 us), so larger batches keep it.
ARGMAX_CHUNK = 256
ARGMAX_CHUNKED_MAX_ROWS = 8


def chunked_argmax(x: torch.Tensor, chunk: int = ARGMAX_CHUNK) -> torch.Tensor:
    """x.argmax(-1) for a [N, V] tensor with V % chunk == 0, as a max per chunk and an
    argmax over the chunk maxima: the same index (the first maximum; a NaN counts as the
    maximum, the first NaN wins), in two small parallel reductions."""
    n, v = x.shape
    vals, idx = x.reshape(n, v // chunk, chunk).max(-1)
    c = vals.argmax(-1, keepdim=True)
    return (c * chunk + idx.gather(1, c)).squeeze(1)


def greedy_tokens(logits: torch.Tensor) -> torch.Tensor:
    """The argmax token of each row of [N, V] logits (chunked for a few CUDA rows)."""
    n, v = logits.shape
    if logits.is_cuda and 0 < n <= ARGMAX_CHUNKED_MAX_ROWS and v % ARGMAX_CHUNK == 0:
        return chunked_argmax(logits)
    return logits.argmax(dim=-1)


def to_device(t: torch.Tensor, dev: torch.device) -> torch.Tensor:
    """A host tensor on dev without a blocking copy: a pageable copy would sync the stream,
    a pinned one lets the host run ahead to the launches."""
    return (t.pin_memory() if dev.type == "cuda" else t).to(dev, non_blocking=True)


def _index(rows: list[int], dev: torch.device) -> torch.Tensor:
    return to_device(torch.tensor(rows, dtype=torch.long), dev)


# SAMPLER_ROWS (config): rows whose top-k / top-p / min-p filtering and random draw run at
# once. That work holds ~30 bytes a logit (sorted copy and its int64 order, masks, softmax,
# cumulative sums, the exponential draws); in slices it stays ~1 GiB for a 128k vocabulary
# however many rows a step samples, and the profiling forward, which samples its widest
# batch, sizes the KV cache after it.
def _draw(scaled: torch.Tensor, params: torch.Tensor, rows: list[SamplingRow]) -> torch.Tensor:
    """Filtered random draw for rows [N, vocab] of temperature-scaled logits (params: [N, 4]
    temperature, top_k, top_p, min_p on the logits' device): argmax(p / q), q ~ Exp(1), with
    a seeded row's q from its own generator."""
    dev = scaled.device
    scaled = apply_top_k_top_p_min_p(
        scaled, params[:, 1].long(), params[:, 2].to(scaled.dtype), params[:, 3].to(scaled.dtype),
        need_sort=any(r.params.top_k > 0 or r.params.top_p < 1.0 for r in rows),
        need_min_p=any(r.params.min_p > 0 for r in rows),
    )
    probs = scaled.softmax(dim=-1)
    q = torch.empty_like(probs)
    unseeded = [i for i, r in enumerate(rows) if r.generator is None]
    if len(unseeded) == len(rows):
        q.exponential_()
    elif unseeded:
        q[_index(unseeded, dev)] = torch.empty(
            len(unseeded), probs.shape[1], device=dev).exponential_()
    for i, r in enumerate(rows):
        if r.generator is not None:
            q[i].exponential_(generator=r.generator)
    return (probs / q).argmax(dim=-1)


def _draw_in_chunks(scaled: torch.Tensor, params: torch.Tensor,
                    rows: list[SamplingRow]) -> torch.Tensor:
    """_draw over slices of config.SAMPLER_ROWS rows (one slice: no copy). Seeded rows draw
    the same numbers either way; unseeded rows draw from the global generator slice by
    slice."""
    n = len(rows)
    step = config.SAMPLER_ROWS
    if n <= step:
        return _draw(scaled, params, rows)
    tokens = torch.empty(n, dtype=torch.long, device=scaled.device)
    for s in range(0, n, step):
        e = min(n, s + step)
        tokens[s:e] = _draw(scaled[s:e], params[s:e], rows[s:e])
    return tokens


class Sampler:
    def __init__(self, logits_processors: Any = None) -> None:
        # the engine's custom logits processors (runner/logits_processors.LogitsProcessors)
        self.logits_processors = logits_processors

    def __call__(
        self, logits: torch.Tensor, rows: list[SamplingRow]
    ) -> tuple[torch.Tensor, list[TokenLogprobs | None]]:
        """logits: [N, vocab] float32 (modified in place).

        Returns the token ids (a [N] tensor on the logits' device: reading it is the caller's
        sync) and logprobs per row (on the host; computing them syncs).
        """
        vocab = logits.shape[-1]
        max_lp = max(num_logprobs(r.params.logprobs, vocab) for r in rows
                     if r.params.logprobs is not None) \
            if any(r.params.logprobs is not None for r in rows) else None
        raw_logprobs = logits.log_softmax(dim=-1) if max_lp is not None else None

        constrained = [(i, r.grammar) for i, r in enumerate(rows) if r.grammar is not None]
        exempt: set[int] = set()
        if constrained:
            from modelport.engine.structured_output import allows_only, apply_grammar_bitmask

            bitmask = apply_grammar_bitmask(logits, constrained)  # on the host: no sync
            for j, (i, _) in enumerate(constrained):
                banned = min_tokens_banned(rows[i], vocab)
                if banned and allows_only(bitmask[j], banned, vocab):
                    exempt.add(i)  # min_tokens would leave the grammar no token
        apply_allowed_and_bad_words(logits, rows)
        apply_logit_bias(logits, rows)
        apply_penalties(logits, rows)
        apply_min_tokens(logits, rows, exempt)
        greedy = [r.params.greedy for r in rows]
        lps = self.logits_processors
        if lps is not None:
            lps.update(rows)
            logits = lps.apply(logits, argmax_invariant=False)

        tokens = torch.empty(len(rows), dtype=torch.long, device=logits.device)
        if all(greedy):
            tokens = greedy_tokens(logits)
        else:
            dev = logits.device
            # one host tensor, one (pinned, asynchronous on CUDA) copy for all four settings
            params = torch.tensor(
                [[1.0 if g else r.params.temperature, r.params.top_k, r.params.top_p,
                  r.params.min_p] for g, r in zip(greedy, rows)], dtype=torch.float32)
            params = to_device(params, dev)
            scaled = logits / params[:, 0:1].to(logits.dtype)
            if lps is not None:  # greedy rows take their token from the logits above
                scaled = lps.apply(scaled, argmax_invariant=True)
            tokens = _draw_in_chunks(scaled, params, rows)
            del scaled
            if any(greedy):
                g_idx = _index([i for i, g in enumerate(greedy) if g], dev)
                tokens[g_idx] = greedy_tokens(logits[g_idx])

        lps: list[TokenLogprobs | None] = [None] * len(rows)
        if raw_logprobs is not None:
            want = [i for i, r in enumerate(rows) if r.params.logprobs is not None]
            computed: list[TokenLogprobs] = []
            step = config.SAMPLER_ROWS
            for s in range(0, len(want), step):  # bounded copies of the rows
                idx = torch.tensor(want[s:s + step], device=logits.device)
                computed += compute_logprobs(raw_logprobs[idx], tokens[idx], max_lp or 0)
            for j, i in enumerate(want):
                k = num_logprobs(rows[i].params.logprobs, vocab)
                c = computed[j]
                lps[i] = TokenLogprobs(c.token_ids[: k + 1], c.logprobs[: k + 1], c.ranks[: k + 1])
        return tokens, lps
