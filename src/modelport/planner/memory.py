"""Memory budget and KV-cache capacity, computed the way the engine computes them.

CPU: the KV cache gets exactly `kv_cache_memory` bytes (1 GiB by default), as in the runner.
CUDA: gpu_memory_utilization x device memory, minus what the profiling forward leaves in use
(weights + peak activations) and memory outside torch's allocator (CUDA context, cuBLAS,
NCCL). The planner cannot run that forward, so it estimates it:

  activations  max_num_batched_tokens x (2 x hidden + 3 x intermediate / tp) x act_bytes
               (residual stream, gate/up projections and their product at the MLP peak)
               + min(max_num_seqs, tokens) x vocab x (act_bytes + 4) for the logits and their
               fp32 upcast in the sampler. Checked against a profiling forward of the
               Llama-3.1-8B shape on an H200: 0.34 GiB measured vs 0.38 GiB estimated at 2048
               tokens, 0.94 vs 0.96 GiB at 8192.
  non-torch    0.5 GiB (a bare CUDA context took 0.51 GiB on that H200), +0.5 GiB for NCCL
               buffers when tp > 1.
  graphs       0.25 GiB for CUDA-graph pools and allocator slack, 0 with --enforce-eager.

The KV arithmetic itself is modelport.config's, shared with the engine, never re-derived.
"""

from __future__ import annotations

from dataclasses import dataclass

from modelport.config import (
    DEFAULT_CPU_KV_CACHE_MEMORY,
    ModelConfig,
    kv_cache_bytes_per_token,
    num_kv_blocks,
)
from modelport.planner.hardware import GIB, Device

NON_TORCH_BYTES = GIB // 2
NCCL_BYTES = GIB // 2
GRAPH_RESERVE_BYTES = GIB // 4


def activation_peak_bytes(
    model: ModelConfig, act_bytes: int, tp: int, max_num_batched_tokens: int, max_num_seqs: int
) -> int:
    """Estimated peak activation memory of the engine's profiling forward on one rank."""
    h, inter = model.hidden_size, model.intermediate_size
    per_token = (2 * h + 3 * inter // tp) * act_bytes
    rows = min(max_num_seqs, max_num_batched_tokens)
    logits = rows * model.vocab_size * (act_bytes + 4)
    return max_num_batched_tokens * per_token + logits


@dataclass(frozen=True)
class MemoryBudget:
    """Where one device's memory goes; kv_bytes may be negative (nothing left for KV)."""

    device_bytes: int
    usable_bytes: int  # gpu_memory_utilization x device (CPU: the whole RAM)
    weights_bytes: int
    activation_bytes: int
    non_torch_bytes: int
    graph_reserve_bytes: int
    kv_bytes: int
    kv_from_flag: bool  # CPU: the KV budget is --kv-cache-memory, not what is left over

    @property
    def ram_left_bytes(self) -> int:
        """CPU: RAM left after weights, activations and the fixed KV cache."""
        used = self.weights_bytes + self.activation_bytes + max(self.kv_bytes, 0)
        return self.usable_bytes - used


def memory_budget(
    device: Device,
    model: ModelConfig,
    weights_per_gpu: int,
    *,
    act_bytes: int,
    tp: int,
    gpu_memory_utilization: float,
    max_num_batched_tokens: int,
    max_num_seqs: int,
    kv_cache_memory: int | None,
    enforce_eager: bool,
) -> MemoryBudget:
    act = activation_peak_bytes(model, act_bytes, tp, max_num_batched_tokens, max_num_seqs)
    if device.is_cpu:
        kv = kv_cache_memory or DEFAULT_CPU_KV_CACHE_MEMORY
        return MemoryBudget(
            device.memory_bytes, device.memory_bytes, weights_per_gpu, act, 0, 0, kv, True
        )
    usable = int(device.memory_bytes * gpu_memory_utilization)
    non_torch = NON_TORCH_BYTES + (NCCL_BYTES if tp > 1 else 0)
    graphs = 0 if enforce_eager else GRAPH_RESERVE_BYTES
    kv = usable - weights_per_gpu - act - non_torch - graphs
    return MemoryBudget(
        device.memory_bytes, usable, weights_per_gpu, act, non_torch, graphs, kv, False
    )


@dataclass(frozen=True)
class KVCapacity:
    """What the engine would allocate, and what the requested workload would need."""

    dtype: str
    dtype_bytes: int
    bytes_per_token: int  # whole model (2 x layers x kv_heads x head_dim x bytes)
    bytes_per_token_per_gpu: int
    block_size: int
    num_blocks: int  # exactly config.num_kv_blocks(...)
    tokens: int  # num_blocks x block_size
    blocks_per_seq: int  # ceil(max_model_len / block_size)
    full_length_seqs: int  # sequences of max_model_len that fit at once
    demand_bytes_per_gpu: int  # max_num_seqs full-length sequences
    demand_bytes: int  # the same summed over the TP group

    @property
    def holds_one_sequence(self) -> bool:
        """The engine refuses to start unless one max_model_len request fits."""
        return self.num_blocks >= self.blocks_per_seq


def kv_capacity(
    model: ModelConfig,
    budget_bytes: int,
    *,
    kv_dtype: str,
    kv_dtype_bytes: int,
    tp: int,
    block_size: int,
    max_model_len: int,
    max_num_seqs: int,
) -> KVCapacity:
    per_gpu = kv_cache_bytes_per_token(model, kv_dtype_bytes, tp)
    blocks = num_kv_blocks(max(budget_bytes, 0), model, block_size, kv_dtype_bytes, tp)
    per_seq = -(-max_model_len // block_size)
    demand = max_num_seqs * per_seq * block_size * per_gpu
    return KVCapacity(
        dtype=kv_dtype,
        dtype_bytes=kv_dtype_bytes,
        bytes_per_token=kv_cache_bytes_per_token(model, kv_dtype_bytes, 1),
        bytes_per_token_per_gpu=per_gpu,
        block_size=block_size,
        num_blocks=blocks,
        tokens=blocks * block_size,
        blocks_per_seq=per_seq,
        full_length_seqs=blocks // per_seq,
        demand_bytes_per_gpu=demand,
        demand_bytes=demand * tp,
    )
