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
