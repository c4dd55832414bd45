"""Planner arithmetic: the seed's figures, presets, quantized sizes, parallelism, verdicts."""

from __future__ import annotations

import pytest

from modelport.config import ModelConfig, num_kv_blocks
from modelport.planner.errors import PlanError
from modelport.planner.hardware import resolve_device
from modelport.planner.model_source import resolve_model
from modelport.planner.parallel import valid_tp_degrees
from modelport.planner.plan import PlanRequest, make_plan
from modelport.planner.presets import find_model_preset
from modelport.planner.weights import WeightFormat, estimate_weights

GIB = 2**30


def _plan(model: str = "llama-3.1-8b", gpu: str = "h100-80gb", **kw):
    dev_kw = {k: kw.pop(k) for k in ("memory_gib",) if k in kw}
    return make_plan(PlanRequest(resolve_model(model), resolve_device(gpu, **dev_kw), **kw))


def _config(name: str) -> ModelConfig:
    return ModelConfig.from_hf_dict(find_model_preset(name)[1])


def test_llama_8b_bf16_kv_is_128_kib_per_token():
    p = _plan(dtype="bf16", max_model_len=8192)
    assert p.kv.bytes_per_token == 128 * 1024
    assert p.kv.bytes_per_token_per_gpu == 128 * 1024


def test_seed_case_256_x_8192_needs_256_gib_and_does_not_fit_one_h100():
    p = _plan(dtype="bf16", max_model_len=8192, max_num_seqs=256)
    assert p.kv.demand_bytes == 256 * GIB
    assert not p.fits
    assert p.engine_starts  # it starts, but far fewer than 256 full sequences fit at once
    assert 0 < p.kv.full_length_seqs < 256
    assert "256.0 GiB" in p.reason
    # under TP the demand per GPU shrinks with the KV heads each rank owns
    p4 = _plan(dtype="bf16", max_model_len=8192, max_num_seqs=256, num_gpus=4)
    assert p4.kv.demand_bytes_per_gpu == 64 * GIB
    assert p4.kv.demand_bytes == 256 * GIB


def test_kv_capacity_is_the_shared_engine_formula_on_the_budget():
    p = _plan(dtype="bf16", max_model_len=8192)
    cfg = _config("llama-3.1-8b")
    assert p.kv.num_blocks == num_kv_blocks(p.budget.kv_bytes, cfg, 16, 2, 1)
    assert p.kv.tokens == p.kv.num_blocks * 16
    assert p.kv.full_length_seqs == p.kv.num_blocks // (8192 // 16)
    # the budget itself: utilization x memory - weights - activations - reserves
    b = p.budget
    assert b.kv_bytes == (
        b.usable_bytes - b.weights_bytes - b.buffer_bytes - b.activation_bytes - b.non_torch_bytes
    )
    assert b.usable_bytes == int(0.9 * b.device_bytes)


@pytest.mark.parametrize(
    ("name", "billions"),
    [  # published parameter counts of the checkpoints
        ("llama-3.1-8b", 8.03),
        ("llama-3.1-70b", 70.55),
        ("llama-3.1-405b", 405.85),
        ("qwen2.5-7b", 7.62),
        ("qwen2.5-72b", 72.71),
        ("mistral-7b", 7.25),
        ("smollm2-135m", 0.1345),
    ],
)
def test_presets_match_published_parameter_counts(name, billions):
    w = estimate_weights(_config(name), WeightFormat("bf16"))
    assert w.num_params / 1e9 == pytest.approx(billions, rel=0.005)
    assert w.total_bytes == 2 * w.num_params


def test_awq_and_gptq_count_scales_zeros_and_g_idx():
    cfg = _config("llama-3.1-8b")
    awq = estimate_weights(cfg, WeightFormat("bf16", "awq"))
    gptq = estimate_weights(cfg, WeightFormat("bf16", "gptq"))
    # 4 bits + an fp16 scale and a 4-bit zero per 128 weights (all widths divide 128)
    assert awq.linear_bits_per_weight == pytest.approx(4 + 16 / 128 + 4 / 128)
    assert gptq.linear_bits_per_weight > awq.linear_bits_per_weight  # + int32 g_idx per input
    fp8 = estimate_weights(cfg, WeightFormat("bf16", "fp8"))
    # one byte per weight + an fp32 scale per output channel (32 bits over 4096..14336 inputs)
    assert 8.0 + 32 / 14336 < fp8.linear_bits_per_weight < 8.0 + 32 / 4096


