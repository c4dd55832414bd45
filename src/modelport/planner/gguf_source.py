"""Read what the planner needs from a .gguf file: the architecture and the real tensor bytes.

Only metadata and the tensor table are parsed (GGUFReader memory-maps the file), so planning
against a multi-GB file is quick and nothing is dequantized.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from modelport.planner.errors import PlanError
from modelport.planner.gguf_mix import LinearTensor
from modelport.quantization.gguf_types import GGUF_LINEAR

# GGUF general.architecture -> HF architecture name (llama.cpp writes Mistral as "llama", and
# Mixtral as "llama" with llama.expert_count: loader/gguf_archs.py renames it, as the loader)
_ARCHS = {
    "llama": "LlamaForCausalLM",
    "mistral": "MistralForCausalLM",
    "qwen2": "Qwen2ForCausalLM",
    "qwen3": "Qwen3ForCausalLM",
    "gemma": "GemmaForCausalLM",
    "gemma2": "Gemma2ForCausalLM",
    "gemma3": "Gemma3ForCausalLM",
    "phi3": "Phi3ForCausalLM",
    "qwen2moe": "Qwen2MoeForCausalLM",
    "qwen3moe": "Qwen3MoeForCausalLM",
    "smollm3": "SmolLM3ForCausalLM",
    "starcoder2": "Starcoder2ForCausalLM",
}

# tensors the config reads (rope scaling tables), not model weights
_NOT_WEIGHTS = ("rope_freqs.weight", "rope_factors_long.weight", "rope_factors_short.weight")


@dataclass(frozen=True)
class GGUFInfo:
    hf_config: dict[str, Any]  # HF-style config dict built from the metadata
    tensor_bytes: int  # sum of the stored tensors' sizes
    storage: dict[str, int]  # GGML type name -> tensor count
    file_type: str | None  # e.g. "q4_1", from general.file_type
    file_bytes: int
    linear: tuple[LinearTensor, ...] = ()  # the decoder layers' linear weights
    # file bytes of the embedding and LM head (token_embd.weight, output.weight): the kept
    # path replaces those blocks with float tables
    tables: tuple[tuple[str, int], ...] = ()
    num_params: int = 0  # elements of the model's weight tensors (rope factor tables left out)


def _value(reader: Any, key: str) -> Any:
    field = reader.fields.get(key)
    return None if field is None else field.contents()


def _file_type_name(code: int | None) -> str | None:
    from gguf import LlamaFileType

    if code is None:
        return None
    try:
        name = LlamaFileType(int(code)).name
    except ValueError:
        return None
    return name.removeprefix("MOSTLY_").removeprefix("ALL_").lower()


@functools.cache
def _read(path: str, mtime_ns: int) -> GGUFInfo:
    from gguf import GGUFReader

    try:
        reader = GGUFReader(path)
    except Exception as e:  # gguf raises ValueError / struct errors on a bad header
        raise PlanError("--model", f"{path}: not a readable GGUF file ({e})") from None
    arch = _value(reader, "general.architecture")
    if arch not in _ARCHS:
        raise PlanError(
            "--model",
            f"{path}: GGUF architecture {arch!r} is not supported "
            f"(supported: {', '.join(sorted(_ARCHS))})",
        )

    def meta(key: str, required: bool = True) -> Any:
        v = _value(reader, f"{arch}.{key}")
        if v is None and required:
            raise PlanError("--model", f"{path}: GGUF metadata is missing {arch}.{key}")
        return v

    def opt(key: str, default: Any = None) -> Any:
        v = meta(key, required=False)
        return default if v is None else v

    n_heads = int(meta("attention.head_count"))
    hidden = int(meta("embedding_length"))
    vocab = meta("vocab_size", required=False)
    if vocab is None:
        tokens = reader.fields.get("tokenizer.ggml.tokens")
        if tokens is None:
            raise PlanError(
                "--model",
                f"{path}: GGUF metadata has neither {arch}.vocab_size nor tokenizer.ggml.tokens",
            )
        vocab = len(tokens.data)
    names = {t.name for t in reader.tensors}
    cfg: dict[str, Any] = {
        "architectures": [_ARCHS[arch]],
        "vocab_size": int(vocab),
        "hidden_size": hidden,
        "intermediate_size": int(meta("feed_forward_length")),
        "num_hidden_layers": int(meta("block_count")),
        "num_attention_heads": n_heads,
        "num_key_value_heads": int(meta("attention.head_count_kv", required=False) or n_heads),
        "head_dim": int(meta("attention.key_length", required=False) or hidden // n_heads),
        "max_position_embeddings": int(meta("context_length", required=False) or 2048),
        "rope_theta": float(meta("rope.freq_base", required=False) or 10000.0),
        "tie_word_embeddings": "output.weight" not in names,
        "attention_bias": "blk.0.attn_q.bias" in names,
    }
    if arch not in ("llama", "mistral", "qwen2") or opt("expert_count", 0):
        # the family's own fields (windows, experts, ...), read as the loader reads them
        # (imported here: the loader package imports torch, plain llama files need none)
        from modelport.loader.gguf_archs import arch_config

        try:
            cfg.update(arch_config(arch, reader, opt, cfg, Path(path)))
        except ValueError as e:
            raise PlanError("--model", f"{path}: {e}") from None
    storage: dict[str, int] = {}
    for t in reader.tensors:
        storage[t.tensor_type.name] = storage.get(t.tensor_type.name, 0) + 1
    return GGUFInfo(
        hf_config=cfg,
        tensor_bytes=int(sum(int(t.n_bytes) for t in reader.tensors)),
        storage=storage,
        file_type=_file_type_name(_value(reader, "general.file_type")),
        file_bytes=Path(path).stat().st_size,
        linear=tuple(
            # rows: every output row (a stacked expert tensor's E x out; GGUF order: in first)
            LinearTensor(t.name, t.tensor_type.name, int(t.n_elements) // int(t.shape[0]),
                         int(t.shape[0]), int(t.n_bytes))
            for t in reader.tensors if GGUF_LINEAR.match(t.name)
        ),
        tables=tuple((t.name, int(t.n_bytes)) for t in reader.tensors
                     if t.name in ("token_embd.weight", "output.weight")),
        num_params=sum(int(t.n_elements) for t in reader.tensors if t.name not in _NOT_WEIGHTS),
    )


def read_gguf(path: Path) -> GGUFInfo:
    """Parse path's metadata (cached per file version)."""
    return _read(str(path), path.stat().st_mtime_ns)


def estimated_metadata_bytes(vocab_size: int) -> int:
    """Bytes a GGUF file spends beyond its tensors, dominated by the embedded tokenizer.

    Per vocabulary entry: the token string (8-byte length + ~6 characters), its 4-byte
    token type, and one BPE merge string (8-byte length + ~14 characters) -- ~40 bytes.
    """
    return 40 * vocab_size + 16 * 1024
