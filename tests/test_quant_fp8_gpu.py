"""FP8 CUDA paths against torch references (run on the GPU machine: -m gpu).

The fused per-token quantizer against the torch ops it replaces, the Triton W8A16 kernel (every
program shape, and the autotuned entry) and the fused-quant + ``_scaled_mm`` path against the
dequantized reference, the batch-size dispatch, and capture in a CUDA graph.
"""

from __future__ import annotations

import pytest
import torch

from modelport.quantization import fp8, triton_fp8
from modelport.quantization.fp8 import (
    fp8_linear,
    fp8_scaled_mm,
    fp8_triton_mm,
    quantize_fp8_per_channel,
    quantize_fp8_per_token_torch,
)

pytestmark = pytest.mark.gpu


@pytest.fixture(autouse=True)
def _needs_fp8() -> None:
    if not fp8.fp8_supported(torch.cuda.get_device_capability()):
        pytest.fail("the GPU machine is expected to support FP8 (H100/H200)")
    assert triton_fp8.available(), "Triton must be importable on the GPU machine"


def _weight(n: int, k: int, per_channel: bool, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    w = torch.randn(n, k, generator=torch.Generator().manual_seed(seed)).cuda() * 0.05
    if per_channel:
        return quantize_fp8_per_channel(w)
    s = (w.abs().max() / 448.0).reshape(1)
    return (w / s).clamp(-448, 448).to(torch.float8_e4m3fn), s


def _ref(x: torch.Tensor, q: torch.Tensor, s: torch.Tensor, bias: torch.Tensor | None):  # noqa: ANN202
    y = x.float() @ (q.float() * s.reshape(-1, 1)).t()
    return y if bias is None else y + bias.float()


@pytest.mark.parametrize(
    ("m", "k", "dtype"),
    [(1, 4096, torch.bfloat16), (7, 14336, torch.bfloat16), (300, 4096, torch.bfloat16),
     (33, 1000, torch.float16), (5, 256, torch.float32), (3, 20000, torch.bfloat16)],
)  # fmt: skip
def test_fused_quant_matches_torch(m: int, k: int, dtype: torch.dtype) -> None:
    gen = torch.Generator().manual_seed(m + k)
    x = torch.randn(m, k, generator=gen) * torch.logspace(-3, 2, m)[:, None]
    x[0, : k // 3] *= 50  # outliers
    if m > 2:
        x[2] = 0  # the all-zero guard
    x = x.to("cuda", dtype)
    q, s = triton_fp8.quantize_per_token(x)
    rq, rs = quantize_fp8_per_token_torch(x)
    assert q.shape == (m, k) and q.dtype == torch.float8_e4m3fn and q.is_contiguous()
    assert s.shape == (m, 1) and s.dtype == torch.float32 and s.stride(0) == 1
    assert torch.equal(s, rs)
    diff = (q.view(torch.uint8).int() - rq.view(torch.uint8).int()).abs()
    # correctly rounded divisions: expected bit-equal; at most one ulp anywhere
    assert diff.max().item() <= 1
    assert (diff != 0).float().mean().item() < 1e-3


def test_w8a16_every_program_shape() -> None:
    _, w8a16, _ = triton_fp8._jit()
    for bm, bn, bk, warps, stages in triton_fp8.W8A16_CONFIGS:
        m = max(1, bm // 2 + 3) if bm > 1 else 3  # partial row block
        n, k = 200, 1000  # neither a multiple of BLOCK_N nor of BLOCK_K
        for per_channel in (True, False):
            q, s = _weight(n, k, per_channel, seed=bm + bn + bk)
            x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
            bias = torch.randn(n, device="cuda", dtype=torch.bfloat16) * 0.1
            y = torch.empty(m, n, device="cuda", dtype=torch.bfloat16)
            grid = (triton_fp8._cdiv(m, bm) * triton_fp8._cdiv(n, bn),)
            w8a16[grid](
                x, q, s, bias, y, m, n, k, triton_fp8._next_pow2(m),
                x.stride(0), q.stride(0), y.stride(0),
                PER_CHANNEL=per_channel, HAS_BIAS=True, BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk,
                num_warps=warps, num_stages=stages,
            )  # fmt: skip
            ref = _ref(x, q, s, bias)
            torch.testing.assert_close(y.float(), ref, atol=5e-3 * ref.abs().max().item(), rtol=0)


@pytest.mark.parametrize("per_channel", [True, False])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_w8a16_autotuned_random_shapes(per_channel: bool, dtype: torch.dtype) -> None:
    gen = torch.Generator().manual_seed(1)
    for i in range(6):
        m = int(torch.randint(1, 70, (1,), generator=gen))
        n = int(torch.randint(16, 700, (1,), generator=gen))
        k = int(torch.randint(16, 1500, (1,), generator=gen))
        q, s = _weight(n, k, per_channel, seed=i)
        x = torch.randn(m, k, generator=gen).to("cuda", dtype)
        bias = torch.randn(n, generator=gen).to("cuda", dtype) if i % 2 else None
        y = triton_fp8.w8a16_linear(x, q, s, bias)
        assert y.dtype == dtype and y.shape == (m, n)
        ref = _ref(x, q, s, bias)
        torch.testing.assert_close(y.float(), ref, atol=5e-3 * ref.abs().max().item(), rtol=0)


@pytest.mark.parametrize("per_channel", [True, False])
@pytest.mark.parametrize("m", [17, 64, 300])
def test_scaled_mm_path(m: int, per_channel: bool) -> None:
    q, s = _weight(768, 512, per_channel, seed=m)
    x = torch.randn(m, 512, device="cuda", dtype=torch.bfloat16)
    bias = torch.randn(768, device="cuda", dtype=torch.bfloat16)
    got = fp8_scaled_mm(x, q, s, bias).float()
    # exact inputs of the FP8 GEMM: only accumulation order and the bf16 output differ
    xq, xs = quantize_fp8_per_token_torch(x)
    exact = _ref(xq.float() * xs, q, s, bias)
    torch.testing.assert_close(got, exact, atol=1e-2 * exact.abs().max().item(), rtol=0)
    ref = _ref(x, q, s, bias)  # and the activation quantization's own error
    torch.testing.assert_close(got, ref, atol=0.05 * ref.abs().max().item(), rtol=0)


def test_w8a8_every_program_shape() -> None:
    w8a8 = triton_fp8._jit()[2]
    for bm, bn, bk, warps, stages in triton_fp8.W8A8_CONFIGS:
        m, n, k = bm + bm // 2 + 1, 200, 1000  # partial blocks on every axis
        for per_channel in (True, False):
            q, s = _weight(n, k, per_channel, seed=bm + bn)
            x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
            xq, xs = quantize_fp8_per_token_torch(x)
            bias = torch.randn(n, device="cuda", dtype=torch.bfloat16) * 0.1
            y = torch.empty(m, n, device="cuda", dtype=torch.bfloat16)
            grid = (triton_fp8._cdiv(m, bm) * triton_fp8._cdiv(n, bn),)
            w8a8[grid](
                xq, xs, q, s, bias, y, m, n, k, triton_fp8._next_pow2(m),
                xq.stride(0), q.stride(0), y.stride(0),
                PER_CHANNEL=per_channel, HAS_BIAS=True, BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk,
                num_warps=warps, num_stages=stages,
            )  # fmt: skip
            ref = _ref(xq.float() * xs, q, s, bias)
            torch.testing.assert_close(y.float(), ref, atol=1e-2 * ref.abs().max().item(), rtol=0)


@pytest.mark.parametrize("per_channel", [True, False])
@pytest.mark.parametrize("m", [1, 17, 64, 300, 2048])
def test_triton_fp8_gemm_path(m: int, per_channel: bool) -> None:
    q, s = _weight(768, 512, per_channel, seed=m)
    x = torch.randn(m, 512, device="cuda", dtype=torch.bfloat16)
    bias = torch.randn(768, device="cuda", dtype=torch.bfloat16)
    got = fp8_triton_mm(x, q, s, bias).float()
    xq, xs = quantize_fp8_per_token_torch(x)
    exact = _ref(xq.float() * xs, q, s, bias)
    torch.testing.assert_close(got, exact, atol=1e-2 * exact.abs().max().item(), rtol=0)


def test_dispatch_by_batch(monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[str] = []
    w8, mm = triton_fp8.w8a16_linear, torch._scaled_mm
    monkeypatch.setattr(triton_fp8, "w8a16_linear", lambda *a: calls.append("w8a16") or w8(*a))
    monkeypatch.setattr(torch, "_scaled_mm", lambda *a, **kw: calls.append("mm") or mm(*a, **kw))
    q, s = _weight(512, 256, True, seed=0)
    for shape in [(1, 256), (2, 3, 256), (fp8.W8A16_MAX_M, 256), (fp8.W8A16_MAX_M + 1, 256),
                  (4, 64, 256)]:  # fmt: skip
        x = torch.randn(*shape, device="cuda", dtype=torch.bfloat16)
        y = fp8_linear(x, q, s, None)
        assert y.shape == (*shape[:-1], 512)
        ref = _ref(x.reshape(-1, 256), q, s, None)
        torch.testing.assert_close(y.reshape(-1, 512).float(), ref,
                                   atol=0.05 * ref.abs().max().item(), rtol=0)  # fmt: skip
    assert calls == ["w8a16", "w8a16", "w8a16", "mm", "mm"]
    # N not a multiple of 16: _scaled_mm cannot take it, the W8A16 kernel does at any batch
    calls.clear()
    q, s = _weight(100, 256, True, seed=1)
    y = fp8_linear(torch.randn(64, 256, device="cuda", dtype=torch.bfloat16), q, s, None)
    assert calls == ["w8a16"] and y.shape == (64, 100)
    # the Triton FP8 GEMM in place of _scaled_mm above W8A16_MAX_M rows
    calls.clear()
    monkeypatch.setattr(fp8, "FP8_GEMM", "triton")
    q, s = _weight(512, 256, True, seed=2)
    x = torch.randn(64, 256, device="cuda", dtype=torch.bfloat16)
    y = fp8_linear(x, q, s, None)
    ref = _ref(x, q, s, None)
    torch.testing.assert_close(y.float(), ref, atol=0.05 * ref.abs().max().item(), rtol=0)
    assert calls == []


@pytest.mark.parametrize(("m", "gemm"), [(1, "scaled_mm"), (64, "scaled_mm"), (64, "triton")])
def test_captures_in_cuda_graph(m: int, gemm: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(fp8, "FP8_GEMM", gemm)
    q, s = _weight(1024, 512, True, seed=m)
    x = torch.randn(m, 512, device="cuda", dtype=torch.bfloat16)
    eager = fp8_linear(x, q, s, None)  # autotunes / compiles outside the graph
    torch.cuda.synchronize()
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        out = fp8_linear(x, q, s, None)
    x.copy_(torch.randn_like(x))
    g.replay()
    torch.cuda.synchronize()
    assert torch.equal(out, fp8_linear(x, q, s, None))
    assert not torch.equal(out, eager)
