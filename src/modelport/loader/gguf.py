"""GGUF files: config from metadata, dequantized weights under HF tensor names.

Built on ``gguf.GGUFReader`` (memory-mapped) and ``gguf.quants.dequantize``. Weights come out
in float32 with HF names, so the model classes load them exactly like a safetensors folder.
Families beyond llama / qwen2 (Qwen3, Gemma 1/2/3, Phi-3, Mixtral, Qwen2/3-MoE, SmolLM3,
StarCoder2): their metadata, names and the inverse of llama.cpp's per-family edits live in
gguf_archs.py.

llama.cpp's converter permutes the rows of attn_q / attn_k (weights and biases) for the
``llama`` architecture and SmolLM3 (converted as Llama): llama.cpp rotates adjacent pairs
(2j, 2j+1) of each head while HF Llama rotates (j, j + d/2), so the converter reorders each
head's rows from [half0 | half1] to interleaved (row h*d + 2j + s holds HF row
h*d + s*d/2 + j). ``unpermute_qk`` applies the inverse.
"""

from __future__ import annotations

import functools
import logging
import math
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch

from modelport.loader.gguf_archs import (
    CONFIG_TENSORS,
    GEMMA_ARCHS,
    arch_config,
    block_name,
    expert_slices,
    fix_tensor,
    legacy_expert_name,
    stacked_expert_name,
)

logger = logging.getLogger(__name__)

# GGUF architecture -> (HF architecture, q/k rows permuted by the converter)
# ("llama" with llama.expert_count > 0 is Mixtral; the other families: loader/gguf_archs.py)
GGUF_ARCHITECTURES: dict[str, tuple[str, bool]] = {
    "llama": ("LlamaForCausalLM", True),
    "qwen2": ("Qwen2ForCausalLM", False),
    "qwen3": ("Qwen3ForCausalLM", False),
    "gemma": ("GemmaForCausalLM", False),
    "gemma2": ("Gemma2ForCausalLM", False),
    "gemma3": ("Gemma3ForCausalLM", False),
    "phi3": ("Phi3ForCausalLM", False),
    "qwen2moe": ("Qwen2MoeForCausalLM", False),
    "qwen3moe": ("Qwen3MoeForCausalLM", False),
    "smollm3": ("SmolLM3ForCausalLM", True),  # converted as Llama
    "starcoder2": ("Starcoder2ForCausalLM", False),
}

_GLOBAL_NAMES = {
    "token_embd": "model.embed_tokens",
    "output_norm": "model.norm",
    "output": "lm_head",
}
_BLOCK_NAMES = {
    "attn_norm": "input_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_norm": "post_attention_layernorm",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}
_BLOCK_RE = re.compile(r"^blk\.(\d+)\.(\w+)\.(weight|bias)$")
_FILE_TYPE_DTYPE = {0: "float32", 1: "float16", 32: "bfloat16"}
ROPE_FREQS = "rope_freqs.weight"  # not a weight: read into the config's rope scaling


@functools.lru_cache(maxsize=2)
def _cached_reader(path: str, size: int, mtime_ns: int) -> Any:
    from gguf import GGUFReader

    return GGUFReader(path)


class _TableTensor:
    """One entry of a cached tensor table: what the loaders read of a GGUFReader tensor."""

    def __init__(self, path: str, name: str, type_id: int, offset: int, shape: list[int],
                 dtype: str) -> None:
        from gguf import GGMLQuantizationType

        self.name = name
        self.tensor_type = GGMLQuantizationType(type_id)
        self._where = (path, offset, tuple(shape), dtype)

    @property
    def data(self) -> np.ndarray:
        path, offset, shape, dtype = self._where
        return np.memmap(path, dtype=dtype, mode="r", offset=offset, shape=shape)


class GGUFTensorTable:
    """``.tensors`` of a GGUF file without parsing its metadata again (see open_gguf_tensors)."""

    def __init__(self, tensors: list[_TableTensor]) -> None:
        self.tensors = tensors


TENSOR_TABLE_KIND = "gguf-tensors"


