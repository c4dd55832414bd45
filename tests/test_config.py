import pytest

from modelport.config import (
    CacheConfig,
    ModelConfig,
    SchedulerConfig,
    kv_cache_bytes_per_token,
    num_kv_blocks,
)

LLAMA_8B = {
    "architectures": ["LlamaForCausalLM"],
    "vocab_size": 128256,
    "hidden_size": 4096,
    "num_hidden_layers": 32,
    "num_attention_heads": 32,
    "num_key_value_heads": 8,
    "intermediate_size": 14336,
}


def test_seed_kv_bytes_per_token_llama_8b_bf16() -> None:
    cfg = ModelConfig.from_hf_dict(LLAMA_8B)
    assert cfg.head_dim == 128
    assert kv_cache_bytes_per_token(cfg, 2) == 128 * 1024
    assert kv_cache_bytes_per_token(cfg, 2, tensor_parallel_size=2) == 64 * 1024


def test_num_kv_blocks_floor() -> None:
    cfg = ModelConfig.from_hf_dict(LLAMA_8B)
    per_block = 16 * 128 * 1024
    assert num_kv_blocks(10 * per_block + 5, cfg, 16, 2) == 10


def test_config_validation_names_field() -> None:
    with pytest.raises(ValueError, match="block_size"):
        CacheConfig(block_size=12)
    with pytest.raises(ValueError, match="gpu_memory_utilization"):
        CacheConfig(gpu_memory_utilization=1.5)
    with pytest.raises(ValueError, match="max_num_seqs"):
        SchedulerConfig(max_num_seqs=0)
    with pytest.raises(ValueError, match="missing required fields: hidden_size"):
        ModelConfig.from_hf_dict({"architectures": ["X"], "vocab_size": 1,
                                  "num_hidden_layers": 1, "num_attention_heads": 1})


def test_transformers5_rope_parameters_are_read() -> None:
    d = dict(LLAMA_8B)
    d["rope_parameters"] = {"rope_theta": 500000.0, "rope_type": "llama3", "factor": 8.0,
                            "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                            "original_max_position_embeddings": 8192}
    cfg = ModelConfig.from_hf_dict(d)
    assert cfg.rope_theta == 500000.0
    assert cfg.rope_scaling is not None and cfg.rope_scaling["rope_type"] == "llama3"
    assert cfg.rope_scaling["factor"] == 8.0
