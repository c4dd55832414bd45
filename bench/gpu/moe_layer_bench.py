"""The routed experts of one MoE layer at decode (Qwen1.5-MoE-A2.7B's shape: 60 experts,
top-4, hidden 2048, intermediate 1408), routing included: the few-token path (route_topk +
two GEMVs) against the grouped GEMM (torch routing + align + two grouped launches), for bf16,
FP8 and 4-bit integer codes (group 128), LAYERS layers of distinct weights in one CUDA graph.

Run on the device: PYTHONPATH=src python3 bench/gpu/moe_layer_bench.py [--tokens 1 8]
    [--json FILE]

--grouped: the grouped GEMM alone at prefill sizes (--tokens 256 1024), bf16 against the
FP8 and 4-bit integer kernels in each launch config of triton_moe_quant.FP8_GEMM_CONFIGS /
INT_GEMM_CONFIGS (--configs names a subset), each also checked on the first layer against
the default config's output (max error / max |y|):

    PYTHONPATH=src python3 bench/gpu/moe_layer_bench.py --grouped --kinds fp8 int4 --tokens 256 1024
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import torch

from modelport.layers import triton_moe as tm
from modelport.layers import triton_moe_quant as tq
from modelport.layers.fused_moe import route

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from fusion_bench import time_graph  # noqa: E402

LAYERS, E, K, H, INTER, GROUP = 8, 60, 4, 2048, 1408, 128


def weights(kind: str, g: torch.Generator) -> list[tuple]:
    out = []
    for _ in range(LAYERS):
        if kind == "bf16":
            out.append(((torch.randn(E, 2 * INTER, H, device="cuda") * 0.02).bfloat16(),
                        (torch.randn(E, H, INTER, device="cuda") * 0.02).bfloat16()))
        elif kind == "fp8":
            out.append(((torch.randn(E, 2 * INTER, H, device="cuda") * 0.1).to(torch.float8_e4m3fn),
                        torch.rand(E, 2 * INTER, device="cuda") * 0.01,
                        (torch.randn(E, H, INTER, device="cuda") * 0.1).to(torch.float8_e4m3fn),
                        torch.rand(E, H, device="cuda") * 0.01))
        else:  # int4, group 128
            q13 = torch.randint(-2**31, 2**31 - 1, (E, 2 * INTER, H // 8), dtype=torch.int32,
                                device="cuda")
            q2 = torch.randint(-2**31, 2**31 - 1, (E, H, INTER // 8), dtype=torch.int32,
                               device="cuda")
            s13 = torch.rand(E, 2 * INTER, H // GROUP, device="cuda") * 0.002
            s2 = torch.rand(E, H, INTER // GROUP, device="cuda") * 0.002
            out.append((q13, s13, -s13 * 8, q2, s2, -s2 * 8))
    return out


def layer(kind: str, x: torch.Tensor, logits: torch.Tensor, w: tuple) -> torch.Tensor:
    if tm.moe_gemv_applies(x.shape[0], K):
        rw, ids = tm.route_topk(logits, K, False)
    else:
        rw, ids = route(logits, K, False)
    if kind == "bf16":
        return tm.fused_experts(x, *w, rw, ids)
    if kind == "fp8":
        return tq.fused_experts_fp8(x, w[0], w[1], w[2], w[3], rw, ids)
    return tq.fused_experts_wint(x, *w[:3], *w[3:], 4, GROUP, GROUP, rw, ids)


def quant_grouped(kind: str, x: torch.Tensor, logits: torch.Tensor, w: tuple,
                  launch: dict) -> torch.Tensor:
    rw, ids = route(logits, K, False)
    if kind == "fp8":
        return tq.fused_experts_fp8(x, w[0], w[1], w[2], w[3], rw, ids, **launch)
    return tq.fused_experts_wint(x, *w[:3], *w[3:], 4, GROUP, GROUP, rw, ids, **launch)


def grouped(a: argparse.Namespace, out) -> None:  # noqa: ANN001
    """bf16 vs FP8 / 4-bit integer codes through the grouped GEMM (no few-token path), each
    launch config of the kind's table (err: against the default config's output)."""
    g = torch.Generator(device="cuda").manual_seed(0)
    tm.MOE_GEMV_MAX = 0
    ws_bf16 = weights("bf16", g)
    for kind in [k for k in a.kinds if k != "bf16"]:
        table = tq.FP8_GEMM_CONFIGS if kind == "fp8" else tq.INT_GEMM_CONFIGS
        variants: dict[str, dict] = {}
        for name in a.configs or list(table):
            if name in table:
                bn, bk, warps, stages = table[name]
                variants[name] = dict(block_n=bn, block_k=bk, num_warps=warps, num_stages=stages)
        ref_launch: dict = {}
        ws = weights(kind, g)
        for t in a.tokens:
            x = torch.randn(t, H, device="cuda").bfloat16()
            logits = torch.randn(t, E, device="cuda")
            ms, _ = time_graph(lambda xx, wl, lg=logits: [layer("bf16", xx, lg, w) for w in wl],
                               x, ws_bf16, reps=a.reps)
            base = ms * 1000 / LAYERS
            ref = quant_grouped(kind, x, logits, ws[0], ref_launch).float()
            for name, launch in variants.items():
                ms, _ = time_graph(
                    lambda xx, wl, lc=launch, lg=logits, kd=kind:
                        [quant_grouped(kd, xx, lg, w, lc) for w in wl],
                    x, ws, reps=a.reps)
                us = ms * 1000 / LAYERS
                y = quant_grouped(kind, x, logits, ws[0], launch).float()
                err = ((y - ref).abs().max() / ref.abs().max()).item()
                rec = {"bench": "moe_layer_grouped", "device": torch.cuda.get_device_name(),
                       "tokens": t, "variant": f"{kind} {name}", "launch": launch,
                       "us": round(us, 2), "bf16_us": round(base, 2),
                       "vs_bf16": round(us / base, 3), "err_vs_ref": float(f"{err:.2e}")}
                print(json.dumps(rec), flush=True)
                if out:
                    out.write(json.dumps(rec) + "\n")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tokens", type=int, nargs="+", default=[1, 8])
    ap.add_argument("--kinds", nargs="+", default=["bf16", "fp8", "int4"])
    ap.add_argument("--json", default=None)
    ap.add_argument("--grouped", action="store_true",
                    help="the grouped GEMM only: bf16 vs each --kinds' launch configs")
    ap.add_argument("--configs", nargs="+", default=None,
                    choices=sorted({*tq.INT_GEMM_CONFIGS, *tq.FP8_GEMM_CONFIGS}),
                    help="with --grouped: these configs of INT_ / FP8_GEMM_CONFIGS (default all)")
    ap.add_argument("--reps", type=int, default=20)
    a = ap.parse_args()
    out = open(a.json, "a") if a.json else None  # noqa: SIM115
    if a.grouped:
        grouped(a, out)
        return
    g = torch.Generator(device="cuda").manual_seed(0)
    tm.MOE_GEMV_INT = True  # whatever MODELPORT_MOE_GEMV_INT says
    for kind in a.kinds:
        ws = weights(kind, g)
        for t in a.tokens:
            x = torch.randn(t, H, device="cuda").bfloat16()
            logits = torch.randn(t, E, device="cuda")
            res = {}
            for name, limit in (("grouped", 0), ("gemv", max(32, t * K))):  # gemv at any t
                tm.MOE_GEMV_MAX = limit
                ms, _ = time_graph(lambda xx, wl, kd=kind, lg=logits: [layer(kd, xx, lg, w) for w in wl],
                                   x, ws,
                                   reps=a.reps)
                res[name] = ms * 1000 / LAYERS
            rec = {"bench": "moe_layer", "device": torch.cuda.get_device_name(), "kind": kind,
                   "tokens": t, "grouped_us": round(res["grouped"], 2),
                   "gemv_us": round(res["gemv"], 2),
                   "speedup": round(res["grouped"] / res["gemv"], 3)}
            print(json.dumps(rec), flush=True)
            if out:
                out.write(json.dumps(rec) + "\n")
        del ws
        torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
