"""Low-bit matmul kernels behind one canonical weight description.

Every integer format we load (AWQ, GPTQ, GGUF Q4/Q5/Q8 and the K-quants Q2_K-Q6_K) is
converted at load time into the same ``GroupQuant``: unsigned integer codes [N, K], and per
group of inputs an additive affine map ``w = code * scale + zero``. Keeping one description
means one kernel per device serves every format, and every format is tested against the same
reference (``GroupQuant.dequantize``).

Kernels, chosen by ``make_kernel``:

* ``CpuInt4Kernel``: torch's weight-only int4 CPU GEMM (``_weight_int4pack_mm_for_cpu``) with
  bf16 activations (the fp32 entry of that op is ~20x slower; bf16 is its fast path).
* ``CpuQ8Kernel``: GGUF Q8_0 on CPU (and any GroupQuant of the same shape: 8-bit codes,
  zero -128 x scale, fp16 scales per 32 inputs), its block scales kept: a C kernel
  (layers/csrc/cpu_decode.c) on the exact weights up to ``CPU_Q8_MAX_M`` rows, the weight
  expanded to bf16 above. The default for Q8_0 (``MODELPORT_Q8_CPU=blocks``): on SmolLM2 Q8_0
  1.19x faster single stream than CpuInt8Kernel at +0.34 % perplexity against +0.77 %
  (bench/README.md, session 32); ``MODELPORT_Q8_CPU=rows`` puts Q8_0 back on CpuInt8Kernel
  (as does a box where the C library cannot be built).
* ``CpuInt8Kernel``: every other weight on CPU (GGUF Q5/Q6/K-quants and a Q8_0 part fused with
  one of those, GPTQ W8, codes of up to 4 bits the int4 kernel does not take: act-order
  groups, groups of 16 as GGUF Q2_K / Q3_K unpack to; NF4 and FP8 use it too), requantized
  per output row to the symmetric int8 that torch's weight-only int8 CPU GEMM
  (``_weight_int8pack_mm``) takes, bf16 activations; batches above ``CPU_INT8_MAX_M`` rows
  expand the int8 weight to bf16 per call for a bf16 matmul instead (faster there).
* ``TritonKernel`` (CUDA): int32 words packed along K; a GEMV for decode-sized batches (no
  tl.dot, no split-K) and a dequantize-in-registers tl.dot GEMM for larger ones.
* ``DequantKernel``: dequantize to the activation dtype and call ``F.linear`` (everything
  else: CUDA without Triton, shapes the Triton kernels do not take). Memory stays quantized
  (uint8 codes); only the matmul's operand is transient.

Act-order (GPTQ ``desc_act``) is handled by permuting the weight's input columns once so
groups are contiguous, and gathering the activation columns with the same permutation.

Tensor parallelism: a rank built as its slice (parallel/tp_quant_load.py) loads only its part
of each checkpoint tensor (the formats' ``slice_cuts``); a layer loaded whole is cut in its
canonical ``GroupQuant`` (``shard_group_quant``) before the kernel packs it. Both give the
same GroupQuant.
A row-parallel slice of an act-order weight usually holds parts of groups (a group's columns
are scattered over K); such a slice keeps its g_idx and runs on ``CpuInt8Kernel`` on CPU,
``DequantKernel`` on CUDA.
"""

from __future__ import annotations

import os
from abc import abstractmethod
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from modelport.layers import cpu_fast
from modelport.quantization.base import LinearMethod, TPShard, check_input_split
from modelport.quantization.gguf_types import cpu_q8_mode

CPU_INT4_GROUPS = (32, 64, 128, 256)
try:  # the op's overload, called directly: no OpOverloadPacket dispatch in Python per call
    _int4_mm = torch.ops.aten._weight_int4pack_mm_for_cpu.default
except AttributeError:  # pragma: no cover - torch builds without it never pick CpuInt4Kernel
    _int4_mm = None