def open_gguf_tensors(path: Path) -> Any:
    """The file's tensor table (names, types, data views), from the cache when present.

    gguf-py's reader parses every metadata field on open; for a model's tokenizer arrays
    that is seconds (2.2 s for the embedded 135M model), more than the weights take to
    load kept-quantized. The first open writes the table (offsets into the file, keyed by
    its path, size and mtime) and the HF config beside it; later opens read those.
    """
    import json

    from modelport.loader.cache import build_entry, entry_dir

    entry = entry_dir(path, TENSOR_TABLE_KIND)
    table = entry / "tensors.json"
    if table.is_file():
        rows = json.loads(table.read_text())
        return GGUFTensorTable([_TableTensor(str(path), *row) for row in rows])
    reader = open_gguf(path)
    rows = [[t.name, int(t.tensor_type), int(t.data_offset), list(t.data.shape), str(t.data.dtype)]
            for t in reader.tensors]

    def build(tmp: Path) -> None:
        (tmp / "tensors.json").write_text(json.dumps(rows))
        (tmp / "config.json").write_text(json.dumps(gguf_hf_config(reader, path), indent=2))

    try:
        build_entry(entry, build)
    except OSError:  # read-only or full cache folder: the parsed reader still serves
        pass
    return reader


def open_gguf(path: Path) -> Any:
    """A GGUFReader for path; any parse failure becomes one clear ValueError."""
    try:
        st = path.stat()
        return _cached_reader(str(path), st.st_size, st.st_mtime_ns)
    except FileNotFoundError:
        raise ValueError(f"GGUF file not found: {path}") from None
    except Exception as e:  # the reader raises ValueError/IndexError/struct errors/...
        raise ValueError(
            f"cannot read GGUF file {path}: corrupt or truncated ({type(e).__name__}: {e})"
        ) from None


def _field(reader: Any, key: str, default: Any = None) -> Any:
    f = reader.fields.get(key)
    if f is None:
        return default
    return f.contents()


def _f32(value: float) -> float:
    """GGUF stores float32: 1e-5 reads back as 9.99999974e-06; recover the short decimal."""
    return float(str(np.float32(value)))


def _rope_scaling(reader: Any, arch: str, path: Path) -> dict[str, Any] | None:
    """Rope scaling from metadata, or from the rope_freqs tensor of Llama 3.1 GGUFs.

    llama.cpp stores Llama 3.1's frequency-dependent scaling as one divisor per frequency
    (``rope_freqs.weight``) rather than as the llama3 parameters, so we keep the divisors.
    """
    freqs = next((t for t in reader.tensors if t.name == ROPE_FREQS), None)
    if freqs is not None:
        from gguf.quants import dequantize

        factors = np.asarray(dequantize(freqs.data, freqs.tensor_type), dtype=np.float32)
        return {"rope_type": "freq_factors", "factors": factors.ravel().tolist()}
    kind = _field(reader, f"{arch}.rope.scaling.type")
    if kind in (None, "none"):
        return None

    def key(name: str) -> Any:
        return _field(reader, f"{arch}.rope.scaling.{name}")

    factor = key("factor")
    if factor is None:
        raise ValueError(f"{path.name}: GGUF {kind} rope scaling without {arch}.rope.scaling.factor")
    if kind == "linear":
        return {"rope_type": "linear", "factor": _f32(factor)}
    if kind == "yarn":
        return _yarn_scaling(key, _f32(factor), path)
    raise ValueError(f"{path.name}: unsupported GGUF rope scaling {kind!r} (supported: linear, "
                     "yarn, and Llama 3.1's rope_freqs tensor)")


