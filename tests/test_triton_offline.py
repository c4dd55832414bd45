"""Our Triton kernels without a GPU: each compiles for sm_90 (Triton's own ptxas, as on the H200
machine), and in the Triton interpreter the paged-attention kernels (decode, prefill, fp8
cache, rotary inside decode), the small fused ops, the W4/W8 GEMM and the NF4 kernels give
the references' results.

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

from helpers.triton_interp import PRELUDE

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


def test_decode_config_names_table_and_env_override(monkeypatch: pytest.MonkeyPatch) -> None:
    # the launch-config table and its parsing are plain Python (run here, where triton imports)
    import torch

    from modelport.layers import triton_attention as ta

    FP8 = torch.float8_e4m3fn  # noqa: N806

    for cands in ta.DECODE_CANDIDATES.values():
        for c in cands:
            assert ta.DecodeConfig.parse(c.name) == c
    # H200: decode-sweep (uniform contexts) for small batches, decode-ragged from 128 rows
    assert ta.decode_config(200, torch.bfloat16) == ta.DecodeConfig(block_n=32, num_stages=3)
    assert ta.decode_config(112, torch.bfloat16) == ta.DecodeConfig(num_stages=3)
    one = ta.decode_config(1, torch.bfloat16)  # batch 1: its own config, 16 splits
    assert one == ta.DecodeConfig(block_n=128, num_warps=8, programs=128)
    assert ta.decode_splits(1, 8, one.programs) == 16
    assert ta.decode_config(2, torch.bfloat16) == ta.DecodeConfig(num_stages=3)
    k1v5 = ta.DecodeConfig(k_cvt=1, v_cvt=5)
    assert ta.decode_config(48, FP8) == k1v5 and ta.decode_config(65, FP8) == k1v5
    assert ta.decode_config(64, FP8) == ta.DecodeConfig(block_n=128, num_stages=3, k_cvt=1, v_cvt=5)
    small, big = ta.DecodeConfig(block_n=32), ta.DecodeConfig(block_n=128, num_warps=8)
    monkeypatch.setitem(ta.DECODE_CONFIGS, "fp8", ((1, small), (64, big)))
    assert ta.decode_config(48, FP8) == small and ta.decode_config(49, FP8) == big
    ta._apply_env_configs("fp8:n128w8s2k5v5p528")
    assert ta.decode_config(3, FP8) == ta.DecodeConfig(128, 8, 2, 5, 5, 528)
    with pytest.raises(ValueError):
        ta._apply_env_configs("fp8:n64")
    # a register cap names itself ("r96") and round-trips; no cap: the old names
    capped = ta.DecodeConfig(block_n=32, num_stages=3, maxnreg=96)
    assert capped.name == "n32w4s3k0v0p264r96" and ta.DecodeConfig.parse(capped.name) == capped
    assert ta.DecodeConfig.parse("n32w4s3k0v0p264") == ta.DecodeConfig(block_n=32, num_stages=3)
    # "kind@bucket:name" replaces one bucket's entry and keeps the others
    monkeypatch.setitem(ta.DECODE_CONFIGS, "16bit", ta.DECODE_CONFIGS["16bit"])
    before_small = ta.decode_config(2, torch.bfloat16)
    ta._apply_env_configs("16bit@128:n32w4s3k0v0p264r96")
    assert ta.decode_config(200, torch.bfloat16) == capped
    assert ta.decode_config(2, torch.bfloat16) == before_small
    ta._apply_env_configs("16bit@160:n64w4s2k0v0p264")  # a new bucket slots in by its size
    assert ta.decode_config(140, torch.bfloat16) == capped  # bucket 144
    assert ta.decode_config(170, torch.bfloat16) == ta.DecodeConfig()
    for bad in ("16bit@0:n32w4s3k0v0p264", "16bit@x:n32w4s3k0v0p264", "int4@8:n32w4s3k0v0p264"):
        with pytest.raises(ValueError):
            ta._apply_env_configs(bad)


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


_NF4 = textwrap.dedent("""
    import torch
    from modelport.quantization import triton_nf4 as tn
    from modelport.quantization.nf4 import NF4_CODE

    def case(n, k, qb, m):
        # random codes and block scales, x in fp16, and the reference product x W^T
        g = torch.Generator().manual_seed(n + k + m)
        codes = torch.randint(0, 16, (n, k), generator=g, dtype=torch.uint8)
        am = torch.rand(n, k // qb, generator=g) + 0.05
        table = torch.tensor(NF4_CODE)
        w = table[codes.long()] * am.repeat_interleave(qb, dim=1)
        x = torch.randn(m, k, generator=g).to(torch.float16)
        return x, tn.pack_rows(codes), am, table, x.float() @ w.t()

    def check(y, ref, m, n, what):
        assert y.dtype == torch.float16 and y.shape == (m, n), what
        close(y, ref, what)

    for words in (False, True):
        tn.GEMV_WORDS = words
        for n, k, qb, m in [(40, 256, 64, 1), (33, 384, 128, 4), (16, 128, 32, 2),
                            (20, 512, 16, 1), (24, 768, 256, 3)]:
            x, packed, am, table, ref = case(n, k, qb, m)
            check(tn.gemv(x, packed, am, table), ref, m, n, ("gemv", words, n, k, qb, m))

    tn.GEMM_SPLIT_PROGRAMS = 64  # these small grids split too
    for split in (False, True):
        tn.GEMM_SPLIT = split
        for n, k, qb, m, want in [(64, 512, 64, 9, 8), (40, 384, 64, 20, 2), (24, 448, 64, 5, 1)]:
            x, packed, am, table, ref = case(n, k, qb, m)
            slices = tn.gemm_split(1, -(-n // tn.GEMM_BLOCK_N), k // qb)
            assert slices == (want if split else 1), (n, k, slices)
            check(tn.gemm(x, packed, am, table), ref, m, n, ("gemm", split, n, k, qb, m, slices))
""")


def test_nf4_kernels_match_the_reference_in_the_triton_interpreter() -> None:
    # the byte GEMV (MODELPORT_NF4_GEMV=bytes), the word GEMV (the default) and the GEMM with
    # and without K slices (MODELPORT_NF4_GEMM_SPLIT=0 / the default) on CPU tensors
    assert _interpret(_NF4).count("ok ") == 16


# Every child first patches triton 3.6's interpreter, which turns a program id used as an int
# (a loop start: the decode kernel's context split, the W4/W8 GEMM's K slice) into a
# 1-element array that int() rejects (3.9 fixed it the same way, `.squeeze()`), and defines
# close(), the results' check.
_PRELUDE = PRELUDE + textwrap.dedent("""
    def close(y, ref, what):
        # max error relative to the reference's largest value: within fp16 rounding
        err = (y.float() - ref.float()).abs().max().item() / ref.float().abs().max().item()
        assert err < 2e-3, (what, err)
        print("ok", what, f"{err:.1e}")
""")

_ATTENTION = textwrap.dedent("""
    import torch
    import test_gpu_attention as tga
    from modelport.layers import triton_attention as ta
    from modelport.layers.attention import AttentionMetadata, write_kv
    from modelport.layers.rotary import RopeSettings, RotaryEmbedding

    tga.DEV = "cpu"  # its batch builder, on CPU tensors (fp16: the interpreter's bf16 dot
    scale = 64 ** -0.5  # is not exact)

    def fresh(meta):
        return AttentionMetadata(**{**meta.__dict__, "backend_state": {}})

    decode = [(37, 1), (16, 1), (100, 1), (0, 1)]
    mixed = [(20, 5), (0, 17), (33, 1)]  # prefill, prefix hit, decode in one step
    for kv in (None, torch.float8_e4m3fn):
        for cases in (decode, mixed):
            q, k, v, cache, meta = tga._batch(cases, 8, 2, 64, 16, seed=len(cases),
                                              dtype=torch.float16, kv_dtype=kv)
            out = ta.triton_paged_attention(q, cache, fresh(meta), scale)
            rel = tga._rel(out, tga._reference(q, cache, meta, scale))
            assert rel < 2e-3, (kv, cases, rel)
            print("ok attention", kv, len(cases), f"{rel:.1e}")
    # the decode kernel taking the step's rotary and KV write (16-bit cache, decode only)
    q, k, v, cache, meta = tga._batch(decode, 8, 2, 64, 16, seed=9, dtype=torch.float16)
    pos = (meta.seq_lens.long() - 1).clamp(min=0)
    rotary = RotaryEmbedding(64, RopeSettings(10000.0, None, 4096)).to(torch.float16)
    fused_cache = cache.clone()
    out = ta.triton_paged_attention(q.clone(), fused_cache, fresh(meta), scale,
                                    rope=(k.clone(), v.clone(), pos, rotary.cos_sin_cache))
    q2, k2 = (t.view(like.shape) for t, like in zip(rotary(pos, q, k), (q, k)))
    write_kv(cache, k2, v, meta.slot_mapping)
    assert (fused_cache.float() - cache.float()).abs().max().item() < 2e-3
    rel = tga._rel(out, tga._reference(q2, cache, meta, scale))
    assert rel < 2e-3, rel
    print("ok attention rope", f"{rel:.1e}")
""")

_W_GEMM = textwrap.dedent("""
    import torch
    from modelport.quantization import triton_gemm as tg
    from modelport.quantization import triton_kernels as tk
    from modelport.quantization.kernels import GroupQuant

    for bits, group, n, k, m in [(8, 32, 64, 512, 7), (4, 32, 48, 256, 20), (4, 64, 40, 384, 5)]:
        g = torch.Generator().manual_seed(bits + group + m)
        codes = torch.randint(0, 1 << bits, (n, k), generator=g, dtype=torch.int32)
        scales = torch.rand(n, k // group, generator=g) * 0.02 + 0.001
        zeros = -scales * torch.randint(0, 1 << bits, (n, k // group), generator=g).float()
        gq = GroupQuant(codes.to(torch.uint8), scales, zeros, group, bits)
        pbits, v, block_k = tg.layout(gq)
        qw, sz = tg.pack_weight(gq.codes, pbits, v), tg.pack_scales(gq.scales, gq.zeros)
        x = torch.randn(m, k, generator=g).to(torch.float16)
        ref = x.float() @ gq.dequantize().t()
        for bk in (block_k, 128):  # one group a step (shipped), 128 columns (WIDE_K)
            for split in (1, 2):
                y = torch.zeros((m, n), dtype=torch.float32)
                grid = (tg.triton_cdiv(m, 16), tg.triton_cdiv(n, 32), split)
                tk.gemm.fn[grid](x, qw, sz, y, m, n, k, 16, x.stride(0), qw.stride(0),
                                 sz.stride(0), y.stride(0), tg.MAG_2_23, GROUP=group,
                                 BITS=pbits, V=v, BLOCK_K=bk, BLOCK_M=16, BLOCK_N=32,
                                 SPLIT_K=split)
                close(y, ref, f"w_gemm {bits} {group} {bk} {split}")
""")


_SMALL_OPS = textwrap.dedent("""
    import torch
    from modelport.layers import fused_ops as fo
    from modelport.layers import triton_attention as ta
    from modelport.layers.activation import SiluAndMul
    from modelport.layers.attention import write_kv
    from modelport.layers.layernorm import RMSNorm
    from modelport.layers.rotary import RopeSettings, RotaryEmbedding

    g = torch.Generator().manual_seed(0)
    h = torch.float16

    x, res = torch.randn(5, 192, generator=g).to(h), torch.randn(5, 192, generator=g).to(h)
    norm = RMSNorm(192, 1e-5).to(h)
    norm.weight.copy_(torch.rand(192, generator=g) + 0.5)
    close(fo.rms_norm(x, norm.weight, 1e-5), norm(x), "rms_norm")
    out, summed = fo.rms_norm(x, norm.weight, 1e-5, res)
    ref_out, ref_sum = norm(x, res)
    close(out, ref_out, "rms_norm + residual")
    close(summed, ref_sum, "residual sum")
    gu = torch.randn(3, 2 * 1500, generator=g).to(h)  # two column blocks, the last partial
    close(fo.silu_and_mul(gu), SiluAndMul()(gu), "silu_and_mul")
    rotary = RotaryEmbedding(64, RopeSettings(10000.0, None, 256)).to(h)
    pos = torch.tensor([0, 7, 200, 31])
    q, k = torch.randn(4, 8 * 64, generator=g).to(h), torch.randn(4, 2 * 64, generator=g).to(h)
    rq, rk = rotary(pos, q, k)
    fq, fk = fo.apply_rotary_(pos, q.clone(), k.clone(), rotary.cos_sin_cache, 64)
    close(fq, rq, "rotary q")
    close(fk, rk, "rotary k")
    # (a 16-bit cache only: the interpreter's own fp16 -> e4m3 cast does not round as the
    # GPU does, so an fp8 write is checked on the GPU alone)
    cache = torch.zeros(2, 6, 16, 2, 64).to(h)
    ref = cache.clone()
    kk, vv = torch.randn(3, 2, 64, generator=g).to(h), torch.randn(3, 2, 64, generator=g).to(h)
    slots = torch.tensor([5, -1, 77])  # -1: a padded CUDA-graph row, skipped
    ta.write_kv_triton(cache, kk, vv, slots)
    write_kv(ref, kk[[0, 2]], vv[[0, 2]], slots[[0, 2]])
    assert torch.equal(cache, ref)
    print("ok write_kv")
""")


def _interpret(script: str) -> str:
    """Run script after _PRELUDE in a child process (TRITON_INTERPRET must be set before
    triton is imported) and return what it printed."""
    env = {**os.environ, "TRITON_INTERPRET": "1",
           "PYTHONPATH": os.pathsep.join([str(ROOT / "src"), str(ROOT / "tests")])}
    p = subprocess.run([sys.executable, "-c", _PRELUDE + script], env=env,
                       capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stderr[-2000:]
    return p.stdout


def test_paged_attention_kernels_match_the_reference_in_the_triton_interpreter() -> None:
    # decode and prefill (prefix hits, a mixed step) on 16-bit and fp8 caches against the
    # float32 reference, and the decode kernel with the rotary + KV write inside
    assert _interpret(_ATTENTION).count("ok attention") == 5


def test_w4_w8_gemm_matches_the_reference_in_the_triton_interpreter() -> None:
    # the 5-255-row GEMM at one group a step and at 128 columns (MODELPORT_W_GEMM_WIDE_K),
    # with and without K slices, against the reference dequantization
    assert _interpret(_W_GEMM).count("ok w_gemm") == 12


def test_small_fused_ops_match_torch_in_the_triton_interpreter() -> None:
    # RMSNorm (with the residual add), SiLU-and-mul, rotary and the KV write (a skipped
    # padding row) against the torch modules they replace
    assert _interpret(_SMALL_OPS).count("ok ") == 7

