"""Low-bit matmul kernels behind one canonical weight description.

Every integer format we load (AWQ, GPTQ, GGUF Q4/Q5/Q6/Q8, K-quants) is converted at load
time into the same ``GroupQuant``: unsigned integer codes [N, K], and per group of inputs an
additive affine map ``w = code * scale + zero``. Keeping one description means one kernel
per device serves every format, and every format is tested against the same reference
(``GroupQuant.dequantize``).

Kernels, chosen by ``make_kernel``:

* ``CpuInt4Kernel``: torch's weight-only int4 CPU GEMM (``_weight_int4pack_mm_for_cpu``) with
  bf16 activations (the fp32 entry of that op is ~20x slower; bf16 is its fast path).
* ``TritonKernel`` (CUDA): int32 words packed along K; a GEMV for decode-sized batches (no
  tl.dot, no split-K) and a dequantize-in-registers tl.dot GEMM for larger ones.
* ``DequantKernel``: dequantize to the activation dtype and call ``F.linear`` (everything
  else: 5/6/8-bit codes on CPU, CUDA without Triton). Memory stays quantized (uint8 codes);
  only the matmul's operand is transient.

Act-order (GPTQ ``desc_act``) is handled by permuting the weight's input columns once so
groups are contiguous, and gathering the activation columns with the same permutation.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

CPU_INT4_GROUPS = (32, 64, 128, 256)


@dataclass
class GroupQuant:
    """codes uint8 [N, K]; scales/zeros float32 [N, K // group_size]; w = code*scale + zero.

    ``g_idx`` (int64 [K], optional) gives each input column's group when groups are not
    contiguous (GPTQ act-order); without it column k belongs to group k // group_size.
    """

    codes: torch.Tensor
    scales: torch.Tensor
    zeros: torch.Tensor
    group_size: int
    bits: int
    g_idx: torch.Tensor | None = None

    def __post_init__(self) -> None:
        n, k = self.codes.shape
        if self.scales.shape != self.zeros.shape or self.scales.shape[0] != n:
            raise ValueError(
                f"GroupQuant: scales {tuple(self.scales.shape)} / zeros "
                f"{tuple(self.zeros.shape)} do not match codes {tuple(self.codes.shape)}"
            )
        if self.g_idx is None and self.scales.shape[1] * self.group_size != k:
            raise ValueError(
                f"GroupQuant: {k} input columns is not {self.scales.shape[1]} groups of "
                f"{self.group_size} (mismatched group size?)"
            )

    @property
    def shape(self) -> tuple[int, int]:
        return (self.codes.shape[0], self.codes.shape[1])

    def group_index(self) -> torch.Tensor:
        if self.g_idx is not None:
            return self.g_idx
        return torch.arange(self.shape[1], device=self.codes.device) // self.group_size

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The reference: float weight [N, K]."""
        g = self.group_index()
        return (self.codes.to(dtype) * self.scales[:, g].to(dtype) + self.zeros[:, g].to(dtype))

    def contiguous_groups(self) -> tuple[GroupQuant, torch.Tensor | None]:
        """An equivalent GroupQuant whose groups are contiguous, and the input permutation.

        ``y = x W^T`` equals ``x[:, perm] W_perm^T``; perm is None when already contiguous.
        """
        if self.g_idx is None:
            return self, None
        k = self.shape[1]
        perm = torch.argsort(self.g_idx, stable=True)
        sorted_g = self.g_idx[perm]
        expect = torch.arange(k, device=perm.device) // self.group_size
        n_groups = self.scales.shape[1]
        if not torch.equal(sorted_g, expect) or n_groups * self.group_size != k:
            raise ValueError(
                "g_idx does not assign exactly group_size columns to each group "
                f"(group_size {self.group_size}, {k} columns, {n_groups} groups)"
            )
        if torch.equal(perm, torch.arange(k, device=perm.device)):
            perm_out = None
        else:
            perm_out = perm
        return GroupQuant(self.codes[:, perm].contiguous(), self.scales, self.zeros,
                          self.group_size, self.bits), perm_out


class DequantKernel(torch.nn.Module):
    """Reference path: dequantize per call, then a dense matmul."""

    def __init__(self, gq: GroupQuant) -> None:
        super().__init__()
        self.register_buffer("codes", gq.codes.to(torch.uint8).contiguous())
        self.register_buffer("scales", gq.scales.float().contiguous())
        self.register_buffer("zeros", gq.zeros.float().contiguous())
        self.register_buffer("g_index", gq.group_index().contiguous())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        g = self.g_index
        w = self.codes.to(x.dtype) * self.scales[:, g].to(x.dtype) + self.zeros[:, g].to(x.dtype)
        return F.linear(x, w)


class CpuInt4Kernel(torch.nn.Module):
    """torch's int4 weight-only CPU GEMM; torch dequantizes as (q - 8) * scale + zero."""

    def __init__(self, gq: GroupQuant) -> None:
        super().__init__()
        gq, perm = gq.contiguous_groups()
        n, k = gq.shape
        self.group_size = gq.group_size
        self.out_features = n
        packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(gq.codes.to(torch.int32), 1)
        sz = torch.stack([gq.scales.t(), (gq.zeros + 8 * gq.scales).t()], dim=-1)
        self.register_buffer("packed", packed)
        self.register_buffer("scale_zero", sz.to(torch.bfloat16).contiguous())
        self.register_buffer("perm", perm)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x2 = x.reshape(-1, shape[-1])
        if self.perm is not None:
            x2 = x2[:, self.perm]
        y = torch.ops.aten._weight_int4pack_mm_for_cpu(
            x2.to(torch.bfloat16).contiguous(), self.packed, self.group_size, self.scale_zero
        )
        return y.to(x.dtype).reshape(*shape[:-1], self.out_features)


def cpu_int4_fits(gq: GroupQuant) -> bool:
    n, k = gq.shape
    return (gq.bits <= 4 and gq.group_size in CPU_INT4_GROUPS and k % gq.group_size == 0
            and n % 8 == 0 and k % 32 == 0)


def make_kernel(gq: GroupQuant, device: torch.device, *, allow_fast: bool = True) -> torch.nn.Module:
    """The fastest kernel for this weight on this device (see module docstring)."""
    device = torch.device(device)
    if allow_fast and device.type == "cpu" and cpu_int4_fits(gq):
        return CpuInt4Kernel(gq)
    if allow_fast and device.type == "cuda":
        from modelport.quantization import triton_gemm

        if triton_gemm.available() and triton_gemm.fits(gq):
            return triton_gemm.TritonKernel(gq, device)
    return DequantKernel(gq).to(device)
