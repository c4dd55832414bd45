"""CUDA kernels (Triton) for bitsandbytes NF4 weights, kept at 4 bits on the GPU.

Stored per layer (``nf4.NF4LinearMethod`` on CUDA):

* ``packed`` uint8 [N, K / 2]: two codes a byte, the first (even input column) in the high
  nibble: bitsandbytes' own byte order, row by row;
* ``absmax`` float32 [N, K / QB]: one scale per block of QB input columns;
* ``table`` float32 [16]: the NF4 code book. w[n, k] = table[code] * absmax[n, k // QB].

Four kernels read it:

* ``gemv`` (1..GEMV_MAX_M rows of 16-bit x: decode): a program owns GEMV_BLOCK_N output rows
  and walks all of K, NB quant blocks a step, 16 bytes of codes a thread. Each code is
  looked up in the 16-entry table (``tl.gather``: shared memory), multiplied by its
  activation in fp32, summed per quant block and scaled once per block by absmax.
* ``gemv_words`` (the same rows; the default, MODELPORT_NF4_GEMV=bytes runs ``gemv``): the
  codes read as int32 words, 8 codes a register, so a program holds far fewer registers
  and an SM more programs; x read as 16-bit pairs and split per byte of the word.
* ``gemm`` (below DEQUANT_MIN_M rows: batched decode): [BLOCK_M, GEMM_BLOCK_N] tiles of y on
  the tensor cores, each quant block of the weight expanded in registers as ``dequant`` does.
* ``dequant`` (more rows: prefill): the weight expanded to [N, K] in the activation dtype in
  a scratch tensor (table value x absmax in fp32, rounded once: ``expand``, which the GEMM
  shares), then cuBLAS.

Checked against the reference dequantization in the Triton interpreter; the GPU tests are in
tests/test_quant_gpu.py.
"""

from __future__ import annotations

import functools
import os

import torch
import torch.nn.functional as F

from modelport.quantization.triton_gemm import triton_cdiv

GEMV_MAX_M = 4  # rows of x served by the GEMV kernel; more rows: the GEMM, then dequant
# 8 rows a program, K across the threads (512 programs for N = 4,096). sm_90 SASS compiled
# offline, one row: ~250 warp-instructions per 1,000 weights (a first version with 32-row
# tiles along K and table loads from global memory: ~333), no register spills up to 4 rows
GEMV_BLOCK_N = 8
GEMV_STEP_BYTES = 8192
# GEMV_MAX_M < rows < DEQUANT_MIN_M (batched decode): tensor-core tiles with the weight
# expanded in registers, one quant block (<= GEMM_QB_MAX columns) a step; from
# DEQUANT_MIN_M rows (prefill) the weight is expanded once for cuBLAS (W4's crossover,
# triton_gemm.DEQUANT_MIN_M; NF4's own is not measured)
GEMM_BLOCK_N = 32  # 128 programs a 64-row tile at N = 4,096
GEMM_QB_MAX = 128
DEQUANT_MIN_M = 256
DEQUANT_BLOCK_N = 32
MAX_QB = 256  # widest quant block the kernels take in one tile (bnb's default is 64)


def fits(k: int, qb: int) -> bool:
    """Whether the kernels take this layout: a power-of-two quant block of 16..MAX_QB
    columns that divides K."""
    return 16 <= qb <= MAX_QB and qb & (qb - 1) == 0 and k % qb == 0


def pack_rows(codes: torch.Tensor) -> torch.Tensor:
    """codes uint8 [N, K] (K even) -> [N, K / 2], the even column in the high nibble."""
    c = codes.to(torch.uint8)
    return ((c[:, 0::2] << 4) | c[:, 1::2]).contiguous()


