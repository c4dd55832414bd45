"""GGUF files of Qwen3, Gemma 1/2/3, Phi-3, SmolLM3, StarCoder2 and the MoE families (Mixtral,
Qwen2-MoE, Qwen3-MoE) reproduce the HF checkpoint they were converted from.

Each tiny random HF model (hidden 64, 2-6 layers, the byte tokenizer's 259 ids) is written
as a llama.cpp-style GGUF (helpers/gguf_archs.py); F32 files must give HF's logits and
greedy tokens, Q8_0 files the dequantized reference's within quantization error.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from helpers.gguf_archs import write_gguf
from helpers.tiny_models import TINY_PROMPT, TINY_VOCAB, _save, load_cpu, run_one_sequence
from modelport import LLM, SamplingParams
from modelport.loader import load_model_config, resolve_model

COMMON = dict(vocab_size=TINY_VOCAB, hidden_size=64, num_attention_heads=4, num_key_value_heads=2,
              max_position_embeddings=256, rms_norm_eps=1e-6, bos_token_id=256, eos_token_id=257,
              pad_token_id=258, initializer_range=0.1)
WINDOW = 6
PROMPT = TINY_PROMPT[:40]  # > the window, > Phi-3's original length (its long factors)
ARCHS = ("qwen3", "gemma", "gemma2", "gemma3", "phi3", "mixtral", "qwen2_moe", "qwen3_moe",
         "smollm3", "starcoder2")
MOE = ("mixtral", "qwen2_moe", "qwen3_moe")
HF_ARCH = {"qwen3": "Qwen3ForCausalLM", "gemma": "GemmaForCausalLM",
           "gemma2": "Gemma2ForCausalLM", "gemma3": "Gemma3ForCausalLM",
           "phi3": "Phi3ForCausalLM", "mixtral": "MixtralForCausalLM",
           "qwen2_moe": "Qwen2MoeForCausalLM", "qwen3_moe": "Qwen3MoeForCausalLM",
           "smollm3": "SmolLM3ForCausalLM", "starcoder2": "Starcoder2ForCausalLM"}


def _hf_config(arch: str, **extra: Any) -> Any:
    import transformers as tf

    dense = dict(COMMON, intermediate_size=128)
    if arch == "smollm3":  # layer 3 is NoPE; q/k/v/o biases (permuted with q/k); untied head
        return tf.SmolLM3Config(num_hidden_layers=4, attention_bias=True,
                                tie_word_embeddings=False, **dense)
    if arch == "starcoder2":  # LayerNorm eps as norm_epsilon; biases everywhere; tied head
        dense.pop("rms_norm_eps")
        return tf.Starcoder2Config(num_hidden_layers=2, norm_epsilon=1e-5, use_bias=True,
                                   **{"sliding_window": None, **extra}, **dense)
    if arch == "qwen3":
        return tf.Qwen3Config(num_hidden_layers=2, head_dim=16, **dense)
    if arch == "gemma":
        return tf.GemmaConfig(num_hidden_layers=2, head_dim=16, **dense)
    if arch == "gemma2":  # small caps: the tanh bites on scores and logits
        return tf.Gemma2Config(num_hidden_layers=2, head_dim=16, sliding_window=WINDOW,
                               query_pre_attn_scalar=16, attn_logit_softcapping=1.5,
                               final_logit_softcapping=2.0, **dense)
    if arch == "gemma3":  # 6 layers: five windowed (local rope base), one global (scaled)
        rope = {"full_attention": {"rope_type": "linear", "factor": 2.0, "rope_theta": 1e6},
                "sliding_attention": {"rope_type": "default", "rope_theta": 1e4}}
        return tf.Gemma3TextConfig(num_hidden_layers=6, head_dim=16, sliding_window=WINDOW,
                                   query_pre_attn_scalar=16, final_logit_softcapping=3.0,
                                   rope_parameters=rope, **dense)
    if arch == "phi3":  # LongRoPE: the factors travel as rope_factors_long/short tensors
        rope = {"type": "longrope", "short_factor": [1.0 + 0.1 * i for i in range(8)],
                "long_factor": [1.0 + 0.7 * i for i in range(8)]}
        return tf.Phi3Config(num_hidden_layers=2, original_max_position_embeddings=32,
                             rope_scaling=rope, **{**dense, "rms_norm_eps": 1e-5})
    moe = dict(COMMON, num_experts_per_tok=2, num_hidden_layers=2)
    if arch == "mixtral":
        return tf.MixtralConfig(intermediate_size=64, num_local_experts=4, **moe)
    if arch == "qwen2_moe":  # layer 1 dense, a shared expert on layer 0
        return tf.Qwen2MoeConfig(intermediate_size=128, moe_intermediate_size=64,
                                 shared_expert_intermediate_size=96, num_experts=4,
                                 mlp_only_layers=[1], **moe)
    return tf.Qwen3MoeConfig(intermediate_size=128, moe_intermediate_size=64, num_experts=4,
                             head_dim=16, norm_topk_prob=True, **moe)


def _make_hf(path: Path, arch: str, **extra: Any) -> Path:
    from transformers import AutoModelForCausalLM

    torch.manual_seed(2)
    model = AutoModelForCausalLM.from_config(_hf_config(arch, **extra),
                                             attn_implementation="eager")
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:  # away from the 0 / 1 init: a missed norm (or +1) shows
                p.add_(torch.randn_like(p) * 0.3)
            elif name.endswith((".gate.weight", "shared_expert_gate.weight")):
                p.mul_(20.0)  # decisive routing: no near-ties for rounding to flip
            elif name.endswith(("_proj.bias", "c_fc.bias")):
                p.normal_(0.0, 0.05)
    return _save(model.eval(), path, with_tokenizer=True)


@pytest.fixture(scope="module", params=ARCHS)
def case(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
         ) -> tuple[str, Path, Path]:
    root = tmp_path_factory.mktemp(request.param)
    hf_dir = _make_hf(root / "hf", request.param)
    return request.param, hf_dir, write_gguf(hf_dir, root / f"{request.param}-f32.gguf")


@pytest.fixture(autouse=True)
def _cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MODELPORT_CACHE", str(tmp_path / "cache"))


def _hf_model(hf_dir: Path) -> Any:
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32, local_files_only=True,
                                                attn_implementation="eager").eval()


def _hf_logits(hf_dir: Path, ids: list[int]) -> torch.Tensor:
    with torch.no_grad():
        return _hf_model(hf_dir)(torch.tensor([ids])).logits[0].float()


def test_f32_gguf_config_and_logits_match_hf(case: tuple[str, Path, Path]) -> None:
    arch, hf_dir, path = case
    cfg = load_model_config(resolve_model(str(path)))
    hf_cfg = load_model_config(resolve_model(str(hf_dir)))
    assert cfg.architecture == HF_ARCH[arch]
    for field in ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads",
                  "num_key_value_heads", "head_dim", "rms_norm_eps", "tie_word_embeddings"):
        assert getattr(cfg, field) == getattr(hf_cfg, field), field
    model = load_cpu(path, "none")
    ours = run_one_sequence(model, PROMPT, block_size=4)
    torch.testing.assert_close(ours, _hf_logits(hf_dir, PROMPT), atol=1e-4, rtol=1e-4)


def test_f32_gguf_greedy_through_llm_matches_hf_generate(case: tuple[str, Path, Path]) -> None:
    arch, hf_dir, path = case
    prompts = [TINY_PROMPT[:20], [5, 9, 200]]
    # Phi-3: HF uses the short LongRoPE factors below 32 tokens; so does a model this short
    extra = {"max_model_len": 32} if arch == "phi3" else {}
    llm = LLM(str(path), kv_cache_memory=8 << 20, block_size=8, max_num_batched_tokens=16,
              **extra)
    params = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)
    got = [list(o.outputs[0].token_ids) for o in
           llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)]
    hf = _hf_model(hf_dir)
    want = []
    with torch.no_grad():
        for p in prompts:
            ids = torch.tensor([p])
            out = hf.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False,
                              max_new_tokens=8, min_new_tokens=8, pad_token_id=258)
            want.append(out[0, len(p):].tolist())
    assert got == want


def _q8_0_round_trip(hf_dir: Path, out: Path) -> Path:
    """The HF checkpoint with each tensor the writer stores as Q8_0 replaced by its
    dequantized blocks: the exact reference for a Q8_0 file."""
    import gguf
    from safetensors.numpy import load_file, save_file

    tensors = load_file(str(hf_dir / "model.safetensors"))
    q8 = gguf.GGMLQuantizationType.Q8_0
    for name, t in tensors.items():
        if t.ndim >= 2 and not name.endswith((".gate.weight", "shared_expert_gate.weight")):
            t32 = np.ascontiguousarray(t.astype(np.float32))
            tensors[name] = gguf.quants.dequantize(gguf.quants.quantize(t32, q8), q8)
    out.mkdir()
    for f in hf_dir.iterdir():
        if f.name != "model.safetensors":
            (out / f.name).write_bytes(f.read_bytes())
    save_file(tensors, str(out / "model.safetensors"), metadata={"format": "pt"})
    return out


def test_q8_0_gguf_matches_the_dequantized_reference(
    case: tuple[str, Path, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
) -> None:
    from modelport.layers.fused_moe import GateLinear
    from modelport.layers.linear import Linear
    from modelport.quantization import loading as quant_loading

    arch, hf_dir, _ = case
    path = write_gguf(hf_dir, tmp_path / f"{arch}-q8.gguf", "Q8_0")
    ref = _hf_logits(_q8_0_round_trip(hf_dir, tmp_path / "deq"), PROMPT)
    floats = run_one_sequence(load_cpu(path, "none"), PROMPT)  # every block dequantized
    torch.testing.assert_close(floats, ref, atol=1e-4, rtol=1e-4)
    assert (floats - _hf_logits(hf_dir, PROMPT)).abs().max() > 1e-4  # Q8_0 really rounded
    monkeypatch.setattr(quant_loading, "NARROW_CPU_LM_HEAD", False)
    model = load_cpu(path, "gguf")  # the linear layers stay in Q8_0 blocks (GroupQuant kernels)
    kept = [m for m in model.modules() if hasattr(m, "qkernel")]
    if arch in MOE:  # each expert's gate/up and down too; routers stay F32, as in the file
        linear = [m for m in model.modules()
                  if isinstance(m, Linear) and not isinstance(m, GateLinear)]
        assert len(kept) == len(linear) > 4 * model.config.num_hidden_layers
    else:
        assert len(kept) == 4 * model.config.num_hidden_layers  # qkv, o, gate_up, down
    assert all(set(m.gguf_types) == {"Q8_0"} for m in kept)
    got = run_one_sequence(model, PROMPT)
    assert (got.argmax(-1) == floats.argmax(-1)).float().mean() > 0.9
    # the int8 kernel: bf16 activations, each weight row requantized to 8 bits (MoE routers,
    # x 20 in these models, amplify that rounding: tests/test_moe_quantized.py checks them)
    if arch not in MOE:
        assert (got - floats).abs().max().item() < 0.06 * floats.abs().max().item()


def test_gemma_norms_are_stored_plus_one(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Guards the test itself: without undoing llama.cpp's +1 the logits are wrong."""
    import modelport.loader.gguf as loader_gguf

    hf_dir = _make_hf(tmp_path / "hf", "gemma")
    path = write_gguf(hf_dir, tmp_path / "g.gguf")
    from gguf import GGUFReader

    stored = next(t for t in GGUFReader(str(path)).tensors if t.name == "blk.0.attn_norm.weight")
    hf_norm = _hf_model(hf_dir).model.layers[0].input_layernorm.weight.detach().numpy()
    np.testing.assert_allclose(np.asarray(stored.data), hf_norm + 1, rtol=1e-6)
    monkeypatch.setattr(loader_gguf, "fix_tensor", lambda arch, stem, w: w)
    logits = run_one_sequence(load_cpu(path, "none"), PROMPT)
    assert (logits - _hf_logits(hf_dir, PROMPT)).abs().max() > 1e-2


