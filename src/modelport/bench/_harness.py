"""Shared pieces of the offline benchmarks (throughput, latency): model source, workload,
engine and HF construction, and the one-JSON-object-per-run output.

Kept apart from the two benchmark modules so both measure the same engine and the same HF
model the same way; the leading underscore keeps `modelport bench` from listing it.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from modelport.engine.arg_utils import EngineArgs, parse_json_dict


def add_common_args(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--model",
        default=None,
        help="local HF folder or .gguf file (default: the embedded SmolLM2)",
    )
    p.add_argument(
        "--model-config",
        default=None,
        help="an HF config.json to build the model from (use with --load-format "
        "dummy), e.g. bench/configs/llama-3.1-8b.json",
    )
    p.add_argument(
        "--load-format", default="auto", choices=["auto", "safetensors", "gguf", "dummy"]
    )
    p.add_argument("--dtype", default="auto")
    p.add_argument("--device", default="auto")
    p.add_argument("--max-model-len", type=int, default=None)
    p.add_argument("--max-num-seqs", type=int, default=EngineArgs.max_num_seqs)
    p.add_argument("--max-num-batched-tokens", type=int, default=None)
    p.add_argument("--gpu-memory-utilization", type=float, default=0.90)
    p.add_argument("--kv-cache-memory", type=int, default=None, help="bytes (CPU default 1 GiB)")
    p.add_argument("--block-size", type=int, default=16)
    p.add_argument("--enforce-eager", action="store_true")
    p.add_argument("--no-prefix-caching", action="store_true")
    p.add_argument("--kv-cache-dtype", default="auto", help="auto | fp8 | bfloat16 | ...")
    p.add_argument("--quantization", "-q", default=None,
                   help="e.g. fp8, awq, gptq (with --load-format dummy: random packed weights)")
    p.add_argument("--async-scheduling", action=argparse.BooleanOptionalAction, default=None,
                   help="prepare step N+1 while the device runs step N (default: on for CUDA)")
    p.add_argument("--tensor-parallel-size", "-tp", type=int, default=1,
                   help="ranks on one host (NCCL on CUDA, gloo on CPU)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--speculative-config", type=parse_json_dict, default=None,
                   help='e.g. \'{"method": "ngram", "num_speculative_tokens": 4}\'')
    p.add_argument(
        "--backend",
        default="modelport",
        choices=["modelport", "hf", "both"],
        help="hf: HF transformers on the same workload; both: ours, then HF, "
        "in this process, with the ratio",
    )
    p.add_argument("--output-json", default=None, help="append the result (one JSON line)")


def standalone_main(add_args: Any, run: Any, doc: str | None) -> int:
    """`python -m modelport.bench.<kind>`: the same arguments without the whole CLI, for
    machines that lack the HTTP stack's packages (the GPU box)."""
    p = argparse.ArgumentParser(description=doc)
    add_args(p)
    return run(p.parse_args())


def model_path(args: argparse.Namespace) -> str | None:
    """--model, or a temporary folder holding --model-config as config.json."""
    if args.model_config is None:
        return args.model
    if args.model is not None:
        raise SystemExit("give --model or --model-config, not both")
    cfg = json.loads(Path(args.model_config).read_text())
    d = Path(tempfile.mkdtemp(prefix="modelport-bench-"))
    (d / "config.json").write_text(json.dumps(cfg))
    return str(d)


def random_prompts(n: int, lens: tuple[int, int], vocab: int, seed: int) -> list[list[int]]:
    """n prompts, each a length uniform in [lo, hi] then that many ids in [0, vocab)."""
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        k = rng.randint(*lens)
        out.append([rng.randrange(vocab) for _ in range(k)])
    return out


def w1_workload(
    n: int, input_lens: tuple[int, int], output_lens: tuple[int, int], vocab: int, seed: int
) -> tuple[list[list[int]], list[int]]:
    """BENCH.md's W1 draw: all prompts first (length, then ids), then all output lengths."""
    rng = random.Random(seed)
    prompts = []
    for _ in range(n):
        k = rng.randint(*input_lens)
        prompts.append([rng.randrange(vocab) for _ in range(k)])
    outs = [rng.randint(*output_lens) for _ in range(n)]
    return prompts, outs


def build_engine(args: argparse.Namespace, path: str | None) -> Any:
    """The engine core itself (token ids in, token ids out): no tokenizer, no HTTP."""
    from modelport.engine.core import EngineCore

    ea = EngineArgs(
        model=path,
        dtype=args.dtype,
        device=args.device,
        max_model_len=args.max_model_len,
        max_num_seqs=args.max_num_seqs,
        max_num_batched_tokens=args.max_num_batched_tokens,
        usage_context="offline",
        gpu_memory_utilization=args.gpu_memory_utilization,
        kv_cache_memory=args.kv_cache_memory,
        block_size=args.block_size,
        enforce_eager=args.enforce_eager,
        enable_prefix_caching=not args.no_prefix_caching,
        load_format=args.load_format,
        seed=args.seed,
        kv_cache_dtype=args.kv_cache_dtype,
        quantization=args.quantization,
        async_scheduling=args.async_scheduling,
        speculative_config=args.speculative_config,
        tensor_parallel_size=args.tensor_parallel_size,
    )
    return EngineCore(ea.create_engine_config())


