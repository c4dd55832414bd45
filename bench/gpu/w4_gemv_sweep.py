"""GPU: every launch config of the W4 GEMV kernel on the Llama-3.1-8B decode shapes.

For each projection shape (qkv, o, gate_up, down) and batch 1/2/4, times the raw kernel
(``triton_kernels.gemv_kernel``) for each candidate config, enough distinct weight copies
per CUDA graph that they do not stay in L2, and checks each config's output against the
reference dequantization. Also times cuBLAS bf16 on the same shape and the autotuned kernel
the engine runs, for scale. One JSON object a line:

    PYTHONPATH=src python3 bench/gpu/w4_gemv_sweep.py [--batch 1 2 4] [--shapes qkv o] [--out FILE]

--half2 (one row only) adds the half2 GEMV (triton_w4_half2, the one-row default):
its autotuned launch ("w4-half2-autotuned") and each of half2_candidates() ("w4-half2");
--half2-only skips the shipped kernel's candidates.
"""

# ruff: noqa: B023 - each closure runs within its own loop iteration
from __future__ import annotations

import argparse
import itertools
import json
import time

import torch

SHAPES = {"qkv": (6144, 4096), "o": (4096, 4096), "gate_up": (28672, 4096), "down": (4096, 14336)}
COPY_BYTES = 320 << 20  # weights per graph: several times the H200's L2


def candidates() -> list[dict]:
    out = []
    for bn, w, r, pf, sp in itertools.product((2, 4, 8, 16), (1, 2, 4), (1, 2), (False, True),
                                              (1, 2, 4)):
        if sp > 1 and (pf or r > 1):
            continue
        out.append({"BLOCK_N": bn, "num_warps": w, "BLOCK_W": 128 * w * r, "PREFETCH": pf,
                    "SPLIT": sp, "num_stages": 1})
    for bn, w, st in itertools.product((4, 8), (2, 4), (2, 3)):
        out.append({"BLOCK_N": bn, "num_warps": w, "BLOCK_W": 128 * w, "PREFETCH": False,
                    "SPLIT": 1, "num_stages": st})
    # register caps for the widest one-row tiles (16 columns, 4 warps: 255 registers a
    # thread uncapped, two programs an SM; bench/gpu/kernel_regs.py w4)
    for pf, cap in itertools.product((False, True), (168, 128)):
        out.append({"BLOCK_N": 16, "num_warps": 4, "BLOCK_W": 512, "PREFETCH": pf, "SPLIT": 1,
                    "num_stages": 1, "maxnreg": cap})
    return out


def half2_candidates() -> list[dict]:
    return [{"BLOCK_N": bn, "num_warps": w, "BLOCK_W": 128 * w, "num_stages": 1}
            for bn, w in itertools.product((4, 8, 16, 32), (1, 2, 4, 8))]


