"""`modelport quantize --device cuda`: calibration forwards on the GPU give the checkpoint the
CPU gives (up to float rounding), and --calib-from-model generates on the GPU.

Run through `bash bench/gpu/run_all.sh s20-tests` on the device tool's machine.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from helpers.tiny_models import make_tiny_llama_dir, run_one_sequence
from modelport.config import LoadConfig
from modelport.loader import load_model, load_model_config, resolve_model
from modelport.quantization.tools.quantize import QuantizeOptions, quantize_model

TEXT = Path(__file__).parent / "data" / "quant_eval.txt"
pytestmark = pytest.mark.gpu


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_llama_dir(tmp_path_factory.mktemp("qtg") / "hf", seed=11)


def _logits(path: Path, ids: list[int]) -> torch.Tensor:
    src = resolve_model(str(path))
    model = load_model(src, load_model_config(src), LoadConfig(), torch.float32,
                       torch.device("cpu"))
    return run_one_sequence(model, ids)


@pytest.mark.parametrize("method,bits,sequential", [("gptq", 4, True), ("gptq", 8, False),
                                                     ("awq", 4, True)])
def test_quantize_on_cuda_matches_cpu(tiny: Path, tmp_path: Path, method: str, bits: int,
                                      sequential: bool) -> None:
    ids = list(TEXT.read_bytes()[:128])
    float_logits = _logits(tiny, ids)
    logits = {}
    for device in ("cpu", "cuda"):
        opts = QuantizeOptions(method=method, bits=bits, group_size=32, num_samples=4,
                               seq_len=128, zero_point=method == "awq",
                               desc_act=method == "gptq", sequential=sequential, device=device)
        report = quantize_model(str(tiny), tmp_path / device, TEXT, opts, progress=False)
        assert len(report.layer_errors) == 2 * 7
        logits[device] = _logits(report.output, ids)
    err_cpu = ((logits["cpu"] - float_logits).norm() / float_logits.norm()).item()
    err_gpu = ((logits["cuda"] - float_logits).norm() / float_logits.norm()).item()
    # the same statistics up to float rounding: a few codes may round the other way
    assert abs(err_gpu - err_cpu) < 0.25 * err_cpu + 1e-3, (err_cpu, err_gpu)
    diff = ((logits["cuda"] - logits["cpu"]).norm() / logits["cpu"].norm()).item()
    assert diff < max(0.5 * err_cpu, 1e-3), (diff, err_cpu)


def test_calibration_from_model_on_cuda(tiny: Path, tmp_path: Path) -> None:
    opts = QuantizeOptions(method="gptq", bits=8, group_size=32, num_samples=4, seq_len=32,
                           calib_from_model=True, device="cuda")
    report = quantize_model(str(tiny), tmp_path / "self", None, opts, progress=False)
    saved = (report.output / "calibration_from_model.jsonl").read_text().splitlines()
    assert len(saved) >= 4 and all(json.loads(line)["text"] for line in saved)
    assert report.calibration_tokens > 0
    ids = list(TEXT.read_bytes()[:128])
    ref = _logits(tiny, ids)
    got = _logits(report.output, ids)
    assert ((got - ref).norm() / ref.norm()).item() < 0.05  # 8-bit
