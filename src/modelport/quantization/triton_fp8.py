"""Triton kernels for FP8 (E4M3) linear layers on CUDA.

Kernels reading the one stored copy of the weight: float8_e4m3fn [N, K], row-major
(``torch._scaled_mm`` takes its ``.t()`` view as the column-major second operand, no copy):

* ``quantize_per_token``: dynamic per-token activation quantization in one launch. One
  program per row: amax over the row -> scale = max(amax * (1/448), 1e-12) -> x / scale
  clamped to +-448 and cast (round to nearest even) to E4M3; writes the FP8 rows and the fp32
  scales [M, 1] that ``_scaled_mm`` takes as ``scale_a``. Rows up to 16384 wide stay in
  registers (one read of x); wider rows take two passes.
* ``w8a16_linear``: y = x (W * scale)^T (+ bias) for bf16/fp16 x, weights upcast in registers,
  fp32 accumulation, the weight scale (per channel or per tensor) and the bias applied once per
  output, bf16/fp16 written directly. No activation quantization. For the decode rows of a
  step (few rows) this reads half the bytes of a bf16 GEMV and no FP8 GEMM tile is wasted on
  padding. Two shapes of program, chosen by autotuning per (row bucket, N, K):
  BLOCK_M == 1, a CUDA-core GEMV (one x row per program, BLOCK_N weight rows streamed along K
  into a [BLOCK_N, BLOCK_K] fp32 accumulator reduced once at the end); BLOCK_M >= 16, tensor
  cores with the operands swapped (W tile [BLOCK_N, BLOCK_K] x x^T tile [BLOCK_K, BLOCK_M]), so
  the many weight rows fill the MMA's M side and the few x rows its N side.
* ``w8a8_linear``: the FP8 tensor-core GEMM on the quantizer's output (per-token x per-channel
  scales and bias in the epilogue), same swapped orientation, autotuned per (row bucket, N,
  K): on an H200 faster than ``torch._scaled_mm`` up to ~128 rows, slower above (``fp8``'s
  dispatch thresholds cite the measurements).

Nothing here needs Triton at import time; the kernels are built on first use.
"""

from __future__ import annotations

import functools
import os

import torch

from modelport.layers import pdl
from modelport.quantization.triton_gemm import available  # noqa: F401 - one CUDA+Triton probe

FP8 = torch.float8_e4m3fn
ONE_PASS_MAX_K = 16384  # widest row the quantizer keeps in registers


def _next_pow2(n: int) -> int:
    return 1 << max(0, (n - 1).bit_length())


def _cdiv(a: int, b: int) -> int:
    return (a + b - 1) // b


