"""Roofline bounds for decode: a step must at least stream every resident weight byte and the
KV of every running sequence from memory, and do 2 FLOPs per weight per token.

These are bounds, not predictions: real kernels reach maybe 60-80% of peak bandwidth, so
measured inter-token latency is above itl_ms_min and measured throughput below the cap. For the
Llama-3.1-8B shape on an H200 (bf16, bench/README.md) the bound says ITL >= 3.35 ms and a
batch-256 step at 2048 context >= 10.5 ms; the engine measured 4.92 ms and 11.7 ms GPU-busy.
"""

from __future__ import annotations

from dataclasses import dataclass

from modelport.config import ModelConfig
from modelport.models.moe_config import active_params


@dataclass(frozen=True)
class Roofline:
    itl_ms_min: float  # one sequence, context 0: weights / bandwidth (per rank, ranks in parallel)
    batch: int  # decode batch that fits: min(max_num_seqs, full-length sequences in the KV)
    step_ms_min: float  # one decode step at that batch, KV at half max_model_len on average
    bound: str  # "memory" or "compute" at that batch
    tokens_per_s_max: float  # one replica: batch / step
    tokens_per_s_max_all: float  # every data-parallel replica


def roofline(
    model: ModelConfig,
    *,
    weights_per_gpu: int,
    kv_bytes_per_token_per_gpu: int,
    bandwidth_bytes_s: float,
    flops: float,
    tp: int,
    replicas: int,
    batch: int,
    max_model_len: int,
) -> Roofline | None:
    """None when no sequence fits (there is nothing to bound)."""
    if batch <= 0 or bandwidth_bytes_s <= 0 or flops <= 0:
        return None
    itl = weights_per_gpu / bandwidth_bytes_s
    ctx = max_model_len / 2  # sequences sweep 0..max_model_len over their lifetime
    step_bytes = weights_per_gpu + batch * ctx * kv_bytes_per_token_per_gpu
    q_dim = model.num_attention_heads * model.head_dim
    attn_flops = 4 * ctx * q_dim * model.num_hidden_layers  # QK^T and PV per token
    step_flops = batch * (2 * active_params(model) + attn_flops) / tp  # MoE: top-k experts
    mem_s, compute_s = step_bytes / bandwidth_bytes_s, step_flops / flops
    step = max(mem_s, compute_s)
    tps = batch / step
    return Roofline(
        itl_ms_min=itl * 1e3,
        batch=batch,
        step_ms_min=step * 1e3,
        bound="memory" if mem_s >= compute_s else "compute",
        tokens_per_s_max=tps,
        tokens_per_s_max_all=tps * replicas,
    )