@pytest.mark.parametrize("expert_sizes", [True, False], ids=["keys", "from-shapes"])
def test_qwen2_moe_gguf_config_fields(tmp_path: Path, expert_sizes: bool) -> None:
    hf_dir = _make_hf(tmp_path / "hf", "qwen2_moe")
    path = write_gguf(hf_dir, tmp_path / "m.gguf", expert_sizes=expert_sizes)
    cfg = load_model_config(resolve_model(str(path)))
    want = json.loads((hf_dir / "config.json").read_text())
    for key in ("num_experts", "num_experts_per_tok", "moe_intermediate_size",
                "shared_expert_intermediate_size", "mlp_only_layers", "norm_topk_prob"):
        assert cfg.hf_config[key] == want[key], key


def test_mixtral_gguf_with_one_tensor_per_expert(tmp_path: Path) -> None:
    """Early Mixtral conversions store blk.N.ffn_gate.E.weight instead of stacked experts."""
    from gguf import GGUFReader

    hf_dir = _make_hf(tmp_path / "hf", "mixtral")
    path = write_gguf(hf_dir, tmp_path / "m.gguf", legacy_experts=True)
    names = {t.name for t in GGUFReader(str(path)).tensors}
    assert "blk.1.ffn_down.3.weight" in names and not any("_exps" in n for n in names)
    logits = run_one_sequence(load_cpu(path, "none"), PROMPT)
    torch.testing.assert_close(logits, _hf_logits(hf_dir, PROMPT), atol=1e-4, rtol=1e-4)