@functools.cache
def _jit():  # noqa: ANN202 - built lazily so importing this module never needs triton
    import triton
    import triton.language as tl

    @triton.jit
    def quant_rows(
        x_ptr,
        q_ptr,
        s_ptr,
        K,
        stride_xm,
        stride_qm,
        BLOCK_K: tl.constexpr,
        ONE_PASS: tl.constexpr,
        PDL: tl.constexpr = False,
    ):
        pdl.wait(PDL)
        row = tl.program_id(0).to(tl.int64)
        x_row = x_ptr + row * stride_xm
        q_row = q_ptr + row * stride_qm
        offs = tl.arange(0, BLOCK_K)
        if ONE_PASS:
            x = tl.load(x_row + offs, mask=offs < K, other=0.0).to(tl.float32)
            amax = tl.max(tl.abs(x), axis=0)
        else:
            run = tl.zeros([BLOCK_K], dtype=tl.float32)
            for k0 in range(0, K, BLOCK_K):
                k = k0 + offs
                xk = tl.load(x_row + k, mask=k < K, other=0.0).to(tl.float32)
                run = tl.maximum(run, tl.abs(xk))
            amax = tl.max(run, axis=0)
        # E4M3 max 448; an all-zero row gets scale 1e-12 and codes 0. The scale is amax times
        # the fp32 reciprocal of 448, as fp8.quantize_fp8_per_token_torch computes it (a
        # multiply, not amax / 448: torch on CUDA turns a division by a Python scalar into that
        # multiply, on CPU it divides; a one-ulp difference in the scale moves x / scale off
        # the exact ties bf16 inputs often land on and flips codes). x / scale is correctly
        # rounded (Triton's plain fp32 `/` is approximate), as torch's tensor division is: the
        # scales and codes equal the torch reference's bit for bit; still memory-bound
        scale = tl.maximum(amax * (1.0 / 448.0), 1e-12)
        if ONE_PASS:
            q = tl.minimum(tl.maximum(tl.math.div_rn(x, scale), -448.0), 448.0)
            tl.store(q_row + offs, q.to(tl.float8e4nv), mask=offs < K)
        else:
            for k0 in range(0, K, BLOCK_K):
                k = k0 + offs
                xk = tl.load(x_row + k, mask=k < K, other=0.0).to(tl.float32)
                q = tl.minimum(tl.maximum(tl.math.div_rn(xk, scale), -448.0), 448.0)
                tl.store(q_row + k, q.to(tl.float8e4nv), mask=k < K)
        tl.store(s_ptr + row, scale)

    @triton.jit
    def w8a16(
        x_ptr,
        w_ptr,
        s_ptr,
        b_ptr,
        y_ptr,
        M,
        N,
        K,
        M_BUCKET,
        stride_xm,
        stride_wn,
        stride_ym,
        PER_CHANNEL: tl.constexpr,
        HAS_BIAS: tl.constexpr,
        BLOCK_M: tl.constexpr,
        BLOCK_N: tl.constexpr,
        BLOCK_K: tl.constexpr,
        PDL: tl.constexpr = False,
    ):
        # 1-D grid, row blocks fastest: the programs sharing a weight tile run side by side,
        # so a second x row block re-reads that tile from L2, not HBM
        pdl.wait(PDL)
        pid = tl.program_id(0)
        num_m = tl.cdiv(M, BLOCK_M)
        pid_m = pid % num_m
        pid_n = pid // num_m
        rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        rk = tl.arange(0, BLOCK_K)
        n_ok = rn < N
        w_rows = w_ptr + rn.to(tl.int64)[:, None] * stride_wn
        if PER_CHANNEL:
            scale = tl.load(s_ptr + rn, mask=n_ok, other=0.0)
        else:
            scale = tl.load(s_ptr)
        if BLOCK_M == 1:
            # CUDA-core GEMV: fp32 products accumulate per lane, one reduction at the end
            x_row = x_ptr + pid_m.to(tl.int64) * stride_xm
            acc = tl.zeros([BLOCK_N, BLOCK_K], dtype=tl.float32)
            for k0 in range(0, K, BLOCK_K):
                k = k0 + rk
                k_ok = k < K
                x = tl.load(x_row + k, mask=k_ok, other=0.0).to(tl.float32)
                w = tl.load(w_rows + k[None, :], mask=n_ok[:, None] & k_ok[None, :], other=0.0)
                acc += w.to(tl.float32) * x[None, :]
            out = tl.sum(acc, axis=1) * scale
            if HAS_BIAS:
                out += tl.load(b_ptr + rn, mask=n_ok, other=0.0).to(tl.float32)
            y_row = y_ptr + pid_m.to(tl.int64) * stride_ym
            tl.store(y_row + rn, out.to(y_ptr.dtype.element_ty), mask=n_ok)
        else:
            # tensor cores, operands swapped: acc[n, m] = sum_k W[n, k] x[m, k]
            rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
            m_ok = rm < M
            x_cols = x_ptr + rm.to(tl.int64)[None, :] * stride_xm
            acc = tl.zeros([BLOCK_N, BLOCK_M], dtype=tl.float32)
            for k0 in range(0, K, BLOCK_K):
                k = k0 + rk
                k_ok = k < K
                w = tl.load(w_rows + k[None, :], mask=n_ok[:, None] & k_ok[None, :], other=0.0)
                xt = tl.load(x_cols + k[:, None], mask=m_ok[None, :] & k_ok[:, None], other=0.0)
                acc = tl.dot(w.to(xt.dtype), xt, acc)
            if PER_CHANNEL:
                acc = acc * scale[:, None]
            else:
                acc = acc * scale
            if HAS_BIAS:
                acc += tl.load(b_ptr + rn, mask=n_ok, other=0.0).to(tl.float32)[:, None]
            y_ptrs = y_ptr + rm.to(tl.int64)[None, :] * stride_ym + rn[:, None]
            tl.store(y_ptrs, acc.to(y_ptr.dtype.element_ty), mask=m_ok[None, :] & n_ok[:, None])

    @triton.jit
    def w8a8(
        xq_ptr,
        xs_ptr,
        w_ptr,
        ws_ptr,
        b_ptr,
        y_ptr,
        part_ptr,
        cnt_ptr,
        M,
        N,
        K,
        M_BUCKET,
        SPLIT_OK,
        stride_xm,
        stride_wn,
        stride_ym,
        PER_CHANNEL: tl.constexpr,
        HAS_BIAS: tl.constexpr,
        BLOCK_M: tl.constexpr,
        BLOCK_N: tl.constexpr,
        BLOCK_K: tl.constexpr,
        SPLIT_K: tl.constexpr = 1,
        PDL: tl.constexpr = False,
    ):
        # FP8 x FP8 on the tensor cores, operands swapped as in w8a16 (both K-major, as FP8
        # wgmma wants them); row blocks fastest, so a weight tile is fetched from HBM once.
        # SPLIT_K > 1 (grid axis 1): each slice of K stores its fp32 partial tile in part_ptr
        # [SPLIT_K, M, N] and bumps the tile's counter; the slice that arrives last adds the
        # partials in slice order (the same bits whichever finishes last), applies the scales
        # and bias, writes y and resets the counter for the next launch or graph replay.
        # SPLIT_OK (1: the scratch was passed) only keys the autotuning (see w8a8_linear).
        pid = tl.program_id(0)
        num_m = tl.cdiv(M, BLOCK_M)
        pid_m = pid % num_m
        pid_n = pid // num_m
        rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        rk = tl.arange(0, BLOCK_K)
        n_ok = rn < N
        m_ok = rm < M
        mn_ok = m_ok[None, :] & n_ok[:, None]
        if SPLIT_K == 1:
            k_lo = 0
            k_hi = K
        else:  # slices of whole BLOCK_K steps (only the last one may end inside a step)
            k_len = tl.cdiv(tl.cdiv(K, SPLIT_K), BLOCK_K) * BLOCK_K
            k_lo = tl.program_id(1) * k_len
            k_hi = tl.minimum(k_lo + k_len, K)
        w_rows = w_ptr + rn.to(tl.int64)[:, None] * stride_wn
        x_cols = xq_ptr + rm.to(tl.int64)[None, :] * stride_xm
        acc = tl.zeros([BLOCK_N, BLOCK_M], dtype=tl.float32)
        pdl.wait(PDL)  # the activations (and the shared split scratch) come after the wait
        for k0 in range(k_lo, k_hi, BLOCK_K):
            k = k0 + rk
            k_ok = k < K
            w = tl.load(w_rows + k[None, :], mask=n_ok[:, None] & k_ok[None, :], other=0.0)
            xt = tl.load(x_cols + k[:, None], mask=m_ok[None, :] & k_ok[:, None], other=0.0)
            acc = tl.dot(w, xt, acc)
        out_ok = mn_ok
        if SPLIT_K > 1:
            tile = rm.to(tl.int64)[None, :] * N + rn[:, None]
            tl.store(part_ptr + tl.program_id(1).to(tl.int64) * M * N + tile, acc, mask=mn_ok)
            tl.debug_barrier()  # every thread's partials are written before the release below
            last = tl.atomic_add(cnt_ptr + pid, 1, sem="acq_rel") == SPLIT_K - 1
            if last:
                acc = tl.zeros([BLOCK_N, BLOCK_M], dtype=tl.float32)
                for sp in tl.static_range(SPLIT_K):
                    acc += tl.load(part_ptr + sp * M * N + tile, mask=mn_ok, other=0.0,
                                   cache_modifier=".cg")
                tl.atomic_xchg(cnt_ptr + pid, 0, sem="relaxed")
            out_ok = mn_ok & last
        xs = tl.load(xs_ptr + rm, mask=m_ok, other=0.0)
        if PER_CHANNEL:
            ws = tl.load(ws_ptr + rn, mask=n_ok, other=0.0)
            acc = acc * ws[:, None] * xs[None, :]
        else:
            acc = acc * tl.load(ws_ptr) * xs[None, :]
        if HAS_BIAS:
            acc += tl.load(b_ptr + rn, mask=n_ok, other=0.0).to(tl.float32)[:, None]
        y_ptrs = y_ptr + rm.to(tl.int64)[None, :] * stride_ym + rn[:, None]
        tl.store(y_ptrs, acc.to(y_ptr.dtype.element_ty), mask=out_ok)

    return quant_rows, w8a16, w8a8


