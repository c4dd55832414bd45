"""Our Triton kernels without a GPU: each compiles for sm_90 (Triton's own ptxas, as on the H200
machine), and the NF4 kernels give the reference's products in the Triton interpreter.

CI has no GPU, and sessions often have none either; this catches a kernel edit that no longer
compiles, or an opt-in kernel that computes the wrong thing, before a device session pays for
it. `make test` installs triton 3.6.0 (the GPU machine's version) into .venv for these.
The register figures of every config: `python bench/gpu/kernel_regs.py` (bench/README.md).
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

triton = pytest.importorskip("triton")
pytest.importorskip("triton.backends.nvidia")

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "bench" / "gpu"))

import kernel_regs  # noqa: E402  (bench/gpu: the offline compile helper)

MAX_REGS = 255  # what sm_90 gives a thread at most


def _check(r: dict) -> None:
    assert 0 < r["regs"] <= MAX_REGS and r["sass_instr"] > 100, r
    assert r["programs_per_sm"] >= 1, r


def test_shipped_decode_attention_configs_compile_for_sm90() -> None:
    from modelport.layers import triton_attention as ta

    seen = 0
    for kind in ("16bit", "fp8"):
        for _, cfg in ta.DECODE_CONFIGS[kind]:
            for rope in ((False, True) if kind == "16bit" else (False,)):
                r = kernel_regs.compile_decode(cfg, kind, rope)
                _check(r)
                seen += 1
    assert seen == 2 * len(ta.DECODE_CONFIGS["16bit"]) + len(ta.DECODE_CONFIGS["fp8"])
    # a register cap reaches the compiler through DecodeConfig.maxnreg
    capped = ta.DecodeConfig(k_cvt=1, v_cvt=5, num_stages=3, maxnreg=128)
    assert kernel_regs.compile_decode(capped, "fp8", False)["regs"] <= 128


def test_quantized_weight_kernels_compile_for_sm90() -> None:
    # one representative launch of each: the W4 GEMV's one-row tile (and its register cap),
    # the W4/W8 GEMM one group a step and 128 columns a step, the NF4 GEMVs and GEMM
    from modelport.quantization import triton_kernels as tk

    w4 = {c.maxnreg: c for c in tk.gemv_configs if c.kwargs["BLOCK_N"] == 16
          and c.num_warps == 4 and not c.kwargs["PREFETCH"]}
    for cap, c in w4.items():
        r = kernel_regs.compile_w4_gemv(c, k=4096)
        _check(r)
        if cap:
            assert r["regs"] <= cap and r["stack"] == 0, r  # K = 4,096: no spill at the cap
    for bits in (4, 8):
        for block_k in (32, 128):
            _check(kernel_regs.compile_w_gemm(bits, group=32, block_k=block_k))
    for r in kernel_regs.nf4_rows():
        _check(r)


_INTERPRETED = textwrap.dedent("""
    import torch
    from modelport.quantization import triton_nf4 as tn
    from modelport.quantization.nf4 import NF4_CODE

    for words in (False, True):
        tn.GEMV_WORDS = words
        for n, k, qb, m in [(40, 256, 64, 1), (33, 384, 128, 4), (16, 128, 32, 2),
                            (20, 512, 16, 1), (24, 768, 256, 3)]:
            g = torch.Generator().manual_seed(n + k + m)
            codes = torch.randint(0, 16, (n, k), generator=g, dtype=torch.uint8)
            am = torch.rand(n, k // qb, generator=g) + 0.05
            table = torch.tensor(NF4_CODE)
            w = table[codes.long()] * am.repeat_interleave(qb, dim=1)
            x = torch.randn(m, k, generator=g).to(torch.float16)
            y = tn.gemv(x, tn.pack_rows(codes), am, table)
            ref = x.float() @ w.t()
            err = ((y.float() - ref).abs().max() / ref.abs().max()).item()
            assert y.dtype == torch.float16 and y.shape == (m, n)
            assert err < 2e-3, (words, n, k, qb, m, err)
            print("ok", words, n, k, qb, m, f"{err:.1e}")

    tn.GEMM_SPLIT_PROGRAMS = 64  # these small grids split too
    for split in (False, True):
        tn.GEMM_SPLIT = split
        for n, k, qb, m, want in [(64, 512, 64, 9, 8), (40, 384, 64, 20, 2), (24, 448, 64, 5, 1)]:
            g = torch.Generator().manual_seed(n + k + m)
            codes = torch.randint(0, 16, (n, k), generator=g, dtype=torch.uint8)
            am = torch.rand(n, k // qb, generator=g) + 0.05
            table = torch.tensor(NF4_CODE)
            w = table[codes.long()] * am.repeat_interleave(qb, dim=1)
            x = torch.randn(m, k, generator=g).to(torch.float16)
            slices = tn.gemm_split(1, -(-n // tn.GEMM_BLOCK_N), k // qb)
            assert slices == (want if split else 1), (n, k, slices)
            y = tn.gemm(x, tn.pack_rows(codes), am, table)
            ref = x.float() @ w.t()
            err = ((y.float() - ref).abs().max() / ref.abs().max()).item()
            assert y.dtype == torch.float16 and y.shape == (m, n)
            assert err < 2e-3, (split, n, k, qb, m, err)
            print("ok gemm", split, n, k, qb, m, slices, f"{err:.1e}")
""")


def test_nf4_kernels_match_the_reference_in_the_triton_interpreter() -> None:
    # the byte GEMV (shipped), the word GEMV (MODELPORT_NF4_GEMV=words) and the GEMM with and
    # without K slices (MODELPORT_NF4_GEMM_SPLIT=1) on CPU tensors; a child process, since
    # TRITON_INTERPRET must be set before triton is imported
    env = {**os.environ, "TRITON_INTERPRET": "1", "PYTHONPATH": str(ROOT / "src")}
    p = subprocess.run([sys.executable, "-c", _INTERPRETED], env=env, capture_output=True,
                       text=True, timeout=600)
    assert p.returncode == 0, p.stderr[-2000:]
    assert p.stdout.count("ok ") == 16
