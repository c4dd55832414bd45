"""The FP8 activation handoff (quantization/fp8.py): a producer kernel offers its output's
per-token codes and the next FP8 layer takes them only for that very tensor, unmodified; and
which modules ``wire_fused_input_quant`` marks. The fused kernels themselves run on CUDA
(tests/test_fp8_fused_quant_gpu.py)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from helpers.tiny_models import load_cpu, make_tiny_llama_dir
from modelport.quantization import fp8


def _codes(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    return fp8.quantize_fp8_per_token_torch(x)


def test_take_returns_the_offer_for_the_same_tensor_once() -> None:
    x = torch.randn(3, 32)
    q, s = _codes(x)
    fp8.offer_quantized(x, q, s)
    got = fp8.take_quantized(x)
    assert got is not None and got[0] is q and got[1] is s
    assert fp8.take_quantized(x) is None  # taken: gone


def test_inference_mode_tensors_have_no_version_but_hand_off() -> None:
    with torch.inference_mode():  # how the engine runs its forward
        x = torch.randn(3, 32)
        q, s = _codes(x)
        fp8.offer_quantized(x, q, s)
        assert fp8.take_quantized(x.clone()) is None
        fp8.offer_quantized(x, q, s)
        got = fp8.take_quantized(x)
    assert got is not None and got[0] is q


def test_another_tensor_or_an_in_place_change_gets_nothing() -> None:
    x = torch.randn(3, 32)
    fp8.offer_quantized(x, *_codes(x))
    assert fp8.take_quantized(x.clone()) is None  # equal values, other tensor
    assert fp8.take_quantized(x) is None  # the failed take cleared the offer
    fp8.offer_quantized(x, *_codes(x))
    x.mul_(2)  # modified after the offer: its codes are stale
    assert fp8.take_quantized(x) is None


def test_fp8_linear_paths_use_the_offer(monkeypatch: pytest.MonkeyPatch) -> None:
    """fp8_scaled_mm quantizes only without an offer for its input (CPU: the torch path)."""
    calls = []
    real = fp8.quantize_fp8_per_token

    def counting(x2: torch.Tensor):  # noqa: ANN202
        calls.append(x2.shape)
        return real(x2)

    monkeypatch.setattr(fp8, "quantize_fp8_per_token", counting)
    x = torch.randn(4, 32, dtype=torch.bfloat16)
    w, ws = fp8.quantize_fp8_per_channel(torch.randn(16, 32))
    seen = {}

    def fake_mm(xq, wt, scale_a, **kw):  # noqa: ANN001, ANN003, ANN202 - CPU has no FP8 GEMM
        seen["xq"], seen["scale_a"] = xq, scale_a
        return (xq.float() * scale_a) @ (wt.float() * kw["scale_b"])

    monkeypatch.setattr(torch, "_scaled_mm", fake_mm)
    plain = fp8.fp8_scaled_mm(x, w, ws, None)
    assert len(calls) == 1
    q, s = _codes(x)
    q = q.clone()
    q.view(torch.uint8)[0, 0] ^= 1  # a marked code: the layer must use the offered one
    fp8.offer_quantized(x, q, s)
    offered = fp8.fp8_scaled_mm(x, w, ws, None)
    assert len(calls) == 1 and seen["xq"] is q and seen["scale_a"] is s
    assert not torch.equal(offered, plain)  # the marked code changed the product
    assert torch.equal(offered[1:], plain[1:])


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_llama_dir(tmp_path_factory.mktemp("f8h") / "hf", seed=3)


_load = load_cpu


def test_wiring_marks_the_producers_of_fp8_inputs(tiny: Path) -> None:
    model = _load(tiny, "fp8")
    n_layers = len(model.model.layers)
    assert fp8.wire_fused_input_quant(model) == 3 * n_layers
    for layer in model.model.layers:
        assert layer.input_layernorm.fp8_out and layer.post_attention_layernorm.fp8_out
        assert layer.mlp.act.fp8_out
    assert not getattr(model.model.norm, "fp8_out", False)  # feeds lm_head, not FP8


def test_wiring_leaves_a_float_model_alone(tiny: Path) -> None:
    model = _load(tiny, None)
    assert fp8.wire_fused_input_quant(model) == 0
    assert not any(getattr(m, "fp8_out", False) for m in model.modules())
