"""Warnings, recommendations and the `modelport serve` command that fits.

Every recommendation is backed by re-planning the changed request, so the numbers it quotes
are the planner's own, not rules of thumb.
"""

from __future__ import annotations

import dataclasses
import shlex
from dataclasses import dataclass

from modelport.planner.plan import Plan, PlanRequest, make_plan
from modelport.planner.presets import model_hub_id
from modelport.planner.tensors import decoder_tensors

GIB = 2**30


@dataclass(frozen=True)
class Advice:
    warnings: list[str]
    recommendations: list[str]
    serve_command: str | None  # a command whose settings fit, None when nothing does
    serve_plan: Plan | None  # the plan of that command
    serve_note: str | None = None  # what the user must fill in before running it


def _replan(req: PlanRequest, **changes: object) -> Plan | None:
    try:
        return make_plan(dataclasses.replace(req, **changes))
    except ValueError:
        return None


def _warnings(plan: Plan) -> list[str]:
    req, dev, out = plan.request, plan.request.device, []
    if not dev.is_cpu and req.gpu_memory_utilization >= 0.95:
        out.append(
            f"gpu_memory_utilization {req.gpu_memory_utilization} leaves under 5% for "
            "allocator fragmentation and other processes: expect OOM after warm-up; "
            "0.90 is the safe default"
        )
    if not dev.is_cpu and plan.budget.kv_bytes <= 0:
        out.append(
            "these settings leave no memory for the KV cache "
            f"({plan.budget.kv_bytes / GIB:.2f} GiB after weights and activations)"
        )
    elif not plan.kv.holds_one_sequence and plan.weights_fit:
        out.append(
            f"the KV cache ({plan.kv.tokens} tokens) cannot hold one max_model_len "
            f"({plan.max_model_len}) sequence: the engine refuses to start"
        )
    if plan.tp > 1 and dev.interconnect == "pcie":
        single = _replan(req, num_gpus=1, tensor_parallel_size=1)
        tail = (
            "one GPU holds the model, so prefer data-parallel replicas"
            if single is not None and single.engine_starts
            else "expect poor scaling"
        )
        out.append(
            f"tensor parallelism over PCIe: every layer does 2 all-reduces across "
            f"{plan.tp} GPUs without NVLink; {tail}"
        )
    q = req.effective_quantization
    if q in ("awq", "gptq"):
        bad = {
            t.shape[1]
            for t in decoder_tensors(req.model.config)
            if t.kind == "linear" and t.shape[1] % req.group_size
        }
        if bad:
            out.append(
                f"{q}: input widths {sorted(bad)} are not multiples of group size "
                f"{req.group_size}; the kernels need --group-size dividing them"
            )
    if q == "fp8" and not dev.fp8 and not dev.is_cpu:
        out.append(
            f"{dev.name} has no fp8 tensor cores: fp8 weights save memory but run "
            "weight-only (no compute speed-up)"
        )
    if (q and q.startswith("gguf-") and not req.keeps_quantized
            and not (req.model.gguf_moe and not req.device.is_cpu)):
        out.append(
            f"the engine dequantizes this GGUF to {plan.dtype} at load: "
            f"{plan.resident_per_gpu / GIB:.2f} GiB resident per device although its tensors "
            f"are {plan.weights.per_gpu_bytes / GIB:.2f} GiB; --quantization gguf keeps them"
        )
    if plan.replicas > 1 and req.num_gpus % plan.tp:
        out.append(
            f"{req.num_gpus % plan.tp} GPU(s) left idle: --num-gpus is not a multiple "
            f"of TP {plan.tp}"
        )
    return out


def _smallest_fitting_tp(plan: Plan) -> Plan | None:
    for d in plan.valid_tp:
        if d > 64:
            break
        p = _replan(plan.request, num_gpus=d, tensor_parallel_size=d)
        if p is not None and p.fits:
            return p
    return None


