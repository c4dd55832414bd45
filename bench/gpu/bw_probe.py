"""Where the batch-1 GEMV time goes, on the Llama-3.1-8B shapes (32 layers of distinct
weights per shape in one CUDA graph, so no L2 reuse; figures per layer):

* ``read``: the HBM read ceiling. A streaming kernel sums the int32 words of each weight
  (the same bytes as a bf16 weight of that shape) in 16-byte loads; one-shot programs of
  several sizes and persistent programs (a grid of SMs x k, each walking contiguous chunks
  with the next chunk's load issued before the current one is summed).
* ``w4``: the engine's W4 GEMV (AWQ-like group 128 with zeros, one row) against (a) its own
  tile loads with no dequantization (``load-only``: the memory side of its access pattern)
  and (b) a persistent variant: each program owns TILES consecutive column tiles of one
  K step and loads the next tile's words and scales before computing the current one, so
  one program's loads overlap its own arithmetic.

* ``argmax``: greedy sampling's argmax over the vocabulary, torch.argmax vs chunked.

Run on the device: PYTHONPATH=src python3 bench/gpu/bw_probe.py [read] [w4] [argmax]
"""

from __future__ import annotations

import json
import os
import sys

import torch
import triton
import triton.language as tl

from modelport.quantization.triton_gemm import (
    MAG_128,
    MAG_2048,
    gemv_workspace,
    pack_scales,
    pack_weight,
    triton_cdiv,
)
from modelport.quantization.triton_kernels import gemv, row_part
from modelport.runner.sampler import chunked_argmax

LAYERS, GROUP = 32, 128
SHAPES = {"qkv": (6144, 4096), "o": (4096, 4096), "gate_up": (28672, 4096),
          "down": (4096, 14336)}
SMS = 132


def graph_ms(fn) -> float:
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from fusion_bench import time_graph

    return time_graph(lambda _x, _state: fn(), None, None, reps=10)[0]


@triton.jit
def _read_once(ptr, out_ptr, n, BLOCK: tl.constexpr):
    """Program p sums words [p * BLOCK, (p + 1) * BLOCK)."""
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    w = tl.load(ptr + offs, mask=offs < n, other=0)
    tl.store(out_ptr + tl.program_id(0), tl.sum(w, 0))


@triton.jit
def _read_persistent(ptr, out_ptr, n, CHUNKS: tl.constexpr, BLOCK: tl.constexpr):
    """Program p sums CHUNKS consecutive BLOCK-word chunks, next chunk loaded first."""
    base = tl.program_id(0) * CHUNKS * BLOCK + tl.arange(0, BLOCK)
    nxt = tl.load(ptr + base, mask=base < n, other=0)
    acc = tl.zeros([BLOCK], dtype=tl.int32)
    for c in range(CHUNKS):
        cur = nxt
        offs = base + tl.minimum(c + 1, CHUNKS - 1) * BLOCK
        nxt = tl.load(ptr + offs, mask=offs < n, other=0)
        acc ^= cur
    tl.store(out_ptr + tl.program_id(0), tl.sum(acc, 0))


def read_shape(name: str, n: int, k: int) -> None:
    words = n * k // 2  # a bf16 weight's bytes / 4
    bufs = [torch.empty(words, dtype=torch.int32, device="cuda").random_(0, 1 << 30)
            for _ in range(LAYERS)]
    out = torch.empty(1 << 20, dtype=torch.int32, device="cuda")
    gb = LAYERS * words * 4 / 1e9

    def once(block: int, warps: int):
        grid = (triton_cdiv(words, block),)
        return lambda b: _read_once[grid](b, out, words, BLOCK=block, num_warps=warps)

    def persistent(per_sm: int, block: int, warps: int):
        progs = per_sm * SMS
        chunks = triton_cdiv(words, progs * block)
        return lambda b: _read_persistent[(progs,)](b, out, words, CHUNKS=chunks, BLOCK=block,
                                                    num_warps=warps)

    variants = [(f"once_b{b}_w{w}", once(b, w))
                for b, w in ((2048, 4), (4096, 4), (8192, 8), (16384, 8), (32768, 8))]
    variants += [(f"persist_{p}xSM_b{b}_w{w}", persistent(p, b, w))
                 for p, b, w in ((2, 4096, 4), (4, 4096, 4), (8, 2048, 4), (4, 8192, 8),
                                 (2, 8192, 8), (8, 4096, 4))]
    variants.append(("torch_sum", lambda b: b.sum()))
    for vname, fn in variants:
        ms = graph_ms(lambda f=fn: [f(b) for b in bufs])
        print(json.dumps({"probe": "read", "shape": name, "bytes_per_layer": words * 4,
                          "variant": vname, "us_per_layer": round(ms * 1000 / LAYERS, 2),
                          "TBps": round(gb / ms, 3)}), flush=True)


