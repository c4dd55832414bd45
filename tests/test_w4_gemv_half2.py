"""The half2 W4 GEMV (the default for one-row 4-bit GEMVs; quantization/triton_w4_half2.py).

Here (no GPU): its sm_90 compile (registers, spills, SASS instructions per packed word
against the shipped GEMV), the switch's routing, the PTX's magic constants (emulated bit
for bit), and the kernel's indexing and arithmetic in the Triton interpreter with the
plain-Triton twin of the PTX (the interpreter cannot run inline asm). On the GPU machine
(-m gpu): the PTX kernel against the reference dequantization, and in a CUDA graph.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
SHAPES = {"qkv": (6144, 4096), "o": (4096, 4096), "gate_up": (28672, 4096), "down": (4096, 14336)}


def _offline():  # noqa: ANN202 - kernel_regs (bench/gpu) once triton's sm_90 backend imports
    pytest.importorskip("triton")
    pytest.importorskip("triton.backends.nvidia")
    sys.path.insert(0, str(ROOT / "bench" / "gpu"))
    import kernel_regs

    return kernel_regs


@pytest.mark.parametrize("k", sorted({k for _, k in SHAPES.values()}))
def test_half2_gemv_compiles_for_sm90_with_fewer_instructions_a_word(k: int) -> None:
    """Every half2 config at the Llama-3.1-8B K's (qkv, o, gate_up: 4,096; down: 14,336;
    N is a runtime argument, a multiple of every BLOCK_N there): <= 255 registers, no spill;
    at the shipped GEMV's one-row tile (16 columns, 4 warps) fewer SASS instructions per
    packed word than the shipped kernel (29.6 there at K = 4,096)."""
    kr = _offline()
    from modelport.quantization import triton_kernels as tk
    from modelport.quantization import triton_w4_half2 as th

    base = next(
        c
        for c in tk.gemv_configs
        if c.kwargs["BLOCK_N"] == 16
        and c.num_warps == 4
        and not c.kwargs["PREFETCH"]
        and not c.maxnreg
    )
    old = kr.compile_w4_gemv(base, k)
    old_pw = kr.per_word({**old, **base.kwargs})
    assert 20 < old_pw["instr_per_word"] < 40, (old, old_pw)
    seen = 0
    for c in th.half2_configs:
        r = kr.compile_w4_gemv_half2(c.kwargs["BLOCK_N"], c.num_warps, k)
        assert 0 < r["regs"] <= 255 and r["stack"] == 0, r
        if c.kwargs["BLOCK_N"] == 16 and c.num_warps == 4:
            seen += 1
            new_pw = kr.per_word(r)
            # whole kernel: 25.6 vs 29.6 (K = 4,096), 26.3 vs 30.9 (K = 14,336)
            assert new_pw["instr_per_word"] < old_pw["instr_per_word"] - 3, (new_pw, old_pw)
            if k > 4096:  # the K loop body, 21.0 vs 26.3 (K = 4,096: one step, no loop)
                assert 0 < new_pw["loop_per_word"] < old_pw["loop_per_word"] - 3, (new_pw, old_pw)
    assert seen == 1


def test_switch_routes_only_one_row_4bit_chunks_of_4(monkeypatch: pytest.MonkeyPatch) -> None:
    """One-row GEMVs of 4-bit weights (groups >= 32) go to the half2 kernel (the default);
    2-4 rows, 8-bit codes, groups of 16 and MODELPORT_W4_GEMV=default keep the fp32 one."""
    from modelport.quantization import triton_gemm as tg
    from modelport.quantization.kernels import GroupQuant

    calls: list[str] = []

    class Fake:  # stands in for a Triton kernel: kernel[grid](...) records its name
        def __init__(self, name: str) -> None:
            self.name = name

        def __getitem__(self, grid):  # noqa: ANN001, ANN204
            def launch(*args, **kw) -> None:  # noqa: ANN002, ANN003
                calls.append(self.name)
                n = args[4 if self.name == "half2" else 6]
                want = ((n + 15) // 16,) if self.name == "half2" else ((n + 15) // 16, 1)
                assert grid({"BLOCK_N": 16, "SPLIT": 1}) == want

            return launch

    th = pytest.importorskip("modelport.quantization.triton_w4_half2")
    monkeypatch.setattr(th, "gemv_half2", Fake("half2"))
    monkeypatch.setattr(tg, "_kernels", lambda: (Fake("shipped"), None, None))

    def route(bits: int, group: int, m: int, on: bool) -> str:
        monkeypatch.setattr(tg, "GEMV_HALF2", on)
        n, k = 40, 256
        codes = torch.randint(0, 1 << bits, (n, k), dtype=torch.uint8)
        s = torch.rand(n, k // group) * 0.01 + 0.001
        kern = tg.TritonKernel(GroupQuant(codes, s, -8 * s, group, bits), torch.device("cpu"))
        calls.clear()
        y = kern.gemv(torch.randn(m, k, dtype=torch.bfloat16))
        assert y.shape == (m, n) and y.dtype == torch.bfloat16 and len(calls) == 1
        return calls[0]

    assert route(4, 128, 1, True) == "half2"
    assert route(4, 32, 1, True) == "half2"
    assert route(4, 16, 1, True) == "shipped"  # chunks of 2 words
    assert route(4, 128, 2, True) == "shipped"
    assert route(4, 128, 4, True) == "shipped"
    assert route(8, 128, 1, True) == "shipped"
    assert route(4, 128, 1, False) == "shipped"
    # the environment variable, read at import: half2 unless it says "default"
    code = "from modelport.quantization import triton_gemm as t; print(t.GEMV_HALF2)"
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src")}
    for val, want in ((None, "True"), ("default", "False"), ("half2", "True")):
        e = {k: v for k, v in env.items() if k != "MODELPORT_W4_GEMV"}
        if val is not None:
            e["MODELPORT_W4_GEMV"] = val
        out = subprocess.run(
            [sys.executable, "-c", code], env=e, capture_output=True, text=True, check=True
        ).stdout.strip()
        assert out == want, (val, out)


def test_ptx_magic_constants_give_centred_codes() -> None:
    """The PTX's steps emulated bit for bit with numpy fp16: the four LOP3 of a word (and of
    word >> 8) then sub 1032 / fma (1/16, -72) give (c_j - 8, c_{j+4} - 8) for j = 0..3, and
    the f16x2 products and sums equal sum (c - 8) x within fp16 rounding."""
    from modelport.quantization import triton_w4_half2 as th

    ptx = th.CHUNK_PTX.value if hasattr(th.CHUNK_PTX, "value") else th.CHUNK_PTX
    for const in ("0x64086408", "0x2C002C00", "0xD480D480", "0x000f000f", "0x00f000f0"):
        assert const in ptx
    rng = np.random.default_rng(0)
    words = rng.integers(0, 2**32, 4096, dtype=np.uint64).astype(np.uint32)

    def halves(u: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        lo = (u & 0xFFFF).astype(np.uint16).view(np.float16).astype(np.float64)
        hi = (u >> 16).astype(np.uint16).view(np.float16).astype(np.float64)
        return lo, hi

    magic = np.uint32(0x64006400)
    q = words >> np.uint32(8)
    got = []
    for src, mask, low in (
        (words, 0x000F000F, True),
        (words, 0x00F000F0, False),
        (q, 0x000F000F, True),
        (q, 0x00F000F0, False),
    ):
        lo, hi = halves((src & np.uint32(mask)) | magic)
        if low:
            got.append((lo - 1032.0, hi - 1032.0))
        else:  # 1/16 = 0x2C00, -72 = 0xD480
            assert np.float16(1 / 16).view(np.uint16) == 0x2C00
            assert np.float16(-72).view(np.uint16) == 0xD480
            got.append((lo / 16 - 72, hi / 16 - 72))
    for j in range(4):
        cj = ((words >> np.uint32(4 * j)) & 15).astype(np.float64) - 8
        cj4 = ((words >> np.uint32(4 * j + 16)) & 15).astype(np.float64) - 8
        assert np.array_equal(got[j][0], cj) and np.array_equal(got[j][1], cj4), j
    # every intermediate above is exact in fp16 (|values| <= 1039, integers or /16 of them)
    assert all(np.array_equal(a.astype(np.float16).astype(np.float64), a) for g in got for a in g)


_INTERP = textwrap.dedent("""
    import torch
    from modelport.quantization import triton_gemm as tg
    from modelport.quantization import triton_w4_half2 as th
    from modelport.quantization.kernels import GroupQuant

    g = torch.Generator().manual_seed(0)
    worst = 0.0
    for n, k, group, bn, w, dtype, sym, big in (
            (40, 1024, 128, 16, 2, torch.float16, False, False),
            (37, 768, 64, 8, 2, torch.bfloat16, True, False),
            (24, 1280, 32, 8, 4, torch.bfloat16, False, False),
            (40, 1024, 128, 16, 2, torch.bfloat16, False, True)):
        codes = torch.randint(0, 16, (n, k), generator=g, dtype=torch.int32).to(torch.uint8)
        s = torch.rand(n, k // group, generator=g) * 0.02 + 0.001
        zp = torch.full_like(s, 8.0) if sym else torch.randint(0, 16, s.shape, generator=g).float()
        gq = GroupQuant(codes, s, -s * zp, group, 4)
        bits, v, _ = tg.layout(gq)
        assert v == 4
        qw = tg.pack_weight(gq.codes, bits, v)
        sz = tg.pack_scales(gq.scales, gq.zeros)
        x = torch.randn(1, k, generator=g)
        if big:  # beyond fp16's reach unscaled: |x| to 6e4, products to 5e5
            x = x * 1000.0
            x[0, ::97] = 6.0e4
        x = x.to(dtype)
        ref = x.float() @ gq.dequantize().t()
        grid = ((n + bn - 1) // bn,)
        for out in (torch.float32, dtype):  # fp32 out: the arithmetic's own error
            y = torch.empty((1, n), dtype=out)
            th.gemv_half2_kernel[grid](x, qw, sz, y, n, K=k, GROUP=group, BLOCK_N=bn,
                                       BLOCK_W=128 * w, EVEN_N=n % bn == 0, ASM=False)
            assert torch.isfinite(y).all(), (n, k, group, dtype, big)
            err = (y.float() - ref).abs().max().item() / ref.abs().max().item()
            if out == torch.float32:
                worst = max(worst, err)
                assert err < 1e-3, (n, k, group, dtype, err)
            else:  # plus the conversion to the activation dtype (the interpreter's may
                assert err < 1e-3 + 2.0 ** -7, (n, k, group, dtype, err)  # truncate: 1 ulp)
    print("ok half2", f"{worst:.1e}")
""")


def test_half2_gemv_in_the_triton_interpreter() -> None:
    """The kernel's tiles, masks (N and K not multiples of the block), chunk and group
    indexing and its fp16 arithmetic (the plain-Triton twin of the PTX: fp16 products,
    fp16 sums of 16 products a lane, the rest fp32) against x W^T, groups 32/64/128,
    symmetric and asymmetric zeros, fp16 and bf16 activations, and bf16 activations beyond
    fp16's range (the per-chunk power-of-two scaling): with an fp32 output within
    1e-3 of max |y| (6-7e-4 measured), in the activation dtype one ulp more."""
    pytest.importorskip("triton")
    env = {**os.environ, "TRITON_INTERPRET": "1", "PYTHONPATH": str(ROOT / "src")}
    p = subprocess.run(
        [sys.executable, "-c", _INTERP], env=env, capture_output=True, text=True, timeout=300
    )
    assert p.returncode == 0, p.stderr[-3000:]
    assert "ok half2" in p.stdout


# ---- GPU (the lead runs these: -m gpu) -------------------------------------------------


def _gq(n: int, k: int, group: int, layout: str, seed: int):  # noqa: ANN202
    from test_quant_gpu import _random_gq

    gq = _random_gq(n, k, 4, group, layout == "gptq-asym-act-order", seed)
    if layout == "gptq-sym":  # zero point 8: w = (c - 8) s
        gq.zeros = -8 * gq.scales
    return gq


def _half2_only(monkeypatch: pytest.MonkeyPatch) -> None:
    """Switch on, and the shipped GEMV unreachable: a one-row call must take the half2."""
    from modelport.quantization import triton_gemm as tg

    monkeypatch.setattr(tg, "GEMV_HALF2", True)
    monkeypatch.setattr(tg, "_kernels", lambda: (None, None, None))


@pytest.mark.gpu
@pytest.mark.parametrize("group", [32, 64, 128])
@pytest.mark.parametrize("layout", ["awq", "gptq-sym", "gptq-asym-act-order"])
def test_half2_gemv_matches_reference_on_gpu(
    group: int, layout: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    from modelport.quantization.triton_gemm import TritonKernel

    _half2_only(monkeypatch)
    gen = torch.Generator().manual_seed(group)
    for i, k in enumerate((1280, 4096)):
        n = int(torch.randint(1, 700, (1,), generator=gen))
        gq = _gq(n, k, group, layout, seed=i)
        kern = TritonKernel(gq, torch.device("cuda"))
        w = gq.dequantize().cuda()
        for dtype in (torch.bfloat16, torch.float16):
            x = torch.randn(1, k, generator=gen).to("cuda", dtype)
            ref = x.float() @ w.t()
            got = kern(x)
            assert got.dtype == dtype and got.shape == (1, n)
            torch.testing.assert_close(
                got.float(),
                ref,
                atol=2e-2 * ref.abs().max().item(),
                rtol=0,
                msg=f"n={n} k={k} {dtype}",
            )


@pytest.mark.gpu
@pytest.mark.parametrize("shape", list(SHAPES.values()) + [(100, 1280)])
def test_half2_gemv_every_config_on_gpu(shape: tuple[int, int]) -> None:
    """Each half2 autotune candidate on its own, at the Llama-3.1-8B shapes."""
    from modelport.quantization import triton_gemm as tg
    from modelport.quantization import triton_w4_half2 as th

    n, k = shape
    gq = _gq(n, k, 128, "awq", seed=3)
    kern = tg.TritonKernel(gq, torch.device("cuda"))
    x = torch.randn(1, k, device="cuda", dtype=torch.bfloat16)
    ref = x.float() @ gq.dequantize().cuda().t()
    for cfg in th.half2_configs:
        bn = cfg.kwargs["BLOCK_N"]
        y = torch.empty((1, n), device="cuda", dtype=x.dtype)
        th.gemv_half2_kernel[(tg.triton_cdiv(n, bn),)](
            x,
            kern.qweight,
            kern.sz,
            y,
            n,
            K=k,
            GROUP=128,
            EVEN_N=n % bn == 0,
            ASM=True,
            num_warps=cfg.num_warps,
            **cfg.kwargs,
        )
        torch.testing.assert_close(
            y.float(), ref, atol=2e-2 * ref.abs().max().item(), rtol=0, msg=str(cfg)
        )


@pytest.mark.gpu
def test_half2_gemv_in_cuda_graph(monkeypatch: pytest.MonkeyPatch) -> None:
    from modelport.quantization.triton_gemm import TritonKernel
    from test_quant_gpu import _capture

    _half2_only(monkeypatch)
    gq = _gq(512, 2048, 128, "awq", seed=5)
    kern = TritonKernel(gq, torch.device("cuda"))
    w = gq.dequantize().cuda()
    x = torch.randn(1, 2048, device="cuda", dtype=torch.bfloat16)
    kern(x)  # autotune outside the graph
    graph, y = _capture(kern, x)
    for seed in range(3):
        x.copy_(
            torch.randn(1, 2048, generator=torch.Generator().manual_seed(seed)).to("cuda", x.dtype)
        )
        graph.replay()
        torch.cuda.synchronize()
        ref = x.float() @ w.t()
        torch.testing.assert_close(y.float(), ref, atol=2e-2 * ref.abs().max().item(), rtol=0)
