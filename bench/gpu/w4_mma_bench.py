"""The experimental tensor-core W4 GEMV (quantization/triton_w4mma.py) against the engine's
W4 GEMV (triton_kernels.gemv, autotuned) at one activation row, Llama-3.1-8B shapes, AWQ-like
group 128 with zero points. 32 layers of distinct weights per shape in one CUDA graph (no L2
reuse), so the figure is per decode step. Also prints each variant's error against the
engine kernel's output for the same codes. One JSON line per (shape, variant).
Run on the device: PYTHONPATH=src python3 bench/gpu/w4_mma_bench.py
"""

from __future__ import annotations

import functools
import json
import os
import sys

import torch

from modelport.quantization import triton_w4mma as wm
from modelport.quantization.triton_gemm import (
    MAG_128,
    MAG_2048,
    gemv_workspace,
    pack_pairs,
    pack_scales,
    pack_weight,
    triton_cdiv,
)

LAYERS, GROUP = 32, 128
SHAPES = {"qkv": (6144, 4096), "o": (4096, 4096), "gate_up": (28672, 4096),
          "down": (4096, 14336)}
# (block_n, split, num_warps, num_stages)
VARIANTS = [(128, 1, 4, 1), (128, 2, 4, 1), (128, 4, 4, 1), (128, 8, 4, 1), (64, 4, 4, 1),
            (64, 8, 4, 1), (256, 2, 8, 1), (128, 4, 4, 2), (128, 8, 4, 3)]


def graph_ms(fn) -> float:
    """fn's time in ms, replayed from a CUDA graph (fusion_bench's timer)."""
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from fusion_bench import time_graph

    return time_graph(lambda _x, _state: fn(), None, None, reps=10)[0]


def bench_shape(name: str, x: torch.Tensor) -> None:
    from modelport.quantization.triton_kernels import gemv

    n, k = SHAPES[name]
    xk = x[:, :k].contiguous()
    codes = torch.randint(0, 16, (n, k), dtype=torch.uint8, device="cuda")
    s = torch.rand(n, k // GROUP, device="cuda") * 0.01 + 0.001
    z = -torch.randint(0, 16, (n, k // GROUP), device="cuda").float() * s
    sz = pack_scales(s, z)
    old = [pack_weight(codes, 4, 4)]
    new = [pack_pairs(codes)]
    for _ in range(1, LAYERS):  # distinct bytes per layer (random words)
        old.append(torch.empty_like(old[0]).random_(-(2**31), 2**31 - 1))
        new.append(torch.empty_like(old[0]).random_(-(2**31), 2**31 - 1))
    ws, cnt = gemv_workspace(x.device, n)
    y = torch.empty((1, n), device="cuda", dtype=torch.bfloat16)

    def run_old(w: torch.Tensor) -> torch.Tensor:
        gemv[lambda m: (triton_cdiv(n, m["BLOCK_N"]), m["SPLIT"])](
            xk, w, sz, y, ws, cnt, n, xk.stride(0), y.stride(0), MAG_2048, MAG_128, K=k,
            GROUP=GROUP, BITS=4, V=4, BLOCK_M=1)
        return y

    def run_new(bn: int, split: int, warps: int, stages: int) -> list[torch.Tensor]:
        return [wm.w4_mma(xk, w, sz, n, GROUP, bn, split, warps, stages) for w in new]

    ref = run_old(old[0]).float().clone()
    ms = graph_ms(lambda: [run_old(w) for w in old])
    gb = LAYERS * (n * k / 2 + sz.numel() * 4) / 1e9
    print(json.dumps({"shape": name, "n": n, "k": k, "variant": "engine_gemv",
                      "us_per_layer": round(ms * 1000 / LAYERS, 2),
                      "TBps": round(gb / ms, 3)}), flush=True)
    for bn, split, warps, stages in VARIANTS:
        if (k // GROUP) % split:
            continue
        try:
            out = wm.w4_mma(xk, new[0], sz, n, GROUP, bn, split, warps, stages).float()
            err = ((out - ref).norm() / ref.norm()).item()
            ms = graph_ms(functools.partial(run_new, bn, split, warps, stages))
        except Exception as e:  # noqa: BLE001 - report and go on with the next variant
            print(json.dumps({"shape": name, "variant": [bn, split, warps, stages],
                              "error": repr(e)[:300]}), flush=True)
            continue
        print(json.dumps({"shape": name, "n": n, "k": k, "variant": [bn, split, warps, stages],
                          "us_per_layer": round(ms * 1000 / LAYERS, 2),
                          "TBps": round(gb / ms, 3), "rel_err_vs_engine": err}), flush=True)


def main() -> None:
    torch.manual_seed(0)
    x = torch.randn(1, 14336, device="cuda", dtype=torch.bfloat16)
    for name in sys.argv[1:] or list(SHAPES):
        bench_shape(name, x)


if __name__ == "__main__":
    main()
