"""GGUF architectures beyond llama/qwen2: metadata -> HF config fields, tensor names, and the
inverse of llama.cpp's converter edits (convert_hf_to_gguf.py) for each family.

What the converter changes, and what we undo here:
- Gemma 1/2/3: every ``*norm.weight`` is stored with 1 added (llama.cpp multiplies by the
  stored weight, HF by ``1 + weight``): we subtract 1.
- Gemma 2/3: ``ffn_norm`` is HF's ``pre_feedforward_layernorm`` (``post_attention_norm`` and
  ``post_ffw_norm`` are the sandwich norms); the attention scale is not stored unless
  ``attention.scale`` is present, so ``query_pre_attn_scalar`` follows llama.cpp's rule
  (head_dim, but hidden/heads for the 27B models: 46 layers Gemma 2, 62 layers Gemma 3).
- Phi-3: ``attn_qkv`` / ``ffn_up`` hold HF's fused ``qkv_proj`` / ``gate_up_proj`` as is;
  LongRoPE factors are the tensors ``rope_factors_long`` / ``rope_factors_short``.
- MoE (Mixtral = "llama" with ``expert_count``, qwen2moe, qwen3moe): experts are stacked
  3-D tensors ``ffn_{gate,up,down}_exps`` [E, out, in]; we hand them on per expert under HF's
  per-expert names. Qwen2-MoE's shared-expert gate may be stored 1-D ([H]); HF's is [1, H].
- Mixtral's q/k rows are permuted like llama's (undone by gguf.unpermute_qk); Gemma, Qwen3,
  Phi-3, StarCoder2 and the Qwen MoEs use NEOX rope in llama.cpp and are stored unpermuted.
- SmolLM3 (``smollm3``): converted as Llama (q/k weights and biases permuted). Which layers
  are NoPE is stored nowhere: llama.cpp hard-codes every 4th layer (``n_no_rope_layer_step``
  = 4, HF's default ``no_rope_layer_interval``), and so do we.
- StarCoder2 (``starcoder2``): ``ffn_up`` / ``ffn_down`` are HF's ``c_fc`` / ``c_proj``; the
  LayerNorms keep their biases; the epsilon is ``attention.layer_norm_epsilon``. The
  converter writes no sliding window (llama.cpp runs none): one is honoured only where a file
  carries ``attention.sliding_window``.
- For these two, a ``{arch}.*`` metadata key outside what we read (an expert count, a
  different norm, ...) marks a variant we would load wrongly: it is refused by name.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

# per GGUF architecture: GGUF block tensor stem -> HF sub-name, where it differs from llama's
BLOCK_OVERRIDES: dict[str, dict[str, str]] = {
    "llama": {"ffn_gate_inp": "block_sparse_moe.gate"},  # Mixtral's router
    "gemma2": {"ffn_norm": "pre_feedforward_layernorm"},
    "gemma3": {"ffn_norm": "pre_feedforward_layernorm"},
    "phi3": {"ffn_up": "mlp.gate_up_proj"},  # gate rows then up rows, as HF's gate_up_proj
    "starcoder2": {"ffn_up": "mlp.c_fc", "ffn_down": "mlp.c_proj"},
}
# GGUF block tensor stems shared by several families (beyond llama's own)
EXTRA_BLOCK_NAMES: dict[str, str] = {
    "attn_q_norm": "self_attn.q_norm",
    "attn_k_norm": "self_attn.k_norm",
    "attn_qkv": "self_attn.qkv_proj",
    "post_attention_norm": "post_attention_layernorm",
    "post_ffw_norm": "post_feedforward_layernorm",
    "ffn_gate_inp": "mlp.gate",
    "ffn_gate_shexp": "mlp.shared_expert.gate_proj",
    "ffn_up_shexp": "mlp.shared_expert.up_proj",
    "ffn_down_shexp": "mlp.shared_expert.down_proj",
    "ffn_gate_inp_shexp": "mlp.shared_expert_gate",
}
# stacked expert tensors: GGUF stem -> index into the family's per-expert names
EXPERT_STEMS = {"ffn_gate_exps": 0, "ffn_up_exps": 1, "ffn_down_exps": 2}
# per MoE family: (HF prefix of the experts inside a layer, names of gate / up / down)
EXPERT_NAMES: dict[str, tuple[str, tuple[str, str, str]]] = {
    "llama": ("block_sparse_moe.experts", ("w1", "w3", "w2")),
    "qwen2moe": ("mlp.experts", ("gate_proj", "up_proj", "down_proj")),
    "qwen3moe": ("mlp.experts", ("gate_proj", "up_proj", "down_proj")),
}
GEMMA_ARCHS = ("gemma", "gemma2", "gemma3")
# global tensors read into the config rather than loaded as weights
CONFIG_TENSORS = ("rope_factors_long.weight", "rope_factors_short.weight")

Meta = Callable[..., Any]  # meta(key, default) -> value of "{arch}.{key}"


def block_name(arch: str, stem: str) -> str | None:
    """HF sub-name of a GGUF block tensor stem for this architecture (None: not ours here)."""
    own = BLOCK_OVERRIDES.get(arch, {})
    return own.get(stem) or EXTRA_BLOCK_NAMES.get(stem)


def stacked_expert_name(arch: str, layer: str, stem: str, kind: str) -> str | None:
    """The name a stacked expert tensor is listed under: HF's per-expert name with ``{e}``
    for the expert (the tensor itself is handed on per expert by ``expert_slices``)."""
    if stem not in EXPERT_STEMS or arch not in EXPERT_NAMES:
        return None
    prefix, names = EXPERT_NAMES[arch]
    return f"model.layers.{layer}.{prefix}.{{e}}.{names[EXPERT_STEMS[stem]]}.{kind}"


# early Mixtral conversions: one tensor per expert, blk.N.ffn_{gate,up,down}.E.weight
_LEGACY_EXPERT_RE = re.compile(r"^blk\.(\d+)\.(ffn_(?:gate|up|down))\.(\d+)\.(weight)$")


def legacy_expert_name(arch: str, gguf_name: str) -> str | None:
    """HF name of an early Mixtral per-expert tensor (None: not one)."""
    m = _LEGACY_EXPERT_RE.match(gguf_name)
    if m is None or arch != "llama":
        return None
    layer, stem, expert, kind = m.groups()
    template = stacked_expert_name(arch, layer, f"{stem}_exps", kind)
    return None if template is None else template.format(e=int(expert))


def expert_slices(template: str, w: np.ndarray) -> list[tuple[str, np.ndarray]]:
    """[E, out, in] -> one (HF name, [out, in]) per expert."""
    if w.ndim != 3:
        raise ValueError(f"stacked expert tensor for {template!r} has shape {w.shape}, "
                         "expected [experts, out, in]")
    return [(template.format(e=e), w[e]) for e in range(w.shape[0])]


def fix_tensor(arch: str, stem: str, w: np.ndarray) -> np.ndarray:
    """Undo the converter's value edits on one dequantized float32 tensor."""
    if arch in GEMMA_ARCHS and stem.endswith("norm"):
        return w - np.float32(1.0)  # stored as 1 + HF's weight
    if stem == "ffn_gate_inp_shexp" and w.ndim == 1:
        return w.reshape(1, -1)
    return w


