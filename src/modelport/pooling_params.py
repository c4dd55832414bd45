"""Pooling (embedding) models, vLLM's way: ``PoolingParams`` per request, ``PoolerConfig`` per
engine, and the runner-kind resolution of ``runner`` / ``convert`` / ``task``.

A generative decoder (Llama, Qwen2) becomes an embedding model as vLLM's ``--convert embed``
makes it: the prompt runs once (prefill only, no LM head, no sampler) and the final-norm
hidden states are pooled, by default the LAST token's, L2-normalized. Pure Python: no torch.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

POOLING_TYPES = ("LAST", "MEAN", "CLS")
RUNNERS = ("auto", "generate", "pooling")
CONVERTS = ("auto", "none", "embed")
# vLLM's older --task values: the ones that mean "generate" or "embed"
GENERATE_TASKS = ("auto", "generate")
EMBED_TASKS = ("embed", "embedding")
POOLING_TASKS = ("embed", "encode")  # LLM.encode(pooling_task=...) accepted here


@dataclass
class PoolerConfig:
    """How the engine pools (vLLM's ``pooler_config`` / ``override_pooler_config``):
    ``pooling_type`` LAST | MEAN | CLS, ``normalize`` (L2, default on for embeddings) and
    ``dimensions`` (the default matryoshka truncation of every request)."""

    pooling_type: str = "LAST"
    normalize: bool = True
    dimensions: int | None = None

    @classmethod
    def from_dict(cls, d: dict[str, Any] | PoolerConfig | None) -> PoolerConfig:
        if d is None:
            return cls()
        if isinstance(d, PoolerConfig):
            return d
        if not isinstance(d, dict):
            raise ValueError(f"pooler_config must be a dict, got {type(d).__name__}")
        kw = dict(d)
        if "seq_pooling_type" in kw:  # vLLM's newer name for sequence pooling
            kw.setdefault("pooling_type", kw.pop("seq_pooling_type"))
        unknown = sorted(set(kw) - {"pooling_type", "normalize", "dimensions"})
        if unknown:
            raise ValueError(f"pooler_config: unsupported field(s) {unknown}; supported: "
                             "pooling_type, normalize, dimensions")
        pt = kw.get("pooling_type")
        if pt is None:
            kw.pop("pooling_type", None)
        else:
            pt = str(pt).upper()
            if pt not in POOLING_TYPES:
                raise ValueError(f"pooling_type {kw['pooling_type']!r} is not supported: use "
                                 f"one of {', '.join(POOLING_TYPES)}")
            kw["pooling_type"] = pt
        if kw.get("normalize") is None:
            kw.pop("normalize", None)
        dims = kw.get("dimensions")
        if dims is not None and (not isinstance(dims, int) or isinstance(dims, bool) or dims < 1):
            raise ValueError(f"pooler_config.dimensions must be an integer >= 1, got {dims!r}")
        return cls(**kw)


@dataclass
class PoolingParams:
    """API parameters of a pooling request (vLLM's ``PoolingParams``).

    ``dimensions``: keep the first ``dimensions`` values (matryoshka representation; only
    for models whose config.json says ``is_matryoshka`` or lists ``matryoshka_dimensions``),
    before normalization. ``normalize``: L2-normalize (None: the engine's pooler_config).
    ``truncate_prompt_tokens``: keep the prompt's last k tokens (-1: max_model_len).
    ``task``: "embed" (set by LLM.embed / the server) or "encode"."""

    dimensions: int | None = None
    normalize: bool | None = None
    truncate_prompt_tokens: int | None = None
    task: str | None = None
    extra: dict[str, Any] = field(default_factory=dict, repr=False)

    def __post_init__(self) -> None:
        d = self.dimensions
        if d is not None and (not isinstance(d, int) or isinstance(d, bool)):
            raise ValueError(f"dimensions must be an integer, got {d!r}")
        if self.normalize is not None and not isinstance(self.normalize, bool):
            raise ValueError(f"normalize must be a bool, got {self.normalize!r}")
        t = self.truncate_prompt_tokens
        if t is not None and (not isinstance(t, int) or isinstance(t, bool)):
            raise ValueError(f"truncate_prompt_tokens must be an integer, got {t!r}")

    def clone(self) -> PoolingParams:
        return PoolingParams(**{k: v for k, v in asdict(self).items()})

    def verify(self, model_name: str, hf_config: dict[str, Any],
               pooler: PoolerConfig | None = None) -> None:
        """Fill defaults from the engine's pooler_config and check ``dimensions`` against
        the model, with vLLM's rule and words (ValueError)."""
        pooler = pooler or PoolerConfig()
        if self.dimensions is None:
            self.dimensions = pooler.dimensions
        if self.normalize is None:
            self.normalize = pooler.normalize
        if self.dimensions is None:
            return
        mds = hf_config.get("matryoshka_dimensions")
        is_matryoshka = bool(mds) or bool(hf_config.get("is_matryoshka", False))
        if not is_matryoshka:
            raise ValueError(f'Model "{model_name}" does not support matryoshka '
                             "representation, changing output dimensions will lead to poor "
                             "results.")
        if mds:
            if self.dimensions not in mds:
                raise ValueError(f'Model "{model_name}" only supports {list(mds)} matryoshka '
                                 "dimensions, use other output dimensions will lead to poor "
                                 "results.")
        elif self.dimensions < 1:
            raise ValueError("Dimensions must be greater than 0")
        hidden = hf_config.get("hidden_size")
        if isinstance(hidden, int) and self.dimensions > hidden:
            raise ValueError(f"dimensions ({self.dimensions}) is larger than the model's "
                             f"embedding size ({hidden})")

    def to_dict(self) -> dict[str, Any]:
        return {"dimensions": self.dimensions, "normalize": self.normalize}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> PoolingParams:
        return cls(dimensions=d.get("dimensions"), normalize=d.get("normalize"))


def resolve_runner(runner: str | None, convert: str | None, task: str | None,
                   architecture: str) -> str:
    """``generate`` or ``pooling`` from vLLM's ``runner`` / ``convert`` and older ``task``."""
    runner = runner or "auto"
    convert = convert or "auto"
    if runner not in RUNNERS:
        raise ValueError(f"runner {runner!r} is not supported: use one of {', '.join(RUNNERS)}")
    if convert not in CONVERTS:
        raise ValueError(f"convert {convert!r} is not supported: use one of "
                         f"{', '.join(CONVERTS)} (classification / reward heads are not served)")
    if task is not None and task not in GENERATE_TASKS + EMBED_TASKS:
        raise ValueError(f"task {task!r} is not supported: use 'generate' or 'embed' "
                         "(classification, scoring and reward models are not served)")
    wants_pool = convert == "embed" or task in EMBED_TASKS
    if runner == "generate":
        if wants_pool:
            raise ValueError(f"runner 'generate' conflicts with "
                             f"{'convert' if convert == 'embed' else 'task'} 'embed'")
        return "generate"
    if runner == "pooling" or wants_pool:
        if not architecture.endswith("ForCausalLM"):
            raise ValueError(f"{architecture} cannot be converted to an embedding model")
        return "pooling"
    return "generate"  # every built-in architecture is a *ForCausalLM


def pooling_core_request(request_id: str, prompt_token_ids: list[int], params: PoolingParams,
                         *, vocab_size: int, max_model_len: int, model_name: str,
                         hf_config: dict[str, Any], pooler: PoolerConfig | None,
                         arrival_time: float | None = None, priority: int = 0) -> Any:
    """Validate one pooling request (ValueError) and make its EngineCoreRequest. ``params``
    gets the engine's defaults filled in (normalize, dimensions)."""
    import time

    from modelport.engine.messages import EngineCoreRequest

    n = len(prompt_token_ids)
    if n == 0:
        raise ValueError("prompt is empty: it must contain at least one token")
    bad = [t for t in prompt_token_ids if not 0 <= t < vocab_size]
    if bad:
        raise ValueError(f"prompt token ids must be in [0, {vocab_size}); got {bad[:5]}")
    if n > max_model_len:
        raise ValueError(
            f"The decoder prompt (length {n}) is longer than the maximum model length of "
            f"{max_model_len}. Make sure that `max_model_len` is no smaller than the number of "
            "text tokens.")
    params.verify(model_name, hf_config, pooler)
    return EngineCoreRequest(
        request_id=request_id, prompt_token_ids=list(prompt_token_ids), sampling_params={},
        eos_token_ids=[], arrival_time=time.monotonic() if arrival_time is None else arrival_time,
        priority=priority, pooling_params=params.to_dict())
