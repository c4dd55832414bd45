"""`modelport quantize`: the algorithms on synthetic layers, calibration warnings, round trips."""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import pytest
import torch

from helpers.tiny_models import load_cpu_fp32 as _load
from helpers.tiny_models import make_tiny_llama_dir, run_one_sequence
from helpers.tiny_models import sequence_nll as _nll
from modelport.entrypoints.cli import main as cli_main
from modelport.quantization.gptq import GPTQConfig
from modelport.quantization.tools.awq_algo import search_scale
from modelport.quantization.tools.calib import calibration_warnings, make_windows, read_texts
from modelport.quantization.tools.capture import LayerStats, collect_stats
from modelport.quantization.tools.gptq_algo import gptq_quantize
from modelport.quantization.tools.quantize import QuantizeOptions, quantize_model, stats_key
from modelport.quantization.tools.rtn import dequantize_codes, rtn_quantize
from modelport.quantization.tools.sequential import (
    hf_weight_names,
    layerwise_weight_names,
    quantize_layerwise,
)

TEXT = Path(__file__).parent / "data" / "quant_eval.txt"


def _layer_with_outlier_channels(n: int = 64, k: int = 128, rows: int = 512):
    """Correlated activations (low-rank + noise, like real hidden states) with a few large,
    salient channels: where AWQ and GPTQ beat plain rounding."""
    gen = torch.Generator().manual_seed(0)
    z = torch.randn(rows, k // 4, generator=gen)
    x = z @ torch.randn(k // 4, k, generator=gen) + 0.3 * torch.randn(rows, k, generator=gen)
    x[:, :4] *= 20
    w = torch.randn(n, k, generator=gen) * 0.05
    return x, w


def _out_err(x: torch.Tensor, w: torch.Tensor, w_hat: torch.Tensor) -> float:
    return ((x @ w_hat.t() - x @ w.t()).norm() / (x @ w.t()).norm()).item()


def test_gptq_beats_round_to_nearest() -> None:
    x, w = _layer_with_outlier_channels()
    g_idx = torch.arange(w.shape[1]) // 32
    rtn = dequantize_codes(*rtn_quantize(w, 4, 32, sym=True), g_idx)
    for act_order in (False, True):
        codes, zeros, scales, gi = gptq_quantize(w, x.double().t() @ x.double(), 4, 32,
                                                 sym=True, act_order=act_order)
        assert codes.max() <= 15 and gi.shape == (w.shape[1],)
        gptq = dequantize_codes(codes, zeros, scales, gi.long())
        assert _out_err(x, w, gptq) < 0.3 * _out_err(x, w, rtn), act_order  # measured ~0.13x


def test_hessian_caps_massive_activation_rows() -> None:
    """A window's first token reaching a layer 40x longer than the rest (an attention sink)
    counts in GPTQ's Hessian at 5x the median row's length, and GPTQ fitted to the capped
    Hessian reconstructs the ordinary tokens better than when that token owns X^T X."""
    x, w = _layer_with_outlier_channels(rows=1024)
    gen = torch.Generator().manual_seed(1)
    sink = torch.randn(x.shape[1], generator=gen)
    windows = x.reshape(8, 128, -1).clone()
    windows[:, 0] = sink * 40 * x.norm(dim=1).median() / sink.norm()
    capped, plain = LayerStats.empty(x.shape[1]), LayerStats.empty(x.shape[1], row_clip=0)
    for win in windows:
        capped.add(win, gen)
        plain.add(win, gen)
    assert capped.clipped_rows == 8 and plain.clipped_rows == 0
    xd = windows.double()
    assert torch.allclose(plain.hessian, sum(v.t() @ v for v in xd))
    expected = 0
    for v in xd:
        norms = v.norm(dim=1)
        v = v.clone()
        v[0] *= 5 * norms.median() / norms[0]
        expected = expected + v.t() @ v
    assert torch.allclose(capped.hessian, expected)
    ordinary = windows[:, 1:].reshape(-1, x.shape[1])
    errs = {}
    for name, st in (("capped", capped), ("plain", plain)):
        codes, zeros, scales, gi = gptq_quantize(w, st.hessian, 4, 32, sym=True, act_order=True)
        errs[name] = _out_err(ordinary, w, dequantize_codes(codes, zeros, scales, gi.long()))
    assert errs["capped"] < 0.8 * errs["plain"], errs  # measured 0.33x


def test_awq_scale_search_beats_round_to_nearest() -> None:
    x, w = _layer_with_outlier_channels()
    s, alpha = search_scale(w, x, x.abs().mean(0), 4, 32, zero_point=True)
    assert alpha > 0  # the salient channels were protected
    g_idx = torch.arange(w.shape[1]) // 32
    awq = dequantize_codes(*rtn_quantize(w * s, 4, 32, sym=False), g_idx) / s
    rtn = dequantize_codes(*rtn_quantize(w, 4, 32, sym=False), g_idx)
    assert _out_err(x, w, awq) < 0.8 * _out_err(x, w, rtn)


def test_calibration_loading_and_warnings(tmp_path: Path) -> None:
    jl = tmp_path / "c.jsonl"
    jl.write_text('{"text": "alpha beta"}\n\n{"text": "gamma"}\n')
    assert read_texts(jl) == ["alpha beta", "gamma"]
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"content": "x"}\n')
    with pytest.raises(ValueError, match='"text" field'):
        read_texts(bad)
    # a folder is a clear error (was IsADirectoryError), and the reference sample is named so
    with pytest.raises(ValueError, match="cannot read calibration file .*: Is a directory"):
        read_texts(tmp_path)
    with pytest.raises(ValueError, match="--reference-text file not found"):
        read_texts(tmp_path / "nope.txt", "--reference-text file")
    # a byte order mark (Windows editors) is not part of the text, and .json documents work
    bom = tmp_path / "bom.jsonl"
    bom.write_bytes(b'\xef\xbb\xbf{"text": "delta"}\n')
    assert read_texts(bom) == ["delta"]
    doc = tmp_path / "c.json"
    doc.write_text('[{"text": "one"}, "two", {"text": "  "}]')
    assert read_texts(doc) == ["one", "two"]
    doc.write_text('{"text": "one"}')
    with pytest.raises(ValueError, match="array of strings or of objects"):
        read_texts(doc)
    prose = list(TEXT.read_bytes())
    windows = make_windows([prose], num_samples=8, seq_len=256)
    assert len(windows) == 8 and all(len(w) == 256 for w in windows)
    assert any("small calibration set" in w for w in calibration_warnings(windows[:2], 128, 256))
    assert not any("unrelated" in w for w in calibration_warnings(windows, 8, 256, prose[:1000]))
    digits = list(b"0123456789 " * 200)
    warns = calibration_warnings(windows, 8, 256, reference=digits)
    assert any("looks unrelated" in w for w in warns)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_llama_dir(tmp_path_factory.mktemp("qt") / "hf", seed=11)


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm()).item()


