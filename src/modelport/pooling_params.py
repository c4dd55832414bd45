"""Pooling models, vLLM's way: ``PoolingParams`` per request, ``PoolerConfig`` per engine, and
the runner-kind resolution of ``runner`` / ``convert`` / ``task``.

A generative decoder (Llama, Qwen2) becomes an embedding model as vLLM's ``--convert embed``
makes it: the prompt runs once (prefill only, no LM head, no sampler) and the final-norm
hidden states are pooled, by default the LAST token's, L2-normalized. A ``*ForSequenceClassification``
checkpoint is a classification model: the pooled state goes through its ``score`` head, then
softmax (sigmoid for one label), and with one label it is also a cross-encoder for scoring.
Pure Python: no torch.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

from modelport.models.encoder_config import ENCODER_EMBED_ARCHITECTURES

POOLING_TYPES = ("LAST", "MEAN", "CLS")
RUNNERS = ("auto", "generate", "pooling")
CONVERTS = ("auto", "none", "embed", "classify")
# vLLM's older --task values: the ones that mean "generate", "embed" or "classify"
GENERATE_TASKS = ("auto", "generate")
EMBED_TASKS = ("embed", "embedding")
CLASSIFY_TASKS = ("classify", "score")
# per-token pooling tasks (vLLM's): one row per prompt token. An embedding model's
# token_embed is each token's final hidden state, a classifier's token_classify its head on
# each token (runner/pooler.py); BGE-M3's heads (models/bge_m3.py) give its sparse weights
# (token_classify) and ColBERT vectors (token_embed) instead
TOKEN_TASKS = ("token_embed", "token_classify")
# LLM.encode(pooling_task=...) accepted here; "encode" is the model's own pooling task
POOLING_TASKS = ("embed", "encode", "classify", "score", *TOKEN_TASKS)
SEQ_CLS_SUFFIX = "ForSequenceClassification"


@dataclass
class PoolerConfig:
    """How the engine pools (vLLM's ``pooler_config`` / ``override_pooler_config``):
    ``pooling_type`` LAST | MEAN | CLS, ``normalize`` (L2, default on for embeddings),
    ``dimensions`` (the default matryoshka truncation of every request) and
    ``use_activation`` (softmax / sigmoid on a classifier's logits, default on; vLLM's older
    names ``activation`` and ``softmax`` are accepted). ``task`` and ``token_tasks`` are not
    the user's to set: the engine fills them in, ``task`` "embed" or "classify" (the model
    has a classification head), ``token_tasks`` the per-token tasks the model also serves
    (:func:`default_token_tasks`; for BGE-M3 the heads found beside the checkpoint:
    models/bge_m3_config.py)."""

    pooling_type: str = "LAST"
    normalize: bool = True
    dimensions: int | None = None
    use_activation: bool = True
    task: str = "embed"
    token_tasks: tuple[str, ...] = ()

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
        for old in ("activation", "softmax"):  # vLLM's older names of use_activation
            if old in kw:
                value = kw.pop(old)
                if kw.get("use_activation") is None:
                    kw["use_activation"] = value
        unknown = sorted(set(kw) - {"pooling_type", "normalize", "dimensions", "use_activation"})
        if unknown:
            raise ValueError(f"pooler_config: unsupported field(s) {unknown}; supported: "
                             "pooling_type, normalize, dimensions, use_activation")
        if kw.get("use_activation") is None:
            kw.pop("use_activation", None)
        elif not isinstance(kw["use_activation"], bool):
            raise ValueError(f"pooler_config.use_activation must be a bool, "
                             f"got {kw['use_activation']!r}")
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

    ``dimensions``: keep the first ``dimensions`` values (of the vector, or of each
    ``token_embed`` row; matryoshka representation: only for models whose config.json says
    ``is_matryoshka`` or lists ``matryoshka_dimensions``), before normalization. ``normalize``: L2-normalize (None: the engine's pooler_config).
    ``use_activation``: a classifier's softmax / sigmoid (None: the pooler_config's; vLLM's
    older ``activation`` / ``softmax`` are the same switch). ``truncate_prompt_tokens``: keep
    the prompt's last k tokens (-1: max_model_len). ``task``: "embed", "classify", "score"
    (set by LLM.embed / classify / score and the server) or "encode".
    ``token_type_start``: where a scored text pair's second segment starts (token type 1
    from there on, the tokenizer's pair encoding; set by modelport/scoring.py, None: all
    type 0); only BERT-style encoders read it (models/token_types.py)."""

    dimensions: int | None = None
    normalize: bool | None = None
    truncate_prompt_tokens: int | None = None
    task: str | None = None
    use_activation: bool | None = None
    token_type_start: int | None = None
    activation: bool | None = field(default=None, repr=False)
    softmax: bool | None = field(default=None, repr=False)
    extra: dict[str, Any] = field(default_factory=dict, repr=False)

    def __post_init__(self) -> None:
        d = self.dimensions
        if d is not None and (not isinstance(d, int) or isinstance(d, bool)):
            raise ValueError(f"dimensions must be an integer, got {d!r}")
        if self.use_activation is None:
            self.use_activation = self.activation if self.activation is not None \
                else self.softmax
        for name in ("normalize", "use_activation"):
            v = getattr(self, name)
            if v is not None and not isinstance(v, bool):
                raise ValueError(f"{name} must be a bool, got {v!r}")
        t = self.truncate_prompt_tokens
        if t is not None and (not isinstance(t, int) or isinstance(t, bool)):
            raise ValueError(f"truncate_prompt_tokens must be an integer, got {t!r}")
        ts = self.token_type_start
        if ts is not None and (not isinstance(ts, int) or isinstance(ts, bool) or ts < 1):
            raise ValueError(f"token_type_start must be an integer >= 1, got {ts!r}")
        if self.task is not None and self.task not in POOLING_TASKS:
            raise ValueError(f"task {self.task!r} is not a pooling task: use one of "
                             f"{', '.join(POOLING_TASKS)}")

    def clone(self) -> PoolingParams:
        return PoolingParams(**{k: v for k, v in asdict(self).items()})

    def verify(self, model_name: str, hf_config: dict[str, Any],
               pooler: PoolerConfig | None = None) -> None:
        """Fill defaults from the engine's pooler_config and check the task against the
        model and ``dimensions`` against the model, with vLLM's rules and words
        (ValueError)."""
        pooler = pooler or PoolerConfig()
        task = self.task or "encode"
        if task == "encode":
            self.task = task = pooler.task
        if task in TOKEN_TASKS:
            self._verify_token_task(task, pooler, model_name, hf_config)
            return
        if pooler.task == "classify":
            if task == "embed":
                raise ValueError(unsupported_task_message("embed"))
            if task == "score" and num_labels(hf_config) != 1:
                raise ValueError("Score API is only enabled for num_labels == 1.")
            if self.dimensions is not None:
                raise ValueError("dimensions is only for embedding models: this model "
                                 "classifies")
            if self.use_activation is None:
                self.use_activation = pooler.use_activation
            return
        if task == "classify":
            raise ValueError(unsupported_task_message("classify"))
        if task == "embed" and self.use_activation is not None:  # as vLLM: not embed's
            raise ValueError("use_activation is only for classification tasks (classify, "
                             "token_classify), not for the embed task")
        if task == "score":  # an embedding model scores by cosine: the pairs are embedded
            self.task = "embed"
        if self.dimensions is None:
            self.dimensions = pooler.dimensions
        if self.normalize is None:
            self.normalize = pooler.normalize
        self._verify_dimensions(model_name, hf_config)

    def _verify_dimensions(self, model_name: str, hf_config: dict[str, Any]) -> None:
        """``dimensions`` against the model: matryoshka only, one of its listed sizes, at
        most its hidden size (vLLM's rules and words)."""
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

    def _verify_token_task(self, task: str, pooler: PoolerConfig, model_name: str,
                           hf_config: dict[str, Any]) -> None:
        if task not in pooler.token_tasks:
            supported = [pooler.task, *pooler.token_tasks]
            need = {"token_classify": "a classification model (*ForSequenceClassification)",
                    "token_embed": "an embedding model (or convert='embed')"}
            head = {"token_classify": "sparse_linear.pt", "token_embed": "colbert_linear.pt"}
            raise ValueError(f"pooling task {task!r} is not supported by this model (supported: "
                             f"{', '.join(supported)}); {task} needs {need[task]}, or a BGE-M3 "
                             f"checkpoint with {head[task]} beside model.safetensors")
        if task == "token_classify":
            if self.dimensions is not None:
                raise ValueError("dimensions is only for embedding tasks (embed, "
                                 "token_embed), not for the token_classify task")
            if self.use_activation is None:
                self.use_activation = pooler.use_activation
        else:  # token_embed: each row truncated (matryoshka), then normalized
            if self.use_activation is not None:
                raise ValueError("use_activation is only for classification tasks "
                                 "(classify, token_classify), not for the token_embed task")
            if self.dimensions is None:
                self.dimensions = pooler.dimensions
            self._verify_dimensions(model_name, hf_config)
        if self.normalize is None:
            self.normalize = pooler.normalize

    def to_dict(self) -> dict[str, Any]:
        return {"dimensions": self.dimensions, "normalize": self.normalize, "task": self.task,
                "use_activation": self.use_activation,
                "token_type_start": self.token_type_start}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> PoolingParams:
        return cls(dimensions=d.get("dimensions"), normalize=d.get("normalize"),
                   task=d.get("task"), use_activation=d.get("use_activation"),
                   token_type_start=d.get("token_type_start"))