@triton.jit
def _w4_load_only(w_ptr, sz_ptr, y_ptr, N, K: tl.constexpr, GROUP: tl.constexpr,
                  V: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_W: tl.constexpr):
    """The engine W4 GEMV's tile loads (words and scale pairs), summed instead of used."""
    PER: tl.constexpr = 8
    CH: tl.constexpr = V * PER
    NV: tl.constexpr = BLOCK_W // V
    KW: tl.constexpr = K // PER
    NG: tl.constexpr = K // GROUP
    rn = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    rw = tl.arange(0, BLOCK_W)
    rc = tl.arange(0, NV)
    acc = tl.zeros([BLOCK_W, BLOCK_N], dtype=tl.int32)
    accs = tl.zeros([NV, BLOCK_N], dtype=tl.int32)
    for wk in range(0, KW, BLOCK_W):
        acc ^= tl.load(w_ptr + rw[:, None] + rn[None, :] * KW + wk)
        accs ^= tl.load(sz_ptr + rn[None, :] * NG + ((wk * PER + rc * CH) // GROUP)[:, None])
    tl.store(y_ptr + rn, (tl.sum(acc, 0) + tl.sum(accs, 0)).to(tl.float32).to(tl.bfloat16))


@triton.jit
def _w4_persistent(x_ptr, w_ptr, sz_ptr, y_ptr, N, mag_a, mag_b, K: tl.constexpr,
                   GROUP: tl.constexpr, V: tl.constexpr, BLOCK_N: tl.constexpr,
                   BLOCK_W: tl.constexpr, TILES: tl.constexpr):
    """One row, K in one step (BLOCK_W = K / 8 words), TILES column tiles a program, the
    next tile's words and scales loaded before the current tile's arithmetic."""
    PER: tl.constexpr = 8
    CH: tl.constexpr = V * PER
    NV: tl.constexpr = BLOCK_W // V
    KW: tl.constexpr = K // PER
    NG: tl.constexpr = K // GROUP
    t0 = tl.program_id(0) * TILES
    rw = tl.arange(0, BLOCK_W)
    rc = tl.arange(0, NV)
    xoff = ((rw // V) * CH + rw % V)[:, None]
    ar = tl.arange(0, BLOCK_N)
    wmask = (rw < KW)[:, None]
    w_cols = w_ptr + rw[:, None] + (t0 * BLOCK_N + ar)[None, :] * KW
    sz_cols = sz_ptr + (t0 * BLOCK_N + ar)[None, :] * NG + ((rc * CH) // GROUP)[:, None]
    words_n = tl.load(w_cols)
    sz_n = tl.load(sz_cols)
    for t in range(TILES):
        words = words_n.to(tl.uint32, bitcast=True)
        sz = sz_n
        rn = (t0 + t) * BLOCK_N + ar
        more = t + 1 < TILES  # the next tile's loads go out before this tile's arithmetic
        words_n = tl.load(w_cols + (t + 1) * BLOCK_N * KW, mask=more, other=0)
        sz_n = tl.load(sz_cols + (t + 1) * BLOCK_N * NG, mask=more, other=0)
        s = sz.to(tl.int16).to(tl.float16, bitcast=True).to(tl.float32)
        z = (sz >> 16).to(tl.int16).to(tl.float16, bitcast=True).to(tl.float32)
        acc = row_part(x_ptr, 0, xoff, wmask, True, words, s, z, mag_a, mag_b, 4, PER, V, NV,
                       BLOCK_N)
        tl.store(y_ptr + rn, tl.sum(acc, 0).to(y_ptr.dtype.element_ty))


def w4_shape(name: str, n: int, k: int, x: torch.Tensor) -> None:
    xk = x[:, :k].contiguous()
    codes = torch.randint(0, 16, (n, k), dtype=torch.uint8, device="cuda")
    s = torch.rand(n, k // GROUP, device="cuda") * 0.01 + 0.001
    z = -torch.randint(0, 16, (n, k // GROUP), device="cuda").float() * s
    sz = pack_scales(s, z)
    ws = [pack_weight(codes, 4, 4)]
    for _ in range(1, LAYERS):  # distinct bytes per layer (random words)
        ws.append(torch.empty_like(ws[0]).random_(-(2**31), 2**31 - 1))
    wsp, cnt = gemv_workspace(x.device, n)
    y = torch.empty((1, n), device="cuda", dtype=torch.bfloat16)
    gb = LAYERS * (n * k / 2 + sz.numel() * 4) / 1e9

    def report(variant, run, err=None) -> None:
        ms = graph_ms(lambda: [run(w) for w in ws])
        print(json.dumps({"probe": "w4", "shape": name, "variant": variant,
                          "us_per_layer": round(ms * 1000 / LAYERS, 2),
                          "TBps": round(gb / ms, 3), "rel_err": err}), flush=True)

    def engine(w: torch.Tensor) -> None:
        gemv[lambda m: (triton_cdiv(n, m["BLOCK_N"]), m["SPLIT"])](
            xk, w, sz, y, wsp, cnt, n, xk.stride(0), y.stride(0), MAG_2048, MAG_128, K=k,
            GROUP=GROUP, BITS=4, V=4, BLOCK_M=1)

    def load_only(bn: int, warps: int):
        return lambda w: _w4_load_only[(n // bn,)](w, sz, y, n, K=k, GROUP=GROUP, V=4,
                                                   BLOCK_N=bn, BLOCK_W=128 * warps,
                                                   num_warps=warps)

    def persistent(bn: int, tiles: int):
        return lambda w: _w4_persistent[(n // (bn * tiles),)](
            xk, w, sz, y, n, MAG_2048, MAG_128, K=k, GROUP=GROUP, V=4, BLOCK_N=bn,
            BLOCK_W=k // 8, TILES=tiles, num_warps=k // 8 // 128)

    engine(ws[0])
    ref = y.float().clone()
    report("engine", engine)
    for bn, warps in ((16, 4), (8, 4), (16, 8)):
        if (k // 8) % (128 * warps) == 0:
            report(f"load_only_n{bn}_w{warps}", load_only(bn, warps))
    if k // 8 not in (512, 1024):  # the persistent variant: K in one step of 4 or 8 warps
        return
    for bn, tiles in ((16, 2), (16, 4), (16, 8), (8, 2), (8, 4), (8, 8)):
        if n % (bn * tiles):
            continue
        run = persistent(bn, tiles)
        try:
            run(ws[0])
            err = ((y.float() - ref).norm() / ref.norm()).item()
            report(f"persistent_n{bn}_t{tiles}", run, err)
        except Exception as e:  # noqa: BLE001 - report and go on with the next variant
            print(json.dumps({"probe": "w4", "shape": name, "variant": [bn, tiles],
                              "error": repr(e)[:300]}), flush=True)


def probe_argmax() -> None:
    """Greedy sampling's argmax over a Llama-3 vocab (float32 logits): torch.argmax against
    a max per 256-token chunk followed by an argmax of the chunk maxima (same index)."""
    for rows in (1, 8, 256):
        x = torch.randn(rows, 128256, device="cuda")
        assert torch.equal(chunked_argmax(x, 256), x.argmax(-1))
        for vname, chunk in (("torch_argmax", 0), ("chunked_256", 256), ("chunked_1002", 1002)):
            ms = graph_ms(lambda t=x, c=chunk: chunked_argmax(t, c) if c else t.argmax(-1))
            print(json.dumps({"probe": "argmax", "rows": rows, "variant": vname,
                              "us": round(ms * 1000, 2)}), flush=True)


def main() -> None:
    todo = sys.argv[1:] or ["read", "w4", "argmax"]
    if "argmax" in todo:
        probe_argmax()
    if "read" in todo:
        for name, (n, k) in SHAPES.items():
            read_shape(name, n, k)
    if "w4" in todo:
        torch.manual_seed(0)
        x = torch.randn(1, 14336, device="cuda", dtype=torch.bfloat16)
        for name, (n, k) in SHAPES.items():
            w4_shape(name, n, k, x)


if __name__ == "__main__":
    main()
