"""Which GGML type each tensor gets in a GGUF file of a given file type (Q4_K_M, Q4_1, ...).

A GGUF "file type" is a mix, not one format: llama.cpp keeps norms in F32, gives the output
projection (or the tied embedding) Q6_K, gives some attn_v / ffn_down layers more bits in the
_M mixes, and falls back to a 32-element block type when a row is not a multiple of the 256
elements a K-quant block needs (SmolLM2's 576-wide rows, for one). These rules follow
llama.cpp's quantizer for dense decoders; bytes then come from gguf's own block-size table, so
the planner's estimate tracks real files (the tests check the shipped SmolLM2 file).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

from modelport.planner.tensors import TensorSpec
from modelport.quantization.gguf_types import GGML_CODES, GGUF_FUSED, GGUF_LINEAR, cpu_q8_mode

# group sizes torch's int4 CPU GEMM takes (quantization/kernels.CPU_INT4_GROUPS)
CPU_INT4_GROUPS = (32, 64, 128, 256)

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
    # the 2- and 3-bit mixes: their richer tensors follow _low_bit_mix, not one richer type
    "q3_k_l": (Q.Q3_K, None),
    "q3_k_m": (Q.Q3_K, None),
    "q3_k_s": (Q.Q3_K, None),
    "q2_k": (Q.Q2_K, None),
}

# K-quant type -> type llama.cpp uses instead when a row is not a multiple of 256 (IQ4_NL for
# Q2_K / Q3_K: a type the kept path does not hold, so such a file loads as floats)
_K_FALLBACK = {Q.Q2_K: Q.IQ4_NL, Q.Q3_K: Q.IQ4_NL, Q.Q4_K: Q.Q5_0, Q.Q5_K: Q.Q5_1,
               Q.Q6_K: Q.Q8_0}
_FLOAT_TYPES = (Q.F32, Q.F16, Q.BF16)


def _use_more_bits(layer: int, n_layers: int) -> bool:
    """llama.cpp's choice of layers that get the richer type in the _M mixes."""
    return layer < n_layers // 8 or layer >= 7 * n_layers // 8 or (layer - n_layers // 8) % 3 == 2


def _low_bit_mix(name: str, layer: int, file_type: str, n_layers: int,
                 n_gqa: int) -> GGMLQuantizationType | None:
    """The richer type llama.cpp's Q2_K / Q3_K_M / Q3_K_L mixes give tensor ``name`` of a dense
    decoder (llama_tensor_get_type; Q3_K_S has none), or None for the file's base type."""
    if "attn_v" in name:
        if file_type == "q2_k":
            return Q.Q4_K if n_gqa >= 4 else Q.Q3_K
        if file_type == "q3_k_m":
            return Q.Q5_K if layer < 2 else Q.Q4_K
        return Q.Q5_K if file_type == "q3_k_l" else None
    if "ffn_down" in name:
        if file_type == "q3_k_m":
            return Q.Q5_K if layer < n_layers // 16 else Q.Q4_K
        return {"q2_k": Q.Q3_K, "q3_k_l": Q.Q5_K}.get(file_type)
    if "attn_output" in name:
        return {"q2_k": Q.Q3_K, "q3_k_m": Q.Q4_K, "q3_k_l": Q.Q5_K}.get(file_type)
    return None


def tensor_type(
    t: TensorSpec, file_type: str, n_layers: int, tied_embeddings: bool, n_gqa: int = 1
) -> GGMLQuantizationType:
    """The GGML type of tensor t in a GGUF file of file_type (a tied embedding is the output);
    ``n_gqa``: query heads per KV head (Q2_K's attn_v depends on it)."""
    base, rich = FILE_TYPES[file_type]
    if len(t.shape) == 1:
        return Q.F32
    if base in _FLOAT_TYPES:
        return base
    chosen = base
    is_output = t.kind == "output" or (t.kind == "embed" and tied_embeddings)
    if is_output and base != Q.Q8_0:
        chosen = Q.Q6_K
    elif t.layer is not None and file_type in ("q2_k", "q3_k_m", "q3_k_l"):
        chosen = _low_bit_mix(t.name, t.layer, file_type, n_layers, n_gqa) or base
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


@dataclass(frozen=True)
class LinearTensor:
    """One linear weight of a GGUF file: GGUF name, GGML type name, [rows, cols], file bytes."""

    name: str
    qtype: str
    rows: int
    cols: int
    n_bytes: int


def kept_bytes(linear: Iterable[LinearTensor], on_cpu: bool) -> int:
    """Bytes the engine holds for these weights kept quantized (on CPU by default for Q2_K-Q8
    files, or with --quantization gguf).

    The engine fuses q/k/v and gate/up into one matmul each (quantization/gguf.py), with the
    most bits and the finest group of its parts, and then picks the kernel
    (quantization/kernels.make_kernel). On CPU: codes of at most 4 bits in groups of 32 run
    torch's int4 GEMM (half a byte per weight + a bf16 scale and zero per group); a matmul
    all of whose parts are Q8_0 the block-scale kernel (CpuQ8Kernel: one byte per weight + the
    file's fp16 scale per 32; with MODELPORT_Q8_CPU=rows as the next); other codes up to 8
    bits torch's int8 GEMM (one byte per weight + a bf16 scale per row). On CUDA the Triton
    kernels (quantization/triton_gemm): 4- or 8-bit codes + an fp16 scale and zero per group.
    A Q4_K_M file's Q6_K attn_v thus takes its whole fused q/k/v to 1 byte per weight, and on
    CUDA to Q6_K's 16-wide groups. Q2_K / Q3_K (groups of 16, which the int4 GEMM does not
    take) hold 1 byte a weight on CPU and 4-bit codes + a scale and zero per 16 on CUDA (6 bits
    a weight, against their blocks' 2.6 / 3.4). Types not kept (floats, IQ types) count as
    stored.
    """
    groups: dict[tuple[str, str, str], list[LinearTensor]] = {}
    for t in linear:
        m = GGUF_LINEAR.match(t.name)
        key = ((m.group(1), GGUF_FUSED.get(m.group(2), m.group(2)), m.group(3) or "") if m
               else ("", t.name, ""))
        groups.setdefault(key, []).append(t)
    held = 0
    q8_blocks = on_cpu and cpu_q8_mode() is not None
    for parts in groups.values():
        codes = [GGML_CODES.get(p.qtype) for p in parts]
        if any(c is None for c in codes):
            held += sum(p.n_bytes for p in parts)
            continue
        bits = max(c[0] for c in codes)
        group = min(c[1] for c in codes)
        rows, cols = sum(p.rows for p in parts), parts[0].cols
        if not on_cpu:
            held += rows * cols * (4 if bits <= 4 else 8) // 8 + cols // group * rows * 4
        elif bits <= 4 and group in CPU_INT4_GROUPS and cols % group == 0 and rows % 8 == 0:
            held += rows * cols // 2 + cols // group * rows * 4
        elif q8_blocks and all(p.qtype == "Q8_0" for p in parts):
            held += rows * cols + cols // 32 * rows * 2
        else:
            held += rows * cols + rows * 2
    return held