# (BLOCK_M, BLOCK_N, BLOCK_K, num_warps, num_stages). BLOCK_M == 1: GEMV programs, one x row
# each (tried up to 4 rows); BLOCK_M >= 16: swapped-operand tensor-core tiles. Small BLOCK_N
# keeps >= 1 program per SM on the N=4096 layers without split-K (no atomics, no zeroing).
W8A16_CONFIGS = (
    (1, 4, 512, 4, 2),
    (1, 4, 1024, 4, 2),
    (1, 8, 512, 4, 2),
    (1, 8, 1024, 8, 2),
    (1, 16, 256, 4, 2),
    (1, 16, 512, 8, 2),
    (1, 2, 2048, 8, 2),
    (1, 4, 2048, 8, 2),
    (16, 16, 256, 4, 4),
    (16, 32, 128, 4, 4),
    (16, 32, 256, 4, 4),
    (16, 64, 128, 4, 4),
    (16, 64, 256, 4, 3),
    (16, 128, 128, 8, 3),
    (32, 32, 128, 4, 4),
    (32, 64, 128, 4, 4),
    (32, 128, 128, 8, 3),
    (64, 64, 128, 4, 4),
    (64, 128, 128, 8, 3),
)


# FP8 x FP8 (fused-quantized activations): the same swapped orientation; BLOCK_N is the
# wgmma M side (64 per warpgroup), BLOCK_M its N side (16..256). (BLOCK_M, BLOCK_N, BLOCK_K,
# num_warps, num_stages, SPLIT_K).
W8A8_CONFIGS = (
    (16, 64, 128, 4, 5, 1),
    (16, 128, 128, 4, 4, 1),
    (32, 64, 128, 4, 5, 1),
    (32, 128, 128, 4, 4, 1),
    (64, 64, 128, 4, 4, 1),
    (64, 128, 128, 4, 4, 1),
    (64, 128, 128, 8, 4, 1),
    (128, 128, 128, 8, 4, 1),
    (128, 256, 128, 8, 3, 1),
    (256, 128, 128, 8, 3, 1),
    # 256 rows (a full W1 decode batch): 64 weight rows a program, so N = 4,096 gives 128 /
    # 64 programs (128-row weight tiles: 32 on 132 SMs)
    (128, 64, 128, 4, 4, 1),
    (256, 64, 128, 4, 3, 1),
    # split-K (MODELPORT_FP8_SPLIT_K): the narrow layers of a decode step (q/k/v, o, down of
    # an 8B model: N <= 6,144) give 32-96 weight tiles, one program each, too few to keep
    # 132 SMs' loads in flight; 2-4 K slices a tile multiply the programs
    (16, 64, 128, 4, 5, 2),
    (16, 64, 128, 4, 5, 4),
    (32, 64, 128, 4, 5, 2),
    (32, 64, 128, 4, 5, 4),
    (64, 64, 128, 4, 4, 2),
    (64, 64, 128, 4, 4, 4),
    (64, 128, 128, 4, 4, 2),
    (128, 64, 128, 4, 4, 2),
    (128, 64, 128, 4, 4, 4),
    (128, 128, 128, 8, 4, 2),
    (256, 64, 128, 8, 3, 2),
)
# split-K serves at most this many rows and output columns (its fp32 scratch, kept per
# device and N, is SPLIT_K_MAX x SPLIT_MAX_M x N: 25 MiB at N = 6,144); wider layers have
# weight tiles enough
SPLIT_K_MAX = 4
SPLIT_MAX_M = 256
SPLIT_MAX_N = 8192
SPLIT_K = os.environ.get("MODELPORT_FP8_SPLIT_K", "0") != "0"
# the W8A8 GEMM with programmatic dependent launch (opt-in until measured on a GPU)
W8A8_PDL = os.environ.get("MODELPORT_FP8_W8A8_PDL", "0") != "0"


