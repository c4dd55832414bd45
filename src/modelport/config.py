"""Engine configuration: small frozen dataclasses, one per concern, validated on construction.

The KV-cache accounting helpers at the bottom are the single source of truth shared by the
engine (which allocates) and the capacity planner (which predicts), so the two always agree.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

_DTYPE_BYTES = {
    "float32": 4,
    "fp32": 4,
    "float16": 2,
    "fp16": 2,
    "half": 2,
    "bfloat16": 2,
    "bf16": 2,
    "fp8": 1,
    "fp8_e4m3": 1,
    "fp8_e5m2": 1,
}


def dtype_bytes(name: str) -> int:
    """Bytes per element for a dtype name (torch-free so the scheduler side can use it)."""
    try:
        return _DTYPE_BYTES[name.lower()]
    except KeyError:
        raise ValueError(
            f"unknown dtype {name!r}; expected one of {sorted(set(_DTYPE_BYTES))}"
        ) from None


_CANONICAL_DTYPES = {
    "float32": "float32", "fp32": "float32", "float": "float32",
    "float16": "float16", "fp16": "float16", "half": "float16",
    "bfloat16": "bfloat16", "bf16": "bfloat16",
}


def auto_dtype(on_cuda: bool, checkpoint_dtype: str) -> str:
    """What dtype "auto" means: float32 on CPU; on a GPU the checkpoint's own dtype, with
    float32 checkpoints run in bfloat16. Torch-free, shared by the loader and the planner."""
    if not on_cuda:
        return "float32"
    ckpt = _CANONICAL_DTYPES.get(checkpoint_dtype.lower().removeprefix("torch."), "float32")
    return "bfloat16" if ckpt == "float32" else ckpt


# score elements one query chunk of the cache-less attention of the runner's profiling
# forward may hold (layers/attention.py Attention._dummy_attention; the planner's estimate)
DUMMY_ATTENTION_SCORES = 2**26
# rows the sampler filters and draws at once (runner/sampler.py): its sort / softmax copies
# of [rows, vocab] stay this wide however many rows a step samples; the planner counts it
SAMPLER_ROWS = 256

# GPUs from which vLLM's larger default token budgets apply (its rule: this much memory,
# and not an A100, where a large budget measured slower)
LARGE_GPU_BYTES = 70 * 2**30


def is_large_gpu(memory_bytes: int, name: str) -> bool:
    return memory_bytes >= LARGE_GPU_BYTES and "a100" not in name.lower()


# The largest decode batch replayed from a CUDA graph when --cuda-graph-sizes does not say
# (vLLM's default capture limit): wider decode steps run eagerly, where launch overhead is
# a small part of the step.
DEFAULT_MAX_GRAPH_BATCH = 512


def default_max_num_batched_tokens(on_cuda: bool, *, offline: bool = False,
                                   large_gpu: bool = False) -> int:
    """Per-step token budget when none is given (engine and planner alike), vLLM's table:
    512 on a CPU; on a large GPU (is_large_gpu: H100, H200, ...) 16,384 for offline use
    (``LLM``, the benchmarks) and 8,192 served; on other GPUs 8,192 offline, 2,048 served."""
    if not on_cuda:
        return 512
    if large_gpu:
        return 16384 if offline else 8192
    return 8192 if offline else 2048


@dataclass(frozen=True)
class ModelConfig:
    """Architecture hyper-parameters, normalised from an HF config.json or GGUF metadata."""

    architecture: str
    vocab_size: int
    hidden_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    intermediate_size: int
    head_dim: int = 0  # 0: hidden_size // num_attention_heads
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    rope_scaling: dict[str, Any] | None = None
    max_position_embeddings: int = 2048
    tie_word_embeddings: bool = False
    attention_bias: bool = False
    bos_token_id: int | None = None
    eos_token_ids: tuple[int, ...] = ()
    torch_dtype: str = "float32"  # the checkpoint's own dtype
    # the engine's max_model_len (EngineArgs sets it; None: max_position_embeddings), for
    # models whose computation depends on it (LongRoPE picks its factors by it)
    max_model_len: int | None = None
    hf_config: dict[str, Any] = field(default_factory=dict, compare=False, repr=False)

    def __post_init__(self) -> None:
        if self.head_dim == 0:
            object.__setattr__(self, "head_dim", self.hidden_size // self.num_attention_heads)
        for name in (
            "vocab_size",
            "hidden_size",
            "num_hidden_layers",
            "num_attention_heads",
            "num_key_value_heads",
            "intermediate_size",
            "head_dim",
        ):
            if getattr(self, name) <= 0:
                raise ValueError(f"model config: {name} must be > 0, got {getattr(self, name)}")
        if self.max_model_len is not None and self.max_model_len <= 0:
            raise ValueError(f"model config: max_model_len must be > 0, got {self.max_model_len}")
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError(
                f"model config: num_attention_heads ({self.num_attention_heads}) must be a "
                f"multiple of num_key_value_heads ({self.num_key_value_heads})"
            )

    @classmethod
    def from_hf_dict(cls, d: dict[str, Any]) -> ModelConfig:
        """Build from a parsed HF config.json (missing required keys raise ValueError). A
        multimodal checkpoint's nested ``text_config`` is read as the model's config."""
        d = _normalize_rope_keys(flatten_text_config(d))
        archs = d.get("architectures") or []
        if not archs:
            raise ValueError("config.json has no 'architectures' entry")
        required = ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads")
        missing = [k for k in required if k not in d]
        if missing:
            raise ValueError(f"config.json is missing required fields: {', '.join(missing)}")
        eos = d.get("eos_token_id")
        if eos is None:
            eos_ids: tuple[int, ...] = ()
        elif isinstance(eos, list):
            eos_ids = tuple(int(e) for e in eos)
        else:
            eos_ids = (int(eos),)
        n_heads = int(d["num_attention_heads"])
        return cls(
            architecture=archs[0],
            vocab_size=int(d["vocab_size"]),
            hidden_size=int(d["hidden_size"]),
            num_hidden_layers=int(d["num_hidden_layers"]),
            num_attention_heads=n_heads,
            num_key_value_heads=int(d.get("num_key_value_heads") or n_heads),
            intermediate_size=int(d.get("intermediate_size", 4 * int(d["hidden_size"]))),
            head_dim=int(d.get("head_dim") or 0),
            rms_norm_eps=float(d.get("rms_norm_eps", d.get("norm_epsilon", 1e-6))),
            rope_theta=float(d.get("rope_theta", 10000.0)),
            rope_scaling=d.get("rope_scaling"),
            max_position_embeddings=int(d.get("max_position_embeddings", 2048)),
            # Gemma's and StarCoder2's HF configs default to a tied head
            tie_word_embeddings=bool(d.get("tie_word_embeddings",
                                           archs[0].startswith(("Gemma", "Starcoder2")))),
            attention_bias=bool(d.get("attention_bias", False))
            or archs[0] in ("Qwen2ForCausalLM",)
            or (archs[0] in _USE_BIAS and bool(d.get("use_bias", True))),
            bos_token_id=d.get("bos_token_id"),
            eos_token_ids=eos_ids,
            torch_dtype=str(d.get("torch_dtype") or d.get("dtype") or "float32"),
            hf_config=dict(d),
        )

    @property
    def num_params(self) -> int:
        """Parameters the checkpoint holds: a llama-style decoder of this shape, each family's
        extra norms / biases, and for MoE models every expert, router and shared expert."""
        from modelport.models.moe_config import moe_extra_params  # it imports this module

        h, i, L = self.hidden_size, self.intermediate_size, self.num_hidden_layers
        q = self.num_attention_heads * self.head_dim
        kv = self.num_key_value_heads * self.head_dim
        attn = h * q + 2 * h * kv + q * h + (q + 2 * kv if self.attention_bias else 0)
        mlp = 2 * h * i if self.architecture in _USE_BIAS else 3 * h * i  # no gate
        per_layer = attn + mlp + 2 * h + _family_layer_params(self, q, kv)
        emb = self.vocab_size * h
        head = 0 if self.tie_word_embeddings else self.vocab_size * h
        final_norm = 2 * h if self.architecture in _USE_BIAS else h  # LayerNorm: + bias
        return L * per_layer + emb + head + final_norm + moe_extra_params(self)


# StarCoder2: one ``use_bias`` for every linear layer (q/k/v, o, c_fc, c_proj), LayerNorms
# with a bias, a two-matrix GeLU MLP
_USE_BIAS = ("Starcoder2ForCausalLM",)
# HF's ``attention_bias`` puts a bias on o_proj too in these (Qwen2's q/k/v biases only)
O_PROJ_BIAS = ("LlamaForCausalLM", "SmolLM3ForCausalLM")


# Gemma 3's text decoder: text-only checkpoints, and multimodal ones served text-only
GEMMA3_ARCHITECTURES = ("Gemma3ForCausalLM", "Gemma3ForConditionalGeneration")

# multimodal architectures served text-only -> HF's defaults for the keys their config.json
# may leave out of ``text_config`` (transformers' Gemma3TextConfig: the released gemma-3-4b /
# 12b / 27b configs give only a few keys there)
TEXT_CONFIG_DEFAULTS: dict[str, dict[str, Any]] = {
    "Gemma3ForConditionalGeneration": {
        "vocab_size": 262208, "hidden_size": 2304, "intermediate_size": 9216,
        "num_hidden_layers": 26, "num_attention_heads": 8, "num_key_value_heads": 4,
        "head_dim": 256, "hidden_activation": "gelu_pytorch_tanh",
        "max_position_embeddings": 131072, "rms_norm_eps": 1e-6, "pad_token_id": 0,
        "eos_token_id": 1, "bos_token_id": 2, "tie_word_embeddings": True,
        "rope_theta": 1_000_000.0, "rope_local_base_freq": 10_000.0, "attention_bias": False,
        "query_pre_attn_scalar": 256, "sliding_window": 4096, "sliding_window_pattern": 6,
        "final_logit_softcapping": None, "attn_logit_softcapping": None,
    },
}


# checkpoint tensor prefixes of the parts a text-only server never reads (the vision tower
# and projector: models/gemma.py skips them, the planner does not count them)
UNREAD_PREFIXES: dict[str, tuple[str, ...]] = {
    "Gemma3ForConditionalGeneration": ("vision_tower.", "multi_modal_projector.",
                                       "model.vision_tower.", "model.multi_modal_projector."),
}


def flatten_text_config(d: dict[str, Any]) -> dict[str, Any]:
    """A multimodal config.json (``text_config`` nested, no top-level ``hidden_size``) as its
    text model's config: HF's defaults for the architecture, then the top-level keys (dtype,
    eos / bos ids, quantization_config, ...), then ``text_config``'s, which win; the
    architecture stays the top-level one. Other configs are returned as they are."""
    text = d.get("text_config")
    if not isinstance(text, dict) or "hidden_size" in d:
        return d
    archs = d.get("architectures") or []
    defaults = TEXT_CONFIG_DEFAULTS.get(archs[0] if archs else "", {})
    top = {k: v for k, v in d.items() if k != "text_config"}
    return {**defaults, **top, **text, "architectures": archs}


def _family_layer_params(c: ModelConfig, q: int, kv: int) -> int:
    """Per-layer weights some families add to a llama layer."""
    arch, extra = c.architecture, 0
    if arch in ("Qwen3ForCausalLM", "Qwen3MoeForCausalLM", *GEMMA3_ARCHITECTURES):
        extra += 2 * c.head_dim  # q_norm / k_norm over one head
    if arch in ("Gemma2ForCausalLM", *GEMMA3_ARCHITECTURES):
        extra += 2 * c.hidden_size  # pre/post feed-forward norms beside the two llama ones
    if arch in ("Olmo2ForCausalLM", "OlmoeForCausalLM"):
        extra += q + kv  # q_norm / k_norm over the whole projections
    if arch in O_PROJ_BIAS and c.attention_bias:
        extra += c.hidden_size  # o_proj's bias
    if arch in _USE_BIAS:
        extra += 2 * c.hidden_size  # the two LayerNorms' biases
        if c.attention_bias:  # use_bias: o_proj, c_fc and c_proj too
            extra += 2 * c.hidden_size + c.intermediate_size
    if (arch == "Qwen2MoeForCausalLM" and not c.attention_bias
            and c.hf_config.get("qkv_bias", True)):
        extra += q + 2 * kv  # q/k/v biases (qkv_bias)
    return extra


def _normalize_rope_keys(d: dict[str, Any]) -> dict[str, Any]:
    """transformers >= 5 nests rope settings in ``rope_parameters`` (theta included) instead
    of top-level ``rope_theta`` / ``rope_scaling``: read either spelling."""
    params = d.get("rope_parameters")
    if not isinstance(params, dict):
        return d
    d = dict(d)
    if "rope_theta" in params:
        d.setdefault("rope_theta", params["rope_theta"])
    kind = params.get("rope_type", params.get("type", "default"))
    if kind != "default" and not d.get("rope_scaling"):
        d["rope_scaling"] = {k: v for k, v in params.items() if k != "rope_theta"}
    return d


def merge_rope_overrides(hf: dict[str, Any], overrides: dict[str, Any]) -> dict[str, Any]:
    """config.json with vLLM's hf_overrides (or --rope-scaling / --rope-theta) applied. In a
    transformers >= 5 config the rope settings live in ``rope_parameters``, which wins over
    top-level ``rope_scaling`` / ``rope_theta``: overrides of those go into it, or they would
    be ignored."""
    merged = {**hf, **overrides}
    params = hf.get("rope_parameters")
    given = {"rope_scaling", "rope_theta"} & set(overrides)
    if not given or not isinstance(params, dict) or "rope_parameters" in overrides:
        return merged
    if any(isinstance(v, dict) for v in params.values()):  # one per attention layer type
        raise ValueError("this model's config.json has rope_parameters per layer type: give "
                         "them whole (hf_overrides {\"rope_parameters\": {...}}) instead of "
                         f"{' / '.join(sorted(given))}")
    new = dict(params)
    if "rope_scaling" in overrides:
        scaling = dict(overrides["rope_scaling"] or {})
        if "type" in scaling and "rope_type" not in scaling:  # vLLM's older spelling
            scaling["rope_type"] = scaling.pop("type")
        new = {"rope_theta": params.get("rope_theta", hf.get("rope_theta", 10000.0)),
               "rope_type": "default", **scaling}
    if "rope_theta" in overrides:
        new["rope_theta"] = overrides["rope_theta"]
    merged["rope_parameters"] = new
    return merged


@dataclass(frozen=True)
class CacheConfig:
    """Paged KV cache: block size, how much memory it may take, prefix caching."""

    block_size: int = 16
    # bytes given to the KV cache. None -> 1 GiB on CPU; on CUDA derived from
    # gpu_memory_utilization after a profiling forward (given: used as is, as vLLM's
    # kv_cache_memory_bytes)
    kv_cache_memory: int | None = None
    gpu_memory_utilization: float = 0.90
    enable_prefix_caching: bool = True
    kv_cache_dtype: str = "auto"
    # vLLM's num_gpu_blocks_override: the number of blocks, whatever the budget gives
    num_gpu_blocks_override: int | None = None

    def __post_init__(self) -> None:
        if self.num_gpu_blocks_override is not None and self.num_gpu_blocks_override <= 0:
            raise ValueError("num_gpu_blocks_override must be > 0, got "
                             f"{self.num_gpu_blocks_override}")
        if self.block_size <= 0 or self.block_size & (self.block_size - 1):
            raise ValueError(f"block_size must be a positive power of two, got {self.block_size}")
        if self.kv_cache_memory is not None and self.kv_cache_memory <= 0:
            raise ValueError(f"kv_cache_memory must be > 0 bytes, got {self.kv_cache_memory}")
        if not 0.0 < self.gpu_memory_utilization <= 1.0:
            raise ValueError(
                f"gpu_memory_utilization must be in (0, 1], got {self.gpu_memory_utilization}"
            )
        if self.kv_cache_dtype not in ("auto", "fp8", "fp8_e4m3", "bfloat16", "float16", "float32"):
            raise ValueError(f"unsupported kv_cache_dtype {self.kv_cache_dtype!r}")


DEFAULT_CPU_KV_CACHE_MEMORY = 1 << 30


def cpu_kv_cache_space() -> int | None:
    """vLLM's VLLM_CPU_KVCACHE_SPACE (or MODELPORT_CPU_KVCACHE_SPACE): the KV cache of an
    engine on the CPU, in GiB, when kv_cache_memory is not given; None when unset or 0 (the
    default budget then, DEFAULT_CPU_KV_CACHE_MEMORY)."""
    from modelport.envs import env_value

    value = env_value("CPU_KVCACHE_SPACE")
    if value is None:
        return None
    try:
        gib = float(value)
    except ValueError:
        gib = -1.0
    if not gib >= 0 or gib == float("inf"):
        raise ValueError(f"MODELPORT_/VLLM_CPU_KVCACHE_SPACE is {value!r}: give the CPU KV "
                         "cache's size in GiB, a number >= 0 (0: the default, 1 GiB)")
    return int(gib * 2**30) or None


@dataclass(frozen=True)
class SchedulerConfig:
    """Continuous batching limits: per-step token budget and concurrent sequences.

    ``policy`` is vLLM's scheduling_policy: "fcfs" (first come, first served; a request's
    priority must be 0) or "priority" (waiting requests are admitted by (priority, arrival
    time), lower values first, and a running request short of KV blocks preempts the running
    request with the largest (priority, arrival time); see engine/scheduler.py)."""

    max_num_seqs: int = 256
    max_num_batched_tokens: int = 2048
    max_model_len: int = 2048
    enable_chunked_prefill: bool = True
    max_waiting_requests: int | None = None
    policy: str = "fcfs"
    # vLLM V1's: at most this many new tokens for one request in a step (0: no cap), so a
    # long prompt leaves part of each step's budget to the requests after it
    long_prefill_token_threshold: int = 0

    def verify_priority(self, priority: int) -> None:
        """vLLM's check: a nonzero priority needs the priority policy (ValueError: 400)."""
        if priority != 0 and self.policy != "priority":
            raise ValueError(f"Got priority {priority} but Priority scheduling is not enabled.")

    def __post_init__(self) -> None:
        if self.policy not in ("fcfs", "priority"):
            raise ValueError(f"scheduling policy must be 'fcfs' or 'priority', got {self.policy!r}")
        for name in ("max_num_seqs", "max_num_batched_tokens", "max_model_len"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be > 0, got {getattr(self, name)}")
        if not self.enable_chunked_prefill and self.max_num_batched_tokens < self.max_model_len:
            raise ValueError(
                "without chunked prefill max_num_batched_tokens "
                f"({self.max_num_batched_tokens}) must be >= max_model_len ({self.max_model_len})"
            )


@dataclass(frozen=True)
class SpeculativeConfig:
    """Speculative decoding, vLLM's ``speculative_config``: draft tokens that the model checks
    in one forward (one position each); greedy requests keep their exact output, sampled ones
    their distribution (rejection sampling against a deterministic proposal).

    ``method="ngram"``: prompt lookup, no second model. A decoding request's last
    ``prompt_lookup_max`` .. ``prompt_lookup_min`` tokens are looked up earlier in its own
    prompt and output, and the tokens that followed the latest match are the drafts. As in
    vLLM, a missing bound takes the other one's value, and with neither both are 5.
    ``method="draft_model"`` (``model=PATH``): a smaller model with the same vocabulary runs
    beside the target on the same KV block tables and proposes its greedy continuation.
    ``method="eagle"`` / ``"eagle3"`` (``model=PATH``): an EAGLE-1 / EAGLE-3 head
    (runner/eagle.py) for a Llama-family target: a decoder layer fed the target's own hidden
    states (EAGLE-3: three of its layers' streams), on the same block tables.
    """

    num_speculative_tokens: int
    method: str = "ngram"
    prompt_lookup_max: int | None = None  # None: resolved as vLLM does (see __post_init__)
    prompt_lookup_min: int | None = None
    model: str | None = None  # the draft model or EAGLE head ("draft_model", "eagle", "eagle3")
    # no drafts while more requests than this are running (vLLM's disable_by_batch_size):
    # large batches are already bound by compute, where checking drafts costs more than it saves
    disable_by_batch_size: int | None = None
    # vLLM: 1 or the target's tensor_parallel_size; a draft model here needs tp 1, so only 1
    draft_tensor_parallel_size: int | None = None
    # vLLM: the draft model's max_model_len (at most the target's and the draft's own)
    max_model_len: int | None = None

    def __post_init__(self) -> None:
        if self.method not in ("ngram", "draft_model", "eagle", "eagle3"):
            raise ValueError(f"speculative method {self.method!r} is not supported; supported: "
                             "ngram, draft_model, eagle, eagle3")
        if (self.method != "ngram") != (self.model is not None):
            raise ValueError("speculative_config: a draft model or EAGLE head needs method "
                             "'draft_model', 'eagle' or 'eagle3' and 'model' (a path); method "
                             "'ngram' takes no model")
        if not 1 <= self.num_speculative_tokens <= 16:
            raise ValueError("num_speculative_tokens must be in [1, 16], got "
                             f"{self.num_speculative_tokens}")
        if self.disable_by_batch_size is not None and self.disable_by_batch_size < 1:
            raise ValueError(f"disable_by_batch_size must be >= 1, got {self.disable_by_batch_size}")
        for name in ("prompt_lookup_max", "prompt_lookup_min", "draft_tensor_parallel_size",
                     "max_model_len"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ValueError(f"speculative_config.{name} must be >= 1, got {value}")
        if self.method != "ngram" and self.draft_tensor_parallel_size not in (None, 1):
            # vLLM allows 1 or the target's tensor_parallel_size; a draft model needs tp 1 here
            raise ValueError("speculative_config.draft_tensor_parallel_size must be 1: a draft "
                             "model runs with tensor_parallel_size 1 here, got "
                             f"{self.draft_tensor_parallel_size}")
        # vLLM's defaults: neither bound given -> both 5; one given -> the other takes its value
        lo, hi = self.prompt_lookup_min, self.prompt_lookup_max
        if lo is None and hi is None:
            lo = hi = 5
        elif lo is None:
            lo = hi
        elif hi is None:
            hi = lo
        object.__setattr__(self, "prompt_lookup_min", lo)
        object.__setattr__(self, "prompt_lookup_max", hi)
        if self.method == "ngram" and not 1 <= lo <= hi:
            raise ValueError(f"need 1 <= prompt_lookup_min ({lo}) <= prompt_lookup_max ({hi})")

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> SpeculativeConfig:
        """From vLLM's speculative_config dict: ``{"method": "ngram", "num_speculative_tokens":
        k, "prompt_lookup_max": n, "prompt_lookup_min": m}`` or ``{"model": PATH,
        "num_speculative_tokens": k}`` (method "draft_model" implied) or ``{"method": "eagle"
        (or "eagle3"), "model": PATH, "num_speculative_tokens": k}``.

        Like vLLM's (a pydantic dataclass that forbids extra fields), unknown keys are errors.
        vLLM's other keys are accepted where they change nothing here (their vLLM default, an
        EAGLE/suffix/tensor-parallel-only knob, a draft-model setting under method "ngram"),
        and refused, naming the key, where modelport cannot do what they ask."""
        if not isinstance(d, dict):
            raise ValueError(f"speculative_config must be a dict, got {type(d).__name__}")
        own = {"method", "num_speculative_tokens", "prompt_lookup_max", "prompt_lookup_min",
               "model", "disable_by_batch_size", "draft_tensor_parallel_size", "max_model_len"}
        unknown = sorted(set(d) - own - set(_VLLM_SPEC_DEFAULTS) - {"tensor_parallel_size"})
        if unknown:
            raise ValueError(f"speculative_config: unknown keys {unknown}; known: "
                             f"{sorted(own | set(_VLLM_SPEC_DEFAULTS))}")
        if d.get("tensor_parallel_size") is not None:  # vLLM refuses it with the same hint
            raise ValueError("speculative_config: 'tensor_parallel_size' is not a valid key; "
                             "pass 'draft_tensor_parallel_size'")
        if "num_speculative_tokens" not in d:
            raise ValueError("speculative_config needs num_speculative_tokens")
        kw = {k: d[k] for k in own if k in d and d[k] is not None}
        for k in ("num_speculative_tokens", "prompt_lookup_max", "prompt_lookup_min",
                  "disable_by_batch_size", "draft_tensor_parallel_size", "max_model_len"):
            if k in kw and (isinstance(kw[k], bool) or not isinstance(kw[k], int)):
                raise ValueError(f"speculative_config.{k} must be an integer, got {kw[k]!r}")
        if kw.get("model") in ("ngram", "[ngram]"):  # vLLM's spelling of the n-gram method
            del kw["model"]
            kw.setdefault("method", "ngram")
        if "model" in kw:
            if not isinstance(kw["model"], str) or not kw["model"]:
                raise ValueError("speculative_config.model must be a model path")
            kw.setdefault("method", "draft_model")
        method = kw.get("method", "ngram")
        for k, default in _VLLM_SPEC_DEFAULTS.items():
            if k not in d or d[k] == default:
                continue
            value = d[k]
            if k in _VLLM_SPEC_NOOP:
                expected = _VLLM_SPEC_NOOP[k]
                if isinstance(value, bool) != (expected is bool) or not isinstance(value, expected):
                    raise ValueError(f"speculative_config.{k} has the wrong type: {value!r}")
                continue  # changes nothing here
            if k in _VLLM_SPEC_DRAFT_ONLY and method == "ngram":
                continue  # vLLM applies it to a draft model only: n-grams ignore it
            raise ValueError(f"speculative_config.{k}={value!r} is not supported here "
                             f"(vLLM's default: {default!r})")
        return cls(**kw)  # n-grams ignore draft_tensor_parallel_size, max_model_len (vLLM)


# vLLM SpeculativeConfig fields (beside the ones SpeculativeConfig holds) and their defaults:
# passing the default changes nothing
_VLLM_SPEC_DEFAULTS: dict[str, Any] = {
    "enforce_eager": None, "quantization": None, "moe_backend": None,
    "attention_backend": None, "kv_cache_dtype": None, "revision": None,
    "code_revision": None, "index_share_for_mtp_iteration": None,
    "disable_padded_drafter_batch": False, "disable_eagle_block_drop": False,
    "use_local_argmax_reduction": False, "use_heterogeneous_vocab": False,
    "parallel_drafting": False, "num_speculative_tokens_per_batch_size": None,
    "suffix_decoding_max_tree_depth": 24, "suffix_decoding_max_cached_requests": 10000,
    "suffix_decoding_max_spec_factor": 1.0, "suffix_decoding_min_token_prob": 0.1,
    "draft_load_config": None, "rejection_sample_method": "standard",
    "synthetic_acceptance_rates": None, "synthetic_acceptance_length": None,
    "enable_adaptive_verification": False, "draft_sample_method": "greedy",
    "dspark_draft_topk": None,
}
# any value changes nothing here: EAGLE-only, tensor-parallel-only or suffix-decoding-only knobs,
# a CUDA-graph switch (speed only) and Hugging Face revisions (models are local paths here)
_VLLM_SPEC_NOOP: dict[str, type | tuple[type, ...]] = {
    "disable_padded_drafter_batch": bool, "disable_eagle_block_drop": bool,
    "use_local_argmax_reduction": bool, "enforce_eager": bool, "revision": str,
    "code_revision": str, "suffix_decoding_max_tree_depth": int,
    "suffix_decoding_max_cached_requests": int, "suffix_decoding_max_spec_factor": (int, float),
    "suffix_decoding_min_token_prob": (int, float),
}
# settings of the draft model: ignored by vLLM under method "ngram", unsupported with a draft
_VLLM_SPEC_DRAFT_ONLY = {"quantization", "moe_backend", "attention_backend", "kv_cache_dtype",
                         "draft_load_config", "parallel_drafting",
                         "draft_sample_method"}


@dataclass(frozen=True)
class ParallelConfig:
    """Tensor parallelism splits one replica's layers over `tensor_parallel_size` devices;
    data parallelism runs `data_parallel_size` replicas (engine cores), each with its own
    devices and KV cache, behind one server (`modelport serve`). `data_parallel_rank`: which
    replica a core's config describes. `enable_expert_parallel`: the tensor-parallel ranks
    split a mixture-of-experts model's experts between them, whole, instead of slicing every
    expert (parallel/moe_parallel.py)."""

    tensor_parallel_size: int = 1
    data_parallel_size: int = 1
    data_parallel_rank: int = 0
    enable_expert_parallel: bool = False

    def __post_init__(self) -> None:
        if self.tensor_parallel_size < 1:
            raise ValueError(f"tensor_parallel_size must be >= 1, got {self.tensor_parallel_size}")
        if self.data_parallel_size < 1:
            raise ValueError(f"data_parallel_size must be >= 1, got {self.data_parallel_size}")
        if not 0 <= self.data_parallel_rank < self.data_parallel_size:
            raise ValueError(
                f"data_parallel_rank must be in [0, {self.data_parallel_size}), "
                f"got {self.data_parallel_rank}"
            )

    @property
    def world_size(self) -> int:
        """Processes that share the host's devices (or CPU cores): every rank of every replica."""
        return self.tensor_parallel_size * self.data_parallel_size


@dataclass(frozen=True)
class LoadConfig:
    """Where weights come from: 'auto' (safetensors folder or .gguf file) or 'dummy' (random)."""

    load_format: str = "auto"
    quantization: str | None = None
    seed: int = 0

    def __post_init__(self) -> None:
        if self.load_format not in ("auto", "safetensors", "gguf", "dummy"):
            raise ValueError(
                f"load_format must be one of auto, safetensors, gguf, dummy; got {self.load_format!r}"
            )


def kv_cache_bytes_per_token(
    model: ModelConfig, kv_dtype_bytes: int, tensor_parallel_size: int = 1
) -> int:
    """Bytes of K and V one token occupies on one GPU: 2 x layers x kv_heads x head_dim x bytes.

    Under tensor parallelism each rank holds kv_heads / tp heads (at least one: replicated
    when tp exceeds the KV head count).
    """
    kv_heads = max(1, model.num_key_value_heads // tensor_parallel_size)
    return 2 * model.num_hidden_layers * kv_heads * model.head_dim * kv_dtype_bytes


def num_kv_blocks(
    memory_bytes: int,
    model: ModelConfig,
    block_size: int,
    kv_dtype_bytes: int,
    tensor_parallel_size: int = 1,
) -> int:
    """How many KV blocks fit in memory_bytes: the engine allocates exactly this many."""
    per_block = block_size * kv_cache_bytes_per_token(model, kv_dtype_bytes, tensor_parallel_size)
    return int(memory_bytes) // per_block