def test_unsupported_gguf_architecture_names_the_supported_ones(tmp_path: Path) -> None:
    import gguf

    path = tmp_path / "falcon.gguf"
    w = gguf.GGUFWriter(str(path), arch="falcon")
    w.add_block_count(1)
    w.add_tensor("token_embd.weight", np.zeros((4, 8), dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    with pytest.raises(ValueError, match=r"unsupported GGUF architecture 'falcon'; supported: "
                                         r"llama, qwen2, qwen3, gemma, gemma2, gemma3, phi3, "
                                         r"qwen2moe, qwen3moe"):
        load_model_config(resolve_model(str(path)))


def test_smollm3_gguf_nope_layers_and_permuted_biases(tmp_path: Path) -> None:
    """No key stores SmolLM3's NoPE layers (llama.cpp: every 4th); the converter permutes the
    q/k biases with the weights, and loading them unpermuted would change the logits."""
    from gguf import GGUFReader

    import modelport.loader.gguf as loader_gguf

    hf_dir = _make_hf(tmp_path / "hf", "smollm3")
    path = write_gguf(hf_dir, tmp_path / "s.gguf")
    cfg = load_model_config(resolve_model(str(path)))
    assert cfg.hf_config["no_rope_layers"] == [1, 1, 1, 0] == json.loads(
        (hf_dir / "config.json").read_text())["no_rope_layers"]
    assert cfg.attention_bias and not cfg.tie_word_embeddings
    bias = _hf_model(hf_dir).model.layers[0].self_attn.q_proj.bias.detach().numpy()
    stored = next(t for t in GGUFReader(str(path)).tensors if t.name == "blk.0.attn_q.bias")
    assert not np.allclose(np.asarray(stored.data), bias)  # really permuted in the file
    real = loader_gguf.unpermute_qk
    with pytest.MonkeyPatch.context() as mp:  # biases left as stored: wrong
        mp.setattr(loader_gguf, "unpermute_qk",
                   lambda w, n: w if w.ndim == 1 else real(w, n))
        logits = run_one_sequence(load_cpu(path, "none"), PROMPT)
    assert (logits - _hf_logits(hf_dir, PROMPT)).abs().max() > 1e-3


def test_starcoder2_gguf_sliding_window_only_where_the_file_has_one(tmp_path: Path) -> None:
    """llama.cpp's converter writes no window for StarCoder2 (llama.cpp runs none); a file
    that carries starcoder2.attention.sliding_window gets HF's windowed attention."""
    hf_dir = _make_hf(tmp_path / "hf", "starcoder2", sliding_window=WINDOW)
    plain = load_model_config(resolve_model(str(write_gguf(hf_dir, tmp_path / "a.gguf"))))
    assert plain.hf_config["sliding_window"] is None
    assert plain.hf_config["use_bias"] and plain.hf_config["norm_epsilon"] == 1e-5
    path = write_gguf(hf_dir, tmp_path / "w.gguf",
                      extra_uint32={"attention.sliding_window": WINDOW})
    assert load_model_config(resolve_model(str(path))).hf_config["sliding_window"] == WINDOW
    logits = run_one_sequence(load_cpu(path, "none"), PROMPT)  # 40 tokens > the window
    torch.testing.assert_close(logits, _hf_logits(hf_dir, PROMPT), atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("arch,key,value,match", [
    ("smollm3", "expert_count", 4, r"smollm3\.expert_count describes a smollm3 variant"),
    ("smollm3", "no_rope_layer_interval", 3,
     r"smollm3\.no_rope_layer_interval describes a smollm3 variant this loader does not know"),
    ("starcoder2", "rope.dimension_count", 8,  # partial rotary
     r"starcoder2\.rope\.dimension_count=8 differs from the head size 16"),
    ("starcoder2", "attention.sliding_window_pattern", 2,
     r"starcoder2\.attention\.sliding_window_pattern describes a starcoder2 variant"),
])
def test_unknown_smollm3_starcoder2_variant_key_is_refused(
    tmp_path: Path, arch: str, key: str, value: int, match: str,
) -> None:
    from modelport.planner.errors import PlanError
    from modelport.planner.model_source import resolve_model as plan_model

    hf_dir = _make_hf(tmp_path / "hf", arch)
    path = write_gguf(hf_dir, tmp_path / "v.gguf", extra_uint32={key: value})
    with pytest.raises(ValueError, match=match):
        load_model_config(resolve_model(str(path)))
    with pytest.raises(PlanError, match=match):
        plan_model(str(path))
