"""Latency of a fixed batch: time to first token and inter-token latency (BENCH.md's W3).

Defaults are W3: one request, a 1024-token random prompt, 128 new tokens, greedy. Each
iteration draws a fresh prompt (so the prefix cache never turns the prefill into a hit),
runs it through the engine core, and timestamps every step on the host once its tokens
are back: TTFT is the first token's wait, ITL the mean gap between the following tokens.
Prints one JSON object; ``--backend hf`` measures HF transformers' generate() the same way.
"""

from __future__ import annotations

import argparse
import statistics
import time
from typing import Any

from modelport.bench import _harness as h


def add_args(p: argparse.ArgumentParser) -> None:
    h.add_common_args(p)
    p.add_argument("--batch-size", type=int, default=1)
    p.add_argument("--input-len", type=int, default=1024)
    p.add_argument("--output-len", type=int, default=128)
    p.add_argument("--num-iters", type=int, default=5)
    p.add_argument("--num-iters-warmup", type=int, default=2)
    p.add_argument(
        "--profile",
        action="store_true",
        help="profile the decode steps of one extra iteration (kernel vs idle time)",
    )


def _one_iteration(
    core: Any, args: argparse.Namespace, vocab: int, seed: int, device: str, prof: Any = None
) -> tuple[float, list[float], float]:
    prompts = h.random_prompts(args.batch_size, (args.input_len, args.input_len), vocab, seed)
    h.sync(device)
    t0 = time.perf_counter()
    for i, p in enumerate(prompts):
        core.add_request(h.greedy_request(f"it{seed}-{i}", p, args.output_len))
    stamps: list[float] = []  # host time when each step's tokens were back
    first_step = None  # the first step() call's host time (with async scheduling: the
    # prefill's schedule and launches, which return before the device finishes)
    profiling = False
    while core.has_unfinished_requests():
        if prof is not None and not profiling and len(stamps) == 1:
            prof.__enter__()  # decode steps only: the prefill is behind us
            profiling = True
        outs = core.step().outputs
        if first_step is None:
            first_step = time.perf_counter() - t0
        if any(o.new_token_ids for o in outs):
            stamps.append(time.perf_counter())
    if profiling:
        prof.__exit__(None, None, None)
    return t0, stamps, first_step or 0.0


def run_modelport(
    args: argparse.Namespace, path: str | None, vocab: int, device: str
) -> dict[str, Any]:
    t = time.perf_counter()
    core = h.build_engine(args, path)
    startup = time.perf_counter() - t
    ttfts, itls, first_steps = [], [], []
    for it in range(args.num_iters_warmup + args.num_iters):
        t0, stamps, first_step = _one_iteration(core, args, vocab, args.seed + it, device)
        if it < args.num_iters_warmup:
            continue
        ttfts.append(stamps[0] - t0)
        first_steps.append(first_step)
        if len(stamps) > 1:
            itls.append((stamps[-1] - stamps[0]) / (len(stamps) - 1))
    res: dict[str, Any] = {
        "backend": "modelport",
        "ttft_ms": round(statistics.median(ttfts) * 1e3, 2),
        "itl_ms": round(statistics.median(itls) * 1e3, 3) if itls else None,
        "ttft_ms_all": [round(x * 1e3, 2) for x in ttfts],
        "itl_ms_all": [round(x * 1e3, 3) for x in itls],
        # host time of each iteration's first step() (request added -> prefill launched)
        "first_step_ms_all": [round(x * 1e3, 2) for x in first_steps],
        "startup_s": round(startup, 1),
        # the step budgets the engine ran with (the flags, else their defaults for this GPU)
        "max_num_batched_tokens": core.config.scheduler_config.max_num_batched_tokens,
        "max_num_seqs": core.config.scheduler_config.max_num_seqs,
        "enforce_eager": args.enforce_eager,
        "async_scheduling": core.async_scheduling,
        "kv_cache_dtype": args.kv_cache_dtype,
        "quantization": args.quantization,
    }
    if args.profile:
        import torch

        prof = torch.profiler.profile(
            activities=[torch.profiler.ProfilerActivity.CPU, torch.profiler.ProfilerActivity.CUDA]
        )
        _, stamps, _ = _one_iteration(core, args, vocab, args.seed + 999, device, prof)
        res["profile_decode"] = h.profile_summary(prof, len(stamps) - 1, stamps[-1] - stamps[0])
    del core
    h.free_cuda()
    return res


def run_hf(args: argparse.Namespace, path: str | None, vocab: int, device: str) -> dict[str, Any]:
    import torch

    if path is None:
        raise SystemExit("--backend hf needs --model (an HF folder) or --model-config")
    model = h.build_hf_model(path, args, device)

    def gen(model: Any, ids: torch.Tensor, n: int) -> float:
        h.sync(device)
        t = time.perf_counter()
        with torch.no_grad():
            model.generate(
                input_ids=ids,
                max_new_tokens=n,
                min_new_tokens=n,
                do_sample=False,
                pad_token_id=0,
                eos_token_id=None,
            )
        h.sync(device)
        return time.perf_counter() - t

    ttfts, itls = [], []
    for it in range(args.num_iters_warmup + args.num_iters):
        p = h.random_prompts(
            args.batch_size, (args.input_len, args.input_len), vocab, args.seed + it
        )
        ids = torch.tensor(p, device=device)
        t1 = gen(model, ids, 1)
        tn = gen(model, ids, args.output_len)
        if it >= args.num_iters_warmup:
            ttfts.append(t1)
            itls.append((tn - t1) / max(1, args.output_len - 1))
    del model
    h.free_cuda()
    return {
        "backend": "hf",
        "ttft_ms": round(statistics.median(ttfts) * 1e3, 2),
        "itl_ms": round(statistics.median(itls) * 1e3, 3),
        "ttft_ms_all": [round(x * 1e3, 2) for x in ttfts],
        "itl_ms_all": [round(x * 1e3, 3) for x in itls],
    }


def run(args: argparse.Namespace) -> int:
    from modelport.loader import load_model_config, resolve_model

    device = h.resolved_device(args)
    path = h.model_path(args)
    model_config = load_model_config(resolve_model(path))
    vocab = model_config.vocab_size
    limit = args.max_model_len or model_config.max_position_embeddings
    if args.input_len + args.output_len > limit:  # refused here, not as the engine's traceback
        raise SystemExit(
            f"modelport bench latency: --input-len {args.input_len} + --output-len "
            f"{args.output_len} = {args.input_len + args.output_len} tokens exceeds the "
            f"model's max_model_len {limit}; lower --input-len / --output-len")
    result: dict[str, Any] = {
        "bench": "latency",
        "env": h.environment(device),
        "model": args.model_config or args.model or "default",
        "load_format": args.load_format,
        "workload": {
            "batch_size": args.batch_size,
            "input_len": args.input_len,
            "output_len": args.output_len,
            "num_iters": args.num_iters,
            "greedy": True,
        },
    }
    runs = []
    if args.backend in ("modelport", "both"):
        runs.append(run_modelport(args, path, vocab, device))
    if args.backend in ("hf", "both"):
        runs.append(run_hf(args, path, vocab, device))
    result["runs"] = runs
    if len(runs) == 2:
        result["speedup_itl"] = round(runs[1]["itl_ms"] / runs[0]["itl_ms"], 2)
        result["speedup_ttft"] = round(runs[1]["ttft_ms"] / runs[0]["ttft_ms"], 2)
    h.emit(result, args)
    return 0


if __name__ == "__main__":
    raise SystemExit(h.standalone_main(add_args, run, __doc__))
