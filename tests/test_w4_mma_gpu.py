"""The experimental tensor-core W4 GEMV (quantization/triton_w4mma.py) against a float32
reference dequantization: random shapes, group sizes, K splits, 1-4 rows, bf16 and fp16,
and CUDA-graph replays (the split counters reset)."""

from __future__ import annotations

import pytest
import torch

pytestmark = pytest.mark.gpu


def _case(n, k, group, dtype, m, seed=0):
    from modelport.quantization.triton_gemm import pack_pairs, pack_scales

    g = torch.Generator(device="cuda").manual_seed(seed)
    codes = torch.randint(0, 16, (n, k), generator=g, device="cuda", dtype=torch.uint8)
    s = torch.rand(n, k // group, generator=g, device="cuda") * 0.02 + 0.001
    z = -torch.randint(0, 16, (n, k // group), generator=g, device="cuda").float() * s
    # the reference with the fp16 scale / zero the kernel reads
    s16, z16 = s.half().float(), z.half().float()
    w = codes.float() * s16.repeat_interleave(group, 1) + z16.repeat_interleave(group, 1)
    x = torch.randn(m, k, generator=g, device="cuda").to(dtype)
    return x, pack_pairs(codes), pack_scales(s, z), x.float() @ w.T


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("n,k,group,block_n,split,warps", [
    (6144, 4096, 128, 128, 2, 4), (4096, 14336, 128, 128, 8, 4), (300, 1024, 64, 64, 4, 4),
    (1000, 2048, 128, 256, 1, 8), (64, 512, 32, 64, 2, 4)])
def test_w4_mma_matches_reference_dequantization(dtype, n, k, group, block_n, split, warps):
    from modelport.quantization import triton_w4mma as wm

    for m in (1, 2, 4):
        x, q, sz, ref = _case(n, k, group, dtype, m)
        y = wm.w4_mma(x, q, sz, n, group, block_n, split, warps)
        assert y.shape == (m, n) and y.dtype == dtype
        assert ((y.float() - ref).norm() / ref.norm()).item() < 5e-3


def test_w4_mma_graph_replays_equal_eager_calls():
    from modelport.quantization import triton_w4mma as wm

    x, q, sz, _ = _case(4096, 4096, 128, torch.bfloat16, 1)
    eager = wm.w4_mma(x, q, sz, 4096, 128, 128, 8)
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        wm.w4_mma(x, q, sz, 4096, 128, 128, 8)
    torch.cuda.current_stream().wait_stream(s)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        y = wm.w4_mma(x, q, sz, 4096, 128, 128, 8)
    for _ in range(5):
        graph.replay()
        assert torch.equal(y, eager)


def test_w4_mma_refuses_unsupported_shapes():
    from modelport.quantization import triton_w4mma as wm

    x = torch.randn(5, 256, device="cuda", dtype=torch.bfloat16)
    q = torch.zeros(64, 32, device="cuda", dtype=torch.int32)
    sz = torch.zeros(64, 2, device="cuda", dtype=torch.int32)
    with pytest.raises(ValueError, match="unsupported"):
        wm.w4_mma(x, q, sz, 64, 128)


@pytest.mark.parametrize("act_order", [False, True])
def test_opt_in_w4_mma_serves_the_quantized_linear_rows(monkeypatch, act_order):
    """MODELPORT_W4_MMA=1 (W4_MMA): a 4-bit TritonKernel keeps a pair-packed copy and its 1-4
    row calls run the tensor-core GEMV, equal to the reference (and to the plain GEMV)."""
    from modelport.quantization import triton_gemm as tg
    from test_quant_gpu import _random_gq

    gq = _random_gq(768, 1024, 4, 128, act_order, seed=3)
    plain = tg.TritonKernel(gq, torch.device("cuda"))
    monkeypatch.setattr(tg, "W4_MMA", True)
    kern = tg.TritonKernel(gq, torch.device("cuda"))
    assert plain.mma_split == 0 and kern.mma_split > 0 and kern.qweight_pairs is not None
    for m in (1, 3):
        x = torch.randn(m, 1024, generator=torch.Generator().manual_seed(m)).to("cuda",
                                                                               torch.bfloat16)
        ref = x.float() @ gq.dequantize().cuda().t()
        got = kern(x).float()
        tol = 2e-2 * ref.abs().max().item()
        torch.testing.assert_close(got, ref, atol=tol, rtol=0)
        torch.testing.assert_close(got, plain(x).float(), atol=tol, rtol=0)