def _w8a8_block_ms(m_bucket: int) -> tuple[int, ...]:
    if m_bucket <= 16:
        return (16,)
    if m_bucket <= 32:
        return (16, 32)
    if m_bucket <= 64:
        return (32, 64)
    if m_bucket <= 128:
        return (64, 128)
    if m_bucket <= 256:
        return (64, 128, 256)
    return (128, 256)


def _block_ms(m_bucket: int) -> tuple[int, ...]:
    """Program row counts worth trying for a power-of-two row bucket."""
    if m_bucket <= 4:
        return (1, 16)
    if m_bucket <= 16:
        return (16,)
    if m_bucket <= 32:
        return (16, 32)
    return (32, 64)


@functools.cache
def _w8a16_tuned():  # noqa: ANN202
    import triton

    configs = [
        triton.Config({"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk}, num_warps=w, num_stages=st)
        for bm, bn, bk, w, st in W8A16_CONFIGS
    ]

    def prune(configs, named_args, **kwargs):  # noqa: ANN001, ANN202
        keep = _block_ms(named_args["M_BUCKET"])
        return [c for c in configs if c.kwargs["BLOCK_M"] in keep]

    return triton.autotune(
        configs=configs,
        key=["M_BUCKET", "N", "K"],
        prune_configs_by={"early_config_prune": prune},
        cache_results=True,
    )(_jit()[1])


@functools.cache
def _w8a8_tuned():  # noqa: ANN202
    import triton

    configs = [
        triton.Config({"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk, "SPLIT_K": sk},
                      num_warps=w, num_stages=st)
        for bm, bn, bk, w, st, sk in W8A8_CONFIGS
    ]

    def prune(configs, named_args, **kwargs):  # noqa: ANN001, ANN202
        keep = _w8a8_block_ms(named_args["M_BUCKET"])
        split = named_args["SPLIT_OK"]
        return [c for c in configs
                if c.kwargs["BLOCK_M"] in keep and (c.kwargs["SPLIT_K"] == 1 or split)]

    return triton.autotune(
        configs=configs,
        key=["M_BUCKET", "N", "K", "SPLIT_OK"],
        prune_configs_by={"early_config_prune": prune},
        cache_results=True,
    )(_jit()[2])


def split_fits(m_bucket: int, n: int) -> bool:
    """Whether an output of n columns and m_bucket rows (a power of two) may take the split-K
    configs (and so needs their scratch)."""
    return SPLIT_K and m_bucket <= SPLIT_MAX_M and n <= SPLIT_MAX_N


@functools.cache
def split_scratch(device: torch.device, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Split-K scratch shared by every W8A8 GEMM of output width n on a device: fp32 partial
    tiles [SPLIT_K_MAX, SPLIT_MAX_M, n] and one arrival counter per output tile, which each
    launch leaves at zero (launches on one stream never overlap). Made on the first eager
    call, so never inside a CUDA-graph capture (the graphs run each batch eagerly first)."""
    part = torch.empty((SPLIT_K_MAX * SPLIT_MAX_M * n,), dtype=torch.float32, device=device)
    cnt = torch.zeros((_cdiv(SPLIT_MAX_M, 16) * _cdiv(n, 64),), dtype=torch.int32, device=device)
    return part, cnt


@functools.cache
def _no_scratch(device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    return (torch.empty((1,), dtype=torch.float32, device=device),
            torch.zeros((1,), dtype=torch.int32, device=device))


def quantize_per_token(x2: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """x2 [M, K] (last dim contiguous) -> (E4M3 [M, K], fp32 scales [M, 1]), one launch."""
    m, k = x2.shape
    xq = torch.empty((m, k), dtype=FP8, device=x2.device)
    scale = torch.empty((m, 1), dtype=torch.float32, device=x2.device)
    if m == 0:
        return xq, scale
    block = _next_pow2(k)
    one_pass = block <= ONE_PASS_MAX_K
    if not one_pass:
        block = 4096
    warps = max(1, min(16, block // 1024))
    _jit()[0][(m,)](
        x2, xq, scale, k, x2.stride(0), xq.stride(0), BLOCK_K=block, ONE_PASS=one_pass,
        num_warps=warps, **pdl.kernel_kwargs(),
    )  # fmt: skip
    return xq, scale


def w8a16_linear(
    x2: torch.Tensor, w: torch.Tensor, w_scale: torch.Tensor, bias: torch.Tensor | None
) -> torch.Tensor:
    """x2 [M, K] bf16/fp16 (last dim contiguous) x FP8 w [N, K] -> [M, N] in x2's dtype."""
    m, k = x2.shape
    n = w.shape[0]
    y = torch.empty((m, n), dtype=x2.dtype, device=x2.device)
    if m == 0:
        return y
    bucket = _next_pow2(m)  # autotuned per power-of-two row count

    def grid(meta):  # noqa: ANN001, ANN202
        return (_cdiv(m, meta["BLOCK_M"]) * _cdiv(n, meta["BLOCK_N"]),)

    _w8a16_tuned()[grid](
        x2, w, w_scale, bias if bias is not None else w_scale, y, m, n, k, bucket,
        x2.stride(0), w.stride(0), y.stride(0),
        PER_CHANNEL=w_scale.numel() != 1, HAS_BIAS=bias is not None,
        **pdl.kernel_kwargs(),
    )  # fmt: skip
    return y


def w8a8_linear(
    xq: torch.Tensor,
    x_scale: torch.Tensor,
    w: torch.Tensor,
    w_scale: torch.Tensor,
    bias: torch.Tensor | None,
    out_dtype: torch.dtype,
) -> torch.Tensor:
    """E4M3 xq [M, K] with fp32 row scales [M, 1] x E4M3 w [N, K] -> [M, N] out_dtype."""
    m, k = xq.shape
    n = w.shape[0]
    y = torch.empty((m, n), dtype=out_dtype, device=xq.device)
    if m == 0:
        return y

    def grid(meta):  # noqa: ANN001, ANN202
        return (_cdiv(m, meta["BLOCK_M"]) * _cdiv(n, meta["BLOCK_N"]), meta["SPLIT_K"])

    # the split configs' scratch where they may run; the switch is part of the tuning key, so
    # a best config found with it on is never replayed without the scratch
    bucket = _next_pow2(m)
    split_ok = split_fits(bucket, n)
    part, cnt = split_scratch(xq.device, n) if split_ok else _no_scratch(xq.device)
    _w8a8_tuned()[grid](
        xq, x_scale, w, w_scale, bias if bias is not None else w_scale, y, part, cnt, m, n, k,
        bucket, int(split_ok), xq.stride(0), w.stride(0), y.stride(0),
        PER_CHANNEL=w_scale.numel() != 1, HAS_BIAS=bias is not None,
        **(pdl.kernel_kwargs() if W8A8_PDL else {}),
    )  # fmt: skip
    return y
