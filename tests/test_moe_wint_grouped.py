"""The grouped integer-code MoE GEMM (layers/triton_moe_quant.py ``moe_gemm_wint_kernel``, what
AWQ / GPTQ experts run past the few-token GEMVs): in the Triton interpreter against the
dequantized torch reference (4 and 8 bits, groups 32 / 64 / 128 and K, K steps inside one
group and over several, both BLOCK_M sizes, ragged expert counts), and every launch config of
INT_GEMM_CONFIGS compiled for sm_90 without register spills."""

from __future__ import annotations

import sys
import textwrap
from pathlib import Path

import pytest

from helpers.triton_interp import run_interpreted

ROOT = Path(__file__).resolve().parents[1]


_SCRIPT = textwrap.dedent("""
    import torch
    from modelport.layers import triton_moe as tm
    from modelport.layers import triton_moe_quant as tq
    from modelport.layers.fused_moe import moe_reference, route
    from modelport.layers.moe_quant import QuantExperts
    from modelport.quantization.kernels import GroupQuant

    g = torch.Generator().manual_seed(0)
    tm.MOE_GEMV_MAX = 0  # the grouped GEMM at every token count

    def gq(n, kk, group, bits):
        return GroupQuant(torch.randint(0, 1 << bits, (n, kk), generator=g, dtype=torch.uint8),
                          torch.rand(n, kk // group, generator=g) * 0.02 + 0.001,
                          -torch.rand(n, kk // group, generator=g) * 0.05 * (1 << bits) / 16,
                          group, bits)

    # (tokens, experts, top_k, hidden, intermediate, bits, group13, group2 (0: K), dtype,
    #  BLOCK_M, launch): K steps of 128 over one group (128) and over 4 (32), of 64 inside
    #  one group (128) and over 2 (32); 8 bits; group = K (GPTQ's -1); BLOCK_M 16 and 64;
    #  N not a multiple of BLOCK_N (96 / 32: fine, 48 / 32: masked); expert 0 never picked.
    #  (float16, float32: the interpreter's tl.dot gets bfloat16 wrong, for every kernel)
    cases = [(6, 5, 2, 256, 96, 4, 128, 32, torch.half, 16, dict(block_n=32, block_k=128)),
             (9, 4, 2, 128, 64, 8, 32, 64, torch.half, 16, dict(block_n=32, block_k=64)),
             (20, 3, 2, 256, 128, 4, 32, 128, torch.half, 64, dict(block_n=64, block_k=64)),
             (5, 4, 1, 128, 48, 4, 0, 0, torch.float32, 16, dict(block_n=32, block_k=128))]
    orig_block_m = tm.block_m_for
    for t, e, k, h, i, bits, g13, g2, dt, bm, launch in cases:
        tm.block_m_for = lambda m, n, bm=bm: bm
        qe = QuantExperts.from_group_quant(
            [(gq(2 * i, h, g13 or h, bits), gq(h, i, g2 or i, bits)) for _ in range(e)])
        logits = torch.randn(t, e, generator=g) * 3
        logits[:, 0] = -1e4
        w, ids = route(logits, k, k > 1)
        x = torch.randn(t, h, generator=g).to(dt)
        d13, d2 = qe.dequantize()
        ref = moe_reference(x.float(), d13.to(dt).float(), d2.to(dt).float(), w, ids)
        q = (qe.q13, qe.s13, qe.z13, qe.q2, qe.s2, qe.z2, bits, qe.group13, qe.group2)
        tol = 1e-5 if dt == torch.float32 else 2e-3
        y = tq.fused_experts_wint(x, *q, w, ids, **launch)
        err = (y.float() - ref).abs().max().item() / ref.abs().max().item()
        assert y.dtype == dt and y.shape == (t, h) and err < tol, (t, bits, err)
        print("ok grouped", t, bits, g13, g2, bm, f"{err:.1e}")
    tm.block_m_for = orig_block_m

    # GPTQ act-order experts (each its own g_idx for both projections): restacked with sorted
    # groups, down's order carried into gate/up's rows, the hidden columns gathered by perm13;
    # against each expert's own dequantized weights in checkpoint order
    for t, e, k, h, i, bits, group in ((7, 4, 2, 128, 64, 4, 32), (12, 3, 2, 64, 64, 8, 32)):
        def gq_act(n, kk):
            base = gq(n, kk, group, bits)
            base.g_idx = torch.randperm(kk, generator=g) % (kk // group)
            return base
        parts = [(gq_act(2 * i, h), gq_act(h, i)) for _ in range(e)]
        qe = QuantExperts.from_group_quant(parts)
        assert qe.perm13.shape == (e, h) and qe.perm13.dtype == torch.int32
        w13 = torch.stack([p[0].dequantize() for p in parts])
        w2 = torch.stack([p[1].dequantize() for p in parts])
        w, ids = route(torch.randn(t, e, generator=g) * 3, k, True)
        x = torch.randn(t, h, generator=g).half()
        ref = moe_reference(x.float(), w13.half().float(), w2.half().float(), w, ids)
        q = (qe.q13, qe.s13, qe.z13, qe.q2, qe.s2, qe.z2, bits, qe.group13, qe.group2)
        y = tq.fused_experts_wint(x, *q, w, ids, block_n=32, block_k=32, perm13=qe.perm13)
        err = (y.float() - ref).abs().max().item() / ref.abs().max().item()
        assert err < 2e-3, ("act-order", t, bits, err)
        print("ok act-order", t, bits, f"{err:.1e}")
""")


def test_grouped_integer_kernel_matches_the_reference_in_the_interpreter() -> None:
    pytest.importorskip("triton")
    out = run_interpreted(_SCRIPT)
    assert out.count("ok grouped") == 4, out
    assert out.count("ok act-order") == 2, out


