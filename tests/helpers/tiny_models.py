"""Tiny random HF checkpoints built at test time (no hub, no files in git).

Other test modules import these: ``from helpers.tiny_models import make_tiny_llama_dir``.
Each helper writes an HF-style folder (config.json, model.safetensors, tokenizer files with
a byte-level tokenizer and a chat template) and returns its path, so the folder works
both with our loader and with ``transformers.AutoModelForCausalLM.from_pretrained``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

SPECIAL_TOKENS = ("<|bos|>", "<|eos|>", "<|pad|>")
TINY_VOCAB = 256 + len(SPECIAL_TOKENS)  # every byte + the specials
CHAT_TEMPLATE = (
    "{% for m in messages %}<|bos|>{{ m['role'] }}\n{{ m['content'] }}<|eos|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|bos|>assistant\n{% endif %}"
)


def _byte_to_char() -> dict[int, str]:
    """GPT-2's printable stand-in character for each byte (what ByteLevel pre-tokenizes to)."""
    printable = [*range(33, 127), *range(161, 173), *range(174, 256)]
    extra = iter(range(256, 512))
    return {b: chr(b if b in printable else next(extra)) for b in range(256)}


def _byte_level_tokenizer() -> Any:
    """A real byte-level BPE tokenizer with no merges: one token per UTF-8 byte."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {ch: b for b, ch in _byte_to_char().items()}  # token id == byte value
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=SPECIAL_TOKENS[0],
        eos_token=SPECIAL_TOKENS[1],
        pad_token=SPECIAL_TOKENS[2],
    )
    fast.add_special_tokens({"additional_special_tokens": []})
    fast.chat_template = CHAT_TEMPLATE
    return fast


def tiny_tokenizer() -> Any:
    """Our Tokenizer over the byte-level tiny tokenizer (no files, no model)."""
    from modelport.frontend.tokenizer import Tokenizer

    return Tokenizer(_byte_level_tokenizer())


def _save(model: Any, path: Path, with_tokenizer: bool) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(path, safe_serialization=True)
    if with_tokenizer:
        _byte_level_tokenizer().save_pretrained(path)
    return path


def tiny_llama_config(
    *,
    tie_word_embeddings: bool = False,
    rope_scaling: dict[str, Any] | None = None,
    vocab_size: int = TINY_VOCAB,
    hidden_size: int = 64,
    num_layers: int = 2,
    num_heads: int = 4,
    num_kv_heads: int = 2,
    intermediate_size: int = 128,
    max_position_embeddings: int = 512,
    rope_theta: float = 10000.0,
) -> Any:
    from transformers import LlamaConfig

    kw: dict[str, Any] = {}
    if rope_scaling is not None:
        kw["rope_scaling"] = rope_scaling
    return LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=hidden_size,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        num_key_value_heads=num_kv_heads,
        intermediate_size=intermediate_size,
        max_position_embeddings=max_position_embeddings,
        rope_theta=rope_theta,
        tie_word_embeddings=tie_word_embeddings,
        rms_norm_eps=1e-5,
        bos_token_id=256,
        eos_token_id=257,
        pad_token_id=258,
        initializer_range=0.05,
        **kw,
    )


def make_tiny_llama_dir(
    path: Path, *, seed: int = 0, with_tokenizer: bool = True, **config_kw: Any
) -> Path:
    """A random tiny Llama (2 layers, hidden 64, 4 heads / 2 KV heads) saved as safetensors.

    ``config_kw`` goes to :func:`tiny_llama_config` (tie_word_embeddings, rope_scaling, ...).
    """
    from transformers import LlamaForCausalLM

    torch.manual_seed(seed)
    model = LlamaForCausalLM(tiny_llama_config(**config_kw)).eval()
    return _save(model, Path(path), with_tokenizer)


def make_tiny_mistral_dir(path: Path, window: int) -> Path:
    """A random tiny Mistral (2 layers, hidden 64, 4 heads / 2 KV heads) whose attention
    slides over ``window`` tokens, with the byte-level tokenizer."""
    from transformers import MistralConfig, MistralForCausalLM

    cfg = MistralConfig(vocab_size=512, hidden_size=64, num_hidden_layers=2,
                        num_attention_heads=4, num_key_value_heads=2, intermediate_size=128,
                        max_position_embeddings=256, sliding_window=window, bos_token_id=256,
                        eos_token_id=257, pad_token_id=258, initializer_range=0.08,
                        rms_norm_eps=1e-5)  # fmt: skip
    torch.manual_seed(0)
    path = Path(path)
    MistralForCausalLM(cfg).eval().save_pretrained(path)
    _byte_level_tokenizer().save_pretrained(path)
    return path


def greedy_token_ids(llm: Any, prompts: list[list[int]], n: int) -> list[list[int]]:
    """Each prompt's first n greedy tokens (ignoring EOS) through an LLM."""
    from modelport import SamplingParams

    sp = SamplingParams(max_tokens=n, temperature=0, ignore_eos=True)
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts], sp, use_tqdm=False)
    return [list(o.outputs[0].token_ids) for o in outs]


