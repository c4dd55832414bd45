"""Offline throughput: many requests through the engine core at once (BENCH.md's W1).

Defaults are W1: 256 requests, prompt and output lengths uniform in [100, 1024] drawn with
random.Random(0), random token ids, greedy, ignore EOS. Prints one JSON object per run
with the device, versions, workload, token counts, seconds and tokens/s. ``--backend hf``
runs HF transformers on the same workload (``both``: ours first, then HF, same process).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

from modelport.bench import _harness as h


def add_args(p: argparse.ArgumentParser) -> None:
    h.add_common_args(p)
    p.add_argument("--num-prompts", type=int, default=256)
    p.add_argument(
        "--input-len-range", type=int, nargs=2, default=(100, 1024), metavar=("LO", "HI")
    )
    p.add_argument(
        "--output-len-range", type=int, nargs=2, default=(100, 1024), metavar=("LO", "HI")
    )
    # `vllm bench throughput`'s names: every prompt / output of exactly this length
    p.add_argument("--input-len", type=int, default=None,
                   help="every prompt this long (same as --input-len-range N N)")
    p.add_argument("--output-len", type=int, default=None,
                   help="every output this long (same as --output-len-range N N)")
    p.add_argument(
        "--hf-mode",
        default="continuous",
        choices=["continuous", "static"],
        help="HF: generate_batch-style continuous batching, or padded static batches",
    )
    p.add_argument("--hf-batch-size", type=int, default=64, help="HF static batch size")
    p.add_argument(
        "--hf-num-prompts",
        type=int,
        default=None,
        help="run HF on the first N requests only (its tok/s is then per that subset)",
    )
    p.add_argument(
        "--profile-steps",
        type=int,
        default=0,
        help="profile this many engine steps in an extra, untimed pass: from the 10th step "
        "and once half the output is done",
    )


def _vocab(path: str | None) -> int:
    from modelport.loader import load_model_config, resolve_model

    return load_model_config(resolve_model(path)).vocab_size


def _workload(args: argparse.Namespace, vocab: int) -> tuple[list[list[int]], list[int]]:
    return h.w1_workload(
        args.num_prompts,
        tuple(args.input_len_range),
        tuple(args.output_len_range),
        vocab,
        args.seed,
    )


def run_modelport(
    args: argparse.Namespace,
    path: str | None,
    prompts: list[list[int]],
    outs: list[int],
    device: str,
    vocab: int,
) -> dict[str, Any]:
    t0 = time.perf_counter()
    core = h.build_engine(args, path)
    startup = time.perf_counter() - t0
    # warm-up outside the timed region: a small draw of the same workload (other token ids,
    # so no prefix-cache hits later) compiles the kernels for the shapes the run will see:
    # full prefill chunks riding with decodes, then decode batches. Without it the first
    # run in a process pays Triton/cuBLAS start-up costs inside its admission phase.
    warm_p, _ = h.w1_workload(min(32, len(prompts)), tuple(args.input_len_range),
                              tuple(args.output_len_range), vocab, args.seed + 10_000)
    for i, p in enumerate(warm_p):
        core.add_request(h.greedy_request(f"warmup-{i}", p, 16))
    while core.has_unfinished_requests():
        core.step()
    h.sync(device)

    t = time.perf_counter()
    for i, (p, o) in enumerate(zip(prompts, outs)):
        core.add_request(h.greedy_request(str(i), p, o))
    got, steps = 0, 0
    admitted_at, admitted_steps = None, 0  # when the last request got into the batch
    while core.has_unfinished_requests():
        step_out = core.step()
        for o in step_out.outputs:
            got += len(o.new_token_ids)
        steps += 1
        if admitted_at is None and step_out.stats is not None and step_out.stats.num_waiting == 0:
            admitted_at, admitted_steps = time.perf_counter(), steps
    h.sync(device)
    dt = time.perf_counter() - t
    # the profiler slows the steps it watches: it gets its own pass over the same workload
    prof_info = _profile_pass(core, args, prompts, outs, device) if args.profile_steps else None
    res: dict[str, Any] = {
        "backend": "modelport",
        "requests": len(prompts),
        "prompt_tokens": sum(map(len, prompts)),
        "output_tokens": got,
        "seconds": round(dt, 3),
        "output_tok_s": round(got / dt, 1),
        "total_tok_s": round((got + sum(map(len, prompts))) / dt, 1),
        "steps": steps,
        # until every request is admitted (prefill chunks ride along with decodes), then the
        # remaining steps (pure decode, mostly replayed from CUDA graphs)
        "admission_phase": {"seconds": round((admitted_at or t) - t, 3), "steps": admitted_steps},
        "decode_phase": {"seconds": round(t + dt - (admitted_at or t), 3),
                         "steps": steps - admitted_steps},
        "startup_s": round(startup, 1),
        "kv_blocks": core.num_kv_blocks,
        # the step budgets the engine ran with (the flags, else their defaults for this GPU)
        "max_num_batched_tokens": core.config.scheduler_config.max_num_batched_tokens,
        "max_num_seqs": core.config.scheduler_config.max_num_seqs,
        "enforce_eager": args.enforce_eager,
        "async_scheduling": core.async_scheduling,
        "kv_cache_dtype": args.kv_cache_dtype,
        "quantization": args.quantization,
    }
    if prof_info is not None:
        res["profile"] = prof_info
    del core
    h.free_cuda()
    return res


def _profile_pass(core: Any, args: argparse.Namespace, prompts: list[list[int]],
                  outs: list[int], device: str) -> dict[str, Any]:
    """Profile --profile-steps steps twice in a second, untimed pass of the workload: from the
    10th step (admission: prefill chunks with decodes) and once half the output is out
    (decode); then abort the rest."""
    import torch

    def window() -> Any:
        p = torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU,
                                               torch.profiler.ProfilerActivity.CUDA])
        p.__enter__()
        return p

    ids = [f"prof-{i}" for i in range(len(prompts))]
    vocab = core.config.model_config.vocab_size
    for rid, p, o in zip(ids, prompts, outs):  # shifted ids: no prefix-cache hits on the run's
        core.add_request(h.greedy_request(rid, [(t + 1) % vocab for t in p], o))
    total, got, steps = sum(outs), 0, 0
    summary: dict[str, Any] = {}
    todo = [("admission", lambda: steps >= 10), ("decode", lambda: got >= total // 2)]
    while core.has_unfinished_requests() and todo:
        name, ready = todo[0]
        if ready():
            h.sync(device)
            prof, t0 = window(), time.perf_counter()
            rows = ctx = 0
            for _ in range(args.profile_steps):
                running = core.scheduler.running
                rows += len(running)
                ctx += sum(r.num_computed_tokens for r in running)
                for o in core.step().outputs:
                    got += len(o.new_token_ids)
                steps += 1
            h.sync(device)
            wall = time.perf_counter() - t0
            prof.__exit__(None, None, None)
            summary[name] = h.profile_summary(prof, args.profile_steps, wall)
            # what each step's attention had to read: the running rows and their cached tokens
            summary[name]["running_per_step"] = round(rows / args.profile_steps, 1)
            summary[name]["cached_tokens_per_step"] = round(ctx / args.profile_steps)
            summary[name]["kv_bytes_per_token"] = _kv_bytes_per_token(core)
            todo.pop(0)
            continue
        for o in core.step().outputs:
            got += len(o.new_token_ids)
        steps += 1
    core.abort_requests(ids)
    while core.has_unfinished_requests():
        core.step()
    return summary


def _kv_bytes_per_token(core: Any) -> int:
    """Bytes of K and V one token holds over all layers in the engine's KV cache."""
    mc = core.config.model_config
    elt = 1 if core.config.cache_config.kv_cache_dtype.startswith("fp8") else 2
    return 2 * mc.num_hidden_layers * mc.num_key_value_heads * mc.head_dim * elt


