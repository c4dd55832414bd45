"""Outputs in vLLM's shape so code written for vLLM's offline API ports unchanged."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TypeVar

T = TypeVar("T")

# One position's logprobs: token id -> Logprob (the sampled token plus the top-k).
LogprobsDict = dict[int, "Logprob"]


def shallow_copy(obj: T) -> T:
    """copy.copy of a plain dataclass instance (same fields, shared values): the server makes
    two a streamed token, and copy.copy's __reduce_ex__ round trip costs several times more."""
    new = object.__new__(type(obj))
    new.__dict__.update(obj.__dict__)
    return new


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
