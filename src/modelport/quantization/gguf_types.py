"""GGML weight types as the kept-GGUF path sees them, without torch (the planner reads these).

``GGML_TYPES``: type id -> (name, weights per block, bytes per block) for every type that can
be kept quantized. ``GGML_CODES``: name -> (bits per code, weights per scale) of the
GroupQuant each type unpacks to (gguf_formats.unpack); the kernel a weight gets follows from
these two numbers.
"""

from __future__ import annotations

import os
import re

GGML_TYPES: dict[int, tuple[str, int, int]] = {
    2: ("Q4_0", 32, 18),
    3: ("Q4_1", 32, 20),
    6: ("Q5_0", 32, 22),
    7: ("Q5_1", 32, 24),
    8: ("Q8_0", 32, 34),
    10: ("Q2_K", 256, 84),
    11: ("Q3_K", 256, 110),
    12: ("Q4_K", 256, 144),
    13: ("Q5_K", 256, 176),
    14: ("Q6_K", 256, 210),
}
GGML_CODES: dict[str, tuple[int, int]] = {
    "Q4_0": (4, 32),
    "Q4_1": (4, 32),
    "Q5_0": (5, 32),
    "Q5_1": (5, 32),
    "Q8_0": (8, 32),
    # Q2_K / Q3_K / Q6_K: one scale per 16 weights (Q2_K's per-16 min folded into its zero,
    # Q3_K's signed values into codes + 4 and zero -4 x scale)
    "Q2_K": (2, 16),
    "Q3_K": (3, 16),
    "Q4_K": (4, 32),  # the 6-bit sub-block scales and mins folded into one scale/zero per 32
    "Q5_K": (5, 32),
    "Q6_K": (6, 16),
}
FLOAT_TYPES = {0: "F32", 1: "F16", 30: "BF16"}

# linear weights: attention, MLP, MoE experts (stacked ``_exps`` [E, out, in], or one tensor
# per expert ``ffn_gate.<e>`` in early Mixtral files) and Qwen2-MoE's shared expert (``_shexp``)
GGUF_LINEAR = re.compile(r"^blk\.(\d+)\.(attn_(?:q|k|v|qkv|output)|ffn_(?:gate|up|down)"
                         r"(?:_exps|_shexp)?)(\.\d+)?\.weight$")
# GGUF tensors the engine runs as one matmul (qkv_proj, gate_up_proj; each expert's gate_up)
GGUF_FUSED = {"attn_q": "qkv", "attn_k": "qkv", "attn_v": "qkv", "ffn_gate": "gate_up",
              "ffn_up": "gate_up", "ffn_gate_exps": "gate_up_exps", "ffn_up_exps": "gate_up_exps",
              "ffn_gate_shexp": "gate_up_shexp", "ffn_up_shexp": "gate_up_shexp"}


def cpu_q8_mode() -> str | None:
    """How a GGUF Q8_0 weight runs on CPU, read from ``MODELPORT_Q8_CPU`` when a kernel is
    built (quantization/kernels.cpu_q8_kernel) or a plan counts its bytes (planner/gguf_mix):
    "blocks" (the default: CpuQ8Kernel, the file's codes and fp16 block scales, x quantized
    per block), "blocks_f32" (the same on float32 x), or None (``rows``, or any other value:
    CpuInt8Kernel, the weight requantized per output row)."""
    how = os.environ.get("MODELPORT_Q8_CPU", "blocks")
    return how if how in ("blocks", "blocks_f32") else None


def kept_on_cpu_by_default(linear_type_names: list[str]) -> bool:
    """Whether a GGUF file with linear weights of these GGML types keeps its blocks on an x86
    CPU without being asked: all of them types the kept path holds (4-bit codes in groups of
    32 run torch's int4 GEMM; 5 to 8 bits, and Q2_K / Q3_K's 16-wide groups, which that GEMM
    does not take, its int8 one: 1 byte a weight instead of fp32's 4). The engine
    (loading.auto_keep_gguf) and the planner both ask this."""
    kept = {name for name, _, _ in GGML_TYPES.values()}
    return bool(linear_type_names) and all(n in kept for n in linear_type_names)