# rows up to which torch's int8 GEMM beats expanding the int8 weight to bf16 for a bf16
# matmul (2-core AVX-512 box, SmolLM2's 1536x576 / 576x1536: int8 GEMM 2x faster than fp32
# at 1-4 rows, even at 16, 2x slower from 128; the expansion 1.3-3x faster than fp32 above 32)
CPU_INT8_MAX_M = 16


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

    def uniform_groups(self) -> bool:
        """Whether every group holds exactly group_size columns (what the fast kernels need)."""
        if self.g_idx is None:
            return True
        n_groups = self.scales.shape[1]
        if n_groups * self.group_size != self.shape[1]:
            return False
        counts = torch.bincount(self.g_idx.long(), minlength=n_groups)
        return bool((counts == self.group_size).all())

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
        if x.dim() == 2 and self.perm is None and cpu_fast.ENABLED:  # the decoder's [T, K]
            return _int4_mm(x.to(torch.bfloat16).contiguous(), self.packed, self.group_size,
                            self.scale_zero).to(x.dtype)
        shape = x.shape
        x2 = x.reshape(-1, shape[-1])
        if self.perm is not None:
            x2 = x2[:, self.perm]
        y = torch.ops.aten._weight_int4pack_mm_for_cpu(
            x2.to(torch.bfloat16).contiguous(), self.packed, self.group_size, self.scale_zero
        )
        return y.to(x.dtype).reshape(*shape[:-1], self.out_features)


class CpuInt8Kernel(torch.nn.Module):
    """torch's int8 weight-only CPU GEMM for any weight the int4 kernel does not take.

    That kernel takes one scale per output row and no zero point, so the weight (GGUF blocks
    of 32 with their own scales, GPTQ groups with zeros, NF4 codes x block absmax, E4M3 x
    row scale) arrives dequantized and is requantized per row: q = round(w / s),
    s = max|w| / 127. This adds at most s / 2 of rounding per weight on top of the format's
    own (8-bit precision over the row's range, where Q8_0 has it over each block of 32), and
    the weight stays 1 byte each. Measured cost on SmolLM2 (bench/README.md): +0.7 %
    perplexity for Q8_0, +0.5 % for NF4, +1.6 % for FP8, each against its exact path.
    """

    def __init__(self, w: torch.Tensor) -> None:
        """``w``: the format's weight dequantized, float [N, K]."""
        super().__init__()
        w = w.float()
        scale = (w.abs().amax(dim=1) / 127).clamp(min=1e-12)
        self.register_buffer("qweight", torch.round(w / scale[:, None]).clamp(-127, 127)
                             .to(torch.int8).contiguous())
        self.register_buffer("scale", scale.to(torch.bfloat16))
        self.out_features = w.shape[0]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x2 = x.reshape(-1, shape[-1]).to(torch.bfloat16).contiguous()
        if x2.shape[0] <= CPU_INT8_MAX_M:
            y = torch.ops.aten._weight_int8pack_mm(x2, self.qweight, self.scale)
        else:
            y = F.linear(x2, self.qweight.to(torch.bfloat16) * self.scale[:, None])
        return y.to(x.dtype).reshape(*shape[:-1], self.out_features)


# how long (us) the Q8_0 kernel's pool workers spin for the next call before sleeping (the
# pthread pool: a library built without OpenMP, or a forked child; else torch's OpenMP team)
Q8_SPIN_US = int(os.environ.get("MODELPORT_Q8_SPIN_US", "100"))
# rows up to which CpuQ8Kernel runs its C kernel; above, the weight is expanded per call
# (CpuQ8Kernel.matmul). With x quantized per block (the default, int8 dot products) the C
# kernel runs up to CPU_Q8I_MAX_M rows.
CPU_Q8_MAX_M = CPU_INT8_MAX_M
CPU_Q8I_MAX_M = int(os.environ.get("MODELPORT_Q8I_MAX_M", "32"))


def q8_0_codes(gq: GroupQuant) -> tuple[torch.Tensor, torch.Tensor] | None:
    """(int8 codes [N, K], fp16 block scales [N, K / 32]) where gq is GGUF Q8_0 as unpacked
    (gguf_formats.unpack: codes q + 128, scale d, zero -128 d, blocks of 32, d an fp16
    value), else None."""
    n, k = gq.shape
    if gq.g_idx is not None or gq.group_size != 32 or gq.bits != 8 or k % 32:
        return None
    d = gq.scales.float()
    d16 = d.to(torch.float16)
    if not torch.equal(d16.float(), d) or not torch.equal(gq.zeros.float(), -128 * d):
        return None
    return (gq.codes.to(torch.int16) - 128).to(torch.int8).contiguous(), d16.contiguous()


