"""The 4-bit GEMM on raw codes (triton_kernels.gemm_codes, MODELPORT_W4_GEMM=codes): in the
Triton interpreter against x @ the reference dequantization (fp16: the interpreter's tl.dot
gets bfloat16 wrong), through TritonKernel.forward for 5..70 rows; groups of 64, 128 and 256
(K steps of 64 and 128 inside a group), GPTQ act-order, every variant; every launch config
compiled for sm_90 without register spills; and which weights it serves."""

from __future__ import annotations

import sys
import textwrap
from pathlib import Path

import pytest

from helpers.triton_interp import run_interpreted

ROOT = Path(__file__).resolve().parents[1]

_SCRIPT = textwrap.dedent("""
    import torch
    from modelport.quantization import triton_gemm as tg
    from modelport.quantization import triton_kernels as tk
    from modelport.quantization.kernels import GroupQuant

    tg.W4_GEMM = "codes"
    g = torch.Generator().manual_seed(0)
    # (N, K, rows, group, act-order, the config's (BLOCK_M, BLOCK_K)); N not a multiple of
    # BLOCK_N and rows not of BLOCK_M: masked tiles. The interpreter's time goes as rows x K
    # (codes_prep: a program per row and 64 inputs) and tiles x K steps, so each case is the
    # least that keeps its path: rows in the bucket of the config's tile (65: 128 rows), two
    # K steps a split where a split took several, two groups when steps lie inside a group
    # (K 256 of 128 in steps of 64, K 512 of 256 in steps of 128), two N tiles for SPLIT_K 8
    cases = [(96, 256, 5, 128, False, (16, 128)), (200, 256, 37, 64, True, (64, 64)),
             (200, 512, 37, 128, True, (32, 128)), (40, 256, 65, 128, False, (128, 64)),
             (100, 256, 9, 64, False, (16, 64)), (130, 512, 70, 256, False, (64, 128))]
    for n, k, m, group, act, (bm, bk) in cases:
        cfg = next(c for c in tk.codes_configs
                   if (c.kwargs["BLOCK_M"], c.kwargs["BLOCK_K"]) == (bm, bk))
        tk.gemm_codes.configs = [cfg]
        codes = torch.randint(0, 16, (n, k), generator=g, dtype=torch.int32).to(torch.uint8)
        s = torch.rand(n, k // group, generator=g) * 0.02 + 0.001
        z = -s * torch.randint(0, 16, (n, k // group), generator=g).float()
        gidx = None
        if act:
            perm = torch.randperm(k, generator=g)
            gidx = torch.empty(k, dtype=torch.long)
            gidx[perm] = torch.arange(k) // group
        gq = GroupQuant(codes, s, z, group, 4, gidx)
        kern = tg.TritonKernel(gq, torch.device("cpu"))
        kern.gemm_affine = None  # must not be reached
        x = torch.randn(m, k, generator=g).half()
        # the kernel keeps scale and zero in fp16 (pack_scales): so does the reference
        w = GroupQuant(codes, s.half().float(), z.half().float(), group, 4, gidx).dequantize()
        ref = x.float() @ w.t()
        xp = (x[:, kern.perm] if kern.perm is not None else x).contiguous()
        outs = [kern(x), kern.gemm_codes(xp, xsum=False), kern.gemm_codes(xp, pair=True)]
        for y in outs:
            err = (y.float() - ref).abs().max().item() / ref.abs().max().item()
            assert y.dtype == torch.half and y.shape == (m, n) and err < 2e-3, (n, k, m, err)
        print("ok codes", n, k, m, group, act)
""")


def test_codes_gemm_matches_the_reference_in_the_interpreter() -> None:
    pytest.importorskip("triton")
    out = run_interpreted(_SCRIPT)
    assert out.count("ok codes") == 6, out


def test_codes_gemm_configs_compile_for_sm90_without_spills() -> None:
    pytest.importorskip("triton.backends.nvidia")
    sys.path.insert(0, str(ROOT / "bench" / "gpu"))
    import kernel_regs

    from modelport.quantization import triton_kernels as tk

    ints = ("M", "N", "K", "M_BUCKET", "stride_xm", "stride_wn", "stride_sn", "stride_ym",
            "stride_xs", "magic2")
    sig = dict(x_ptr="*bf16", w_ptr="*i32", sz_ptr="*i32", y_ptr="*fp32", xs_ptr="*fp32",
               C="fp32", **dict.fromkeys(ints, "i32"))
    divisible = ("x_ptr", "w_ptr", "y_ptr", "K", "stride_xm", "stride_wn", "stride_ym")
    # every config with the default variant (sums before the launch); the other two with
    # the 64 x 128 tile
    runs = [(cfg, True, False) for cfg in tk.codes_configs]
    wide = next(c for c in tk.codes_configs if (c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"]) == (64, 128))
    runs += [(wide, False, False), (wide, True, True)]
    for cfg, xsum, pair in runs:
        const = dict(GROUP=128, V=4, XSUM=xsum, PAIR=pair, **cfg.kwargs)
        r = kernel_regs.compile_sm90(tk.gemm_codes.fn, sig, const, divisible, cfg.num_warps,
                                     cfg.num_stages, loops=False)
        assert 0 < r["regs"] <= 255 and r["stack"] == 0, (cfg, xsum, pair, r)
        assert r["programs_per_sm"] >= 1, (cfg, r)
    prep = dict(x_ptr="*bf16", xp_ptr="*bf16", xs_ptr="*fp32",
                **dict.fromkeys(("stride_xm", "stride_pm", "stride_sm"), "i32"))
    r = kernel_regs.compile_sm90(tk.codes_prep, prep, dict(HALF=16, PAIR=True),
                                 ("x_ptr", "xp_ptr"), 4, 1, loops=False)
    assert 0 < r["regs"] <= 255 and r["stack"] == 0, r


def test_codes_gemm_serves_only_4bit_groups_of_multiples_of_64(
        monkeypatch: pytest.MonkeyPatch) -> None:
    import torch

    from modelport.quantization import triton_gemm as tg

    monkeypatch.setattr(tg, "W4_GEMM", "codes")
    assert tg.uses_codes(4, 128, torch.bfloat16) and tg.uses_codes(4, 64, torch.float16)
    assert not tg.uses_codes(4, 32, torch.bfloat16)  # GGUF blocks: the affine GEMM
    assert not tg.uses_codes(4, 96, torch.bfloat16)  # no K step of 64 or 128 inside a group
    assert tg.uses_codes(4, 4096, torch.bfloat16)  # GPTQ's group -1 (the whole row)
    assert not tg.uses_codes(8, 128, torch.bfloat16)
    assert not tg.uses_codes(4, 128, torch.float32)
    monkeypatch.setattr(tg, "W4_GEMM", "affine")
    assert not tg.uses_codes(4, 128, torch.bfloat16)
