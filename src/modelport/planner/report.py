"""Plan rendering: one JSON object for scripts, a readable table for people."""

from __future__ import annotations

from typing import Any

from modelport.planner.advisor import Advice
from modelport.planner.plan import Plan

GIB = 2**30


def plan_to_dict(plan: Plan, advice: Advice) -> dict[str, Any]:
    req, m, dev = plan.request, plan.request.model.config, plan.request.device
    w, b, kv, rl = plan.weights, plan.budget, plan.kv, plan.roofline
    return {
        "model": {
            "name": req.model.name,
            "source": req.model.kind,
            "architecture": m.architecture,
            "num_params": w.num_params,
            "num_hidden_layers": m.num_hidden_layers,
            "num_attention_heads": m.num_attention_heads,
            "num_key_value_heads": m.num_key_value_heads,
            "head_dim": m.head_dim,
            "max_position_embeddings": m.max_position_embeddings,
        },
        "device": {
            "name": dev.name,
            "kind": dev.kind,
            "count": req.num_gpus,
            "memory_bytes": dev.memory_bytes,
            "bandwidth_bytes_per_s": dev.bandwidth_bytes_s,
            "flops": dev.flops,
            "fp8": dev.fp8,
            "interconnect": dev.interconnect,
            "source": dev.source,  # "preset", "custom" or "this machine" (no --gpu)
            "detected": dev.detected,  # this machine: what was found, in words
        },
        "settings": {
            "dtype": plan.dtype,
            "quantization": req.effective_quantization,
            "kv_cache_dtype": kv.dtype,
            "max_model_len": plan.max_model_len,
            "max_num_seqs": req.max_num_seqs,
            "max_num_batched_tokens": plan.max_num_batched_tokens,
            "block_size": kv.block_size,
            "gpu_memory_utilization": req.gpu_memory_utilization,
            "kv_cache_memory": b.kv_bytes if b.kv_from_flag else None,
        },
        "weights": {
            "total_bytes": w.total_bytes,
            "per_gpu_bytes": w.per_gpu_bytes,
            "resident_per_gpu_bytes": plan.resident_per_gpu,
            "bits_per_weight": round(w.bits_per_weight, 4),
            "linear_bits_per_weight": round(w.linear_bits_per_weight, 4),
            "storage": w.storage,
            "source": w.source,
            "file_bytes": req.model.file_bytes,
        },
        "memory": {
            "device_bytes": b.device_bytes,
            "usable_bytes": b.usable_bytes,
            "weights_bytes": b.weights_bytes,
            "activation_bytes": b.activation_bytes,
            "non_torch_bytes": b.non_torch_bytes,
            "buffer_bytes": b.buffer_bytes,
            "kv_budget_bytes": b.kv_bytes,
        },
        "kv_cache": {
            "bytes_per_token": kv.bytes_per_token,
            "bytes_per_token_per_gpu": kv.bytes_per_token_per_gpu,
            "num_blocks": kv.num_blocks,
            "block_size": kv.block_size,
            "tokens": kv.tokens,
            "full_length_sequences": kv.full_length_seqs,
            "demand_bytes": kv.demand_bytes,
            "demand_bytes_per_gpu": kv.demand_bytes_per_gpu,
        },
        "parallelism": {
            "tensor_parallel_size": plan.tp,
            "data_parallel_replicas": plan.replicas,
            "valid_tensor_parallel_sizes": plan.valid_tp,
        },
        "roofline": None
        if rl is None
        else {
            "itl_ms_min": round(rl.itl_ms_min, 4),
            "batch": rl.batch,
            "step_ms_min": round(rl.step_ms_min, 4),
            "bound": rl.bound,
            "decode_tokens_per_s_max": round(rl.tokens_per_s_max, 1),
            "decode_tokens_per_s_max_all_replicas": round(rl.tokens_per_s_max_all, 1),
        },
        "verdict": {
            "fits": plan.fits,
            "engine_starts": plan.engine_starts,
            "weights_fit": plan.weights_fit,
            "reason": plan.reason,
        },
        "warnings": advice.warnings,
        "recommendations": advice.recommendations,
        "serve_command": advice.serve_command,
        "serve_note": advice.serve_note,
        "notes": list(plan.notes),
    }


def _gib(n: float) -> str:
    return f"{n / GIB:,.2f} GiB"


def _size(n: float) -> str:
    if abs(n) >= GIB:
        return _gib(n)
    if abs(n) >= 2**20:
        return f"{n / 2**20:,.1f} MiB"
    return f"{n / 1024:,.1f} KiB"


