"""Does a weight prefetched into L2 on a side stream make the next batch-1 GEMV faster?

32 "layers" of distinct bf16 weights per shape in one CUDA graph (no L2 reuse between
layers). Each layer is an idle kernel (``torch.cuda._sleep``: attention's ~6-10 us at batch
1 moves almost no bytes) followed by the engine's GEMV of one row. Variants per layer:

* ``plain``: sleep, GEMV.
* ``bulk`` / ``load``: the weight's first MB megabytes prefetched on a side stream forked
  before the sleep and joined before the GEMV (layers/l2_prefetch.py's two kinds).
* ``sleep``: the sleep alone; ``gemv``: the GEMV alone (HBM), ``gemv-l2``: the same weight
  32 times (L2 after the first).

Run on the device: PYTHONPATH=src python3 bench/gpu/l2_probe.py [--cycles 0 8000 16000]
One JSON line per (shape, cycles, variant, MB): us a layer.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import torch

from modelport.layers import triton_l2_prefetch as k
from modelport.layers.triton_gemv import gemv

LAYERS = 32
SHAPES = {"o": (4096, 4096), "qkv": (6144, 4096), "down": (4096, 14336)}


def graph_us(fn) -> float:
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from fusion_bench import time_graph

    return time_graph(lambda _x, _s: fn(), None, None, reps=20)[0] * 1000 / LAYERS


def probe(shape: str, cycles_list: list[int], mbs: list[float], side) -> None:
    n, kk = SHAPES[shape]
    dev = torch.device("cuda")
    ws = [torch.randn(n, kk, device=dev, dtype=torch.bfloat16) for _ in range(LAYERS)]
    x = torch.randn(1, kk, device=dev, dtype=torch.bfloat16)

    def run(cycles, pf=None, nbytes=0, same=False):
        def fn():
            main = torch.cuda.current_stream()
            for i in range(LAYERS):
                w = ws[0] if same else ws[i]
                if pf is not None:
                    side.wait_stream(main)
                    with torch.cuda.stream(side):
                        pf(w, nbytes)
                if cycles:
                    torch.cuda._sleep(cycles)
                if pf is not None:
                    main.wait_stream(side)
                gemv(x, w, None)
        return fn

    def emit(variant, cycles, us, mb=None):
        print(json.dumps({"shape": shape, "cycles": cycles, "variant": variant, "mb": mb,
                          "us_per_layer": round(us, 2),
                          "device": torch.cuda.get_device_name()}), flush=True)

    emit("gemv", 0, graph_us(run(0)))
    emit("gemv-l2", 0, graph_us(run(0, same=True)))
    for cycles in cycles_list:
        if cycles:
            emit("sleep", cycles, graph_us(lambda c=cycles: [torch.cuda._sleep(c)
                                                             for _ in range(LAYERS)]))
        emit("plain", cycles, graph_us(run(cycles)))
        for mb in mbs:
            nbytes = min(n * kk * 2, int(mb * 2**20)) // 16 * 16
            emit("bulk", cycles, graph_us(run(cycles, k.bulk_prefetch, nbytes)), mb)
            emit("load", cycles, graph_us(run(cycles, k.load_prefetch, nbytes)), mb)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--cycles", type=int, nargs="+", default=[0, 8000, 16000])
    ap.add_argument("--mb", type=float, nargs="+", default=[16, 40])
    ap.add_argument("--shapes", nargs="+", default=list(SHAPES))
    args = ap.parse_args()
    side = torch.cuda.Stream()
    k.prepare(torch.device("cuda"))
    for shape in args.shapes:
        probe(shape, args.cycles, args.mb, side)


if __name__ == "__main__":
    main()
