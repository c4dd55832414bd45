"""Quantized MoE experts on CPU: GGUF files kept in their blocks, AWQ / GPTQ checkpoints, FP8.

Each expert becomes its own gate/up and down linear layers (FusedMoE.unstack) that the format's
LinearMethod takes over; routers stay in floats. Checked against the same weights in floats:
with the reference dequantization kernel the quantized model must reproduce the float model
(same weights, same routing) to float rounding; with the fast CPU kernels (int4 / int8 GEMMs,
bf16 activations) the tokens must mostly agree.
"""

from __future__ import annotations

import logging
import re
from pathlib import Path

import pytest
import torch

from helpers.gguf_archs import write_gguf
from helpers.tiny_models import TINY_PROMPT as PROMPT
from helpers.tiny_models import load_cpu, run_one_sequence
from helpers.tiny_moe import make_tiny_moe_dir as make_moe_dir
from modelport import LLM, SamplingParams
from modelport.layers.fused_moe import (
    ExpertMLP,
    FusedMoE,
    GateLinear,
    grouped_experts,
    moe_reference,
    route,
)
from modelport.layers.linear import Linear
from modelport.quantization import kernels
from modelport.quantization import loading as quant_loading
from modelport.quantization.tools.writer import is_quantizable
from test_quant_awq_gptq import quantize_folder

# intermediate sizes that whole groups of 32 / 64 divide (the int4 kernel's groups)
SIZES = {"mixtral": dict(intermediate_size=64),
         "qwen2_moe": dict(moe_intermediate_size=64, shared_expert_intermediate_size=64),
         "qwen3_moe": dict(moe_intermediate_size=64)}


@pytest.fixture(autouse=True)
def _cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MODELPORT_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(quant_loading, "NARROW_CPU_LM_HEAD", False)  # the head stays fp32


@pytest.fixture(scope="module", params=tuple(SIZES))
def moe(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
        ) -> tuple[str, Path]:
    arch = request.param
    return arch, make_moe_dir(tmp_path_factory.mktemp(arch) / "hf", arch, **SIZES[arch])


def _reference_kernels(monkeypatch: pytest.MonkeyPatch) -> None:
    """Every quantized layer on DequantKernel: codes * scale + zero in fp32, then F.linear."""
    monkeypatch.setattr(kernels, "cpu_int4_fits", lambda gq: False)
    monkeypatch.setattr(kernels, "cpu_int8_fits", lambda gq: False)
    monkeypatch.setenv("MODELPORT_Q8_CPU", "rows")  # Q8_0 off its block kernel too


def _expert_layers(model: torch.nn.Module) -> list[torch.nn.Module]:
    return [m for m in model.modules() if isinstance(m, ExpertMLP)]


def _check_layout(model: torch.nn.Module, kernel: type) -> None:
    experts = _expert_layers(model)
    assert experts, "the experts were not split into per-expert layers"
    for e in experts:
        assert type(e.gate_up_proj.qkernel) is kernel and type(e.down_proj.qkernel) is kernel
    routers = [m for m in model.modules() if isinstance(m, GateLinear)]
    assert routers and all(m.quant_method is None and m.weight.dtype == torch.float32
                           for m in routers)
    # every other linear layer is quantized too (attention, dense and shared-expert MLPs)
    plain = [n for n, m in model.named_modules()
             if type(m) is not GateLinear and isinstance(m, Linear) and m.quant_method is None]
    assert plain == []


def _agreement(got: torch.Tensor, want: torch.Tensor) -> float:
    return (got.argmax(-1) == want.argmax(-1)).float().mean().item()


def test_unstacked_experts_compute_the_stacked_sum() -> None:
    torch.manual_seed(0)
    moe = FusedMoE(num_experts=6, top_k=2, hidden_size=32, intermediate_size=48,
                   renormalize=True)
    w13, w2 = torch.randn(6, 96, 32) * 0.2, torch.randn(6, 32, 48) * 0.2
    moe.w13.weight.data.copy_(w13)
    moe.w2.weight.data.copy_(w2)
    x, logits = torch.randn(11, 32), torch.randn(11, 6)
    want = moe(x, logits)
    moe.unstack()
    assert not hasattr(moe, "w13") and len(_expert_layers(moe)) == 6
    for e in range(6):
        moe.get_submodule(str(e)).gate_up_proj.weight.data.copy_(w13[e])
        moe.get_submodule(str(e)).down_proj.weight.data.copy_(w2[e])
    torch.testing.assert_close(moe(x, logits), want, atol=1e-6, rtol=1e-6)
    weights, ids = route(logits, 2, True)
    torch.testing.assert_close(want, moe_reference(x, w13, w2, weights, ids))


def test_one_token_takes_its_experts_in_turn_with_the_same_sums() -> None:
    # single-stream decode skips the sort / gather; with a per-row expert (no GEMM whose
    # rounding depends on the row count) a row's result is the same alone as in a batch
    torch.manual_seed(1)
    x = torch.randn(6, 16)
    weights, ids = route(torch.randn(6, 8), 3, True)

    def expert(e: int, xs: torch.Tensor) -> torch.Tensor:
        return torch.tanh(xs * (e + 1)) + e

    batch = grouped_experts(x, 8, expert, weights, ids)
    for i in range(6):
        one = grouped_experts(x[i:i + 1], 8, expert, weights[i:i + 1], ids[i:i + 1])
        assert torch.equal(one, batch[i:i + 1])