def graph_time(fn, reps: int = 20) -> float:  # noqa: ANN001
    """Seconds per call of fn() (which launches its calls) replayed from a CUDA graph."""
    fn()
    torch.cuda.synchronize()
    g = torch.cuda.CUDAGraph()
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s), torch.cuda.graph(g, stream=s):
        fn()
    torch.cuda.current_stream().wait_stream(s)
    g.replay()
    torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(reps):
        g.replay()
    torch.cuda.synchronize()
    return (time.perf_counter() - t) / reps


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--batch", type=int, nargs="+", default=[1])
    ap.add_argument("--shapes", nargs="+", default=list(SHAPES))
    ap.add_argument("--out", default=None)
    ap.add_argument("--half2", action="store_true", help="also the half2 GEMV (one row)")
    ap.add_argument("--half2-only", action="store_true", help="the half2 GEMV, not the shipped")
    args = ap.parse_args()
    args.half2 = args.half2 or args.half2_only
    from modelport.quantization import triton_gemm as tg
    from modelport.quantization import triton_kernels as tk
    from modelport.quantization.kernels import GroupQuant

    sink = open(args.out, "a") if args.out else None

    def emit(row: dict) -> None:
        line = json.dumps(row)
        print(line, flush=True)
        if sink:
            sink.write(line + "\n")
            sink.flush()

    tg.GEMV_HALF2 = False  # "w4-autotuned" rows: the fp32 GEMV; half2_rows switches it on
    gen = torch.Generator().manual_seed(0)
    for name in args.shapes:
        n, k = SHAPES[name]
        codes = torch.randint(0, 16, (n, k), generator=gen, dtype=torch.int32)
        s = torch.rand(n, k // 128, generator=gen) * 0.01 + 1e-3
        gq = GroupQuant(codes.to(torch.uint8), s, -s * 8, 128, 4)
        kern = tg.TritonKernel(gq, torch.device("cuda"))
        w_ref = gq.dequantize().cuda()
        nbytes = kern.qweight.nbytes + kern.sz.nbytes
        copies = max(2, COPY_BYTES // nbytes)
        qws = [kern.qweight] + [kern.qweight.clone() for _ in range(copies - 1)]
        szs = [kern.sz] + [kern.sz.clone() for _ in range(copies - 1)]
        wb = [w_ref.to(torch.bfloat16)]
        wb += [wb[0].clone() for _ in range(max(2, COPY_BYTES // wb[0].nbytes) - 1)]
        ws, cnt = tg.gemv_workspace(torch.device("cuda"), n)
        for m in args.batch:
            x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
            ref = x.float() @ w_ref.t()
            ys = [torch.empty((m, n), device="cuda", dtype=torch.bfloat16) for _ in range(copies)]
            yb = torch.empty((m, n), device="cuda", dtype=torch.bfloat16)

            def cublas() -> None:
                for w in wb:
                    torch.mm(x, w.t(), out=yb)

            t_bf16 = graph_time(cublas) / len(wb)
            emit({"shape": name, "n": n, "k": k, "m": m, "kernel": "cublas-bf16",
                  "us": round(t_bf16 * 1e6, 2), "GBps": round(wb[0].nbytes / t_bf16 / 1e9)})

            def tuned() -> None:
                for q, z in zip(qws, szs):
                    kern.qweight, kern.sz = q, z
                    kern.gemv(x)

            kern.gemv(x)  # autotune outside the graph
            t = graph_time(tuned) / copies
            emit({"shape": name, "n": n, "k": k, "m": m, "kernel": "w4-autotuned",
                  "us": round(t * 1e6, 2), "GBps": round(nbytes / t / 1e9)})
            kern.qweight, kern.sz = qws[0], szs[0]
            mags = (tg.MAG_2048, tg.MAG_128)
            results = []
            if args.half2 and m == 1:
                results += half2_rows(kern, x, ref, qws, szs, ys, nbytes, name, emit)
            for c in ([] if args.half2_only else candidates()):
                if not tk.gemv_fits(c["BLOCK_N"], c["BLOCK_W"], c["num_warps"], c["SPLIT"], m,
                                    k, 4):
                    continue
                meta = dict(c)
                grid = (tg.triton_cdiv(n, c["BLOCK_N"]), c["SPLIT"])

                def launch(q, z, y, meta=meta, grid=grid) -> None:  # noqa: ANN001
                    tk.gemv_kernel[grid](x, q, z, y, ws, cnt, n, x.stride(0), y.stride(0),
                                         *mags, K=k, GROUP=128, BITS=4, V=kern.v, BLOCK_M=m,
                                         EVEN_N=n % c["BLOCK_N"] == 0, **meta)

                try:
                    launch(qws[0], szs[0], ys[0])
                    torch.cuda.synchronize()
                    err = ((ys[0].float() - ref).abs().max() / ref.abs().max()).item()
                    t = graph_time(lambda: [launch(q, z, y) for q, z, y in zip(qws, szs, ys)])
                    t /= copies
                    # replays must leave the split counters at zero and the result unchanged
                    err2 = ((ys[0].float() - ref).abs().max() / ref.abs().max()).item()
                    ok = err < 2e-2 and err2 < 2e-2 and int(cnt.abs().sum()) == 0
                except Exception as e:  # noqa: BLE001 - a config that fails to compile
                    emit({"shape": name, "m": m, "config": c, "error": repr(e)[:200]})
                    continue
                row = {"shape": name, "n": n, "k": k, "m": m, "kernel": "w4", "config": c,
                       "us": round(t * 1e6, 2), "GBps": round(nbytes / t / 1e9),
                       "ok": ok, "err": round(err2, 5)}
                results.append(row)
                emit(row)
            best = sorted((r for r in results if r["ok"]), key=lambda r: r["us"])[:5]
            emit({"shape": name, "m": m, "best": [(r["config"], r["us"], r["GBps"]) for r in best],
                  "cublas_us": round(t_bf16 * 1e6, 2)})


def half2_rows(kern, x, ref, qws, szs, ys, nbytes, name, emit) -> list[dict]:  # noqa: ANN001
    """The half2 GEMV on one row: autotuned through TritonKernel.gemv, then every candidate."""
    from modelport.quantization import triton_gemm as tg
    from modelport.quantization import triton_w4_half2 as th

    n, k = kern.n, kern.k
    copies = len(qws)
    tg.GEMV_HALF2 = True
    try:
        def tuned() -> None:
            for q, z in zip(qws, szs):
                kern.qweight, kern.sz = q, z
                kern.gemv(x)

        kern.gemv(x)  # autotune outside the graph
        t = graph_time(tuned) / copies
        err = ((kern.gemv(x).float() - ref).abs().max() / ref.abs().max()).item()
        emit({"shape": name, "n": n, "k": k, "m": 1, "kernel": "w4-half2-autotuned",
              "us": round(t * 1e6, 2), "GBps": round(nbytes / t / 1e9), "err": round(err, 5)})
    finally:
        tg.GEMV_HALF2 = False
        kern.qweight, kern.sz = qws[0], szs[0]
    rows = []
    for c in half2_candidates():
        meta = dict(c)
        grid = (tg.triton_cdiv(n, c["BLOCK_N"]),)

        def launch(q, z, y, meta=meta, grid=grid) -> None:  # noqa: ANN001
            th.gemv_half2_kernel[grid](x, q, z, y, n, K=k, GROUP=128,
                                       EVEN_N=n % meta["BLOCK_N"] == 0, ASM=True, **meta)

        try:
            launch(qws[0], szs[0], ys[0])
            torch.cuda.synchronize()
            err = ((ys[0].float() - ref).abs().max() / ref.abs().max()).item()
            t = graph_time(lambda: [launch(q, z, y) for q, z, y in zip(qws, szs, ys)]) / copies
            err2 = ((ys[0].float() - ref).abs().max() / ref.abs().max()).item()
        except Exception as e:  # noqa: BLE001 - a config that fails to compile
            emit({"shape": name, "m": 1, "kernel": "w4-half2", "config": c, "error": repr(e)[:200]})
            continue
        row = {"shape": name, "n": n, "k": k, "m": 1, "kernel": "w4-half2", "config": c,
               "us": round(t * 1e6, 2), "GBps": round(nbytes / t / 1e9),
               "ok": err < 2e-2 and err2 < 2e-2, "err": round(err2, 5)}
        rows.append(row)
        emit(row)
    return rows


if __name__ == "__main__":
    main()
