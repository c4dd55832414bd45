"""MoE decoder layers on the CPU C step (layers/cpu_moe_step.py): Mixtral-, Qwen2-MoE- (a shared
expert behind its sigmoid gate, a dense layer) and Qwen3-MoE-shaped tiny models, kept GGUF
(Q4_0: int4 experts; Q8_0: the Q8_0 block kernel, or int8 with MODELPORT_Q8_CPU=rows) and
float32, take the C step and match the module path step by step on the same KV state, prompt
chunks, a batch of four and one stream alone."""

from __future__ import annotations

import ctypes
from pathlib import Path

import pytest
import torch

from helpers.gguf_archs import write_gguf
from helpers.tiny_moe import make_tiny_moe_dir
from modelport import LLM, SamplingParams
from modelport.layers import cpu_kernels, cpu_moe_step
from modelport.layers.attention import get_forward_context
from modelport.quantization import loading as quant_loading

# intermediate sizes that whole groups of 32 divide (the int4 kernel's groups)
SIZES = {
    "mixtral": dict(intermediate_size=64),
    "qwen2_moe": dict(moe_intermediate_size=64, shared_expert_intermediate_size=64),
    "qwen3_moe": dict(moe_intermediate_size=64),
}
PROMPTS = [[1, 2, 3, 4, 5], list(range(10, 50)), [7, 9] * 9, [200]]


@pytest.fixture(autouse=True)
def _env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(quant_loading, "NARROW_CPU_LM_HEAD", False)  # the head stays fp32
    # keep the GGUF blocks (int4 / int8 kernels) whatever this CPU reports
    monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: "AVX512")


@pytest.fixture(scope="module", params=tuple(SIZES))
def moe_dir(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> tuple[str, Path]:
    arch = request.param
    return arch, make_tiny_moe_dir(tmp_path_factory.mktemp(arch) / "hf", arch, **SIZES[arch])


def _llm(src: Path) -> LLM:
    return LLM(str(src), kv_cache_memory=8 << 20, max_model_len=128, enable_prefix_caching=False)


def _model(llm: LLM):
    return llm.llm_engine.core.runner.model.model


def _both_paths(
    llm: LLM, monkeypatch: pytest.MonkeyPatch, prompts: list[list[int]]
) -> tuple[list[float], list[int], list[list[int]]]:
    """Each step through the C step, then (KV cache restored) through the modules; generation
    follows the modules. Returns each step's relative error of the final hidden states, each
    step's row count, and the greedy tokens."""
    real = cpu_kernels.decode
    errors: list[float] = []
    rows: list[int] = []

    def both(model, x, positions):
        ctx = get_forward_context()
        saved = [c.clone() for c in ctx.kv_caches]
        out = real(model, x, positions)
        assert out is not None, "the C step declined a step"
        for c, s in zip(ctx.kv_caches, saved):
            c.copy_(s)
        model.layers[0].self_attn.rotary_emb.forget_positions()
        residual, h = None, x
        for layer in model.layers:
            h, residual = layer(positions, h, residual)
        ref = model.norm(h, residual)[0]
        assert out.dtype == ref.dtype == torch.float32
        errors.append(float((out - ref).norm() / ref.norm()))
        rows.append(x.shape[0])
        return ref

    monkeypatch.setattr(cpu_kernels, "decode", both)
    p = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)
    outs = llm.generate(prompt_token_ids=prompts, sampling_params=p, use_tqdm=False)
    monkeypatch.setattr(cpu_kernels, "decode", real)
    return errors, rows, [o.outputs[0].token_ids for o in outs]


def _greedy(llm: LLM, on: bool, prompts: list[list[int]]) -> list[list[int]]:
    saved = cpu_kernels.ENABLED
    cpu_kernels.ENABLED = on
    try:
        p = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)
        outs = llm.generate(prompt_token_ids=prompts, sampling_params=p, use_tqdm=False)
        return [o.outputs[0].token_ids for o in outs]
    finally:
        cpu_kernels.ENABLED = saved


