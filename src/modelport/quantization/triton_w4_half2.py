"""The one-row W4 GEMV with packed half2 arithmetic (the default; ``MODELPORT_W4_GEMV=default``
keeps the fp32 GEMV of triton_gemm).

Same weight layout as ``triton_gemm`` (chunk-interleaved int32 words, fp16 scale and zero in
one int32 a group); nothing is repacked. A thread takes a chunk (4 words, 32 codes, 16
bytes) of a row at a time; per packed word the inline PTX does

* one SHF (word >> 8) and four LOP3 ``(w & 0x000f000f) | 0x64006400`` (and 0x00f000f0):
  each gives a half2 of two codes, (c_j, c_{j+4}), as 1024 + c or 1024 + 16 c;
* four HADD2/HFMA2 to c - 8 exactly (centred codes: |c - 8| <= 8, so the products stay
  small and the zero term does not cancel against a large sum);
* four HMUL2/HFMA2 against the activations packed as half2 (x_j, x_{j+4}), into one f16x2
  partial sum a chunk (16 products a lane); a chunk's two lanes go to fp32 once.

The activations: per chunk (32 values) a power of two (exact) brings max |x| into [1, 2)
before the fp16 rounding, so nothing overflows (|lane sums| < 16 * 8 * 2 = 256) whatever
the bf16 range, and the result is scaled back in fp32. After the chunk sums everything is
fp32: per (row, chunk) y += s 2**e * sum((c - 8) x') + (z + 8 s) * sum(x), sum(x) in fp32
from the unrounded x.

Precision (fp16 steps: x' to 11 bits, each product, each of 15 lane additions, at 2**-11
relative): 6-9e-4 of max |y| with an fp32 output, measured on random data including bf16
activations to 6e4 (tests/test_w4_gemv_half2.py, the interpreter twin; the PTX fuses the
multiply-adds, one rounding fewer each); a bf16 output's own rounding is 2e-3..4e-3.
The shipped GEMV (fp32 throughout) is exact to ~1e-6 before its output rounding.

Rows: one activation row only (the single-stream decode step); 2-4 rows keep the shipped
GEMV. 4-bit codes in chunks of 4 words (groups of 32 or more) only.
"""

from __future__ import annotations

import triton
import triton.language as tl

from modelport.layers import pdl


# $0: the fp32 sum (as b32) of the 32 products of one chunk (V = 4 words) of one row;
# $1..$4: the chunk's words; $5..$20: for word v (v = 0..3) and j = 0..3, the activations
# of codes (j, j + 4) as half2 (x_j in the low half), at $(5 + 4 v + j)
def _chunk_ptx() -> str:
    lines = [
        ".reg .b32 q, a0, a1, a2, a3, acc, c1032, c16, cm72;",
        ".reg .b16 lo, hi;",
        ".reg .f32 flo, fhi;",
        "mov.b32 c1032, 0x64086408;",
        "mov.b32 c16, 0x2C002C00;",
        "mov.b32 cm72, 0xD480D480;",
    ]
    for v in range(4):
        w, x = f"${1 + v}", [f"${5 + 4 * v + j}" for j in range(4)]
        lines += [
            f"shr.u32 q, {w}, 8;",
            f"lop3.b32 a0, {w}, 0x000f000f, 0x64006400, 0xea;",
            f"lop3.b32 a1, {w}, 0x00f000f0, 0x64006400, 0xea;",
            "lop3.b32 a2, q, 0x000f000f, 0x64006400, 0xea;",
            "lop3.b32 a3, q, 0x00f000f0, 0x64006400, 0xea;",
            "sub.f16x2 a0, a0, c1032;",  # 1024 + c - 1032 = c - 8
            "fma.rn.f16x2 a1, a1, c16, cm72;",  # (1024 + 16 c) / 16 - 72 = c - 8
            "sub.f16x2 a2, a2, c1032;",
            "fma.rn.f16x2 a3, a3, c16, cm72;",
            f"mul.f16x2 acc, a0, {x[0]};" if v == 0 else f"fma.rn.f16x2 acc, a0, {x[0]}, acc;",
            f"fma.rn.f16x2 acc, a1, {x[1]}, acc;",
            f"fma.rn.f16x2 acc, a2, {x[2]}, acc;",
            f"fma.rn.f16x2 acc, a3, {x[3]}, acc;",
        ]
    lines += [
        "mov.b32 {lo, hi}, acc;",
        "cvt.f32.f16 flo, lo;",
        "cvt.f32.f16 fhi, hi;",
        "add.f32 flo, flo, fhi;",
        "mov.b32 $0, flo;",
    ]
    return "{\n" + "\n".join(lines) + "\n}"


CHUNK_PTX = tl.constexpr(_chunk_ptx())


@triton.jit
def _half(h):
    # int32 holding an fp16 in its low 16 bits -> that fp16
    return h.to(tl.int16).to(tl.float16, bitcast=True)


