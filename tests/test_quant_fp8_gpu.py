"""FP8 CUDA paths against torch references (run on the GPU machine: -m gpu).

The fused per-token quantizer against the torch ops it replaces, the Triton W8A16 kernel (every
program shape, and the autotuned entry), the Triton FP8 GEMM and the fused-quant +
``_scaled_mm`` path against the exact product of the operands they were given, the batch-size
dispatch, and capture in a CUDA graph of every dispatch path.
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


# FP8 x FP8 GEMM (Triton tl.dot or _scaled_mm) vs the fp32 product of the very operands it was
# given; what remains is the hardware's arithmetic: (1) fast accumulation: Hopper's FP8 MMA
# adds in a ~14-bit accumulator (DeepSeek-V3 report, sec. 3.3.2: ~2% worst relative error at
# K=4096), a few 1e-3 of the row magnitude at the K <= 1000 used here; (2) the bf16 output: up
# to 2^-8 relative per rounding, and a rowwise _scaled_mm epilogue may round the scaled product
# before adding the bias (two roundings, 0.8%). Worst case ~1.2% of max |y|; bound 1.5%. A
# wrong scale, bias, mask or tile is off by O(10-100%). The reference takes the GEMM's own
# operands, not a re-quantization of x: one activation code one E4M3 step off (1/16..1/8 of
# that value) already moves a K=512 row by ~1.3% of max |y|.
GEMM_TOL = 1.5e-2


def _assert_gemm_close(got: torch.Tensor, exact: torch.Tensor) -> None:
    torch.testing.assert_close(got.float(), exact, atol=GEMM_TOL * exact.abs().max().item(), rtol=0)


def _steps(q: torch.Tensor) -> torch.Tensor:
    """E4M3 codes -> signed ordinals: adjacent representable values differ by 1, +-0 are 0."""
    b = q.view(torch.uint8).int()
    return torch.where(b >= 128, 128 - b, b)


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
    # Same formulas (scale = amax * fp32(1/448), correctly rounded x / scale, RNE to E4M3):
    # expected bit-equal. Allowed: what hardware rounding could still move, an fp32 ulp or so
    # in a scale, and then a code one E4M3 step over for an element on a rounding tie (bf16
    # inputs often sit exactly on one: a one-ulp scale difference flipped up to 4% of a row's
    # codes, when the kernel divided amax / 448 and torch on CUDA multiplied by 1/448).
    torch.testing.assert_close(s, rs, rtol=1e-6, atol=0)
    diff = (_steps(q) - _steps(rq)).abs()
    n_diff = int((diff != 0).sum())
    assert diff.max().item() <= 1, f"codes differ by {diff.max().item()} steps"
    assert n_diff <= max(1, m * k // 10_000), f"{n_diff}/{m * k} codes differ by one step"
    if m > 2:  # the all-zero row: the 1e-12 guard, codes 0
        assert s[2].item() == torch.tensor(1e-12).item() and not q[2].float().any()


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
    # the FP8 GEMM's exact inputs: the activations as this path quantized them (the fused
    # kernel; its agreement with torch is test_fused_quant_matches_torch's business)
    xq, xs = fp8.quantize_fp8_per_token(x)
    _assert_gemm_close(got, _ref(xq.float() * xs, q, s, bias))
    ref = _ref(x, q, s, bias)  # and the activation quantization's own error
    torch.testing.assert_close(got, ref, atol=0.05 * ref.abs().max().item(), rtol=0)


def test_w8a8_every_program_shape() -> None:
    w8a8 = triton_fp8._jit()[2]
    for bm, bn, bk, warps, stages, sk in triton_fp8.W8A8_CONFIGS:
        m, n, k = bm + bm // 2 + 1, 200, 1000  # partial blocks on every axis
        tiles = triton_fp8._cdiv(m, bm) * triton_fp8._cdiv(n, bn)
        part = torch.empty(sk * m * n, device="cuda", dtype=torch.float32)
        cnt = torch.zeros(tiles, device="cuda", dtype=torch.int32)
        for per_channel in (True, False):
            q, s = _weight(n, k, per_channel, seed=bm + bn)
            x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
            xq, xs = quantize_fp8_per_token_torch(x)
            bias = torch.randn(n, device="cuda", dtype=torch.bfloat16) * 0.1
            y = torch.empty(m, n, device="cuda", dtype=torch.bfloat16)
            w8a8[(tiles, sk)](
                xq, xs, q, s, bias, y, part, cnt, m, n, k, triton_fp8._next_pow2(m), int(sk > 1),
                xq.stride(0), q.stride(0), y.stride(0),
                PER_CHANNEL=per_channel, HAS_BIAS=True, BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk,
                SPLIT_K=sk, num_warps=warps, num_stages=stages,
            )  # fmt: skip
            _assert_gemm_close(y, _ref(xq.float() * xs, q, s, bias))
            assert int(cnt.abs().sum()) == 0  # the last slice of each tile reset its counter


@pytest.mark.parametrize("with_pdl", [False, True])
def test_split_k_w8a8_in_a_cuda_graph(with_pdl: bool, monkeypatch: pytest.MonkeyPatch) -> None:
    """MODELPORT_FP8_SPLIT_K on: the autotuned GEMM (split configs among the candidates) on a
    decode step's narrow shapes, eager and replayed from a CUDA graph, equals the reference;
    also launched with PDL (MODELPORT_FP8_W8A8_PDL) after the quantizer, which has it too."""
    monkeypatch.setattr(triton_fp8, "SPLIT_K", True)
    monkeypatch.setattr(triton_fp8, "W8A8_PDL", with_pdl)
    for m, n, k in ((16, 1024, 4096), (100, 768, 2048), (256, 512, 1024)):
        q, s = _weight(n, k, True, seed=m)
        x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
        xq, xs = triton_fp8.quantize_per_token(x)
        ref = _ref(xq.float() * xs, q, s, None)
        eager = triton_fp8.w8a8_linear(xq, xs, q, s, None, torch.bfloat16)  # tunes, then runs
        _assert_gemm_close(eager, ref)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            xq2, xs2 = triton_fp8.quantize_per_token(x)  # the launch before it, as in a step
            y = triton_fp8.w8a8_linear(xq2, xs2, q, s, None, torch.bfloat16)
        for _ in range(3):
            graph.replay()
            torch.cuda.synchronize()
            torch.testing.assert_close(y, eager, rtol=0, atol=0)


@pytest.mark.parametrize("per_channel", [True, False])
@pytest.mark.parametrize("m", [1, 17, 64, 300, 2048])
def test_triton_fp8_gemm_path(m: int, per_channel: bool) -> None:
    q, s = _weight(768, 512, per_channel, seed=m)
    x = torch.randn(m, 512, device="cuda", dtype=torch.bfloat16)
    bias = torch.randn(768, device="cuda", dtype=torch.bfloat16)
    got = fp8_triton_mm(x, q, s, bias).float()
    xq, xs = triton_fp8.quantize_per_token(x)  # the operands the GEMM was given
    _assert_gemm_close(got, _ref(xq.float() * xs, q, s, bias))
    ref = _ref(x, q, s, bias)  # and the activation quantization's own error
    torch.testing.assert_close(got, ref, atol=0.05 * ref.abs().max().item(), rtol=0)


def _record_paths(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    calls: list[str] = []
    w16, w8, mm = triton_fp8.w8a16_linear, triton_fp8.w8a8_linear, torch._scaled_mm
    monkeypatch.setattr(triton_fp8, "w8a16_linear", lambda *a: calls.append("w8a16") or w16(*a))
    monkeypatch.setattr(triton_fp8, "w8a8_linear", lambda *a: calls.append("w8a8") or w8(*a))
    monkeypatch.setattr(torch, "_scaled_mm", lambda *a, **kw: calls.append("mm") or mm(*a, **kw))
    return calls


def _expected_path(m: int) -> str:
    if m <= fp8.W8A16_MAX_M:
        return "w8a16"
    return "w8a8" if m <= fp8.TRITON_W8A8_MAX_M else "mm"


def test_dispatch_by_batch(monkeypatch: pytest.MonkeyPatch) -> None:
    assert (fp8.W8A16_MAX_M, fp8.TRITON_W8A8_MAX_M) == (1, 128)
    calls = _record_paths(monkeypatch)
    q, s = _weight(512, 256, True, seed=0)
    shapes = [(1, 256), (1, 1, 256), (2, 256), (2, 3, 256), (128, 256), (2, 64, 256),
              (129, 256), (4, 64, 256)]  # fmt: skip
    for shape in shapes:
        x = torch.randn(*shape, device="cuda", dtype=torch.bfloat16)
        y = fp8_linear(x, q, s, None)
        assert y.shape == (*shape[:-1], 512)
        ref = _ref(x.reshape(-1, 256), q, s, None)
        torch.testing.assert_close(y.reshape(-1, 512).float(), ref,
                                   atol=0.05 * ref.abs().max().item(), rtol=0)  # fmt: skip
    assert calls == ["w8a16", "w8a16", "w8a8", "w8a8", "w8a8", "w8a8", "mm", "mm"]  # (2, 64): 128 rows
    # N or K not a multiple of 16: _scaled_mm cannot take them, the Triton GEMM does
    for n, k in [(100, 256), (512, 200)]:
        q, s = _weight(n, k, True, seed=n + k)
        for m in (1, 64, 300):
            calls.clear()
            x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
            y = fp8_linear(x, q, s, None)
            assert calls == ["w8a16" if m == 1 else "w8a8"] and y.shape == (m, n)
            ref = _ref(x, q, s, None)
            torch.testing.assert_close(y.float(), ref, atol=0.05 * ref.abs().max().item(), rtol=0)


@pytest.mark.parametrize(
    ("m", "per_channel"),
    [(1, True), (2, False), (16, True), (48, True), (128, False), (129, True), (256, False)],
)  # fmt: skip
def test_captures_in_cuda_graph(m: int, per_channel: bool, monkeypatch: pytest.MonkeyPatch) -> None:
    """Every dispatch path (the decode graphs capture batches 1..256) replays in a graph."""
    q, s = _weight(1024, 512, per_channel, seed=m)
    bias = torch.randn(1024, device="cuda", dtype=torch.bfloat16)
    x = torch.randn(m, 512, device="cuda", dtype=torch.bfloat16)
    eager = fp8_linear(x, q, s, bias)  # compiles / autotunes outside the graph, as the runner does
    torch.cuda.synchronize()
    calls = _record_paths(monkeypatch)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        out = fp8_linear(x, q, s, bias)
    assert calls == [_expected_path(m)]
    x.copy_(torch.randn_like(x))
    g.replay()
    torch.cuda.synchronize()
    assert torch.equal(out, fp8_linear(x, q, s, bias))
    assert not torch.equal(out, eager)