def render_text(plan: Plan, advice: Advice) -> str:
    req, m, dev = plan.request, plan.request.model.config, plan.request.device
    w, b, kv, rl = plan.weights, plan.budget, plan.kv, plan.roofline
    quant = req.effective_quantization or "none"
    rows: list[tuple[str, str]] = [
        (
            "model",
            f"{req.model.name} ({m.architecture}, {w.num_params / 1e9:.2f}B params, "
            f"{m.num_hidden_layers} layers, {m.num_attention_heads}/"
            f"{m.num_key_value_heads} heads/KV heads, head_dim {m.head_dim})",
        ),
        (
            "device",
            f"{req.num_gpus} x {dev.name} ({_gib(dev.memory_bytes)}, "
            + (f"{dev.bandwidth_bytes_s / 1e12:g} TB/s" if dev.bandwidth_bytes_s else "bandwidth ?")
            + f", {dev.interconnect})",
        ),
        (
            "parallelism",
            f"TP={plan.tp} x {plan.replicas} replica(s); valid TP: "
            f"{', '.join(map(str, plan.valid_tp))}",
        ),
        ("dtype / quant", f"{plan.dtype} / {quant} / KV {kv.dtype}"),
        (
            "weights",
            f"{_size(w.total_bytes)} total, {_size(w.per_gpu_bytes)} per device, "
            f"{w.bits_per_weight:.2f} bits/weight ({w.source})",
        ),
    ]
    if plan.resident_per_gpu != w.per_gpu_bytes:
        rows.append(("resident weights", f"{_size(plan.resident_per_gpu)} per device in memory"))
    if b.kv_from_flag:
        rows.append(
            (
                "memory",
                f"RAM {_gib(b.device_bytes)}: weights {_size(b.weights_bytes)} + buffers "
                f"{_size(b.buffer_bytes)} + activations {_size(b.activation_bytes)} + KV cache "
                f"{_gib(b.kv_bytes)} (--kv-cache-memory); "
                f"{_gib(b.ram_left_bytes)} left",
            )
        )
    else:
        rows.append(
            (
                "memory",
                f"{req.gpu_memory_utilization:g} x {_gib(b.device_bytes)} = "
                f"{_gib(b.usable_bytes)} - weights {_gib(b.weights_bytes)} - buffers "
                f"{_size(b.buffer_bytes)} - activations {_size(b.activation_bytes)} - "
                f"non-torch {_size(b.non_torch_bytes)} = KV {_gib(b.kv_bytes)}",
            )
        )
    rows += [
        (
            "KV per token",
            f"{_size(kv.bytes_per_token)} (2 x {m.num_hidden_layers} x "
            f"{m.num_key_value_heads} x {m.head_dim} x {kv.dtype_bytes} B), "
            f"{_size(kv.bytes_per_token_per_gpu)} per device",
        ),
        (
            "KV capacity",
            f"{kv.num_blocks:,} blocks x {kv.block_size} = {kv.tokens:,} tokens = "
            f"{kv.full_length_seqs} sequences of {plan.max_model_len}",
        ),
        (
            "KV demand",
            f"{req.max_num_seqs} x {plan.max_model_len} tokens = "
            f"{_gib(kv.demand_bytes)}"
            + (f" ({_gib(kv.demand_bytes_per_gpu)} per GPU)" if plan.tp > 1 else ""),
        ),
    ]
    if rl is not None:
        rows.append(
            (
                "roofline",
                f"ITL >= {rl.itl_ms_min:.2f} ms (1 stream); at batch "
                f"{rl.batch}: step >= {rl.step_ms_min:.2f} ms ({rl.bound}-bound), "
                f"<= {rl.tokens_per_s_max:,.0f} tok/s per replica",
            )
        )
    verdict = "FITS" if plan.fits else "DOES NOT FIT"
    rows.append(("verdict", f"{verdict}: {plan.reason}"))
    width = max(len(k) for k, _ in rows)
    lines = [f"device: {dev.detected}, as no --gpu was given\n"] if dev.detected else []
    lines += [f"{k.ljust(width)}  {v}" for k, v in rows]
    for title, items in (
        ("notes", list(plan.notes)),
        ("warnings", advice.warnings),
        ("recommendations", advice.recommendations),
    ):
        if items:
            lines.append(f"\n{title}:")
            lines += [f"  - {i}" for i in items]
    lines.append("\nserve command that fits:")
    lines.append(
        f"  {advice.serve_command}"
        if advice.serve_command
        else "  none on this hardware: add GPUs or use a smaller model"
    )
    if advice.serve_command and advice.serve_note:
        lines.append(f"  ({advice.serve_note})")
    return "\n".join(lines)