def unflatten(flat: list[float], shape: list[int] | None) -> list[float] | list[list[float]]:
    """A pooled output as it crosses processes (flat floats) back in its shape: a token
    task's rows [n, d] (``shape`` [n, d]); a sequence vector as it is (``shape`` None)."""
    if shape is None:
        return flat
    n, d = shape
    if n * d != len(flat):
        raise ValueError(f"pooled output of {len(flat)} values does not fit shape {shape}")
    return [flat[i * d : (i + 1) * d] for i in range(n)]


def unsupported_task_message(task: str) -> str:
    """vLLM's words for a pooling task the served model does not do."""
    if task == "classify":
        return ("Classification API is not supported by this model. Try converting the model "
                "using `--convert classify`.")
    return ("Embedding API is not supported by this model. Try converting the model using "
            "`--convert embed`.")


def num_labels(hf_config: dict[str, Any]) -> int:
    """A classification checkpoint's number of labels (HF: ``id2label``, else ``num_labels``;
    HF's default is 2)."""
    id2label = hf_config.get("id2label")
    if isinstance(id2label, dict) and id2label:
        return len(id2label)
    n = hf_config.get("num_labels")
    return int(n) if isinstance(n, int) and n > 0 else 2


def id2label(hf_config: dict[str, Any]) -> dict[int, str]:
    """Label names by class index from config.json (its keys are strings there)."""
    raw = hf_config.get("id2label")
    if not isinstance(raw, dict):
        return {}
    return {int(k): str(v) for k, v in raw.items()}


