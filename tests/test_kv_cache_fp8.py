"""FP8 (e4m3) KV cache on the torch reference backend (CPU): the write clamps to +-448 and
casts with scale 1.0, readers upcast exactly. The Triton kernels implement the same rule
(tests/test_gpu_attention.py compares them on CUDA), so CPU and GPU agree."""

from __future__ import annotations

import random

import pytest
import torch

from helpers.tiny_models import make_tiny_llama_dir
from modelport import LLM, SamplingParams
from modelport.layers.attention import (
    AttentionMetadata,
    reference_paged_attention,
    to_cache_dtype,
    write_kv,
)

FP8 = torch.float8_e4m3fn


def _batch(cases, heads=4, kv_heads=2, head_dim=16, page=4, seed=0):
    """cases: [(cached_context, query_len)] -> q, k, v (new rows), an fp8 cache, metadata."""
    rng = random.Random(seed)
    g = torch.Generator().manual_seed(seed)
    num_blocks = sum(-(-(c + n) // page) for c, n in cases) + 3
    free = list(range(num_blocks))
    rng.shuffle(free)
    qsl, seq, tables, slots = [0], [], [], []
    for ctx, n in cases:
        blocks = [free.pop() for _ in range(-(-(ctx + n) // page))]
        tables.append(blocks)
        slots += [blocks[p // page] * page + p % page for p in range(ctx, ctx + n)]
        qsl.append(qsl[-1] + n)
        seq.append(ctx + n)
    cache = torch.randn(2, num_blocks, page, kv_heads, head_dim, generator=g).to(FP8)
    t = qsl[-1]
    q = torch.randn(t, heads, head_dim, generator=g)
    k = 3 * torch.randn(t, kv_heads, head_dim, generator=g)
    v = 3 * torch.randn(t, kv_heads, head_dim, generator=g)
    bt = torch.zeros(len(tables), max(map(len, tables)), dtype=torch.int32)
    for i, b in enumerate(tables):
        bt[i, : len(b)] = torch.tensor(b)
    meta = AttentionMetadata(
        torch.tensor(slots),
        torch.tensor(qsl, dtype=torch.int32),
        torch.tensor(seq, dtype=torch.int32),
        bt,
        max(n for _, n in cases),
        max(seq),
        qsl,
        seq,
        page,
    )
    return q, k, v, cache, meta


def test_write_kv_fp8_saturates_instead_of_nan_and_rounds_like_torch():
    q, k, v, cache, meta = _batch([(3, 5), (0, 6)])
    k[0, 0, :4] = torch.tensor([1000.0, -1e4, 447.0, float("inf")])
    v[1, 1, :2] = torch.tensor([-3e38, 500.0])
    before = cache.clone()
    write_kv(cache, k, v, meta.slot_mapping)
    flat = cache.view(2, -1, *cache.shape[3:])
    before_flat = before.view_as(flat)
    s = meta.slot_mapping
    assert flat[0, s[0], 0, :4].float().tolist() == [448.0, -448.0, 448.0, 448.0]
    assert flat[1, s[1], 1, :2].float().tolist() == [-448.0, 448.0]
    assert not cache.float().isnan().any()
    want_k = k.clamp(-448, 448).to(FP8)
    assert torch.equal(flat[0, s].view(torch.uint8), want_k.view(torch.uint8))
    assert torch.equal(to_cache_dtype(v, FP8).view(torch.uint8), flat[1, s].view(torch.uint8))
    # 16-bit inputs take the same rule; every other slot is untouched
    write_kv(cache, k.bfloat16(), v.bfloat16(), s)
    assert torch.equal(
        flat[0, s].view(torch.uint8), to_cache_dtype(k.bfloat16(), FP8).view(torch.uint8)
    )
    others = torch.ones(flat.shape[1], dtype=torch.bool)
    others[s] = False
    assert torch.equal(flat[:, others].view(torch.uint8), before_flat[:, others].view(torch.uint8))


@pytest.mark.parametrize(
    "cases",
    [
        [(0, 7), (5, 6), (8, 1), (13, 1)],  # prefill, prefix hit, decodes at block edges
        [(0, 1), (3, 1), (4, 1), (11, 1), (16, 1)],  # pure decode: the batched path
    ],
)
def test_reference_attention_reads_fp8_as_its_exact_upcast(cases):
    q, k, v, cache, meta = _batch(cases, seed=len(cases))
    write_kv(cache, k, v, meta.slot_mapping)
    out = reference_paged_attention(q, cache, meta, 0.25)
    want = reference_paged_attention(q, cache.float(), meta, 0.25)
    torch.testing.assert_close(out, want, atol=1e-6, rtol=1e-6)
    # and close to attention over the unquantized K/V (e4m3 keeps 3 mantissa bits)
    exact = cache.float()
    flat = exact.view(2, -1, *exact.shape[3:])
    flat[0, meta.slot_mapping] = k
    flat[1, meta.slot_mapping] = v
    ref = reference_paged_attention(q, exact, meta, 0.25)
    assert ((out - ref).norm() / ref.norm()).item() < 0.1


def test_engine_with_fp8_kv_cache_on_cpu(tmp_path):
    d = make_tiny_llama_dir(tmp_path / "m")
    prompts = [[256, 10, 20, 30], [256] + list(range(40, 77)), [256, 5, 6, 7, 8, 9, 10, 11]]
    params = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True, prompt_logprobs=0)
    runs = {}
    for kd in ("auto", "fp8"):
        llm = LLM(
            str(d),
            kv_cache_memory=8 << 20,
            max_num_batched_tokens=16,
            block_size=8,
            kv_cache_dtype=kd,
        )
        assert llm.llm_engine.core.runner.kv_caches[0].dtype == (
            FP8 if kd == "fp8" else torch.float32
        )
        runs[kd] = llm.generate(prompt_token_ids=prompts, sampling_params=params, use_tqdm=False)
    same = total = 0
    for p, a, b in zip(prompts, runs["auto"], runs["fp8"]):
        ta, tb = a.outputs[0].token_ids, b.outputs[0].token_ids
        same += sum(x == y for x, y in zip(ta, tb))
        total += len(ta)
        # teacher-forced prompt logprobs (chunked prefill over the cache): close, not equal
        for i in range(1, len(p)):
            da, db = a.prompt_logprobs[i][p[i]].logprob, b.prompt_logprobs[i][p[i]].logprob
            assert abs(da - db) < 0.3, (i, da, db)
    assert same >= total // 2, runs
