"""`modelport quantize` on mixture-of-experts models (Mixtral, Qwen2-MoE, Qwen3-MoE): FP8,
GPTQ, AWQ.

Tiny random models (hidden 64, 8 experts, top-2, two sparse layers; Qwen2-MoE with a shared
expert and a dense layer, Qwen3-MoE with dense layers between) are quantized, loaded back on CPU and compared with the float model: perplexity on the
shipped text and the logits. The checkpoint must hold every expert in the public per-expert
layout with float routers; experts that calibration does not reach get round-to-nearest.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

from helpers.tiny_models import load_cpu, run_one_sequence
from modelport.entrypoints.cli import main as cli_main
from modelport.layers import fused_moe
from modelport.layers.fused_moe import ExpertMLP, GateLinear
from modelport.layers.linear import Linear
from modelport.quantization.gptq import pack_gptq
from modelport.quantization.tools import awq_algo, moe_quant
from modelport.quantization.tools.capture import collect_stats
from modelport.quantization.tools.quantize import QuantizeOptions, quantize_model
from modelport.quantization.tools.rtn import rtn_quantize
from test_models_moe import make_moe_dir

TEXT = Path(__file__).parent / "data" / "quant_eval.txt"
IDS = list(TEXT.read_bytes()[:384])
SIZES = {"mixtral": dict(intermediate_size=64),
         "qwen2_moe": dict(moe_intermediate_size=64, shared_expert_intermediate_size=64),
         "qwen3_moe": dict(moe_intermediate_size=64)}
QWEN = ("gate_proj", "up_proj", "down_proj")
EXPERT_W = {"mixtral": ("w1", "w3", "w2"), "qwen2_moe": QWEN, "qwen3_moe": QWEN}
ROUTERS = re.compile(r"\.(gate|shared_expert_gate)\.weight$")


@pytest.fixture(autouse=True)
def _cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MODELPORT_CACHE", str(tmp_path / "cache"))


@pytest.fixture(scope="module")
def dirs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    return {a: make_moe_dir(tmp_path_factory.mktemp(a) / "hf", a, **SIZES[a]) for a in SIZES}


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm()).item()


_FLOAT_LOGITS: dict[Path, torch.Tensor] = {}


def _compare(src: Path, out: Path) -> tuple[float, float, float]:
    """(float perplexity, quantized perplexity, relative logit error) on the shipped text; the
    quantized model loaded once, its layout checked too."""
    if src not in _FLOAT_LOGITS:
        _FLOAT_LOGITS[src] = run_one_sequence(load_cpu(src), IDS)
    model = load_cpu(out)
    _check_loaded(model)
    logits_f, logits_q = _FLOAT_LOGITS[src], run_one_sequence(model, IDS)
    target = torch.tensor(IDS[1:])
    ppl_f, ppl_q = (F.cross_entropy(lg[:-1], target).exp().item() for lg in (logits_f, logits_q))
    return ppl_f, ppl_q, _rel(logits_q, logits_f)


def _check_checkpoint(arch: str, src: Path, out: Path, quant_suffix: str) -> None:
    """Every expert's gate/up/down quantized under its public name; routers float."""
    saved = load_file(str(out / "model.safetensors"))
    floats = load_file(str(src / "model.safetensors"))
    experts = [n for n in floats if ".experts." in n]
    assert len(experts) == 2 * 8 * 3  # two sparse layers (the Qwen models' others are dense)
    for name in experts:
        prefix = name.removesuffix(".weight")
        assert prefix.rsplit(".", 1)[1] in EXPERT_W[arch]
        assert f"{prefix}.{quant_suffix}" in saved, name
        # AWQ / GPTQ: packed codes instead; FP8: the weight itself in float8
        assert name not in saved or saved[name].dtype == torch.float8_e4m3fn, name
    routers = [n for n in floats if ROUTERS.search(n)]
    assert routers and all(saved[n].is_floating_point() and saved[n].dtype != torch.float8_e4m3fn
                           and saved[n].shape == floats[n].shape for n in routers)
    assert not any(n.startswith(tuple(r.removesuffix("weight") for r in routers)) and
                   not n.endswith(".weight") for n in saved)  # no scales / codes for routers