def _float_or_none(value: Any) -> float | None:
    return None if value is None else float(str(np.float32(value)))


def _tensor(reader: Any, name: str) -> Any:
    return next((t for t in reader.tensors if t.name == name), None)


def _factors(reader: Any, name: str) -> list[float]:
    from gguf.quants import dequantize

    t = _tensor(reader, name)
    return np.asarray(dequantize(t.data, t.tensor_type), dtype=np.float32).ravel().tolist()


def _gemma_config(arch: str, meta: Meta, base: dict[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {"hidden_act": "gelu_pytorch_tanh",
                           "hidden_activation": "gelu_pytorch_tanh"}
    if arch == "gemma":
        return out
    n, head_dim = base["num_hidden_layers"], base["head_dim"]
    scale = meta("attention.scale", 0.0)
    if scale:
        out["query_pre_attn_scalar"] = _float_or_none(1.0 / float(scale) ** 2)
    elif n == (46 if arch == "gemma2" else 62):  # the 27B models (llama.cpp's rule)
        out["query_pre_attn_scalar"] = base["hidden_size"] // base["num_attention_heads"]
    else:
        out["query_pre_attn_scalar"] = head_dim
    out["sliding_window"] = int(meta("attention.sliding_window", 4096))
    out["final_logit_softcapping"] = _float_or_none(meta("final_logit_softcapping", None))
    if arch == "gemma2":
        out["attn_logit_softcapping"] = _float_or_none(meta("attn_logit_softcapping", None))
        pattern = 2
    else:
        pattern = meta("attention.sliding_window_pattern", 6)  # llama.cpp's default: 6
        out["rope_local_base_freq"] = _float_or_none(meta("rope.freq_base_swa", 10000.0))
    if isinstance(pattern, list):  # one flag per layer (true: windowed)
        if len(pattern) != n:
            raise ValueError(f"{arch}.attention.sliding_window_pattern has {len(pattern)} "
                             f"entries for {n} layers")
        sliding = [bool(p) for p in pattern]
    else:
        sliding = [(i + 1) % int(pattern) != 0 for i in range(n)]
    out["layer_types"] = ["sliding_attention" if s else "full_attention" for s in sliding]
    return out


def _phi3_config(reader: Any, meta: Meta, base: dict[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {"hidden_act": "silu"}
    rot = meta("rope.dimension_count", 0)
    if rot and int(rot) != base["head_dim"]:
        out["partial_rotary_factor"] = int(rot) / base["head_dim"]
    orig = meta("rope.scaling.original_context_length", 0)
    if orig:
        out["original_max_position_embeddings"] = int(orig)
    window = meta("attention.sliding_window", 0)
    out["sliding_window"] = int(window) if window else None
    names = {t.name for t in reader.tensors}
    if set(CONFIG_TENSORS) <= names:
        out["rope_scaling"] = {
            "rope_type": "longrope",
            "long_factor": _factors(reader, "rope_factors_long.weight"),
            "short_factor": _factors(reader, "rope_factors_short.weight"),
            "original_max_position_embeddings": int(orig or base["max_position_embeddings"]),
        }
    return out


def _moe_config(arch: str, reader: Any, meta: Meta, base: dict[str, Any],
                path: Path) -> dict[str, Any]:
    experts = int(meta("expert_count", 0))
    used = meta("expert_used_count", 0)
    if not used:
        raise ValueError(f"{path.name}: GGUF metadata is missing {arch}.expert_used_count")
    shapes = {t.name: [int(x) for x in t.shape] for t in reader.tensors}  # GGUF order: in first
    if arch == "llama":
        return {"architectures": ["MixtralForCausalLM"], "num_local_experts": experts,
                "num_experts_per_tok": int(used), "sliding_window": None, "hidden_act": "silu"}
    n = base["num_hidden_layers"]
    moe_ff = meta("expert_feed_forward_length", 0)
    if not moe_ff:
        first = next((k for k in shapes if k.endswith("ffn_gate_exps.weight")), None)
        if first is None:
            raise ValueError(f"{path.name}: {arch} file without expert tensors")
        moe_ff = shapes[first][1]
    out: dict[str, Any] = {
        "num_experts": experts, "num_experts_per_tok": int(used),
        "moe_intermediate_size": int(moe_ff), "decoder_sparse_step": 1,
        # layers without a router are dense (HF's mlp_only_layers)
        "mlp_only_layers": [i for i in range(n) if f"blk.{i}.ffn_gate_inp.weight" not in shapes],
        "norm_topk_prob": bool(meta("expert_weights_norm", arch == "qwen3moe")),
        "use_sliding_window": False, "hidden_act": "silu",
    }
    if arch == "qwen2moe":
        shared = meta("expert_shared_feed_forward_length", 0)
        gate = next((v for k, v in shapes.items() if k.endswith("ffn_gate_shexp.weight")), None)
        out["shared_expert_intermediate_size"] = int(shared or (gate[1] if gate else 0))
    return out


# {arch}.* keys the loader reads for the families checked strictly (_check_keys); anything
# else under the architecture's name is a variant we do not know
_COMMON_KEYS = frozenset({
    "context_length", "embedding_length", "block_count", "feed_forward_length", "vocab_size",
    "attention.head_count", "attention.head_count_kv", "attention.key_length",
    "attention.value_length", "rope.freq_base", "rope.dimension_count",
    # rope scaling: read (and any unsupported value refused) by loader.gguf._rope_scaling
    "rope.scaling.type", "rope.scaling.factor", "rope.scaling.original_context_length",
    "rope.scaling.finetuned", "rope.scaling.attn_factor", "rope.scaling.yarn_log_multiplier",
    "rope.scaling.yarn_ext_factor", "rope.scaling.yarn_attn_factor",
    "rope.scaling.yarn_beta_fast", "rope.scaling.yarn_beta_slow",
})
STRICT_KEYS: dict[str, frozenset[str]] = {
    "smollm3": _COMMON_KEYS | {"attention.layer_norm_rms_epsilon"},
    "starcoder2": _COMMON_KEYS | {"attention.layer_norm_epsilon", "attention.sliding_window"},
}
NO_ROPE_LAYER_STEP = 4  # SmolLM3's NoPE layers: llama.cpp's hard-coded n_no_rope_layer_step


def _check_keys(arch: str, reader: Any, meta: Meta, base: dict[str, Any], path: Path) -> None:
    """Refuse a file of a strictly checked family that carries a key we do not read, or a
    head shape our model cannot run (partial rotary, a value size other than the key size)."""
    prefix = f"{arch}."
    unknown = sorted(k for k in reader.fields if k.startswith(prefix)
                     and k[len(prefix):] not in STRICT_KEYS[arch])
    if unknown:
        raise ValueError(
            f"{path.name}: GGUF metadata {', '.join(unknown)} describes a {arch} variant this "
            f"loader does not know (it reads only: {', '.join(sorted(STRICT_KEYS[arch]))})")
    head_dim = base["head_dim"]
    for key in ("rope.dimension_count", "attention.value_length"):
        value = meta(key, None)
        if value is not None and int(value) != head_dim:
            raise ValueError(f"{path.name}: GGUF metadata {arch}.{key}={int(value)} differs "
                             f"from the head size {head_dim}: a {arch} variant this loader "
                             "does not support")


def _smollm3_config(names: set[str], base: dict[str, Any]) -> dict[str, Any]:
    n = base["num_hidden_layers"]
    rope = [int((i + 1) % NO_ROPE_LAYER_STEP != 0) for i in range(n)]  # 1: the layer rotates
    return {"hidden_act": "silu", "no_rope_layer_interval": NO_ROPE_LAYER_STEP,
            "no_rope_layers": rope, "use_sliding_window": False, "sliding_window": None,
            "mlp_bias": "blk.0.ffn_up.bias" in names}


def _starcoder2_config(names: set[str], meta: Meta, path: Path) -> dict[str, Any]:
    eps = meta("attention.layer_norm_epsilon", None)
    if eps is None:
        raise ValueError(f"{path.name}: GGUF metadata is missing "
                         "starcoder2.attention.layer_norm_epsilon")
    bias = "blk.0.attn_q.bias" in names
    window = meta("attention.sliding_window", 0)
    return {"hidden_act": "gelu_pytorch_tanh", "use_bias": bias, "attention_bias": bias,
            "norm_epsilon": _float_or_none(eps), "rms_norm_eps": _float_or_none(eps),
            "sliding_window": int(window) if window else None}


def arch_config(arch: str, reader: Any, meta: Meta, base: dict[str, Any],
                path: Path) -> dict[str, Any]:
    """HF config fields of this GGUF architecture beyond the llama-style base dict."""
    if arch in STRICT_KEYS:
        _check_keys(arch, reader, meta, base, path)
        names = {t.name for t in reader.tensors}
        if arch == "smollm3":
            return _smollm3_config(names, base)
        return _starcoder2_config(names, meta, path)
    if arch in GEMMA_ARCHS:
        return _gemma_config(arch, meta, base)
    if arch == "phi3":
        return _phi3_config(reader, meta, base)
    if arch in ("qwen2moe", "qwen3moe") or (arch == "llama" and meta("expert_count", 0)):
        return _moe_config(arch, reader, meta, base, path)
    if arch == "qwen3":
        return {"use_sliding_window": False}
    return {}