def make_tiny_qwen2_dir(
    path: Path, *, seed: int = 0, with_tokenizer: bool = True, tie_word_embeddings: bool = False
) -> Path:
    """A random tiny Qwen2 (bias on q/k/v) saved as safetensors."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    cfg = Qwen2Config(
        vocab_size=TINY_VOCAB,
        hidden_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        intermediate_size=128,
        max_position_embeddings=512,
        rope_theta=1000000.0,
        tie_word_embeddings=tie_word_embeddings,
        rms_norm_eps=1e-6,
        bos_token_id=256,
        eos_token_id=257,
        pad_token_id=258,
        initializer_range=0.05,
    )
    torch.manual_seed(seed)
    model = Qwen2ForCausalLM(cfg).eval()
    # HF initialises biases to zero; make them random so the test sees them being loaded.
    with torch.no_grad():
        for layer in model.model.layers:
            for proj in (layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj):
                proj.bias.normal_(0.0, 0.05)
    return _save(model, Path(path), with_tokenizer)


TINY_PROMPT = [(7 * i + 3) % 256 for i in range(70)]


def run_one_sequence(model: torch.nn.Module, ids: list[int], block_size: int = 16) -> torch.Tensor:
    """Prefill one sequence through the paged cache and return float32 logits [T, vocab]."""
    from modelport.layers.attention import (
        ForwardContext,
        build_single_sequence_metadata,
        forward_context,
    )

    cfg = model.config
    t = len(ids)
    meta = build_single_sequence_metadata(t, block_size)
    n_blocks = (t + block_size - 1) // block_size
    kv = [
        torch.zeros(2, n_blocks, block_size, cfg.num_key_value_heads, cfg.head_dim)
        for _ in range(cfg.num_hidden_layers)
    ]
    with torch.no_grad(), forward_context(ForwardContext(meta, kv)):
        hidden = model(torch.tensor(ids), torch.arange(t))
    assert hidden.shape == (t, cfg.hidden_size)
    return model.compute_logits(hidden)


def hf_reference_logits(model_dir: Path, token_ids: list[int]) -> torch.Tensor:
    """Float32 logits [T, vocab] of HF transformers for one sequence (the reference)."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(
        model_dir, dtype=torch.float32, local_files_only=True
    ).eval()
    with torch.no_grad():
        out = model(torch.tensor([token_ids]))
    return out.logits[0].float()


