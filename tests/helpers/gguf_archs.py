"""Tiny HF checkpoints of more families written as llama.cpp-style GGUF files.

Written from llama.cpp's converter conventions (convert_hf_to_gguf.py / gguf-py's tensor
names), independently of our loader: Gemma norms stored as 1 + weight, Phi-3's fused
``attn_qkv`` / ``ffn_up``, MoE experts stacked into ``ffn_{gate,up,down}_exps`` [E, out, in],
Qwen2-MoE's shared expert (its gate 1-D), Mixtral as "llama" with ``expert_count`` and q/k
rows permuted, SmolLM3 converted as Llama (q/k weights and biases permuted, no NoPE key:
llama.cpp hard-codes every 4th layer), StarCoder2's ``c_fc`` / ``c_proj`` as ``ffn_up`` /
``ffn_down`` with its LayerNorm epsilon as ``attention.layer_norm_epsilon`` and no sliding
window. The tokenizer is the tiny byte-level one of helpers.tiny_models.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from helpers.tiny_models import CHAT_TEMPLATE, SPECIAL_TOKENS, _byte_to_char, llama_cpp_permute

GGUF_ARCH = {"llama": "llama", "qwen3": "qwen3", "gemma": "gemma", "gemma2": "gemma2",
             "gemma3_text": "gemma3", "phi3": "phi3", "mixtral": "llama",
             "qwen2_moe": "qwen2moe", "qwen3_moe": "qwen3moe", "smollm3": "smollm3",
             "starcoder2": "starcoder2"}
PERMUTED = ("llama", "smollm3")  # llama.cpp's LlamaModel (and subclasses) permute q/k
_SUB = {
    "input_layernorm": "attn_norm",
    "self_attn.q_proj": "attn_q",
    "self_attn.k_proj": "attn_k",
    "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output",
    "self_attn.qkv_proj": "attn_qkv",
    "self_attn.q_norm": "attn_q_norm",
    "self_attn.k_norm": "attn_k_norm",
    "pre_feedforward_layernorm": "ffn_norm",
    "post_feedforward_layernorm": "post_ffw_norm",
    "mlp.gate_proj": "ffn_gate",
    "mlp.up_proj": "ffn_up",
    "mlp.down_proj": "ffn_down",
    "mlp.c_fc": "ffn_up",  # StarCoder2
    "mlp.c_proj": "ffn_down",
    "mlp.gate_up_proj": "ffn_up",  # Phi-3: llama.cpp keeps the fused tensor as ffn_up
    "mlp.gate": "ffn_gate_inp",
    "block_sparse_moe.gate": "ffn_gate_inp",
    "mlp.shared_expert.gate_proj": "ffn_gate_shexp",
    "mlp.shared_expert.up_proj": "ffn_up_shexp",
    "mlp.shared_expert.down_proj": "ffn_down_shexp",
    "mlp.shared_expert_gate": "ffn_gate_inp_shexp",
}
_EXPERT = {"w1": "gate", "w3": "up", "w2": "down", "gate_proj": "gate", "up_proj": "up",
           "down_proj": "down"}


def _rope_theta(cfg: dict[str, Any]) -> float:
    rope = cfg.get("rope_parameters") or {}
    if "full_attention" in rope:
        return float(rope["full_attention"]["rope_theta"])
    return float(rope.get("rope_theta", cfg.get("rope_theta", 10000.0)))


def _gguf_tensors(cfg: dict[str, Any], arch: str, tensors: dict[str, np.ndarray],
                  legacy_experts: bool = False) -> dict[str, np.ndarray]:
    """HF tensors -> llama.cpp names and values (float32)."""
    heads, kv_heads = cfg["num_attention_heads"], cfg["num_key_value_heads"]
    gemma = arch.startswith("gemma")
    out: dict[str, np.ndarray] = {}
    experts: dict[tuple[str, str], dict[int, np.ndarray]] = {}
    for name, t in tensors.items():
        t = t.astype(np.float32)
        if name == "lm_head.weight" and cfg.get("tie_word_embeddings"):
            continue
        if gemma and name.endswith("norm.weight"):
            t = t + np.float32(1.0)  # llama.cpp stores Gemma's (1 + weight)
        top = {"model.embed_tokens.weight": "token_embd.weight",
               "model.norm.weight": "output_norm.weight", "model.norm.bias": "output_norm.bias",
               "lm_head.weight": "output.weight"}
        if name in top:
            out[top[name]] = t
            continue
        _, _, layer, rest = name.split(".", 3)
        sub, kind = rest.rsplit(".", 1)
        if ".experts." in f".{sub}.":
            _, e, proj = sub.rsplit(".", 2)
            experts.setdefault((layer, _EXPERT[proj]), {})[int(e)] = t
            continue
        if sub == "post_attention_layernorm":
            stem = "post_attention_norm" if arch in ("gemma2", "gemma3") else "ffn_norm"
        else:
            stem = _SUB[sub]
        if arch in PERMUTED and sub == "self_attn.q_proj":  # weight and bias alike
            t = llama_cpp_permute(t, heads)
        elif arch in PERMUTED and sub == "self_attn.k_proj":
            t = llama_cpp_permute(t, kv_heads)
        if stem == "ffn_gate_inp_shexp":
            t = t.reshape(-1)  # llama.cpp's shape: [n_embd]
        out[f"blk.{layer}.{stem}.{kind}"] = t
    for (layer, proj), per in experts.items():
        if legacy_experts:  # early Mixtral conversions: one tensor per expert
            out.update({f"blk.{layer}.ffn_{proj}.{e}.weight": per[e] for e in sorted(per)})
        else:
            out[f"blk.{layer}.ffn_{proj}_exps.weight"] = np.stack([per[e] for e in sorted(per)])
    return out


def _metadata(w: Any, cfg: dict[str, Any], arch: str, sizes: bool) -> None:
    a = arch
    heads = cfg["num_attention_heads"]
    head_dim = cfg.get("head_dim") or cfg["hidden_size"] // heads
    w.add_block_count(cfg["num_hidden_layers"])
    w.add_context_length(cfg["max_position_embeddings"])
    w.add_embedding_length(cfg["hidden_size"])
    w.add_feed_forward_length(cfg["intermediate_size"])
    w.add_head_count(heads)
    w.add_head_count_kv(cfg["num_key_value_heads"])
    w.add_key_length(head_dim)
    w.add_value_length(head_dim)
    if a == "starcoder2":  # LayerNorm: TextModel writes norm_epsilon as layer_norm_epsilon
        w.add_layer_norm_eps(cfg["norm_epsilon"])
    else:
        w.add_layer_norm_rms_eps(cfg["rms_norm_eps"])
    if a == "smollm3":  # LlamaModel's extra keys
        w.add_vocab_size(cfg["vocab_size"])
        w.add_rope_dimension_count(head_dim)
    w.add_rope_freq_base(_rope_theta(cfg))
    if cfg.get("sliding_window") and a in ("gemma2", "gemma3"):
        w.add_sliding_window(cfg["sliding_window"])
    if a == "gemma2":
        w.add_float32(f"{a}.attn_logit_softcapping", cfg["attn_logit_softcapping"])
    if a in ("gemma2", "gemma3") and cfg.get("final_logit_softcapping"):
        w.add_float32(f"{a}.final_logit_softcapping", cfg["final_logit_softcapping"])
    if a == "gemma3":
        rope = cfg["rope_parameters"]
        full = rope["full_attention"]
        if full.get("rope_type") == "linear":
            w.add_string(f"{a}.rope.scaling.type", "linear")
            w.add_float32(f"{a}.rope.scaling.factor", full["factor"])
    if a == "phi3":
        rope = cfg.get("rope_parameters") or {}
        factor = rope.get("partial_rotary_factor", cfg.get("partial_rotary_factor", 1.0))
        w.add_rope_dimension_count(int(head_dim * factor))
        orig = cfg.get("original_max_position_embeddings") or cfg["max_position_embeddings"]
        w.add_uint32(f"{a}.rope.scaling.original_context_length", orig)
    experts = cfg.get("num_local_experts") or cfg.get("num_experts")
    if experts:
        w.add_expert_count(experts)
        w.add_expert_used_count(cfg["num_experts_per_tok"])
    if a in ("qwen2moe", "qwen3moe") and sizes:
        w.add_expert_feed_forward_length(cfg["moe_intermediate_size"])
    if a == "qwen2moe" and sizes:
        w.add_uint32(f"{a}.expert_shared_feed_forward_length",
                     cfg["shared_expert_intermediate_size"])


def write_gguf(hf_dir: Path, out: Path, qtype: str = "F32", *, legacy_experts: bool = False,
               expert_sizes: bool = True, extra_uint32: dict[str, int] | None = None) -> Path:
    """Convert a tiny HF folder of any family above to a llama.cpp-style GGUF file.

    ``qtype``: "F32", or a GGML type for every matrix (routers and 1-D tensors stay F32, as
    llama.cpp keeps ``ffn_gate_inp`` in F32). ``legacy_experts``: Mixtral's experts as one
    tensor each (early conversions). ``expert_sizes=False`` leaves out the Qwen MoE expert
    feed-forward lengths (older files), so the reader must take them from tensor shapes.
    ``extra_uint32``: more ``{arch}.<key>`` metadata (a variant's keys).
    """
    import gguf
    from safetensors.numpy import load_file

    cfg = json.loads((Path(hf_dir) / "config.json").read_text())
    arch = GGUF_ARCH[cfg["model_type"]]
    tensors = _gguf_tensors(cfg, arch, load_file(str(Path(hf_dir) / "model.safetensors")),
                            legacy_experts)
    rope = cfg.get("rope_parameters") or {}
    w = gguf.GGUFWriter(str(out), arch=arch)
    w.add_name(f"tiny-{cfg['model_type']}")
    _metadata(w, cfg, arch, expert_sizes)
    for key, value in (extra_uint32 or {}).items():
        w.add_uint32(f"{arch}.{key}", value)
    if arch == "phi3" and rope.get("rope_type", rope.get("type")) in ("longrope", "su"):
        w.add_tensor("rope_factors_long.weight", np.asarray(rope["long_factor"], np.float32))
        w.add_tensor("rope_factors_short.weight", np.asarray(rope["short_factor"], np.float32))
    w.add_file_type(0 if qtype == "F32" else 7)
    byte_chars = _byte_to_char()
    tokens = [byte_chars[b] for b in range(256)] + list(SPECIAL_TOKENS)
    assert cfg["vocab_size"] == len(tokens), "the tiny models use the byte tokenizer's vocab"
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("default")
    w.add_token_list(tokens)
    w.add_token_types([1] * 256 + [3] * len(SPECIAL_TOKENS))
    w.add_token_scores([0.0] * len(tokens))
    w.add_bos_token_id(256)
    w.add_eos_token_id(257)
    w.add_pad_token_id(258)
    w.add_add_bos_token(False)
    w.add_chat_template(CHAT_TEMPLATE)
    for name, t in tensors.items():
        if qtype == "F32" or t.ndim == 1 or "ffn_gate_inp" in name:
            w.add_tensor(name, np.ascontiguousarray(t))
        else:
            q = gguf.GGMLQuantizationType[qtype]
            w.add_tensor(name, gguf.quants.quantize(np.ascontiguousarray(t), q), raw_dtype=q)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return Path(out)
