"""Host time per launch of each op of an eager 1,024-token prefill step (Llama-3.1-8B shapes).

W3's TTFT is bound by the host whenever the eager prefill step's launches take longer than
the device's ~22 ms (bench/README.md, eighth round): 193 Triton launches and 129 cuBLAS
calls a step. This times the host side of each kind of launch: CALLS back-to-back calls
(few enough that the launch queue never fills, so the host never waits for the device),
synchronized once at the end, host seconds / CALLS. The linear rows run under each
``torch.backends.cuda.preferred_blas_library`` (cuBLAS vs cuBLASLt). One JSON line per op.
Run on the device: PYTHONPATH=src python3 bench/gpu/launch_cost.py
"""

from __future__ import annotations

import json
import os
import sys
import time

import torch
import torch.nn.functional as F

from modelport.layers import fused_ops as fo
from modelport.layers import triton_attention as ta

T, HID, Q, KV, INTER, D = 1024, 4096, 4096, 1024, 14336, 128
CALLS = 100
DT = torch.bfloat16


def host_us(fn) -> float:
    for _ in range(5):
        fn()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(CALLS):
        fn()
    host = time.perf_counter() - t0
    torch.cuda.synchronize()
    return host / CALLS * 1e6


def emit(op: str, us: float, **kw) -> None:
    print(json.dumps({"op": op, "host_us_per_call": round(us, 1), **kw}), flush=True)


def main() -> None:
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from kernel_bench import meta_for

    from modelport.layers.rotary import RopeSettings, RotaryEmbedding

    x = torch.randn(T, HID, device="cuda", dtype=DT)
    weights = {"qkv": (Q + 2 * KV, HID), "o": (HID, Q), "gate_up": (2 * INTER, HID),
               "down": (HID, INTER)}
    original = torch.backends.cuda.preferred_blas_library()
    for lib in ("cublas", "cublaslt"):
        torch.backends.cuda.preferred_blas_library(lib)
        for name, (n, k) in weights.items():
            w = torch.randn(n, k, device="cuda", dtype=DT) * 0.02
            xi = torch.randn(T, k, device="cuda", dtype=DT)
            emit(f"linear_{name}", host_us(lambda xi=xi, w=w: F.linear(xi, w)), blas=lib)
    torch.backends.cuda.preferred_blas_library(original)
    norm_w = torch.ones(HID, device="cuda", dtype=DT)
    res = torch.randn_like(x)
    emit("rms_norm_residual", host_us(lambda: fo.rms_norm(x, norm_w, 1e-5, res)))
    gu = torch.randn(T, 2 * INTER, device="cuda", dtype=DT)
    emit("silu_and_mul", host_us(lambda: fo.silu_and_mul(gu)))
    rot = RotaryEmbedding(D, RopeSettings(500000.0, None, 4096)).to("cuda")
    cs = rot.cos_sin_cache.to(DT)
    pos = torch.arange(T, device="cuda")
    q = torch.randn(T, Q, device="cuda", dtype=DT)
    k = torch.randn(T, KV, device="cuda", dtype=DT)
    v = torch.randn(T, KV, device="cuda", dtype=DT)
    emit("rotary", host_us(lambda: fo.apply_rotary_(pos, q, k, cs, D)))
    meta, nb = meta_for([(0, T)])
    cache = torch.randn(2, nb, 16, KV // D, D, device="cuda", dtype=DT)
    slots = torch.arange(T, device="cuda")
    emit("kv_write", host_us(lambda: ta.write_kv_triton(cache, k.view(T, -1, D),
                                                        v.view(T, -1, D), slots)))
    q3 = q.view(T, -1, D)
    emit("prefill_attention_plan_cached",
         host_us(lambda: ta.triton_paged_attention(q3, cache, meta, D**-0.5)))

    def fresh_plan():
        meta.backend_state.clear()  # every layer after the first reuses the step's plan
        return ta.triton_paged_attention(q3, cache, meta, D**-0.5)

    emit("prefill_attention_plan_built", host_us(fresh_plan))
    emit("torch_empty_like", host_us(lambda: torch.empty_like(x)))


if __name__ == "__main__":
    main()