def greedy_request(rid: str, prompt: list[int], max_tokens: int) -> Any:
    from modelport.engine.messages import EngineCoreRequest, params_to_dict
    from modelport.sampling_params import SamplingParams

    p = SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True)
    return EngineCoreRequest(
        request_id=rid,
        prompt_token_ids=prompt,
        sampling_params=params_to_dict(p),
        eos_token_ids=[],
        arrival_time=time.monotonic(),
    )


def sync(device: str) -> None:
    import torch

    if device.startswith("cuda"):
        torch.cuda.synchronize()


def build_hf_model(path: str, args: argparse.Namespace, device: str) -> Any:
    """HF LlamaForCausalLM-style model on device: real weights, or random for --load-format dummy."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from modelport.loader import load_model_config, resolve_dtype, resolve_model

    src = resolve_model(path)
    dtype = resolve_dtype(args.dtype, load_model_config(src), torch.device(device))
    if args.load_format == "dummy":
        cfg = AutoConfig.from_pretrained(src.path, local_files_only=True)
        cfg._attn_implementation = "sdpa"
        old = torch.get_default_dtype()
        torch.set_default_dtype(dtype)
        try:
            with torch.device(device):
                model = AutoModelForCausalLM.from_config(cfg)
        finally:
            torch.set_default_dtype(old)
    else:
        if src.kind != "hf":
            raise SystemExit(
                "--backend hf needs an HF folder (or --model-config with dummy weights)"
            )
        model = AutoModelForCausalLM.from_pretrained(
            src.path, dtype=dtype, local_files_only=True, attn_implementation="sdpa"
        ).to(device)
    return model.eval()


def resolved_device(args: argparse.Namespace) -> str:
    import torch

    if args.device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return args.device


def environment(device: str) -> dict[str, Any]:
    import torch

    env: dict[str, Any] = {
        "torch": torch.__version__,
        "python": platform.python_version(),
        "device": device,
    }
    if device.startswith("cuda"):
        env["gpu"] = torch.cuda.get_device_name()
        try:
            import triton

            env["triton"] = triton.__version__
        except ImportError:
            pass
    else:
        env["cpu"] = platform.processor() or platform.machine()
        env["threads"] = torch.get_num_threads()
    try:
        import transformers

        env["transformers"] = transformers.__version__
    except ImportError:
        pass
    knobs = {k: v for k, v in sorted(os.environ.items()) if k.startswith("MODELPORT_")}
    if knobs:  # the switches a run was measured with (e.g. MODELPORT_PDL=0)
        env["knobs"] = knobs
    if device.startswith("cuda"):
        from modelport.layers import pdl

        env["pdl"] = pdl.enabled()
    return env


def emit(result: dict[str, Any], args: argparse.Namespace) -> None:
    """Print one JSON object (with the command line and every argument); append it to
    --output-json as one line."""
    argv = [os.path.basename(sys.argv[0]), *sys.argv[1:]]
    result = {
        **result,
        "command": " ".join(argv),
        "args": {k: v for k, v in vars(args).items() if not callable(v)},
    }
    line = json.dumps(result)
    print(line, flush=True)
    if args.output_json:
        Path(args.output_json).parent.mkdir(parents=True, exist_ok=True)
        with open(args.output_json, "a") as f:
            f.write(line + "\n")


def free_cuda() -> None:
    """Return cached GPU memory (after the caller dropped its references) before HF loads."""
    import gc

    import torch

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def profile_summary(prof: Any, steps: int, wall_s: float) -> dict[str, Any]:
    """Where the time of `steps` profiled steps went: GPU kernel time vs idle (launch gaps,
    host work), and the kernels that took the most, from a torch.profiler run."""
    from torch.autograd import DeviceType

    spans = []
    by_name: dict[str, float] = {}
    for e in prof.events():
        if e.device_type != DeviceType.CUDA:
            continue
        tr = e.time_range
        spans.append((tr.start, tr.end))
        by_name[e.name] = by_name.get(e.name, 0.0) + (tr.end - tr.start)
    spans.sort()
    busy, cur_s, cur_e = 0.0, None, None
    for s, e in spans:  # union of kernel intervals (us)
        if cur_e is None or s > cur_e:
            if cur_e is not None:
                busy += cur_e - cur_s
            cur_s, cur_e = s, e
        else:
            cur_e = max(cur_e, e)
    if cur_e is not None:
        busy += cur_e - cur_s
    wall_us = wall_s * 1e6
    top = sorted(by_name.items(), key=lambda kv: -kv[1])[:12]
    return {
        "steps": steps,
        "kernels_per_step": round(len(spans) / steps, 1),
        "wall_ms_per_step": round(wall_us / 1e3 / steps, 3),
        "gpu_busy_ms_per_step": round(busy / 1e3 / steps, 3),
        "gpu_idle_fraction": round(1 - busy / wall_us, 3) if wall_us else None,
        "top_kernels_ms_per_step": {k[:80]: round(v / 1e3 / steps, 3) for k, v in top},
    }
