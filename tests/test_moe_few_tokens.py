"""The few-token MoE path on CUDA (layers/triton_moe.py: ``route_topk`` and
``small_batch_experts``): routing equal to ``fused_moe.route``, the experts equal to the torch
reference for bf16/fp16 and FP8 weights, in the Triton interpreter on CPU and on the GPU
(CUDA graphs, a whole model against the grouped-GEMM path)."""

from __future__ import annotations

import sys
import textwrap
from pathlib import Path

import pytest
import torch

from helpers.tiny_models import TINY_PROMPT
from helpers.tiny_moe import make_tiny_moe_dir
from helpers.triton_interp import run_interpreted

ROOT = Path(__file__).resolve().parents[1]


_SCRIPT = textwrap.dedent("""
    import torch
    from modelport.layers import triton_moe as tm
    from modelport.layers.fused_moe import moe_reference, route
    from modelport.quantization.fp8 import quantize_fp8_per_channel

    g = torch.Generator().manual_seed(0)
    # (tokens, experts, top_k, hidden, intermediate, renormalize): Qwen1.5-MoE's 60 experts
    # top-4, a non-power-of-two expert count, ragged K and N against the blocks. (The
    # interpreter's time goes as programs x K steps, so the shapes are the smallest that keep
    # each path: hidden 70 and intermediate 33 give every config a masked N tail in both
    # GEMVs and a masked last K step after full ones (gate/up's steps of 32 and 64, down's
    # of 32); 8 tokens x top-4, the most assignments the path takes, on small sizes)
    for t, e, k, h, i, renorm in ((1, 60, 4, 64, 48, False), (3, 8, 2, 70, 33, True),
                                  (8, 5, 4, 16, 8, True)):
        logits = torch.randn(t, e, generator=g) * 3
        w_ref, ids_ref = route(logits, k, renorm)
        w, ids = tm.route_topk(logits, k, renorm)
        assert ids.dtype == torch.int32 and torch.equal(ids.long(), ids_ref), (ids, ids_ref)
        torch.testing.assert_close(w, w_ref, rtol=1e-6, atol=1e-7)
        print("ok route", t, e, k)
        x = torch.randn(t, h, generator=g).half()
        w13 = (torch.randn(e, 2 * i, h, generator=g) * 0.1).half()
        w2 = (torch.randn(e, h, i, generator=g) * 0.1).half()
        ref = moe_reference(x.float(), w13.float(), w2.float(), w, ids.long())
        for cfg in ((8, 32, 4), (16, 64, 4), (4, 128, 4)):
            y = tm.small_batch_experts(x, w13, w2, w, ids, config=cfg)
            err = (y.float() - ref).abs().max().item() / ref.abs().max().item()
            assert y.dtype == x.dtype and y.shape == (t, h) and err < 2e-3, (cfg, err)
            print("ok experts", t, cfg, f"{err:.1e}")
        # FP8 codes with a float32 scale per row, against their dequantized weights
        q13, s13 = zip(*(quantize_fp8_per_channel(w13[j].float()) for j in range(e)))
        q2, s2 = zip(*(quantize_fp8_per_channel(w2[j].float()) for j in range(e)))
        q13, s13, q2, s2 = (torch.stack(a) for a in (q13, s13, q2, s2))
        d13, d2 = q13.float() * s13[..., None], q2.float() * s2[..., None]
        ref = moe_reference(x.float(), d13, d2, w, ids.long())
        y = tm.small_batch_experts(x, q13, q2, w, ids, s13, s2, config=(8, 32, 4))
        err = (y.float() - ref).abs().max().item() / ref.abs().max().item()
        assert err < 2e-3, err
        print("ok fp8", t, f"{err:.1e}")

    # integer codes (AWQ / GPTQ restacked): code * scale + zero per group, 4 and 8 bits
    from modelport.layers import triton_moe_quant as tq
    from modelport.layers.moe_quant import QuantExperts
    from modelport.quantization.kernels import GroupQuant

    def gq(n, kk, group, bits):
        return GroupQuant(torch.randint(0, 1 << bits, (n, kk), generator=g, dtype=torch.uint8),
                          torch.rand(n, kk // group, generator=g) * 0.02 + 0.001,
                          -torch.rand(n, kk // group, generator=g) * 0.05 * (1 << bits) / 16,
                          group, bits)

    # (K steps of several groups, inside one group, and the fallback step where the config's
    # suits neither: one group over each whole K, as GPTQ's group -1 gives). One token (top-2:
    # the interpreter's programs go as assignments), three configs: gate/up (K 256, groups of
    # 128) in one step of two groups, two steps of one group, eight steps inside groups; down
    # (K 128, one group) in a step of two groups past K (masked words and groups), one step
    # of the group, four steps inside it. The others in the interpreter's config (8, 256):
    # 8-bit top-2 and 4-bit top-4 codes in a step past K (masked words and groups), and the
    # fallback steps of 64 and 32 over groups of 192 / 96
    for t, e, k, h, i, bits, g13, g2, cfgs in (
            (1, 6, 2, 256, 128, 4, 128, 128, ((8, 256, 4), (4, 128, 2), (16, 32, 4))),
            (3, 5, 2, 64, 32, 8, 32, 32, ((8, 256, 4),)),
            (2, 4, 4, 32, 32, 4, 32, 32, ((8, 256, 4),)),
            (1, 4, 2, 192, 96, 4, 192, 96, ((8, 256, 4),))):
        qe = QuantExperts.from_group_quant(
            [(gq(2 * i, h, g13, bits), gq(h, i, g2, bits)) for _ in range(e)])
        w, ids = tm.route_topk(torch.randn(t, e, generator=g) * 3, k, True)
        x = torch.randn(t, h, generator=g).half()
        d13, d2 = qe.dequantize()
        ref = moe_reference(x.float(), d13.half().float(), d2.half().float(), w, ids.long())
        for cfg in cfgs:
            y = tq.small_batch_experts_int(x, qe.q13, qe.s13, qe.z13, qe.q2, qe.s2, qe.z2, bits,
                                           qe.group13, qe.group2, w, ids, config=cfg)
            err = (y.float() - ref).abs().max().item() / ref.abs().max().item()
            assert y.shape == (t, h) and err < 2e-3, (t, bits, g13, cfg, err)
            print("ok int", t, bits, g13, cfg, f"{err:.1e}")

    # GPTQ act-order experts: the gate/up GEMV gathers x through perm13 (QuantExperts)
    for t, bits in ((1, 4), (3, 8)):
        e, k, h, i, group = 4, 2, 64, 32, 32  # two groups in gate/up's K, permuted
        parts = []
        for _ in range(e):
            pair = (gq(2 * i, h, group, bits), gq(h, i, group, bits))
            for p, kk in zip(pair, (h, i)):
                p.g_idx = torch.randperm(kk, generator=g) % (kk // group)
            parts.append(pair)
        qe = QuantExperts.from_group_quant(parts)
        w13 = torch.stack([p[0].dequantize() for p in parts])
        w2 = torch.stack([p[1].dequantize() for p in parts])
        w, ids = tm.route_topk(torch.randn(t, e, generator=g) * 3, k, True)
        x = torch.randn(t, h, generator=g).half()
        ref = moe_reference(x.float(), w13.half().float(), w2.half().float(), w, ids.long())
        y = tq.small_batch_experts_int(x, qe.q13, qe.s13, qe.z13, qe.q2, qe.s2, qe.z2, bits,
                                       qe.group13, qe.group2, w, ids, perm13=qe.perm13)
        err = (y.float() - ref).abs().max().item() / ref.abs().max().item()
        assert err < 2e-3, ("act-order", t, bits, err)
        print("ok act-order int", t, bits, f"{err:.1e}")
""")


