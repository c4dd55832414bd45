"""Triton source of the quantized-weight kernels; see triton_gemm for the layout and the math.

Imported only when a CUDA weight is built (importing it needs triton).
"""

import triton
import triton.language as tl

from modelport.layers import pdl
from modelport.quantization.triton_gemm import GEMV_MAX_SPLIT, GEMV_MIN_BLOCK_N


@triton.jit
def magic(words, j: tl.constexpr, BITS: tl.constexpr, mag_a, mag_b):
    # code j of each (uint32) word as an exact fp32 C + code, one LOP3 per code; the word
    # is shifted once per pair of codes (none for the pair in place, a rotate for the ends)
    if BITS == 4:
        # nibble j sits at bits 4j: (3, 4) in place, (1, 2) << 8, (5, 6) >> 8, (7, 0) rot 16
        if j == 0 or j == 7:
            t = (words << 16) | (words >> 16)
        elif j == 1 or j == 2:
            t = words << 8
        elif j == 5 or j == 6:
            t = words >> 8
        else:
            t = words
        if j % 2 == 1:
            return ((t & 0xF000) | mag_a).to(tl.float32, bitcast=True)  # 2048 + code
        else:
            return ((t & 0xF0000) | mag_b).to(tl.float32, bitcast=True)  # 128 + code
    else:
        # byte j sits at bits 8j -> bits 8..15: byte 1 in place
        if j == 0:
            t = words << 8
        elif j == 2:
            t = words >> 8
        elif j == 3:
            t = (words << 16) | (words >> 16)
        else:
            t = words
        return ((t & 0xFF00) | mag_a).to(tl.float32, bitcast=True)  # 32768 + code

@triton.jit
def row_part(x_ptr, wk, xoff, wmask, EVEN_K: tl.constexpr, words, s, z, mag_a, mag_b,
             BITS: tl.constexpr, PER: tl.constexpr, V: tl.constexpr, NV: tl.constexpr,
             BLOCK_N: tl.constexpr):
    # one activation row against a [BLOCK_W, BLOCK_N] tile of words -> [NV, BLOCK_N]
    for j in tl.static_range(PER):
        f = magic(words, j, BITS, mag_a, mag_b)
        if EVEN_K:
            x = tl.load(x_ptr + wk * PER + j * V + xoff).to(tl.float32)
        else:
            x = tl.load(x_ptr + wk * PER + j * V + xoff, mask=wmask, other=0.0).to(tl.float32)
        # xa sums x over codes with C = 2048 (4-bit odd j) or 32768 (8-bit); xb: C = 128
        if j == 0:
            p = f * x
            if BITS == 4:
                xb = x
            else:
                xa = x
        elif j == 1:
            p += f * x
            if BITS == 4:
                xa = x
            else:
                xb = x
        elif BITS == 4 and j % 2 == 0:
            p += f * x
            xb += x
        else:
            p += f * x
            xa += x
    pc = tl.sum(tl.reshape(p, (NV, V, BLOCK_N)), 1)
    sa = tl.sum(tl.reshape(xa, (NV, V, 1)), 1)
    sb = tl.sum(tl.reshape(xb, (NV, V, 1)), 1)
    # sum(code * x) = pc - sum(C * x); w = code * s + z
    if BITS == 4:
        return s * (pc - (sa * 2048.0 + sb * 128.0)) + z * (sa + sb)
    else:
        sa += sb
        return s * (pc - sa * 32768.0) + z * sa