def _check_loaded(model: torch.nn.Module) -> None:
    experts = [m for m in model.modules() if isinstance(m, ExpertMLP)]
    assert len(experts) == 16 and all(e.gate_up_proj.quant_method is not None and
                                      e.down_proj.quant_method is not None for e in experts)
    assert [n for n, m in model.named_modules() if isinstance(m, Linear)
            and type(m) is not GateLinear and m.quant_method is None] == []
    assert all(m.quant_method is None for m in model.modules() if isinstance(m, GateLinear))


@pytest.mark.parametrize("arch", tuple(SIZES))
def test_fp8_round_trip(dirs: dict[str, Path], tmp_path: Path, arch: str) -> None:
    opts = QuantizeOptions(method="fp8")
    report = quantize_model(str(dirs[arch]), tmp_path / "q", None, opts, progress=False)
    _check_checkpoint(arch, dirs[arch], report.output, "weight_scale")
    # compressed-tensors quantizes every Linear but those ignored: the routers are listed
    qc = json.loads((report.output / "config.json").read_text())["quantization_config"]
    floats = load_file(str(dirs[arch] / "model.safetensors"))
    routers = sorted(n.removesuffix(".weight") for n in floats if ROUTERS.search(n))
    assert qc["quant_method"] == "compressed-tensors" and qc["ignore"] == ["lm_head", *routers]
    ppl_f, ppl_q, logit_err = _compare(dirs[arch], report.output)
    assert abs(ppl_q / ppl_f - 1) < 0.02, (ppl_f, ppl_q)  # measured -0.05 % .. +0.36 %
    assert logit_err < 0.1  # measured 0.048-0.069 (FP8 rounding; dense Llama: 0.053)


@pytest.mark.parametrize("arch,bits,sequential,max_rise,max_logit_err",
                         [("mixtral", 8, True, 0.02, 0.05), ("qwen2_moe", 4, True, 0.05, 0.12),
                          ("qwen3_moe", 8, False, 0.02, 0.05)])
def test_gptq_round_trip(dirs: dict[str, Path], tmp_path: Path, arch: str, bits: int,
                         sequential: bool, max_rise: float, max_logit_err: float) -> None:
    opts = QuantizeOptions(method="gptq", bits=bits, group_size=32, num_samples=2, seq_len=128,
                           desc_act=True, sequential=sequential, min_expert_tokens=8)
    report = quantize_model(str(dirs[arch]), tmp_path / "q", TEXT, opts, progress=False)
    qc = json.loads((report.output / "config.json").read_text())["quantization_config"]
    assert qc["quant_method"] == "gptq" and qc["true_sequential"] is sequential
    _check_checkpoint(arch, dirs[arch], report.output, "qweight")
    # every expert reached by calibration has its own error; the report aggregates them
    agg = report.expert_errors()
    assert len(agg) == 2 * 3 and all(0 < a["mean"] <= a["max"] < 0.2 for a in agg.values())
    unreached = sum(1 for c in report.few_token_experts.values() if c == 0)
    assert sum(a["experts"] for a in agg.values()) == 2 * 3 * 8 - unreached
    ppl_f, ppl_q, logit_err = _compare(dirs[arch], report.output)
    assert abs(ppl_q / ppl_f - 1) < max_rise, (ppl_f, ppl_q)  # measured -0.03 % .. -0.33 %
    # measured: 8-bit 0.014-0.017, 4-bit 0.038 (the x20 routers flip a few tokens' experts)
    assert logit_err < max_logit_err


