"""The planner and the engine read a model the same way and pick the same dtypes."""

from __future__ import annotations

import pytest
import torch

from modelport.config import ModelConfig
from modelport.entrypoints.cli_plan import default_model_path
from modelport.loader import load_model_config, resolve_dtype, resolve_model
from modelport.planner import plan as planner
from modelport.planner.hardware import resolve_device
from modelport.planner.model_source import resolve_model as planner_resolve

_SHAPE = (
    "architecture",
    "vocab_size",
    "hidden_size",
    "num_hidden_layers",
    "num_attention_heads",
    "num_key_value_heads",
    "intermediate_size",
    "head_dim",
    "max_position_embeddings",
    "tie_word_embeddings",
    "attention_bias",
)


def test_default_gguf_config_matches_the_loaders():
    path = default_model_path()
    mine = planner_resolve(str(path)).config
    engine = load_model_config(resolve_model(str(path)))
    assert {f: getattr(mine, f) for f in _SHAPE} == {f: getattr(engine, f) for f in _SHAPE}


@pytest.mark.parametrize("ckpt", ["float32", "bfloat16", "float16"])
@pytest.mark.parametrize("asked", ["auto", "bf16", "fp16", "fp32", "float32", "half"])
def test_dtype_resolution_mirrors_the_loader(ckpt, asked):
    cfg = ModelConfig("LlamaForCausalLM", 10, 8, 1, 2, 1, 16, torch_dtype=ckpt)
    for gpu, device in (("cpu", "cpu"), ("h100", "cuda")):
        dev = resolve_device(gpu, memory_gib=1.0 if gpu == "cpu" else None)
        expected = resolve_dtype(asked, cfg, torch.device(device))
        assert planner.resolve_dtype(asked, dev, ckpt) == str(expected).removeprefix("torch.")


def test_engine_defaults_for_the_default_model_on_cpu_match_the_plan():
    from modelport.engine.arg_utils import EngineArgs
    from modelport.planner.plan import PlanRequest, make_plan

    path = str(default_model_path())
    engine = EngineArgs(model=path, device="cpu", kv_cache_memory=300 << 20).create_engine_config()
    plan = make_plan(
        PlanRequest(
            planner_resolve(path), resolve_device("cpu", memory_gib=8.0), kv_cache_memory=300 << 20
        )  # fmt: skip
    )
    assert plan.max_model_len == engine.scheduler_config.max_model_len
    assert plan.max_num_batched_tokens == engine.scheduler_config.max_num_batched_tokens
    assert plan.kv.block_size == engine.cache_config.block_size
    assert plan.dtype == engine.dtype
