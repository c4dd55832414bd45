"""Outputs in vLLM's shape so code written for vLLM's offline API ports unchanged."""

from __future__ import annotations

import itertools
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeVar

T = TypeVar("T")

# One position's logprobs: token id -> Logprob (the sampled token plus the top-k).
LogprobsDict = dict[int, "Logprob"]


def shallow_copy(obj: T) -> T:
    """copy.copy of a plain dataclass instance (same fields, shared values): the server makes
    two a streamed token, and copy.copy's __reduce_ex__ round trip costs several times more."""
    new = object.__new__(type(obj))
    new.__dict__.update(obj.__dict__)
    return new


class Prefix(Sequence):
    """The first ``n`` items of a list that only grows: a streamed request's cumulative token
    ids (or logprobs) at one step, without copying them. Copying a 2,000-token list for every
    streamed token made a long answer's per-token server cost grow with its length. The list
    is never changed before n, so the view never changes. It slices to lists and compares
    equal to a list or tuple with the same items; ``list(view)`` makes a copy."""

    __slots__ = ("_items", "_n")

    def __init__(self, items: list, n: int) -> None:
        self._items, self._n = items, n

    def __len__(self) -> int:
        return self._n

    def __getitem__(self, i: Any) -> Any:
        if isinstance(i, slice):
            if i.step is not None and i.step < 0:  # indices() gives a stop of -1 here
                return list(self)[i]
            return self._items[slice(*i.indices(self._n))]
        j = i + self._n if i < 0 else i
        if not 0 <= j < self._n:
            raise IndexError("Prefix index out of range")
        return self._items[j]

    def __iter__(self) -> Iterator:
        return itertools.islice(self._items, self._n)

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, (list, tuple, Prefix)):
            return NotImplemented
        return len(other) == self._n and all(a == b for a, b in zip(self, other))

    __hash__ = None  # type: ignore[assignment]  # equal to lists, which do not hash

    def __add__(self, other: Sequence) -> list:
        return [*self, *other]

    def __radd__(self, other: Sequence) -> list:
        return [*other, *self]

    def __repr__(self) -> str:
        return repr(list(self))


@dataclass
class Logprob:
    logprob: float
    rank: int | None = None
    decoded_token: str | None = None


@dataclass
class RequestMetrics:
    arrival_time: float
    first_scheduled_time: float | None = None
    first_token_time: float | None = None
    last_token_time: float | None = None
    finished_time: float | None = None


@dataclass
class CompletionOutput:
    # token_ids / logprobs: lists; in the outputs AsyncLLM streams before a sequence
    # finishes, a ``Prefix`` view (slices, len, iteration and == as a list's)
    index: int
    text: str
    token_ids: list[int]
    cumulative_logprob: float | None = None
    logprobs: list[LogprobsDict] | None = None
    finish_reason: str | None = None  # "stop" | "length" | "abort"
    stop_reason: int | str | None = None

    def finished(self) -> bool:
        return self.finish_reason is not None


@dataclass
class RequestOutput:
    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    outputs: list[CompletionOutput]
    finished: bool
    prompt_logprobs: list[LogprobsDict | None] | None = None
    num_cached_tokens: int = 0
    metrics: RequestMetrics | None = None
    extra: dict = field(default_factory=dict)


# -- pooling (embedding) models: vLLM's PoolingRequestOutput / EmbeddingRequestOutput


@dataclass
class PoolingOutput:
    data: object  # torch.Tensor: the pooled vector

    def __repr__(self) -> str:
        return f"PoolingOutput(data={self.data!r})"


@dataclass
class PoolingRequestOutput:
    request_id: str
    outputs: PoolingOutput
    prompt_token_ids: list[int]
    finished: bool = True
    num_cached_tokens: int = 0
    prompt: str | None = None


@dataclass
class EmbeddingOutput:
    embedding: list[float]

    @property
    def hidden_size(self) -> int:
        return len(self.embedding)


@dataclass
class EmbeddingRequestOutput(PoolingRequestOutput):
    """A PoolingRequestOutput whose outputs are an EmbeddingOutput (the vector as floats)."""

    outputs: EmbeddingOutput

    @classmethod
    def from_base(cls, out: PoolingRequestOutput) -> EmbeddingRequestOutput:
        data = out.outputs.data
        vec = data.tolist() if hasattr(data, "tolist") else list(data)
        return cls(out.request_id, EmbeddingOutput(vec), out.prompt_token_ids, out.finished,
                   out.num_cached_tokens, out.prompt)


# -- classification / scoring models: vLLM's ClassificationRequestOutput, ScoringRequestOutput


@dataclass
class ClassificationOutput:
    probs: list[float]  # softmax / sigmoid of the logits (the raw logits without activation)

    @property
    def num_classes(self) -> int:
        return len(self.probs)


@dataclass
class ClassificationRequestOutput(PoolingRequestOutput):
    """A PoolingRequestOutput whose outputs are a ClassificationOutput."""

    outputs: ClassificationOutput

    @classmethod
    def from_base(cls, out: PoolingRequestOutput) -> ClassificationRequestOutput:
        data = out.outputs.data
        probs = data.tolist() if hasattr(data, "tolist") else list(data)
        return cls(out.request_id, ClassificationOutput(probs), out.prompt_token_ids,
                   out.finished, out.num_cached_tokens, out.prompt)


@dataclass
class ScoringOutput:
    score: float


@dataclass
class ScoringRequestOutput(PoolingRequestOutput):
    """A PoolingRequestOutput whose outputs are a ScoringOutput: a cross-encoder's score of
    the pair, or the cosine similarity of the two embeddings."""

    outputs: ScoringOutput

    @classmethod
    def from_base(cls, out: PoolingRequestOutput) -> ScoringRequestOutput:
        data = out.outputs.data
        values = data.reshape(-1).tolist() if hasattr(data, "reshape") else [data]
        if len(values) != 1:
            raise ValueError("pooled_data should be a scalar score")
        return cls(out.request_id, ScoringOutput(float(values[0])), out.prompt_token_ids,
                   out.finished, out.num_cached_tokens, out.prompt)
