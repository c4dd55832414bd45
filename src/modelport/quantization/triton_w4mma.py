"""Experimental, opt-in (MODELPORT_W4_MMA=1, see triton_gemm.TritonKernel): 4-bit
group-quantized GEMV on tensor cores.

The engine's W4 GEMV (triton_kernels.gemv) multiplies on the FP32 pipes: ~26 instructions
per packed word on sm_90, which bounds it well below the memory rate (AWQ W3 on the H200:
the W4 GEMV takes 1.79 ms of a 2.3 ms step for 3.75 GB of weights). Here each packed word
becomes bf16 (or fp16) values with no arithmetic at all, and the tensor cores do the rest:

* Layout (``triton_gemm.pack_pairs``): group-contiguous K; in each int32 word the codes of
  inputs 8w+2i and 8w+2i+1 sit at bits 4i and 16+4i. One LOP3 per pair, ``(word >> 4i) &
  0x000F000F | MAGIC``, makes two bf16 numbers 128 + code (fp16: 1024 + code) in one
  register, already in K order: 4 LOP3 + 3 shifts a word (the asm in ``_codes``).
* Per group of GROUP inputs a program multiplies its [BLOCK_N, GROUP] tile of (C + code)
  with the activations (tl.dot, the rows of x padded to 16) and folds the group's affine map
  in afterwards: sum_k (code_k s + z) x_k = s P + (z - C s) X with P = sum (C + code) x and
  X = sum x, both per activation row.
* Short N is split along K (SPLIT slices, grid axis 1) as the engine's GEMV does: each
  slice stores fp32 partial sums, the last to arrive adds them in slice order (same bits
  whichever slice is last) and resets its counter.

Offline sm_90 SASS of the main loop: 20.3 instructions per packed word (BLOCK_N 128, 4 warps,
the engine's choice) and 18.6 (256, 8 warps), of which 7 are the code extraction. Checked in the Triton interpreter (with a plain
Triton stand-in for the asm); on a GPU only by ``bench/gpu/w4_mma_bench.py`` and
``tests/test_w4_mma_gpu.py``.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from modelport.layers import pdl

_INTERPRET = tl.constexpr(os.environ.get("TRITON_INTERPRET") == "1")  # no asm there


def _asm(magic: int) -> str:
    """(word >> 4i) & 0x000F000F | magic for i = 0..3: the pair (C + code 2i, C + code 2i+1)
    as the two 16-bit halves of output i (magic: C's bit pattern in both halves)."""
    lines = [f"lop3.b32 $0, $4, 0x000F000F, {magic:#x}, 0xEA;"]
    for i in (1, 2, 3):
        lines += [f"shr.u32 t, $4, {4 * i};", f"lop3.b32 ${i}, t, 0x000F000F, {magic:#x}, 0xEA;"]
    return "{\n.reg .b32 t;\n" + "\n".join(lines) + "\n}"


_ASM_BF16 = tl.constexpr(_asm(0x43004300))  # bf16 128.0: 128 + code
_ASM_FP16 = tl.constexpr(_asm(0x64006400))  # fp16 1024.0: 1024 + code
_CONSTRAINTS = tl.constexpr("=r,=r,=r,=r,r,r")  # 4 outputs, the word pair


@triton.jit
def _codes(words2, FP16: tl.constexpr):
    """words2 [..., 2]: each word twice (the pair shares a register pair in the asm) ->
    four [..., 2] tensors: (C + code of input 8w + 2i, C + code of 8w + 2i + 1), i = 0..3,
    C = 128 (bf16) or 1024 (fp16)."""
    if _INTERPRET:  # no inline asm in the interpreter: the same values in plain Triton
        e = tl.arange(0, 2)
        return (_code_ref(words2, e, 0, FP16), _code_ref(words2, e, 1, FP16),
                _code_ref(words2, e, 2, FP16), _code_ref(words2, e, 3, FP16))
    elif FP16:
        return tl.inline_asm_elementwise(asm=_ASM_FP16, constraints=_CONSTRAINTS,
                                         args=[words2], dtype=(tl.float16,) * 4, is_pure=True,
                                         pack=2)
    else:
        return tl.inline_asm_elementwise(asm=_ASM_BF16, constraints=_CONSTRAINTS,
                                         args=[words2], dtype=(tl.bfloat16,) * 4, is_pure=True,
                                         pack=2)


@triton.jit
def _code_ref(words2, e, i: tl.constexpr, FP16: tl.constexpr):
    code = (words2 >> (4 * i + 16 * e)) & 0xF
    if FP16:
        return (code.to(tl.float32) + 1024.0).to(tl.float16)
    else:
        return (code.to(tl.float32) + 128.0).to(tl.bfloat16)


@triton.jit
def w4_mma_kernel(x_ptr, w_ptr, sz_ptr, y_ptr, ws_ptr, cnt_ptr, N, M, stride_xm, stride_ym,
                  K: tl.constexpr, GROUP: tl.constexpr, BLOCK_N: tl.constexpr,
                  SPLIT: tl.constexpr, MAX_M: tl.constexpr, BLOCK_M: tl.constexpr = 16,
                  PDL: tl.constexpr = False):
    KW: tl.constexpr = K // 8
    NG: tl.constexpr = K // GROUP
    GW: tl.constexpr = GROUP // 8  # words per group and row
    GPS: tl.constexpr = NG // SPLIT  # groups per K slice
    FP16: tl.constexpr = x_ptr.dtype.element_ty == tl.float16
    C: tl.constexpr = 1024.0 if FP16 else 128.0
    pid = tl.program_id(0)
    sp = tl.program_id(1)
    rn = pid * BLOCK_N + tl.arange(0, BLOCK_N)
    nmask = rn < N
    rm = tl.arange(0, BLOCK_M)
    mmask = rm < M
    g_lo = sp * GPS
    w_rows = w_ptr + rn[:, None].to(tl.int64) * KW + g_lo * GW + tl.arange(0, GW)[None, :]
    x_rows = x_ptr + rm[:, None] * stride_xm + g_lo * GROUP + tl.arange(0, GROUP)[None, :]
    sz_p = sz_ptr + rn * NG + g_lo
    acc = tl.zeros([BLOCK_N, BLOCK_M], tl.float32)
    words = tl.load(w_rows, mask=nmask[:, None], other=0)  # weights: before the PDL wait
    pdl.wait(PDL)
    for gi in range(GPS):
        w_rows += GW
        o0, o1, o2, o3 = _codes(tl.join(words, words), FP16)
        # [BLOCK_N, GW, e, a, b] holds input 8w + 4a + 2b + e: permute to K order
        v = tl.join(tl.join(o0, o2), tl.join(o1, o3))
        v = tl.reshape(tl.permute(v, (0, 1, 3, 4, 2)), (BLOCK_N, GROUP))
        xt = tl.load(x_rows, mask=mmask[:, None], other=0.0)
        x_rows += GROUP
        sz = tl.load(sz_p, mask=nmask, other=0)
        sz_p += 1
        s = sz.to(tl.int16).to(tl.float16, bitcast=True).to(tl.float32)
        z = (sz >> 16).to(tl.int16).to(tl.float16, bitcast=True).to(tl.float32) - C * s
        p = tl.dot(v, tl.trans(xt))  # [BLOCK_N, BLOCK_M]: sum (C + code) x over the group
        acc = acc + s[:, None] * p
        acc = acc + z[:, None] * tl.sum(xt.to(tl.float32), 1)[None, :]
        words = tl.load(w_rows, mask=nmask[:, None] & (gi < GPS - 1), other=0)
    ty = y_ptr.dtype.element_ty
    out_mask = nmask[:, None] & mmask[None, :]
    if SPLIT == 1:
        tl.store(y_ptr + rm[None, :] * stride_ym + rn[:, None], acc.to(ty), mask=out_mask)
    else:
        # partials [SPLIT, MAX_M, N]; the last slice of this column tile adds them
        tl.store(ws_ptr + (sp * MAX_M + rm[None, :]) * N + rn[:, None], acc, mask=out_mask)
        tl.debug_barrier()  # every thread's partials are written before the release below
        if tl.atomic_add(cnt_ptr + pid, 1, sem="acq_rel") == SPLIT - 1:
            tot = tl.zeros([BLOCK_N, BLOCK_M], tl.float32)
            for j in tl.static_range(SPLIT):
                tot += tl.load(ws_ptr + (j * MAX_M + rm[None, :]) * N + rn[:, None], mask=out_mask,
                               other=0.0, cache_modifier=".cg")
            tl.store(y_ptr + rm[None, :] * stride_ym + rn[:, None], tot.to(ty), mask=out_mask)
            tl.atomic_xchg(cnt_ptr + pid, 0, sem="relaxed")


def w4_mma(x: torch.Tensor, qweight: torch.Tensor, sz: torch.Tensor, n: int, group: int,
           block_n: int = 128, split: int = 1, num_warps: int = 4,
           num_stages: int = 1) -> torch.Tensor:
    """x [M <= GEMV_MAX_M, K] (bf16/fp16, contiguous) times the ``pack_pairs``-ed weight
    [N, K] with ``pack_scales`` scales -> y [M, N] in x's dtype."""
    from modelport.quantization.triton_gemm import (
        GEMV_MAX_M,
        GEMV_MAX_SPLIT,
        gemv_workspace,
        triton_cdiv,
    )

    m, k = x.shape
    if m > GEMV_MAX_M or k % group or (k // group) % split or group % 16 or split > GEMV_MAX_SPLIT:
        raise ValueError(f"w4_mma: unsupported shape x {tuple(x.shape)}, group {group}, "
                         f"split {split}")
    y = torch.empty((m, n), dtype=x.dtype, device=x.device)
    ws, cnt = gemv_workspace(x.device, n)
    w4_mma_kernel[(triton_cdiv(n, block_n), split)](
        x, qweight, sz, y, ws, cnt, n, m, x.stride(0), y.stride(0), K=k, GROUP=group,
        BLOCK_N=block_n, SPLIT=split, MAX_M=GEMV_MAX_M, num_warps=num_warps, num_stages=num_stages,
        **pdl.kernel_kwargs())
    return y
