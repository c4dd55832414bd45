"""The sampler filters and draws in slices of config.SAMPLER_ROWS rows (runner/sampler.py),
so its working memory stays bounded for wide batches: same tokens and logprobs as one
slice."""

from __future__ import annotations

import pytest
import torch

from modelport import config
from modelport.runner import sampler as sampler_mod
from modelport.runner.sampler import Sampler, SamplingRow
from modelport.sampling_params import SamplingParams

VOCAB = 96


def _rows(n: int) -> list[SamplingRow]:
    """A mixed batch: seeded rows with top-k / top-p / min-p, greedy rows, logprobs."""
    rows = []
    for i in range(n):
        if i % 4 == 3:
            params = SamplingParams(temperature=0.0, logprobs=2)
        else:
            params = SamplingParams(
                temperature=0.7 + 0.1 * (i % 3), top_k=(0, 5, 20)[i % 3],
                top_p=(1.0, 0.9, 0.6)[i % 3], min_p=0.05 * (i % 2),
                logprobs=3 if i % 2 else None,
            )
        gen = None if params.greedy else torch.Generator().manual_seed(100 + i)
        rows.append(SamplingRow(f"r{i}", params, [1, 2], [], (), gen))
    return rows


def _sample(n: int, slice_rows: int, monkeypatch) -> tuple[list[int], list]:
    monkeypatch.setattr(config, "SAMPLER_ROWS", slice_rows)
    logits = torch.randn(n, VOCAB, generator=torch.Generator().manual_seed(7)) * 3
    tokens, lps = Sampler()(logits, _rows(n))
    return tokens.tolist(), lps


def test_slices_give_the_same_tokens_and_logprobs_as_one_pass(monkeypatch):
    seen: list[int] = []
    real = sampler_mod.apply_top_k_top_p_min_p

    def spy(logits, *args, **kwargs):
        seen.append(logits.shape[0])
        return real(logits, *args, **kwargs)

    whole_tokens, whole_lps = _sample(11, 1000, monkeypatch)
    monkeypatch.setattr(sampler_mod, "apply_top_k_top_p_min_p", spy)
    tokens, lps = _sample(11, 3, monkeypatch)
    assert seen == [3, 3, 3, 2]  # the filtering never saw more than a slice
    assert tokens == whole_tokens
    assert [lp is None for lp in lps] == [lp is None for lp in whole_lps]
    for a, b in zip(lps, whole_lps):
        if a is not None:
            assert a.token_ids == b.token_ids and a.ranks == b.ranks
            assert a.logprobs == pytest.approx(b.logprobs)
    # the logprobs are those of the chosen tokens, row by row
    assert [lp.token_ids[0] for lp in lps if lp is not None] == [
        t for t, lp in zip(tokens, lps) if lp is not None]


def test_unseeded_rows_keep_their_own_filters_across_slices(monkeypatch):
    """top_k=1 leaves one token a row whatever the draw: each row must get its own argmax,
    so rows cannot have been shifted or mixed between slices."""
    monkeypatch.setattr(config, "SAMPLER_ROWS", 4)
    n = 10
    logits = torch.randn(n, VOCAB, generator=torch.Generator().manual_seed(3))
    want = logits.argmax(dim=-1).tolist()
    rows = [SamplingRow(f"u{i}", SamplingParams(temperature=1.0, top_k=1), [1], [], (),
                        torch.Generator().manual_seed(i) if i % 3 == 0 else None)
            for i in range(n)]
    tokens, _ = Sampler()(logits.clone(), rows)
    assert tokens.tolist() == want


def test_planner_counts_the_sliced_work_once():
    """Past SAMPLER_ROWS rows (where the sampler is the peak), a wider max_num_seqs adds only
    the per-row logits bytes to the planner's activation peak (the sliced sort / softmax work
    stays one slice wide)."""
    from modelport.config import SAMPLER_ROWS, ModelConfig
    from modelport.planner.memory import SAMPLER_ROW_BYTES, activation_peak_bytes
    from modelport.planner.presets import find_model_preset

    model = ModelConfig.from_hf_dict(dict(find_model_preset("llama-3.1-8b")[1],
                                          model_type="llama"))
    peak = {n: activation_peak_bytes(model, 2, 1, 2048, n) for n in (SAMPLER_ROWS // 2,
                                                                      SAMPLER_ROWS, 1024)}
    per_row = model.vocab_size * (2 + SAMPLER_ROW_BYTES)
    assert peak[1024] - peak[SAMPLER_ROWS] == (1024 - SAMPLER_ROWS) * per_row
    # below one slice every row also brings its share of the sliced work
    half = SAMPLER_ROWS // 2
    assert peak[SAMPLER_ROWS] - peak[half] > half * per_row


def test_planner_peak_is_the_larger_of_forward_and_sampler():
    """The runner samples after it drops the forward's activations: the planner's peak is
    the larger of the two phases, so a wide token budget hides a small sampler entirely."""
    from modelport.config import ModelConfig
    from modelport.planner.memory import activation_peak_bytes
    from modelport.planner.presets import find_model_preset

    model = ModelConfig.from_hf_dict(dict(find_model_preset("llama-3.1-8b")[1],
                                          model_type="llama"))
    wide = activation_peak_bytes(model, 2, 1, 16384, 64)
    assert activation_peak_bytes(model, 2, 1, 16384, 256) == wide  # the forward is larger
    assert activation_peak_bytes(model, 2, 1, 2048, 1024) > activation_peak_bytes(
        model, 2, 1, 2048, 64)  # at 2,048 tokens the sampler of 1,024 rows is the peak
