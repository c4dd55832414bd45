"""The CPU decode step with its small ops fused in C (layers/cpu_kernels.py, csrc/cpu_decode.c):
each C function against the torch ops it replaces, then the embedded default model's decode
steps through both paths on the same state, and a chat answer through the C path."""

from __future__ import annotations

import ctypes
import shutil
import subprocess

import pytest
import torch
import torch.nn.functional as F

from helpers.tiny_models import _byte_level_tokenizer
from modelport import LLM, SamplingParams
from modelport.layers import cpu_kernels
from modelport.layers.attention import (
    AttentionMetadata,
    reference_paged_attention,
    write_kv,
)
from modelport.layers.rotary import RopeSettings, RotaryEmbedding


@pytest.fixture(scope="module")
def always_split(tmp_path_factory) -> ctypes.CDLL:
    """The same C file built to use every thread it is given, even for one row (the default
    build keeps single rows on one thread), so the split of one row's context positions over
    threads and the merge of their partial softmaxes are checked."""
    cc = shutil.which("cc") or shutil.which("gcc")
    out = tmp_path_factory.mktemp("split") / "libsplit.so"
    subprocess.run([cc, "-O3", "-fPIC", "-shared", "-fopenmp-simd", "-ffp-contract=off",
                    "-pthread", "-DMIN_SPLIT_WORK=0", "-DMIN_SPLIT_ITEMS_PER_THREAD=0", "-o",
                    str(out), str(cpu_kernels._SRC), "-lm"], check=True)
    lib = ctypes.CDLL(str(out))
    lib.mp_decode_attention.argtypes = cpu_kernels._SIGNATURES["mp_decode_attention"]
    lib.mp_decode_attention.restype = None
    return lib


def ptr(t: torch.Tensor | None) -> int | None:
    return None if t is None else t.data_ptr()


@pytest.mark.parametrize("rows", [1, 3])
@pytest.mark.parametrize("with_delta", [False, True])
def test_add_rmsnorm_matches_torch(lib, rows: int, with_delta: bool) -> None:
    g = torch.Generator().manual_seed(rows)
    h, eps = 576, 1e-5
    resid = torch.randn(rows, h, generator=g) * 3
    delta = (torch.randn(rows, h, generator=g) * 2).bfloat16() if with_delta else None
    w = torch.rand(h, generator=g) + 0.5
    expect_resid = resid + delta.float() if with_delta else resid.clone()
    expect = torch.rms_norm(expect_resid, (h,), w, eps)
    out_b = torch.empty(rows, h, dtype=torch.bfloat16)
    out_f = torch.empty(rows, h)
    r1 = resid.clone()
    lib.mp_add_rmsnorm(rows, h, r1.data_ptr(), ptr(delta), w.data_ptr(), eps, out_b.data_ptr(),
                       None)
    assert torch.equal(r1, expect_resid)
    # bf16 output: within one bf16 rounding step of torch's value, mostly identical
    assert (out_b.float() - expect).abs().max() <= expect.abs().max() * 2**-7
    assert (out_b == expect.bfloat16()).float().mean() > 0.98
    r2 = resid.clone()
    lib.mp_add_rmsnorm(rows, h, r2.data_ptr(), ptr(delta), w.data_ptr(), eps, None,
                       out_f.data_ptr())
    torch.testing.assert_close(out_f, expect, rtol=1e-5, atol=1e-5)


def test_silu_mul_matches_torch(lib) -> None:
    g = torch.Generator().manual_seed(0)
    rows, inter = 4, 1536
    gu = (torch.randn(rows, 2 * inter, generator=g) * 4).bfloat16()
    out = torch.empty(rows, inter, dtype=torch.bfloat16)
    lib.mp_silu_mul(rows, inter, gu.data_ptr(), out.data_ptr())
    gate, up = gu.float().chunk(2, dim=-1)
    expect = F.silu(gate) * up
    assert (out.float() - expect).abs().max() <= expect.abs().max() * 2**-7
    assert (out == expect.bfloat16()).float().mean() > 0.98


