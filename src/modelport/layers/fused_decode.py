"""Opt-in (``MODELPORT_FUSED_DECODE=1``): single-row decode through a Llama decoder layer
with the small ops folded into its GEMVs. Measured slower than the unfused kernels, so off.

Unfused, a layer at batch 1 is RMSNorm, QKV GEMV, rotary, KV write, attention, O GEMV,
RMSNorm, gate/up GEMV, SiLU-and-mul, down GEMV. Here the norms move into the prologue of the
GEMV that reads their output (every program recomputes the row's 1/rms from the L2-resident
residual row), SiLU-and-mul into the gate/up GEMV's epilogue (each program owns matching
gate and up rows) and both residual adds into the epilogues of the O and down GEMVs: three
of the ten launches go. Each fused step rounds as the unfused torch ops would.

On the H200 (Llama-3.1-8B shapes, 32 layers in a CUDA graph, PDL; bench/gpu/fusion_bench.py,
bench/results/2026-12-04-h200-fused-decode-gemv.jsonl) the fused projections take 114.3 us a
layer against 109.8 us unfused: the GEMVs alone take 104.7 us, so the norms and SiLU cost
~5 us a layer unfused, while the prologues and epilogues slow the GEMVs by ~9.5 us. W3 ITL:
4.52 ms fused vs 4.33-4.36 ms unfused (bench/results/2026-12-04-h200-w3-fused-decode.jsonl).

The layer hands the new residual stream on as ``x`` with ``residual=None``, which is what a
plain layer (and the final norm) expect from the first layer, so fused and unfused layers
mix freely; rows other than one, CPU tensors and quantized or sharded projections take the
parent's code.
"""

from __future__ import annotations

import torch
from torch import nn

from modelport.layers.activation import SiluAndMul
from modelport.layers.layernorm import RMSNorm
from modelport.layers.linear import Linear
from modelport.layers.triton_gemv import applies, gemv
from modelport.models.llama import LlamaDecoderLayer


class FusedDecodeLlamaLayer(LlamaDecoderLayer):
    def forward(self, positions, x, residual):  # type: ignore[override]
        attn, mlp = self.self_attn, self.mlp
        w_qkv = attn.qkv_proj.weight
        if x.shape[0] != 1 or not applies(x, w_qkv, 1):
            return super().forward(positions, x, residual)
        ln1, ln2 = self.input_layernorm, self.post_attention_layernorm
        h = x if residual is None else x + residual
        qkv = gemv(h, w_qkv, attn.qkv_proj.bias, norm=(ln1.weight, ln1.eps))
        q, k, v = attn.qkv_proj.split(qkv)
        o = attn.attn.forward_rope(positions, q, k, v, attn.rotary_emb)
        h = gemv(o, attn.o_proj.weight, attn.o_proj.bias, residual=h)
        act = gemv(h, mlp.gate_up_proj.weight, mlp.gate_up_proj.bias,
                   norm=(ln2.weight, ln2.eps), glu=True)
        return gemv(act, mlp.down_proj.weight, mlp.down_proj.bias, residual=h), None


def _fusable(layer: LlamaDecoderLayer) -> bool:
    attn, mlp = layer.self_attn, layer.mlp
    linears = (attn.qkv_proj, attn.o_proj, mlp.gate_up_proj, mlp.down_proj)
    norms = (layer.input_layernorm, layer.post_attention_layernorm)
    dtype = attn.qkv_proj.weight.dtype if isinstance(attn.qkv_proj, Linear) else None
    return (
        all(isinstance(m, Linear) and m.quant_method is None and m.weight is not None
            and m.weight.dtype == dtype for m in linears)
        and dtype in (torch.bfloat16, torch.float16)
        and all(isinstance(m, RMSNorm) and m.weight.dtype == dtype for m in norms)
        and isinstance(mlp.act, SiluAndMul)
    )


def fuse_decode_layers(model: nn.Module) -> int:
    """Swap plain bf16/fp16 Llama decoder layers for the fused single-row version; returns
    how many were swapped (exact class only: a model-specific subclass keeps its code)."""
    n = 0
    for mod in model.modules():
        if type(mod) is LlamaDecoderLayer and _fusable(mod):
            mod.__class__ = FusedDecodeLlamaLayer
            n += 1
    return n
