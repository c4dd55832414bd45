"""dtype resolution and dummy (random) weights from a config alone."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from helpers.tiny_models import make_tiny_llama_dir, run_one_sequence
from modelport.config import LoadConfig, ModelConfig
from modelport.loader import load_model, load_model_config, resolve_dtype, resolve_model

LLAMA_8B = ModelConfig(
    architecture="LlamaForCausalLM",
    vocab_size=128256,
    hidden_size=4096,
    num_hidden_layers=32,
    num_attention_heads=32,
    num_key_value_heads=8,
    intermediate_size=14336,
    torch_dtype="bfloat16",
)


def test_resolve_dtype() -> None:
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert resolve_dtype("auto", LLAMA_8B, cpu) == torch.float32
    assert resolve_dtype("auto", LLAMA_8B, cuda) == torch.bfloat16
    fp16 = ModelConfig(**{**LLAMA_8B.__dict__, "torch_dtype": "float16", "hf_config": {}})
    assert resolve_dtype("auto", fp16, cuda) == torch.float16
    fp32 = ModelConfig(**{**LLAMA_8B.__dict__, "torch_dtype": "float32", "hf_config": {}})
    assert resolve_dtype("auto", fp32, cuda) == torch.bfloat16
    assert resolve_dtype("half", LLAMA_8B, cpu) == torch.float16
    with pytest.raises(ValueError, match="unsupported dtype 'int3'"):
        resolve_dtype("int3", LLAMA_8B, cpu)


def test_dummy_weights_are_seeded_and_shaped(tmp_path: Path) -> None:
    path = make_tiny_llama_dir(tmp_path, with_tokenizer=False)
    src = resolve_model(str(path))
    cfg = load_model_config(src)

    def dummy(seed: int, dtype: torch.dtype = torch.float32) -> torch.nn.Module:
        return load_model(
            src, cfg, LoadConfig(load_format="dummy", seed=seed), dtype, torch.device("cpu")
        )

    a, b, c = dummy(1), dummy(1), dummy(2)
    wa = a.model.layers[0].self_attn.qkv_proj.weight
    assert torch.equal(wa, b.model.layers[0].self_attn.qkv_proj.weight)
    assert not torch.equal(wa, c.model.layers[0].self_attn.qkv_proj.weight)
    assert abs(wa.std().item() - 0.02) < 0.005
    assert torch.all(a.model.norm.weight == 1)
    logits = run_one_sequence(a, list(range(10)))
    assert logits.shape == (10, cfg.vocab_size) and torch.isfinite(logits).all()
    bf = dummy(1, torch.bfloat16)
    assert all(p.dtype == torch.bfloat16 for p in bf.parameters())


def test_llama_8b_shape_parameter_count() -> None:
    """Our module tree for the Llama-3.1-8B shape has exactly the expected parameters."""
    from modelport.models.registry import get_model_class

    with torch.device("meta"):
        model = get_model_class("LlamaForCausalLM")(LLAMA_8B)
    n = sum(p.numel() for p in model.parameters())
    assert n == LLAMA_8B.num_params