def test_few_token_moe_kernels_match_the_reference_in_the_interpreter() -> None:
    pytest.importorskip("triton")
    out = run_interpreted(_SCRIPT)
    assert out.count("ok route") == 3 and out.count("ok experts") == 9, out
    assert out.count("ok fp8") == 3 and out.count("ok int ") == 6, out
    assert out.count("ok act-order int") == 2, out


def test_the_threshold_counts_assignments(monkeypatch) -> None:
    pytest.importorskip("triton")
    from modelport.layers import triton_moe as tm

    monkeypatch.setattr(tm, "MOE_GEMV_MAX", 32)
    monkeypatch.setattr(tm, "MOE_GEMV_INT", False)
    assert tm.moe_gemv_applies(1, 4) and tm.moe_gemv_applies(8, 4)
    assert not tm.moe_gemv_applies(9, 4) and not tm.moe_gemv_applies(0, 4)
    assert not tm.moe_gemv_applies(1, 4, integer=True)  # MODELPORT_MOE_GEMV_INT=0
    monkeypatch.setattr(tm, "MOE_GEMV_INT", True)
    assert tm.moe_gemv_applies(1, 4, integer=True) and not tm.moe_gemv_applies(9, 4, True)
    monkeypatch.setattr(tm, "MOE_GEMV_MAX", 0)  # MODELPORT_MOE_GEMV_MAX=0: off
    assert not tm.moe_gemv_applies(1, 1)