def _recommendations(plan: Plan) -> list[str]:
    req, dev, out = plan.request, plan.request.device, []
    kv = plan.kv
    if not dev.is_cpu and kv.dtype_bytes > 1:
        p = _replan(req, kv_cache_dtype="fp8")
        if p is not None and p.engine_starts:
            out.append(
                f"--kv-cache-dtype fp8: {kv.bytes_per_token_per_gpu // 1024} -> "
                f"{p.kv.bytes_per_token_per_gpu // 1024} KiB/token per GPU, "
                f"{p.kv.full_length_seqs} full-length sequences instead of "
                f"{kv.full_length_seqs}"
            )
    if req.model.kind == "gguf" and not req.keeps_quantized:
        p = _replan(req, quantization="gguf")
        if p is not None:
            out.append(
                f"--quantization gguf: keep the file's blocks, {p.resident_per_gpu / GIB:.2f} "
                f"GiB resident instead of {plan.resident_per_gpu / GIB:.2f} GiB"
            )
    if dev.is_cpu and plan.dtype == "float32" and not req.keeps_quantized:
        p = _replan(req, dtype="bf16")
        if p is not None:
            out.append(
                f"--dtype bfloat16: weights {plan.resident_per_gpu / GIB:.2f} -> "
                f"{p.resident_per_gpu / GIB:.2f} GiB in RAM, KV "
                f"{kv.bytes_per_token // 1024} -> {p.kv.bytes_per_token // 1024} KiB/token"
            )
    if req.effective_quantization is None:
        method = "gguf-q4_k_m" if dev.is_cpu else ("fp8" if dev.fp8 else "awq")
        p = _replan(req, quantization=method)
        if p is not None:
            extra = "" if p.engine_starts else " (still not enough)"
            out.append(
                f"--quantization {method}: weights {plan.weights.total_bytes / GIB:.2f} "
                f"-> {p.weights.total_bytes / GIB:.2f} GiB "
                f"({p.weights.bits_per_weight:.2f} bits/weight), "
                f"{p.kv.full_length_seqs} full-length sequences{extra}"
            )
        if not dev.is_cpu and method != "awq":
            p = _replan(req, quantization="awq")
            if p is not None:
                out.append(
                    f"--quantization awq: weights {p.weights.total_bytes / GIB:.2f} GiB "
                    f"({p.weights.bits_per_weight:.2f} bits/weight), "
                    f"{p.kv.full_length_seqs} full-length sequences"
                )
    if not plan.fits and plan.engine_starts and kv.num_blocks:
        seq_len = kv.num_blocks // req.max_num_seqs * kv.block_size
        if seq_len >= kv.block_size:
            out.append(
                f"--max-model-len {seq_len}: {req.max_num_seqs} sequences of that "
                f"length fit in the {kv.tokens}-token KV cache"
            )
        out.append(
            f"--max-num-seqs {kv.full_length_seqs}: that many {plan.max_model_len}-token "
            "sequences fit at once (more are queued or preempted)"
        )
    if dev.is_cpu and not plan.fits:
        need = kv.demand_bytes_per_gpu
        room = plan.budget.room_for_kv_bytes
        if need <= room * 0.9:  # leave the OS and the server 10%
            out.append(
                f"--kv-cache-memory {_mib_flag(-(-need // 2**20) * 2**20)}: the whole "
                "workload's KV cache "
                f"fits in RAM ({need / GIB:.2f} GiB)"
            )
    if not dev.is_cpu and not plan.fits:
        p = _smallest_fitting_tp(plan)
        if p is not None and p.tp > plan.tp:
            out.append(
                f"more GPUs: TP={p.tp} on {p.tp} x {dev.name} fits "
                f"({p.kv.full_length_seqs} full-length sequences)"
            )
    if plan.fits and req.num_gpus > 1:
        for d in plan.valid_tp:
            if d >= plan.tp:
                break
            p = _replan(req, num_gpus=d, tensor_parallel_size=d)
            if p is not None and p.engine_starts:
                out.append(
                    f"one replica fits on {d} GPU(s): for throughput prefer "
                    f"{req.num_gpus // d} data-parallel replicas of TP={d} over one "
                    f"TP={plan.tp} replica"
                )
                break
    return out


