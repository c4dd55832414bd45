"""AWQ checkpoints (AutoAWQ "GEMM" layout): pack/unpack and the load-side LinearMethod.

Layout, per linear layer with K inputs, N outputs, group size g (4-bit, zero point):
  qweight int32 [K, N/8]   eight 4-bit codes per word along the output dim, interleaved:
                           nibble i of word c holds output column 8c + AWQ_ORDER[i]
  qzeros  int32 [K/g, N/8] the zero points, packed the same way
  scales  fp16  [K/g, N]
  w[n, k] = (q[k, n] - z[k // g, n]) * s[k // g, n]

AutoAWQ's "GEMV" version (``"version": "gemv"``, its single-request kernels) stores the same
codes, zeros and scales transposed and in natural order:
  qweight int32 [N, K/8]   nibble i of word c holds input 8c + i of output row n
  qzeros  int32 [N, W]     the G = K/g zero points of a row packed the same way, zero-padded
                           to W words: W = ceil(G / 8) rounded up to a multiple of 2 (g = 64)
                           or 4 (g = 32)
  scales  fp16  [N, 8 W]   the first G columns are the groups' scales, the rest padding
Both load into the same GroupQuant (``AWQGEMVLinearMethod``), so the same kernels run them.
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
from modelport.quantization.kernels import GroupQuant, GroupQuantMethod
from modelport.quantization.packing import pack_along, unpack_along

AWQ_ORDER = (0, 2, 4, 6, 1, 3, 5, 7)  # nibble i <- column offset AWQ_ORDER[i]
AWQ_VERSIONS = ("gemm", "gemv")


def pack_awq_int32(codes: torch.Tensor) -> torch.Tensor:
    """uint8 codes [R, N] (values < 16) -> int32 [R, N/8] in AWQ's interleaved nibble order."""
    r, n = codes.shape
    if n % 8:
        raise ValueError(f"AWQ packs 8 outputs per word; {n} outputs is not a multiple of 8")
    c = codes.reshape(r, n // 8, 8)[..., list(AWQ_ORDER)].reshape(r, n)
    return pack_along(c, 4, dim=1)


def unpack_awq_int32(words: torch.Tensor) -> torch.Tensor:
    """int32 [R, N/8] -> uint8 codes [R, N] (inverse of pack_awq_int32)."""
    r, c = words.shape
    nib = unpack_along(words, 4, dim=1).reshape(r, c, 8)  # by nibble index
    inv = [AWQ_ORDER.index(j) for j in range(8)]
    return nib[..., inv].reshape(r, c * 8).contiguous()


@dataclass
class AWQConfig(QuantizationConfig):
    bits: int = 4
    group_size: int = 128
    zero_point: bool = True
    modules_to_not_convert: tuple[str, ...] = ()
    version: str = "gemm"  # AutoAWQ's layout: "gemm", or "gemv" (transposed, module docstring)
    name: str = field(default="awq", init=False)

    def __post_init__(self) -> None:
        if self.bits != 4:
            raise ValueError(f"AWQ: unsupported bit width {self.bits} (AutoAWQ GEMM is 4-bit)")
        if self.group_size <= 0 or self.group_size % 8:
            raise ValueError(f"AWQ: group_size must be a positive multiple of 8, got {self.group_size}")

    @classmethod
    def from_hf(cls, qc: dict[str, Any]) -> AWQConfig:
        version = str(qc.get("version", "gemm")).lower()
        if version not in AWQ_VERSIONS:
            raise ValueError(f"AWQ version {version!r} is not supported (AutoAWQ's layouts "
                             f"{', '.join(AWQ_VERSIONS)} load; exllama / marlin / ipex ones do "
                             "not: re-save the model with version 'gemm')")
        return cls(
            bits=int(qc.get("bits", qc.get("w_bit", 4))),
            group_size=int(qc.get("group_size", qc.get("q_group_size", 128))),
            zero_point=bool(qc.get("zero_point", True)),
            modules_to_not_convert=tuple(qc.get("modules_to_not_convert") or ()),
            version=version,
        )

    def hf_dict(self) -> dict[str, Any]:
        return {"quant_method": "awq", "bits": self.bits, "group_size": self.group_size,
                "zero_point": self.zero_point, "version": self.version,
                "modules_to_not_convert": list(self.modules_to_not_convert) or None}

    def linear_method(self, prefix: str, layer: nn.Module) -> LinearMethod | None:
        if any(m in prefix for m in self.modules_to_not_convert):
            return None
        return AWQGEMVLinearMethod(self) if self.version == "gemv" else AWQLinearMethod(self)


class AWQLinearMethod(GroupQuantMethod):
    format_name = "AWQ"

    def __init__(self, config: AWQConfig) -> None:
        self.config = config

    def group_size_for(self, input_size: int) -> int | None:
        return self.config.group_size

    def check_groups(self, input_size: int) -> None:
        if input_size % self.config.group_size:
            raise ValueError(
                f"AWQ: input size {input_size} is not a multiple of group_size "
                f"{self.config.group_size} (mismatched group size in quantization_config?)"
            )

    def create_weights(self, layer: nn.Module, input_size: int, output_sizes: Sequence[int],
                       params_dtype: torch.dtype) -> None:
        g, n = self.config.group_size, sum(output_sizes)
        self.check_groups(input_size)
        if any(s % 8 for s in output_sizes):
            raise ValueError(f"AWQ: output sizes {list(output_sizes)} must be multiples of 8")
        new_param(layer, "qweight", torch.zeros(input_size, n // 8, dtype=torch.int32),
                  output_dim=1, pack_factor=8)
        new_param(layer, "qzeros", torch.zeros(input_size // g, n // 8, dtype=torch.int32),
                  output_dim=1, pack_factor=8)
        new_param(layer, "scales", torch.zeros(input_size // g, n, dtype=params_dtype),
                  output_dim=1)

    def slice_cuts(self, layer: nn.Module, spec: TPShard) -> dict[str, Cut] | None:
        """Output rows: whole packed words of 8 outputs (qweight, qzeros) and the scales'
        columns; input columns: qweight's rows and the rows of their groups. A slice inside one
        group (fewer columns than group_size) loads whole."""
        self.check_split(layer, spec)
        g = self.config.group_size
        if spec.dim == 0:
            if not outputs_aligned(spec, 8):
                return None
            return {"qweight": output_cut(spec, 1, 8), "qzeros": output_cut(spec, 1, 8),
                    "scales": output_cut(spec, 1)}
        start, part, k = spec.start, spec.length, spec.input_size
        if part % g:
            return None
        groups = input_cut(start // g, part // g, k // g, 0)
        return {"qweight": input_cut(start, part, k, 0), "qzeros": groups, "scales": groups}

    def to_group_quant(self, layer: nn.Module, input_size: int) -> GroupQuant:
        gq = awq_to_group_quant(layer.qweight.data, layer.qzeros.data, layer.scales.data,
                                self.config.group_size)
        for name in ("qweight", "qzeros", "scales"):
            del layer._parameters[name]
        return gq


def gemv_zeros_width(input_size: int, group_size: int) -> int:
    """Words of qzeros per row in AutoAWQ's GEMV layout (scales: 8 columns a word)."""
    step = 1 if group_size >= 128 else {64: 2, 32: 4}.get(group_size)
    if step is None:
        raise ValueError(f"AWQ GEMV layout: group_size {group_size} is not one AutoAWQ writes "
                         "(32, 64 or 128 and up)")
    words = -(-(input_size // group_size) // 8)
    return -(-words // step) * step


class AWQGEMVLinearMethod(AWQLinearMethod):
    """AutoAWQ's GEMV layout (module docstring): the same GroupQuant as GEMM once loaded.
    Rows are outputs, so a fused layer's shards load as row ranges; tensor parallelism loads
    the layer whole and cuts the GroupQuant (no slice_cuts)."""

    format_name = "AWQ (GEMV layout)"

    def create_weights(self, layer: nn.Module, input_size: int, output_sizes: Sequence[int],
                       params_dtype: torch.dtype) -> None:
        g, n = self.config.group_size, sum(output_sizes)
        self.check_groups(input_size)
        if input_size % 8:
            raise ValueError(f"AWQ GEMV layout: input size {input_size} must be a multiple of 8")
        width = gemv_zeros_width(input_size, g)
        new_param(layer, "qweight", torch.zeros(n, input_size // 8, dtype=torch.int32),
                  output_dim=0)
        new_param(layer, "qzeros", torch.zeros(n, width, dtype=torch.int32), output_dim=0)
        new_param(layer, "scales", torch.zeros(n, width * 8, dtype=params_dtype), output_dim=0)

    def slice_cuts(self, layer: nn.Module, spec: TPShard) -> dict[str, Cut] | None:
        return None

    def to_group_quant(self, layer: nn.Module, input_size: int) -> GroupQuant:
        groups = input_size // self.config.group_size
        codes = unpack_along(layer.qweight.data, 4, dim=1)  # [N, K]
        z = unpack_along(layer.qzeros.data, 4, dim=1)[:, :groups].float()
        s = layer.scales.data[:, :groups].float()
        for name in ("qweight", "qzeros", "scales"):
            del layer._parameters[name]
        return GroupQuant(codes, s.contiguous(), (-z * s).contiguous(), self.config.group_size, 4)


def awq_to_group_quant(qweight: torch.Tensor, qzeros: torch.Tensor, scales: torch.Tensor,
                       group_size: int) -> GroupQuant:
    codes = unpack_awq_int32(qweight).t().contiguous()  # [N, K]
    z = unpack_awq_int32(qzeros).t().float()  # [N, G]
    s = scales.t().float()
    return GroupQuant(codes, s, -z * s, group_size, 4)


def pack_awq(codes: torch.Tensor, zeros: torch.Tensor, scales: torch.Tensor) -> dict[str, torch.Tensor]:
    """Checkpoint tensors from codes [N, K], integer zeros [N, G] and scales [N, G]."""
    return {
        "qweight": pack_awq_int32(codes.t().contiguous()),
        "qzeros": pack_awq_int32(zeros.t().contiguous().to(torch.uint8)),
        "scales": scales.t().contiguous().to(torch.float16),
    }


def pack_awq_gemv(codes: torch.Tensor, zeros: torch.Tensor, scales: torch.Tensor,
                  group_size: int) -> dict[str, torch.Tensor]:
    """AutoAWQ GEMV-layout tensors from codes [N, K], integer zeros [N, G], scales [N, G]."""
    n, k = codes.shape
    width = gemv_zeros_width(k, group_size)
    z = torch.zeros(n, width * 8, dtype=torch.uint8)
    z[:, : zeros.shape[1]] = zeros.to(torch.uint8)
    s = torch.zeros(n, width * 8, dtype=torch.float16)
    s[:, : scales.shape[1]] = scales.to(torch.float16)
    return {"qweight": pack_along(codes, 4, dim=1), "qzeros": pack_along(z, 4, dim=1),
            "scales": s}
