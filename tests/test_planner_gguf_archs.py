"""`modelport plan` on GGUF files of Qwen3, Gemma 1/2/3, Phi-3, SmolLM3, StarCoder2 and the MoE
families (Mixtral, Qwen2-MoE, Qwen3-MoE): parameters and bytes from the file's tensors, KV cache from its
head_dim / KV heads, sliding-window layers noted, MoE files planned dequantized as they load.

Each tiny random HF model is written as a llama.cpp-style Q8_0 GGUF (helpers/gguf_archs.py)
and the plan is checked against the HF model's parameters and the loaded model's bytes.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from helpers.gguf_archs import write_gguf
from helpers.tiny_models import TINY_VOCAB, _save, load_cpu
from modelport.entrypoints.cli import main
from modelport.planner.errors import PlanError
from modelport.planner.hardware import resolve_device
from modelport.planner.model_source import resolve_model
from modelport.planner.plan import PlanRequest, make_plan

COMMON = dict(vocab_size=TINY_VOCAB, hidden_size=64, num_attention_heads=4, num_key_value_heads=2,
              max_position_embeddings=256, rms_norm_eps=1e-6, bos_token_id=256, eos_token_id=257,
              pad_token_id=258)
# head_dim 32 (not hidden / heads = 16) where the family allows it: the KV cache must follow
# the file's attention.key_length
HF_ARCH = {"qwen3": "Qwen3ForCausalLM", "gemma": "GemmaForCausalLM",
           "gemma2": "Gemma2ForCausalLM", "gemma3": "Gemma3ForCausalLM",
           "phi3": "Phi3ForCausalLM", "mixtral": "MixtralForCausalLM",
           "qwen2_moe": "Qwen2MoeForCausalLM", "qwen3_moe": "Qwen3MoeForCausalLM",
           "smollm3": "SmolLM3ForCausalLM", "starcoder2": "Starcoder2ForCausalLM"}
MOE = ("mixtral", "qwen2_moe", "qwen3_moe")


def _hf_config(arch: str) -> Any:
    import transformers as tf

    dense = dict(COMMON, intermediate_size=128, num_hidden_layers=2)
    moe = dict(COMMON, num_experts_per_tok=2, num_hidden_layers=2)
    return {
        "qwen3": lambda: tf.Qwen3Config(head_dim=32, **dense),
        "gemma": lambda: tf.GemmaConfig(head_dim=32, **dense),
        "gemma2": lambda: tf.Gemma2Config(head_dim=32, sliding_window=8,
                                          query_pre_attn_scalar=32, **dense),
        "gemma3": lambda: tf.Gemma3TextConfig(
            head_dim=32, sliding_window=8, query_pre_attn_scalar=32,
            **{**dense, "num_hidden_layers": 6}),  # five windowed layers, one global
        "phi3": lambda: tf.Phi3Config(**dense),
        "smollm3": lambda: tf.SmolLM3Config(attention_bias=True, tie_word_embeddings=False,
                                            **{**dense, "num_hidden_layers": 4}),
        "starcoder2": lambda: tf.Starcoder2Config(
            norm_epsilon=1e-5, use_bias=True,
            **{k: v for k, v in dense.items() if k != "rms_norm_eps"}),
        "mixtral": lambda: tf.MixtralConfig(intermediate_size=64, num_local_experts=4,
                                            head_dim=32, **moe),
        "qwen2_moe": lambda: tf.Qwen2MoeConfig(
            intermediate_size=128, moe_intermediate_size=64, shared_expert_intermediate_size=96,
            num_experts=4, mlp_only_layers=[1], **moe),
        "qwen3_moe": lambda: tf.Qwen3MoeConfig(intermediate_size=128, moe_intermediate_size=64,
                                               num_experts=6, head_dim=32, **moe),
    }[arch]()


Case = tuple[str, int, Any, Path]  # (family, real parameter count, HF config, Q8_0 GGUF)


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> Any:
    """family -> Case, each file written once per module."""
    from transformers import AutoModelForCausalLM

    made: dict[str, Case] = {}

    def get(arch: str) -> Case:
        if arch not in made:
            root = tmp_path_factory.mktemp(arch)
            torch.manual_seed(0)
            model = AutoModelForCausalLM.from_config(_hf_config(arch)).eval()
            real = sum(p.numel() for p in model.parameters())  # a tied head counts once
            hf_dir = _save(model, root / "hf", with_tokenizer=False)
            made[arch] = (arch, real, model.config,
                          write_gguf(hf_dir, root / f"{arch}-q8_0.gguf", "Q8_0"))
        return made[arch]

    return get


def _file_tensor_bytes(path: Path) -> int:
    from gguf import GGUFReader

    return sum(int(t.n_bytes) for t in GGUFReader(str(path)).tensors)


def _held_bytes(module: torch.nn.Module) -> int:
    """Bytes of the weights a loaded model holds (the rotary tables are no weights)."""
    seen, held = set(), 0
    buffers = [b for n, b in module.named_buffers() if "cos_sin" not in n and "inv_freq" not in n]
    for t in [*module.parameters(), *buffers]:
        if t.data_ptr() not in seen:
            seen.add(t.data_ptr())
            held += t.numel() * t.element_size()
    return held


@pytest.mark.parametrize("arch", list(HF_ARCH))
def test_new_gguf_architectures_are_planned_from_their_tensors(arch: str, files) -> None:
    arch, real, hf_cfg, path = files(arch)
    src = resolve_model(str(path))
    cfg = src.config
    assert src.kind == "gguf" and src.quantization == "gguf-q8_0"
    assert cfg.architecture == HF_ARCH[arch]
    assert src.num_params == real == cfg.num_params  # every expert, norm and bias
    head_dim = getattr(hf_cfg, "head_dim", None) or 64 // 4
    assert cfg.head_dim == head_dim and cfg.num_key_value_heads == 2
    plan = make_plan(PlanRequest(src, resolve_device("h100"), max_model_len=256, max_num_seqs=4))
    assert plan.weights.num_params == real
    assert plan.weights.total_bytes == _file_tensor_bytes(path)
    assert plan.weights.source.startswith("measured")
    # on a GPU the loader dequantizes the file to bf16: 2 bytes per weight it holds
    assert not plan.request.keeps_quantized
    assert plan.resident_per_gpu == 2 * real
    # KV: K and V of every layer, the file's KV heads x key_length, bf16
    assert plan.kv.bytes_per_token == 2 * cfg.num_hidden_layers * 2 * head_dim * 2
    assert plan.fits


@pytest.mark.parametrize("arch", MOE)
def test_moe_gguf_keeps_its_experts_on_cpu_and_dequantizes_on_a_gpu(arch: str, files) -> None:
    arch, real, _, path = files(arch)
    src = resolve_model(str(path))
    cpu = resolve_device("cpu", memory_gib=4)
    plan = make_plan(PlanRequest(src, cpu, max_model_len=256, max_num_seqs=2,
                                 quantization="gguf"))
    # a Q8_0 file keeps its blocks on CPU, experts included
    assert src.gguf_moe and src.gguf_cpu_keepable and plan.request.keeps_quantized
    assert plan.resident_per_gpu == _held_bytes(load_cpu(path, "gguf")) < 4 * real
    assert not any("mixture-of-experts" in n for n in plan.notes)
    gpu = resolve_device("h100")  # quantized experts run on CPU only: a GPU dequantizes
    plan = make_plan(PlanRequest(src, gpu, max_model_len=256, max_num_seqs=2))
    assert not plan.request.keeps_quantized and plan.resident_per_gpu == 2 * real
    assert any("mixture-of-experts GGUF" in n and "dequantized to bfloat16" in n
               for n in plan.notes)
    with pytest.raises(PlanError, match=r"--quantization: gguf cannot keep .* on .*GPU"):
        make_plan(PlanRequest(src, gpu, max_model_len=256, quantization="gguf"))


@pytest.mark.parametrize("q8_cpu", [None, "rows"])
@pytest.mark.parametrize("arch", list(HF_ARCH))
def test_cpu_plan_holds_what_the_engine_loads(arch: str, q8_cpu: str | None, files,
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    """On an x86 CPU a Q8_0 file keeps its blocks (the engine's default, as for llama; MoE
    experts too): the plan's resident bytes are what the loader really holds, to the byte,
    with the Q8_0 block kernel (the default: int8 codes + fp16 scale per 32) and with
    MODELPORT_Q8_CPU=rows (int8 requantized per row + a bf16 scale per row)."""
    monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: "AVX512")
    if q8_cpu is not None:
        monkeypatch.setenv("MODELPORT_Q8_CPU", q8_cpu)
    else:
        monkeypatch.delenv("MODELPORT_Q8_CPU", raising=False)
    arch, real, _, path = files(arch)
    src = resolve_model(str(path))
    plan = make_plan(PlanRequest(src, resolve_device("cpu", memory_gib=4), max_model_len=256,
                                 max_num_seqs=2))
    assert plan.request.keeps_quantized
    assert plan.resident_per_gpu == _held_bytes(load_cpu(path, None)) < 4 * real
    assert not any("mixture-of-experts" in n for n in plan.notes)


@pytest.mark.parametrize("arch,sliding", [("gemma2", 1), ("gemma3", 5)])
def test_sliding_window_layers_are_noted(arch: str, sliding: int, files) -> None:
    _, _, hf_cfg, path = files(arch)
    plan = make_plan(PlanRequest(resolve_model(str(path)), resolve_device("h100"),
                                 max_model_len=256, max_num_seqs=4))
    n = hf_cfg.num_hidden_layers
    assert [x for x in plan.notes if "sliding window" in x] == [
        f"{sliding} of {n} layers attend through a 8-token sliding window; their KV cache is "
        "sized as full attention (with full-attention layers beside them, the engine keeps "
        "every layer's blocks for the whole sequence)"]
    # still sized as full attention: every layer's K and V for every token
    assert plan.kv.bytes_per_token == 2 * n * 2 * 32 * 2


def test_cli_plans_moe_gguf_kept_on_cpu_and_dequantized_on_a_gpu(files, capsys) -> None:
    _, real, _, path = files("qwen2_moe")
    cpu = ["plan", "--model", str(path), "--gpu", "cpu", "--memory", "4", "--max-model-len", "128"]
    assert main([*cpu, "--json"]) == 0
    d = json.loads(capsys.readouterr().out)
    assert d["model"]["architecture"] == "Qwen2MoeForCausalLM"
    assert d["model"]["num_params"] == real
    assert d["weights"]["resident_per_gpu_bytes"] < 2 * real  # Q8_0 blocks: ~1 byte a weight
    assert not any("mixture-of-experts" in n for n in d["notes"])
    gpu = ["plan", "--model", str(path), "--gpu", "h100-80gb", "--max-model-len", "128"]
    assert main(gpu) == 0
    text = capsys.readouterr().out
    assert "notes:" in text and "every expert counted" in text and "dequantized" in text
    assert "--quantization gguf" not in text  # no advice the engine would refuse
    assert main([*gpu, "--quantization", "gguf"]) != 0
    assert "mixture-of-experts GGUF files keep their blocks on CPU only" in capsys.readouterr().err


def test_unknown_gguf_architecture_is_refused_naming_the_supported(tmp_path: Path) -> None:
    import gguf

    w = gguf.GGUFWriter(str(tmp_path / "x.gguf"), arch="mamba")
    w.add_tensor("token_embd.weight", np.zeros((4, 32), np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    with pytest.raises(PlanError, match=r"'mamba' is not supported .*gemma3.*phi3.*qwen3moe"):
        resolve_model(str(tmp_path / "x.gguf"))


@pytest.mark.parametrize("arch", ["smollm3", "starcoder2"])
def test_cli_plans_smollm3_and_starcoder2_gguf(arch: str, files, capsys) -> None:
    _, real, _, path = files(arch)
    argv = ["plan", "--model", str(path), "--gpu", "cpu", "--memory", "4",
            "--max-model-len", "128", "--json"]
    assert main(argv) == 0
    d = json.loads(capsys.readouterr().out)
    assert d["model"]["architecture"] == HF_ARCH[arch]
    assert d["model"]["num_params"] == real
    assert d["weights"]["resident_per_gpu_bytes"] < 4 * real  # Q8_0 blocks kept, not fp32
