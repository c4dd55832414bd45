"""The skinny-GEMV kernel used for small decode batches on CUDA, against float32 matmul."""

from __future__ import annotations

import pytest
import torch

pytestmark = pytest.mark.gpu


@pytest.mark.parametrize("m", [1, 2, 3, 4])
@pytest.mark.parametrize("n,k", [(6144, 4096), (4096, 14336), (1000, 1000), (37, 4099)])
def test_gemv_matches_float32_matmul(m, n, k):
    from modelport.layers.triton_gemv import gemv

    x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
    w = torch.randn(n, k, device="cuda", dtype=torch.bfloat16) * 0.02
    b = torch.randn(n, device="cuda", dtype=torch.bfloat16)
    ref = x.float() @ w.float().T + b.float()
    y = gemv(x, w, b)
    assert y.shape == (m, n) and y.dtype == torch.bfloat16
    assert ((y.float() - ref).norm() / ref.norm()).item() < 5e-3


def test_gemv_swap_routes_single_rows_and_leaves_larger_batches_to_cublas():
    from modelport.layers.linear import QKVLinear
    from modelport.layers.triton_gemv import use_gemv_for_decode

    lin = QKVLinear(256, 64, 4, 2).to("cuda", torch.bfloat16)
    lin.weight.data.normal_(0, 0.05)
    one = torch.randn(1, 256, device="cuda", dtype=torch.bfloat16)
    few = torch.randn(3, 256, device="cuda", dtype=torch.bfloat16)
    big = torch.randn(64, 256, device="cuda", dtype=torch.bfloat16)
    before_one, before_few, before_big = lin(one), lin(few), lin(big)
    assert use_gemv_for_decode(torch.nn.Sequential(lin)) == 1
    assert type(lin).__name__ == "GemvQKVLinear" and lin.split(lin(one))[0].shape == (1, 256)
    got = lin(one).float()
    assert ((got - before_one.float()).norm() / before_one.float().norm()) < 1e-2
    assert torch.equal(lin(few), before_few) and torch.equal(lin(big), before_big)


@pytest.mark.parametrize("lane_acc", [False, True])
@pytest.mark.parametrize("block_n,block_k", [(8, 512), (16, 256)])
@pytest.mark.parametrize("m,n,k", [(1, 6144, 4096), (4, 1024, 4096), (1, 37, 4099), (3, 40, 700)])
def test_gemv_block_shapes_and_lane_accumulation(lane_acc, block_n, block_k, m, n, k):
    """Fixed launch configs (both accumulation schemes, masked and mask-free shapes)."""
    from modelport.layers.triton_gemv import gemv

    x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
    w = torch.randn(n, k, device="cuda", dtype=torch.bfloat16) * 0.02
    ref = x.float() @ w.float().T
    y = gemv(x, w, None, block_n=block_n, block_k=block_k, lane_acc=lane_acc)
    assert ((y.float() - ref).norm() / ref.norm()).item() < 5e-3


def _rms(h, w, eps):
    hf = h.float()
    return w * (hf * torch.rsqrt(hf.pow(2).mean(-1, keepdim=True) + eps)).to(h.dtype)


@pytest.mark.parametrize("lane_acc", [False, True])
@pytest.mark.parametrize("n,k", [(6144, 4096), (4096, 14336), (300, 1000)])
def test_fused_prologues_and_residual_equal_the_unfused_ops(lane_acc, n, k):
    """norm / silu prologues, the GLU epilogue and the residual epilogue give what the
    unfused torch ops feed / make of the same GEMV: equal outputs up to the odd last-bit flip
    of a rounded intermediate."""
    import torch.nn.functional as F

    from modelport.layers.triton_gemv import gemv

    torch.manual_seed(0)
    bf = torch.bfloat16
    w = torch.randn(n, k, device="cuda", dtype=bf) * 0.02
    b = torch.randn(n, device="cuda", dtype=bf)
    h = torch.randn(1, k, device="cuda", dtype=bf) * 3
    nw = (1 + 0.2 * torch.randn(k, device="cuda")).to(bf)
    res = torch.randn(1, n, device="cuda", dtype=bf)
    gu = torch.randn(1, 2 * k, device="cuda", dtype=bf)
    cfg = {"block_n": 8, "block_k": 512, "lane_acc": lane_acc}
    w2 = torch.randn(2 * n, k, device="cuda", dtype=bf) * 0.02  # [gate; up]
    b2 = torch.randn(2 * n, device="cuda", dtype=bf)
    g_u = gemv(_rms(h, nw, 1e-5), w2, b2, **cfg)
    # (fused, unfused, same launch config: then bit-equal but for rare last-bit flips)
    cases = [
        (gemv(h, w, b, norm=(nw, 1e-5), **cfg), gemv(_rms(h, nw, 1e-5), w, b, **cfg), True),
        (gemv(gu, w, None, silu=True, **cfg),
         gemv(F.silu(gu[:, :k]) * gu[:, k:], w, None, **cfg), True),
        (gemv(h, w, b, residual=res, **cfg), gemv(h, w, b, **cfg) + res, True),
        (gemv(h, w2, b2, norm=(nw, 1e-5), glu=True, **cfg),
         F.silu(g_u[:, :n]) * g_u[:, n:], True),
        (gemv(gu, w, b, silu=True, residual=res),  # autotuned launches
         gemv(F.silu(gu[:, :k]) * gu[:, k:], w, b) + res, False),
        (gemv(h, w, None, norm=(nw, 1e-6)), gemv(_rms(h, nw, 1e-6), w, None), False),
    ]
    for got, want, same_config in cases:
        assert got.shape == want.shape == (1, n) and got.dtype == bf
        assert ((got.float() - want.float()).norm() / want.float().norm()).item() < 5e-3
        if same_config:
            assert (got == want).float().mean().item() > 0.95


def test_fusions_refuse_more_than_one_row():
    from modelport.layers.triton_gemv import gemv

    x = torch.randn(2, 64, device="cuda", dtype=torch.bfloat16)
    w = torch.randn(32, 64, device="cuda", dtype=torch.bfloat16)
    with pytest.raises(ValueError, match="one row"):
        gemv(x, w, residual=torch.zeros(2, 32, device="cuda", dtype=torch.bfloat16))
    with pytest.raises(ValueError, match="features"):
        gemv(x[:1], w, silu=True)