def _yarn_scaling(key: Any, factor: float, path: Path) -> dict[str, Any]:
    """llama.cpp's YaRN keys as the HF rope dict layers/rotary.py builds.

    llama.cpp's converter writes the factor and the original context length, and the betas
    where the checkpoint gives them. Its ``yarn_attn_factor`` multiplies the usual
    0.1 ln(factor) + 1 magnitude scale (ggml's rope), so it becomes HF's explicit
    ``attention_factor``. DeepSeek-style ``yarn_log_multiplier`` and an extrapolation mix
    other than llama.cpp's default have no HF equivalent and are refused.
    """
    out: dict[str, Any] = {"rope_type": "yarn", "factor": factor}
    orig = key("original_context_length")
    if orig:
        out["original_max_position_embeddings"] = int(orig)
    for gguf_name, hf_name in (("yarn_beta_fast", "beta_fast"), ("yarn_beta_slow", "beta_slow")):
        value = key(gguf_name)
        if value is not None:
            out[hf_name] = _f32(value)
    refused = [name for name, default in (("yarn_log_multiplier", 0.0), ("attn_factor", 1.0))
               if key(name) not in (None, default)]
    ext = key("yarn_ext_factor")
    if ext not in (None, -1.0, 1.0):
        refused.append("yarn_ext_factor")
    if refused:
        raise ValueError(f"{path.name}: GGUF yarn rope scaling with {', '.join(refused)} is not "
                         "supported (only the factor, original context length, betas and "
                         "yarn_attn_factor)")
    attn = key("yarn_attn_factor")
    if attn not in (None, 1.0):
        out["attention_factor"] = _f32(attn) * (0.1 * math.log(factor) + 1.0)
    return out


