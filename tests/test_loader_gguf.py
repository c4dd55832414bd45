"""Our GGUF loader on tiny llama.cpp-style files reproduces HF logits."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from helpers.tiny_models import TINY_PROMPT as PROMPT
from helpers.tiny_models import (
    hf_reference_logits,
    llama_cpp_permute,
    make_tiny_llama_dir,
    make_tiny_llama_gguf,
    make_tiny_qwen2_dir,
    run_one_sequence,
)
from modelport.config import LoadConfig
from modelport.loader import gguf_cache_folder, load_model, load_model_config, resolve_model
from modelport.loader.gguf import unpermute_qk


@pytest.fixture(scope="module")
def tiny_hf(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_llama_dir(tmp_path_factory.mktemp("tiny") / "hf", seed=3)


def _load(gguf_path: Path) -> torch.nn.Module:
    src = resolve_model(str(gguf_path))
    assert src.kind == "gguf" and src.name == gguf_path.stem
    cfg = load_model_config(src)
    return load_model(src, cfg, LoadConfig(), torch.float32, torch.device("cpu"))


def test_unpermute_inverts_llama_cpp_permutation() -> None:
    w = np.arange(4 * 16 * 3, dtype=np.float32).reshape(4 * 16, 3)
    permuted = llama_cpp_permute(w, 4)
    assert not np.array_equal(permuted, w)
    np.testing.assert_array_equal(unpermute_qk(permuted, 4), w)


def test_gguf_config_from_metadata(tiny_hf: Path, tmp_path: Path) -> None:
    path = make_tiny_llama_gguf(tiny_hf, tmp_path / "tiny.gguf", "F32")
    cfg = load_model_config(resolve_model(str(path)))
    hf_cfg = load_model_config(resolve_model(str(tiny_hf)))
    for field in (
        "architecture",
        "vocab_size",
        "hidden_size",
        "num_hidden_layers",
        "num_attention_heads",
        "num_key_value_heads",
        "intermediate_size",
        "head_dim",
        "rms_norm_eps",
        "rope_theta",
        "max_position_embeddings",
        "tie_word_embeddings",
        "bos_token_id",
        "eos_token_ids",
    ):
        assert getattr(cfg, field) == getattr(hf_cfg, field), field


def test_gguf_f32_is_exact(tiny_hf: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MODELPORT_CACHE", str(tmp_path / "cache"))
    path = make_tiny_llama_gguf(tiny_hf, tmp_path / "tiny-f32.gguf", "F32")
    logits = run_one_sequence(_load(path), PROMPT)
    torch.testing.assert_close(logits, hf_reference_logits(tiny_hf, PROMPT), atol=1e-5, rtol=1e-5)
    assert (gguf_cache_folder(path) / "model.safetensors").is_file()


def test_gguf_q8_0_is_close(tiny_hf: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MODELPORT_CACHE", str(tmp_path / "cache"))
    path = make_tiny_llama_gguf(tiny_hf, tmp_path / "tiny-q8.gguf", "Q8_0")
    logits = run_one_sequence(_load(path), PROMPT)
    ref = hf_reference_logits(tiny_hf, PROMPT)
    err = (logits - ref).abs().max().item()
    assert 0 < err < 0.1, err  # quantized: close but not identical
    assert (logits.argmax(-1) == ref.argmax(-1)).float().mean() > 0.9


def test_gguf_without_unpermute_would_be_wrong(
    tiny_hf: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Guards the test itself: the q/k permutation matters, so exactness above means it was undone."""
    import modelport.loader.gguf as gguf_loader

    monkeypatch.setenv("MODELPORT_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(gguf_loader, "unpermute_qk", lambda w, n: w)
    path = make_tiny_llama_gguf(tiny_hf, tmp_path / "tiny-f32.gguf", "F32")
    logits = run_one_sequence(_load(path), PROMPT)
    assert (logits - hf_reference_logits(tiny_hf, PROMPT)).abs().max() > 1e-3


def test_gguf_second_load_reads_the_cache(
    tiny_hf: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import modelport.loader as loader

    monkeypatch.setenv("MODELPORT_CACHE", str(tmp_path / "cache"))
    path = make_tiny_llama_gguf(tiny_hf, tmp_path / "tiny.gguf", "F32")
    first = run_one_sequence(_load(path), PROMPT[:20])

    def no_gguf(*a: object, **k: object) -> None:
        raise AssertionError("GGUF file read although the cache is warm")

    monkeypatch.setattr(loader, "_gguf_config_dict", no_gguf)
    monkeypatch.setattr(loader, "_write_gguf_cache", no_gguf)
    second = run_one_sequence(_load(path), PROMPT[:20])
    torch.testing.assert_close(first, second, atol=0, rtol=0)


def test_qwen2_gguf_with_bias_is_exact(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MODELPORT_CACHE", str(tmp_path / "cache"))
    hf_dir = make_tiny_qwen2_dir(tmp_path / "qwen2", tie_word_embeddings=True)
    path = make_tiny_llama_gguf(hf_dir, tmp_path / "qwen2.gguf", "F32")
    model = _load(path)
    assert model.config.architecture == "Qwen2ForCausalLM" and model.config.tie_word_embeddings
    assert model.config.rope_theta == 1000000.0
    logits = run_one_sequence(model, PROMPT[:30])
    torch.testing.assert_close(
        logits, hf_reference_logits(hf_dir, PROMPT[:30]), atol=1e-5, rtol=1e-5
    )


def test_llama31_rope_freqs_gguf(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Llama 3.1 GGUFs carry rope scaling as a rope_freqs tensor of per-frequency divisors."""
    from helpers.tiny_models import make_tiny_llama_dir

    monkeypatch.setenv("MODELPORT_CACHE", str(tmp_path / "cache"))
    scaling = {
        "rope_type": "llama3",
        "factor": 8.0,
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "original_max_position_embeddings": 32,
    }
    hf_dir = make_tiny_llama_dir(tmp_path / "l31", rope_scaling=scaling, rope_theta=500000.0)
    path = make_tiny_llama_gguf(hf_dir, tmp_path / "l31.gguf", "F32")
    model = _load(path)
    assert model.config.rope_scaling["rope_type"] == "freq_factors"
    logits = run_one_sequence(model, PROMPT)
    torch.testing.assert_close(logits, hf_reference_logits(hf_dir, PROMPT), atol=1e-4, rtol=1e-4)


def test_unwritable_cache_still_loads(
    tiny_hf: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from modelport.frontend.tokenizer import load_tokenizer

    blocker = tmp_path / "not-a-dir"
    blocker.write_text("a file where the cache folder should be")
    monkeypatch.setenv("MODELPORT_CACHE", str(blocker))
    path = make_tiny_llama_gguf(tiny_hf, tmp_path / "tiny.gguf", "F32")
    logits = run_one_sequence(_load(path), PROMPT[:10])
    torch.testing.assert_close(
        logits, hf_reference_logits(tiny_hf, PROMPT[:10]), atol=1e-5, rtol=1e-5
    )
    tok = load_tokenizer(resolve_model(str(path)))
    assert tok.encode("ok") == [111, 107]


_YARN = {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32}


@pytest.mark.parametrize("scaling", [
    {"rope_type": "linear", "factor": 2.0},
    _YARN,
    {**_YARN, "beta_fast": 16.0, "beta_slow": 2.0},
], ids=["linear", "yarn", "yarn-betas"])
def test_rope_scaling_metadata_gguf(scaling: dict, tmp_path: Path,
                                    monkeypatch: pytest.MonkeyPatch) -> None:
    """llama.cpp writes linear and YaRN scaling as rope.scaling.* keys (type, factor, original
    context length, betas): the model rotates as HF's does, past the original length."""
    monkeypatch.setenv("MODELPORT_CACHE", str(tmp_path / "cache"))
    hf_dir = make_tiny_llama_dir(tmp_path / "hf", seed=5, rope_scaling=scaling)
    model = _load(make_tiny_llama_gguf(hf_dir, tmp_path / "m.gguf", "F32"))
    assert model.config.rope_scaling["rope_type"] == scaling["rope_type"]
    assert len(PROMPT) > 2 * 32  # well past yarn's original length
    torch.testing.assert_close(run_one_sequence(model, PROMPT), hf_reference_logits(hf_dir, PROMPT),
                               atol=1e-4, rtol=1e-4)


def test_yarn_attn_factor_gguf_scales_the_magnitude(tmp_path: Path,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    """llama.cpp's yarn_attn_factor multiplies yarn's 0.1 ln(factor) + 1 magnitude: the same
    logits as HF's config with that product as attention_factor."""
    import math

    monkeypatch.setenv("MODELPORT_CACHE", str(tmp_path / "cache"))
    plain = make_tiny_llama_dir(tmp_path / "plain", seed=5, rope_scaling=_YARN)
    path = make_tiny_llama_gguf(plain, tmp_path / "m.gguf", "F32",
                                rope_keys={"yarn_attn_factor": 1.5})
    model = _load(path)
    expected = 1.5 * (0.1 * math.log(4.0) + 1.0)
    assert model.config.rope_scaling["attention_factor"] == pytest.approx(expected, rel=1e-6)
    hf_dir = make_tiny_llama_dir(tmp_path / "hf", seed=5,
                                 rope_scaling={**_YARN, "attention_factor": expected})
    torch.testing.assert_close(run_one_sequence(model, PROMPT), hf_reference_logits(hf_dir, PROMPT),
                               atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("keys,named", [
    ({"yarn_log_multiplier": 0.1}, "yarn_log_multiplier"),
    ({"yarn_ext_factor": 0.5}, "yarn_ext_factor"),
    ({"attn_factor": 2.0}, "attn_factor"),
])
def test_yarn_gguf_keys_without_an_hf_equivalent_are_refused(
    keys: dict, named: str, tiny_hf: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("MODELPORT_CACHE", str(tmp_path / "cache"))
    hf_dir = make_tiny_llama_dir(tmp_path / "hf", seed=5, rope_scaling=_YARN)
    path = make_tiny_llama_gguf(hf_dir, tmp_path / "m.gguf", "F32", rope_keys=keys)
    with pytest.raises(ValueError, match=f"m.gguf: GGUF yarn rope scaling with {named}"):
        load_model_config(resolve_model(str(path)))


def test_unknown_gguf_rope_scaling_is_named(tiny_hf: Path, tmp_path: Path) -> None:
    path = make_tiny_llama_gguf(tiny_hf, tmp_path / "m.gguf", "F32",
                                rope_keys={"type": "longrope", "factor": 2.0})
    with pytest.raises(ValueError, match="unsupported GGUF rope scaling 'longrope'"):
        load_model_config(resolve_model(str(path)))