def resolve_runner(runner: str | None, convert: str | None, task: str | None,
                   architecture: str) -> str:
    """``generate`` or ``pooling`` from vLLM's ``runner`` / ``convert`` and older ``task``.
    A ``*ForSequenceClassification`` architecture is a pooling model whatever ``auto`` says."""
    runner = runner or "auto"
    convert = convert or "auto"
    if runner not in RUNNERS:
        raise ValueError(f"runner {runner!r} is not supported: use one of {', '.join(RUNNERS)}")
    if convert not in CONVERTS:
        raise ValueError(f"convert {convert!r} is not supported: use one of "
                         f"{', '.join(CONVERTS)} (reward heads are not served)")
    if task is not None and task not in GENERATE_TASKS + EMBED_TASKS + CLASSIFY_TASKS:
        raise ValueError(f"task {task!r} is not supported: use 'generate', 'embed', 'classify' "
                         "or 'score' (reward models are not served)")
    wants_pool = convert in ("embed", "classify") or task in EMBED_TASKS + CLASSIFY_TASKS
    is_cls = architecture.endswith(SEQ_CLS_SUFFIX)
    if architecture in ENCODER_EMBED_ARCHITECTURES:  # BERT-family encoders: models/bert.py
        if runner == "generate" or task in GENERATE_TASKS[1:]:
            raise ValueError(f"{architecture} is an encoder (embedding) model: it cannot "
                             "generate; serve it with runner='pooling'")
        if convert == "classify" or task == "classify":
            raise ValueError(f"{architecture} has no classification head: it embeds; give a "
                             "*ForSequenceClassification checkpoint for classify / score")
        return "pooling"
    if runner == "generate":
        if wants_pool:
            what = f"convert {convert!r}" if convert in ("embed", "classify") else f"task {task!r}"
            raise ValueError(f"runner 'generate' conflicts with {what}")
        if is_cls:
            raise ValueError(f"{architecture} is a classification model: it cannot generate; "
                             "serve it with runner='pooling'")
        return "generate"
    if runner == "pooling" or wants_pool or is_cls:
        if is_cls:
            return "pooling"
        if not architecture.endswith("ForCausalLM"):
            raise ValueError(f"{architecture} cannot be converted to an embedding model")
        if convert == "classify" or task == "classify":  # task "score": by cosine
            name = f"convert {convert!r}" if convert == "classify" else f"task {task!r}"
            raise ValueError(
                f"{name} is not supported for {architecture}: a causal LM checkpoint has no "
                "classification head (score.weight); give a *ForSequenceClassification "
                "checkpoint, or use convert='embed'")
        return "pooling"
    return "generate"  # every built-in *ForCausalLM generates unless told otherwise


def default_token_tasks(task: str) -> tuple[str, ...]:
    """The per-token task a pooling model serves besides its own, as vLLM's poolers: an
    embedding model's ``token_embed`` (every token's final hidden state), a classifier's
    ``token_classify`` (its head on every token). BGE-M3 replaces these by its heads."""
    return ("token_classify",) if task == "classify" else ("token_embed",)


def resolve_pooling_task(convert: str | None, task: str | None, architecture: str) -> str:
    """The pooling runner's task: "classify" for a model with a classification head
    (unless convert='embed' / task='embed' asks for its backbone's embeddings), else
    "embed"."""
    if architecture.endswith(SEQ_CLS_SUFFIX) and convert != "embed" and task not in EMBED_TASKS:
        return "classify"
    return "embed"


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
    if params.token_type_start is not None and params.token_type_start >= n:
        raise ValueError(f"token_type_start ({params.token_type_start}) must be inside the "
                         f"prompt ({n} tokens)")
    params.verify(model_name, hf_config, pooler)
    return EngineCoreRequest(
        request_id=request_id, prompt_token_ids=list(prompt_token_ids), sampling_params={},
        eos_token_ids=[], arrival_time=time.monotonic() if arrival_time is None else arrival_time,
        priority=priority, pooling_params=params.to_dict())