# (BLOCK_N, num_warps, words per thread / 4, PREFETCH, SPLIT[, register cap]). The first
# five are the fastest at one row on the Llama-3.1-8B shapes (bench/gpu/w4_gemv_sweep.py,
# H200, bench/results/2026-12-04-h200-w4-gemv-sweep.jsonl: qkv/gate_up 16x4w, o 16x4w
# prefetch, down 8x2w / 4x2w prefetch); the next five serve 2-4 rows (fewer columns a
# program: registers) and short-N shapes (a tensor-parallel shard), where K slices add
# loads in flight. The last two are the 16x4w tiles capped at 168 registers a thread:
# uncapped they compile (offline, sm_90, K = 4,096, one row) to 255, two programs (8 warps)
# an SM; at 168 to no spill and three programs. The autotuner keeps them only where they
# time faster (not yet timed on a GPU; at K = 14,336 they spill 600 bytes a thread).
gemv_configs = [
    triton.Config({"BLOCK_N": bn, "BLOCK_W": 128 * w * r, "PREFETCH": pf, "SPLIT": sp},
                  num_warps=w, num_stages=1, maxnreg=cap[0] if cap else None)
    for bn, w, r, pf, sp, *cap in ((16, 4, 1, False, 1), (16, 4, 1, True, 1), (8, 2, 1, True, 1),
                                   (4, 2, 1, True, 1), (8, 1, 1, True, 1), (4, 2, 1, False, 1),
                                   (4, 4, 1, False, 1), (8, 2, 1, False, 1), (8, 4, 1, False, 1),
                                   (16, 2, 1, False, 2), (16, 4, 1, False, 1, 168),
                                   (16, 4, 1, True, 1, 168))
]


def gemv_fits(bn: int, bw: int, warps: int, split: int, block_m: int, k: int,
              bits: int) -> bool:
    """Whether a (BLOCK_N, BLOCK_W, num_warps, SPLIT) tile suits BLOCK_M rows of x and K
    (and the split-K scratch that ``triton_gemm.gemv_workspace`` sizes)."""
    if split > GEMV_MAX_SPLIT or bn < GEMV_MIN_BLOCK_N:
        return False
    words_per_thread = bw // (32 * warps)
    if bn * block_m * words_per_thread > 64:  # registers: a thread's partial sums, all rows
        return False
    kw = k * bits // 32
    return split == 1 or kw % (split * bw) == 0


def gemv_prune(configs, named_args, **kwargs):  # noqa: ANN001, ANN202
    m, k, bits = kwargs["BLOCK_M"], kwargs.get("K", 0), kwargs.get("BITS", 4)
    keep = [c for c in configs
            if gemv_fits(c.kwargs["BLOCK_N"], c.kwargs["BLOCK_W"], c.num_warps,
                         c.kwargs["SPLIT"], m, k, bits)]
    return keep or configs[:1]


