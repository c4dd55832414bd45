"""Planner vs checkpoints written by `modelport quantize`: byte-exact weight accounting."""

from __future__ import annotations

from pathlib import Path

import pytest

from helpers.tiny_models import make_tiny_llama_dir
from modelport.planner.hardware import resolve_device
from modelport.planner.model_source import resolve_model
from modelport.planner.plan import PlanRequest, make_plan
from modelport.planner.weights import CHECKPOINT_DENSE_DTYPE, WeightFormat, estimate_weights
from modelport.quantization.tools.quantize import QuantizeOptions, quantize_model

TEXT = Path(__file__).parent / "data" / "quant_eval.txt"
GROUP = 32


@pytest.fixture(scope="module")
def float_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_llama_dir(tmp_path_factory.mktemp("plan-q") / "hf")


@pytest.mark.parametrize("method", ["awq", "gptq", "fp8"])
def test_estimate_equals_the_quantized_checkpoint(float_dir: Path, tmp_path: Path, method: str):
    opts = QuantizeOptions(
        method=method, bits=8 if method == "fp8" else 4, group_size=GROUP, num_samples=1,
        seq_len=32, zero_point=method == "awq", desc_act=method == "gptq",
    )  # fmt: skip
    out = quantize_model(str(float_dir), tmp_path / method, TEXT, opts, progress=False).output
    # predicted from the float model's architecture alone
    cfg = resolve_model(str(float_dir)).config
    fmt = WeightFormat(CHECKPOINT_DENSE_DTYPE[method], method, group_size=GROUP)
    predicted = estimate_weights(cfg, fmt).total_bytes
    real = resolve_model(str(out))  # tensor bytes from the safetensors headers
    assert real.quantization == method
    assert predicted == real.weight_bytes  # every scale, zero and g_idx accounted for
    # planning the quantized folder detects the method and uses the measured bytes
    plan = make_plan(PlanRequest(real, resolve_device("l4"), group_size=GROUP, max_num_seqs=4))
    assert plan.request.effective_quantization == method
    assert plan.weights.total_bytes == real.weight_bytes
