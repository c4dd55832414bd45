"""GPTQ checkpoints (AutoGPTQ / GPTQModel layout): pack/unpack and the load-side LinearMethod.

Layout, per linear layer with K inputs, N outputs, b bits (4 or 8), group size g:
  qweight int32 [K*b/32, N]   codes packed along the input dim, first input in the low bits
  qzeros  int32 [G, N*b/32]   zero points packed along the output dim; the "gptq" checkpoint
                              format stores zero - 1 ("gptq_v2" stores the zero itself)
  scales  fp16  [G, N]
  g_idx   int32 [K]           the group of each input (act-order: not k // g)
  w[n, k] = (q[k, n] - z[g_idx[k], n]) * s[g_idx[k], n]
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from modelport.quantization.base import (
    Cut,
    LinearMethod,
    QuantizationConfig,
    TPShard,
    input_cut,
    new_param,
    output_cut,
    outputs_aligned,
)
from modelport.quantization.kernels import GroupQuant, GroupQuantMethod, keep_used_groups
from modelport.quantization.packing import pack_along, unpack_along

SUPPORTED_BITS = (4, 8)


@dataclass
class GPTQConfig(QuantizationConfig):
    bits: int = 4
    group_size: int = 128  # -1: one group per output channel (the whole input)
    desc_act: bool = False
    sym: bool = True
    checkpoint_format: str = "gptq"  # or "gptq_v2"
    # how the writer fitted it (the loader ignores it): each layer on the inputs of the layers
    # quantized before it (True), or on the float model's activations (False)
    true_sequential: bool = True
    damp_percent: float = 0.01  # the writer's Hessian dampening (also ignored by the loader)
    name: str = field(default="gptq", init=False)

    def __post_init__(self) -> None:
        if self.bits not in SUPPORTED_BITS:
            raise ValueError(
                f"GPTQ: unsupported bit width {self.bits}; supported: "
                f"{', '.join(map(str, SUPPORTED_BITS))}"
            )
        if self.group_size != -1 and self.group_size <= 0:
            raise ValueError(f"GPTQ: group_size must be -1 or > 0, got {self.group_size}")
        if self.checkpoint_format not in ("gptq", "gptq_v2"):
            raise ValueError(f"GPTQ: unknown checkpoint_format {self.checkpoint_format!r}")

    @classmethod
    def from_hf(cls, qc: dict[str, Any]) -> GPTQConfig:
        return cls(
            bits=int(qc.get("bits", 4)),
            group_size=int(qc.get("group_size", 128)),
            desc_act=bool(qc.get("desc_act", False)),
            sym=bool(qc.get("sym", True)),
            checkpoint_format=str(qc.get("checkpoint_format", "gptq")),
            true_sequential=bool(qc.get("true_sequential", True)),
            damp_percent=float(qc.get("damp_percent", 0.01)),
        )

    def hf_dict(self) -> dict[str, Any]:
        return {"quant_method": "gptq", "bits": self.bits, "group_size": self.group_size,
                "desc_act": self.desc_act, "sym": self.sym, "checkpoint_format": self.checkpoint_format,
                "static_groups": False, "true_sequential": self.true_sequential,
                "damp_percent": self.damp_percent}

    def linear_method(self, prefix: str, layer: nn.Module) -> LinearMethod | None:
        return GPTQLinearMethod(self)


class GPTQLinearMethod(GroupQuantMethod):
    format_name = "GPTQ"

    def __init__(self, config: GPTQConfig) -> None:
        self.config = config
        # a tensor-parallel rank's act-order row slice: every group's qzeros / scales (its
        # columns may reference any group), the whole weight's group count
        self.all_groups: int | None = None

    def group_size_for(self, input_size: int) -> int | None:
        return self.group_size(input_size)

    def group_size(self, input_size: int) -> int:
        return input_size if self.config.group_size == -1 else self.config.group_size

    def create_weights(self, layer: nn.Module, input_size: int, output_sizes: Sequence[int],
                       params_dtype: torch.dtype) -> None:
        b, g, n = self.config.bits, self.group_size(input_size), sum(output_sizes)
        per = 32 // b
        if input_size % g or input_size % per:
            raise ValueError(
                f"GPTQ: input size {input_size} is not a multiple of group_size {g} and of "
                f"{per} (mismatched group size or bits in quantization_config?)"
            )
        if any(s % per for s in output_sizes):
            raise ValueError(f"GPTQ: output sizes {list(output_sizes)} must be multiples of {per}")
        groups = self.all_groups or input_size // g
        new_param(layer, "qweight", torch.zeros(input_size // per, n, dtype=torch.int32),
                  output_dim=1)
        new_param(layer, "qzeros", torch.zeros(groups, n // per, dtype=torch.int32),
                  output_dim=1, pack_factor=per)
        new_param(layer, "scales", torch.zeros(groups, n, dtype=params_dtype), output_dim=1)
        new_param(layer, "g_idx", torch.full((input_size,), -1, dtype=torch.int32),
                  loader=lambda p, t, shard_id=None: _load_g_idx(p, t))

    def slice_cuts(self, layer: nn.Module, spec: TPShard) -> dict[str, Cut] | None:
        """Output rows: qweight's and the scales' columns, qzeros' packed words; g_idx whole.
        Input columns: qweight's packed rows and their g_idx; in order (desc_act false) the
        rows of their groups, act-order every group's (a rank's columns reference groups all
        over; ``to_group_quant`` keeps those used). A slice inside one group of an explicit
        group_size, or of act-order, loads whole (its groups are renumbered from the whole)."""
        self.check_split(layer, spec)
        per = 32 // self.config.bits
        if spec.dim == 0:
            if not outputs_aligned(spec, per):
                return None
            return {"qweight": output_cut(spec, 1), "qzeros": output_cut(spec, 1, per),
                    "scales": output_cut(spec, 1), "g_idx": lambda t, shard_id: t}
        start, part, k = spec.start, spec.length, spec.input_size
        g = self.group_size(k)
        if start % per or part % per:
            return None
        cuts: dict[str, Cut] = {"qweight": input_cut(start // per, part // per, k // per, 0)}
        if self.config.desc_act:
            if part % g:
                return None
            self.all_groups = k // g
            cuts["g_idx"] = input_cut(start, part, k, 0)
            return cuts
        if part % g and self.config.group_size != -1:
            return None
        first, count = (0, 1) if self.config.group_size == -1 else (start // g, part // g)
        cuts["qzeros"] = cuts["scales"] = input_cut(first, count, k // g, 0)
        cuts["g_idx"] = lambda t, shard_id: _local_g_idx(t, start, part, g)
        return cuts

    def to_group_quant(self, layer: nn.Module, input_size: int) -> GroupQuant:
        if self.all_groups:  # an act-order row slice (slice_cuts)
            gq = gptq_to_group_quant(layer.qweight.data, layer.qzeros.data, layer.scales.data,
                                     layer.g_idx.data, self.config.bits,
                                     self.group_size(input_size), self.config.checkpoint_format,
                                     in_order=False)
            gq = keep_used_groups(gq)
        else:
            gq = gptq_to_group_quant(layer.qweight.data, layer.qzeros.data, layer.scales.data,
                                     layer.g_idx.data, self.config.bits,
                                     self.group_size(input_size), self.config.checkpoint_format)
        for name in ("qweight", "qzeros", "scales", "g_idx"):
            del layer._parameters[name]
        return gq


def _load_g_idx(param: nn.Parameter, loaded: torch.Tensor) -> None:
    """Every shard of a fused layer carries the same g_idx (same input): check, keep one."""
    if tuple(loaded.shape) != tuple(param.shape):
        raise ValueError(f"g_idx has shape {tuple(loaded.shape)}, expected {tuple(param.shape)}")
    loaded = loaded.to(param.device, param.dtype)  # a CPU read into a CUDA model's param
    if (param.data >= 0).all() and not torch.equal(param.data, loaded):
        raise ValueError("fused GPTQ shards (q/k/v or gate/up) disagree on g_idx")
    param.data.copy_(loaded)


def _local_g_idx(g_idx: torch.Tensor, start: int, part: int, group_size: int) -> torch.Tensor:
    """An in-order checkpoint's g_idx for input columns [start, start + part), its groups
    numbered from the slice's first."""
    sl = g_idx[start : start + part].long()
    want = torch.arange(start, start + part, device=sl.device) // group_size
    if g_idx.numel() < start + part or not torch.equal(sl, want):
        raise ValueError("GPTQ: g_idx is not in input order, but quantization_config.desc_act "
                         "is false; set desc_act true for this act-order checkpoint")
    return (sl - start // group_size).to(g_idx.dtype)


def gptq_to_group_quant(qweight: torch.Tensor, qzeros: torch.Tensor, scales: torch.Tensor,
                        g_idx: torch.Tensor, bits: int, group_size: int,
                        checkpoint_format: str = "gptq", in_order: bool = True) -> GroupQuant:
    """``in_order`` False: keep g_idx even where it is in order (a rank's act-order slice,
    whose scales are every group's)."""
    codes = unpack_along(qweight, bits, dim=0).t().contiguous()  # [N, K]
    z = unpack_along(qzeros, bits, dim=1).t().float()  # [N, G]
    if checkpoint_format == "gptq":
        z = (z + 1) % (1 << bits)  # v1 stores zero - 1 (wrapping, as AutoGPTQ writes it)
    s = scales.t().float()
    k = codes.shape[1]
    g = g_idx.long()
    if g.numel() != k or g.min() < 0 or g.max() >= s.shape[1]:
        raise ValueError(f"GPTQ: g_idx must give each of {k} inputs a group in [0, {s.shape[1]})")
    trivial = in_order and torch.equal(g, torch.arange(k, device=g.device) // group_size)
    return GroupQuant(codes, s, -z * s, group_size, bits, None if trivial else g)


def pack_gptq(codes: torch.Tensor, zeros: torch.Tensor, scales: torch.Tensor, bits: int,
              g_idx: torch.Tensor | None = None, group_size: int | None = None) -> dict[str, torch.Tensor]:
    """Checkpoint tensors ("gptq" format) from codes [N, K], integer zeros and scales [N, G];
    without g_idx, input i is in group i // group_size (default: K / G, contiguous groups)."""
    k = codes.shape[1]
    if g_idx is None:
        g_idx = torch.arange(k) // (group_size or k // scales.shape[1])
    stored = (zeros.to(torch.int64) - 1) % (1 << bits)
    return {
        "qweight": pack_along(codes.t(), bits, dim=0),
        "qzeros": pack_along(stored.t(), bits, dim=1),
        "scales": scales.t().contiguous().to(torch.float16),
        "g_idx": g_idx.to(torch.int32),
    }
