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