def _blocks_per_step(n_blocks: int, qb: int, block_n: int = GEMV_BLOCK_N,
                     step_bytes: int = GEMV_STEP_BYTES) -> int:
    """Quant blocks a GEMV step takes: a power of two dividing the row's count, at most 32
    and at most step_bytes bytes a step for block_n rows."""
    nb = 1
    while (nb * 2 <= 32 and n_blocks % (nb * 2) == 0
           and block_n * nb * 2 * qb // 2 <= step_bytes):
        nb *= 2
    return nb


@functools.cache
def _kernels():  # noqa: ANN202 - imported lazily so importing this module never needs triton
    from modelport.quantization import triton_nf4_kernels as k

    return k.gemv, k.dequant, k.gemm, k.gemv_words


# The GEMV reads the codes as int32 words (gemv_words) unless MODELPORT_NF4_GEMV=bytes. The
# byte GEMV compiles (offline, sm_90, one row, bench/gpu/kernel_regs.py nf4) to 233-235
# registers a thread: 2 programs an SM, 16 KB of codes in flight; the word GEMV's same 8 KB
# steps to 96-119: 4-5 programs, 32-40 KB in flight, and 10 % fewer instructions. NF4 decode
# at batch 1 on an H100 (session 24, `nf4-ab`): 5.111 ms a token with bytes, 3.877 with words.
GEMV_WORDS = os.environ.get("MODELPORT_NF4_GEMV", "words") == "words"
WORDS_BLOCK_N = 8
WORDS_STEP_BYTES = 8192
# The GEMM (5-255 rows) splits K until its grid has about GEMM_SPLIT_PROGRAMS programs
# (MODELPORT_NF4_GEMM_SPLIT=0: never). Unsplit, a 64-row batch through a 4,096-wide
# projection (o, down) is 128 programs for 132 SMs, one each. NF4 at 64 rows on an H100
# (session 24, `nf4-ab`, with the word GEMV): 17.00 ms a decode step unsplit, 15.44 split.
# Its atomic fp32 sums change the last bits from run to run, as the W4 GEMM's split-K does.
GEMM_SPLIT = os.environ.get("MODELPORT_NF4_GEMM_SPLIT") != "0"
GEMM_SPLIT_PROGRAMS = 4 * 132


def _words_fit(packed: torch.Tensor, k: int, qb: int) -> bool:
    return k % 8 == 0 and qb % 16 == 0 and packed.is_contiguous() and packed.storage_offset() % 4 == 0


def gemv(x2: torch.Tensor, packed: torch.Tensor, absmax: torch.Tensor,
         table: torch.Tensor) -> torch.Tensor:
    """x2 [m <= GEMV_MAX_M, K] contiguous, 16-bit -> y [m, N] in x2's dtype."""
    m, k = x2.shape
    n = packed.shape[0]
    qb = k // absmax.shape[1]
    if x2.storage_offset() % 2:  # the int32 view below needs 4-byte alignment
        x2 = x2.clone()
    xw = x2.view(torch.int32)
    y = torch.empty((m, n), dtype=x2.dtype, device=x2.device)
    if GEMV_WORDS and _words_fit(packed, k, qb):
        nb = _blocks_per_step(k // qb, qb, WORDS_BLOCK_N, WORDS_STEP_BYTES)
        _kernels()[3][(triton_cdiv(n, WORDS_BLOCK_N),)](
            xw, packed.view(torch.int32), absmax, table, y, n, xw.stride(0), y.stride(0), K=k,
            QB=qb, NB=nb, M=m, BLOCK_N=WORDS_BLOCK_N, num_warps=4)
        return y
    _kernels()[0][(triton_cdiv(n, GEMV_BLOCK_N),)](
        xw, packed, absmax, table, y, n, xw.stride(0), y.stride(0), K=k, QB=qb,
        NB=_blocks_per_step(k // qb, qb), M=m, MP=max(2, 1 << (m - 1).bit_length()),
        BLOCK_N=GEMV_BLOCK_N, num_warps=4,
    )  # fmt: skip
    return y


def dequantize(packed: torch.Tensor, absmax: torch.Tensor, table: torch.Tensor,
               dtype: torch.dtype) -> torch.Tensor:
    """The weight [N, K] in dtype: a scratch tensor, one launch."""
    n, k = packed.shape[0], packed.shape[1] * 2
    qb = k // absmax.shape[1]
    w = torch.empty((n, k), dtype=dtype, device=packed.device)
    _kernels()[1][(triton_cdiv(n, DEQUANT_BLOCK_N), k // qb)](
        packed, absmax, table, w, n, K=k, QB=qb, BLOCK_N=DEQUANT_BLOCK_N, num_warps=4)
    return w


def gemm_split(m_tiles: int, n_tiles: int, n_blocks: int) -> int:
    """K slices for the NF4 GEMM (1 with MODELPORT_NF4_GEMM_SPLIT=0): a power of two, at most 8,
    dividing the quant blocks of a row, until the grid has ~GEMM_SPLIT_PROGRAMS programs."""
    if not GEMM_SPLIT:
        return 1
    split = 1
    while (split < 8 and n_blocks % (split * 2) == 0
           and m_tiles * n_tiles * split < GEMM_SPLIT_PROGRAMS):
        split *= 2
    return split


def gemm(x2: torch.Tensor, packed: torch.Tensor, absmax: torch.Tensor,
         table: torch.Tensor) -> torch.Tensor:
    """x2 [m, K] (16-bit, unit stride along K) -> y [m, N]: tensor-core tiles, the weight
    expanded in registers (GEMM_MIN_M <= m < DEQUANT_MIN_M)."""
    m, k = x2.shape
    n = packed.shape[0]
    qb = k // absmax.shape[1]
    bm = min(64, max(16, 1 << (m - 1).bit_length()))
    grid = (triton_cdiv(m, bm), triton_cdiv(n, GEMM_BLOCK_N))
    split = gemm_split(grid[0], grid[1], k // qb)
    if split > 1:  # fp32 partial tiles added atomically, then rounded once
        y = torch.zeros((m, n), dtype=torch.float32, device=x2.device)
    else:
        y = torch.empty((m, n), dtype=x2.dtype, device=x2.device)
    _kernels()[2][(*grid, split)](
        x2, packed, absmax, table, y, m, n, x2.stride(0), y.stride(0), K=k, QB=qb,
        BLOCK_M=bm, BLOCK_N=GEMM_BLOCK_N, SPLIT_K=split, num_warps=4, num_stages=3,
    )  # fmt: skip
    return y.to(x2.dtype)


def linear(x: torch.Tensor, packed: torch.Tensor, absmax: torch.Tensor, table: torch.Tensor,
           bias: torch.Tensor | None) -> torch.Tensor:
    """y = x W^T + bias for an NF4 weight kept packed (see the module docstring)."""
    k = packed.shape[1] * 2
    x2 = x.reshape(-1, k)
    m = x2.shape[0]
    half = x.dtype in (torch.float16, torch.bfloat16)
    if m == 0:
        return x.new_empty(*x.shape[:-1], packed.shape[0])
    if half and m <= GEMV_MAX_M:
        y = gemv(x2.contiguous(), packed, absmax, table)
    elif half and m < DEQUANT_MIN_M and absmax.shape[1] * GEMM_QB_MAX >= k:
        y = gemm(x2.contiguous(), packed, absmax, table)
    else:
        return F.linear(x, dequantize(packed, absmax, table, x.dtype), bias)
    if bias is not None:
        y = y + bias
    return y.reshape(*x.shape[:-1], packed.shape[0])
