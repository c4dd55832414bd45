"""The C step (layers/cpu_kernels.py) for more than int4 models: GGUF files whose linear layers
run the Q8_0 block kernel (Q8_0), the int8 kernel (Q8_0 with MODELPORT_Q8_CPU=rows) or a mix of
the int4, int8 and Q8_0 kernels (a Q4_K_M-like file), and
plain float models (float32, bfloat16 with either KV cache dtype), and Qwen3 (q / k RMSNorm
per head in the C attention call). Each takes the C path and matches the module path step by
step on the same KV state; the C functions' float32 and bf16-cache variants are checked
against the torch ops they replace."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from helpers.tiny_models import make_tiny_llama_dir, make_tiny_llama_gguf, make_tiny_qwen2_dir
from modelport import LLM, SamplingParams
from modelport.layers import cpu_kernels
from modelport.layers.attention import (
    AttentionMetadata,
    get_forward_context,
    reference_paged_attention,
    write_kv,
)
from modelport.layers.rotary import RopeSettings, RotaryEmbedding
from modelport.quantization.kernels import (
    CPU_INT8_MAX_M,
    CPU_Q8I_MAX_M,
    CpuInt4Kernel,
    CpuInt8Kernel,
    CpuQ8Kernel,
)


def test_add_rmsnorm_float32_delta(lib) -> None:
    g = torch.Generator().manual_seed(1)
    rows, h, eps = 3, 200, 1e-6
    resid = torch.randn(rows, h, generator=g)
    delta = torch.randn(rows, h, generator=g)
    w = torch.rand(h, generator=g) + 0.5
    out = torch.empty(rows, h)
    r = resid.clone()
    lib.mp_add_rmsnorm_io(rows, h, r.data_ptr(), delta.data_ptr(), 1, w.data_ptr(), eps, None,
                          out.data_ptr())
    assert torch.equal(r, resid + delta)
    torch.testing.assert_close(out, torch.rms_norm(resid + delta, (h,), w, eps), rtol=1e-5,
                               atol=1e-5)


def test_silu_mul_float32(lib) -> None:
    g = torch.Generator().manual_seed(2)
    gu = torch.randn(3, 2 * 96, generator=g) * 4
    out = torch.empty(3, 96)
    lib.mp_silu_mul_io(3, 96, gu.data_ptr(), out.data_ptr(), 1)
    gate, up = gu.chunk(2, dim=-1)
    torch.testing.assert_close(out, F.silu(gate) * up, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize(("io_f32", "cache_dtype"), [(1, torch.float32), (1, torch.bfloat16),
                                                     (0, torch.bfloat16)])
def test_decode_attention_float32_io_and_bf16_cache(lib, io_f32: int,
                                                    cache_dtype: torch.dtype) -> None:
    """mp_decode_attention_io with float32 qkv / output (a float32 model's matmuls) and with a
    bf16 paged cache (written rounded to nearest even, read widened), over scattered blocks,
    against RotaryEmbedding + write_kv + reference_paged_attention."""
    g = torch.Generator().manual_seed(3)
    nh, nkv, hd, bs = 8, 2, 32, 16
    seq_lens = [45, 16, 3, 130]
    rows, nb = len(seq_lens), sum(-(-n // bs) for n in seq_lens) + 3
    qkv_n = (nh + 2 * nkv) * hd
    cache = torch.randn(2, nb, bs, nkv, hd, generator=g).to(cache_dtype)
    tables = torch.zeros(rows, max(-(-n // bs) for n in seq_lens), dtype=torch.int32)
    free = torch.randperm(nb, generator=g).tolist()
    for r, n in enumerate(seq_lens):
        for j in range(-(-n // bs)):
            tables[r, j] = free.pop()
    slots = torch.tensor([int(tables[r, (n - 1) // bs]) * bs + (n - 1) % bs
                          for r, n in enumerate(seq_lens)], dtype=torch.int64)
    positions = torch.tensor([n - 1 for n in seq_lens], dtype=torch.int64)
    qkv = torch.randn(rows, qkv_n, generator=g)
    if not io_f32:
        qkv = qkv.bfloat16()
    rotary = RotaryEmbedding(hd, RopeSettings(theta=10000.0, scaling=None, max_position=512))
    scale = hd**-0.5

    ref_cache = cache.clone()
    q, k, v = qkv.float().split((nh * hd, nkv * hd, nkv * hd), dim=-1)
    q, k = rotary(positions, q, k)
    write_kv(ref_cache, k.reshape(rows, nkv, hd).to(cache_dtype),
             v.reshape(rows, nkv, hd).to(cache_dtype), slots)
    meta = AttentionMetadata(
        slot_mapping=slots, query_start_loc=torch.arange(rows + 1, dtype=torch.int32),
        seq_lens=torch.tensor(seq_lens, dtype=torch.int32), block_tables=tables,
        max_query_len=1, max_seq_len=max(seq_lens), query_start_loc_cpu=list(range(rows + 1)),
        seq_lens_cpu=seq_lens, block_size=bs)
    expect = reference_paged_attention(q.view(rows, nh, hd), ref_cache.float(), meta, scale)
    expect = expect.reshape(rows, nh * hd)

    out = torch.empty(rows, nh * hd, dtype=torch.float32 if io_f32 else torch.bfloat16)
    work = torch.full((cpu_kernels.attention_work_floats(rows, nh, nkv, hd, 1),), float("nan"))
    row_req = torch.arange(rows, dtype=torch.int32)
    attend = torch.ones(rows, dtype=torch.uint8)
    rows_of = torch.empty(rows, dtype=torch.int32)
    lib.mp_decode_attention_io(rows, nh, nkv, hd, hd, qkv.data_ptr(), None,
                               rotary.cos_sin_cache.data_ptr(), positions.data_ptr(),
                               cache.data_ptr(), nb, bs, slots.data_ptr(), tables.data_ptr(),
                               tables.shape[1], row_req.data_ptr(), meta.seq_lens.data_ptr(),
                               attend.data_ptr(), scale, out.data_ptr(), work.data_ptr(),
                               rows_of.data_ptr(), 1, io_f32, int(cache_dtype == torch.bfloat16),
                               None, None, 0.0)
    if cache_dtype == torch.float32:
        torch.testing.assert_close(cache, ref_cache, rtol=1e-6, atol=1e-6)
    else:  # the same bf16 values, now and then one rounding step apart (rotary's sums)
        assert (cache.float() - ref_cache.float()).abs().max() <= 2**-7 * 8
        assert (cache == ref_cache).float().mean() > 0.99
    if io_f32:
        torch.testing.assert_close(out, expect, rtol=1e-4, atol=1e-5)
    else:
        assert (out.float() - expect).abs().max() <= expect.abs().max() * 2**-7


# -- whole models: the C path against the module path ----------------------------------------

@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory) -> Path:
    return make_tiny_llama_dir(tmp_path_factory.mktemp("tiny"), num_layers=3)


@pytest.fixture(scope="module")
def gguf_q8(tiny_dir, tmp_path_factory) -> Path:
    return make_tiny_llama_gguf(tiny_dir, tmp_path_factory.mktemp("q8") / "m.gguf", "Q8_0")


@pytest.fixture(scope="module")
def gguf_mix(tiny_dir, tmp_path_factory) -> Path:
    """Q4_0 (int4 kernel) with attn_v and ffn_down in Q8_0, as a Q4_K_M file keeps those in
    Q6_K: the fused qkv (Q4_0 q / k beside the Q8_0 v) runs int8, down (Q8_0 alone) the Q8_0
    block kernel, o and gate/up int4."""
    return make_tiny_llama_gguf(tiny_dir, tmp_path_factory.mktemp("mix") / "m.gguf", "Q4_0",
                                {"attn_v.weight": "Q8_0", "ffn_down.weight": "Q8_0"})


@pytest.fixture(scope="module")
def qwen2_dir(tmp_path_factory) -> Path:
    """Bias on q / k / v: F.linear's for the float model, the C call's for a quantized one."""
    return make_tiny_qwen2_dir(tmp_path_factory.mktemp("qwen2"))


@pytest.fixture(scope="module")
def qwen2_q8(qwen2_dir, tmp_path_factory) -> Path:
    return make_tiny_llama_gguf(qwen2_dir, tmp_path_factory.mktemp("q2q8") / "m.gguf", "Q8_0")


PROMPTS = [[1, 2, 3, 4, 5], list(range(10, 60)), [7, 9] * 9, [200]]


def _both_paths(llm: LLM, monkeypatch) -> tuple[list[float], list[list[int]]]:
    """Every step of a greedy run through the C path and then (the KV cache restored) the
    module path; generation follows the module path. Returns each step's relative error of
    the final hidden states and the greedy tokens."""
    real = cpu_kernels.decode
    errors: list[float] = []

    def both(model, x, positions):
        ctx = get_forward_context()
        saved = [c.clone() for c in ctx.kv_caches]
        out = real(model, x, positions)
        assert out is not None, "the C path declined a step"
        for c, s in zip(ctx.kv_caches, saved):
            c.copy_(s)
        model.layers[0].self_attn.rotary_emb.forget_positions()
        residual, h = None, x
        for layer in model.layers:
            h, residual = layer(positions, h, residual)
        ref = model.norm(h, residual)[0]
        assert out.dtype == ref.dtype
        errors.append(float((out.float() - ref.float()).norm() / ref.float().norm()))
        return ref

    monkeypatch.setattr(cpu_kernels, "decode", both)
    p = SamplingParams(temperature=0, max_tokens=10, ignore_eos=True)
    outs = llm.generate(prompt_token_ids=PROMPTS, sampling_params=p, use_tqdm=False)
    monkeypatch.setattr(cpu_kernels, "decode", real)
    return errors, [o.outputs[0].token_ids for o in outs]


def _greedy(llm: LLM, on: bool) -> list[list[int]]:
    saved = cpu_kernels.ENABLED
    cpu_kernels.ENABLED = on
    try:
        p = SamplingParams(temperature=0, max_tokens=10, ignore_eos=True)
        outs = llm.generate(prompt_token_ids=PROMPTS, sampling_params=p, use_tqdm=False)
        return [o.outputs[0].token_ids for o in outs]
    finally:
        cpu_kernels.ENABLED = saved


def _kernels(llm: LLM) -> list[str]:
    model = llm.llm_engine.core.runner.model.model
    return [type(getattr(lin, "qkernel", None)).__name__ for lin in
            (model.layers[0].self_attn.qkv_proj, model.layers[0].self_attn.o_proj,
             model.layers[0].mlp.gate_up_proj, model.layers[0].mlp.down_proj)]


def _plan(llm: LLM) -> cpu_kernels.DecodePlan:
    plan = llm.llm_engine.core.runner.model.model.__dict__.get("_cpu_decode_plan")
    assert isinstance(plan, cpu_kernels.DecodePlan), plan
    return plan


# (source, LLM kwargs, expected kernels of qkv / o / gate_up / down, max step error); a case
# ending in "_rows" runs with MODELPORT_Q8_CPU=rows (Q8_0 requantized per row, CpuInt8Kernel).
# Measured: int4 / int8 <= 1e-7 (3 layers; matmul inputs rounded to bf16 alike on both paths,
# so a differing rounding is rare), float32 ~3e-7, bfloat16 ~7e-3 (the module path keeps
# the residual stream and every op's output in bf16, the C path in float32)
CASES = {
    "q8_0": ("q8", {}, ["CpuQ8Kernel"] * 4, 1e-3),
    "q8_0_rows": ("q8", {}, ["CpuInt8Kernel"] * 4, 1e-3),
    # Q8_0 attn_v fused with Q4_0 q / k: int8; Q8_0 ffn_down alone: the block kernel. In this
    # bf16 step the C path gives down its bf16 SwiGLU output, the module path float32, and
    # the block kernel quantizes each to int8 per block: codes near a rounding boundary differ
    # (measured 5.1e-3, output float32 on both; the rows case below <= 1e-7)
    "q4_mix": ("mix", {}, ["CpuInt8Kernel", "CpuInt4Kernel", "CpuInt4Kernel", "CpuQ8Kernel"],
               1e-2),
    "q4_mix_rows": ("mix", {}, ["CpuInt8Kernel", "CpuInt4Kernel", "CpuInt4Kernel",
                                "CpuInt8Kernel"], 1e-3),
    "fp32": ("dir", {}, ["NoneType"] * 4, 1e-5),
    "bf16": ("dir", {"dtype": "bfloat16"}, ["NoneType"] * 4, 1.5e-2),
    "bf16_fp32_cache": ("dir", {"dtype": "bfloat16", "kv_cache_dtype": "float32"},
                        ["NoneType"] * 4, 1.5e-2),
    "qwen2_fp32": ("qwen2", {}, ["NoneType"] * 4, 1e-5),
    "qwen2_q8_0": ("qwen2_q8", {}, ["CpuQ8Kernel"] * 4, 1e-3),
    "qwen2_q8_0_rows": ("qwen2_q8", {}, ["CpuInt8Kernel"] * 4, 1e-3),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_models_take_the_c_path_and_match_the_module_path(case: str, request,
                                                          monkeypatch) -> None:
    src_name, kwargs, kernels, tol = CASES[case]
    if case.endswith("_rows"):
        monkeypatch.setenv("MODELPORT_Q8_CPU", "rows")
    src = request.getfixturevalue({"q8": "gguf_q8", "mix": "gguf_mix", "dir": "tiny_dir",
                                   "qwen2": "qwen2_dir", "qwen2_q8": "qwen2_q8"}[src_name])
    llm = LLM(str(src), kv_cache_memory=8 << 20, max_model_len=128, enable_prefix_caching=False,
              **kwargs)
    assert _kernels(llm) == kernels
    errors, module_tokens = _both_paths(llm, monkeypatch)
    plan = _plan(llm)
    # prompt steps (one > CPU_INT8_MAX_M rows: the int8 kernel's expanded-weight branch) and
    # decode steps all went through the C path
    assert len(errors) == 10 and max(len(p) for p in PROMPTS) > CPU_INT8_MAX_M
    assert max(errors) < tol, errors
    # float32 for float32 weights and where every matmul is Q8_0 (which takes either dtype)
    expect_dtype = torch.bfloat16 if "bf16" in case else (
        torch.float32 if src_name in ("dir", "qwen2") or set(kernels) == {"CpuQ8Kernel"}
        else torch.bfloat16)
    assert plan.dtype == expect_dtype
    qkv = llm.llm_engine.core.runner.model.model.layers[0].self_attn.qkv_proj
    # a quantized qkv bias is added in C (float32); a float layer's is in F.linear
    assert (plan.layers[0].bias is not None) == (qkv.bias is not None and src_name == "qwen2_q8")
    assert (qkv.bias is not None) == src_name.startswith("qwen2")
    if case.endswith("fp32"):  # float32 throughout: the same greedy tokens, the C path on or off
        assert _greedy(llm, True) == _greedy(llm, False) == module_tokens


def test_int8_layers_run_the_kernels_own_op(gguf_mix) -> None:
    """The C path calls each linear layer through exactly the op its kernel's forward runs
    (int8: torch's int8 GEMM up to CPU_INT8_MAX_M rows, the expanded weight above; Q8_0: its
    C kernel up to CPU_Q8I_MAX_M rows, the expanded weight above), so its matmuls equal the
    module path's bit for bit."""
    llm = LLM(str(gguf_mix), kv_cache_memory=8 << 20, max_model_len=128)
    _greedy(llm, True)
    plan = _plan(llm)
    layer = llm.llm_engine.core.runner.model.model.layers[1]
    g = torch.Generator().manual_seed(0)
    for lin, (small, large) in zip((layer.self_attn.qkv_proj, layer.self_attn.o_proj,
                                    layer.mlp.gate_up_proj, layer.mlp.down_proj),
                                   (plan.layers[1].qkv, plan.layers[1].o,
                                    plan.layers[1].gate_up, plan.layers[1].down)):
        assert type(lin.qkernel) in (CpuInt4Kernel, CpuInt8Kernel, CpuQ8Kernel)
        for rows, (fn, args) in ((3, small), (CPU_INT8_MAX_M + 5, large),
                                 (CPU_Q8I_MAX_M + 5, large)):
            x = torch.randn(rows, lin.input_size, generator=g).bfloat16()
            got = fn(x, *args)  # bf16; a Q8_0 o / down projection float32 (a bf16 plan)
            assert got.dtype == (torch.float32 if lin in (layer.self_attn.o_proj,
                                 layer.mlp.down_proj) and type(lin.qkernel) is CpuQ8Kernel
                                 else torch.bfloat16)
            assert torch.equal(got, lin.qkernel(x.float()).to(got.dtype))
    assert [type(lin.qkernel) for lin in (layer.self_attn.qkv_proj, layer.mlp.down_proj)] == [
        CpuInt8Kernel, CpuQ8Kernel]
    assert plan.kinds == ["int4", "int8", "q8_0"]


def test_mixed_float32_and_bf16_matmuls_keep_the_module_path(tiny_dir) -> None:
    """One float32 layer beside int4 / int8 ones: the C calls between matmuls write one
    dtype, so the plan is refused (with the reason) and the model runs its modules."""
    llm = LLM(str(tiny_dir), kv_cache_memory=8 << 20, max_model_len=128)
    model = llm.llm_engine.core.runner.model.model
    lin = model.layers[1].mlp.down_proj
    lin.weight.data = lin.weight.data.bfloat16()
    assert cpu_kernels._fits(model) == ("float32 matmuls beside bf16 ones (int4 / int8 kernels "
                                        "or bf16 weights)")


def test_qwen3_q_k_norms_in_the_c_attention(tmp_path, monkeypatch) -> None:
    """Qwen3: each q and k head RMS-normed (its own weights, moved away from 1 here so that a
    missing or swapped norm shows) before rotary, inside the C attention call: the C path is
    taken and matches the module path; float32 gives the same greedy tokens on or off."""
    from transformers import Qwen3Config, Qwen3ForCausalLM

    from helpers.tiny_models import _save

    cfg = Qwen3Config(vocab_size=259, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                      max_position_embeddings=256, rms_norm_eps=1e-6, bos_token_id=256,
                      eos_token_id=257, pad_token_id=258, initializer_range=0.1)
    torch.manual_seed(1)
    hf = Qwen3ForCausalLM(cfg)
    with torch.no_grad():
        for name, p in hf.named_parameters():
            if "q_norm" in name or "k_norm" in name:
                p.add_(torch.randn_like(p) * 0.5)
    _save(hf.eval(), tmp_path / "qwen3", with_tokenizer=True)
    llm = LLM(str(tmp_path / "qwen3"), kv_cache_memory=8 << 20, max_model_len=128,
              enable_prefix_caching=False)
    errors, module_tokens = _both_paths(llm, monkeypatch)
    plan = _plan(llm)
    assert plan.layers[0].qn is not None and plan.layers[0].kn is not None
    assert len(errors) == 10 and max(errors) < 1e-5, errors
    assert _greedy(llm, True) == _greedy(llm, False) == module_tokens


def test_forward_hooks_keep_the_module_path(tmp_path, monkeypatch) -> None:
    """Calibration (modelport quantize) reads each linear layer's inputs through forward
    hooks, which the C step would skip: a model hooked after its plan was built runs its
    modules while hooked, and the C step again once unhooked."""
    from modelport.layers.linear import Linear

    llm = LLM(str(make_tiny_llama_dir(tmp_path / "m")), kv_cache_memory=8 << 20)
    params = SamplingParams(temperature=0, max_tokens=3, ignore_eos=True)
    runs: list[int] = []
    run = cpu_kernels.DecodePlan.run
    monkeypatch.setattr(cpu_kernels.DecodePlan, "run",
                        lambda self, *a: runs.append(1) or run(self, *a))
    want = llm.generate([{"prompt_token_ids": [5, 6, 7]}], params)[0].outputs[0].token_ids
    model = llm.llm_engine.core.runner.model.model
    assert type(model.__dict__["_cpu_decode_plan"]) is cpu_kernels.DecodePlan and runs
    seen: list[int] = []
    handles = [m.register_forward_hook(lambda _m, args, _out: seen.append(args[0].shape[0]))
               for m in model.modules() if isinstance(m, Linear)]
    runs.clear()
    got = llm.generate([{"prompt_token_ids": [5, 6, 7]}], params)[0].outputs[0].token_ids
    assert seen and not runs and got == want  # every step through the hooked modules
    for h in handles:
        h.remove()
    llm.generate([{"prompt_token_ids": [5, 6, 7]}], params)
    assert runs  # unhooked: the C step again
