"""Time the Triton kernels against their byte/FLOP floors on the GPU (one JSON line each).

Decode attention: KV bytes read / time vs the copy bandwidth; prefill: FLOPs / time; fused ops
vs the eager torch modules they replace. Run on the device: PYTHONPATH=src python3 bench/gpu/kernel_bench.py
"""

from __future__ import annotations

import functools
import json
import random

import torch
from triton.testing import do_bench

from modelport.layers import fused_ops as fo
from modelport.layers import triton_attention as ta
from modelport.layers.activation import SiluAndMul
from modelport.layers.attention import AttentionMetadata
from modelport.layers.layernorm import RMSNorm

DEV, DT = "cuda", torch.bfloat16
H, KVH, D, PAGE = 32, 8, 128, 16


def meta_for(cases, seed=0):
    rng = random.Random(seed)
    nb = sum(-(-(c + n) // PAGE) for c, n in cases) + 8
    free = list(range(nb))
    rng.shuffle(free)
    qsl, seq, tables = [0], [], []
    for c, n in cases:
        tables.append([free.pop() for _ in range(-(-(c + n) // PAGE))])
        qsl.append(qsl[-1] + n)
        seq.append(c + n)
    bt = torch.zeros(len(cases), max(map(len, tables)), dtype=torch.int32)
    for i, t in enumerate(tables):
        bt[i, : len(t)] = torch.tensor(t)
    m = AttentionMetadata(
        torch.zeros(qsl[-1], dtype=torch.int64, device=DEV),
        torch.tensor(qsl, dtype=torch.int32, device=DEV),
        torch.tensor(seq, dtype=torch.int32, device=DEV),
        bt.to(DEV),
        max(n for _, n in cases),
        max(seq),
        qsl,
        seq,
        PAGE,
    )
    return m, nb


def bench(fn, *args) -> float:
    """Median milliseconds of fn(*args) (triton's do_bench: events, warm-up, many repeats)."""
    return do_bench(functools.partial(fn, *args), warmup=25, rep=200, return_mode="median")


def emit(**kw):
    print(json.dumps(kw), flush=True)


def main():
    for b, ctx in [(1, 1152), (1, 4096), (64, 1152), (256, 1152), (256, 600)]:
        meta, nb = meta_for([(ctx - 1, 1)] * b)
        cache = torch.randn(2, nb, PAGE, KVH, D, device=DEV, dtype=DT)
        q = torch.randn(b, H, D, device=DEV, dtype=DT)
        ms = bench(ta.triton_paged_attention, q, cache, meta, D**-0.5)
        gb = b * ctx * KVH * D * 2 * 2 / 1e9
        emit(
            kernel="decode_attention",
            batch=b,
            ctx=ctx,
            splits=meta.backend_state["triton"].splits,
            us=round(ms * 1e3, 1),
            kv_GBps=round(gb / ms * 1e3, 1),
        )
    for n, prefix in [(1024, 0), (2048, 0), (512, 1536)]:
        meta, nb = meta_for([(prefix, n)])
        cache = torch.randn(2, nb, PAGE, KVH, D, device=DEV, dtype=DT)
        q = torch.randn(n, H, D, device=DEV, dtype=DT)
        ms = bench(ta.triton_paged_attention, q, cache, meta, D**-0.5)
        flops = 4 * H * D * sum(prefix + i + 1 for i in range(n))  # causal QK^T + PV
        emit(
            kernel="prefill_attention",
            q_len=n,
            prefix=prefix,
            us=round(ms * 1e3, 1),
            TFLOPs=round(flops / ms / 1e9, 1),
        )
    for t in (1, 256, 2048):
        x = torch.randn(t, 4096, device=DEV, dtype=DT)
        r = torch.randn_like(x)
        norm = RMSNorm(4096, 1e-5).to(DEV, DT)
        norm.weight.data.fill_(1.0)
        eager = bench(norm, x, r)
        fused = bench(fo.rms_norm, x, norm.weight, 1e-5, r)
        g = torch.randn(t, 2 * 14336, device=DEV, dtype=DT)
        act = SiluAndMul()
        e2 = bench(act, g)
        f2 = bench(fo.silu_and_mul, g)
        emit(
            kernel="fused_ops",
            tokens=t,
            rmsnorm_residual_us={"eager": round(eager * 1e3, 1), "fused": round(fused * 1e3, 1)},
            silu_and_mul_us={"eager": round(e2 * 1e3, 1), "fused": round(f2 * 1e3, 1)},
        )


def gemv_shapes():
    """Triton GEMV vs cuBLAS (F.linear) on the 8B decode shapes, weight GB/s."""
    import torch.nn.functional as F

    from modelport.layers.triton_gemv import gemv

    shapes = {
        "qkv": (6144, 4096),
        "o": (4096, 4096),
        "gate_up": (28672, 4096),
        "down": (4096, 14336),
        "lm_head": (128256, 4096),
    }
    for name, (n, k) in shapes.items():
        w = torch.randn(n, k, device=DEV, dtype=DT) * 0.02
        for m in (1, 4):
            x = torch.randn(m, k, device=DEV, dtype=DT)
            gb = n * k * 2 / 1e9
            row = {
                "kernel": "gemv",
                "shape": name,
                "m": m,
                "cublas_GBps": round(gb / bench(F.linear, x, w) * 1e3),
            }
            ref = F.linear(x, w).float()
            for bn, bk in ((4, 512), (8, 512), (16, 256), (8, 1024)):
                y = gemv(x, w, None, bn, bk)
                err = ((y.float() - ref).norm() / ref.norm()).item()
                row[f"triton_{bn}x{bk}_GBps"] = round(gb / bench(gemv, x, w, None, bn, bk) * 1e3)
                row[f"err_{bn}x{bk}"] = float(f"{err:.1e}")
            emit(**row)


if __name__ == "__main__":
    main()
    gemv_shapes()