def test_the_k_step_holds_whole_words_and_whole_groups_or_part_of_one() -> None:
    pytest.importorskip("triton")
    from modelport.layers import triton_moe_quant as tq

    assert tq.int_gemm_block_k(128, 2048, 4, 128) == 128
    assert tq.int_gemm_block_k(128, 1408, 4, 256) == 128  # 1408 = 11 * 128
    assert tq.int_gemm_block_k(32, 2048, 4, 128) == 128  # 4 groups a step
    assert tq.int_gemm_block_k(1408, 1408, 4, 128) == 128  # GPTQ group -1: inside K
    assert tq.int_gemm_block_k(96, 96, 8, 128) == 32
    assert tq.int_gemm_block_k(64, 64, 4, 128) == 64
    assert tq.int_gemm_block_k(8, 64, 4, 128) == 64  # 8 groups of one word a step
    with pytest.raises(ValueError, match="K must be a multiple of 16"):
        tq.int_gemm_block_k(40, 40, 4, 128)


def test_grouped_integer_kernel_configs_compile_for_sm90_without_spills() -> None:
    pytest.importorskip("triton.backends.nvidia")
    sys.path.insert(0, str(ROOT / "bench" / "gpu"))
    import kernel_regs

    from modelport.layers import triton_moe_quant as tq

    ints = ("N", "K", "num_rows", "stride_am", "stride_we", "stride_wn", "stride_se",
            "stride_sn", "mag_a", "mag_b", "stride_om")
    sig = dict(a_ptr="*bf16", w_ptr="*i32", s_ptr="*fp32", z_ptr="*fp32", perm_ptr="*i32",
               out_ptr="*bf16",
               sorted_ptr="*i32", block_expert_ptr="*i32", weight_ptr="*fp32",
               **dict.fromkeys(ints, "i32"))
    divisible = ("a_ptr", "w_ptr", "out_ptr", "K", "stride_am", "stride_we", "stride_wn")
    default = next(n for n, c in tq.INT_GEMM_CONFIGS.items() if c == tq.INT_GEMM_CONFIG)
    for name, (bn, bk, warps, stages) in tq.INT_GEMM_CONFIGS.items():
        # every config at AWQ's 4 bits, group 128; the default also at 8 bits and group 32
        # (the default also with act-order's gathered activations in the gated launch)
        kinds = ((4, 128, False), (8, 128, False), (4, 32, False), (4, 128, True)) \
            if name == default else ((4, 128, False),)
        for bits, group, perm in kinds:
            for gated, bm in ((True, 16), (True, 64), (False, 16), (False, 64)):
                const = dict(TOP_K=4 if gated else 1, GATED=gated, MUL_WEIGHT=not gated,
                             PRECISION="tf32", BITS=bits, GROUP=group, BLOCK_M=bm,
                             BLOCK_N=bn, BLOCK_K=bk, HAS_PERM=perm and gated)
                r = kernel_regs.compile_sm90(tq.moe_gemm_wint_kernel, sig, const, divisible,
                                             warps, stages, loops=False)
                where = (name, bits, group, gated, bm, r)
                assert 0 < r["regs"] <= 255 and r["stack"] == 0, where
                assert r["sass_instr"] > 100 and r["programs_per_sm"] >= 1, where


@pytest.mark.gpu
@pytest.mark.parametrize("bits", [4, 8])
def test_cuda_grouped_integer_kernel_on_the_qwen_moe_shape(bits: int) -> None:
    """bf16 on the GPU (the interpreter cannot check it): Qwen1.5-MoE's hidden 2048 and
    intermediate 1408 (11 groups of 128), prefill-sized token counts, each launch config
    against the dequantized reference."""
    import torch

    from modelport.layers import triton_moe as tm
    from modelport.layers import triton_moe_quant as tq
    from modelport.layers.fused_moe import moe_reference, route
    from modelport.layers.moe_quant import QuantExperts
    from modelport.quantization.kernels import GroupQuant

    g = torch.Generator().manual_seed(0)
    e, k, h, i, group = 12, 4, 2048, 1408, 128

    def gq(n, kk):
        return GroupQuant(torch.randint(0, 1 << bits, (n, kk), generator=g, dtype=torch.uint8),
                          torch.rand(n, kk // group, generator=g) * 0.002 + 0.0005,
                          -torch.rand(n, kk // group, generator=g) * 0.01, group, bits)

    qe = QuantExperts.from_group_quant([(gq(2 * i, h), gq(h, i)) for _ in range(e)]).cuda()
    d13, d2 = (d.cuda() for d in qe.dequantize())
    q = (qe.q13, qe.s13, qe.z13, qe.q2, qe.s2, qe.z2, bits, group, group)
    for t in (9, 300):  # past the few-token GEMVs (36 and 1,200 assignments)
        assert not tm.moe_gemv_applies(t, k, integer=True)
        x = torch.randn(t, h, generator=g).bfloat16().cuda()
        w, ids = route((torch.randn(t, e, generator=g) * 3).cuda(), k, True)
        ref = moe_reference(x.float(), d13.bfloat16().float(), d2.bfloat16().float(), w, ids)
        launches = [dict(zip(("block_n", "block_k", "num_warps", "num_stages"), c))
                    for c in tq.INT_GEMM_CONFIGS.values()]
        for launch in launches:
            y = tq.fused_experts_wint(x, *q, w, ids, **launch)
            err = ((y.float() - ref).abs().max() / ref.abs().max()).item()
            assert y.dtype == torch.bfloat16 and err < 1e-2, (t, launch, err)