def llama_cpp_permute(w: Any, n_heads: int) -> Any:
    """The row permutation llama.cpp's converter applies to HF attn q/k weights.

    Within each head, HF rows [first half | second half] become interleaved pairs
    (row 2j + s of a head is HF row s * d/2 + j), matching llama.cpp's adjacent-pair rope.
    """
    half = w.shape[0] // n_heads // 2
    return w.reshape(n_heads, 2, half, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


_GGUF_BLOCK = {
    "input_layernorm": "attn_norm",
    "self_attn.q_proj": "attn_q",
    "self_attn.k_proj": "attn_k",
    "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output",
    "post_attention_layernorm": "ffn_norm",
    "mlp.gate_proj": "ffn_gate",
    "mlp.up_proj": "ffn_up",
    "mlp.down_proj": "ffn_down",
}


def _gguf_name(hf_name: str) -> str:
    top = {
        "model.embed_tokens.weight": "token_embd.weight",
        "model.norm.weight": "output_norm.weight",
        "lm_head.weight": "output.weight",
    }
    if hf_name in top:
        return top[hf_name]
    _, _, layer, rest = hf_name.split(".", 3)
    module, kind = rest.rsplit(".", 1)
    return f"blk.{layer}.{_GGUF_BLOCK[module]}.{kind}"


def _llama3_rope_divisors(cfg: dict[str, Any]) -> Any:
    """What llama.cpp's converter stores for llama3 rope scaling: one divisor per frequency."""
    import math

    import numpy as np

    rope = cfg["rope_parameters"]
    dim = cfg["hidden_size"] // cfg["num_attention_heads"]
    factor, low, high = rope["factor"], rope["low_freq_factor"], rope["high_freq_factor"]
    old_ctx = rope["original_max_position_embeddings"]
    out = []
    for i in range(0, dim, 2):
        wavelen = 2 * math.pi * rope["rope_theta"] ** (i / dim)
        if wavelen < old_ctx / high:
            out.append(1.0)
        elif wavelen > old_ctx / low:
            out.append(factor)
        else:
            smooth = (old_ctx / wavelen - low) / (high - low)
            out.append(1 / ((1 - smooth) / factor + smooth))
    return np.array(out, dtype=np.float32)


def make_tiny_llama_gguf(hf_dir: Path, out: Path, qtype: str = "F32",
                         overrides: dict[str, str] | None = None,
                         rope_keys: dict[str, float | str] | None = None) -> Path:
    """Convert a tiny HF Llama or Qwen2 folder to a llama.cpp-style GGUF (F32 or a GGML type).

    ``overrides``: GGUF tensor-name suffix -> GGML type for those tensors, e.g.
    ``{"attn_v.weight": "Q8_0"}`` for a Q4_K_M-style mix of types. ``rope_keys``: more
    ``{arch}.rope.scaling.*`` metadata (strings, else float32), e.g.
    ``{"yarn_attn_factor": 1.5}``.

    Written independently of our loader: metadata keys, tensor names and the q/k
    permutation (llama only) follow llama.cpp's converter, with a byte-level gpt2 tokenizer.
    The GGUF architecture is the folder's model_type ("llama" or "qwen2").
    """
    import json

    import gguf
    import numpy as np
    from safetensors.numpy import load_file

    cfg = json.loads((Path(hf_dir) / "config.json").read_text())
    heads, kv_heads = cfg["num_attention_heads"], cfg["num_key_value_heads"]
    tensors = load_file(str(Path(hf_dir) / "model.safetensors"))
    arch = cfg["model_type"]
    w = gguf.GGUFWriter(str(out), arch=arch)
    w.add_name("tiny-llama")
    w.add_block_count(cfg["num_hidden_layers"])
    w.add_context_length(cfg["max_position_embeddings"])
    w.add_embedding_length(cfg["hidden_size"])
    w.add_feed_forward_length(cfg["intermediate_size"])
    w.add_head_count(heads)
    w.add_head_count_kv(kv_heads)
    w.add_layer_norm_rms_eps(cfg["rms_norm_eps"])
    rope = cfg["rope_parameters"]
    w.add_rope_freq_base(rope["rope_theta"])
    if rope.get("rope_type") == "llama3":  # llama.cpp writes per-frequency divisors instead
        w.add_tensor("rope_freqs.weight", _llama3_rope_divisors(cfg))
    elif rope.get("rope_type") in ("linear", "yarn"):  # as llama.cpp's converter writes them
        w.add_rope_scaling_type(gguf.RopeScalingType(rope["rope_type"]))
        w.add_rope_scaling_factor(rope["factor"])
        if rope["rope_type"] == "yarn":
            w.add_rope_scaling_orig_ctx_len(rope["original_max_position_embeddings"])
            if "beta_fast" in rope:
                w.add_rope_scaling_yarn_beta_fast(rope["beta_fast"])
                w.add_rope_scaling_yarn_beta_slow(rope["beta_slow"])
    for k, v in (rope_keys or {}).items():  # extra rope.scaling.* keys
        (w.add_string if isinstance(v, str) else w.add_float32)(f"{arch}.rope.scaling.{k}", v)
    w.add_file_type(0 if qtype == "F32" else 7)
    byte_chars = _byte_to_char()
    tokens = [byte_chars[b] for b in range(256)] + list(SPECIAL_TOKENS)
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("default")
    w.add_token_list(tokens)
    w.add_token_types([1] * 256 + [3] * len(SPECIAL_TOKENS))
    w.add_token_scores([0.0] * len(tokens))  # no merges: transformers derives none from scores
    w.add_bos_token_id(256)
    w.add_eos_token_id(257)
    w.add_pad_token_id(258)
    w.add_add_bos_token(False)
    w.add_chat_template(CHAT_TEMPLATE)
    for name, t in tensors.items():
        t = t.astype(np.float32)
        if arch == "llama" and name.endswith("q_proj.weight"):
            t = llama_cpp_permute(t, heads)
        elif arch == "llama" and name.endswith("k_proj.weight"):
            t = llama_cpp_permute(t, kv_heads)
        if qtype == "F32" or t.ndim == 1:
            w.add_tensor(_gguf_name(name), np.ascontiguousarray(t))
        else:
            gname = _gguf_name(name)
            own = [v for k, v in (overrides or {}).items() if gname.endswith(k)]
            q = gguf.GGMLQuantizationType[own[0] if own else qtype]
            w.add_tensor(gname, gguf.quants.quantize(t, q), raw_dtype=q)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return Path(out)


def load_cpu(path: Path, quantization: str | None = None, fmt: str = "auto") -> torch.nn.Module:
    """Load a model folder (or file) with modelport's loader on CPU in float32."""
    from modelport.config import LoadConfig
    from modelport.loader import load_model, load_model_config, resolve_model

    src = resolve_model(str(path))
    return load_model(src, load_model_config(src), LoadConfig(load_format=fmt, quantization=quantization),
                      torch.float32, torch.device("cpu"))


def load_cpu_fp32(path: Path) -> torch.nn.Module:
    """The model of an HF folder (or file) as the engine builds it, fp32 on CPU."""
    from modelport.config import LoadConfig
    from modelport.loader import load_model, load_model_config, resolve_model

    src = resolve_model(str(path))
    return load_model(src, load_model_config(src), LoadConfig(), torch.float32, torch.device("cpu"))


def sequence_nll(path: Path, ids: list[int]) -> float:
    """Mean next-token negative log-likelihood of ids under the model at path (fp32, CPU)."""
    logits = run_one_sequence(load_cpu_fp32(path), ids)
    return torch.nn.functional.cross_entropy(logits[:-1], torch.tensor(ids[1:])).item()


def assert_same_greedy(got: Any, want: Any, atol: float = 5e-2) -> None:
    """Two runs' RequestOutputs (in prompt order, sampled with logprobs): the same greedy
    tokens, and each chosen token's logprob within ``atol``."""
    for g, w in zip(got, want, strict=True):
        assert g.outputs[0].token_ids == w.outputs[0].token_ids
        lp_g = [d[t].logprob for d, t in zip(g.outputs[0].logprobs, g.outputs[0].token_ids)]
        lp_w = [d[t].logprob for d, t in zip(w.outputs[0].logprobs, w.outputs[0].token_ids)]
        torch.testing.assert_close(torch.tensor(lp_g), torch.tensor(lp_w), atol=atol, rtol=0)


def write_checkpoint_folder(tiny: Path, out: Path, tensors: dict, qc: dict | None) -> Path:
    """An HF folder at out: tensors as model.safetensors, tiny's config.json with
    quantization_config qc (None: none), and tiny's tokenizer files."""
    import json
    import shutil

    from safetensors.torch import save_file

    out.mkdir(parents=True)
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(out / "model.safetensors"))
    cfg = json.loads((tiny / "config.json").read_text())
    if qc is not None:
        cfg["quantization_config"] = qc
    (out / "config.json").write_text(json.dumps(cfg))
    for f in tiny.iterdir():  # the tokenizer's files
        if f.suffix != ".safetensors" and f.name != "config.json":
            shutil.copy(f, out / f.name)
    return out
