"""The start-up warm-up's mixed steps (runner/model_runner.mixed_warmup_batches): one per
decode batch bucket, each a valid step the attention kernels accept."""

from __future__ import annotations

import pytest

from modelport.layers.triton_attention import batch_bucket
from modelport.runner.model_runner import mixed_warmup_batches


@pytest.mark.parametrize("max_batch,block_size", [(1, 16), (48, 16), (256, 16), (512, 8)])
def test_one_valid_mixed_step_per_decode_bucket(max_batch: int, block_size: int) -> None:
    batches = mixed_warmup_batches(max_batch, block_size)
    buckets = [len(qsl) - 1 for _, _, qsl, _, _ in batches]
    # every bucket a batch of 1..max_batch requests is padded to, once, ascending
    assert buckets == sorted({batch_bucket(n) for n in range(1, max_batch + 1)})
    for ids, positions, qsl, seq_lens, tables in batches:
        n_reqs = len(qsl) - 1
        q_lens = [b - a for a, b in zip(qsl, qsl[1:], strict=False)]
        assert qsl[0] == 0 and qsl[-1] == len(ids) == len(positions)
        assert q_lens == [1] * (n_reqs - 1) + [16]  # decode rows, then one prefill row
        assert len(ids) <= max_batch + 15
        assert len(seq_lens) == len(tables) == n_reqs
        for q, s, t, start in zip(q_lens, seq_lens, tables, qsl, strict=False):
            assert s >= q and len(t) * block_size >= s  # the table covers the context
            assert positions[start : start + q] == list(range(s - q, s))


def test_the_prefill_row_shrinks_to_the_step_budget() -> None:
    # a 48-token budget: the 48-request bucket has 47 decode rows and a 2-token prefill row
    batches = mixed_warmup_batches(48, 16, max_tokens=48)
    sizes = [(len(qsl) - 1, len(ids)) for ids, _, qsl, _, _ in batches]
    assert sizes[-1] == (48, 49)  # 47 + 2: the smallest prefill row there is
    assert all(n <= 48 for b, n in sizes if b <= 32)
