"""Triton source of the NF4 kernels; see triton_nf4 for the layout and the paths.

Imported only when a CUDA NF4 weight runs (importing it needs triton).
"""

import triton
import triton.language as tl


@triton.jit
def gemv(xw_ptr, w_ptr, am_ptr, t_ptr, y_ptr, N, stride_xm, stride_ym,
         K: tl.constexpr, QB: tl.constexpr, NB: tl.constexpr, M: tl.constexpr,
         MP: tl.constexpr, BLOCK_N: tl.constexpr):
    """[BLOCK_N rows, NB quant blocks, QB / 2 bytes] a step, threads along K (16 bytes
    each); xw_ptr: x's 16-bit values as int32 words (even column in the low half)."""
    HB: tl.constexpr = QB // 2  # bytes of one quant block
    NQ: tl.constexpr = K // QB
    dt = y_ptr.dtype.element_ty
    rn = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    nmask = rn < N
    rb = tl.arange(0, NB)
    rh = tl.arange(0, HB)
    rm = tl.arange(0, MP)
    w_rows = w_ptr + rn.to(tl.int64) * (K // 2)
    am_rows = am_ptr + rn.to(tl.int64) * NQ
    table = tl.load(t_ptr + tl.arange(0, 16))  # looked up from shared memory (tl.gather)
    acc = tl.zeros([MP, BLOCK_N, NB], dtype=tl.float32)
    for g in range(0, NQ // NB):
        blk = g * NB + rb
        b = tl.load(w_rows[:, None, None] + (blk * HB)[None, :, None] + rh[None, None, :],
                    mask=nmask[:, None, None], other=0).to(tl.int32)
        flat: tl.constexpr = BLOCK_N * NB * HB
        hi = tl.reshape(tl.gather(table, tl.reshape(b >> 4, (flat,)), 0), (BLOCK_N, NB, HB))
        lo = tl.reshape(tl.gather(table, tl.reshape(b & 15, (flat,)), 0), (BLOCK_N, NB, HB))
        am = tl.load(am_rows[:, None] + blk[None, :], mask=nmask[:, None], other=0.0)
        for m in tl.static_range(M):
            xw = tl.load(xw_ptr + m * stride_xm + blk[:, None] * HB + rh[None, :])
            xe = (xw & 0xFFFF).to(tl.int16).to(dt, bitcast=True).to(tl.float32)
            xo = (xw >> 16).to(tl.int16).to(dt, bitcast=True).to(tl.float32)
            p = tl.sum(hi * xe[None, :, :] + lo * xo[None, :, :], axis=2) * am
            acc = tl.where(rm[:, None, None] == m, acc + p[None, :, :], acc)
    out = y_ptr + rm[:, None] * stride_ym + rn[None, :]
    tl.store(out, tl.sum(acc, axis=2).to(dt), mask=(rm[:, None] < M) & nmask[None, :])

@triton.jit
def expand(b, table, am, BLOCK_N: tl.constexpr, HB: tl.constexpr):
    """Bytes b [BLOCK_N, HB] (int32) of one quant block and its absmax [BLOCK_N] -> the
    weights [BLOCK_N, 2 * HB] in fp32: even, odd, even, ... columns."""
    flat: tl.constexpr = BLOCK_N * HB
    hi = tl.reshape(tl.gather(table, tl.reshape(b >> 4, (flat,)), 0), (BLOCK_N, HB))
    lo = tl.reshape(tl.gather(table, tl.reshape(b & 15, (flat,)), 0), (BLOCK_N, HB))
    return tl.reshape(tl.join(hi, lo), (BLOCK_N, 2 * HB)) * am[:, None]

@triton.jit
def dequant(w_ptr, am_ptr, t_ptr, out_ptr, N, K: tl.constexpr, QB: tl.constexpr,
            BLOCK_N: tl.constexpr):
    """One [BLOCK_N, QB] tile a program: one quant block of BLOCK_N rows."""
    HB: tl.constexpr = QB // 2
    rn = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    g = tl.program_id(1)
    nmask = rn < N
    rows = rn.to(tl.int64)[:, None]
    b = tl.load(w_ptr + rows * (K // 2) + g * HB + tl.arange(0, HB)[None, :],
                mask=nmask[:, None], other=0).to(tl.int32)
    am = tl.load(am_ptr + rn.to(tl.int64) * (K // QB) + g, mask=nmask, other=0.0)
    w = expand(b, tl.load(t_ptr + tl.arange(0, 16)), am, BLOCK_N, HB)
    out = out_ptr + rows * K + g * QB + tl.arange(0, QB)[None, :]
    tl.store(out, w.to(out_ptr.dtype.element_ty), mask=nmask[:, None])

@triton.jit
def gemm(x_ptr, w_ptr, am_ptr, t_ptr, y_ptr, M, N, stride_xm, stride_ym,
         K: tl.constexpr, QB: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
         SPLIT_K: tl.constexpr = 1):
    """y tile [BLOCK_M, BLOCK_N] = x W^T, one quant block (QB columns) of W a step,
    expanded in registers (table value x absmax, rounded once to x's dtype) for tl.dot.
    SPLIT_K > 1 (a divisor of K / QB): program k of grid axis 2 takes blocks k, k + SPLIT_K,
    ... and adds its partial tile into y (fp32, zeroed by the caller) atomically."""
    HB: tl.constexpr = QB // 2
    NQ: tl.constexpr = K // QB
    dt = x_ptr.dtype.element_ty
    rm = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    mmask = rm < M
    nmask = rn < N
    rh = tl.arange(0, HB)
    rk = tl.arange(0, QB)
    w_rows = w_ptr + rn.to(tl.int64)[:, None] * (K // 2)
    x_rows = x_ptr + rm.to(tl.int64)[:, None] * stride_xm
    am_rows = am_ptr + rn.to(tl.int64) * NQ
    table = tl.load(t_ptr + tl.arange(0, 16))
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for g0 in range(0, NQ, SPLIT_K):  # SPLIT_K divides NQ (gemm_split)
        g = g0 + tl.program_id(2)
        b = tl.load(w_rows + g * HB + rh[None, :], mask=nmask[:, None], other=0).to(tl.int32)
        am = tl.load(am_rows + g, mask=nmask, other=0.0)
        w = expand(b, table, am, BLOCK_N, HB).to(dt)
        x = tl.load(x_rows + g * QB + rk[None, :], mask=mmask[:, None], other=0.0)
        acc = tl.dot(x, tl.trans(w), acc)
    out = y_ptr + rm.to(tl.int64)[:, None] * stride_ym + rn[None, :]
    if SPLIT_K == 1:
        tl.store(out, acc.to(y_ptr.dtype.element_ty), mask=mmask[:, None] & nmask[None, :])
    else:
        tl.atomic_add(out, acc, mask=mmask[:, None] & nmask[None, :], sem="relaxed")

@triton.jit
def _lookup(table, idx, SHAPE0: tl.constexpr, SHAPE1: tl.constexpr, SHAPE2: tl.constexpr):
    """table[idx] for a [SHAPE0, SHAPE1, SHAPE2] index (tl.gather: shared memory)."""
    flat: tl.constexpr = SHAPE0 * SHAPE1 * SHAPE2
    v = tl.gather(table, tl.reshape(idx.to(tl.int32), (flat,)), 0)
    return tl.reshape(v, (SHAPE0, SHAPE1, SHAPE2))


@triton.jit
def _words_dot(wd, table, xw_row, blk, rp, BLOCK_N: tl.constexpr, NB: tl.constexpr,
               QW: tl.constexpr, dt: tl.constexpr):
    """One activation row against [BLOCK_N, NB, QW] code words -> [BLOCK_N, NB] sums per quant
    block (absmax not applied). Word q of a block holds its bytes 4q..4q+3, byte i at bits
    8i: codes of columns 8q+2i (high nibble) and 8q+2i+1, whose activations are x's 16-bit
    pair 4q+i (an int32: the even column in the low half)."""
    HB: tl.constexpr = QW * 4
    xw = tl.load(xw_row + (blk * HB)[:, None] + rp[None, :])  # [NB, HB] pairs, contiguous
    x01, x23 = tl.split(tl.reshape(xw, (NB, QW, 2, 2)))  # pairs 4q + {0, 2} and 4q + {1, 3}
    x0, x2 = tl.split(x01)
    x1, x3 = tl.split(x23)
    p = tl.zeros([BLOCK_N, NB, QW], dtype=tl.float32)
    for i in tl.static_range(4):
        if i == 0:
            xi = x0
        elif i == 1:
            xi = x1
        elif i == 2:
            xi = x2
        else:
            xi = x3
        xe = (xi & 0xFFFF).to(tl.int16).to(dt, bitcast=True).to(tl.float32)
        xo = (xi >> 16).to(tl.int16).to(dt, bitcast=True).to(tl.float32)
        hi = _lookup(table, (wd >> (8 * i + 4)) & 15, BLOCK_N, NB, QW)
        lo = _lookup(table, (wd >> (8 * i)) & 15, BLOCK_N, NB, QW)
        p += hi * xe[None, :, :] + lo * xo[None, :, :]
    return tl.sum(p, axis=2)


@triton.jit
def gemv_words(xw_ptr, w_ptr, am_ptr, t_ptr, y_ptr, N, stride_xm, stride_ym,
               K: tl.constexpr, QB: tl.constexpr, NB: tl.constexpr, M: tl.constexpr,
               BLOCK_N: tl.constexpr):
    """The GEMV reading the codes as int32 words (w_ptr: [N, K / 8]): 4 registers hold what
    16 do as bytes, so a program keeps fewer registers and an SM more programs (loads in
    flight); [BLOCK_N rows, NB quant blocks, QB / 8 words] a step, M <= 4 rows of x."""
    QW: tl.constexpr = QB // 8
    NQ: tl.constexpr = K // QB
    dt = y_ptr.dtype.element_ty
    rn = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    nmask = rn < N
    rb = tl.arange(0, NB)
    rq = tl.arange(0, QW)
    rp = tl.arange(0, QW * 4)
    w_rows = w_ptr + rn.to(tl.int64) * (K // 8)
    am_rows = am_ptr + rn.to(tl.int64) * NQ
    table = tl.load(t_ptr + tl.arange(0, 16))
    acc0 = tl.zeros([BLOCK_N, NB], dtype=tl.float32)
    if M > 1:
        acc1 = tl.zeros([BLOCK_N, NB], dtype=tl.float32)
    if M > 2:
        acc2 = tl.zeros([BLOCK_N, NB], dtype=tl.float32)
    if M > 3:
        acc3 = tl.zeros([BLOCK_N, NB], dtype=tl.float32)
    for g in range(0, NQ // NB):
        blk = g * NB + rb
        wd = tl.load(w_rows[:, None, None] + (blk * QW)[None, :, None] + rq[None, None, :],
                     mask=nmask[:, None, None], other=0).to(tl.uint32, bitcast=True)
        am = tl.load(am_rows[:, None] + blk[None, :], mask=nmask[:, None], other=0.0)
        acc0 += _words_dot(wd, table, xw_ptr, blk, rp, BLOCK_N, NB, QW, dt) * am
        if M > 1:
            acc1 += _words_dot(wd, table, xw_ptr + stride_xm, blk, rp, BLOCK_N, NB, QW, dt) * am
        if M > 2:
            acc2 += _words_dot(wd, table, xw_ptr + 2 * stride_xm, blk, rp, BLOCK_N, NB, QW,
                               dt) * am
        if M > 3:
            acc3 += _words_dot(wd, table, xw_ptr + 3 * stride_xm, blk, rp, BLOCK_N, NB, QW,
                               dt) * am
    out = y_ptr + rn
    tl.store(out, tl.sum(acc0, axis=1).to(dt), mask=nmask)
    if M > 1:
        tl.store(out + stride_ym, tl.sum(acc1, axis=1).to(dt), mask=nmask)
    if M > 2:
        tl.store(out + 2 * stride_ym, tl.sum(acc2, axis=1).to(dt), mask=nmask)
    if M > 3:
        tl.store(out + 3 * stride_ym, tl.sum(acc3, axis=1).to(dt), mask=nmask)
