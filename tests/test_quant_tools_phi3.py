"""`modelport quantize` on Phi-3, whose checkpoints store qkv_proj and gate_up_proj fused:
AWQ / GPTQ / FP8 write those tensors whole (one packed tensor over the concatenated output
rows, grouped along the input), the loader runs them, and perplexity and logits stay within
the bounds tests/test_quant_tools.py holds Llama to. MoE models are refused."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from helpers.tiny_models import TINY_VOCAB, _save, run_one_sequence
from helpers.tiny_models import load_cpu_fp32 as _load
from helpers.tiny_models import sequence_nll as _nll
from modelport import LLM, SamplingParams
from modelport.entrypoints.cli import main as cli_main
from modelport.quantization.tools.quantize import QuantizeOptions, quantize_model

TEXT = Path(__file__).parent / "data" / "quant_eval.txt"
H, HEADS, INTER = 64, 4, 128
QKV = 3 * H  # Phi-3-mini is multi-head: q, k and v rows of 64 each


@pytest.fixture(scope="module")
def phi3(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from transformers import Phi3Config, Phi3ForCausalLM

    torch.manual_seed(11)
    cfg = Phi3Config(vocab_size=TINY_VOCAB, hidden_size=H, num_hidden_layers=2,
                     num_attention_heads=HEADS, num_key_value_heads=HEADS,
                     intermediate_size=INTER, max_position_embeddings=512, rms_norm_eps=1e-5,
                     bos_token_id=256, eos_token_id=257, pad_token_id=258,
                     initializer_range=0.05)
    return _save(Phi3ForCausalLM(cfg).eval(), tmp_path_factory.mktemp("phi3") / "hf", True)


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm()).item()


def _tensors(folder: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(folder / "model.safetensors"))


# the fused tensors each method writes: name suffix -> shape (K input, N outputs, group 32,
# p codes per int32): AWQ packs along the outputs, GPTQ along the inputs
LAYOUT = {
    "awq": lambda k, n, p: {"qweight": (k, n // p), "qzeros": (k // 32, n // p),
                            "scales": (k // 32, n)},
    "gptq": lambda k, n, p: {"qweight": (k // p, n), "qzeros": (k // 32, n // p),
                             "scales": (k // 32, n), "g_idx": (k,)},
    "fp8": lambda k, n, p: {"weight": (n, k), "weight_scale": (n, 1)},  # compressed-tensors
}


# same methods, rises and logit bounds as test_quant_tools.test_quantize_then_load_round_trip
@pytest.mark.parametrize("method,bits,max_rise,sequential",
                         [("gptq", 8, 0.02, True), ("fp8", 8, 0.02, True),
                          ("awq", 4, 0.10, True), ("gptq", 4, 0.10, True),
                          ("gptq", 4, 0.10, False)])
def test_phi3_quantize_then_load_round_trip(phi3: Path, tmp_path: Path, method: str, bits: int,
                                            max_rise: float, sequential: bool) -> None:
    opts = QuantizeOptions(method=method, bits=bits, group_size=32, num_samples=4, seq_len=128,
                           zero_point=method == "awq", desc_act=method == "gptq",
                           sequential=sequential)
    report = quantize_model(str(phi3), tmp_path / "q", TEXT, opts, progress=False)
    assert json.loads((report.output / "config.json").read_text())[
        "quantization_config"]["quant_method"] == ("compressed-tensors" if method == "fp8"
                                                   else method)
    # the fused projections are quantized whole, under their own names
    assert sorted(report.layer_errors) == sorted(
        f"model.layers.{i}.{m}.weight" for i in range(2)
        for m in ("self_attn.qkv_proj", "self_attn.o_proj", "mlp.gate_up_proj", "mlp.down_proj"))
    assert max(report.layer_errors.values()) < 0.2
    saved = _tensors(report.output)
    assert not any("q_proj" in n or "gate_proj." in n for n in saved)
    layout = LAYOUT[method]
    for name, (k, n) in {"self_attn.qkv_proj": (H, QKV), "mlp.gate_up_proj": (H, 2 * INTER),
                         "mlp.down_proj": (INTER, H)}.items():
        for part, shape in layout(k, n, 32 // bits).items():
            if part == "g_idx" and not opts.desc_act:
                continue
            assert tuple(saved[f"model.layers.0.{name}.{part}"].shape) == shape, (name, part)
    ids = list(TEXT.read_bytes()[:384])
    ppl_float, ppl_q = (torch.tensor(_nll(p, ids)).exp().item() for p in (phi3, report.output))
    assert abs(ppl_q / ppl_float - 1) < max_rise, (ppl_float, ppl_q)
    bound = {("gptq", 8): 0.02, ("fp8", 8): 0.1, ("gptq", 4): 0.12, ("awq", 4): 0.3}
    logits_float, logits_q = (run_one_sequence(_load(p), ids[:128]) for p in (phi3, report.output))
    assert _rel(logits_q, logits_float) < bound[method, bits]


def test_phi3_awq_folds_o_and_down_scales_into_fused_rows(phi3: Path, tmp_path: Path) -> None:
    """AWQ's o_proj scales fold into qkv_proj's v rows and down_proj's into gate_up_proj's up
    rows: the float function of the scaled checkpoint is the original's."""
    from modelport.quantization.tools.awq_algo import apply_awq_scales, fused_scale_groups
    from modelport.quantization.tools.calib import make_windows
    from modelport.quantization.tools.capture import collect_stats

    weights = {n: t.float() for n, t in _tensors(phi3).items()}
    windows = make_windows([list(TEXT.read_bytes())], num_samples=2, seq_len=64)
    stats = collect_stats(_load(phi3), windows, hessian=False)
    scaled = dict(weights)
    apply_awq_scales(scaled, stats, fused_scale_groups(2, HEADS, HEADS, H // HEADS, INTER),
                     4, 32, True)
    qkv = "model.layers.0.self_attn.qkv_proj.weight"
    gate_up = "model.layers.0.mlp.gate_up_proj.weight"
    assert not torch.equal(scaled[qkv][2 * H:], weights[qkv][2 * H:])  # v rows changed
    assert not torch.equal(scaled[gate_up][INTER:], weights[gate_up][INTER:])  # up rows changed
    import shutil

    from safetensors.torch import save_file

    folder = tmp_path / "scaled"
    shutil.copytree(phi3, folder)
    save_file({n: t.contiguous() for n, t in scaled.items()}, str(folder / "model.safetensors"),
              metadata={"format": "pt"})
    ids = list(TEXT.read_bytes()[:96])
    torch.testing.assert_close(run_one_sequence(_load(folder), ids),
                               run_one_sequence(_load(phi3), ids), atol=1e-4, rtol=1e-4)


def test_phi3_cli_quantize_and_llm_generate(phi3: Path, tmp_path: Path,
                                            capsys: pytest.CaptureFixture) -> None:
    out = tmp_path / "awq"
    rc = cli_main(["quantize", "--method", "awq", "--model", str(phi3), "--output", str(out),
                   "--calib", str(TEXT), "--num-samples", "2", "--seq-len", "64",
                   "--group-size", "32"])
    assert rc == 0, capsys.readouterr().err
    llm = LLM(str(out), kv_cache_memory=8 << 20, block_size=8, max_num_batched_tokens=64)
    got = llm.generate([{"prompt_token_ids": list(TEXT.read_bytes()[:16])}],
                       SamplingParams(temperature=0, max_tokens=6, ignore_eos=True),
                       use_tqdm=False)
    assert len(got[0].outputs[0].token_ids) == 6


def test_quantize_takes_moe_models(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """MoE models quantize per expert (tests/test_quant_tools_moe.py); here the CLI on one."""
    from safetensors import safe_open
    from transformers import MixtralConfig, MixtralForCausalLM

    cfg = MixtralConfig(vocab_size=TINY_VOCAB, hidden_size=64, num_hidden_layers=1,
                        num_attention_heads=4, num_key_value_heads=2, intermediate_size=64,
                        num_local_experts=4, num_experts_per_tok=2, bos_token_id=256,
                        eos_token_id=257, pad_token_id=258)
    moe = _save(MixtralForCausalLM(cfg).eval(), tmp_path / "moe", True)
    assert cli_main(["quantize", "--method", "fp8", "--model", str(moe), "--output",
                     str(tmp_path / "cli")]) == 0, capsys.readouterr().err
    with safe_open(str(tmp_path / "cli" / "model.safetensors"), "pt") as f:
        names = set(f.keys())
    assert "model.layers.0.block_sparse_moe.experts.3.w2.weight_scale" in names
    assert "model.layers.0.block_sparse_moe.gate.weight" in names
    assert "model.layers.0.block_sparse_moe.gate.weight_scale" not in names
    qc = json.loads((tmp_path / "cli" / "config.json").read_text())["quantization_config"]
    assert qc["ignore"] == ["lm_head", "model.layers.0.block_sparse_moe.gate"]  # the router


def test_awq_refuses_families_whose_norms_cannot_take_its_scales(tmp_path: Path) -> None:
    from transformers import GemmaConfig, GemmaForCausalLM

    cfg = GemmaConfig(vocab_size=TINY_VOCAB, hidden_size=64, num_hidden_layers=1,
                      num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                      intermediate_size=128, bos_token_id=256, eos_token_id=257, pad_token_id=258)
    gemma = _save(GemmaForCausalLM(cfg).eval(), tmp_path / "gemma", True)
    with pytest.raises(ValueError, match=r"--method awq does not support GemmaForCausalLM: .*"
                                         r"1 \+ weight; use --method gptq or fp8"):
        quantize_model(str(gemma), tmp_path / "q", TEXT, QuantizeOptions(method="awq"),
                       progress=False)