def _check_plan(llm: LLM, arch: str, kinds: list[str]) -> cpu_kernels.DecodePlan:
    model = _model(llm)
    plan = model.__dict__.get("_cpu_decode_plan")
    assert isinstance(plan, cpu_kernels.DecodePlan), plan
    assert plan.kinds == kinds
    sparse = [L.moe is not None for L in plan.layers]
    # tiny_moe: Mixtral every layer sparse; Qwen2-MoE layer 1 dense; Qwen3-MoE layers 1, 3
    assert (
        sparse
        == {
            "mixtral": [True, True],
            "qwen2_moe": [True, False, True],
            "qwen3_moe": [False, True, False, True],
        }[arch]
    )
    moe = next(L.moe for L in plan.layers if L.moe is not None)
    assert (moe.shared is not None) == (arch == "qwen2_moe")
    assert len(moe.experts) == 8 and moe.top_k == 2
    return plan


# (source, op kinds, max step error); "q8_0_rows" runs with MODELPORT_Q8_CPU=rows (Q8_0
# requantized per row: CpuInt8Kernel). Measured: Q4_0 / Q8_0 rows mostly <= 1e-7 (the same
# bf16 matmul inputs on both paths), a few steps 2e-5 - 1.2e-3 (a C norm or SwiGLU rounds one
# bf16 value the other way and the sharp routers, logits x 20, pass it on); fp32 <= 4.5e-7
# (C's SwiGLU and norms sum in another order than torch's); Q8_0 (float32 in and out of the
# block kernel on both paths) as fp32
CASES = {
    "q4_0": ("Q4_0", ["int4"], 5e-3),
    "q8_0": ("Q8_0", ["q8_0"], 5e-3),
    "q8_0_rows": ("Q8_0", ["int8"], 5e-3),
    "fp32": (None, ["float"], 1e-5),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_moe_models_take_the_c_step_and_match_the_module_path(
    moe_dir: tuple[str, Path], case: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    arch, hf_dir = moe_dir
    qtype, kinds, tol = CASES[case]
    if case.endswith("_rows"):
        monkeypatch.setenv("MODELPORT_Q8_CPU", "rows")
    src = hf_dir if qtype is None else write_gguf(hf_dir, tmp_path / f"{arch}.gguf", qtype)
    llm = _llm(src)
    errors, rows, module_tokens = _both_paths(llm, monkeypatch, PROMPTS)
    _check_plan(llm, arch, kinds)
    # the prompt step (one chunk longer than CPU_INT8_MAX_M), then decode steps of 4 rows
    assert len(errors) == 8 and rows[0] == sum(map(len, PROMPTS)) and set(rows[1:]) == {4}
    assert max(errors) < tol, errors
    # one stream alone (a batch of one token: the experts in turn) through the same check
    errors1, rows1, _ = _both_paths(llm, monkeypatch, PROMPTS[1:2])
    assert set(rows1[1:]) == {1} and max(errors1) < tol, errors1
    if qtype is None:  # float32 throughout: the same greedy tokens, the C step on or off
        assert _greedy(llm, True, PROMPTS) == _greedy(llm, False, PROMPTS) == module_tokens


@pytest.mark.parametrize("qtype", ["Q4_0", "Q8_0"])
def test_moe_block_ops_equal_the_modules(moe_dir: tuple[str, Path], tmp_path: Path,
                                         qtype: str) -> None:
    """One MoE block run from its plan ops (router, route, experts, shared expert; Q4_0 on the
    int4 kernel, Q8_0 on the block kernel) against the block's module forward on the same
    input, for one row (the C sum) and for several (grouped_experts)."""
    arch, hf_dir = moe_dir
    llm = _llm(write_gguf(hf_dir, tmp_path / f"{arch}.gguf", qtype))
    _greedy(llm, True, PROMPTS[:1])
    model = _model(llm)
    plan = model.__dict__["_cpu_decode_plan"]
    i = next(j for j, L in enumerate(plan.layers) if L.moe is not None)
    block = cpu_kernels._ffn(model.layers[i])
    g = torch.Generator().manual_seed(0)
    for rows in (1, 5):
        xf = torch.randn(rows, 64, generator=g)
        got = plan.layers[i].moe(plan.lib, xf, xf.bfloat16())
        want = block(xf)
        assert got.dtype == torch.float32
        if qtype == "Q8_0":  # experts that take either dtype read float32 x, as their modules
            assert plan.layers[i].moe.dtype == torch.float32
            assert torch.equal(got, plan.layers[i].moe(plan.lib, xf, xf))
        # the same matmuls and sums; only C's SwiGLU may round a bf16 value the other way
        # (measured: equal bit for bit here)
        assert (got == want).float().mean() > 0.99
        assert float((got - want).norm() / want.norm()) < 2e-3


def test_moe_models_that_do_not_fit_keep_the_module_path(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A bfloat16 MoE model (its router runs in bf16 on the module path) is refused with the
    reason; a hook added after the plan was built sends the steps back to the modules until
    it is removed."""
    hf_dir = make_tiny_moe_dir(tmp_path / "hf", "qwen2_moe", **SIZES["qwen2_moe"])
    llm = LLM(str(hf_dir), kv_cache_memory=8 << 20, max_model_len=128, dtype="bfloat16")
    assert cpu_kernels._fits(_model(llm)).startswith("a router not in float32")
    llm = _llm(hf_dir)
    runs: list[int] = []
    run = cpu_kernels.DecodePlan.run
    monkeypatch.setattr(
        cpu_kernels.DecodePlan, "run", lambda self, *a: runs.append(1) or run(self, *a)
    )
    want = _greedy(llm, True, PROMPTS[:1])
    assert runs and isinstance(_model(llm).__dict__["_cpu_decode_plan"], cpu_kernels.DecodePlan)
    seen: list[int] = []
    block = cpu_kernels._ffn(_model(llm).layers[0])
    handle = block.experts.register_forward_hook(lambda *_: seen.append(1))
    runs.clear()
    assert _greedy(llm, True, PROMPTS[:1]) == want
    assert seen and not runs  # every step through the hooked modules
    handle.remove()
    _greedy(llm, True, PROMPTS[:1])
    assert runs  # unhooked: the C step again
    assert cpu_moe_step.MoeFfn.build(block).shared is not None


@pytest.mark.parametrize("k", [2, 4, 8, 16])
@pytest.mark.parametrize("ys_f32", [0, 1])
def test_moe_sum_adds_as_grouped_experts_does(lib, k: int, ys_f32: int) -> None:
    """mp_moe_sum: one token's k expert rows (bf16 from the quantized kernels, or float32)
    weighted and summed in grouped_experts' order, bit for bit (for a width that is a multiple
    of 64, where the plan calls it)."""
    from modelport.layers.fused_moe import grouped_experts

    g = torch.Generator().manual_seed(k)
    h = 320
    ys = [torch.randn(1, h, generator=g) * 3 for _ in range(k)]
    if not ys_f32:
        ys = [y.bfloat16() for y in ys]
    weights = torch.softmax(torch.randn(1, k, generator=g), dim=-1)
    ids = torch.randperm(16, generator=g)[:k].unsqueeze(0)
    by_id = dict(zip(ids[0].tolist(), ys))
    want = grouped_experts(torch.zeros(1, h), 16, lambda e, _x: by_id[e], weights, ids)
    ptrs = (ctypes.c_void_p * k)(*[y.data_ptr() for y in ys])
    out = torch.full((1, h), float("nan"))
    lib.mp_moe_sum(k, h, ptrs, ys_f32, weights.data_ptr(), out.data_ptr())
    assert torch.equal(out, want)
