"""Microbenchmark of the C decode attention (`mp_decode_attention`, layers/csrc/cpu_decode.c).

Times one call (bias + rotary + K/V write + GQA attention over the paged cache) for the
default model's shape (9 query heads, 3 KV heads, head_dim 64, block size 16) at several
(rows, context) points on 1 and 2 threads. Each timed pass cycles through 30 layers' caches
(blocks scattered at random), so the K/V read comes from beyond L2 as in a real step.
Several builds can be compared in one process, interleaved round by round:

    .venv/bin/python bench/cpu_attention.py                      # the current source
    .venv/bin/python bench/cpu_attention.py --lib old=/tmp/old.so --lib new=current
    .venv/bin/python bench/cpu_attention.py --e2e 3 --lib old=/tmp/old.so --lib new=current

A library given by path must export the same `mp_decode_attention` signature.
"""

from __future__ import annotations

import argparse
import ctypes
import json
import os
import statistics
import time

import torch

from modelport.layers import cpu_kernels

NH, NKV, HD, BS, LAYERS = 9, 3, 64, 16, 30
POINTS = [(1, 256), (1, 1800), (1, 4000), (8, 900), (32, 300)]


def load(spec: str) -> tuple[str, ctypes.CDLL]:
    name, _, path = spec.partition("=")
    if not path or path == "current":
        lib = cpu_kernels.load_library()
        assert lib is not None, "the C kernels did not build"
        return name or "current", lib
    lib = ctypes.CDLL(path)
    for fn_name, argtypes in cpu_kernels._SIGNATURES.items():
        fn = getattr(lib, fn_name, None)
        if fn is None:  # a build from before the *_io functions: the microbenchmark only
            continue
        fn.argtypes = argtypes
        fn.restype = None
    return name, lib


