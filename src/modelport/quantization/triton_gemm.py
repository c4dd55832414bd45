"""CUDA kernels (Triton) for every GroupQuant weight: W4A16 / W8A16 with group scales.

Layout (one stored copy, built at load time by ``pack_weight``):

* ``qweight`` int32 [N, K / per]: each output row's codes packed along K (8 codes of 4 bits,
  or 4 codes of 8 bits for 5-8-bit formats), rows contiguous. Codes are interleaved inside
  chunks of V words (V * per codes, never straddling a group): code j of word v holds input
  ``chunk_start + j * V + v``, so the activations that meet code j of a thread's V words are
  V contiguous values (one vector load per code position).
* ``sz`` int32 [N, K / group]: the group's fp16 scale (low half) and fp16 zero (high half);
  w = code * scale + zero.

Two kernels read it:

* ``gemv`` (1..GEMV_MAX_M rows, decode): no tl.dot, one launch writing the output in the
  activation dtype. A program owns BLOCK_N output rows and walks all of K (or one of SPLIT
  slices of it, the last slice to finish adding the others' partial sums); each thread
  reads 16 contiguous bytes per row per step. Dequantization never converts
  an integer: a code's bits are OR-ed into the mantissa of a float whose exponent makes it
  exactly ``C + code`` (C = 2048 / 128 for the two nibble positions, 32768 for bytes), so a
  code costs one LOP3 plus one FFMA; the per-group affine map and the C offset are applied
  per (row, chunk) from sums of the activations.
* ``gemm`` (up to DEQUANT_MIN_M rows): a [BLOCK_M, BLOCK_N] tile of y = x W^T over one
  slice of K (split-K, atomics into an fp32 buffer), expanding each packed word in registers
  and feeding tl.dot.
* ``dequant`` (more rows): the weight expanded once into a scratch [N, K] tensor of the
  activation dtype, then cuBLAS (the expansion's cost is a small part of a large GEMM).

Act-order weights are permuted to contiguous groups at load time and the activation columns
gathered with the same permutation.
"""

from __future__ import annotations

import functools
import os

import torch

from modelport.layers import pdl
from modelport.quantization.kernels import GroupQuant
from modelport.quantization.packing import pack_along

GEMV_MAX_M = 4  # rows of x served by the GEMV kernel; more rows go to the tl.dot GEMM
# From this many rows (prefill chunks, large decode batches) the weight is expanded to the
# activation dtype in a scratch tensor and multiplied by cuBLAS: the dequant-GEMM repeats
# the expansion for every BLOCK_M rows and loses to the tensor-core GEMM there
# (bench/quant_gpu_linear.py, format awq-w4-dequant, places the crossover)
DEQUANT_MIN_M = 256
DEQUANT_BLOCK_N = 64
CHUNK_WORDS = 4  # V: words per interleaved chunk (fewer when a group is smaller)
# fp32 bit patterns with exponent E and empty mantissa: code bits OR-ed in give 2**E * (1 + m)
MAG_2048 = 0x45000000  # 4-bit codes at mantissa bits 12..15 -> 2048 + code
MAG_128 = 0x43000000  # 4-bit codes at bits 16..19 -> 128 + code
MAG_32768 = 0x47000000  # 8-bit codes at bits 8..15 -> 32768 + code
MAG_2_23 = 0x4B000000  # codes at bits 0..7 -> 2**23 + code (GEMM dequant)
# The GEMM (5-255 rows) takes 128 columns of K a step when the group is smaller (several
# groups' scales a step) instead of one group: GGUF's blocks of 32 otherwise make 4x the
# steps, each a 32-deep dot. GGUF Q4_K at 64 rows on an H100 (session 24, `qd-env`): 16.13
# ms a decode step with one group a step, 13.66 with 128 columns. MODELPORT_W_GEMM_WIDE_K=0
# goes back to one group a step.
GEMM_WIDE_K = 0 if os.environ.get("MODELPORT_W_GEMM_WIDE_K") == "0" else 128
# One-row 4-bit GEMVs run triton_w4_half2 (packed f16x2 dequantization and products) where
# chunks are 4 words (groups of 32 codes or more): on an H200, W3 AWQ ITL 2.251 ms against
# 2.306 ms with the GEMV below (session 30; on an H100 2.561 vs 2.573 ms, session 29). Other
# row counts, 5-8-bit weights and groups of 16 keep the GEMV below;
# MODELPORT_W4_GEMV=default sends the one-row ones back to it too.
GEMV_HALF2 = os.environ.get("MODELPORT_W4_GEMV", "half2") == "half2"
# 4-bit weights in groups of a multiple of CODES_MIN_GROUP (the kernel's K steps, 64 or 128
# inputs, lie inside one group) under bf16 / fp16 activations: the
# 5..DEQUANT_MIN_M-row GEMM multiplies the raw codes on the tensor cores and applies each
# group's scale and zero to the partial products (triton_kernels.gemm_codes). Opt-in
# (MODELPORT_W4_GEMM=codes) until it is timed on a GPU; the default, affine, dequantizes
# every weight before tl.dot.
W4_GEMM = os.environ.get("MODELPORT_W4_GEMM", "affine")
CODES_MIN_GROUP = 64
# its variants, to be timed against each other (bench/quant_gpu_linear.py): the activations'
# sums over each 64 inputs computed by one small launch before the GEMM (codes_prep; the
# fewest instructions in the GEMM's loop offline) or inside every program
# (MODELPORT_W4_CODES_XSUM=0); and MODELPORT_W4_CODES_PAIR=1: one dot a K step on the (low,
# high) halves of each pair as adjacent inputs, x copied into that order by the same launch
CODES_XSUM = os.environ.get("MODELPORT_W4_CODES_XSUM", "1") == "1"
CODES_PAIR = os.environ.get("MODELPORT_W4_CODES_PAIR") == "1"
# bit patterns of two 16-bit floats C with an empty low mantissa: a nibble OR-ed into each
# half gives C + code exactly (bf16: C = 128; fp16: C = 1024)
CODES_MAGIC = {torch.bfloat16: (0x43004300, 128.0), torch.float16: (0x64006400, 1024.0)}


