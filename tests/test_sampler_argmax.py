"""Greedy sampling's chunked argmax (runner/sampler.py) gives torch.argmax's index."""

from __future__ import annotations

import pytest
import torch

from modelport.runner.sampler import ARGMAX_CHUNK, chunked_argmax, greedy_tokens


def _hard_rows(device: str) -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(6, 64 * ARGMAX_CHUNK, generator=g)
    x[1, 3 * ARGMAX_CHUNK + 5] = x[1, 9 * ARGMAX_CHUNK + 1] = 50.0  # tie across chunks
    x[2, 7] = x[2, 9] = 50.0  # tie inside one chunk
    x[3] = float("-inf")  # every logit masked
    x[3, 40 * ARGMAX_CHUNK] = 0.0
    x[4, 2 * ARGMAX_CHUNK + 3] = float("nan")  # NaN counts as the maximum
    x[4, 30 * ARGMAX_CHUNK] = float("nan")
    x[5] = 1.0  # all equal: the first index
    return x.to(device)


@pytest.mark.parametrize("chunk", [ARGMAX_CHUNK, 4 * ARGMAX_CHUNK])
def test_chunked_argmax_equals_torch_argmax_on_ties_masks_and_nan(chunk):
    x = _hard_rows("cpu")
    want = x.argmax(dim=-1)
    assert want.tolist()[1:] == [3 * ARGMAX_CHUNK + 5, 7, 40 * ARGMAX_CHUNK,
                                 2 * ARGMAX_CHUNK + 3, 0]
    assert torch.equal(chunked_argmax(x, chunk), want)
    strided = x.t().contiguous().t()  # same values, column-major: not viewable as chunks
    assert torch.equal(chunked_argmax(strided, chunk), want)


def test_greedy_tokens_keeps_torch_argmax_where_chunking_does_not_apply():
    x = torch.randn(3, ARGMAX_CHUNK * 4 + 1)  # vocab not a multiple of the chunk
    assert torch.equal(greedy_tokens(x), x.argmax(dim=-1))
    x = torch.randn(0, ARGMAX_CHUNK)
    assert greedy_tokens(x).shape == (0,)


@pytest.mark.gpu
@pytest.mark.parametrize("rows", [1, 5, 8, 9])
def test_greedy_tokens_on_cuda_equal_argmax(rows):
    x = torch.randn(rows, 128256, device="cuda")
    x[0, 1000] = x[0, 90000] = x[0].max() + 1  # a tie: the first index
    assert torch.equal(greedy_tokens(x), x.argmax(dim=-1))
    hard = _hard_rows("cuda")
    assert torch.equal(greedy_tokens(hard), hard.argmax(dim=-1))