@pytest.mark.parametrize("qtype,q8_cpu,kernel", [("Q4_0", None, kernels.CpuInt4Kernel),
                                                 ("Q8_0", None, kernels.CpuQ8Kernel),
                                                 ("Q8_0", "rows", kernels.CpuInt8Kernel)])
def test_gguf_experts_stay_in_their_blocks(
    moe: tuple[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch, qtype: str,
    q8_cpu: str | None, kernel: type, caplog: pytest.LogCaptureFixture,
) -> None:
    arch, hf_dir = moe
    if q8_cpu is not None:  # Q8_0 requantized per row (CpuInt8Kernel), as before the default
        monkeypatch.setenv("MODELPORT_Q8_CPU", q8_cpu)
    path = write_gguf(hf_dir, tmp_path / f"{arch}-{qtype}.gguf", qtype)
    floats = run_one_sequence(load_cpu(path, "none"), PROMPT)  # every block dequantized
    # the default on an AVX2 / AVX-512 CPU keeps the file's blocks, experts included
    monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: "AVX512")
    with caplog.at_level(logging.INFO):
        model = load_cpu(path)
    assert "kept quantized" in caplog.text and "dequantized at load" not in caplog.text
    _check_layout(model, kernel)
    assert {t for e in _expert_layers(model) for t in e.gate_up_proj.gguf_types} == {qtype}
    got = run_one_sequence(model, PROMPT)
    # int4 / int8 GEMMs with bf16 activations (Q8_0's block kernel: x in int8 per block); the routers (logits x 20 in these models)
    # turn small differences into other expert weights, so compare tokens
    assert _agreement(got, floats) >= 0.9
    _reference_kernels(monkeypatch)
    exact = run_one_sequence(load_cpu(path, "gguf"), PROMPT)
    torch.testing.assert_close(exact, floats, atol=2e-4, rtol=1e-4)


def _quantizable(name: str) -> bool:  # Mixtral's experts are named w1 / w3 / w2
    return is_quantizable(name) or re.search(r"\.experts\.\d+\.w[123]\.weight$", name) is not None


@pytest.mark.parametrize("method,bits,act_order", [("awq", 4, False), ("gptq", 4, True),
                                                   ("gptq", 8, False)])
def test_awq_gptq_checkpoints_load_and_run(
    moe: tuple[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch, method: str,
    bits: int, act_order: bool,
) -> None:
    arch, hf_dir = moe
    qdir, rdir = quantize_folder(hf_dir, tmp_path, method, bits, 32, act_order=act_order,
                                 quantizable=_quantizable)
    ref = run_one_sequence(load_cpu(rdir), PROMPT)  # the written codes, dequantized, in floats
    # 4-bit codes take the int4 kernel (act-order: input columns permuted once), 8-bit the int8
    fast = load_cpu(qdir)
    _check_layout(fast, kernels.CpuInt4Kernel if bits == 4 else kernels.CpuInt8Kernel)
    assert _agreement(run_one_sequence(fast, PROMPT), ref) >= 0.9
    _reference_kernels(monkeypatch)
    exact = run_one_sequence(load_cpu(qdir), PROMPT)
    torch.testing.assert_close(exact, ref, atol=2e-4, rtol=1e-4)


def test_engine_serves_a_kept_gguf_moe_and_online_fp8(tmp_path: Path) -> None:
    # one family end to end (the layers are shared): Qwen2-MoE, a shared expert and a dense layer
    hf_dir = make_moe_dir(tmp_path / "hf", "qwen2_moe", **SIZES["qwen2_moe"])
    path = write_gguf(hf_dir, tmp_path / "m-q8.gguf", "Q8_0")
    prompts = [PROMPT[:9], PROMPT[:23]]
    params = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True)
    for llm in (LLM(str(path), quantization="gguf", kv_cache_memory=8 << 20),
                LLM(str(hf_dir), quantization="fp8", kv_cache_memory=8 << 20)):
        model = llm.llm_engine.core.runner.model
        assert _expert_layers(model) and all(e.down_proj.quant_method is not None
                                             for e in _expert_layers(model))
        together = [o.outputs[0].token_ids for o in llm.generate(
            [{"prompt_token_ids": p} for p in prompts], params)]
        alone = [llm.generate([{"prompt_token_ids": p}], params)[0].outputs[0].token_ids
                 for p in prompts]
        assert [len(t) for t in together] == [6, 6]
        assert together == alone  # a request's tokens do not depend on its batch


def test_quantized_moe_is_refused_where_it_cannot_run(moe: tuple[str, Path]) -> None:
    from modelport.loader import load_model_config, resolve_model
    from modelport.quantization.loading import resolve_quantization

    arch, hf_dir = moe
    src = resolve_model(str(hf_dir))
    # FP8 / AWQ / GPTQ experts run on CUDA (tests/test_moe_quantized_cuda.py); NF4 does not
    with pytest.raises(ValueError, match=r"\(bitsandbytes\) MoE experts are not supported on CUDA"):
        resolve_quantization("bitsandbytes", src, load_model_config(src), "cuda",
                             load_format="dummy")
    # (tensor_parallel_size > 1 splits them: tests/test_moe_tensor_parallel_quant.py)