def _fitting_plan(plan: Plan) -> Plan | None:
    """Apply the usual remedies in order until the plan fits: fp8 KV, weight quantization
    (only when the weights do not fit), KV memory on CPU, fewer sequences, shorter context."""
    p: Plan | None = plan
    req = plan.request
    if p.fits:
        return p
    if not req.device.is_cpu and p.kv.dtype_bytes > 1:
        p = _replan(p.request, kv_cache_dtype="fp8") or p
    if not p.weights_fit and req.effective_quantization is None:
        method = "gguf-q4_k_m" if req.device.is_cpu else ("fp8" if req.device.fp8 else "awq")
        p = _replan(p.request, quantization=method) or p
    if req.device.is_cpu and not p.fits:
        room = p.budget.room_for_kv_bytes
        want = min(p.kv.demand_bytes_per_gpu, int(room * 0.9))
        if want > p.budget.kv_bytes:
            p = _replan(p.request, kv_cache_memory=-(-want // (1 << 20)) * (1 << 20)) or p
    if not p.fits and p.engine_starts:
        p = _replan(p.request, max_num_seqs=max(1, p.kv.full_length_seqs)) or p
        # fewer sequences leave the sampler's rows some memory back: take what then fits
        while p.fits and p.kv.full_length_seqs > p.request.max_num_seqs:
            more = _replan(p.request, max_num_seqs=p.request.max_num_seqs + 1)
            if more is None or not more.fits:
                break
            p = more
    if not p.fits and p.weights_fit and p.kv.tokens >= p.kv.block_size:
        p = _replan(p.request, max_num_seqs=1, max_model_len=p.kv.tokens) or p
    return p if p.fits else None


MODEL_PLACEHOLDER = "MODEL_DIR"


def serve_note(plan: Plan) -> str | None:
    m = plan.request.model
    if not m.weightless:
        return None
    if m.hub_id:
        return (f"{m.hub_id} is the model {m.name} names (_name_or_path): serve finds it in the "
                "local HF cache, or give the folder holding its weights instead")
    return (f"{MODEL_PLACEHOLDER}: put here the folder holding this config.json and the model's "
            f"*.safetensors; {m.name} has no weights beside it")


def serve_command(plan: Plan) -> str:
    """The `modelport serve` line for a plan (its data-parallel replicas in one server)."""
    req, m = plan.request, plan.request.model
    if m.weightless:  # a config without weights: the hub id it names, or a placeholder
        model = m.hub_id or MODEL_PLACEHOLDER
    else:
        model = str(m.path) if m.path is not None else model_hub_id(m.name)
    args = ["modelport", "serve", "--model", model]
    if req.device.is_cpu:
        args += ["--device", "cpu"]
    if req.dtype != "auto":
        args += ["--dtype", plan.dtype]
    if plan.tp > 1:
        args += ["--tensor-parallel-size", str(plan.tp)]
        if req.enable_expert_parallel:
            args += ["--enable-expert-parallel"]
    if plan.replicas > 1:
        args += ["--data-parallel-size", str(plan.replicas)]
    q = req.effective_quantization
    if q and q.startswith("gguf-") and req.keeps_quantized:
        if m.kind != "gguf" or req.quantization:  # not when the engine keeps it by default
            args += ["--quantization", "gguf"]
        if m.kind != "gguf":  # the user still has to fetch or convert that file
            args[3] = f"{model.rsplit('/', 1)[-1]}-{q[5:].upper()}.gguf"
    elif q and m.quantization is None:
        args += ["--quantization", q]
    args += ["--max-model-len", str(plan.max_model_len), "--max-num-seqs", str(req.max_num_seqs)]
    if req.kv_cache_dtype != "auto":
        args += ["--kv-cache-dtype", plan.kv.dtype]
    if req.device.is_cpu:
        if req.kv_cache_memory is not None:
            args += ["--kv-cache-memory", _mib_flag(req.kv_cache_memory)]
    elif req.gpu_memory_utilization != 0.90:
        args += ["--gpu-memory-utilization", f"{req.gpu_memory_utilization:g}"]
    if req.block_size != 16:
        args += ["--block-size", str(req.block_size)]
    return shlex.join(args)


def _mib_flag(n: int) -> str:
    if n % GIB == 0:
        return f"{n // GIB}GiB"
    return f"{n // (1 << 20)}MiB" if n % (1 << 20) == 0 else str(n)


def advise(plan: Plan) -> Advice:
    fitting = _fitting_plan(plan)
    return Advice(
        warnings=_warnings(plan),
        recommendations=_recommendations(plan),
        serve_command=serve_command(fitting) if fitting is not None else None,
        serve_note=serve_note(fitting) if fitting is not None else None,
        serve_plan=fitting,
    )
