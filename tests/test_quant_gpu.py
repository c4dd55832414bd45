"""CUDA kernels against the reference dequantization (run on the GPU machine: -m gpu)."""

from __future__ import annotations

import pytest
import torch

from modelport.quantization.kernels import GroupQuant, make_kernel

pytestmark = pytest.mark.gpu


def _random_gq(n: int, k: int, bits: int, group: int, act_order: bool, seed: int) -> GroupQuant:
    gen = torch.Generator().manual_seed(seed)
    codes = torch.randint(0, 1 << bits, (n, k), generator=gen, dtype=torch.int32).to(torch.uint8)
    scales = torch.rand(n, k // group, generator=gen) * 0.02 + 0.001
    zeros = -scales * torch.randint(0, 1 << bits, (n, k // group), generator=gen).float()
    g_idx = None
    if act_order:
        perm = torch.randperm(k, generator=gen)
        g_idx = torch.empty(k, dtype=torch.long)
        g_idx[perm] = torch.arange(k) // group
    return GroupQuant(codes, scales, zeros, group, bits, g_idx)


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("group", [32, 64, 128])
@pytest.mark.parametrize("act_order", [False, True])
def test_triton_gemm_matches_reference(bits: int, group: int, act_order: bool) -> None:
    from modelport.quantization.triton_gemm import TritonKernel, available

    assert available(), "Triton must be importable on the GPU machine"
    for i, (n, k, m) in enumerate([(256, 512, 1), (384, 1024, 7), (512, 256, 64), (1000, 768, 300)]):
        gq = _random_gq(n, k, bits, group, act_order, seed=i)
        kern = TritonKernel(gq, torch.device("cuda"))
        assert type(make_kernel(gq, torch.device("cuda"))) is TritonKernel
        for dtype in (torch.bfloat16, torch.float16):
            x = torch.randn(m, k, generator=torch.Generator().manual_seed(i)).to("cuda", dtype)
            ref = x.float() @ gq.dequantize().cuda().t()
            got = kern(x).float()
            tol = 2e-2 * ref.abs().max().item()
            torch.testing.assert_close(got, ref, atol=tol, rtol=0)


def test_triton_gemm_handles_gguf_q6k_group16() -> None:
    from modelport.quantization.triton_gemm import TritonKernel

    gq = _random_gq(128, 512, 6, 16, False, seed=9)
    x = torch.randn(5, 512, device="cuda", dtype=torch.bfloat16)
    ref = x.float() @ gq.dequantize().cuda().t()
    torch.testing.assert_close(TritonKernel(gq, torch.device("cuda"))(x).float(), ref,
                               atol=2e-2 * ref.abs().max().item(), rtol=0)


@pytest.mark.parametrize("m", [1, 16, 64, 200])
def test_fp8_scaled_mm_matches_reference(m: int) -> None:
    from modelport.quantization.fp8 import fp8_scaled_mm, fp8_supported, quantize_fp8_per_channel

    if not fp8_supported(torch.cuda.get_device_capability()):
        pytest.fail("the GPU machine is expected to support FP8 (H100/H200)")
    w = torch.randn(768, 512, device="cuda") * 0.05
    q, s = quantize_fp8_per_channel(w)
    x = torch.randn(m, 512, device="cuda", dtype=torch.bfloat16)
    bias = torch.randn(768, device="cuda", dtype=torch.bfloat16)
    ref = x.float() @ (q.float() * s[:, None]).t() + bias.float()
    got = fp8_scaled_mm(x, q, s, bias).float()
    torch.testing.assert_close(got, ref, atol=0.05 * ref.abs().max().item(), rtol=0)
