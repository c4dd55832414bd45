"""Quantized MoE experts restacked for the grouped GEMM on CUDA.

A quantized checkpoint loads each expert through its own linear layers (``FusedMoE.unstack``
and the format's LinearMethod: every loader, scale convention and online quantizer reused).
On CUDA the per-expert loop cannot run inside a CUDA graph, so once each expert's layers have
turned their checkpoint tensors into the format's canonical form (FP8: E4M3 [N, K] and fp32
scales [N]; AWQ / GPTQ: a ``GroupQuant``), ``QuantExperts`` stacks them along a leading
expert dimension for the weight-only kernels of layers/triton_moe_quant.py and the per-expert
modules are freed. The stacked form keeps the stored width (1 byte per FP8 weight, 4 or 8
bits per integer code); only the group scales and zeros widen to fp32.

On CPU (tests; a model moved off the GPU) the same buffers run the torch reference on the
dequantized weights.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from modelport.quantization.kernels import GroupQuant
from modelport.quantization.packing import pack_along, unpack_along

FP8 = torch.float8_e4m3fn


def _stack(ts: Sequence[torch.Tensor]) -> torch.Tensor:
    if ts[0].dtype == FP8:  # stacked as bytes: cat need not support float8 on every device
        return torch.stack([t.contiguous().view(torch.uint8) for t in ts]).view(FP8)
    return torch.stack([t.contiguous() for t in ts])


class QuantExperts(nn.Module):
    """All experts of one layer: ``kind`` "fp8" (w13/w2 E4M3, s13/s2 fp32 per channel) or
    "int" (q13/q2 int32 codes packed along K, s13/z13/s2/z2 fp32 per group)."""

    def __init__(
        self,
        kind: str,
        tensors: dict[str, torch.Tensor],
        bits: int = 8,
        group13: int = 0,
        group2: int = 0,
    ) -> None:
        super().__init__()
        self.kind, self.bits, self.group13, self.group2 = kind, bits, group13, group2
        for name, t in tensors.items():
            self.register_buffer(name, t.contiguous())

    @classmethod
    def from_layers(cls, experts: Sequence[tuple[nn.Module, nn.Module]]) -> QuantExperts:
        """From each expert's (gate_up, down) layers after ``process_weights_after_loading``
        with ``keep_for_stacking`` set: FP8 buffers or a kept ``group_quant``."""
        first = experts[0][0]
        if hasattr(first, "fp8_weight"):
            parts = [(a.fp8_weight, a.fp8_scale, b.fp8_weight, b.fp8_scale) for a, b in experts]
            return cls.from_fp8(parts)
        if hasattr(first, "group_quant"):
            return cls.from_group_quant([(a.group_quant, b.group_quant) for a, b in experts])
        method = type(getattr(first, "quant_method", None)).__name__
        raise ValueError(
            f"quantized MoE experts on CUDA: {method} experts cannot be stacked "
            "(supported: FP8, AWQ, GPTQ, compressed-tensors integer weights)"
        )

    @classmethod
    def from_fp8(cls, parts: Sequence[tuple[torch.Tensor, ...]]) -> QuantExperts:
        """parts[e] = (w13 E4M3 [2I, H], s13 [2I] or [1], w2 E4M3 [H, I], s2 [H] or [1])."""
        w13 = _stack([p[0] for p in parts])
        w2 = _stack([p[2] for p in parts])
        s13 = _stack([p[1].float().expand(w13.shape[1]) for p in parts])
        s2 = _stack([p[3].float().expand(w2.shape[1]) for p in parts])
        return cls("fp8", dict(w13=w13, s13=s13, w2=w2, s2=s2))

    @classmethod
    def from_group_quant(cls, parts: Sequence[tuple]) -> QuantExperts:  # (GroupQuant, GroupQuant)
        """parts[e] = (gate/up GroupQuant [2I, H], down GroupQuant [H, I]), same layout each.

        GPTQ act-order experts (a ``g_idx``) are stored with contiguous groups: down's input
        columns sorted by group, and gate/up's output rows in that same order so that the
        activation between them comes out sorted (no cost at run time); gate/up's own input
        columns sorted too, with ``perm13`` (int32 [E, H]) naming the hidden column each
        multiplies, which the kernels gather.
        """
        bits = 4 if max(gq.bits for p in parts for gq in p) <= 4 else 8
        act_order = any(gq.g_idx is not None for p in parts for gq in p)
        perms13 = []
        if act_order:
            sorted_parts = []
            for gq13, gq2 in parts:
                try:
                    gq2, p2 = gq2.contiguous_groups()
                    gq13, p13 = gq13.contiguous_groups()
                except ValueError as err:  # e.g. a tensor-parallel slice holding part groups
                    raise ValueError(
                        "quantized MoE experts on CUDA: GPTQ act-order (desc_act) experts need "
                        f"every group whole ({err}); use tensor_parallel_size=1 or "
                        "--enable-expert-parallel (whole experts a rank), a desc_act=false "
                        "GPTQ or an AWQ checkpoint, or --device cpu") from err
                if p2 is not None:  # gate rows, then up rows, in down's sorted column order
                    inter = gq2.shape[1]
                    rows = torch.cat([p2, p2 + inter])
                    gq13 = GroupQuant(gq13.codes[rows], gq13.scales[rows], gq13.zeros[rows],
                                      gq13.group_size, gq13.bits)
                hidden = gq13.shape[1]
                perms13.append(torch.arange(hidden, device=gq13.codes.device)
                               if p13 is None else p13)
                sorted_parts.append((gq13, gq2))
            parts = sorted_parts
        tensors: dict[str, torch.Tensor] = {}
        groups = []
        for j, name in ((0, "13"), (1, "2")):
            gqs = [p[j] for p in parts]
            group = gqs[0].group_size
            for gq in gqs:
                if gq.group_size != group or gq.shape != gqs[0].shape:
                    raise ValueError("quantized MoE experts differ in shape or group size")
            tensors["q" + name] = _stack([pack_along(gq.codes, bits, dim=1) for gq in gqs])
            tensors["s" + name] = _stack([gq.scales.float() for gq in gqs])
            tensors["z" + name] = _stack([gq.zeros.float() for gq in gqs])
            groups.append(group)
        if act_order:
            tensors["perm13"] = _stack([p.to(torch.int32) for p in perms13])
        return cls("int", tensors, bits, groups[0], groups[1])

    def dequantize(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(w13 [E, 2I, H], w2 [E, H, I]) in float32: what the kernels multiply by."""
        if self.kind == "fp8":
            return (self.w13.float() * self.s13[..., None], self.w2.float() * self.s2[..., None])
        out = []
        for q, s, z, g in (
            (self.q13, self.s13, self.z13, self.group13),
            (self.q2, self.s2, self.z2, self.group2),
        ):
            codes = unpack_along(q, self.bits, dim=2).float()
            out.append(codes * s.repeat_interleave(g, dim=2) + z.repeat_interleave(g, dim=2))
        perm = getattr(self, "perm13", None)
        if perm is not None:  # act-order: gate/up's columns back in hidden order
            w13 = torch.empty_like(out[0])
            w13.scatter_(2, perm.long()[:, None, :].expand_as(out[0]), out[0])
            out[0] = w13
        return out[0], out[1]

    def forward(self, x: torch.Tensor, weights: torch.Tensor, ids: torch.Tensor,
                elsewhere: bool = False) -> torch.Tensor:
        """``elsewhere`` (expert parallelism): id E marks an assignment to an expert another
        rank holds, at weight 0 (``FusedMoE._own_assignments``); it adds nothing here."""
        if x.is_cuda:
            return self.grouped_gemm(x, weights, ids, elsewhere)
        from modelport.layers.fused_moe import moe_reference

        w13, w2 = self.dequantize()
        return moe_reference(x, w13.to(x.dtype), w2.to(x.dtype), weights, ids, elsewhere)

    def grouped_gemm(
        self, x: torch.Tensor, weights: torch.Tensor, ids: torch.Tensor,
        elsewhere: bool = False, **launch: int
    ) -> torch.Tensor:
        """The Triton path (CUDA; the tests run it in the Triton interpreter on CPU)."""
        from modelport.layers import triton_moe_quant as tq

        if self.kind == "fp8":
            return tq.fused_experts_fp8(
                x, self.w13, self.s13, self.w2, self.s2, weights, ids, elsewhere=elsewhere,
                **launch
            )
        q = (self.q13, self.s13, self.z13, self.q2, self.s2, self.z2)
        return tq.fused_experts_wint(
            x, *q, self.bits, self.group13, self.group2, weights, ids,
            perm13=getattr(self, "perm13", None), elsewhere=elsewhere, **launch
        )

    def extra_repr(self) -> str:
        if self.kind == "fp8":
            return f"fp8, experts={self.w13.shape[0]}"
        return f"int{self.bits}, experts={self.q13.shape[0]}, groups={self.group13}/{self.group2}"