def gguf_hf_config(reader: Any, path: Path) -> dict[str, Any]:
    """An HF-style config.json dict built from GGUF metadata (ModelConfig.from_hf_dict input)."""
    arch = _field(reader, "general.architecture")
    if arch not in GGUF_ARCHITECTURES:
        raise ValueError(
            f"{path.name}: unsupported GGUF architecture {arch!r}; supported: "
            f"{', '.join(GGUF_ARCHITECTURES)}"
        )
    hf_arch, _ = GGUF_ARCHITECTURES[arch]
    experts = _field(reader, f"{arch}.expert_count", 0)
    if experts or arch.endswith("moe"):
        _check_moe_available(path, arch, experts)

    def meta(key: str, default: Any = None) -> Any:
        value = _field(reader, f"{arch}.{key}", default)
        if value is None:
            raise ValueError(f"{path.name}: GGUF metadata is missing {arch}.{key}")
        return value

    def opt(key: str, default: Any = None) -> Any:
        return _field(reader, f"{arch}.{key}", default)

    tensor_names = {t.name for t in reader.tensors}
    tokens = _field(reader, "tokenizer.ggml.tokens")
    heads = int(meta("attention.head_count"))
    hidden = int(meta("embedding_length"))
    scaling = None if arch == "phi3" else _rope_scaling(reader, arch, path)  # phi3: LongRoPE
    eos = [
        _field(reader, k) for k in ("tokenizer.ggml.eos_token_id", "tokenizer.ggml.eot_token_id")
    ]
    eos_ids = sorted({int(e) for e in eos if e is not None})
    config = {
        "architectures": [hf_arch],
        "model_type": arch,
        "vocab_size": len(tokens) if tokens else int(meta("vocab_size")),
        "hidden_size": hidden,
        "num_hidden_layers": int(meta("block_count")),
        "num_attention_heads": heads,
        "num_key_value_heads": int(meta("attention.head_count_kv", heads)),
        "intermediate_size": int(meta("feed_forward_length")),
        "head_dim": int(meta("attention.key_length", hidden // heads)),
        "rms_norm_eps": _f32(meta("attention.layer_norm_rms_epsilon", 1e-6)),
        "rope_theta": _f32(meta("rope.freq_base", 10000.0)),
        "rope_scaling": scaling,
        "max_position_embeddings": int(meta("context_length", 2048)),
        "tie_word_embeddings": "output.weight" not in tensor_names,
        "attention_bias": "blk.0.attn_q.bias" in tensor_names,
        "bos_token_id": _field(reader, "tokenizer.ggml.bos_token_id"),
        "eos_token_id": eos_ids[0] if len(eos_ids) == 1 else (eos_ids or None),
        "torch_dtype": _FILE_TYPE_DTYPE.get(int(_field(reader, "general.file_type", 0)), "float32"),
    }
    config.update(arch_config(arch, reader, opt, config, path))
    return config


def _check_moe_available(path: Path, arch: str, experts: int) -> None:
    """MoE GGUFs load through models/moe.py; without it, the old clear refusal."""
    try:
        import modelport.models.moe  # noqa: F401
    except Exception as e:  # a missing or broken optional model file
        raise ValueError(
            f"{path.name}: mixture-of-experts GGUF files ({arch}.expert_count={experts}) are "
            f"not supported here (the MoE models do not load: {e})"
        ) from None


def hf_tensor_name(gguf_name: str, arch: str = "llama") -> str:
    """HF name of a GGUF tensor name of this GGUF architecture (ValueError for names we do
    not map). A stacked expert tensor maps to its per-expert name with ``{e}`` in it.

    ``rope_freqs.weight`` (and Phi-3's rope factors) keep their names: they are no model
    weights (the config reads them and ``iter_gguf_weights`` skips them), but callers
    listing every tensor must not fail on them.
    """
    if gguf_name == ROPE_FREQS or gguf_name in CONFIG_TENSORS:
        return gguf_name
    stem, _, kind = gguf_name.rpartition(".")
    if stem in _GLOBAL_NAMES and kind in ("weight", "bias"):
        return f"{_GLOBAL_NAMES[stem]}.{kind}"
    m = _BLOCK_RE.match(gguf_name)
    if m:
        layer, stem, kind = m.groups()
        experts = stacked_expert_name(arch, layer, stem, kind)
        if experts is not None:
            return experts
        sub = block_name(arch, stem) or _BLOCK_NAMES.get(stem)
        if sub is not None:
            return f"model.layers.{layer}.{sub}.{kind}"
    legacy = legacy_expert_name(arch, gguf_name)
    if legacy is not None:
        return legacy
    raise ValueError(f"GGUF tensor {gguf_name!r} has no HF equivalent in our name mapping")


def unpermute_qk(w: np.ndarray, n_heads: int) -> np.ndarray:
    """Undo llama.cpp's q/k row interleaving (see module docstring); works on [out, ...]."""
    rest = w.shape[1:]
    half = w.shape[0] // n_heads // 2
    return w.reshape(n_heads, half, 2, *rest).swapaxes(1, 2).reshape(w.shape)


def dequantized_numel(reader: Any) -> int:
    return sum(int(np.prod(t.shape)) for t in reader.tensors)


def iter_gguf_weights(reader: Any, hf_config: dict[str, Any]) -> Iterator[tuple[str, torch.Tensor]]:
    """(HF name, float32 tensor) for every tensor of the file, q/k rows restored, the
    converter's edits undone (gguf_archs.fix_tensor) and stacked experts split per expert."""
    from gguf.quants import dequantize

    arch = hf_config["model_type"]
    permuted = GGUF_ARCHITECTURES[arch][1]
    heads = {"attn_q": hf_config["num_attention_heads"], "attn_k": hf_config["num_key_value_heads"]}
    warned = False
    for t in reader.tensors:
        if t.name == ROPE_FREQS or t.name in CONFIG_TENSORS:
            continue
        name = hf_tensor_name(t.name, arch)
        try:
            w = dequantize(t.data, t.tensor_type)
        except NotImplementedError:
            raise ValueError(
                f"GGUF tensor {t.name!r} uses {t.tensor_type.name}, which gguf-py cannot dequantize"
            ) from None
        except Exception as e:
            raise ValueError(f"GGUF tensor {t.name!r} is corrupt or truncated ({e})") from None
        w = np.asarray(w, dtype=np.float32)
        if ".experts." in name and int(t.tensor_type) not in (0, 1, 30) and not warned:
            warned = True
            logger.info("%s: MoE expert tensors (%s) dequantized at load to the model dtype "
                        "(the MoE layer runs unquantized weights only)",
                        hf_config["architectures"][0], t.tensor_type.name)
        m = _BLOCK_RE.match(t.name)
        if permuted and m and m.group(2) in heads:  # the converter permutes biases too
            w = unpermute_qk(w, heads[m.group(2)])
        if m:
            w = fix_tensor(arch, m.group(2), w)
            if "{e}" in name:  # stacked experts: dequantized, handed on one expert at a time
                for ename, ew in expert_slices(name, w):
                    yield ename, torch.from_numpy(np.array(ew, dtype=np.float32, copy=True))
                continue
        elif arch in GEMMA_ARCHS and t.name == "output_norm.weight":
            w = fix_tensor(arch, "output_norm", w)
        yield name, torch.from_numpy(np.array(w, dtype=np.float32, copy=True))