# Tiles are [words, rows]: Triton orders dims of equal contiguity first-fastest, so with
# the word dim first, and BLOCK_W = 128 * num_warps (16 bytes per thread along K, every
# warp along K), the weight, scale and activation loads all land in one thread layout and
# no tile ever goes through shared memory.
#
# SPLIT > 1 cuts K into SPLIT slices (grid axis 1) so that short-N shapes put enough loads
# in flight; still one launch: each slice stores its fp32 partial sums in ws_ptr
# [SPLIT, BLOCK_M, N], bumps its column tile's counter in cnt_ptr, and the slice that
# arrives last adds the partials in slice order (the same bits whichever finishes last),
# writes y and resets the counter to 0 for the next launch (and the next CUDA-graph replay).
@triton.jit
def gemv_tile(w_cols, sz_cols, wk, rw, rc, nmask, KW: tl.constexpr, PER: tl.constexpr,
              CH: tl.constexpr, GROUP: tl.constexpr, V: tl.constexpr, EVEN: tl.constexpr):
    # the [BLOCK_W, BLOCK_N] words from word wk on, and their [NV, BLOCK_N] scale/zero pairs
    if EVEN:
        words = tl.load(w_cols + wk)
        sz = tl.load(sz_cols + ((wk * PER + rc * CH) // GROUP)[:, None])
    else:
        words = tl.load(w_cols + wk, mask=((wk + rw) < KW)[:, None] & nmask[None, :], other=0)
        cmask = (wk + rc * V) < KW
        sz = tl.load(sz_cols + ((wk * PER + rc * CH) // GROUP)[:, None],
                     mask=cmask[:, None] & nmask[None, :], other=0)
    return words, sz


@triton.jit
def gemv_kernel(x_ptr, w_ptr, sz_ptr, y_ptr, ws_ptr, cnt_ptr, N, stride_xm, stride_ym,
                mag_a, mag_b,
                K: tl.constexpr, GROUP: tl.constexpr, BITS: tl.constexpr, V: tl.constexpr,
                BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_W: tl.constexpr,
                PREFETCH: tl.constexpr, EVEN_N: tl.constexpr, SPLIT: tl.constexpr,
                PDL: tl.constexpr = False):
    PER: tl.constexpr = 32 // BITS
    CH: tl.constexpr = V * PER
    NV: tl.constexpr = BLOCK_W // V
    KW: tl.constexpr = K // PER
    KS: tl.constexpr = KW // SPLIT  # words of K per slice (SPLIT > 1: a multiple of BLOCK_W)
    NG: tl.constexpr = K // GROUP
    EVEN_K: tl.constexpr = KS % BLOCK_W == 0
    EVEN: tl.constexpr = EVEN_K and EVEN_N
    PF: tl.constexpr = PREFETCH and EVEN and KS > BLOCK_W
    # the first step's tile is loaded before the PDL wait (weights: no kernel writes them)
    # when registers hold it anyway: prefetching, or a slice that is one step long
    PRE: tl.constexpr = PF or KS <= BLOCK_W
    pid = tl.program_id(0)
    k_lo = tl.program_id(1) * KS
    rn = pid * BLOCK_N + tl.arange(0, BLOCK_N)
    nmask = rn < N
    rw = tl.arange(0, BLOCK_W)
    rc = tl.arange(0, NV)
    xoff = ((rw // V) * CH + rw % V)[:, None]
    w_cols = w_ptr + rw[:, None] + rn[None, :] * KW
    sz_cols = sz_ptr + rn[None, :] * NG
    acc0 = tl.zeros([NV, BLOCK_N], dtype=tl.float32)
    if BLOCK_M > 1:
        acc1 = tl.zeros([NV, BLOCK_N], dtype=tl.float32)
    if BLOCK_M > 2:
        acc2 = tl.zeros([NV, BLOCK_N], dtype=tl.float32)
    if BLOCK_M > 3:
        acc3 = tl.zeros([NV, BLOCK_N], dtype=tl.float32)
    if PRE:  # registers double-buffer the next step's weights and scales
        words_n, sz_n = gemv_tile(w_cols, sz_cols, k_lo, rw, rc, nmask, KW, PER, CH, GROUP, V,
                                  EVEN)
    pdl.wait(PDL)
    for step in range(0, KS, BLOCK_W):
        wk = k_lo + step
        wmask = ((wk + rw) < KW)[:, None]
        if PRE:
            words = words_n
            sz = sz_n
            if PF:
                nk = tl.minimum(wk + BLOCK_W, k_lo + KS - BLOCK_W)  # the last step reloads itself
                words_n, sz_n = gemv_tile(w_cols, sz_cols, nk, rw, rc, nmask, KW, PER, CH,
                                          GROUP, V, EVEN)
        else:
            words, sz = gemv_tile(w_cols, sz_cols, wk, rw, rc, nmask, KW, PER, CH, GROUP, V,
                                  EVEN)
        words = words.to(tl.uint32, bitcast=True)  # logical shifts: a rotate is one SHF
        s = sz.to(tl.int16).to(tl.float16, bitcast=True).to(tl.float32)
        z = (sz >> 16).to(tl.int16).to(tl.float16, bitcast=True).to(tl.float32)
        acc0 += row_part(x_ptr, wk, xoff, wmask, EVEN_K, words, s, z, mag_a, mag_b,
                         BITS, PER, V, NV, BLOCK_N)
        if BLOCK_M > 1:
            acc1 += row_part(x_ptr + stride_xm, wk, xoff, wmask, EVEN_K, words, s, z,
                             mag_a, mag_b, BITS, PER, V, NV, BLOCK_N)
        if BLOCK_M > 2:
            acc2 += row_part(x_ptr + 2 * stride_xm, wk, xoff, wmask, EVEN_K, words, s, z,
                             mag_a, mag_b, BITS, PER, V, NV, BLOCK_N)
        if BLOCK_M > 3:
            acc3 += row_part(x_ptr + 3 * stride_xm, wk, xoff, wmask, EVEN_K, words, s, z,
                             mag_a, mag_b, BITS, PER, V, NV, BLOCK_N)
    ty = y_ptr.dtype.element_ty
    if SPLIT == 1:
        out = y_ptr + rn
        tl.store(out, tl.sum(acc0, 0).to(ty), mask=nmask)
        if BLOCK_M > 1:
            tl.store(out + stride_ym, tl.sum(acc1, 0).to(ty), mask=nmask)
        if BLOCK_M > 2:
            tl.store(out + 2 * stride_ym, tl.sum(acc2, 0).to(ty), mask=nmask)
        if BLOCK_M > 3:
            tl.store(out + 3 * stride_ym, tl.sum(acc3, 0).to(ty), mask=nmask)
    else:
        part = ws_ptr + tl.program_id(1) * (BLOCK_M * N) + rn
        tl.store(part, tl.sum(acc0, 0), mask=nmask)
        if BLOCK_M > 1:
            tl.store(part + N, tl.sum(acc1, 0), mask=nmask)
        if BLOCK_M > 2:
            tl.store(part + 2 * N, tl.sum(acc2, 0), mask=nmask)
        if BLOCK_M > 3:
            tl.store(part + 3 * N, tl.sum(acc3, 0), mask=nmask)
        tl.debug_barrier()  # every thread's partials are written before the release below
        arrived = tl.atomic_add(cnt_ptr + pid, 1, sem="acq_rel")
        if arrived == SPLIT - 1:  # the last slice of this column tile: reduce and reset
            for m in tl.static_range(BLOCK_M):
                tot = tl.zeros([BLOCK_N], dtype=tl.float32)
                for sp in tl.static_range(SPLIT):
                    tot += tl.load(ws_ptr + (sp * BLOCK_M + m) * N + rn, mask=nmask,
                                   other=0.0, cache_modifier=".cg")
                tl.store(y_ptr + m * stride_ym + rn, tot.to(ty), mask=nmask)
            tl.atomic_xchg(cnt_ptr + pid, 0, sem="relaxed")


# cache_results: the timings persist in Triton's cache directory, so a restarted server
# skips the benchmarking (the first start pays it per shape and row count)
gemv = triton.autotune(configs=gemv_configs, key=["N", "K", "BITS", "GROUP", "BLOCK_M"],
                       prune_configs_by={"early_config_prune": gemv_prune}, cache_results=True)(
    triton.heuristics({"EVEN_N": lambda a: a["N"] % a["BLOCK_N"] == 0})(gemv_kernel))


gemm_configs = [
    triton.Config({"BLOCK_M": bm, "BLOCK_N": bn, "SPLIT_K": sk}, num_warps=w, num_stages=st)
    for bm, bn, sk, w, st in (
        (16, 64, 4, 4, 4), (16, 128, 4, 4, 4), (16, 64, 8, 4, 4), (16, 128, 8, 4, 3),
        (64, 64, 4, 4, 3), (64, 128, 1, 8, 3), (64, 128, 2, 8, 3), (64, 128, 4, 8, 3),
        (128, 128, 1, 8, 3), (128, 128, 2, 8, 3))
]


def gemm_prune(configs, named_args, **kwargs):  # noqa: ANN001, ANN202 - small M: split-K
    small = named_args["M_BUCKET"] <= 16
    return [c for c in configs if (c.kwargs["BLOCK_M"] == 16) == small]


@triton.autotune(configs=gemm_configs, key=["M_BUCKET", "N", "K", "BITS"],
                 prune_configs_by={"early_config_prune": gemm_prune}, reset_to_zero=["y_ptr"],
                 cache_results=True)
@triton.jit
def gemm(x_ptr, w_ptr, sz_ptr, y_ptr, M, N, K, M_BUCKET, stride_xm, stride_wn, stride_sn,
         stride_ym, mag,
         GROUP: tl.constexpr, BITS: tl.constexpr, V: tl.constexpr, BLOCK_K: tl.constexpr,
         BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, SPLIT_K: tl.constexpr):
    PER: tl.constexpr = 32 // BITS
    MASK: tl.constexpr = (1 << BITS) - 1
    BKW: tl.constexpr = BLOCK_K // PER
    NCH: tl.constexpr = BKW // V
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    pid_k = tl.program_id(2)
    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rk = tl.arange(0, BLOCK_K)
    rw = tl.arange(0, BKW)
    shifts = tl.arange(0, PER) * BITS
    nmask = rn < N
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(pid_k * BLOCK_K, K, BLOCK_K * SPLIT_K):
        offs_k = k0 + rk
        x = tl.load(x_ptr + rm[:, None] * stride_xm + offs_k[None, :],
                    mask=(rm[:, None] < M) & (offs_k[None, :] < K), other=0.0)
        # each packed word is read once, then expanded to PER codes in registers; within a
        # chunk of V words code j of word v is input j * V + v (see pack_weight)
        words = tl.load(w_ptr + rn[:, None] * stride_wn + (k0 // PER + rw)[None, :],
                        mask=nmask[:, None], other=0)
        w4 = tl.reshape(words, (BLOCK_N, NCH, 1, V))
        q = (w4 >> shifts[None, None, :, None]) & MASK
        q = tl.reshape(q, (BLOCK_N, BLOCK_K))
        # exact int -> float without a conversion instruction: (2**23 + q) - 2**23
        qf = (q | mag).to(tl.float32, bitcast=True) - 8388608.0
        if BLOCK_K <= GROUP:  # one group a step
            sz = tl.load(sz_ptr + rn * stride_sn + k0 // GROUP, mask=nmask, other=0)
            s = sz.to(tl.int16).to(tl.float16, bitcast=True).to(tl.float32)
            z = (sz >> 16).to(tl.int16).to(tl.float16, bitcast=True).to(tl.float32)
            w = (qf * s[:, None] + z[:, None]).to(x.dtype)
        else:  # GPS groups a step (wide steps for small groups: GGUF's 32)
            GPS: tl.constexpr = BLOCK_K // GROUP
            gi = k0 // GROUP + tl.arange(0, GPS)
            sz = tl.load(sz_ptr + rn[:, None] * stride_sn + gi[None, :], mask=nmask[:, None],
                         other=0)
            s = sz.to(tl.int16).to(tl.float16, bitcast=True).to(tl.float32)
            z = (sz >> 16).to(tl.int16).to(tl.float16, bitcast=True).to(tl.float32)
            w = tl.reshape(qf, (BLOCK_N, GPS, GROUP)) * s[:, :, None] + z[:, :, None]
            w = tl.reshape(w, (BLOCK_N, BLOCK_K)).to(x.dtype)
        acc += tl.dot(x, tl.trans(w))
    out = y_ptr + rm[:, None] * stride_ym + rn[None, :]
    msk = (rm[:, None] < M) & (rn[None, :] < N)
    if SPLIT_K == 1:
        tl.store(out, acc, mask=msk)
    else:
        tl.atomic_add(out, acc, mask=msk, sem="relaxed")


@triton.jit
def dequant(w_ptr, sz_ptr, out_ptr, N, K: tl.constexpr, GROUP: tl.constexpr,
            BITS: tl.constexpr, V: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
            PDL: tl.constexpr = False):
    """The packed weight -> out [N, K] in out's dtype (w = code * scale + zero), K in the
    stored order: a [BLOCK_N, BLOCK_K] tile a program, BLOCK_K inside one group. Reads
    weights only: with PDL it waits for the previous kernel just before its store."""
    PER: tl.constexpr = 32 // BITS
    MASK: tl.constexpr = (1 << BITS) - 1
    BKW: tl.constexpr = BLOCK_K // PER
    NCH: tl.constexpr = BKW // V
    KW: tl.constexpr = K // PER
    NG: tl.constexpr = K // GROUP
    rn = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    k0 = tl.program_id(1) * BLOCK_K
    nmask = rn < N
    rw = tl.arange(0, BKW)
    words = tl.load(w_ptr + rn[:, None] * KW + (k0 // PER + rw)[None, :], mask=nmask[:, None],
                    other=0)
    # the same expansion as the GEMM: code j of word v in a chunk is input j * V + v
    shifts = tl.arange(0, PER) * BITS
    q = (tl.reshape(words, (BLOCK_N, NCH, 1, V)) >> shifts[None, None, :, None]) & MASK
    q = tl.reshape(q, (BLOCK_N, BLOCK_K)).to(tl.float32)
    sz = tl.load(sz_ptr + rn * NG + k0 // GROUP, mask=nmask, other=0)
    s = sz.to(tl.int16).to(tl.float16, bitcast=True).to(tl.float32)
    z = (sz >> 16).to(tl.int16).to(tl.float16, bitcast=True).to(tl.float32)
    w = q * s[:, None] + z[:, None]
    out = out_ptr + rn[:, None].to(tl.int64) * K + (k0 + tl.arange(0, BLOCK_K))[None, :]
    pdl.wait(PDL)
    tl.store(out, w.to(out_ptr.dtype.element_ty), mask=nmask[:, None])


# The 4-bit GEMM on raw codes (``gemm_codes``): 5..DEQUANT_MIN_M rows, groups of a multiple
# of 64, bf16 / fp16 activations. tl.dot multiplies the activations by C + code, made exact
# in the activation dtype by one LOP3 per pair of codes (C = 128 in bf16, 1024 in fp16);
# the group's scale and zero are applied to the fp32 partial products afterwards:
#   sum_k x_k (code_k s + z) = s * sum_k x_k (C + code_k) + (z - C s) * sum_k x_k
# so no weight is multiplied before the tensor cores, and the codes are exact (the old GEMM
# rounds each dequantized weight to the activation dtype).
codes_configs = [
    triton.Config({"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk, "SPLIT_K": sk}, num_warps=w,
                  num_stages=st)
    for bm, bn, bk, sk, w, st in (
        (16, 64, 128, 4, 4, 3), (16, 128, 128, 4, 4, 3), (16, 128, 128, 2, 4, 4),
        (16, 256, 128, 2, 8, 3), (16, 64, 64, 8, 4, 4), (16, 128, 128, 1, 4, 4),
        (32, 128, 128, 2, 4, 3), (32, 64, 128, 4, 4, 3), (32, 128, 128, 1, 4, 3),
        (32, 256, 128, 1, 8, 3),
        (64, 128, 128, 1, 4, 3), (64, 128, 128, 2, 4, 3), (64, 64, 128, 2, 4, 4),
        (64, 128, 64, 2, 4, 4), (64, 256, 64, 1, 8, 3),
        (128, 64, 128, 1, 4, 3), (128, 64, 64, 1, 4, 3))
]


def codes_prune(configs, named_args, **kwargs):  # noqa: ANN001, ANN202
    """Row tiles of the bucket's height or half of it (16 to 128 rows), K steps inside a
    group."""
    m, group = named_args["M_BUCKET"], kwargs["GROUP"]
    hi = min(128, max(16, m))
    keep = [c for c in configs if hi // 2 <= c.kwargs["BLOCK_M"] <= hi
            and group % c.kwargs["BLOCK_K"] == 0]
    return keep or [c for c in configs if group % c.kwargs["BLOCK_K"] == 0][:1]


@triton.autotune(configs=codes_configs, key=["M_BUCKET", "N", "K", "GROUP", "XSUM", "PAIR"],
                 prune_configs_by={"early_config_prune": codes_prune}, reset_to_zero=["y_ptr"],
                 cache_results=True)
@triton.jit
def gemm_codes(x_ptr, w_ptr, sz_ptr, y_ptr, xs_ptr, M, N, K, M_BUCKET, stride_xm, stride_wn,
               stride_sn, stride_ym, stride_xs, magic2, C,
               GROUP: tl.constexpr, V: tl.constexpr, BLOCK_M: tl.constexpr,
               BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, SPLIT_K: tl.constexpr,
               PAIR: tl.constexpr = False, XSUM: tl.constexpr = False):
    # 4-bit codes, chunk-interleaved (triton_gemm.pack_weight): code j of word v of a chunk
    # of V words is input j * V + v of the chunk. ((word >> 4i) & 0x000F000F) | magic2 holds
    # codes i and i + 4 of the word as two values C + code: the low halves of all words and
    # i = 0..3 are the first half of each chunk's inputs, in order, the high halves the
    # second half; the activations are loaded in those two orders to match.
    BKW: tl.constexpr = BLOCK_K // 8
    NCH: tl.constexpr = BKW // V
    HALF: tl.constexpr = 4 * V
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    pid_k = tl.program_id(2)
    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mmask = rm < M
    nmask = rn < N
    i = tl.arange(0, BLOCK_K // 2)
    k_lo = (i // HALF) * (2 * HALF) + i % HALF  # input of the low half's i-th value
    rw = tl.arange(0, BKW)
    shifts = tl.arange(0, 4) * 4
    x_rows = x_ptr + rm[:, None] * stride_xm
    w_rows = w_ptr + rn[:, None] * stride_wn
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(pid_k * BLOCK_K, K, BLOCK_K * SPLIT_K):
        xa = tl.load(x_rows + (k0 + k_lo)[None, :], mask=mmask[:, None], other=0.0)
        xb = tl.load(x_rows + (k0 + HALF + k_lo)[None, :], mask=mmask[:, None], other=0.0)
        words = tl.load(w_rows + (k0 // 8 + rw)[None, :], mask=nmask[:, None], other=0)
        words = tl.reshape(words.to(tl.uint32, bitcast=True), (BLOCK_N, NCH, 1, V))
        pairs = ((words >> shifts[None, None, :, None]) & 0x000F000F) | magic2
        pairs = tl.reshape(pairs, (BLOCK_N, BLOCK_K // 2))
        wa = (pairs & 0xFFFF).to(tl.uint16).to(xa.dtype, bitcast=True)
        wb = (pairs >> 16).to(tl.uint16).to(xa.dtype, bitcast=True)
        if PAIR:  # x already in pair order in memory (x_ptr: codes_prep's copy): one dot on
            # the (low, high) pairs, each pair kept in one register
            x2 = tl.load(x_rows + k0 + tl.arange(0, BLOCK_K)[None, :], mask=mmask[:, None],
                         other=0.0)
            w2 = tl.reshape(tl.join(wa, wb), (BLOCK_N, BLOCK_K))
            part = tl.dot(x2, tl.trans(w2))
        else:
            part = tl.dot(xa, tl.trans(wa))
            part = tl.dot(xb, tl.trans(wb), part)
        if XSUM:  # the activations' sums over each 64 inputs, computed before the launch
            xs_j = k0 // 64 + tl.arange(0, BLOCK_K // 64)
            xsum = tl.sum(tl.load(xs_ptr + rm[:, None] * stride_xs + xs_j[None, :],
                                  mask=mmask[:, None], other=0.0), 1)
        else:
            xsum = tl.sum(xa.to(tl.float32), 1) + tl.sum(xb.to(tl.float32), 1)
        sz = tl.load(sz_ptr + rn * stride_sn + k0 // GROUP, mask=nmask, other=0)
        s = sz.to(tl.int16).to(tl.float16, bitcast=True).to(tl.float32)
        z = (sz >> 16).to(tl.int16).to(tl.float16, bitcast=True).to(tl.float32)
        acc += part * s[None, :]
        acc += xsum[:, None] * (z - C * s)[None, :]
    out = y_ptr + rm[:, None] * stride_ym + rn[None, :]
    msk = mmask[:, None] & nmask[None, :]
    if SPLIT_K == 1:
        tl.store(out, acc, mask=msk)
    else:
        tl.atomic_add(out, acc, mask=msk, sem="relaxed")


@triton.jit
def codes_prep(x_ptr, xp_ptr, xs_ptr, stride_xm, stride_pm, stride_sm,
               HALF: tl.constexpr, PAIR: tl.constexpr):
    """gemm_codes' inputs in one launch, a program per row and 64 inputs: the 64 inputs' sum
    (fp32) into xs_ptr and, with PAIR, the inputs in pair order (within each chunk of
    2 * HALF, input h * HALF + i at position 2 i + h) into xp_ptr."""
    row = tl.program_id(0)
    blk = tl.program_id(1)
    offs = blk * 64 + tl.arange(0, 64)
    x = tl.load(x_ptr + row * stride_xm + offs)
    tl.store(xs_ptr + row * stride_sm + blk, tl.sum(x.to(tl.float32), 0))
    if PAIR:
        p = tl.arange(0, 64)
        src = (p // (2 * HALF)) * (2 * HALF) + (p % 2) * HALF + (p % (2 * HALF)) // 2
        tl.store(xp_ptr + row * stride_pm + blk * 64 + p,
                 tl.load(x_ptr + row * stride_xm + blk * 64 + src))