def _hf_continuous(model: Any, prompts: list[list[int]], outs: list[int]) -> int:
    from transformers import GenerationConfig

    gc = GenerationConfig(
        max_new_tokens=max(outs), do_sample=False, eos_token_id=-1, pad_token_id=0
    )
    mgr = model.init_continuous_batching(generation_config=gc)
    mgr.start()
    try:
        for i, (p, o) in enumerate(zip(prompts, outs)):
            mgr.add_request(p, request_id=f"r{i}", max_new_tokens=o)
        got = 0
        for _ in prompts:
            r = mgr.get_result(timeout=3600)
            if r is None:
                raise RuntimeError("HF continuous batching returned no result")
            got += len(r.generated_tokens)
    finally:
        mgr.stop(block=True)
    return got


def _hf_static(model: Any, prompts: list[list[int]], outs: list[int], bs: int, device: str) -> int:
    import torch

    useful = 0
    for i in range(0, len(prompts), bs):
        ps, os_ = prompts[i : i + bs], outs[i : i + bs]
        width = max(map(len, ps))
        ids = torch.tensor([[0] * (width - len(p)) + p for p in ps], device=device)
        mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in ps], device=device)
        n = max(os_)
        with torch.no_grad():
            model.generate(
                input_ids=ids,
                attention_mask=mask,
                max_new_tokens=n,
                min_new_tokens=n,
                do_sample=False,
                pad_token_id=0,
                eos_token_id=None,
            )
        useful += sum(os_)  # a padded static batch runs to its longest; count what was asked
    return useful


