"""Which GGML type each tensor gets in a GGUF file of a given file type (Q4_K_M, Q4_1, ...).

A GGUF "file type" is a mix, not one format: llama.cpp keeps norms in F32, gives the output
projection (or the tied embedding) Q6_K, gives some attn_v / ffn_down layers more bits in the
_M mixes, and falls back to a 32-element block type when a row is not a multiple of the 256
elements a K-quant block needs (SmolLM2's 576-wide rows, for one). These rules follow
llama.cpp's quantizer for dense decoders; bytes then come from gguf's own block-size table, so
the planner's estimate tracks real files (the tests check the shipped SmolLM2 file).
"""

from __future__ import annotations

from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

from modelport.planner.tensors import TensorSpec

Q = GGMLQuantizationType

# file type -> (default type of matrices, richer type used by the _M / _S mixes or None)
FILE_TYPES: dict[str, tuple[GGMLQuantizationType, GGMLQuantizationType | None]] = {
    "f32": (Q.F32, None),
    "f16": (Q.F16, None),
    "bf16": (Q.BF16, None),
    "q8_0": (Q.Q8_0, None),
    "q4_0": (Q.Q4_0, None),
    "q4_1": (Q.Q4_1, None),
    "q5_0": (Q.Q5_0, None),
    "q5_1": (Q.Q5_1, None),
    "q6_k": (Q.Q6_K, None),
    "q5_k_s": (Q.Q5_K, None),
    "q5_k_m": (Q.Q5_K, Q.Q6_K),
    "q4_k_s": (Q.Q4_K, Q.Q5_K),
    "q4_k_m": (Q.Q4_K, Q.Q6_K),
}

# K-quant type -> type llama.cpp uses instead when a row is not a multiple of 256
_K_FALLBACK = {Q.Q4_K: Q.Q5_0, Q.Q5_K: Q.Q5_1, Q.Q6_K: Q.Q8_0}
_FLOAT_TYPES = (Q.F32, Q.F16, Q.BF16)


def _use_more_bits(layer: int, n_layers: int) -> bool:
    """llama.cpp's choice of layers that get the richer type in the _M mixes."""
    return layer < n_layers // 8 or layer >= 7 * n_layers // 8 or (layer - n_layers // 8) % 3 == 2


def tensor_type(
    t: TensorSpec, file_type: str, n_layers: int, tied_embeddings: bool
) -> GGMLQuantizationType:
    """The GGML type of tensor t in a GGUF file of file_type (a tied embedding is the output)."""
    base, rich = FILE_TYPES[file_type]
    if len(t.shape) == 1:
        return Q.F32
    if base in _FLOAT_TYPES:
        return base
    chosen = base
    is_output = t.kind == "output" or (t.kind == "embed" and tied_embeddings)
    if is_output and base != Q.Q8_0:
        chosen = Q.Q6_K
    elif t.layer is not None and rich is not None:
        if file_type in ("q4_k_m", "q5_k_m") and ("attn_v" in t.name or "ffn_down" in t.name):
            if _use_more_bits(t.layer, n_layers):
                chosen = rich
        elif file_type == "q4_k_s" and "ffn_down" in t.name and t.layer < n_layers // 8:
            chosen = rich
    block, _ = GGML_QUANT_SIZES[chosen]
    if t.row_length % block:
        chosen = _K_FALLBACK.get(chosen, Q.F16)
        block, _ = GGML_QUANT_SIZES[chosen]
        if t.row_length % block:
            chosen = Q.F16
    return chosen


def type_bytes(numel: int, qtype: GGMLQuantizationType) -> int:
    """Bytes of numel elements stored as qtype (numel is a whole number of blocks)."""
    block, size = GGML_QUANT_SIZES[qtype]
    return (numel + block - 1) // block * size
