"""Tensor parallelism over NCCL on two GPUs: the sharded model computes what one GPU does.

Run with `bash bench/gpu/run_all.sh tp2` on the device tool's nvidia-h200-x2 machine; skipped
with fewer than two CUDA devices (and everywhere without CUDA, like every `gpu` test).
"""

from __future__ import annotations

import pytest
import torch

from helpers.tiny_models import make_tiny_llama_dir, make_tiny_qwen2_dir
from modelport import LLM, SamplingParams

PROMPTS = [[256, 10, 20, 30], [256] + list(range(40, 77)), [256, 99]]

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA devices"),
]


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_tp2_on_nccl_greedy_equals_one_gpu(tmp_path, arch: str) -> None:
    """float32, so the two ranks' partial sums add up to the single GPU's result within
    rounding: every greedy token equals. Qwen2 adds the q/k/v biases, which only rank 0 of a
    row-parallel layer may add once."""
    make = make_tiny_llama_dir if arch == "llama" else make_tiny_qwen2_dir
    d = make(tmp_path / arch)
    greedy = SamplingParams(temperature=0, max_tokens=16, ignore_eos=True)
    kw = dict(device="cuda", dtype="float32", kv_cache_memory=32 << 20, block_size=16,
              max_num_batched_tokens=32)
    one = LLM(str(d), **kw)
    want = one.generate(prompt_token_ids=PROMPTS, sampling_params=greedy, use_tqdm=False)
    blocks_one = one.llm_engine.num_kv_blocks
    del one
    llm = LLM(str(d), tensor_parallel_size=2, **kw)
    try:
        got = llm.generate(prompt_token_ids=PROMPTS, sampling_params=greedy, use_tqdm=False)
        assert [o.outputs[0].token_ids for o in got] == [o.outputs[0].token_ids for o in want]
        assert llm.llm_engine.num_kv_blocks == 2 * blocks_one  # half the KV heads per rank
        # the engine keeps serving: a second round (prefix-cache hits) gives the same tokens
        again = llm.generate(prompt_token_ids=PROMPTS, sampling_params=greedy, use_tqdm=False)
        assert [o.outputs[0].token_ids for o in again] == [o.outputs[0].token_ids for o in want]
    finally:
        llm.llm_engine.core.shutdown()


@pytest.mark.parametrize("arch", ["mixtral", "qwen2_moe"])
def test_moe_tp2_on_nccl_equals_one_gpu(tmp_path, arch: str) -> None:
    """Mixture of experts: each GPU runs the Triton grouped GEMM over its slice of every
    expert (built and loaded as that slice) and the block all-reduces once (Qwen2-MoE: the
    shared expert's partial sum with it). float32 ("ieee" dots): the greedy tokens equal
    and the logprobs agree within rounding; bfloat16 TP2 runs too."""
    from helpers.tiny_moe import make_tiny_moe_dir

    d = make_tiny_moe_dir(tmp_path / arch, arch)
    params = SamplingParams(temperature=0, max_tokens=16, ignore_eos=True, logprobs=1)
    kw = dict(device="cuda", dtype="float32", kv_cache_memory=32 << 20, block_size=16,
              max_num_batched_tokens=32)
    one = LLM(str(d), **kw)
    want = one.generate(prompt_token_ids=PROMPTS, sampling_params=params, use_tqdm=False)
    del one
    llm = LLM(str(d), tensor_parallel_size=2, **kw)
    try:
        got = llm.generate(prompt_token_ids=PROMPTS, sampling_params=params, use_tqdm=False)
    finally:
        llm.llm_engine.core.shutdown()
    assert [o.outputs[0].token_ids for o in got] == [o.outputs[0].token_ids for o in want]
    for g, w in zip(got, want):
        for lg, lw in zip(g.outputs[0].logprobs, w.outputs[0].logprobs):
            for tok in lw:
                assert abs(lg[tok].logprob - lw[tok].logprob) < 1e-3
    bf16 = LLM(str(d), tensor_parallel_size=2, **{**kw, "dtype": "bfloat16"})
    try:
        out = bf16.generate(prompt_token_ids=PROMPTS, sampling_params=params, use_tqdm=False)
        assert all(len(o.outputs[0].token_ids) == 16 for o in out)
    finally:
        bf16.llm_engine.core.shutdown()


def test_lora_tp2_on_nccl_equals_one_gpu(tmp_path) -> None:
    """LoRA adapters under tensor parallelism on NCCL: rank 0 sends its slot changes with
    each LoRA step and every rank adds its part of each pair; a batch mixing two adapters
    and the base model gives one GPU's tokens (float32), and an evicted slot refilled with
    another adapter too."""
    from helpers.lora_adapters import make_adapter
    from modelport.lora.request import LoRARequest

    base = make_tiny_llama_dir(tmp_path / "base")
    a = LoRARequest("a", 1, str(tmp_path / "a"))
    b = LoRARequest("b", 2, str(tmp_path / "b"))
    make_adapter(tmp_path / "a", rank=8, alpha=16, seed=1)
    make_adapter(tmp_path / "b", rank=4, alpha=8, seed=2, targets=("q_proj", "down_proj"))
    greedy = SamplingParams(temperature=0, max_tokens=16, ignore_eos=True)
    kw = dict(device="cuda", dtype="float32", kv_cache_memory=32 << 20, block_size=16,
              max_num_batched_tokens=64, enable_lora=True, max_loras=1, max_lora_rank=8)
    loras = [a, None, b]

    def run(llm):
        return [o.outputs[0].token_ids for o in llm.generate(
            prompt_token_ids=PROMPTS, sampling_params=greedy, lora_request=loras,
            use_tqdm=False)]

    one = LLM(str(base), **kw)
    want = run(one)
    del one
    llm = LLM(str(base), tensor_parallel_size=2, **kw)
    try:
        assert run(llm) == want  # max_loras=1: a, then b in the same slot
        assert run(llm) == want  # and a back in it
    finally:
        llm.llm_engine.core.shutdown()