class Case:
    """30 layers' paged caches and one step's inputs for `rows` decode rows of `ctx` tokens."""

    def __init__(self, rows: int, ctx: int, threads: int) -> None:
        g = torch.Generator().manual_seed(rows * 7919 + ctx)
        per_row = -(-ctx // BS)
        nb = rows * per_row + 1
        self.rows, self.threads, self.nb = rows, threads, nb
        self.caches = [torch.randn(2, nb, BS, NKV, HD, generator=g) for _ in range(LAYERS)]
        perm = torch.randperm(nb, generator=g)[: rows * per_row]
        self.tables = perm.view(rows, per_row).to(torch.int32).contiguous()
        self.slots = (self.tables[:, (ctx - 1) // BS].to(torch.int64) * BS + (ctx - 1) % BS)
        self.positions = torch.full((rows,), ctx - 1, dtype=torch.int64)
        self.row_len = torch.full((rows,), ctx, dtype=torch.int32)
        self.row_req = torch.arange(rows, dtype=torch.int32)
        self.attend = torch.ones(rows, dtype=torch.uint8)
        self.rows_of = torch.empty(rows, dtype=torch.int32)
        qkv_n = (NH + 2 * NKV) * HD
        self.qkv = torch.randn(rows, qkv_n, generator=g).bfloat16()
        self.cos_sin = torch.randn(ctx, HD, generator=g)
        self.out = torch.empty(rows, NH * HD, dtype=torch.bfloat16)
        old = rows * qkv_n + threads * (NH // NKV + 1) * (ctx + HD)  # the first version's need
        new = cpu_kernels.attention_work_floats(rows, NH, NKV, HD, threads)
        self.work = torch.empty(max(old, new))

    def step(self, lib: ctypes.CDLL) -> None:
        fn = lib.mp_decode_attention
        for cache in self.caches:
            fn(self.rows, NH, NKV, HD, HD, self.qkv.data_ptr(), None, self.cos_sin.data_ptr(),
               self.positions.data_ptr(), cache.data_ptr(), self.nb, BS, self.slots.data_ptr(),
               self.tables.data_ptr(), self.tables.shape[1], self.row_req.data_ptr(),
               self.row_len.data_ptr(), self.attend.data_ptr(), HD**-0.5, self.out.data_ptr(),
               self.work.data_ptr(), self.rows_of.data_ptr(), self.threads)


def e2e(libs: list[tuple[str, ctypes.CDLL]], rounds: int, prompt_len: int, steps: int,
        streams: int = 1) -> list:
    """`streams` streams with prompt_len-token prompts through LLM() (the default model), each
    library in turn per round: ms per decode step (wall time between streamed tokens) and
    ms of the C path's layers per decode step (DecodePlan.run of `streams` rows)."""
    import random

    from modelport import LLM, SamplingParams

    llm = LLM(kv_cache_memory=(256 << 20) * streams, max_model_len=4096,
              max_num_seqs=max(streams, 8))
    eng = llm.llm_engine
    vocab = eng.config.model_config.vocab_size
    rng = random.Random(0)
    prompts = [[rng.randrange(1000, vocab - 1000) for _ in range(prompt_len)]
               for _ in range(streams)]
    run_ms: list[float] = []
    real_run = cpu_kernels.DecodePlan.run

    def timed(self, x, positions, ctx):
        t0 = time.perf_counter()
        out = real_run(self, x, positions, ctx)
        if x.shape[0] == streams and ctx.attn_metadata.max_query_len == 1:
            run_ms.append((time.perf_counter() - t0) * 1e3)
        return out

    cpu_kernels.DecodePlan.run = timed
    # the first version's work buffer grew with the context: size it for both versions
    real_work = cpu_kernels.attention_work_floats
    cpu_kernels.attention_work_floats = lambda rows, nh, nkv, hd, threads: (
        real_work(rows, nh, nkv, hd, threads) + threads * (nh // nkv + 1) * (4096 + hd))
    p = SamplingParams(temperature=0, max_tokens=steps + 1, ignore_eos=True)
    results = []
    for rnd in range(rounds + 1):  # round 0 warms up (and fills the prefix cache)
        for name, lib in libs:
            plan = eng.core.runner.model.model.__dict__.get("_cpu_decode_plan")
            if plan:
                plan.lib = lib
            run_ms.clear()
            for i, prompt in enumerate(prompts):
                eng.add_request(f"e2e-{rnd}-{name}-{i}", prompt, p, output_kind="delta")
            t_first, n = None, 0
            while eng.has_unfinished_requests():
                for o in eng.step():
                    n += len(o.outputs[0].token_ids) if o.request_id.endswith("-0") else 0
                    if t_first is None and n:
                        t_first = time.perf_counter()
            step_ms = (time.perf_counter() - t_first) * 1e3 / (n - 1)
            if rnd:
                line = {"round": rnd, "lib": name, "decode_step_ms": round(step_ms, 2),
                        "layers_ms": round(statistics.median(run_ms), 2),
                        "load_average": os.getloadavg()[0]}
                results.append(line)
                print(json.dumps(line), flush=True)
    cpu_kernels.DecodePlan.run = real_run
    cpu_kernels.attention_work_floats = real_work
    return results


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--lib", action="append", default=[],
                    help="NAME=PATH of a built cpu_decode library, or NAME=current (repeatable)")
    ap.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--rounds", type=int, default=5, help="interleaved rounds per point")
    ap.add_argument("--passes", type=int, default=10, help="30-layer passes timed per round")
    ap.add_argument("--json", help="write the results here")
    ap.add_argument("--e2e", type=int, metavar="ROUNDS",
                    help="instead: ROUNDS of one stream through LLM(), the libraries in turn")
    ap.add_argument("--prompt-len", type=int, default=1800)
    ap.add_argument("--steps", type=int, default=64, help="decode steps per e2e run")
    ap.add_argument("--streams", type=int, default=1, help="concurrent e2e streams")
    args = ap.parse_args()
    libs = [load(s) for s in (args.lib or ["current"])]
    if args.e2e:
        results = e2e(libs, args.e2e, args.prompt_len, args.steps, args.streams)
        if args.json:
            with open(args.json, "w") as f:
                json.dump({"e2e": results}, f, indent=1)
        return
    results = []
    print(f"load average {os.getloadavg()}")
    for threads in args.threads:
        for rows, ctx in POINTS:
            case = Case(rows, ctx, threads)
            times: dict[str, list[float]] = {name: [] for name, _ in libs}
            for _name, lib in libs:
                case.step(lib)  # warm up
            for _ in range(args.rounds):
                for name, lib in libs:
                    t0 = time.perf_counter()
                    for _ in range(args.passes):
                        case.step(lib)
                    times[name].append((time.perf_counter() - t0) / (args.passes * LAYERS))
            line = {"threads": threads, "rows": rows, "context": ctx}
            for name, ts in times.items():
                line[f"{name}_us"] = round(statistics.median(ts) * 1e6, 1)
            results.append(line)
            print(json.dumps(line), flush=True)
    print(f"load average {os.getloadavg()}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"load_average_end": os.getloadavg(), "results": results}, f, indent=1)


if __name__ == "__main__":
    main()