# -- CUDA ---------------------------------------------------------------------------------------


@pytest.mark.gpu
@pytest.mark.parametrize("fp8", [False, True])
def test_cuda_few_token_experts_on_the_qwen_moe_shape_and_in_a_graph(fp8: bool) -> None:
    from modelport.layers import triton_moe as tm
    from modelport.layers.fused_moe import moe_reference, route
    from modelport.quantization.fp8 import quantize_fp8_per_channel

    g = torch.Generator().manual_seed(0)
    e, k, h, i = 60, 4, 2048, 1408
    w13 = (torch.randn(e, 2 * i, h, generator=g) * 0.02).bfloat16().cuda()
    w2 = (torch.randn(e, h, i, generator=g) * 0.02).bfloat16().cuda()
    scales: tuple = ()
    if fp8:
        q13, s13 = zip(*(quantize_fp8_per_channel(w13[j]) for j in range(e)))
        q2, s2 = zip(*(quantize_fp8_per_channel(w2[j]) for j in range(e)))
        q13, s13, q2, s2 = (torch.stack(a) for a in (q13, s13, q2, s2))
        w13, w2 = q13, q2
        scales = (s13, s2)
        d13, d2 = q13.float() * s13[..., None], q2.float() * s2[..., None]
    else:
        d13, d2 = w13.float(), w2.float()
    for t in (1, 8):
        x = torch.randn(t, h, generator=g).bfloat16().cuda()
        logits = (torch.randn(t, e, generator=g) * 3).cuda()
        w, ids = tm.route_topk(logits, k, False)
        w_ref, ids_ref = route(logits, k, False)
        assert torch.equal(ids.long(), ids_ref)
        ref = moe_reference(x.float(), d13, d2, w_ref, ids_ref)
        y = tm.small_batch_experts(x, w13, w2, w, ids, *scales)  # autotunes, eagerly
        assert ((y.float() - ref).abs().max() / ref.abs().max()).item() < 1e-2
        graph = torch.cuda.CUDAGraph()  # captured, replayed with another routing
        with torch.cuda.graph(graph):
            rw, rids = tm.route_topk(logits, k, False)
            out = tm.small_batch_experts(x, w13, w2, rw, rids, *scales)
        logits.copy_((torch.randn(t, e, generator=g) * 3).cuda())
        graph.replay()
        w_ref, ids_ref = route(logits, k, False)
        ref = moe_reference(x.float(), d13, d2, w_ref, ids_ref)
        assert ((out.float() - ref).abs().max() / ref.abs().max()).item() < 1e-2