class CpuQ8Kernel(torch.nn.Module):
    """GGUF Q8_0 on CPU with the file's scale per block of 32 (no requantization).

    ``act_i8`` (the default, ``MODELPORT_Q8_CPU=blocks``): up to ``CPU_Q8I_MAX_M`` rows
    ``mp_q8_matmul_i8`` in layers/csrc/cpu_decode.c: each row of x quantized per block of 32
    to int8 (one float32 scale a block: max|x| / 127, round half to even), then int8 x int8
    dot products a block (AVX-512 VNNI / AVX2 / scalar, chosen when the C file is compiled
    for this CPU), each scaled by weight scale x activation scale and summed in float32; the
    weights stay exact, x is rounded to 8 bits per block (perplexity +0.34 % against the
    exact weights on SmolLM2 Q8_0, the row requantization +0.76 %; bench/README.md, session
    32). ``MODELPORT_Q8_CPU=blocks_f32``: up to ``CPU_Q8_MAX_M`` rows ``mp_q8_matmul``
    instead (each block's weights formed in float32 as code * scale, which is exact, times
    float32 activations): the exactly dequantized weight's results up to float32 summation
    order (a bf16 input, as the C step gives between bf16 matmuls, is widened exactly; a
    bf16 output is rounded once), but slower. Both split output rows over torch's own OpenMP
    team (a second pool beside it cost ~15-30 % single stream on 2 cores; csrc/cpu_decode.c),
    or a small resident thread pool where the library has no OpenMP. Above (prompt chunks,
    wide batches), as CpuInt8Kernel: the weight expanded per call to bf16 (each exact weight
    rounded once, ``mp_q8_expand_bf16``) for a bf16 matmul of bf16 activations;
    ``MODELPORT_Q8_LARGE=f32`` (read when the kernel is built) expands it to float32
    instead, exact but ~2x slower there on the 2-core box.
    """

    def __init__(self, codes: torch.Tensor, scales: torch.Tensor, act_i8: bool = True) -> None:
        super().__init__()
        self.register_buffer("qweight", codes)  # int8 [N, K]
        self.register_buffer("scales", scales)  # fp16 [N, K / 32]
        self.out_features, self.in_features = codes.shape
        self.large_f32 = os.environ.get("MODELPORT_Q8_LARGE", "bf16") == "f32"
        self.act_i8 = act_i8
        self.max_m = CPU_Q8I_MAX_M if act_i8 else CPU_Q8_MAX_M
        self.packed = False  # qweight in mp_q8_i8_pack's order (the VNNI build's)
        if act_i8:
            packed = torch.empty_like(codes)
            self.packed = bool(_q8_lib().mp_q8_i8_pack(*codes.shape, codes.data_ptr(),
                                                       packed.data_ptr()))
            self.qweight = packed

    def expanded(self) -> torch.Tensor:
        """The exact float32 weight [N, K]."""
        n, k = self.qweight.shape
        q = self.qweight
        if self.packed:  # groups of 512: [8 steps, 16 blocks, 4 codes] -> [16, 8, 4]
            g = k // 512
            head = q[:, :512 * g].view(n, g, 8, 16, 4).transpose(2, 3).reshape(n, 512 * g)
            q = torch.cat([head, q[:, 512 * g:]], dim=1)
        return (q.view(n, k // 32, 32).float()
                * self.scales.float()[:, :, None]).view(n, k)

    def matmul(self, x2: torch.Tensor, out_dtype: torch.dtype | None = None) -> torch.Tensor:
        """[M, K] float32 or bf16 (contiguous) -> [M, N] of ``out_dtype`` (float32 or bf16;
        default: x2's)."""
        m = x2.shape[0]
        out_dtype = out_dtype or x2.dtype
        if m > self.max_m:
            if self.large_f32:
                return F.linear(x2.float(), self.expanded()).to(out_dtype)
            w = torch.empty(self.out_features, self.in_features, dtype=torch.bfloat16)
            lib = _q8_lib()
            expand = lib.mp_q8_expand_bf16_packed if self.packed else lib.mp_q8_expand_bf16
            expand(self.out_features, self.in_features, self.qweight.data_ptr(),
                   self.scales.data_ptr(), w.data_ptr(), torch.get_num_threads(), Q8_SPIN_US)
            return F.linear(x2.to(torch.bfloat16), w).to(out_dtype)
        y = torch.empty(m, self.out_features, dtype=out_dtype)
        lib = _q8_lib()
        fn = lib.mp_q8_matmul_i8 if self.act_i8 else lib.mp_q8_matmul
        fn(m, self.out_features, self.in_features, x2.data_ptr(), int(x2.dtype == torch.float32),
           self.qweight.data_ptr(), self.scales.data_ptr(), y.data_ptr(),
           int(out_dtype == torch.float32), torch.get_num_threads(), Q8_SPIN_US)
        return y

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x2 = x.reshape(-1, shape[-1])
        if x2.dtype not in (torch.float32, torch.bfloat16):
            x2 = x2.float()
        y = self.matmul(x2.contiguous())
        return y.to(x.dtype).reshape(*shape[:-1], self.out_features)


def cpu_q8_kernel(gq: GroupQuant) -> CpuQ8Kernel | None:
    """CpuQ8Kernel for a GGUF Q8_0 weight: by default (MODELPORT_Q8_CPU unset or =blocks)
    int8 dot products on x quantized per block, with =blocks_f32 on float32 x; or None
    (=rows, another format, or the C library cannot be built here: CpuInt8Kernel then)."""
    # read when the kernel is built (gguf_types.cpu_q8_mode, which the planner's byte counts
    # read too); session 32 on the 2-core box, one process, engines alternating: 90.8 vs
    # 76.3 tok/s single stream, 266.9 vs 244.7 at batch 32 against =rows
    how = cpu_q8_mode()
    if how is None:
        return None
    parts = q8_0_codes(gq)
    if parts is None:
        return None
    return CpuQ8Kernel(*parts, act_i8=how == "blocks") if _q8_lib() is not None else None


def _q8_lib():  # noqa: ANN202 - ctypes.CDLL | None
    """The C library (layers/cpu_kernels.py builds and caches it; None without a compiler)."""
    from modelport.layers.cpu_kernels import load_library

    return load_library()


def cpu_int8_fits(gq: GroupQuant) -> bool:
    return gq.bits <= 8


def cpu_int4_fits(gq: GroupQuant) -> bool:
    n, k = gq.shape
    return (gq.bits <= 4 and gq.group_size in CPU_INT4_GROUPS and k % gq.group_size == 0
            and n % 8 == 0 and k % 32 == 0)


def make_kernel(gq: GroupQuant, device: torch.device, *, allow_fast: bool = True) -> torch.nn.Module:
    """The fastest kernel for this weight on this device (see module docstring)."""
    device = torch.device(device)
    if allow_fast and device.type == "cpu":
        if gq.uniform_groups() and cpu_int4_fits(gq):
            return CpuInt4Kernel(gq)
        q8 = cpu_q8_kernel(gq)  # GGUF Q8_0: its block scales kept
        if q8 is not None:
            return q8
        if cpu_int8_fits(gq):  # any groups (act-order, 16-wide): requantized per row
            return CpuInt8Kernel(gq.dequantize(torch.float32))
    allow_fast = allow_fast and gq.uniform_groups()
    if allow_fast and device.type == "cuda":
        from modelport.quantization import triton_gemm

        if triton_gemm.available() and triton_gemm.fits(gq):
            return triton_gemm.TritonKernel(gq, device)
    return DequantKernel(gq).to(device)


def shard_group_quant(gq: GroupQuant, dim: int, index: torch.Tensor, what: str = "weight",
                      tp_size: int = 0) -> GroupQuant:
    """Output rows ``index`` (dim 0) or the contiguous input columns ``index`` (dim 1) of gq.

    Input slices must be whole groups or lie inside one group (which then becomes the slice's
    only group). With a g_idx (act-order) the columns and their group ids are cut together and
    each rank keeps the scales/zeros of the groups its columns reference.
    """
    index = index.to(gq.codes.device)
    if dim == 0:
        return GroupQuant(gq.codes[index].contiguous(), gq.scales[index].contiguous(),
                          gq.zeros[index].contiguous(), gq.group_size, gq.bits, gq.g_idx)
    if dim != 1:
        raise ValueError(f"shard_group_quant: dim must be 0 or 1, got {dim}")
    k0, part = int(index[0]), int(index.numel())
    k = gq.shape[1]
    if not torch.equal(index, torch.arange(k0, k0 + part, device=index.device)):
        raise ValueError("shard_group_quant: input columns must be a contiguous range")
    codes = gq.codes[:, k0 : k0 + part].contiguous()
    gs = gq.group_size
    if gq.g_idx is None:
        check_input_split(k, part, tp_size or max(1, k // part), gs, what)
        if part % gs == 0:
            g0, g1 = k0 // gs, (k0 + part) // gs
            return GroupQuant(codes, gq.scales[:, g0:g1].contiguous(),
                              gq.zeros[:, g0:g1].contiguous(), gs, gq.bits)
        g = k0 // gs  # the slice lies inside one group: that group, at the slice's width
        return GroupQuant(codes, gq.scales[:, g : g + 1].contiguous(),
                          gq.zeros[:, g : g + 1].contiguous(), part, gq.bits)
    return keep_used_groups(GroupQuant(codes, gq.scales, gq.zeros, gs, gq.bits,
                                       gq.g_idx[k0 : k0 + part]))


def keep_used_groups(gq: GroupQuant) -> GroupQuant:
    """An act-order slice of input columns (``g_idx``: their groups, numbered over the whole
    weight; scales / zeros: every group's) keeping only the groups it references, renumbered."""
    g_sl = gq.g_idx.long()
    used = torch.unique(g_sl)  # sorted
    local = torch.searchsorted(used, g_sl)
    scales = gq.scales[:, used].contiguous()
    zeros = gq.zeros[:, used].contiguous()
    part, gs = gq.shape[1], gq.group_size
    if part % gs == 0 and torch.equal(local, torch.arange(part, device=local.device) // gs):
        return GroupQuant(gq.codes, scales, zeros, gs, gq.bits)
    return GroupQuant(gq.codes, scales, zeros, gs, gq.bits, local)


class GroupQuantMethod(LinearMethod):
    """A format whose weights become one ``GroupQuant``: shared repack, shard and apply.

    Subclasses implement ``to_group_quant`` (checkpoint tensors -> canonical form, dropping
    the checkpoint parameters); a tensor-parallel slice recorded by ``shard`` is cut from the
    canonical form before ``make_kernel`` packs it.
    """

    format_name = "quantized"

    @abstractmethod
    def to_group_quant(self, layer: nn.Module, input_size: int) -> GroupQuant:
        """The layer's loaded weight as a GroupQuant; ``input_size`` is the unsharded K."""

    def group_size_for(self, input_size: int) -> int | None:
        """The group size along K when the format knows it before loading (early TP check)."""
        return None

    def shard(self, layer: nn.Module, spec: TPShard) -> None:
        if hasattr(layer, "qkernel"):
            raise ValueError(
                f"{self.format_name}: shard a quantized layer before its kernel is built "
                "(load_model(..., transform=...) shards between loading and repacking)"
            )
        if getattr(layer, "tp_cut", None) is not None:
            raise ValueError(f"{self.format_name}: layer is already sharded")
        self.check_split(layer, spec)
        layer.tp_cut = spec

    def check_split(self, layer: nn.Module, spec: TPShard) -> None:
        """Refuse a row-parallel slice that is not whole groups (nor inside one group)."""
        if spec.dim == 1:
            g = self.group_size_for(spec.input_size)
            if g is not None:
                check_input_split(spec.input_size, spec.length, spec.size, g,
                                  f"{self.format_name} {type(layer).__name__}")

    def process_weights_after_loading(self, layer: nn.Module) -> None:
        spec: TPShard | None = getattr(layer, "tp_cut", None)
        gq = self.to_group_quant(layer, spec.input_size if spec else int(layer.input_size))
        if spec is not None:
            gq = shard_group_quant(gq, spec.dim, spec.index,
                                   f"{self.format_name} {type(layer).__name__}", spec.size)
            layer.tp_cut = None
        if getattr(layer, "keep_for_stacking", False):  # MoE experts: FusedMoE.restack_experts
            layer.group_quant = gq
            return
        layer.qkernel = make_kernel(gq, layer.quant_device)

    def apply(self, layer: nn.Module, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        y = layer.qkernel(x)
        return y + bias if bias is not None else y
