"""Single-row decode layer chains on the Llama-3.1-8B shapes, 32 layers in one CUDA graph.

Projections (attention left out): unfused norm / GEMV / SiLU kernels vs GEMVs with the norm,
SiLU and residual fused in (prologue / epilogue variants), and the GEMVs alone. Attention
path (``attn``): rotary, KV write and split decode attention at batch 1, 1,024 tokens of
context, alone and chained, per split count. Distinct weights / caches per layer, PDL as
the engine runs it (MODELPORT_PDL=0 for plain launches). One JSON line per variant.
Run on the device: PYTHONPATH=src python3 bench/gpu/fusion_bench.py [variant ...|attn]
"""

from __future__ import annotations

import json
import os
import sys

import torch

from modelport.layers import fused_ops as fo
from modelport.layers import pdl
from modelport.layers.triton_gemv import gemv

DT = torch.bfloat16
HID, Q, KV, INTER, LAYERS = 4096, 4096, 1024, 14336, 32
EPS = 1e-5


def make_layers():
    g = torch.Generator(device="cuda").manual_seed(0)

    def r(*s):
        return (torch.randn(*s, device="cuda", generator=g) * 0.02).to(DT)

    return [{"qkv": r(Q + 2 * KV, HID), "o": r(HID, Q), "gu": r(2 * INTER, HID),
             "down": r(HID, INTER), "n1": 1 + r(HID), "n2": 1 + r(HID)} for _ in range(LAYERS)]


def unfused(x, layers):
    res = None
    for L in layers:
        if res is None:
            res, h = x, fo.rms_norm(x, L["n1"], EPS)
        else:
            h, res = fo.rms_norm(x, L["n1"], EPS, res)
        qkv = gemv(h, L["qkv"])
        a = gemv(qkv[:, :Q], L["o"])
        h, res = fo.rms_norm(a, L["n2"], EPS, res)
        x = gemv(fo.silu_and_mul(gemv(h, L["gu"])), L["down"])
    return x + res  # the residual stream, as the fused layers return it


def fused(x, layers, glu=True):
    for L in layers:
        qkv = gemv(x, L["qkv"], norm=(L["n1"], EPS))
        x = gemv(qkv[:, :Q], L["o"], residual=x)
        if glu:
            act = gemv(x, L["gu"], norm=(L["n2"], EPS), glu=True)
            x = gemv(act, L["down"], residual=x)
        else:
            gu = gemv(x, L["gu"], norm=(L["n2"], EPS))
            x = gemv(gu, L["down"], silu=True, residual=x)
    return x


def gemvs_only(x, layers):
    for L in layers:
        qkv = gemv(x, L["qkv"])
        a = gemv(qkv[:, :Q], L["o"])
        act = gemv(a, L["gu"])
        x = gemv(act[:, :INTER], L["down"])
    return x


VARIANTS = {
    "unfused": unfused,
    "fused_2pass_norm_silu_prologue": lambda x, L: fused(x, L, False),
    "fused_2pass_norm_glu": lambda x, L: fused(x, L, True),
    "gemvs_only": gemvs_only,
}


def attn_layers(ctx=1024):
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from kernel_bench import meta_for

    from modelport.layers.rotary import RopeSettings, RotaryEmbedding

    meta, nb = meta_for([(ctx, 1)])
    rot = RotaryEmbedding(128, RopeSettings(500000.0, None, 4096)).to("cuda")
    cs = rot.cos_sin_cache.to(DT)
    pos = torch.tensor([ctx], device="cuda", dtype=torch.int64)
    caches = [torch.randn(2, nb, 16, 8, 128, device="cuda", dtype=DT) for _ in range(LAYERS)]
    qkvs = [torch.randn(1, Q + 2 * KV, device="cuda", dtype=DT) for _ in range(LAYERS)]
    return meta, cs, pos, caches, qkvs


def attn_chain(parts, splits=None):
    from modelport.layers import triton_attention as ta

    def run(_x, state):
        meta, cs, pos, caches, qkvs = state
        out = None
        for cache, qkv in zip(caches, qkvs):
            q, k, v = qkv[:, :Q], qkv[:, Q:Q + KV], qkv[:, Q + KV:]
            if "rot" in parts:
                fo.apply_rotary_(pos, q, k, cs, 128)
            if "kv" in parts:
                ta.write_kv_triton(cache, k.view(1, 8, 128), v.view(1, 8, 128),
                                   meta.slot_mapping)
            if "dec" in parts:
                meta.backend_state.clear()
                plan = ta.get_plan(meta, 8, cache.dtype)
                if splits:
                    plan.splits = splits
                out = ta.triton_paged_attention(q.view(1, 32, 128), cache, meta, 128**-0.5)
        return out
    return run


ATTN_VARIANTS = {
    "attn_rot_kv_dec": attn_chain(("rot", "kv", "dec")),
    "attn_rot": attn_chain(("rot",)),
    "attn_kv": attn_chain(("kv",)),
    "attn_dec": attn_chain(("dec",)),
    **{f"attn_dec_splits{s}": attn_chain(("dec",), s) for s in (1, 2, 4, 8, 16, 32)},
}


def time_graph(fn, x, layers, reps=20):
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for _ in range(2):
            fn(x, layers)
    torch.cuda.current_stream().wait_stream(s)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = fn(x, layers)
    for _ in range(3):
        graph.replay()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(reps):
        graph.replay()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / reps, out


def main() -> None:
    x = torch.randn(1, HID, device="cuda", dtype=DT)
    if sys.argv[1:] == ["attn"]:
        state = attn_layers()
        for name, fn in ATTN_VARIANTS.items():
            ms, _ = time_graph(fn, x, state)
            print(json.dumps({"variant": name, "pdl": pdl.enabled(),
                              "us_per_layer": round(ms * 1000 / LAYERS, 2)}), flush=True)
        return
    layers = make_layers()
    nbytes = sum(L[k].numel() * 2 for L in layers for k in ("qkv", "o", "gu", "down"))
    ref = None
    names = sys.argv[1:] or list(VARIANTS)
    for name in names:
        ms, out = time_graph(VARIANTS[name], x, layers)
        if name == "unfused":  # compare residual streams (the fused layers return that)
            ref = out.float()
        err = None
        if ref is not None and name.startswith("fused"):
            err = ((out.float() - ref).norm() / ref.norm()).item()
        print(json.dumps({"variant": name, "pdl": pdl.enabled(), "us_per_layer": round(
            ms * 1000 / LAYERS, 2), "weight_TBps": round(nbytes / ms / 1e9, 3),
            "rel_err_vs_unfused": err}), flush=True)


if __name__ == "__main__":
    main()
