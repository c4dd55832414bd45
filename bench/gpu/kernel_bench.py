"""Time the Triton kernels against their byte/FLOP floors on the GPU (one JSON line each).

Decode attention: KV bytes read / time vs the copy bandwidth; prefill: FLOPs / time; fused ops
vs the eager torch modules they replace. Run on the device:
    PYTHONPATH=src python3 bench/gpu/kernel_bench.py [main] [gemv] [decode-sweep] [decode-ragged]
(default: main gemv). decode-sweep times the decode kernel for every candidate launch config
of triton_attention.DECODE_CANDIDATES, on a bf16 and an fp8 (e4m3) cache, at batch 64/128/256
x context 1152, and ends with the fastest config per cache kind and batch and the
DECODE_CONFIGS entry to put in triton_attention.py.
"""

from __future__ import annotations

import functools
import json
import os
import random
import re
import sys

import torch
from triton.testing import do_bench, do_bench_cudagraph

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
    for kv_dt in (DT, FP8):
        for b, ctx in [(1, 1152), (1, 4096), (64, 1152), (256, 1152), (256, 600)]:
            meta, nb = meta_for([(ctx - 1, 1)] * b)
            cache = torch.randn(2, nb, PAGE, KVH, D, device=DEV, dtype=DT).to(kv_dt)
            q = torch.randn(b, H, D, device=DEV, dtype=DT)
            ms = bench(ta.triton_paged_attention, q, cache, meta, D**-0.5)
            gb = b * ctx * KVH * D * 2 * cache.element_size() / 1e9
            plan = meta.backend_state["triton"]
            emit(
                kernel="decode_attention",
                kv=str(kv_dt).removeprefix("torch."),
                config=plan.decode_cfg.name,
                batch=b,
                ctx=ctx,
                splits=plan.splits,
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


FP8 = torch.float8_e4m3fn
# DECODE_SWEEP_KINDS=fp8 sweeps one cache kind only (default: both)
SWEEP_KINDS = os.environ.get("DECODE_SWEEP_KINDS", "16bit,fp8").split(",")
SWEEP_MATCH = os.environ.get("DECODE_SWEEP_MATCH", "")  # a regex on the config names


def decode_sweep(batches=(64, 128, 256), ctx=1152):
    """Every candidate decode config per cache kind: one JSON line per (kind, config, batch).

    us: median of do_bench (L2 flushed before each call, like the rows of main()); us_graph:
    the same call replayed from a CUDA graph (how decode steps run), back to back. kv_TBps:
    KV bytes of the live context (K and V, at the cache's element size) / us. rel_err: vs
    the default 16-bit kernel on the same values upcast to bf16 (fp16 dots and rounding:
    expect ~1e-3; over 1e-2 means a broken variant, and it is never picked as best).
    """
    scale = D**-0.5
    times: dict[tuple[str, int], dict[str, float]] = {}
    saved = dict(ta.DECODE_CONFIGS)
    try:
        for b in batches:
            meta, nb = meta_for([(ctx - 1, 1)] * b, seed=b)
            base = torch.randn(2, nb, PAGE, KVH, D, device=DEV, dtype=DT)
            q = torch.randn(b, H, D, device=DEV, dtype=DT)
            for kind, kv_dt in (("16bit", DT), ("fp8", FP8)):
                if kind not in SWEEP_KINDS:
                    continue
                cache = base.to(kv_dt)
                ta.DECODE_CONFIGS["16bit"] = saved["16bit"]
                ref = ta.triton_paged_attention(q, cache.to(DT), fresh(meta), scale).float()
                gb = b * ctx * KVH * D * 2 * cache.element_size() / 1e9
                for cfg in ta.DECODE_CANDIDATES[kind]:
                    if not re.search(SWEEP_MATCH, cfg.name):
                        continue
                    ta.DECODE_CONFIGS[kind] = ((1, cfg),)
                    m = fresh(meta)
                    row = {"kernel": "decode_config", "kv": kind, "config": cfg.name, "batch": b}
                    try:
                        out = ta.triton_paged_attention(q, cache, m, scale)
                        torch.cuda.synchronize()
                        err = ((out.float() - ref).norm() / ref.norm()).item()
                        fn = functools.partial(ta.triton_paged_attention, q, cache, m, scale)
                        ms = do_bench(fn, warmup=25, rep=100, return_mode="median")
                        ms_g = do_bench_cudagraph(fn, rep=20, return_mode="median")
                    except Exception as e:  # a config that does not compile or launch
                        emit(**row, error=f"{type(e).__name__}: {e}"[:300])
                        continue
                    emit(
                        **row,
                        ctx=ctx,
                        splits=m.backend_state["triton"].splits,
                        us=round(ms * 1e3, 1),
                        us_graph=round(ms_g * 1e3, 1),
                        kv_TBps=round(gb / ms, 2),
                        rel_err=float(f"{err:.1e}"),
                    )
                    if err < 1e-2:
                        times.setdefault((kind, b), {})[cfg.name] = ms
    finally:
        ta.DECODE_CONFIGS.clear()
        ta.DECODE_CONFIGS.update(saved)
    best_cfg: dict[str, list[tuple[int, str]]] = {}
    for (kind, b), t in sorted(times.items()):
        name = min(t, key=t.get)
        bf16 = times.get(("16bit", b), {}).get(ta.DecodeConfig().name)
        default = ta.decode_config(b, FP8 if kind == "fp8" else DT).name
        emit(
            kernel="decode_config_best",
            kv=kind,
            batch=b,
            config=name,
            us=round(t[name] * 1e3, 1),
            default_config=default,
            default_us=round(t[default] * 1e3, 1) if default in t else None,
            vs_bf16_default=round(bf16 / t[name], 2) if bf16 else None,
        )
        best_cfg.setdefault(kind, []).append((b, name))
    for kind, rows in best_cfg.items():
        # one config for all batches: the one with the least total time over the batches
        common = [
            n for n in times[(kind, rows[0][0])] if all(n in times[(kind, b)] for b, _ in rows)
        ]
        pick = min(common, key=lambda n: sum(times[(kind, b)][n] for b, _ in rows))
        print(
            f"# {kind}: best over batches {[b for b, _ in rows]}: {pick} "
            f"(per batch: {', '.join(f'{b}: {n}' for b, n in rows)}); "
            f'DECODE_CONFIGS["{kind}"] = ((1, DecodeConfig.parse("{pick}")),)  '
            f"or MODELPORT_DECODE_CONFIG={kind}:{pick}",
            flush=True,
        )


def decode_ragged(b=256, lo=100, hi=1100):
    """W1-like decode batches: b requests with context lengths uniform in [lo, hi] (seeded),
    the shipped config per cache kind against the same tile with more context splits
    (DecodeConfig.programs), timed from a CUDA graph. kv_TBps: live KV bytes / time. Short
    contexts give each (request, KV head) program little work; splits balance it.
    DECODE_RAGGED_BATCHES="64 128 256" runs each batch size; DECODE_RAGGED_SPLITS=0 times the
    shipped split target only (no 4096/8192/16384-program rows); DECODE_RAGGED_ALL=1 times
    every DECODE_CANDIDATES config of each kind instead (warps, stages, fp8 upcasts too).
    DECODE_RAGGED_ROPE=1 also times the 16-bit cache with the rotary and KV write inside
    the kernel (kv "16bit-rope": what the engine runs for a decode-only step on a 16-bit
    cache, rope_fits; it compiles to more registers a thread than the plain kernel)."""
    for bb in [int(x) for x in os.environ.get("DECODE_RAGGED_BATCHES", str(b)).split()]:
        _decode_ragged_batch(bb, lo, hi)


def _decode_ragged_batch(b: int, lo: int, hi: int) -> None:
    rng = random.Random(0)
    lens = [rng.randint(lo, hi) for _ in range(b)]
    meta, nb = meta_for([(n - 1, 1) for n in lens], seed=1)
    base = torch.randn(2, nb, PAGE, KVH, D, device=DEV, dtype=DT)
    q = torch.randn(b, H, D, device=DEV, dtype=DT)
    saved = dict(ta.DECODE_CONFIGS)
    kinds = [("16bit", DT, None), ("fp8", FP8, None)]
    if os.environ.get("DECODE_RAGGED_ROPE") == "1":
        kinds.insert(1, ("16bit", DT, _rope_args(meta, b, lens)))
    try:
        for kind, kv_dt, rope in kinds:
            ta.DECODE_CONFIGS.update(saved)  # the previous pass left its last candidate
            cache = base.to(kv_dt)
            shipped = ta.decode_config(b, kv_dt)
            ref = ta.triton_paged_attention(q, cache, fresh(meta), D**-0.5, rope=rope).float()
            gb = sum(lens) * KVH * D * 2 * cache.element_size() / 1e9
            more = () if os.environ.get("DECODE_RAGGED_SPLITS") == "0" else (4096, 8192, 16384)
            if os.environ.get("DECODE_RAGGED_ALL") == "1":
                cfgs = list(dict.fromkeys((shipped, *ta.DECODE_CANDIDATES[kind])))
            else:
                cfgs = [ta.DecodeConfig(block_n, shipped.num_warps, shipped.num_stages,
                                        shipped.k_cvt, shipped.v_cvt, programs)
                        for programs in (shipped.programs, *more)
                        for block_n in sorted({shipped.block_n, 16, 32, 64, 128})]
            for cfg in cfgs:
                ta.DECODE_CONFIGS[kind] = ((1, cfg),)
                m = fresh(meta)
                try:
                    out = ta.triton_paged_attention(q, cache, m, D**-0.5, rope=rope)
                    err = ((out.float() - ref).norm() / ref.norm()).item()
                    fn = functools.partial(ta.triton_paged_attention, q, cache, m, D**-0.5,
                                           rope=rope)
                    ms = do_bench_cudagraph(fn, rep=20, return_mode="median")
                except Exception as e:  # a config that does not compile or launch
                    emit(kernel="decode_ragged", kv=kind + ("-rope" if rope else ""),
                         config=cfg.name, error=f"{type(e).__name__}: {e}"[:300])
                    continue
                emit(kernel="decode_ragged", kv=kind + ("-rope" if rope else ""), batch=b, ctx=[lo, hi],
                     config=cfg.name, shipped=cfg == shipped,
                     splits=m.backend_state["triton"].splits, us_graph=round(ms * 1e3, 1),
                     kv_TBps=round(gb / ms, 2), rel_err=float(f"{err:.1e}"))
    finally:
        ta.DECODE_CONFIGS.clear()
        ta.DECODE_CONFIGS.update(saved)


def _rope_args(meta: AttentionMetadata, b: int, lens: list[int]) -> tuple:
    """(k_new, v_new, positions, cos_sin) for a decode step's rotary inside the kernel; the
    metadata's slots become each request's newest position (the kernel stores K/V there)."""
    from modelport.layers.rotary import RopeSettings, RotaryEmbedding

    pos = torch.tensor([n - 1 for n in lens], dtype=torch.int64, device=DEV)
    page_of = meta.block_tables.long().gather(1, (pos // PAGE)[:, None])[:, 0]
    meta.slot_mapping.copy_(page_of * PAGE + pos % PAGE)
    cos_sin = RotaryEmbedding(D, RopeSettings(500000.0, None, 4096)).to(DEV, DT).cos_sin_cache
    return (torch.randn(b, KVH, D, device=DEV, dtype=DT), torch.randn(b, KVH, D, device=DEV, dtype=DT),
            pos, cos_sin)


def fresh(meta: AttentionMetadata) -> AttentionMetadata:
    """The same batch without the launch plan the backend cached on it."""
    return AttentionMetadata(**{**meta.__dict__, "backend_state": {}})


if __name__ == "__main__":
    sections = sys.argv[1:] or ["main", "gemv"]
    for sec in sections:
        {"main": main, "gemv": gemv_shapes, "decode-sweep": decode_sweep,
         "decode-ragged": decode_ragged}[sec]()