@triton.jit
def _word_ref(acc_lo, acc_hi, w, x0, x1, x2, x3):
    # the PTX's steps for one word in plain Triton (fp16 products and sums, no fusion)
    for j in tl.static_range(4):
        if j == 0:
            xp = x0
        elif j == 1:
            xp = x1
        elif j == 2:
            xp = x2
        else:
            xp = x3
        c_lo = (((w >> (4 * j)) & 15) - 8).to(tl.float16)
        c_hi = (((w >> (4 * j + 16)) & 15) - 8).to(tl.float16)
        acc_lo += c_lo * _half(xp & 0xFFFF)
        acc_hi += c_hi * _half((xp >> 16) & 0xFFFF)
    return acc_lo, acc_hi


@triton.jit
def chunk_dot(
    w0,
    w1,
    w2,
    w3,
    x00,
    x01,
    x02,
    x03,
    x10,
    x11,
    x12,
    x13,
    x20,
    x21,
    x22,
    x23,
    x30,
    x31,
    x32,
    x33,
    ASM: tl.constexpr,
):
    """sum over a chunk's 32 codes of (code - 8) * x, fp32 [w0.shape]; wv: word v of each
    chunk, xvj: the half2 activations of its codes (j, j + 4). ASM: the PTX above; else the
    same fp16 steps in plain Triton (what the interpreter runs; compiled for a GPU the
    compiler may fuse its multiply-adds, which the PTX does explicitly)."""
    if ASM:
        r = tl.inline_asm_elementwise(
            CHUNK_PTX,
            "=r" + ",r" * 20,
            [
                w0,
                w1,
                w2,
                w3,
                x00,
                x01,
                x02,
                x03,
                x10,
                x11,
                x12,
                x13,
                x20,
                x21,
                x22,
                x23,
                x30,
                x31,
                x32,
                x33,
            ],
            dtype=tl.int32,
            is_pure=True,
            pack=1,
        )
        return r.to(tl.float32, bitcast=True)
    else:
        lo = tl.zeros(w0.shape, dtype=tl.float16)
        hi = tl.zeros(w0.shape, dtype=tl.float16)
        lo, hi = _word_ref(lo, hi, w0, x00, x01, x02, x03)
        lo, hi = _word_ref(lo, hi, w1, x10, x11, x12, x13)
        lo, hi = _word_ref(lo, hi, w2, x20, x21, x22, x23)
        lo, hi = _word_ref(lo, hi, w3, x30, x31, x32, x33)
        return lo.to(tl.float32) + hi.to(tl.float32)


@triton.jit
def _split4(t):
    # [..., 4] -> its 4 slices along the last dim, in order
    a, b = tl.split(tl.reshape(t, t.shape[:-1] + (2, 2)))  # a: 0, 2; b: 1, 3
    t0, t2 = tl.split(a)
    t1, t3 = tl.split(b)
    return t0, t1, t2, t3


@triton.jit
def _x_load(x_ptr, base, j: tl.constexpr, xoff, xmask, EVEN_K: tl.constexpr):
    # [NV, 1, 4] fp32 activations of code j of each word of each chunk
    if EVEN_K:
        return tl.load(x_ptr + base + j * 4 + xoff).to(tl.float32)
    else:
        return tl.load(x_ptr + base + j * 4 + xoff, mask=xmask, other=0.0).to(tl.float32)


@triton.jit
def _x_pair(xa, xb, up):
    # codes j and j + 4: x * up as packed half2 (int32), split by word -> 4 x [NV, 1]
    ha = (xa * up).to(tl.float16).to(tl.int16, bitcast=True).to(tl.int32) & 0xFFFF
    hb = (xb * up).to(tl.float16).to(tl.int16, bitcast=True).to(tl.int32)
    return _split4(ha | (hb << 16))


