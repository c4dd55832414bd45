"""modelport: deploy LLMs and other models behind the APIs your clients already speak."""

from __future__ import annotations

from typing import TYPE_CHECKING

from modelport.logits_processor import (
    AdapterLogitsProcessor,
    BatchUpdate,
    LogitsProcessor,
    MoveDirectionality,
)
from modelport.outputs import (
    ClassificationOutput,
    ClassificationRequestOutput,
    CompletionOutput,
    EmbeddingOutput,
    EmbeddingRequestOutput,
    PoolingOutput,
    PoolingRequestOutput,
    RequestOutput,
    ScoringOutput,
    ScoringRequestOutput,
)
from modelport.pooling_params import PoolerConfig, PoolingParams
from modelport.sampling_params import (
    BeamSearchParams,
    GuidedDecodingParams,
    SamplingParams,
    StructuredOutputsParams,
)

if TYPE_CHECKING:
    from modelport.entrypoints.llm import LLM

__all__ = [
    "LLM", "SamplingParams", "BeamSearchParams", "StructuredOutputsParams", "GuidedDecodingParams",
    "RequestOutput", "CompletionOutput", "PoolingParams", "PoolerConfig", "PoolingOutput",
    "PoolingRequestOutput", "EmbeddingOutput", "EmbeddingRequestOutput", "ClassificationOutput",
    "ClassificationRequestOutput", "ScoringOutput", "ScoringRequestOutput",
    "LogitsProcessor", "AdapterLogitsProcessor", "BatchUpdate", "MoveDirectionality",
]


def __getattr__(name: str):
    # LLM pulls in torch and the model code: import it only when asked for
    if name == "LLM":
        from modelport.entrypoints.llm import LLM

        return LLM
    raise AttributeError(name)