@pytest.mark.gpu
def test_cuda_few_token_integer_experts_and_in_a_graph(monkeypatch) -> None:
    from modelport.layers import triton_moe as tm
    from modelport.layers import triton_moe_quant as tq
    from modelport.layers.fused_moe import moe_reference
    from modelport.layers.moe_quant import QuantExperts
    from modelport.quantization.kernels import GroupQuant

    monkeypatch.setattr(tm, "MOE_GEMV_INT", True)  # the default (MODELPORT_MOE_GEMV_INT=1)
    g = torch.Generator().manual_seed(0)
    e, k, h, i, group = 16, 4, 2048, 1408, 128

    def gq(n, kk):
        return GroupQuant(torch.randint(0, 16, (n, kk), generator=g, dtype=torch.uint8),
                          torch.rand(n, kk // group, generator=g) * 0.002 + 0.0005,
                          -torch.rand(n, kk // group, generator=g) * 0.01, group, 4)

    qe = QuantExperts.from_group_quant([(gq(2 * i, h), gq(h, i)) for _ in range(e)])
    d13, d2 = (d.cuda() for d in qe.dequantize())
    qe = qe.cuda()
    q = (qe.q13, qe.s13, qe.z13, qe.q2, qe.s2, qe.z2, 4, group, group)
    for t in (1, 8):
        x = torch.randn(t, h, generator=g).bfloat16().cuda()
        logits = (torch.randn(t, e, generator=g) * 3).cuda()
        w, ids = tm.route_topk(logits, k, True)
        ref = moe_reference(x.float(), d13, d2, w, ids.long())
        y = tq.small_batch_experts_int(x, *q, w, ids)
        assert ((y.float() - ref).abs().max() / ref.abs().max()).item() < 1e-2
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            rw, rids = tm.route_topk(logits, k, True)
            out = tq.fused_experts_wint(x, *q, rw, rids)  # the few-token path it dispatches to
        logits.copy_((torch.randn(t, e, generator=g) * 3).cuda())
        graph.replay()
        w, ids = tm.route_topk(logits, k, True)
        ref = moe_reference(x.float(), d13, d2, w, ids.long())
        assert ((out.float() - ref).abs().max() / ref.abs().max()).item() < 1e-2


@pytest.mark.gpu
def test_cuda_model_with_few_token_experts_equals_the_grouped_gemm(tmp_path: Path,
                                                                    monkeypatch) -> None:
    """A Qwen2-MoE (shared expert) in bf16 with CUDA graphs: decode through route_topk and the
    GEMVs against MODELPORT_MOE_GEMV_MAX=0 (the grouped GEMM for every batch)."""
    from modelport import LLM, SamplingParams
    from modelport.layers import triton_moe as tm

    d = make_tiny_moe_dir(tmp_path / "m", "qwen2_moe")
    prompts = [TINY_PROMPT[:23], [5, 9, 200], TINY_PROMPT[30:41]]
    params = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True, logprobs=2)
    runs = {}
    for limit in (32, 0):
        monkeypatch.setattr(tm, "MOE_GEMV_MAX", limit)
        llm = LLM(str(d), device="cuda", dtype="bfloat16", kv_cache_memory=64 << 20,
                  max_model_len=512)
        assert llm.llm_engine.core.runner.graphs is not None
        outs = llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
        runs[limit] = [o.outputs[0] for o in outs]
        del llm
        torch.cuda.empty_cache()
    for a, b in zip(runs[32], runs[0]):
        assert a.token_ids[:4] == b.token_ids[:4]
        for da, db in zip(a.logprobs[:4], b.logprobs[:4]):
            for tok, lp in da.items():
                if tok in db:
                    assert abs(lp.logprob - db[tok].logprob) < 0.05


def test_few_token_kernels_compile_for_sm90_without_spills() -> None:
    pytest.importorskip("triton.backends.nvidia")
    sys.path.insert(0, str(ROOT / "bench" / "gpu"))
    import kernel_regs

    from modelport.layers import triton_moe as tm

    strides = dict.fromkeys(("stride_we", "stride_wn", "stride_se"), "i32")
    for wt, scaled in (("bf16", False), ("fp8e4nv", True)):
        for bn, bk, warps in tm.MOE_GEMV_CONFIGS:
            const = dict(TOP_K=4, HAS_SCALE=scaled, BLOCK_N=bn, BLOCK_K=bk)
            sig = dict(x_ptr="*bf16", w_ptr=f"*{wt}", s_ptr="*fp32", ids_ptr="*i32",
                       act_ptr="*bf16", INTER="i32", HIDDEN="i32", stride_xm="i32",
                       stride_am="i32", **strides)
            r = kernel_regs.compile_sm90(tm.moe_gemv_gate_up_kernel, sig, const,
                                         ("x_ptr", "w_ptr", "HIDDEN", "stride_xm"), warps, 2,
                                         loops=False)
            assert 0 < r["regs"] <= 255 and r["stack"] == 0 and r["sass_instr"] > 50, r
            sig = dict(act_ptr="*bf16", w_ptr=f"*{wt}", s_ptr="*fp32", ids_ptr="*i32",
                       rw_ptr="*fp32", y_ptr="*bf16", HIDDEN="i32", INTER="i32",
                       stride_am="i32", stride_ym="i32", **strides)
            r = kernel_regs.compile_sm90(tm.moe_gemv_down_kernel, sig, const,
                                         ("act_ptr", "w_ptr", "stride_am"), warps, 2,
                                         loops=False)
            assert 0 < r["regs"] <= 255 and r["stack"] == 0 and r["sass_instr"] > 50, r
    from modelport.layers import triton_moe_quant as tq

    strides = dict.fromkeys(("stride_qe", "stride_qn", "stride_se", "stride_sn"), "i32")
    for bits in (4, 8):
        for bn, bk, warps in tq.INT_GEMV_CONFIGS:
            const = dict(TOP_K=4, BITS=bits, GROUP=128, BLOCK_N=bn, BLOCK_K=bk)
            common = dict(q_ptr="*i32", s_ptr="*fp32", z_ptr="*fp32", ids_ptr="*i32",
                          HIDDEN="i32", INTER="i32", stride_am="i32", mag_a="i32",
                          mag_b="i32", **strides)
            for perm in (False, True):  # GPTQ act-order: x gathered through perm
                r = kernel_regs.compile_sm90(
                    tq.moe_gemv_int_gate_up_kernel,
                    dict(x_ptr="*bf16", act_ptr="*bf16", stride_xm="i32", perm_ptr="*i32",
                         **common), dict(const, HAS_PERM=perm),
                    ("x_ptr", "q_ptr", "HIDDEN", "stride_xm"), warps, 2, loops=False)
                assert 0 < r["regs"] <= 255 and r["stack"] == 0 and r["sass_instr"] > 50, (
                    bits, bk, perm, r)
            r = kernel_regs.compile_sm90(
                tq.moe_gemv_int_down_kernel,
                dict(act_ptr="*bf16", rw_ptr="*fp32", y_ptr="*bf16", stride_ym="i32", **common),
                const, ("act_ptr", "q_ptr", "stride_am"), warps, 2, loops=False)
            assert 0 < r["regs"] <= 255 and r["stack"] == 0 and r["sass_instr"] > 50, (bits, bk, r)
    sig = dict(logits_ptr="*bf16", weights_ptr="*fp32", ids_ptr="*i32", E="i32",
               stride_l="i32")
    r = kernel_regs.compile_sm90(tm.route_topk_kernel, sig,
                                 dict(TOP_K=4, KP=4, BLOCK_E=64, RENORM=True), (), 1, 1,
                                 loops=False)
    assert 0 < r["regs"] <= 255 and r["stack"] == 0, r


@pytest.mark.gpu
def test_cuda_router_and_shared_gate_take_the_gemv_at_one_row(monkeypatch) -> None:
    from modelport.layers.fused_moe import GateLinear
    from modelport.layers.triton_gemv import use_gemv_for_decode

    router = GateLinear(512, 60).to("cuda", torch.bfloat16)
    gate = GateLinear(512, 1).to("cuda", torch.bfloat16)
    for lin in (router, gate):
        lin.weight.data.normal_(0, 0.05)
    one = torch.randn(1, 512, device="cuda", dtype=torch.bfloat16)
    few = torch.randn(3, 512, device="cuda", dtype=torch.bfloat16)
    before = [(lin(one), lin(few)) for lin in (router, gate)]
    monkeypatch.setenv("MODELPORT_GEMV_GATES", "0")
    assert use_gemv_for_decode(torch.nn.Sequential(router, gate)) == 0
    monkeypatch.setenv("MODELPORT_GEMV_GATES", "1")
    assert use_gemv_for_decode(torch.nn.Sequential(router, gate)) == 2
    for lin, (b1, b3) in zip((router, gate), before):
        assert type(lin).__name__ == "GemvGateLinear" and isinstance(lin, GateLinear)
        got = lin(one).float()
        assert ((got - b1.float()).norm() / b1.float().norm()).item() < 1e-2
        assert torch.equal(lin(few), b3)  # more rows: cuBLAS as before
