"""The Triton FP8 x FP8 GEMM (triton_fp8.w8a8) with K split across programs (SPLIT_K > 1,
MODELPORT_FP8_SPLIT_K): in the Triton interpreter against the float reference of the same
E4M3 operands (partial tiles on every axis, a K that the slices do not divide, per-channel and
per-tensor scales, bias), the slices' sum equal bit for bit to the one-program result,
counters left at zero after each launch (the next launch or graph replay starts clean), and
which shapes may take the split configs; every W8A8 config compiled for sm_90 without
register spills (and with PDL's wait, for two of them)."""

from __future__ import annotations

import sys
import textwrap
from pathlib import Path

import pytest

from helpers.triton_interp import run_interpreted

ROOT = Path(__file__).resolve().parents[1]

_SCRIPT = textwrap.dedent("""
    import torch
    from modelport.quantization import triton_fp8 as t

    w8a8 = t._jit()[2]
    g = torch.Generator().manual_seed(0)
    # (M, N, K, BLOCK_M, BLOCK_N, BLOCK_K, splits): K = 640 in steps of 128 is 5 steps, so 2
    # slices take 3 + 2 and 4 slices 2 + 2 + 1 + 0 (an empty slice stores zeros)
    cases = [(20, 200, 640, 16, 64, 128, (1, 2, 4)), (37, 72, 520, 32, 64, 128, (1, 2, 3))]
    for m, n, k, bm, bn, bk, splits in cases:
        x = torch.randn(m, k, generator=g)
        w = torch.randn(n, k, generator=g)
        xq = (x * 40).to(torch.float8_e4m3fn)
        wq = (w * 40).to(torch.float8_e4m3fn)
        xs = torch.rand(m, 1, generator=g) * 0.01 + 0.001
        bias = torch.randn(n, generator=g).to(torch.bfloat16)
        for per_channel in (True, False):
            ws = torch.rand(n if per_channel else 1, generator=g) * 0.01 + 0.001
            ref = (xq.float() * xs) @ (wq.float() * ws.reshape(-1, 1)).t() + bias.float()
            tiles = t._cdiv(m, bm) * t._cdiv(n, bn)
            outs = {}
            for sk in splits:
                part = torch.full((sk * m * n,), float("nan"))  # every read slot is written first
                cnt = torch.zeros(tiles, dtype=torch.int32)
                for rep in range(2):  # a second launch on the same counters
                    y = torch.full((m, n), float("nan"), dtype=torch.bfloat16)
                    w8a8[(tiles, sk)](
                        xq, xs, wq, ws, bias, y, part, cnt, m, n, k, t._next_pow2(m), int(sk > 1),
                        xq.stride(0), wq.stride(0), y.stride(0),
                        PER_CHANNEL=per_channel, HAS_BIAS=True, BLOCK_M=bm, BLOCK_N=bn,
                        BLOCK_K=bk, SPLIT_K=sk)
                    assert int(cnt.abs().sum()) == 0, (sk, cnt)
                    err = (y.float() - ref).abs().max().item() / ref.abs().max().item()
                    assert err < 1e-2, (m, n, k, sk, per_channel, err)
                    outs.setdefault(sk, y)
                    assert torch.equal(outs[sk], y), (sk, "launches differ")
            # fp32 partials added in slice order: the same tile sums as one program's up to
            # the order of additions, so within bf16 rounding of each other
            for sk, y in outs.items():
                torch.testing.assert_close(y.float(), outs[1].float(), rtol=1e-2,
                                           atol=1e-2 * ref.abs().max().item())
            print("ok", m, n, k, per_channel, sorted(outs))
""")


def test_split_k_w8a8_matches_the_reference_in_the_triton_interpreter() -> None:
    pytest.importorskip("triton")
    out = run_interpreted(_SCRIPT)
    assert out.count("ok") == 4, out


def test_which_shapes_take_split_configs(monkeypatch: pytest.MonkeyPatch) -> None:
    from modelport.quantization import triton_fp8 as t

    monkeypatch.setattr(t, "SPLIT_K", True)
    assert t.split_fits(256, 4096) and t.split_fits(16, 6144)
    assert not t.split_fits(512, 4096)  # prefill-sized row counts: tiles enough
    assert not t.split_fits(64, 28672)  # gate/up of an 8B model: tiles enough
    monkeypatch.setattr(t, "SPLIT_K", False)  # the switch off: no split config at all
    assert not t.split_fits(16, 4096)
    # the scratch holds the largest split of the largest tile grid the configs allow
    assert max(c[5] for c in t.W8A8_CONFIGS) <= t.SPLIT_K_MAX
    assert all(c[0] >= 16 and c[1] >= 64 for c in t.W8A8_CONFIGS if c[5] > 1)


def test_every_w8a8_config_compiles_for_sm90() -> None:
    pytest.importorskip("triton.backends.nvidia")
    sys.path.insert(0, str(ROOT / "bench" / "gpu"))
    import kernel_regs

    from modelport.quantization import triton_fp8 as t

    fn = t._jit()[2]
    sig = dict(xq_ptr="*fp8e4nv", xs_ptr="*fp32", w_ptr="*fp8e4nv", ws_ptr="*fp32",
               b_ptr="*bf16", y_ptr="*bf16", part_ptr="*fp32", cnt_ptr="*i32", M="i32",
               N="i32", K="i32", M_BUCKET="i32", SPLIT_OK="i32", stride_xm="i32", stride_wn="i32",
               stride_ym="i32")
    div = ("xq_ptr", "xs_ptr", "w_ptr", "ws_ptr", "b_ptr", "y_ptr", "part_ptr", "N", "K",
           "stride_xm", "stride_wn", "stride_ym")
    # every config plainly; with PDL (MODELPORT_FP8_W8A8_PDL) a split and an unsplit one
    cases = [(c, False) for c in t.W8A8_CONFIGS]
    cases += [(next(c for c in t.W8A8_CONFIGS if c[5] == sk), True) for sk in (1, 2)]
    for (bm, bn, bk, warps, stages, sk), with_pdl in cases:
        const = dict(PER_CHANNEL=True, HAS_BIAS=False, BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk,
                     SPLIT_K=sk, PDL=with_pdl)
        r = kernel_regs.compile_sm90(fn, sig, const, div, warps, stages, loops=False)
        assert r["stack"] == 0 and 0 < r["regs"] <= 255, (bm, bn, bk, sk, with_pdl, r)
        assert r["programs_per_sm"] >= 1, (bm, bn, bk, sk, with_pdl, r)