@triton.jit
def gemv_half2_kernel(
    x_ptr,
    w_ptr,
    sz_ptr,
    y_ptr,
    N,
    K: tl.constexpr,
    GROUP: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_W: tl.constexpr,
    EVEN_N: tl.constexpr,
    ASM: tl.constexpr,
    PDL: tl.constexpr = False,
):
    """y[0, N] = x[0, K] W^T for 4-bit codes in chunks of V = 4 words, one row of x. Tiles
    are [chunks, rows, 4 words]: a thread loads a chunk's 16 bytes of a row at once."""
    CH: tl.constexpr = 32  # codes a chunk
    NV: tl.constexpr = BLOCK_W // 4
    KW: tl.constexpr = K // 8
    NC: tl.constexpr = KW // 4
    NG: tl.constexpr = K // GROUP
    EVEN_K: tl.constexpr = KW % BLOCK_W == 0
    EVEN: tl.constexpr = EVEN_K and EVEN_N
    pid = tl.program_id(0)
    rn = pid * BLOCK_N + tl.arange(0, BLOCK_N)
    nmask = rn < N
    rc = tl.arange(0, NV)
    rv = tl.arange(0, 4)
    w_cols = w_ptr + (rc * 4)[:, None, None] + (rn * KW)[None, :, None] + rv[None, None, :]
    sz_cols = sz_ptr + (rn * NG)[None, :]
    xoff = (rc * CH)[:, None, None] + rv[None, None, :]
    acc = tl.zeros([NV, BLOCK_N], dtype=tl.float32)
    pdl.wait(PDL)
    for c0 in range(0, NC, NV):
        cmask = (c0 + rc) < NC
        gi = ((c0 + rc) * CH // GROUP)[:, None]
        if EVEN:
            words = tl.load(w_cols + c0 * 4)
            sz = tl.load(sz_cols + gi)
        else:
            m2 = cmask[:, None] & nmask[None, :]
            words = tl.load(w_cols + c0 * 4, mask=m2[:, :, None], other=0)
            sz = tl.load(sz_cols + gi, mask=m2, other=0)
        xmask = cmask[:, None, None]
        base = c0 * CH
        xa0 = _x_load(x_ptr, base, 0, xoff, xmask, EVEN_K)
        xa1 = _x_load(x_ptr, base, 1, xoff, xmask, EVEN_K)
        xa2 = _x_load(x_ptr, base, 2, xoff, xmask, EVEN_K)
        xa3 = _x_load(x_ptr, base, 3, xoff, xmask, EVEN_K)
        xb0 = _x_load(x_ptr, base, 4, xoff, xmask, EVEN_K)
        xb1 = _x_load(x_ptr, base, 5, xoff, xmask, EVEN_K)
        xb2 = _x_load(x_ptr, base, 6, xoff, xmask, EVEN_K)
        xb3 = _x_load(x_ptr, base, 7, xoff, xmask, EVEN_K)
        # per chunk a power of two (exact) brings max |x| into [1, 2) before fp16: no
        # overflow (|lane sums| < 16 * 8 * 2) and no fp16 subnormals but far below the max
        amax = tl.maximum(
            tl.maximum(tl.maximum(tl.abs(xa0), tl.abs(xa1)), tl.maximum(tl.abs(xa2), tl.abs(xa3))),
            tl.maximum(tl.maximum(tl.abs(xb0), tl.abs(xb1)), tl.maximum(tl.abs(xb2), tl.abs(xb3))),
        )
        amax = tl.max(amax, 2)  # [NV, 1]
        e = tl.minimum(tl.maximum((amax.to(tl.int32, bitcast=True) >> 23) & 0xFF, 1), 253)
        up = ((254 - e) << 23).to(tl.float32, bitcast=True)[:, :, None]  # 2**(127 - e)
        down = (e << 23).to(tl.float32, bitcast=True)  # 2**(e - 127), [NV, 1]
        x00, x10, x20, x30 = _x_pair(xa0, xb0, up)
        x01, x11, x21, x31 = _x_pair(xa1, xb1, up)
        x02, x12, x22, x32 = _x_pair(xa2, xb2, up)
        x03, x13, x23, x33 = _x_pair(xa3, xb3, up)
        sx = tl.sum(((xa0 + xb0) + (xa1 + xb1)) + ((xa2 + xb2) + (xa3 + xb3)), 2)  # [NV, 1]
        w0, w1, w2, w3 = _split4(words)
        pc = chunk_dot(
            w0,
            w1,
            w2,
            w3,
            x00,
            x01,
            x02,
            x03,
            x10,
            x11,
            x12,
            x13,
            x20,
            x21,
            x22,
            x23,
            x30,
            x31,
            x32,
            x33,
            ASM,
        )
        s = sz.to(tl.int16).to(tl.float16, bitcast=True).to(tl.float32)
        z = (sz >> 16).to(tl.int16).to(tl.float16, bitcast=True).to(tl.float32)
        acc += (s * down) * pc + (z + 8.0 * s) * sx
    tl.store(y_ptr + rn, tl.sum(acc, 0).to(y_ptr.dtype.element_ty), mask=nmask)


# (BLOCK_N, num_warps): BLOCK_W = 128 * num_warps (one chunk, 16 bytes, a thread a row a
# step), as the shipped GEMV's tiles; not yet timed on a GPU, so the autotuner picks among
# a few sizes. Offline sm_90 (kernel_regs.py w4): 16x4w 108 registers at K = 4,096 (four
# programs an SM; the shipped 16x4w: 255, two), 168 at 14,336; 32x4w spills there (left out)
half2_configs = [
    triton.Config({"BLOCK_N": bn, "BLOCK_W": 128 * w}, num_warps=w, num_stages=1)
    for bn, w in ((16, 4), (8, 4), (8, 2), (4, 2))
]

gemv_half2 = triton.autotune(configs=half2_configs, key=["N", "K", "GROUP"], cache_results=True)(
    triton.heuristics({"EVEN_N": lambda a: a["N"] % a["BLOCK_N"] == 0})(gemv_half2_kernel)
)
