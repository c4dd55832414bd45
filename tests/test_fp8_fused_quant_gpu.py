"""FP8 activations quantized by the kernel producing them (MODELPORT_FP8_FUSED_QUANT=1): the
fused RMSNorm / SiLU-and-multiply kernels write the same E4M3 codes and scales the separate
quantizer computes from their output, bit for bit, and the engine then launches the quantizer
only for o_proj, with identical tokens and logprobs. Run on the GPU machine (-m gpu)."""

from __future__ import annotations

import pytest
import torch

from helpers.tiny_models import make_tiny_llama_dir

pytestmark = pytest.mark.gpu


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.view(torch.uint8)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("rows,n", [(2, 4096), (3, 1000), (300, 4096)])
@pytest.mark.parametrize("with_residual", [False, True])
def test_rms_norm_quant_equals_norm_then_quantizer(dtype, rows, n, with_residual) -> None:
    from modelport.layers import fused_ops as fo
    from modelport.quantization import triton_fp8

    g = torch.Generator(device="cuda").manual_seed(rows * n)
    x = torch.randn(rows, n, device="cuda", generator=g).to(dtype) * 3
    r = torch.randn(rows, n, device="cuda", generator=g).to(dtype) if with_residual else None
    w = torch.randn(n, device="cuda", generator=g).to(dtype)
    plain = fo.rms_norm(x, w, 1e-5, r)
    fused, q, s = fo.rms_norm_quant(x, w, 1e-5, r)
    out = plain if r is None else plain[0]
    if r is not None:
        assert torch.equal(fused[0], plain[0]) and torch.equal(fused[1], plain[1])
    else:
        assert torch.equal(fused, plain)
    q_ref, s_ref = triton_fp8.quantize_per_token(out)
    assert torch.equal(s, s_ref)
    assert torch.equal(_bits(q), _bits(q_ref))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("rows,n", [(2, 14336), (3, 1000), (300, 14336)])
def test_silu_and_mul_quant_equals_silu_then_quantizer(dtype, rows, n) -> None:
    from modelport.layers import fused_ops as fo
    from modelport.quantization import triton_fp8

    g = torch.Generator(device="cuda").manual_seed(rows + n)
    x = (torch.randn(rows, 2 * n, device="cuda", generator=g) * 4).to(dtype)
    plain = fo.silu_and_mul(x)
    fused, q, s = fo.silu_and_mul_quant(x)
    assert torch.equal(fused, plain)
    q_ref, s_ref = triton_fp8.quantize_per_token(plain)
    assert torch.equal(s, s_ref)
    assert torch.equal(_bits(q), _bits(q_ref))


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return make_tiny_llama_dir(tmp_path_factory.mktemp("f8q") / "m", hidden_size=256,
                               num_heads=4, num_kv_heads=1, intermediate_size=512, num_layers=3)


PROMPTS = [[256] + [(7 * i + j) % 250 for i in range(11)] for j in range(4)]


def _run(model_dir, monkeypatch, fused: bool, eager: bool):
    from modelport import LLM, SamplingParams
    from modelport.quantization import triton_fp8

    monkeypatch.setenv("MODELPORT_FP8_FUSED_QUANT", "1" if fused else "0")
    calls = []
    real = triton_fp8.quantize_per_token

    def counting(x2):  # noqa: ANN001, ANN202
        calls.append(x2.shape[0])
        return real(x2)

    monkeypatch.setattr(triton_fp8, "quantize_per_token", counting)
    llm = LLM(str(model_dir), device="cuda", dtype="bfloat16", quantization="fp8",
              max_model_len=256, block_size=16, gpu_memory_utilization=0.3,
              enforce_eager=eager)
    params = SamplingParams(temperature=0, max_tokens=5, ignore_eos=True, logprobs=3)
    calls.clear()  # start-up (profiling run, graph capture) does not count
    outs = [o.outputs[0] for o in llm.generate(prompt_token_ids=PROMPTS, sampling_params=params,
                                               use_tqdm=False)]
    del llm
    torch.cuda.empty_cache()
    return outs, len(calls)


@pytest.mark.parametrize("eager", [True, False])
def test_engine_quantizes_only_o_proj_and_gives_the_same_outputs(model_dir, monkeypatch, eager):
    base, n_base = _run(model_dir, monkeypatch, False, eager)
    fused, n_fused = _run(model_dir, monkeypatch, True, eager)
    for a, b in zip(base, fused):
        assert a.token_ids == b.token_ids
        for da, db in zip(a.logprobs, b.logprobs):
            assert {t: lp.logprob for t, lp in da.items()} == {t: lp.logprob for t, lp in db.items()}
    if eager:  # every step has >= 4 rows: 4 quantizer launches a layer, then only o_proj's
        assert n_fused > 0 and n_base == 4 * n_fused
