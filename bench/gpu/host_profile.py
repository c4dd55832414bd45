"""Where the host's time goes in engine steps: cProfile over a window of W1 steps.

The torch profiler (``--profile-steps`` of the throughput bench) says how busy the GPU is;
this says what the Python side does meanwhile. Same arguments as ``modelport.bench.throughput``
plus the window: from step ``--start`` (admission: prefill chunks riding with decodes) for
``--steps`` steps, then again once every request is admitted (decode). For each window:
wall ms per step without the profiler, then the profiled functions by own time. Time spent
waiting for the GPU shows up in the wait (``Event.synchronize`` / ``tolist``); the rest is
host work. ``--w3-prefill 1024`` profiles W3's eager prefill launch instead. Run on the device:

    PYTHONPATH=src python3 bench/gpu/host_profile.py --model-config bench/configs/llama-3.1-8b.json \
        --load-format dummy --dtype bfloat16 --max-model-len 2048 --quantization fp8 \
        --kv-cache-dtype fp8 --max-num-seqs 256 --max-num-batched-tokens 2048
"""

from __future__ import annotations

import argparse
import cProfile
import io
import json
import pstats
import time

from modelport.bench import _harness as h
from modelport.bench import throughput as tp


def _window(core, steps: int, device: str) -> dict:
    h.sync(device)
    t0 = time.perf_counter()
    for _ in range(steps):
        core.step()
    h.sync(device)
    plain = (time.perf_counter() - t0) / steps
    prof = cProfile.Profile()
    h.sync(device)
    t0 = time.perf_counter()
    prof.enable()
    for _ in range(steps):
        core.step()
    h.sync(device)
    prof.disable()
    profiled = (time.perf_counter() - t0) / steps
    s = io.StringIO()
    pstats.Stats(prof, stream=s).sort_stats("tottime").print_stats(30)
    c = io.StringIO()
    pstats.Stats(prof, stream=c).sort_stats("cumulative").print_stats(30)
    return {"wall_ms_per_step": round(plain * 1e3, 2),
            "profiled_ms_per_step": round(profiled * 1e3, 2),
            "by_tottime": s.getvalue(), "by_cumulative": c.getvalue()}


def _prefill_launches(core, vocab: int, input_len: int, iters: int, device: str) -> dict:
    """W3's eager step: one fresh input_len-token prompt at a time, the first step() (the
    prefill's scheduling and launches) timed plainly, then profiled."""
    def first_step(seed: int, prof: cProfile.Profile | None = None) -> float:
        (pr,) = h.random_prompts(1, (input_len, input_len), vocab, seed)
        core.add_request(h.greedy_request(f"p{seed}", pr, 2))
        h.sync(device)
        t0 = time.perf_counter()
        if prof is not None:
            prof.enable()
        core.step()
        if prof is not None:
            prof.disable()
        dt = time.perf_counter() - t0
        while core.has_unfinished_requests():
            core.step()
        return dt

    for i in range(3):  # compile / autotune first
        first_step(10_000 + i)
    plain = [first_step(20_000 + i) for i in range(iters)]
    prof = cProfile.Profile()
    profiled = [first_step(30_000 + i, prof) for i in range(iters)]
    s = io.StringIO()
    pstats.Stats(prof, stream=s).sort_stats("tottime").print_stats(30)
    c = io.StringIO()
    pstats.Stats(prof, stream=c).sort_stats("cumulative").print_stats(40)
    return {"first_step_ms": [round(x * 1e3, 2) for x in plain],
            "profiled_first_step_ms": [round(x * 1e3, 2) for x in profiled],
            "by_tottime": s.getvalue(), "by_cumulative": c.getvalue()}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    tp.add_args(p)
    p.add_argument("--start", type=int, default=10)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--w3-prefill", type=int, default=0, metavar="TOKENS",
                   help="instead: profile the first step() of single TOKENS-token prompts "
                        "(W3's eager prefill launch)")
    args = p.parse_args()
    device = h.resolved_device(args)
    path = h.model_path(args)
    if args.w3_prefill:
        core = h.build_engine(args, path)
        r = _prefill_launches(core, tp._vocab(path), args.w3_prefill, args.steps, device)
        print(r["by_tottime"])
        print(r["by_cumulative"])
        print(json.dumps({k: v for k, v in r.items() if k.endswith("_ms")}))
        return 0
    prompts, outs = h.w1_workload(args.num_prompts, tuple(args.input_len_range),
                                  tuple(args.output_len_range), tp._vocab(path), args.seed)
    core = h.build_engine(args, path)
    for i, pr in enumerate(prompts[:32]):  # compile / autotune first
        core.add_request(h.greedy_request(f"w{i}", [(t + 7) % 1000 for t in pr], 16))
    while core.has_unfinished_requests():
        core.step()
    for i, (pr, o) in enumerate(zip(prompts, outs)):
        core.add_request(h.greedy_request(str(i), pr, o))
    for _ in range(args.start):
        core.step()
    res = {"admission": _window(core, args.steps, device)}
    while core.has_unfinished_requests():
        out = core.step()
        if out.stats is not None and out.stats.num_waiting == 0:
            break
    for _ in range(20):
        core.step()
    res["decode"] = _window(core, args.steps, device)
    for name, r in res.items():
        print(f"=== {name}: {r['wall_ms_per_step']} ms/step plain, "
              f"{r['profiled_ms_per_step']} profiled")
        print(r["by_tottime"])
        print(r["by_cumulative"])
    print(json.dumps({k: {kk: v for kk, v in r.items() if kk.endswith("step")}
                      for k, r in res.items()}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