def test_expert_without_calibration_tokens_is_rounded_to_nearest(
        dirs: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture) -> None:
    """The router never picks expert 7 during calibration: its Hessian is empty, so it gets
    plain round-to-nearest codes (not GPTQ's, which would zero its dead columns), a warning
    naming the count, and the CLI reports experts aggregated per layer and projection."""
    route = fused_moe.route

    def never_seven(logits: torch.Tensor, top_k: int, renormalize: bool):  # noqa: ANN202
        logits = logits.clone()
        logits[:, 7] = -torch.inf
        return route(logits, top_k, renormalize)

    monkeypatch.setattr(fused_moe, "route", never_seven)
    out = tmp_path / "q"
    rc = cli_main(["quantize", "--method", "gptq", "--model", str(dirs["mixtral"]), "--output",
                   str(out), "--calib", str(TEXT), "--num-samples", "4", "--seq-len", "128",
                   "--group-size", "32", "--bits", "4", "--min-expert-tokens", "1"])
    printed = capsys.readouterr()
    assert rc == 0, printed.err
    assert "2 experts got fewer than 1 routed calibration tokens (2 got none) and were rounded " \
           "to nearest (RTN) instead of GPTQ" in printed.err
    assert "model.layers.0.block_sparse_moe.experts.7 (0)" in printed.err
    assert re.search(r"model\.layers\.1\.block_sparse_moe\.experts\.\*\.w2 +[\d.]+  \(mean of 7 "
                     r"experts; max [\d.]+\)", printed.out), printed.out
    assert ".experts.3.w1.weight" not in printed.out  # experts are not listed one by one
    saved = load_file(str(out / "model.safetensors"))
    floats = load_file(str(dirs["mixtral"] / "model.safetensors"))
    report = json.loads((out / "quantization_report.json").read_text())
    assert report["few_token_experts"] == {
        f"model.layers.{i}.block_sparse_moe.experts.7.{w}.weight": 0
        for i in range(2) for w in ("w1", "w3", "w2")}
    for w in ("w1", "w3", "w2"):
        prefix = f"model.layers.0.block_sparse_moe.experts.7.{w}"
        codes, zeros, scales = rtn_quantize(floats[f"{prefix}.weight"].float(), 4, 32, sym=True)
        want = pack_gptq(codes, zeros, scales, 4, g_idx=(torch.arange(64) // 32).to(torch.int32))
        assert torch.equal(saved[f"{prefix}.qweight"], want["qweight"])
        assert torch.equal(saved[f"{prefix}.qzeros"], want["qzeros"])
        torch.testing.assert_close(saved[f"{prefix}.scales"].float(), want["scales"].float(),
                                   rtol=1e-3, atol=1e-6)
    # a reached expert is fitted by GPTQ, not rounded
    prefix = "model.layers.0.block_sparse_moe.experts.2.w1"
    codes, zeros, scales = rtn_quantize(floats[f"{prefix}.weight"].float(), 4, 32, sym=True)
    assert not torch.equal(saved[f"{prefix}.qweight"],
                           pack_gptq(codes, zeros, scales, 4, g_idx=want["g_idx"])["qweight"])


def test_awq_folds_scales_into_norm_router_and_up_rows(
        dirs: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Folding AWQ's scales must leave the float function unchanged: the post-attention norm
    takes 1/s, every expert's (and the shared expert's) gate/up takes s, and so must the router
    and the shared-expert gate, which read the same normed input (without, the router logits
    change and tokens go to other experts); each expert's down takes its own s, its up rows
    1/s. With random scales (no search) the folded float checkpoint computes the same logits."""
    arch, src = "qwen2_moe", dirs["qwen2_moe"]
    from modelport.loader import load_model_config, resolve_model

    mcfg = load_model_config(resolve_model(str(src)))
    model = moe_quant.load_for_calibration(resolve_model(str(src)), mcfg, "cpu")
    windows = [IDS[:64], IDS[64:128]]
    stats = collect_stats(model, windows, hessian=False)
    weights = {n: t.float() for n, t in load_file(str(src / "model.safetensors")).items()}
    groups, _ = moe_quant.awq_groups(weights, mcfg, stats, EXPERT_W[arch], 1)
    router = "model.layers.0.mlp.gate"
    (moe_group,) = [g for g in groups if g.stats_key == router]
    assert set(moe_group.unquantized) == {f"{router}.weight", "model.layers.0.mlp.shared_expert_gate.weight"}
    assert len(moe_group.linears) == 2 * 9  # 8 experts + the shared one, gate and up
    gen = torch.Generator().manual_seed(0)
    monkeypatch.setattr(awq_algo, "search_scale", lambda w, *a: (
        torch.rand(w.shape[1], generator=gen) * 3 + 0.25, 0.5))
    folded = dict(weights)
    awq_algo.apply_awq_scales(folded, stats, groups, 4, 32, True)
    assert _rel(folded[f"{router}.weight"], weights[f"{router}.weight"]) > 0.3
    out = tmp_path / "folded"
    out.mkdir()
    save_file({k: v.contiguous() for k, v in folded.items()}, str(out / "model.safetensors"))
    (out / "config.json").write_text((src / "config.json").read_text())
    ids = IDS[:96]
    want = run_one_sequence(load_cpu(src), ids)
    torch.testing.assert_close(run_one_sequence(load_cpu(out), ids), want, atol=1e-3, rtol=1e-3)
    folded[f"{router}.weight"] = weights[f"{router}.weight"]  # forgetting the router breaks it
    save_file({k: v.contiguous() for k, v in folded.items()}, str(out / "model.safetensors"))
    assert _rel(run_one_sequence(load_cpu(out), ids), want) > 0.05


def test_awq_round_trip(dirs: dict[str, Path], tmp_path: Path,
                        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(awq_algo, "GRID", 5)  # alpha in steps of 0.2: a quarter of the search
    opts = QuantizeOptions(method="awq", bits=4, group_size=32, num_samples=2, seq_len=128,
                           zero_point=True, min_expert_tokens=8)
    report = quantize_model(str(dirs["qwen2_moe"]), tmp_path / "q", TEXT, opts, progress=False)
    _check_checkpoint("qwen2_moe", dirs["qwen2_moe"], report.output, "qweight")
    ppl_f, ppl_q, logit_err = _compare(dirs["qwen2_moe"], report.output)
    assert abs(ppl_q / ppl_f - 1) < 0.05, (ppl_f, ppl_q)  # measured -0.6 %
    assert logit_err < 0.3  # measured 0.21 (dense Llama AWQ: 0.17)


def test_stacked_expert_checkpoints_are_written_per_expert(dirs: dict[str, Path],
                                                           tmp_path: Path) -> None:
    """A source in transformers 5's stacked layout (``experts.gate_up_proj`` [E, 2I, H],
    ``experts.down_proj`` [E, H, I]) gives the same per-expert checkpoint as the split one."""
    src = dirs["mixtral"]
    tensors = load_file(str(src / "model.safetensors"))
    stacked = {n: t for n, t in tensors.items() if ".experts." not in n}
    for i in range(2):
        p = f"model.layers.{i}.block_sparse_moe.experts"
        stacked[f"{p}.gate_up_proj"] = torch.stack(
            [torch.cat([tensors[f"{p}.{e}.w1.weight"], tensors[f"{p}.{e}.w3.weight"]])
             for e in range(8)])
        stacked[f"{p}.down_proj"] = torch.stack([tensors[f"{p}.{e}.w2.weight"] for e in range(8)])
    other = tmp_path / "stacked"
    other.mkdir()
    save_file(stacked, str(other / "model.safetensors"))
    for f in src.iterdir():
        if f.suffix in (".json", ".jinja") or f.name == "tokenizer.json":
            (other / f.name).write_bytes(f.read_bytes())
    outs = [load_file(str(quantize_model(str(d), tmp_path / d.name / "q", None,
                                         QuantizeOptions(method="fp8"), progress=False).output
                          / "model.safetensors")) for d in (src, other)]
    assert outs[0].keys() == outs[1].keys()
    assert all(torch.equal(outs[0][n].float(), outs[1][n].float()) for n in outs[0])


def test_moe_calibration_runs_on_cpu_only(dirs: dict[str, Path], tmp_path: Path) -> None:
    opts = QuantizeOptions(method="gptq", group_size=32, num_samples=1, seq_len=32,
                           device="cuda")
    with pytest.raises(ValueError, match="mixture-of-experts model runs on CPU only"):
        quantize_model(str(dirs["mixtral"]), tmp_path / "q", TEXT, opts, progress=False)
    with pytest.raises(ValueError, match="--min-expert-tokens must be >= 1"):
        QuantizeOptions(method="gptq", min_expert_tokens=0)
