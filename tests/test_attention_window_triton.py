"""Sliding-window and soft-capped attention in the Triton kernels, without a GPU: the kernels
in the Triton interpreter against the reference backend (decode with context splits, prefill
chunks behind cached context, fp8 cache, the rotary inside decode) and their sm_90 compile;
the same checks on CUDA are marked ``gpu``. (The models: tests/test_models_gemma.py.)
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

from modelport.layers.attention import AttentionMetadata, reference_paged_attention

pytest.importorskip("triton")
sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "bench" / "gpu"))  # kernel_regs

_KERNELS = """
import torch
import test_gpu_attention as tga
from modelport.layers import triton_attention as ta
from modelport.layers.attention import AttentionMetadata, reference_paged_attention, write_kv
from modelport.layers.rotary import RopeSettings, RotaryEmbedding

tga.DEV = "cpu"
scale = 32 ** -0.5

def fresh(meta):
    return AttentionMetadata(**{**meta.__dict__, "backend_state": {}})

def ref(q, cache, meta, **kw):
    return reference_paged_attention(q.float(), cache.float(), fresh(meta), scale, **kw)

decode = [(37, 1), (16, 1), (100, 1), (0, 1)]  # 4 requests x 2 KV heads: split decode
mixed = [(20, 5), (0, 17), (33, 1), (3, 40)]  # chunk after context, prefill, decode, long
for kv, cases, kw in [
    (None, decode, {"sliding_window": 7}),
    (None, mixed, {"sliding_window": 20, "soft_cap": 0.7}),
    (None, decode, {"sliding_window": 80, "soft_cap": 1.5}),  # 80 of 101: two 64-wide splits
    (torch.float8_e4m3fn, mixed, {"sliding_window": 9, "soft_cap": 1.0}),
]:
    q, k, v, cache, meta = tga._batch(cases, 4, 2, 32, 16, seed=len(kw) + len(cases),
                                      dtype=torch.float16, kv_dtype=kv)
    q = q * 3  # larger scores: the cap bites
    out = ta.triton_paged_attention(q, cache, fresh(meta), scale, **kw)
    r = ref(q, cache, meta, **kw)
    rel = tga._rel(out, r)
    assert rel < 2e-3, (kv, kw, rel)
    assert tga._rel(r, ref(q, cache, meta)) > 2e-2, (kw, "no effect")
    print("ok kernel", kv is not None, len(cases), kw, f"{rel:.1e}")
# the decode kernel with the rotary and KV write inside (decode-only steps)
q, k, v, cache, meta = tga._batch(decode, 4, 2, 32, 16, seed=9, dtype=torch.float16)
pos = (meta.seq_lens.long() - 1).clamp(min=0)
rotary = RotaryEmbedding(32, RopeSettings(10000.0, None, 4096)).to(torch.float16)
fused_cache = cache.clone()
kw = {"sliding_window": 9, "soft_cap": 1.0}
out = ta.triton_paged_attention(q.clone(), fused_cache, fresh(meta), scale,
                                rope=(k.clone(), v.clone(), pos, rotary.cos_sin_cache), **kw)
q2, k2 = (t.view(like.shape) for t, like in zip(rotary(pos, q, k), (q, k)))
write_kv(cache, k2, v, meta.slot_mapping)
assert (fused_cache.float() - cache.float()).abs().max().item() < 2e-3
rel = tga._rel(out, ref(q2, cache, meta, **kw))
assert rel < 2e-3, rel
print("ok kernel rope", f"{rel:.1e}")
"""


def test_triton_window_softcap_kernels_match_reference_in_interpreter() -> None:
    pytest.importorskip("triton.backends.nvidia")
    from test_triton_offline import _interpret

    assert _interpret(_KERNELS).count("ok kernel") == 5


def test_triton_window_softcap_kernels_compile_for_sm90() -> None:
    pytest.importorskip("triton.backends.nvidia")
    import kernel_regs  # bench/gpu: the offline compile helper

    from modelport.layers import triton_attention as ta

    ints = {a: "i64" if a == "half_stride" else "i32" for a in kernel_regs._DECODE_INTS}
    divisible = (*kernel_regs._DECODE_PTRS, "cache_ptr", *kernel_regs._DECODE_INTS)
    for kind, rope in (("16bit", True), ("16bit", False), ("fp8", False)):
        cfg = ta.decode_config(64, torch.float8_e4m3fn if kind == "fp8" else torch.bfloat16)
        sig = {**kernel_regs._DECODE_PTRS, **ints, "sm_scale_log2": "fp32",
               "cache_ptr": "*fp8e4nv" if kind == "fp8" else "*bf16"}
        const = dict(NUM_SPLITS=4, S_PAD=4, G=4, G_PAD=16, D=256, PAGE=16,
                     BLOCK_N=cfg.block_n, K_CVT=cfg.k_cvt, V_CVT=cfg.v_cvt, PDL=True,
                     ORDERED=True, ROPE=rope, WINDOW=4096, SOFTCAP=50.0)
        r = kernel_regs.compile_sm90(ta._decode_kernel, sig, const, divisible, cfg.num_warps,
                                     cfg.num_stages, loops=False)
        assert 0 < r["regs"] <= 255 and r["programs_per_sm"] >= 1, r
    psig = {"q_ptr": "*bf16", "cache_ptr": "*bf16", "out_ptr": "*bf16", "items_ptr": "*i32",
            "block_tables_ptr": "*i32", "seq_lens_ptr": "*i32", "qsl_ptr": "*i32",
            "sm_scale_log2": "fp32", **{a: "i32" for a in (
                "stride_qt", "stride_qh", "stride_ot", "stride_oh", "stride_bt", "stride_blk",
                "stride_slot")}, "half_stride": "i64"}
    for window, cap, d in ((4096, None, 128), (None, 50.0, 128), (512, 30.0, 256)):
        const = dict(G=2, D=d, PAGE=16, BLOCK_M=ta.PREFILL_BLOCK_M, BLOCK_N=64, PDL=True,
                     WINDOW=window, SOFTCAP=cap)  # head_dim 256: Gemma's
        r = kernel_regs.compile_sm90(ta._prefill_kernel, psig, const, tuple(psig), 4, 2,
                                     loops=False)
        assert 0 < r["regs"] <= 255, r



@pytest.mark.gpu
@pytest.mark.parametrize("kv_dtype", [None, torch.float8_e4m3fn], ids=["bf16", "fp8"])
def test_gpu_kernels_window_softcap_match_reference(kv_dtype) -> None:
    import test_gpu_attention as tga
    from modelport.layers import triton_attention as ta

    for cases in ([(37, 1), (300, 1), (1000, 1), (5, 1)],
                  [(20, 70), (0, 130), (333, 1), (700, 3)]):
        for kw in ({"sliding_window": 64}, {"soft_cap": 2.0}, {"sliding_window": 200,
                                                              "soft_cap": 1.0}):
            q, _, _, cache, meta = tga._batch(cases, 8, 2, 128, 16, seed=len(kw),
                                              kv_dtype=kv_dtype)
            q = q * 3
            out = ta.triton_paged_attention(q, cache, meta, 128**-0.5, **kw)
            m = AttentionMetadata(**{**meta.__dict__, "backend_state": {}})
            ref = reference_paged_attention(q.float(), cache.float(), m, 128**-0.5, **kw)
            assert tga._rel(out, ref) < 1e-2, (cases, kw)
