"""GPU: time of the linear layers of Llama-3.1-8B per decode step, per weight format.

Per decoder layer the four projections (qkv 4096->6144, o 4096->4096, gate_up 4096->28672,
down 14336->4096) run back to back inside one CUDA graph (as the engine's decode graphs do),
replayed many times; the figure is x 32 layers, i.e. the linear part of one decode step.
Random weights packed in each format (group 128 for the 4-bit ones). Attention, norms and the
LM head are not included: this isolates what the weight format changes.

4-bit rows: ``awq-w4`` is what the engine runs (GEMV up to ``GEMV_MAX_M`` rows, the
dequant-GEMM kernel below ``DEQUANT_MIN_M``, expand-to-bf16 + cuBLAS from there);
``awq-w4-gemm`` (each weight dequantized before tl.dot), ``awq-w4-codes`` (tl.dot on the raw
codes, scales applied to the partial products, the activations' sums inside every program;
``-xsum``: those sums computed by a launch before the GEMM; ``-pair``: one dot a K step on x
copied into pair order by that launch) and ``awq-w4-dequant`` force one path at every batch.

FP8 rows: ``fp8`` is what the engine runs (Triton W8A16 up to ``fp8.W8A16_MAX_M`` rows, fused
per-token quantization + the Triton FP8 GEMM up to ``fp8.TRITON_W8A8_MAX_M``, the same
quantization + ``torch._scaled_mm`` above); ``fp8-mm`` forces the quantize +
``_scaled_mm`` path, ``fp8-w8a8`` the quantize + Triton FP8 GEMM path and ``fp8-w8a16`` the
W8A16 kernel (up to 256 rows) at every batch, to place the crossovers.

``--per-shape`` also times each projection alone (x 32 in its own graph), to show which
shape a format loses on; ``--copies N`` cycles the layers through N copies of the weights.
Each row records the MODELPORT_* variables it ran under (``knobs``).

    python bench/quant_gpu_linear.py [--batch 1 4 64 256] [--formats bf16 fp8 fp8-mm]
        [--per-shape] [--copies 4] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import os

import torch
import torch.nn.functional as F

SHAPES = {"qkv": (6144, 4096), "o": (4096, 4096), "gate_up": (28672, 4096), "down": (4096, 14336)}
LAYERS = 32
W8A16_BENCH_MAX_M = 256


def build(fmt: str) -> list:
    from modelport.quantization.fp8 import (
        fp8_linear,
        fp8_scaled_mm,
        fp8_triton_mm,
        quantize_fp8_per_channel,
    )
    from modelport.quantization.kernels import GroupQuant
    from modelport.quantization.triton_gemm import TritonKernel

    ops = []
    gen = torch.Generator().manual_seed(0)
    for n, k in SHAPES.values():
        if fmt == "bf16":
            w = (torch.randn(n, k, generator=gen) * 0.02).to("cuda", torch.bfloat16)
            ops.append(lambda x, w=w: F.linear(x, w))
        elif fmt.split("-")[0] in ("awq", "gptq"):
            bits = 8 if "w8" in fmt else 4
            codes = torch.randint(0, 1 << bits, (n, k), generator=gen, dtype=torch.int32)
            s = torch.rand(n, k // 128, generator=gen) * 0.01
            gq = GroupQuant(codes.to(torch.uint8), s, -s * (1 << (bits - 1)), 128, bits)
            kern = TritonKernel(gq, torch.device("cuda"))
            if fmt.endswith("-dequant"):  # expand to bf16 + cuBLAS at every batch
                ops.append(lambda x, kern=kern: F.linear(x, kern.dequantize(x.dtype)))
            elif fmt.endswith("-gemm"):  # the dequant-GEMM kernel at every batch
                ops.append(lambda x, kern=kern: kern.gemm_affine(x))
            elif "-codes" in fmt:  # the raw-code GEMM at every batch (variants below)
                ops.append(lambda x, kern=kern, xs="-xsum" in fmt, pair="-pair" in fmt:
                           kern.gemm_codes(x, xsum=xs, pair=pair))
            else:
                ops.append(kern)
        elif fmt.startswith("fp8"):
            from modelport.quantization.triton_fp8 import w8a16_linear

            q, sc = quantize_fp8_per_channel((torch.randn(n, k, generator=gen) * 0.02).cuda())
            fn = {"fp8": fp8_linear, "fp8-mm": fp8_scaled_mm, "fp8-w8a16": w8a16_linear,
                  "fp8-w8a8": fp8_triton_mm}[fmt]  # fmt: skip
            ops.append(lambda x, q=q, sc=sc, fn=fn: fn(x, q, sc, None))
    return ops


def time_step(op_sets: list[list], m: int, iters: int = 50,
              only: str | None = None) -> float:
    """Milliseconds for one decode step's linears (one layer's four, graph-replayed, x 32;
    layer i runs the weights of op_sets[i % len(op_sets)]); ``only``: that projection's share
    (it alone, x 32)."""
    xs = {k: torch.randn(m, kk, device="cuda", dtype=torch.bfloat16) for k, (_, kk) in SHAPES.items()}
    inputs = [xs[k] for k in SHAPES]
    if only is not None:
        i = list(SHAPES).index(only)
        op_sets, inputs = [[ops[i]] for ops in op_sets], [inputs[i]]
    n_layer = 0

    def layer() -> None:
        nonlocal n_layer
        for op, x in zip(op_sets[n_layer % len(op_sets)], inputs):
            op(x)
        n_layer += 1

    for _ in range(3 * len(op_sets)):
        layer()  # autotune + warm up outside the graph
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        layer()
        with torch.cuda.graph(graph, stream=s):
            for _ in range(LAYERS):
                layer()
    torch.cuda.current_stream().wait_stream(s)
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    graph.replay()
    start.record()
    for _ in range(iters):
        graph.replay()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / iters


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--batch", type=int, nargs="+", default=[1, 4, 64, 256])
    ap.add_argument("--formats", nargs="+", default=["bf16", "awq-w4", "gptq-w8", "fp8"])
    ap.add_argument("--per-shape", action="store_true")
    ap.add_argument("--copies", type=int, default=1,
                    help="distinct weight copies the 32 layers cycle through (1: every layer "
                         "runs one layer's weights, as earlier rounds measured; 4 or more keep a "
                         "small shape such as o, 16-33 MB, from being read out of L2 in the "
                         "per-shape figures)")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    knobs = {k: v for k, v in sorted(os.environ.items()) if k.startswith("MODELPORT_")}
    rows = []
    for fmt in args.formats:
        op_sets = [build(fmt) for _ in range(args.copies)]
        for m in args.batch:
            if fmt == "fp8-w8a16" and m > W8A16_BENCH_MAX_M:
                continue  # bf16 tensor-core bound there: not a candidate
            ms = time_step(op_sets, m)
            rows.append({"format": fmt, "batch": m, "linear_ms_per_step": round(ms, 3),
                         "tok_s_linear_only": round(m * 1000 / ms, 1), "copies": args.copies,
                         "knobs": knobs})
            if args.per_shape:
                rows[-1]["us_per_layer"] = {
                    name: round(time_step(op_sets, m, only=name) * 1000 / LAYERS, 2)
                    for name in SHAPES}
            print(json.dumps(rows[-1]), flush=True)  # a run cut short still shows its rows
        del op_sets
        torch.cuda.empty_cache()
        write(args.json, rows)
    print(json.dumps(write(args.json, rows), indent=2))


def write(path: str | None, rows: list[dict]) -> dict:
    """The rows so far with each one's ratio to bf16 at its batch; to path too if given."""
    base = {r["batch"]: r["linear_ms_per_step"] for r in rows if r["format"] == "bf16"}
    for r in rows:
        if r["batch"] in base:
            r["vs_bf16_latency"] = round(r["linear_ms_per_step"] / base[r["batch"]], 3)
    out = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "rows": rows}
    if path:
        with open(path, "w") as f:
            json.dump(out, f, indent=2)
    return out


if __name__ == "__main__":
    main()