def test_gguf_q4_k_m_estimate_matches_published_llama_8b_file():
    # Meta-Llama-3.1-8B-Instruct-Q4_K_M.gguf as published by llama.cpp users: 4.92 GB
    w = estimate_weights(_config("llama-3.1-8b"), WeightFormat("bf16", "gguf-q4_k_m"))
    assert w.total_bytes / 4.92e9 == pytest.approx(1.0, abs=0.02)
    # the mix llama.cpp reports when it loads that file: f32 65, q4_K 193, q6_K 33 tensors
    assert w.storage == {"F32": 65, "Q4_K": 193, "Q6_K": 33}


def test_tp_must_divide_heads_and_kv_heads():
    assert valid_tp_degrees(_config("llama-3.1-8b")) == [1, 2, 4, 8]
    assert valid_tp_degrees(_config("smollm2-135m")) == [1, 3]
    with pytest.raises(PlanError) as e:
        _plan(num_gpus=3)
    assert e.value.flag == "--num-gpus"
    assert "32 attention heads" in e.value.message and "1, 2, 4, 8" in e.value.message
    with pytest.raises(PlanError) as e:
        _plan(num_gpus=4, tensor_parallel_size=3)
    assert e.value.flag == "--tensor-parallel-size"


def test_tp_shards_weights_and_data_parallel_replicas():
    p1 = _plan(dtype="bf16", max_model_len=8192)
    p2 = _plan(dtype="bf16", max_model_len=8192, num_gpus=8, tensor_parallel_size=2)
    assert p2.tp == 2 and p2.replicas == 4
    # the layers split in two; the embedding and the untied LM head stay whole on each rank
    tables = 2 * 128256 * 4096 * 2
    assert p2.weights.per_gpu_bytes == pytest.approx(
        (p1.weights.per_gpu_bytes - tables) / 2 + tables, rel=1e-3)
    assert p2.kv.bytes_per_token_per_gpu == 64 * 1024
    assert p2.roofline.tokens_per_s_max_all == pytest.approx(4 * p2.roofline.tokens_per_s_max)


def test_405b_bf16_does_not_fit_on_8_h100_but_fp8_does_on_8_h200():
    p = _plan("llama-3.1-405b", num_gpus=8, max_model_len=8192, max_num_seqs=16)
    assert not p.weights_fit and not p.fits
    p = _plan(
        "llama-3.1-405b",
        "h200",
        num_gpus=8,
        max_model_len=8192,
        max_num_seqs=16,
        quantization="fp8",
    )
    assert p.fits


def test_roofline_itl_is_weights_over_bandwidth():
    p = _plan(dtype="bf16", max_model_len=8192, max_num_seqs=32)
    assert p.roofline.itl_ms_min == pytest.approx(p.resident_per_gpu / 3.35e12 * 1e3)
    assert p.roofline.batch == 32
    # more sequences per step: a higher throughput cap but a slower step
    p1 = _plan(dtype="bf16", max_model_len=8192, max_num_seqs=1)
    assert p.roofline.tokens_per_s_max > 10 * p1.roofline.tokens_per_s_max
    assert p.roofline.step_ms_min > p1.roofline.step_ms_min


def test_no_kv_room_when_weights_exceed_the_gpu():
    p = _plan("llama-3.1-70b", "l4", dtype="bf16", max_model_len=4096)
    assert not p.weights_fit and not p.engine_starts and p.budget.kv_bytes < 0
    assert p.kv.num_blocks == 0 and p.roofline is None


def test_cpu_budget_is_kv_cache_memory_and_ram_is_checked():
    p = _plan("smollm2-135m", "cpu", memory_gib=8, kv_cache_memory=256 << 20)
    assert p.dtype == "float32" and p.kv.dtype_bytes == 4  # what the CPU engine runs
    assert p.budget.kv_bytes == 256 << 20
    assert p.kv.tokens == num_kv_blocks(256 << 20, _config("smollm2-135m"), 16, 4) * 16
    small = _plan("smollm2-135m", "cpu", memory_gib=0.5, kv_cache_memory=1 << 30)
    assert not small.weights_fit and "RAM" in small.reason


def test_request_validation_names_the_flag():
    cases = {
        "--max-num-seqs": {"max_num_seqs": -4},
        "--max-model-len": {"max_model_len": 10**7},
        "--gpu-memory-utilization": {"gpu_memory_utilization": 1.5},
        "--block-size": {"block_size": 12},
        "--dtype": {"dtype": "int3"},
        "--quantization": {"quantization": "magic"},
    }
    for flag, kw in cases.items():
        with pytest.raises(PlanError) as e:
            _plan(**kw)
        assert e.value.flag == flag
