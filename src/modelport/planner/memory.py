"""Memory budget and KV-cache capacity, computed the way the engine computes them.

CPU: the KV cache gets exactly `kv_cache_memory` bytes (1 GiB by default), as in the runner.
CUDA: gpu_memory_utilization x device memory, minus the peak the profiling forward reaches
(weights + buffers + activations) and memory outside torch's allocator. The planner cannot run
that forward, so it models it on what the runner does:

  buffers      the rotary cos/sin table of max_position_embeddings x head_dim in the compute
               dtype, one for the whole model (every layer shares it; Gemma 3's sliding
               layers have a second): 32 MiB for Llama-3.1-8B's 131072 positions.
  activations  the larger of the forward's peak and the sampler's, which run one after the
               other (the runner drops the forward's activations before it samples):
               forward: max_num_batched_tokens x (2 x hidden + 3 x intermediate / tp) x
               act_bytes (residual stream, gate/up projections and their product at the MLP
               peak) + min(heads / tp x tokens^2, DUMMY_ATTENTION_SCORES) x 3 x act_bytes: the
               scores, masked scores and probabilities of one query chunk of the causal
               attention the profile forward runs without a KV cache;
               sampler: rows x vocab x (act_bytes + SAMPLER_ROW_BYTES) + min(rows,
               SAMPLER_ROWS) x vocab x SAMPLER_SLICE_BYTES, rows = min(max_num_seqs, tokens):
               the logits and the sampler the profile runs at its widest (float32 logits,
               log-softmax and scaled copies of every row; top-k / top-p sort values and int64
               order, masks, softmax and cumulative sums of one slice of rows).
  non-torch    0.65 GiB: CUDA context, cuBLAS workspace and loaded kernels; +0.5 GiB of NCCL
               buffers when tp > 1.
CUDA graphs are captured after the KV cache is sized, inside the (1 - utilization) headroom,
so they take nothing from the budget. Checked on an H200 against the engine itself (dummy bf16
weights, tests/test_planner_gpu.py): planned KV blocks were 0.05% (Llama-3.1-8B, 8192 x 256,
0.9), 0.21% (4096 x 64, 0.8), 0.08% (Qwen2.5-7B), 0.63% (Mistral-7B, 4096-token steps) and
0.08% (16384 x 32, 1024-token steps) above what the engine allocated (session 21). Session 37
found the planner 1.4 / 1.3 / 2.0 % below the engine (8192 x 256 and 4096 x 64 at 2,048-token
steps, 8192 x 256 at 16,384): it still counted a rotary table per layer, which the models
had come to share, and added the forward's and the sampler's peaks.

The KV arithmetic itself is modelport.config's, shared with the engine, never re-derived.
"""

from __future__ import annotations

from dataclasses import dataclass

from modelport.config import (
    DEFAULT_CPU_KV_CACHE_MEMORY,
    DUMMY_ATTENTION_SCORES,
    GEMMA3_ARCHITECTURES,
    SAMPLER_ROWS,
    ModelConfig,
    cpu_kv_cache_space,
    kv_cache_bytes_per_token,
    num_kv_blocks,
)
from modelport.planner.hardware import GIB, Device

NON_TORCH_BYTES = int(0.65 * GIB)
# bytes a logit the profiling forward's sampler holds at its peak (runner/sampler.py, top-k /
# top-p with logprobs), read off its code: for every row the float32 logits, their
# log-softmax and the temperature-scaled copy; for the slice of at most SAMPLER_ROWS rows
# being filtered the sorted copy, the int64 order, the bool mask, softmax, cumulative sums,
# the masked and scattered copies (42 in all while one slice held every row)
SAMPLER_ROW_BYTES = 12
SAMPLER_SLICE_BYTES = 30
NCCL_BYTES = GIB // 2


def buffer_bytes(model: ModelConfig, act_bytes: int, max_model_len: int = 0) -> int:
    """Non-parameter tensors the model holds: its rotary table (models/*.py build one and
    share it across layers; Gemma 3 builds two, the sliding layers' base frequency apart),
    of max_position_embeddings rows, or max_model_len where rope scaling reaches further."""
    tables = 2 if model.architecture in GEMMA3_ARCHITECTURES else 1
    positions = max(model.max_position_embeddings, max_model_len)
    return tables * positions * model.head_dim * act_bytes


def activation_peak_bytes(
    model: ModelConfig, act_bytes: int, tp: int, max_num_batched_tokens: int, max_num_seqs: int
) -> int:
    """Estimated peak activation memory of the engine's profiling forward on one rank."""
    t = max_num_batched_tokens
    h, inter = model.hidden_size, model.intermediate_size
    per_token = (2 * h + 3 * inter // tp) * act_bytes
    # scores, their masked copy and the softmax of one query chunk (its rows bounded)
    attention = min(model.num_attention_heads // tp * t * t, DUMMY_ATTENTION_SCORES) * 3 * act_bytes
    rows = min(max_num_seqs, t)
    sampler = (rows * (act_bytes + SAMPLER_ROW_BYTES)
               + min(rows, SAMPLER_ROWS) * SAMPLER_SLICE_BYTES) * model.vocab_size
    return max(t * per_token + attention, sampler)


@dataclass(frozen=True)
class MemoryBudget:
    """Where one device's memory goes; kv_bytes may be negative (nothing left for KV)."""

    device_bytes: int
    usable_bytes: int  # gpu_memory_utilization x device (CPU: the whole RAM)
    weights_bytes: int
    buffer_bytes: int
    activation_bytes: int
    non_torch_bytes: int
    kv_bytes: int
    kv_from_flag: bool  # CPU: the KV budget is --kv-cache-memory, not what is left over

    @property
    def room_for_kv_bytes(self) -> int:
        """Memory left once weights, buffers and activations are in."""
        used = self.weights_bytes + self.buffer_bytes + self.activation_bytes
        return self.usable_bytes - used

    @property
    def ram_left_bytes(self) -> int:
        """CPU: RAM left after weights, buffers, activations and the fixed KV cache."""
        return self.room_for_kv_bytes - max(self.kv_bytes, 0)


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
    max_model_len: int = 0,
) -> MemoryBudget:
    act = activation_peak_bytes(model, act_bytes, tp, max_num_batched_tokens, max_num_seqs)
    buffers = buffer_bytes(model, act_bytes, max_model_len)
    if device.is_cpu:
        # as the engine sizes it (EngineArgs: VLLM_CPU_KVCACHE_SPACE without kv_cache_memory)
        kv = kv_cache_memory or cpu_kv_cache_space() or DEFAULT_CPU_KV_CACHE_MEMORY
        mem = device.memory_bytes
        return MemoryBudget(mem, mem, weights_per_gpu, buffers, act, 0, kv, True)
    usable = int(device.memory_bytes * gpu_memory_utilization)
    non_torch = NON_TORCH_BYTES + (NCCL_BYTES if tp > 1 else 0)
    kv = usable - weights_per_gpu - buffers - act - non_torch
    return MemoryBudget(
        device.memory_bytes, usable, weights_per_gpu, buffers, act, non_torch, kv, False
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