def test_layerwise_inputs_are_those_of_the_model_quantized_so_far(tiny: Path) -> None:
    """Sequential GPTQ's capture: with nothing quantized it sees exactly what one float forward
    sees; once a linear is replaced by its quantization, every linear after it (o after qkv in
    the same layer, all of layer 1 after layer 0) sees inputs computed through it."""
    windows = make_windows([list(TEXT.read_bytes())], num_samples=2, seq_len=64)
    ref = collect_stats(_load(tiny), windows)

    def run(fake_quant: bool) -> tuple[dict[str, LayerStats], dict[str, torch.Tensor], list[str]]:
        model = _load(tiny)
        seen: dict[str, LayerStats] = {}
        returned: dict[str, torch.Tensor] = {}

        def quantize(name: str, st: LayerStats) -> torch.Tensor:
            seen[name] = st
            module = model.get_submodule(stats_key(name))
            w = module.weight.data[dict(hf_weight_names(stats_key(name), module))[name]].clone()
            if fake_quant:
                w = dequantize_codes(*rtn_quantize(w, 4, 32), torch.arange(w.shape[1]) // 32)
            returned[name] = w
            return w

        quantize_layerwise(model, windows, quantize)
        in_model = {n: model.get_submodule(stats_key(n)).weight.data[
            dict(hf_weight_names(stats_key(n), model.get_submodule(stats_key(n))))[n]]
            for n in returned}
        assert all(torch.equal(in_model[n], returned[n]) for n in returned)  # written back
        return seen, returned, layerwise_weight_names(model)

    seen, _, order = run(fake_quant=False)
    assert list(seen) == order and len(order) == 2 * 7
    assert order[:4] == [f"model.layers.0.self_attn.{x}_proj.weight" for x in "qkvo"]
    assert seen[order[0]] is seen[order[2]]  # q, k and v share one input
    for name, st in seen.items():
        assert st.rows == ref[stats_key(name)].rows == 128
        assert _rel(st.hessian, ref[stats_key(name)].hessian) < 1e-6, name

    seen, _, _ = run(fake_quant=True)
    layer0, layer1 = "model.layers.0.self_attn", "model.layers.1.self_attn"
    assert _rel(seen[f"{layer0}.q_proj.weight"].hessian, ref[f"{layer0}.qkv_proj"].hessian) < 1e-6
    for name in (f"{layer0}.o_proj.weight", f"{layer1}.q_proj.weight",
                 "model.layers.1.mlp.down_proj.weight"):
        assert _rel(seen[name].hessian, ref[stats_key(name)].hessian) > 1e-2, name  # ~0.1-0.3


@pytest.mark.parametrize("method,bits,max_rise,sequential",
                         [("gptq", 8, 0.02, True), ("fp8", 8, 0.02, True),
                          ("awq", 4, 0.10, True), ("gptq", 4, 0.10, True),
                          ("gptq", 4, 0.10, False)])
def test_quantize_then_load_round_trip(tiny: Path, tmp_path: Path, method: str, bits: int,
                                       max_rise: float, sequential: bool) -> None:
    opts = QuantizeOptions(method=method, bits=bits, group_size=32, num_samples=4, seq_len=128,
                           zero_point=method == "awq", desc_act=method == "gptq",
                           sequential=sequential)
    report = quantize_model(str(tiny), tmp_path / "q", TEXT, opts, progress=False)
    cfg = json.loads((report.output / "config.json").read_text())
    if method == "fp8":  # compressed-tensors, llm-compressor's FP8_DYNAMIC scheme
        _check_compressed_tensors_fp8(cfg["quantization_config"], report.output)
    else:
        assert cfg["quantization_config"]["quant_method"] == method
    if method == "gptq":
        assert cfg["quantization_config"]["true_sequential"] is sequential
        assert GPTQConfig.from_hf(cfg["quantization_config"]).true_sequential is sequential
    assert (report.output / "tokenizer.json").is_file()
    assert len(report.layer_errors) == 2 * 7 and max(report.layer_errors.values()) < 0.2
    ids = list(TEXT.read_bytes()[:384])
    ppl_float, ppl_q = (torch.tensor(_nll(p, ids)).exp().item() for p in (tiny, report.output))
    assert abs(ppl_q / ppl_float - 1) < max_rise, (ppl_float, ppl_q)
    # a random tiny model's perplexity sits near its vocabulary size whatever its weights, so
    # the logits themselves must match the float model's up to the format's rounding
    # (measured on this model: GPTQ 8-bit ~0.003, FP8 0.053, GPTQ 4-bit 0.055-0.074, AWQ 0.17)
    bound = {("gptq", 8): 0.02, ("fp8", 8): 0.1, ("gptq", 4): 0.12, ("awq", 4): 0.3}
    logits_float, logits_q = (run_one_sequence(_load(p), ids[:128]) for p in (tiny, report.output))
    assert _rel(logits_q, logits_float) < bound[method, bits]


def _check_compressed_tensors_fp8(qc: dict, out: Path) -> None:
    """The fields vLLM's and transformers' compressed-tensors readers take for FP8 W8A8 with
    channel weight scales and dynamic per-token activations; scales [out, 1] in the file."""
    from safetensors.torch import load_file

    assert qc == {
        "quant_method": "compressed-tensors", "format": "float-quantized",
        "quantization_status": "compressed", "ignore": ["lm_head"],
        "config_groups": {"group_0": {
            "targets": ["Linear"],
            "weights": {"num_bits": 8, "type": "float", "symmetric": True, "strategy": "channel",
                        "dynamic": False},
            "input_activations": {"num_bits": 8, "type": "float", "symmetric": True,
                                  "strategy": "token", "dynamic": True},
            "output_activations": None}}}
    saved = load_file(str(out / "model.safetensors"))
    scales = {n: t for n, t in saved.items() if n.endswith(".weight_scale")}
    assert len(scales) == 2 * 7 and not any("input_scale" in n for n in saved)
    for name, scale in scales.items():
        weight = saved[name.removesuffix("_scale")]
        assert weight.dtype == torch.float8_e4m3fn
        assert scale.dtype == torch.float32 and tuple(scale.shape) == (weight.shape[0], 1), name
    assert "lm_head.weight_scale" not in saved


def test_awq_checkpoint_folds_its_scales_into_the_norms(tmp_path: Path) -> None:
    """AWQ multiplies salient input channels of q/k/v and gate/up by s and must divide the
    norm before them by s in the checkpoint: with outlier channels (norm weights x8 on four
    channels) the scales are far from 1, so a checkpoint that kept the float norms (a bug this
    caught: logit error 0.68) is far off, and the right one stays within 4-bit rounding (0.18)."""
    from safetensors.torch import load_file, save_file

    tiny = make_tiny_llama_dir(tmp_path / "hf", seed=11)
    (path,) = tiny.glob("*.safetensors")
    tensors = load_file(path)
    for name, t in tensors.items():
        if name.endswith("layernorm.weight"):
            tensors[name] = t.clone()
            tensors[name][:4] *= 8
    save_file(tensors, path, metadata={"format": "pt"})
    opts = QuantizeOptions(method="awq", bits=4, group_size=32, num_samples=4, seq_len=128,
                           zero_point=True)
    report = quantize_model(str(tiny), tmp_path / "q", TEXT, opts, progress=False)
    (qpath,) = report.output.glob("*.safetensors")
    saved = load_file(qpath)
    norm = "model.layers.0.input_layernorm.weight"
    assert (saved[norm].float() - tensors[norm]).abs().max() > 0.5  # scales were folded in
    ids = list(TEXT.read_bytes()[:128])
    logits_float, logits_q = (run_one_sequence(_load(p), ids) for p in (tiny, report.output))
    assert _rel(logits_q, logits_float) < 0.3


def test_reference_sample_scores_every_layer_against_round_to_nearest(
        tiny: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """With --reference-text each layer is also scored on the reference's inputs beside plain
    rounding. GPTQ calibrated on the reference's own kind of text beats rounding there on
    every layer; calibrated on a run of digits it fits directions prose never uses and loses
    to rounding on most layers (measured 12 of 14), which the tool warns about."""
    opts = QuantizeOptions(method="gptq", bits=4, group_size=32, num_samples=4, seq_len=128,
                           desc_act=True, zero_point=False, reference_text=TEXT)
    good = quantize_model(str(tiny), tmp_path / "good", TEXT, opts, progress=False)
    assert set(good.reference_errors) == set(good.layer_errors) and len(good.reference_errors) == 14
    assert all(q < r for q, r in good.reference_errors.values())
    assert good.worse_than_rtn() == [] and not any("round-to-nearest" in w for w in good.warnings)

    digits = tmp_path / "digits.txt"
    digits.write_text("0123456789 " * 400)
    rc = cli_main(["quantize", "--method", "gptq", "--model", str(tiny), "--output",
                   str(tmp_path / "bad"), "--calib", str(digits), "--num-samples", "4",
                   "--seq-len", "128", "--group-size", "32", "--desc-act",
                   "--damp-percent", "0.05", "--reference-text", str(TEXT)])
    printed = capsys.readouterr()
    assert rc == 0, printed.err
    assert "larger output error (by > 5 %) than plain round-to-nearest" in printed.err
    saved = json.loads((tmp_path / "bad" / "quantization_report.json").read_text())
    ref = saved["reference_relative_output_error"]
    assert len(ref) == 14
    worse = [n for n, e in ref.items() if e["quantized"] > 1.05 * e["round_to_nearest"]]
    assert len(worse) >= 7
    assert f"on the reference sample: {len(worse)} of 14 layers worse" in printed.out
    qc = json.loads((tmp_path / "bad" / "config.json").read_text())["quantization_config"]
    assert qc["damp_percent"] == 0.05 and GPTQConfig.from_hf(qc).damp_percent == 0.05
    assert cli_main(["quantize", "--method", "awq", "--model", str(tiny), "--output",
                     str(tmp_path / "a"), "--calib", str(TEXT), "--damp-percent", "0.1"]) == 1
    assert "--damp-percent applies to --method gptq only" in capsys.readouterr().err
    with pytest.raises(ValueError, match="damp-percent"):
        QuantizeOptions(method="gptq", damp_percent=0)


def test_cli_quantize_and_its_errors(tiny: Path, tmp_path: Path, capsys: pytest.CaptureFixture,
                                     monkeypatch: pytest.MonkeyPatch) -> None:
    # as in a shell, where logging is not configured: each warning is printed once (the
    # logger's last-resort stderr output printed them a second time, inside the progress bar)
    monkeypatch.setattr(logging.getLogger("modelport.quantization.tools"), "propagate", False)
    out = tmp_path / "cli-gptq"
    rc = cli_main(["quantize", "--method", "gptq", "--model", str(tiny), "--output", str(out),
                   "--calib", str(TEXT), "--num-samples", "2", "--seq-len", "64",
                   "--group-size", "32", "--bits", "8", "--no-sequential"])
    printed = capsys.readouterr()
    assert rc == 0, printed.err
    assert printed.err.count("small calibration set") == 1 and "worst:" in printed.out
    assert json.loads((out / "quantization_report.json").read_text())["layer_relative_output_error"]
    qc = json.loads((out / "config.json").read_text())["quantization_config"]
    assert qc["true_sequential"] is False
    assert cli_main(["quantize", "--method", "awq", "--model", str(tiny), "--output",
                     str(tmp_path / "w"), "--calib", str(TEXT), "--no-sequential"]) == 1
    assert "applies to --method gptq only" in capsys.readouterr().err
    assert cli_main(["quantize", "--method", "gptq", "--model", str(tiny), "--output",
                     str(tmp_path / "v"), "--calib", str(TEXT), "--hessian-row-clip", "0.5"]) == 1
    assert "--hessian-row-clip must be 0 (off) or >= 1" in capsys.readouterr().err
    assert cli_main(["quantize", "--method", "gptq", "--model", str(tiny), "--output",
                     str(tmp_path / "x"), "--calib", str(TEXT), "--bits", "3"]) == 1
    assert "unsupported bit width 3" in capsys.readouterr().err
    assert cli_main(["quantize", "--method", "awq", "--model", str(tiny), "--output",
                     str(tmp_path / "y")]) == 1
    assert "--calib (or --calib-from-model) is required" in capsys.readouterr().err
    assert cli_main(["quantize", "--method", "gptq", "--model", str(out), "--output",
                     str(tmp_path / "z"), "--calib", str(TEXT)]) == 1
    assert "already quantized" in capsys.readouterr().err
    # the tiny model's 64-wide inputs hold no whole 128-wide group: refused before calibrating,
    # with the group size that fits every layer
    assert cli_main(["quantize", "--method", "awq", "--model", str(tiny), "--output",
                     str(tmp_path / "g"), "--calib", str(TEXT)]) == 1
    err = capsys.readouterr().err
    assert "--group-size 128 does not divide the input size" in err
    assert "(input size 64); use --group-size 64" in err and not (tmp_path / "g").exists()
    # another method's option is refused, not silently dropped (FP8 wrote 8-bit weights for
    # --bits 4 and recorded bits 4 in its report; AWQ ignored --desc-act)
    for method, extra, msg in (
            ("awq", ["--calib", str(TEXT), "--desc-act"], "--desc-act applies to --method gptq only"),
            ("fp8", ["--bits", "4"], "--bits applies to --method awq / gptq only"),
            ("fp8", ["--group-size", "32"], "--group-size applies to --method awq / gptq only"),
            ("fp8", ["--no-zero-point"], "--zero-point / --no-zero-point applies to"),
            ("fp8", ["--reference-text", str(TEXT)], "--reference-text applies to --method awq")):
        assert cli_main(["quantize", "--method", method, "--model", str(tiny), "--output",
                         str(tmp_path / "o"), *extra]) == 1
        assert msg in capsys.readouterr().err
    assert not (tmp_path / "o").exists()
    assert cli_main(["quantize", "--method", "fp8", "--model", str(tiny), "--output",
                     str(tmp_path / "f")]) == 0
    assert json.loads((tmp_path / "f" / "quantization_report.json").read_text())["options"]["bits"] == 8
    # AWQ has no -1 group size (the layout and its loaders need groups): refused up front,
    # not after calibrating; the group-size hint no longer suggests it for AWQ
    with pytest.raises(ValueError, match="AWQ: --group-size -1 is not supported"):
        QuantizeOptions(method="awq", group_size=-1)
    capsys.readouterr()
    assert cli_main(["quantize", "--method", "gptq", "--model", str(tiny), "--output",
                     str(tmp_path / "d"), "--calib", str(TEXT), "--device", "nodevice"]) == 1
    assert "--device must be cpu or cuda, got 'nodevice'" in capsys.readouterr().err
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert cli_main(["quantize", "--method", "gptq", "--model", str(tiny), "--output",
                     str(tmp_path / "d"), "--calib", str(TEXT), "--device", "cuda"]) == 1
    assert "--device cuda: CUDA is not available here" in capsys.readouterr().err
    assert cli_main(["quantize", "--method", "gptq", "--model", str(tiny), "--output",
                     str(tmp_path / "d"), "--calib", str(tmp_path)]) == 1
    assert "cannot read calibration file" in capsys.readouterr().err


def test_quantize_output_folder_checks(tiny: Path, tmp_path: Path) -> None:
    """The output folder is checked before any work: the model's own folder (the float
    checkpoint was overwritten, then shutil.SameFileError), a file (FileExistsError), or a
    folder holding a sharded checkpoint whose index the loader would follow instead of the
    written model.safetensors (the output failed to load) are refused; a folder a previous
    run wrote is fine."""
    model = shutil.copytree(tiny, tmp_path / "model")
    before = (model / "model.safetensors").read_bytes()
    opts = QuantizeOptions(method="fp8", bits=8)
    with pytest.raises(ValueError, match="is the model's own folder"):
        quantize_model(str(model), model, None, opts, progress=False)
    assert (model / "model.safetensors").read_bytes() == before
    assert "quantization_config" not in json.loads((model / "config.json").read_text())
    (tmp_path / "file").write_text("x")
    with pytest.raises(ValueError, match="is a file; name a folder"):
        quantize_model(str(tiny), tmp_path / "file", None, opts, progress=False)
    sharded = tmp_path / "sharded"
    sharded.mkdir()
    (sharded / "model-00001-of-00002.safetensors").write_bytes(before)
    (sharded / "model.safetensors.index.json").write_text("{}")
    with pytest.raises(ValueError, match=r"already holds another checkpoint's weights \("
                                         r"model-00001-of-00002.safetensors, model.safetensors"):
        quantize_model(str(tiny), sharded, None, opts, progress=False)
    assert not (sharded / "model.safetensors").exists()
    again = tmp_path / "again"
    for _ in range(2):
        assert quantize_model(str(tiny), again, None, opts, progress=False).output == again


def test_calibration_windows_fit_the_models_context(tiny: Path, tmp_path: Path) -> None:
    """--seq-len past max_position_embeddings (512 here) was an IndexError in the rotary
    table mid-calibration; the windows are cut to the context, with a warning."""
    long_text = tmp_path / "long.txt"
    long_text.write_text(TEXT.read_text() * 2)
    opts = QuantizeOptions(method="gptq", bits=8, group_size=32, num_samples=2, seq_len=1024,
                           sequential=False)
    report = quantize_model(str(tiny), tmp_path / "q", long_text, opts, progress=False)
    assert any("--seq-len 1024 is longer than the model's context (512 positions)" in w
               for w in report.warnings)
    assert report.calibration_tokens == 2 * 512 and len(report.layer_errors) == 14


def test_calibration_from_model(tiny: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """--calib-from-model: the model writes its own calibration text (chat requests when its
    tokenizer has a chat template, else continuations of a random token), reproducibly, and
    the checkpoint records the texts it was calibrated on."""
    from modelport.quantization.tools.selfcalib import generate_calibration

    texts = generate_calibration(str(tiny), num_samples=3, seq_len=16)
    assert len(texts) >= 3 and all(texts)
    assert generate_calibration(str(tiny), num_samples=3, seq_len=16) == texts
    assert generate_calibration(str(tiny), num_samples=3, seq_len=16, seed=1) != texts

    base = make_tiny_llama_dir(tmp_path / "base", seed=11)  # the same model, no chat template
    (base / "chat_template.jinja").unlink(missing_ok=True)
    cfg_path = base / "tokenizer_config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg.pop("chat_template", None)
    cfg_path.write_text(json.dumps(cfg))
    base_texts = generate_calibration(str(base), num_samples=3, seq_len=16)
    assert len(base_texts) >= 3 and base_texts != texts

    out = tmp_path / "gptq-self"
    rc = cli_main(["quantize", "--method", "gptq", "--model", str(tiny), "--output", str(out),
                   "--calib-from-model", "--num-samples", "4", "--seq-len", "32",
                   "--group-size", "32", "--bits", "8", "--no-sequential"])
    printed = capsys.readouterr()
    assert rc == 0, printed.err
    saved = [json.loads(line)["text"] for line in
             (out / "calibration_from_model.jsonl").read_text().splitlines()]
    assert saved == generate_calibration(str(tiny), num_samples=4, seq_len=32)
    report = json.loads((out / "quantization_report.json").read_text())
    assert report["calibration_from_model"] == "calibration_from_model.jsonl"
    assert report["options"]["calib_from_model"] is True and report["options"]["bits"] == 8
    assert report["options"]["hessian_row_clip"] == 5.0 and report["options"]["sequential"] is False
    assert report["calibration_tokens"] > 0
    assert read_texts(out / "calibration_from_model.jsonl") == saved  # reusable as --calib
    assert cli_main(["quantize", "--method", "gptq", "--model", str(tiny), "--output",
                     str(tmp_path / "both"), "--calib", str(TEXT), "--calib-from-model"]) == 1
    assert "either --calib or --calib-from-model" in capsys.readouterr().err
    assert cli_main(["quantize", "--method", "fp8", "--model", str(tiny), "--output",
                     str(tmp_path / "fp8"), "--calib-from-model"]) == 1
    assert "FP8 needs no calibration" in capsys.readouterr().err
    # the same folder again without --calib-from-model: the earlier run's texts do not stay
    # beside a checkpoint they did not calibrate
    assert cli_main(["quantize", "--method", "fp8", "--model", str(tiny), "--output",
                     str(out)]) == 0
    assert not (out / "calibration_from_model.jsonl").exists()
    assert "calibration_from_model" not in json.loads(
        (out / "quantization_report.json").read_text())
    # --min-expert-tokens: for MoE experts' calibration only
    assert cli_main(["quantize", "--method", "gptq", "--model", str(tiny), "--output",
                     str(tmp_path / "dense"), "--calib", str(TEXT), "--min-expert-tokens", "8"]) == 1
    assert "--min-expert-tokens applies to MoE models only; LlamaForCausalLM" in (
        capsys.readouterr().err)
    assert cli_main(["quantize", "--method", "fp8", "--model", str(tiny), "--output",
                     str(tmp_path / "dense"), "--min-expert-tokens", "8"]) == 1
    assert "--min-expert-tokens applies to --method awq / gptq only" in capsys.readouterr().err


def test_calibration_from_model_fits_the_models_context(tiny: Path) -> None:
    """--seq-len 512 (the default) on a model with 512 positions: the generator's context is
    capped at the model's instead of asking for seq_len + 64 and failing."""
    from modelport.quantization.tools.selfcalib import generate_calibration

    limit = json.loads((tiny / "config.json").read_text())["max_position_embeddings"]
    texts = generate_calibration(str(tiny), num_samples=1, seq_len=limit)
    assert texts and all(texts)
