"""The streamed single-row fusions of the Triton GEMV (``MODELPORT_FUSED_DECODE=2``), run in
the Triton interpreter: the RMSNorm applied after the loop (``norm_after``) and the GLU over
interleaved gate/up rows (``interleaved``), against float64 references, at launch configs
whose blocks leave masked rows and columns; and the interleaved SiLU-and-mul kernel of the
multi-row path."""

from __future__ import annotations

import textwrap

import pytest

from helpers.triton_interp import run_interpreted

_SCRIPT = textwrap.dedent("""
    import torch
    import torch.nn.functional as F
    from modelport.layers import fused_ops as fo
    from modelport.layers import triton_gemv as tg

    torch.manual_seed(0)
    dt = torch.bfloat16

    # |got - want| in bf16 ulps at want (8 significant bits). One ulp is allowed: the
    # interpreter's float32 -> bf16 cast truncates (a plain GEMV is 0.98 ulp off here too)
    # where the GPU rounds to nearest
    def ulps(got, want):
        ulp = torch.exp2(torch.floor(torch.log2(want.abs().clamp_min(2.0 ** -20))) - 7)
        return ((got.double() - want).abs() / ulp).max().item()

    # (n, k, launch): N and K off the block multiples, both accumulation layouts
    for n, k, cfg in [(33, 1000, (4, 512, False)), (20, 1536, (8, 256, True)),
                      (24, 512, (16, 512, True))]:
        x = torch.randn(1, k).to(dt)
        nw = (1 + 0.2 * torch.randn(k)).to(dt)
        eps = 1e-5
        rstd = 1 / torch.sqrt(x.double().pow(2).mean() + eps)
        xn = x.double() * nw.double()  # the normed row before 1/rms, never rounded

        w = (torch.randn(n, k) * 0.05).to(dt)
        b = torch.randn(n).to(dt)
        y = tg.gemv(x, w, b, *cfg[:2], lane_acc=cfg[2], norm=(nw, eps), norm_after=True)
        want = (xn @ w.double().T) * rstd + b.double()
        assert ulps(y, want) <= 1.0, ("norm_after", n, k, cfg, ulps(y, want))

        w2 = (torch.randn(2 * n, k) * 0.05).to(dt)
        b2 = torch.randn(2 * n).to(dt)
        wi, bi = tg.interleave_glu(w2), tg.interleave_glu(b2)
        assert torch.equal(wi[1::2], w2[n:]) and torch.equal(bi[::2], b2[:n])
        glu2 = tg.gemv(x, wi, bi, *cfg[:2], lane_acc=cfg[2], glu=True, interleaved=True)
        glu1 = tg.gemv(x, w2, b2, *cfg[:2], lane_acc=cfg[2], glu=True)
        assert glu2.shape == (1, n) and torch.equal(glu2, glu1), ("interleaved", n, k, cfg)

        both = tg.gemv(x, wi, None, *cfg[:2], lane_acc=cfg[2], glu=True, interleaved=True,
                       norm=(nw, eps), norm_after=True)
        gu = ((xn @ w2.double().T) * rstd).to(dt).double()  # gate and up rounded as stored
        act = F.silu(gu[:, :n]).to(dt).double() * gu[:, n:]
        assert ulps(both, act) <= 1.0, ("norm_after + interleaved", n, k, cfg)
        print("ok", n, k, round(ulps(y, want), 3), round(ulps(both, act), 3))

    # the multi-row path's SiLU over the interleaved layout
    for rows, n in [(3, 1500), (1, 7)]:
        g_u = torch.randn(rows, 2 * n).to(dt)
        pairs = torch.stack((g_u[:, :n], g_u[:, n:]), -1).reshape(rows, 2 * n)
        assert torch.equal(fo.silu_and_mul(pairs, interleaved=True), fo.silu_and_mul(g_u))
        print("ok silu", rows, n)
""")


def test_streamed_fusions_match_references_in_the_interpreter() -> None:
    pytest.importorskip("triton")
    out = run_interpreted(_SCRIPT)
    assert out.count("ok ") == 5, out


def test_streamed_fusions_refuse_what_they_cannot_fuse() -> None:
    import torch

    from modelport.layers import triton_gemv as tg

    x, w = torch.zeros(1, 8), torch.zeros(4, 8)
    with pytest.raises(ValueError, match="norm_after takes norm"):
        tg.gemv(x, w, norm_after=True)
    with pytest.raises(ValueError, match="interleaved takes glu"):
        tg.gemv(x, w, interleaved=True)


def test_interleaved_silu_module_matches_the_plain_one_off_cuda() -> None:
    """The torch branch of InterleavedSiluAndMul (CPU tensors, prefill rows on a CPU)."""
    import torch

    from modelport.layers.activation import SiluAndMul
    from modelport.layers.fused_ops import InterleavedSiluAndMul

    g_u = torch.randn(5, 2 * 6)
    pairs = torch.stack((g_u[:, :6], g_u[:, 6:]), -1).reshape(5, 12)
    assert torch.equal(InterleavedSiluAndMul()(pairs), SiluAndMul()(g_u))