@pytest.mark.parametrize("with_bias", [False, True])
@pytest.mark.parametrize("rot_dim", [64, 32])  # full and partial rotary
@pytest.mark.parametrize(("seq_lens", "threads"), [
    ([37, 16, 5], 1), ([300] * 12, 3),
    # long contexts: one row split over context positions (flash-decoding style parts merged
    # at the end), and rows of mixed lengths whose thread ranges start and end mid-row
    ([3000], 1), ([3000], 2), ([3000], 3), ([2500, 7, 900, 1333], 2), ([2500, 7, 900, 1333], 3),
    ([2500, 7, 900, 1333], 5),
])
def test_decode_attention_matches_the_reference(lib, always_split, with_bias: bool,
                                                rot_dim: int, seq_lens: list[int],
                                                threads: int) -> None:
    """Rotary + K/V write + GQA attention over scattered paged blocks, for decode rows of
    different lengths (one ends exactly on a block boundary), on one thread and (long
    contexts) split over several, against the module path: RotaryEmbedding, write_kv and
    reference_paged_attention. With several threads, also through a build that splits even
    one row over them (cut mid-row, partial softmaxes merged)."""
    g = torch.Generator().manual_seed(7 + rot_dim)
    nh, nkv, hd, bs = 9, 3, 64, 16
    nb = sum(-(-n // bs) for n in seq_lens) + 4
    rows = len(seq_lens)
    qkv_n = (nh + 2 * nkv) * hd
    cache = torch.randn(2, nb, bs, nkv, hd, generator=g)
    tables = torch.zeros(rows, max(-(-n // bs) for n in seq_lens), dtype=torch.int32)
    free = torch.randperm(nb, generator=g).tolist()
    for r, n in enumerate(seq_lens):
        for j in range(-(-n // bs)):
            tables[r, j] = free.pop()
    slots = torch.tensor([int(tables[r, (n - 1) // bs]) * bs + (n - 1) % bs
                          for r, n in enumerate(seq_lens)], dtype=torch.int64)
    positions = torch.tensor([n - 1 for n in seq_lens], dtype=torch.int64)
    qkv = (torch.randn(rows, qkv_n, generator=g)).bfloat16()
    bias = torch.randn(qkv_n, generator=g) * 0.1 if with_bias else None
    rotary = RotaryEmbedding(hd, RopeSettings(theta=10000.0, scaling=None, max_position=4096),
                             rotary_dim=rot_dim)
    scale = hd**-0.5

    # the module path
    ref_cache = cache.clone()
    x = qkv.float() + bias if with_bias else qkv.float()
    q, k, v = x.split((nh * hd, nkv * hd, nkv * hd), dim=-1)
    q, k = rotary(positions, q, k)
    write_kv(ref_cache, k.view(rows, nkv, hd), v.reshape(rows, nkv, hd), slots)
    meta = AttentionMetadata(
        slot_mapping=slots, query_start_loc=torch.arange(rows + 1, dtype=torch.int32),
        seq_lens=torch.tensor(seq_lens, dtype=torch.int32), block_tables=tables,
        max_query_len=1, max_seq_len=max(seq_lens), query_start_loc_cpu=list(range(rows + 1)),
        seq_lens_cpu=seq_lens, block_size=bs)
    expect = reference_paged_attention(q.view(rows, nh, hd), ref_cache, meta, scale)

    expect = expect.reshape(rows, nh * hd)
    for build in [lib] + ([always_split] if threads > 1 else []):
        out = torch.empty(rows, nh * hd, dtype=torch.bfloat16)
        work = torch.full((cpu_kernels.attention_work_floats(rows, nh, nkv, hd, threads),),
                          float("nan"))
        row_req = torch.arange(rows, dtype=torch.int32)
        attend = torch.ones(rows, dtype=torch.uint8)
        rows_of = torch.empty(rows, dtype=torch.int32)
        build.mp_decode_attention(rows, nh, nkv, hd, rot_dim, qkv.data_ptr(), ptr(bias),
                                  rotary.cos_sin_cache.data_ptr(), positions.data_ptr(),
                                  cache.data_ptr(), nb, bs, slots.data_ptr(), tables.data_ptr(),
                                  tables.shape[1], row_req.data_ptr(), meta.seq_lens.data_ptr(),
                                  attend.data_ptr(), scale, out.data_ptr(), work.data_ptr(),
                                  rows_of.data_ptr(), threads)
        torch.testing.assert_close(cache, ref_cache, rtol=1e-6, atol=1e-6)
        assert (out.float() - expect).abs().max() <= expect.abs().max() * 2**-7
        assert (out == expect.bfloat16()).float().mean() > 0.97


@pytest.fixture(scope="module")
def llm() -> LLM:
    return LLM(kv_cache_memory=64 << 20, max_model_len=512, max_num_seqs=8)


PROMPTS = [
    "The capital of France is",
    "Write a haiku about the sea.",
    "1, 2, 3, 4,",
    "def fibonacci(n):",
    "Water boils at",
]


def _generate(llm: LLM, on: bool, prompts: list[str]):
    saved = cpu_kernels.ENABLED
    cpu_kernels.ENABLED = on
    try:
        p = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)
        return llm.generate(prompts, p, use_tqdm=False)
    finally:
        cpu_kernels.ENABLED = saved


@pytest.mark.parametrize("n_prompts", [1, 3])
def test_each_decode_step_matches_the_module_path(llm: LLM, n_prompts: int, monkeypatch) -> None:
    """Every decode step, on the same KV cache, through the module path and through the C
    path: the final hidden states agree up to rounding (the C path sums in another order,
    so now and then an activation rounds to the neighbouring bf16 value).
    Generation follows the module path's output, so both always see the same state."""
    from modelport.layers.attention import get_forward_context

    real = cpu_kernels.decode
    errors: list[float] = []

    def both(model, x, positions):
        ctx = get_forward_context()
        if not ctx.attn_metadata.is_pure_decode:
            return None
        saved = [c.clone() for c in ctx.kv_caches]
        out = real(model, x, positions)
        assert out is not None
        for c, s in zip(ctx.kv_caches, saved):
            c.copy_(s)
        model.layers[0].self_attn.rotary_emb.forget_positions()
        residual, h = None, x
        for layer in model.layers:
            h, residual = layer(positions, h, residual)
        ref = model.norm(h, residual)[0]
        errors.append(float((out - ref).norm() / ref.norm()))
        return ref

    monkeypatch.setattr(cpu_kernels, "decode", both)
    p = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)
    llm.generate(PROMPTS[:n_prompts], p, use_tqdm=False)
    assert len(errors) == 11
    # one activation rounding to the neighbouring bf16 value moves a 30-layer model's final
    # hidden state by up to ~1 % (measured: 1-2 such roundings in a few layers a step); a
    # wrong rotary, head mapping or norm moves it by tens of percent
    errors.sort()
    assert errors[len(errors) // 2] < 1e-2 and errors[-1] < 3e-2, errors


def test_default_model_chat_through_the_c_path(llm: LLM) -> None:
    calls = []
    real = cpu_kernels.DecodePlan.run

    def counting(self, x, positions, ctx):
        calls.append(x.shape[0])
        return real(self, x, positions, ctx)

    cpu_kernels.DecodePlan.run = counting
    try:
        out = llm.chat([{"role": "user", "content": "What is the capital of France?"}],
                       SamplingParams(temperature=0, max_tokens=16), use_tqdm=False)
    finally:
        cpu_kernels.DecodePlan.run = real
    assert 1 in calls and max(calls) > 1  # the prompt, then one row a step
    assert "Paris" in out[0].outputs[0].text


def test_every_step_takes_the_c_path_so_results_do_not_depend_on_the_batch(llm: LLM,
                                                                           monkeypatch) -> None:
    """Prompt chunks, decode rows and mixed steps all run through the C path (the chunks'
    attention through the module path's code), so a request's seeded sampled tokens are the
    same alone or in a batch.
    MODELPORT_CPU_KERNELS=0 (ENABLED) turns it off."""
    calls = []
    real = cpu_kernels.DecodePlan.run

    def counting(self, x, positions, ctx):
        out = real(self, x, positions, ctx)
        calls.append((x.shape[0], ctx.attn_metadata.max_query_len, out is not None))
        return out

    monkeypatch.setattr(cpu_kernels.DecodePlan, "run", counting)
    sampled = SamplingParams(temperature=1.0, seed=11, max_tokens=10, ignore_eos=True)
    alone = [o.outputs[0].token_ids for p in PROMPTS
             for o in llm.generate([p], sampled, use_tqdm=False)]
    assert all(ok for *_, ok in calls) and any(q > 1 for _, q, _ in calls)
    batched = [o.outputs[0].token_ids for o in llm.generate(PROMPTS, sampled, use_tqdm=False)]
    assert batched == alone
    chunked = LLM(kv_cache_memory=64 << 20, max_model_len=512, max_num_seqs=8,
                  max_num_batched_tokens=4, enable_prefix_caching=False)
    calls.clear()
    mixed = [o.outputs[0].token_ids for o in chunked.generate(PROMPTS, sampled, use_tqdm=False)]
    # prompt chunks beside decode rows, all through the C path (a prompt cut into chunks is
    # not compared token for token: a 1-token chunk's attention is C's, a longer one's torch's)
    assert any(q > 1 and n > q for n, q, _ in calls) and all(ok for *_, ok in calls)
    assert [len(t) for t in mixed] == [10] * len(PROMPTS)
    calls.clear()
    _generate(llm, False, PROMPTS[:2])
    assert calls == []


def test_models_that_do_not_fit_keep_the_module_path(tmp_path) -> None:
    """A sliding-window model (Mistral) is not for the C attention: its plan is refused,
    decode is None. (Plain float models do take the C path: test_cpu_kernels_more.py.)"""
    from transformers import MistralConfig, MistralForCausalLM

    cfg = MistralConfig(vocab_size=256, hidden_size=64, intermediate_size=128,
                        num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                        max_position_embeddings=128, sliding_window=8)
    torch.manual_seed(0)
    MistralForCausalLM(cfg).save_pretrained(tmp_path)
    _byte_level_tokenizer().save_pretrained(tmp_path)
    from modelport.models.llama import MistralForCausalLM as Ours

    small = LLM(str(tmp_path), kv_cache_memory=8 << 20, max_model_len=128)
    out = small.generate(prompt_token_ids=[[1, 2, 3]], use_tqdm=False,
                         sampling_params=SamplingParams(temperature=0, max_tokens=4,
                                                        ignore_eos=True))
    assert len(out[0].outputs[0].token_ids) == 4
    model = small.llm_engine.core.runner.model
    assert isinstance(model, Ours)
    assert model.model.__dict__.get("_cpu_decode_plan") is False
    assert cpu_kernels._fits(model.model) == "attention options (window / soft cap / head size)"