def run_hf(
    args: argparse.Namespace, path: str, prompts: list[list[int]], outs: list[int], device: str
) -> dict[str, Any]:
    if path is None:
        raise SystemExit("--backend hf needs --model (an HF folder) or --model-config")
    n = args.hf_num_prompts or len(prompts)
    prompts, outs = prompts[:n], outs[:n]
    model = h.build_hf_model(path, args, device)
    h.sync(device)
    t = time.perf_counter()
    if args.hf_mode == "continuous":
        got = _hf_continuous(model, prompts, outs)
    else:
        got = _hf_static(model, prompts, outs, args.hf_batch_size, device)
    h.sync(device)
    dt = time.perf_counter() - t
    del model
    h.free_cuda()
    return {
        "backend": f"hf-{args.hf_mode}",
        "requests": n,
        "prompt_tokens": sum(map(len, prompts)),
        "output_tokens": got,
        "seconds": round(dt, 3),
        "output_tok_s": round(got / dt, 1),
        "total_tok_s": round((got + sum(map(len, prompts))) / dt, 1),
    }


def _fixed_lengths(args: argparse.Namespace) -> None:
    """--input-len / --output-len N as the ranges (N, N)."""
    for fixed, rng in (("input_len", "input_len_range"), ("output_len", "output_len_range")):
        n = getattr(args, fixed)
        if n is not None:
            if n < 1:
                raise SystemExit(f"--{fixed.replace('_', '-')} must be >= 1, got {n}")
            setattr(args, rng, (n, n))


def run(args: argparse.Namespace) -> int:
    _fixed_lengths(args)
    device = h.resolved_device(args)
    path = h.model_path(args)
    from modelport.loader import load_model_config, resolve_model

    model_config = load_model_config(resolve_model(path))
    vocab = model_config.vocab_size
    prompts, outs = _workload(args, vocab)
    limit = args.max_model_len or model_config.max_position_embeddings
    longest = max((len(p) + o for p, o in zip(prompts, outs)), default=0)
    if longest > limit:  # refused here, not as the engine's traceback mid-run
        raise SystemExit(
            f"modelport bench throughput: a request of the workload needs {longest} tokens "
            f"(prompt + output) but the model's max_model_len is {limit}; lower "
            "--input-len / --output-len (or --input-len-range / --output-len-range)")
    result: dict[str, Any] = {
        "bench": "throughput",
        "env": h.environment(device),
        "model": args.model_config or args.model or "default",
        "load_format": args.load_format,
        "workload": {
            "num_prompts": args.num_prompts,
            "input_len_range": list(args.input_len_range),
            "output_len_range": list(args.output_len_range),
            "seed": args.seed,
            "greedy": True,
            "ignore_eos": True,
        },
    }
    runs = []
    if args.backend in ("modelport", "both"):
        runs.append(run_modelport(args, path, prompts, outs, device, vocab))
    if args.backend in ("hf", "both"):
        runs.append(run_hf(args, path, prompts, outs, device))
    result["runs"] = runs
    if len(runs) == 2:
        result["ratio_output_tok_s"] = round(runs[0]["output_tok_s"] / runs[1]["output_tok_s"], 2)
    h.emit(result, args)
    return 0


def load_results(path: str | Path) -> list[dict[str, Any]]:
    """Read back an --output-json file (one JSON object a line)."""
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]


if __name__ == "__main__":
    raise SystemExit(h.standalone_main(add_args, run, __doc__))
