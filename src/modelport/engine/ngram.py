"""N-gram prompt lookup: draft tokens for speculative decoding from the request's own tokens.

Text that copies from its context (code edits, quoting, summaries, lists, repeated phrases)
continues as it did the last time the same few tokens appeared. The proposer finds the
longest suffix of the tokens (``max_n`` down to ``min_n`` long) that also occurs earlier and
proposes the tokens that followed its latest earlier occurrence. NumPy only: it runs in the
scheduler, on the host, once per decoding request per step.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np


def propose(tokens: Sequence[int], k: int, max_n: int, min_n: int) -> list[int]:
    """Up to k draft tokens continuing ``tokens`` (empty when no n-gram repeats)."""
    size = len(tokens)
    if k <= 0 or size < min_n + 1:
        return []
    arr = np.asarray(tokens, dtype=np.int64)
    for n in range(min(max_n, size - 1), min_n - 1, -1):
        suffix = arr[size - n:]
        # windows starting at 0 .. size-n-1: every occurrence ending before the last token,
        # so at least one token follows it
        windows = np.lib.stride_tricks.sliding_window_view(arr[: size - 1], n)
        hits = np.flatnonzero((windows == suffix).all(axis=1))
        if hits.size:
            start = int(hits[-1]) + n
            return [int(t) for t in arr[start : start + k]]
    return []