def uses_codes(bits: int, group: int, dtype: torch.dtype) -> bool:
    """Whether the 5..DEQUANT_MIN_M-row GEMM of this weight runs on raw codes (gemm_codes)."""
    return (W4_GEMM == "codes" and bits == 4 and group % CODES_MIN_GROUP == 0
            and dtype in CODES_MAGIC)


def uses_half2(bits: int, v: int, m: int) -> bool:
    """Whether a GEMV of m rows of bits-bit codes in chunks of v words runs the half2 kernel."""
    return GEMV_HALF2 and bits == 4 and v == 4 and m == 1


@functools.cache
def available() -> bool:
    if not torch.cuda.is_available():
        return False
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def layout(gq: GroupQuant) -> tuple[int, int, int]:
    """(packed bits, chunk words V, GEMM block_k) for this weight; ValueError if unsupported."""
    bits = 4 if gq.bits <= 4 else 8
    per = 32 // bits
    group = gq.group_size
    block_k = min(128, group)
    if group % block_k or block_k % per or block_k < 16:
        raise ValueError(f"Triton kernels: unsupported group size {group}")
    v = max(1, min(CHUNK_WORDS, group // per))
    return bits, v, block_k


def fits(gq: GroupQuant) -> bool:
    """Whether TritonKernel can hold this weight: its group size, and scales and zeros that
    fp16 keeps (finite; scales to 2**-10 relative, which excludes fp16-subnormal scales)."""
    try:
        layout(gq)
    except ValueError:
        return False
    s, z = gq.scales.float(), gq.zeros.float()
    if not (torch.isfinite(s.half()).all() and torch.isfinite(z.half()).all()):
        return False
    return bool(((s.half().float() - s).abs() <= s.abs() * 2**-10).all())


def pack_weight(codes: torch.Tensor, bits: int, v: int) -> torch.Tensor:
    """codes [N, K] -> int32 [N, K * bits / 32], chunk-interleaved (see module docstring)."""
    n, k = codes.shape
    per = 32 // bits
    c = codes.reshape(n, k // (v * per), per, v).transpose(-1, -2)  # [N, chunk, v, j]
    return pack_along(c.reshape(n, k), bits, dim=1)


def pack_scales(scales: torch.Tensor, zeros: torch.Tensor) -> torch.Tensor:
    """fp16 scale in the low half, fp16 zero in the high half of one int32 per group."""
    s = scales.to(torch.float16).contiguous().view(torch.int16).to(torch.int32) & 0xFFFF
    z = zeros.to(torch.float16).contiguous().view(torch.int16).to(torch.int32)
    return (s | (z << 16)).contiguous()


@functools.cache
def _kernels():  # noqa: ANN202 - imported lazily so importing this module never needs triton
    from modelport.quantization import triton_kernels

    return (triton_kernels.gemv, triton_kernels.gemm, triton_kernels.dequant,
            triton_kernels.gemm_codes, triton_kernels.codes_prep)


GEMV_MAX_SPLIT = 8  # bounds on the GEMV configs (triton_kernels.gemv_fits enforces them)
GEMV_MIN_BLOCK_N = 2  # that size the split-K scratch below


@functools.cache
def gemv_workspace(device: torch.device, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Split-K scratch shared by every GEMV of output width n on a device: fp32 partial sums
    [GEMV_MAX_SPLIT, GEMV_MAX_M, n] and one arrival counter per column tile, which each
    launch leaves at zero (launches on one stream never overlap)."""
    ws = torch.empty((GEMV_MAX_SPLIT * GEMV_MAX_M * n,), dtype=torch.float32, device=device)
    cnt = torch.zeros((triton_cdiv(n, GEMV_MIN_BLOCK_N),), dtype=torch.int32, device=device)
    return ws, cnt


_TUNED: set[tuple] = set()


class TritonKernel(torch.nn.Module):
    def __init__(self, gq: GroupQuant, device: torch.device) -> None:
        super().__init__()
        gq, perm = gq.contiguous_groups()
        n, k = gq.shape
        self.bits, self.v, self.block_k = layout(gq)
        self.group = gq.group_size
        self.n, self.k = n, k
        self.register_buffer("qweight", pack_weight(gq.codes, self.bits, self.v).to(device))
        self.register_buffer("sz", pack_scales(gq.scales, gq.zeros).to(device))
        self.register_buffer("perm", perm.to(device) if perm is not None else None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x2 = x.reshape(-1, self.k)
        if self.perm is not None:
            x2 = x2[:, self.perm]
        x2 = x2.contiguous()
        m = x2.shape[0]
        if m == 0:
            y = x2.new_zeros((0, self.n))
        elif m <= GEMV_MAX_M:
            y = self.gemv(x2)
        elif m >= DEQUANT_MIN_M:
            y = torch.nn.functional.linear(x2, self.dequantize(x2.dtype))
        else:
            y = self.gemm(x2)
        return y.reshape(*shape[:-1], self.n)

    def gemv(self, x2: torch.Tensor) -> torch.Tensor:
        """x2 [m <= GEMV_MAX_M, K] contiguous (already permuted) -> y [m, N] in x2.dtype."""
        m = x2.shape[0]
        y = torch.empty((m, self.n), dtype=x2.dtype, device=x2.device)
        if uses_half2(self.bits, self.v, m):
            from modelport.quantization.triton_w4_half2 import gemv_half2

            grid1 = lambda meta: (triton_cdiv(self.n, meta["BLOCK_N"]),)  # noqa: E731
            gemv_half2[grid1](x2, self.qweight, self.sz, y, self.n, K=self.k, GROUP=self.group,
                              ASM=True, **pdl.kernel_kwargs())
            return y
        mags = (MAG_2048, MAG_128) if self.bits == 4 else (MAG_32768, 0)
        grid = lambda meta: (triton_cdiv(self.n, meta["BLOCK_N"]), meta["SPLIT"])  # noqa: E731
        ws, cnt = gemv_workspace(x2.device, self.n)
        _kernels()[0][grid](x2, self.qweight, self.sz, y, ws, cnt, self.n, x2.stride(0),
                            y.stride(0), *mags, K=self.k, GROUP=self.group, BITS=self.bits,
                            V=self.v, BLOCK_M=m, **pdl.kernel_kwargs())
        return y

    def dequantize(self, dtype: torch.dtype) -> torch.Tensor:
        """The weight as [N, K] in dtype (K in the stored, group-contiguous order): a scratch
        tensor, one launch."""
        w = torch.empty((self.n, self.k), dtype=dtype, device=self.qweight.device)
        grid = (triton_cdiv(self.n, DEQUANT_BLOCK_N), self.k // self.block_k)
        _kernels()[2][grid](self.qweight, self.sz, w, self.n, K=self.k, GROUP=self.group,
                            BITS=self.bits, V=self.v, BLOCK_N=DEQUANT_BLOCK_N,
                            BLOCK_K=self.block_k, num_warps=4, **pdl.kernel_kwargs())
        return w

    def gemm(self, x2: torch.Tensor) -> torch.Tensor:
        if uses_codes(self.bits, self.group, x2.dtype):
            return self.gemm_codes(x2)
        return self.gemm_affine(x2)

    def gemm_codes(self, x2: torch.Tensor, xsum: bool = CODES_XSUM,
                   pair: bool = CODES_PAIR) -> torch.Tensor:
        """x2 [m, K] (bf16 / fp16, contiguous, already permuted) -> y [m, N]: tl.dot on the
        raw codes, scale and zero applied per group to the fp32 partial products. pair: one
        dot a K step on x copied into pair order (else two, on the pairs' low and high
        halves); the launch that copies it computes the sums too, so pair implies xsum."""
        m = x2.shape[0]
        xsum = xsum or pair
        y = torch.zeros((m, self.n), dtype=torch.float32, device=x2.device)
        bucket = 1 << max(0, (m - 1).bit_length())
        magic2, c = CODES_MAGIC[x2.dtype]
        x_in = x2
        xs = y  # a placeholder pointer unless the sums are computed before the launch
        if xsum:  # one launch: the sums over each 64 inputs (and x in pair order)
            xs = torch.empty((m, self.k // 64), dtype=torch.float32, device=x2.device)
            if pair:
                x_in = torch.empty_like(x2)
            _kernels()[4][(m, self.k // 64)](x2, x_in, xs, x2.stride(0), x_in.stride(0),
                                             xs.stride(0), HALF=4 * self.v, PAIR=pair)
        grid = lambda meta: (triton_cdiv(m, meta["BLOCK_M"]), triton_cdiv(self.n, meta["BLOCK_N"]),  # noqa: E731
                             meta["SPLIT_K"])
        args = (x_in, self.qweight, self.sz, y, xs, m, self.n, self.k, bucket, x_in.stride(0),
                self.qweight.stride(0), self.sz.stride(0), y.stride(0), xs.stride(0), magic2, c)
        gemm = _kernels()[3]
        meta = {"GROUP": self.group, "V": self.v, "PAIR": pair, "XSUM": xsum}
        gemm[grid](*args, **meta)
        key = ("codes", bucket, self.n, self.k, self.group, x2.dtype, xsum, pair)
        if key not in _TUNED:  # the first call autotuned: its sums may hold the trial runs
            _TUNED.add(key)
            y.zero_()
            gemm[grid](*args, **meta)
        return y.to(x2.dtype)

    def gemm_affine(self, x2: torch.Tensor) -> torch.Tensor:
        """x2 [m, K] -> y [m, N]: each weight dequantized (code * scale + zero) before tl.dot."""
        m = x2.shape[0]
        # fp32 accumulator: split-K programs add their partial sums into it atomically
        y = torch.zeros((m, self.n), dtype=torch.float32, device=x2.device)
        bucket = 1 << max(0, (m - 1).bit_length())  # autotune per power-of-two batch
        grid = lambda meta: (triton_cdiv(m, meta["BLOCK_M"]), triton_cdiv(self.n, meta["BLOCK_N"]),  # noqa: E731
                             meta["SPLIT_K"])
        args = (x2, self.qweight, self.sz, y, m, self.n, self.k, bucket, x2.stride(0),
                self.qweight.stride(0), self.sz.stride(0), y.stride(0), MAG_2_23)
        # launched plainly (no PDL): not yet checked on a GPU with it
        block_k = self.block_k
        if GEMM_WIDE_K > block_k and GEMM_WIDE_K % block_k == 0 and self.k % GEMM_WIDE_K == 0:
            block_k = GEMM_WIDE_K
        meta = {"GROUP": self.group, "BITS": self.bits, "V": self.v, "BLOCK_K": block_k}
        gemm = _kernels()[1]
        gemm[grid](*args, **meta)
        key = (bucket, self.n, self.k, self.bits, self.group, x2.dtype)
        if key not in _TUNED:  # the first call autotuned: its sums may hold the trial runs
            _TUNED.add(key)
            y.zero_()
            gemm[grid](*args, **meta)
        return y.to(x2.dtype)


def triton_cdiv(a: int, b: int) -> int:
    return (a + b - 1) // b
