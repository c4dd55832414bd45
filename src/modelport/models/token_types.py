"""Token types (BERT's segment ids) of an encoder step, carried from tokenization.

Only token ids reach a model, yet a BERT cross-encoder reads ``[CLS] a [SEP] b [SEP]`` with
types 0 for the first segment and 1 for the second. The types are the tokenizer's: a scored
pair's request carries the index where its second segment starts
(``PoolingParams.token_type_start``, set by modelport/scoring.py from the tokenizer's own
``token_type_ids``); every other request is all type 0, as transformers' ``BertModel`` is
when given input ids alone. Searching the ids for the separator would be wrong: a text may
spell the separator (a literal ``[SEP]``) inside one segment.

The runner makes the step's starts visible for one forward through :func:`step_token_types`
(a context that refuses nesting, like the attention forward context); the encoder reads them
with :func:`current_type_starts`.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from typing import Any

_STARTS: list[int | None] | None = None


@contextlib.contextmanager
def type_starts(starts: list[int | None]) -> Iterator[None]:
    """The step's second-segment start per request, in the step's order (None: all type 0)."""
    global _STARTS
    if _STARTS is not None:
        raise RuntimeError("token type starts are already set: nested encoder forwards")
    _STARTS = starts
    try:
        yield
    finally:
        _STARTS = None


def current_type_starts() -> list[int | None] | None:
    """The starts of the forward in progress; None outside :func:`type_starts` (the memory
    profile's forward: every token type 0)."""
    return _STARTS


def step_token_types(model: Any, scheduled: Sequence[Any]) -> contextlib.AbstractContextManager:
    """For a model that reads token types (``uses_token_types``), the step's starts from
    each scheduled request's pooling params; a no-op context for any other model."""
    if not getattr(model, "uses_token_types", False):
        return contextlib.nullcontext()
    starts = []
    for s in scheduled:
        params = s.request.pooling_params
        starts.append(getattr(params, "token_type_start", None))
    return type_starts(starts)


def compress_token_types(types: Sequence[int] | None, n_tokens: int) -> int | None:
    """A tokenizer's ``token_type_ids`` as the index where type 1 starts (None: all type 0).

    ValueError for any other pattern (types beyond 1, or 0 after 1): only a text pair's
    ``0...0 1...1`` is carried to the model."""
    if types is None:
        return None
    types = list(types)
    if len(types) != n_tokens:
        raise ValueError(f"token_type_ids has {len(types)} entries for {n_tokens} tokens")
    if not any(types):
        return None
    start = next(i for i, t in enumerate(types) if t)
    if any(t != 0 for t in types[:start]) or any(t != 1 for t in types[start:]):
        raise ValueError("token_type_ids must be 0 for the first segment and 1 after it; "
                         f"the tokenizer gave {types}")
    return start
