"""Our Llama/Qwen2 forward over the paged KV cache equals HF transformers' logits."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from helpers.tiny_models import (
    TINY_PROMPT,
    hf_reference_logits,
    make_tiny_llama_dir,
    make_tiny_qwen2_dir,
    run_one_sequence,
)
from modelport.config import LoadConfig
from modelport.layers.attention import (
    ForwardContext,
    build_single_sequence_metadata,
    forward_context,
)
from modelport.layers.rotary import compute_inv_freq, rope_settings
from modelport.loader import load_model, load_model_config, resolve_model
from modelport.models.registry import SUPPORTED_ARCHITECTURES, get_model_class

LLAMA3_SCALING = {
    "rope_type": "llama3",
    "factor": 8.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    "original_max_position_embeddings": 32,
}
PROMPT = TINY_PROMPT  # 70 tokens: longer than the llama3 original context


def load(path: Path) -> torch.nn.Module:
    src = resolve_model(str(path))
    cfg = load_model_config(src)
    return load_model(src, cfg, LoadConfig(), torch.float32, torch.device("cpu"))


@pytest.mark.parametrize(
    "variant, kw",
    [
        ("untied", {}),
        ("tied", {"tie_word_embeddings": True}),
        ("llama3-rope", {"rope_scaling": LLAMA3_SCALING, "rope_theta": 500000.0}),
    ],
)
def test_llama_matches_hf(tmp_path: Path, variant: str, kw: dict) -> None:
    path = make_tiny_llama_dir(tmp_path / variant, **kw)
    model = load(path)
    logits = run_one_sequence(model, PROMPT)
    assert logits.dtype == torch.float32
    torch.testing.assert_close(logits, hf_reference_logits(path, PROMPT), atol=1e-4, rtol=1e-4)
    if variant == "tied":
        assert model.lm_head.weight is model.model.embed_tokens.weight


def test_llama3_scaling_changes_frequencies(tmp_path: Path) -> None:
    path = make_tiny_llama_dir(tmp_path, rope_scaling=LLAMA3_SCALING, rope_theta=500000.0)
    cfg = load_model_config(resolve_model(str(path)))
    settings = rope_settings(cfg)
    assert settings.theta == 500000.0 and settings.scaling["rope_type"] == "llama3"
    scaled = compute_inv_freq(cfg.head_dim, settings)
    plain = compute_inv_freq(cfg.head_dim, type(settings)(settings.theta, None, 512))
    assert not torch.equal(scaled, plain)
    assert torch.equal(scaled[0], plain[0])  # the highest frequency is never scaled


def test_qwen2_matches_hf_with_qkv_bias(tmp_path: Path) -> None:
    path = make_tiny_qwen2_dir(tmp_path / "qwen2")
    model = load(path)
    attn = model.model.layers[0].self_attn
    assert attn.qkv_proj.bias is not None and attn.o_proj.bias is None
    assert attn.qkv_proj.bias.abs().sum() > 0
    logits = run_one_sequence(model, PROMPT[:40])
    torch.testing.assert_close(logits, hf_reference_logits(path, PROMPT[:40]), atol=1e-4, rtol=1e-4)


def test_chunked_forward_matches_full(tmp_path: Path) -> None:
    """Prefill in two chunks through the paged cache gives the same last logits."""
    path = make_tiny_llama_dir(tmp_path)
    model = load(path)
    cfg, bs, t, split = model.config, 8, 37, 21
    full = run_one_sequence(model, PROMPT[:t], block_size=bs)
    kv = [
        torch.zeros(2, 8, bs, cfg.num_key_value_heads, cfg.head_dim)
        for _ in range(cfg.num_hidden_layers)
    ]
    blocks = torch.tensor([[5, 2, 7, 0, 3]], dtype=torch.int32)  # scattered, out of order
    outs = []
    for start, end in ((0, split), (split, t)):
        pos = torch.arange(start, end)
        slots = blocks[0, pos // bs].long() * bs + pos % bs
        meta = build_single_sequence_metadata(end, bs)
        meta.slot_mapping = slots
        meta.block_tables = blocks
        meta.query_start_loc = torch.tensor([0, end - start], dtype=torch.int32)
        meta.query_start_loc_cpu = [0, end - start]
        meta.max_query_len = end - start
        with torch.no_grad(), forward_context(ForwardContext(meta, kv)):
            outs.append(model.compute_logits(model(torch.tensor(PROMPT[start:end]), pos)))
    torch.testing.assert_close(torch.cat(outs), full, atol=1e-5, rtol=1e-5)


def test_registry_is_lazy_and_lists_supported() -> None:
    assert {"LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM"} <= set(
        SUPPORTED_ARCHITECTURES
    )
    assert get_model_class("Qwen2ForCausalLM").__name__ == "Qwen2ForCausalLM"
    with pytest.raises(ValueError, match="supported: LlamaForCausalLM"):
        get_model_class("GPT2LMHeadModel")


def test_mistral_uses_llama_and_its_sliding_window(tmp_path: Path) -> None:
    import json

    path = make_tiny_llama_dir(tmp_path, with_tokenizer=False)
    cfg = json.loads((path / "config.json").read_text())
    cfg["architectures"] = ["MistralForCausalLM"]
    (path / "config.json").write_text(json.dumps(cfg))
    model = load(path)
    assert type(model).__name__ == "MistralForCausalLM"
    torch.testing.assert_close(
        run_one_sequence(model, PROMPT[:20]),
        hf_reference_logits(path, PROMPT[:20]),
        atol=1e-4,
        rtol=1e-4,
    )
    # a window is honoured on every layer (logits vs HF: tests/test_models_gemma.py)
    cfg["sliding_window"] = 64
    (path / "config.json").write_text(json.dumps(cfg))
    assert [m.self_attn.attn.sliding_window for m in load(path).model.layers] == [64, 64]
    cfg["sliding_window"] = 0
    (path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="sliding_window must be a positive integer"):
        load(path)


@pytest.mark.parametrize("blocks", [[5, 2, 7, 0, 3], [2, 3, 4, 5, 6]], ids=["scattered", "consecutive"])
def test_cpu_fast_decode_paths_are_bitwise_equal(tmp_path: Path, monkeypatch, blocks) -> None:
    """layers/cpu_fast.py's paths (fused rms_norm, joint q/k rotary, batch-1 decode attention
    reading consecutive blocks in place) give the same bits as the plain code. (The module
    tree's paths: the C step, which a float32 Llama takes too, is off here; it is checked
    against the module path in test_cpu_kernels_more.py.)"""
    from modelport.layers import cpu_fast, cpu_kernels

    monkeypatch.setattr(cpu_kernels, "ENABLED", False)
    model = load(make_tiny_llama_dir(tmp_path))
    cfg, bs, t = model.config, 8, 30
    table = torch.tensor([blocks], dtype=torch.int32)
    logits = {}
    for enabled in (False, True):
        monkeypatch.setattr(cpu_fast, "ENABLED", enabled)
        kv = [torch.zeros(2, 8, bs, cfg.num_key_value_heads, cfg.head_dim)
              for _ in range(cfg.num_hidden_layers)]
        outs = []
        for start, end in [(0, 20)] + [(p, p + 1) for p in range(20, t)]:
            pos = torch.arange(start, end)
            meta = build_single_sequence_metadata(end, bs)
            meta.slot_mapping = table[0, pos // bs].long() * bs + pos % bs
            meta.block_tables = table
            meta.query_start_loc = torch.tensor([0, end - start], dtype=torch.int32)
            meta.query_start_loc_cpu = [0, end - start]
            meta.max_query_len = end - start
            with torch.no_grad(), forward_context(ForwardContext(meta, kv)):
                outs.append(model.compute_logits(model(torch.tensor(PROMPT[start:end]), pos)))
        logits[enabled] = torch.cat(outs)
    assert torch.equal(logits[False], logits[True])
