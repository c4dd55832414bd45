"""Triton paged-attention kernels and fused small ops against the torch references (CUDA only).

Inputs are fresh random draws each case: ragged context and query lengths, prefix hits
(queries behind cached context), GQA groups, contexts ending on and off block boundaries,
blocks scattered through the cache, and the padded rows a CUDA graph replays. The same
cases run on an fp8 (e4m3) cache: the kernels upcast fp8 K/V exactly, so they must match
the float32 reference computed on that same fp8 cache.
"""

from __future__ import annotations

import random

import pytest
import torch

from modelport.layers.attention import AttentionMetadata, reference_paged_attention, write_kv

pytestmark = pytest.mark.gpu

DEV = "cuda"


FP8 = torch.float8_e4m3fn


def _batch(cases, heads, kv_heads, head_dim, page, seed, dtype=torch.bfloat16, kv_dtype=None):
    """cases: [(cached_context, query_len)]. Returns q, k, v, a random cache (kv_dtype,
    default dtype) and metadata."""
    rng = random.Random(seed)
    g = torch.Generator(device=DEV).manual_seed(seed)
    need = sum(-(-(c + n) // page) for c, n in cases)
    num_blocks = need + 7
    free = list(range(num_blocks))
    rng.shuffle(free)
    qsl, seq, tables, slots = [0], [], [], []
    for ctx, n in cases:
        total = ctx + n
        blocks = [free.pop() for _ in range(-(-total // page))]
        tables.append(blocks)
        slots += [blocks[p // page] * page + p % page for p in range(ctx, total)]
        qsl.append(qsl[-1] + n)
        seq.append(total)
    t = qsl[-1]
    cache = torch.randn(2, num_blocks, page, kv_heads, head_dim, generator=g, device=DEV)
    cache = cache.to(kv_dtype or dtype)
    q = torch.randn(t, heads, head_dim, generator=g, device=DEV).to(dtype)
    k = torch.randn(t, kv_heads, head_dim, generator=g, device=DEV).to(dtype)
    v = torch.randn(t, kv_heads, head_dim, generator=g, device=DEV).to(dtype)
    width = max(map(len, tables))
    bt = torch.zeros(len(tables), width, dtype=torch.int32)
    for i, b in enumerate(tables):
        bt[i, : len(b)] = torch.tensor(b)
    meta = AttentionMetadata(
        slot_mapping=torch.tensor(slots, dtype=torch.int64, device=DEV),
        query_start_loc=torch.tensor(qsl, dtype=torch.int32, device=DEV),
        seq_lens=torch.tensor(seq, dtype=torch.int32, device=DEV),
        block_tables=bt.to(DEV),
        max_query_len=max(n for _, n in cases),
        max_seq_len=max(seq),
        query_start_loc_cpu=qsl,
        seq_lens_cpu=seq,
        block_size=page,
    )
    return q, k, v, cache, meta


def _rel(out, ref):
    assert torch.isfinite(out).all()
    return ((out.float() - ref.float()).norm() / ref.float().norm()).item()


def _reference(q, cache, meta, scale):
    """float32 reference on a copy of the metadata (the backend caches a plan on it)."""
    m = AttentionMetadata(**{**meta.__dict__, "backend_state": {}})
    return reference_paged_attention(q.float(), cache.float(), m, scale)


def test_write_kv_matches_index_copy_and_skips_padding():
    from modelport.layers.triton_attention import write_kv_triton

    q, k, v, cache, meta = _batch([(5, 9), (0, 17), (31, 1)], 8, 2, 64, 16, seed=1)
    want = cache.clone()
    write_kv(want, k, v, meta.slot_mapping)
    got = cache.clone()
    slots = meta.slot_mapping.clone()
    write_kv_triton(got, k, v, slots)
    assert torch.equal(got, want)
    # a -1 slot (a padded CUDA-graph row) writes nothing
    got2 = cache.clone()
    slots[3] = -1
    write_kv_triton(got2, k, v, slots)
    keep = torch.ones(len(slots), dtype=torch.bool, device=DEV)
    keep[3] = False
    want2 = cache.clone()
    write_kv(want2, k[keep], v[keep], meta.slot_mapping[keep])
    assert torch.equal(got2, want2)


@pytest.mark.parametrize("heads,kv_heads,head_dim", [(32, 8, 128), (8, 8, 64), (14, 2, 64)])
@pytest.mark.parametrize("seed", [0, 1])
def test_mixed_prefill_decode_and_prefix_hits_match_reference(heads, kv_heads, head_dim, seed):
    from modelport.layers.triton_attention import triton_paged_attention, write_kv_triton

    rng = random.Random(seed)
    cases = [(0, rng.randint(2, 200)) for _ in range(2)]  # fresh prompts
    cases += [(rng.randint(1, 300), rng.randint(2, 150)) for _ in range(3)]  # prefix hits
    cases += [(16 * rng.randint(1, 8), 16), (0, 64), (47, 1)]  # block-aligned, one decode
    cases += [(rng.randint(1, 700), 1) for _ in range(5)]  # decodes
    rng.shuffle(cases)
    q, k, v, cache, meta = _batch(cases, heads, kv_heads, head_dim, 16, seed)
    write_kv_triton(cache, k, v, meta.slot_mapping)
    scale = head_dim**-0.5
    out = triton_paged_attention(q, cache, meta, scale)
    assert _rel(out, _reference(q, cache, meta, scale)) < 1e-2


@pytest.mark.parametrize("n_reqs", [1, 3, 16, 200])
@pytest.mark.parametrize("page", [16, 32])
def test_decode_split_k_matches_reference(n_reqs, page):
    from modelport.layers.triton_attention import (
        build_plan,
        split_counters,
        triton_paged_attention,
        write_kv_triton,
    )

    rng = random.Random(n_reqs * page)
    cases = [(rng.randint(0, 2100), 1) for _ in range(n_reqs)]
    q, k, v, cache, meta = _batch(cases, 32, 8, 128, page, seed=n_reqs)
    write_kv_triton(cache, k, v, meta.slot_mapping)
    plan = build_plan(meta, 8)
    assert plan.prefill_items is None and plan.has_decode
    out = triton_paged_attention(q, cache, meta, 128**-0.5)
    assert _rel(out, _reference(q, cache, meta, 128**-0.5)) < 1e-2
    # the last split of each (request, KV head) merged and reset its arrival counter
    assert (plan.splits > 1) == (n_reqs < 33) and int(split_counters(q.device).abs().sum()) == 0
    again = triton_paged_attention(q, cache, AttentionMetadata(**{**meta.__dict__,
                                                                 "backend_state": {}}),
                                   128**-0.5)
    assert torch.equal(out, again)


@pytest.mark.parametrize("n_reqs", [16, 48])
def test_longest_first_decode_order_gives_the_same_bits(n_reqs, monkeypatch):
    from modelport.layers import triton_attention as ta

    rng = random.Random(n_reqs)
    cases = [(rng.choice([rng.randint(0, 40), rng.randint(900, 2000)]), 1)
             for _ in range(n_reqs)]
    q, k, v, cache, meta = _batch(cases, 32, 8, 128, 16, seed=n_reqs)
    ta.write_kv_triton(cache, k, v, meta.slot_mapping)
    scale = 128**-0.5

    def fresh():
        return AttentionMetadata(**{**meta.__dict__, "backend_state": {}})

    m = fresh()
    ordered = ta.triton_paged_attention(q, cache, m, scale)
    order = ta.get_plan(m, 8).order
    assert order is not None
    lens = meta.seq_lens[order]
    assert sorted(order.tolist()) == list(range(n_reqs)) and bool((lens[:-1] >= lens[1:]).all())
    monkeypatch.setattr(ta, "ORDERED_MIN_REQS", 10**9)
    m = fresh()
    plain = ta.triton_paged_attention(q, cache, m, scale)
    assert ta.get_plan(m, 8).order is None
    assert torch.equal(ordered, plain)
    assert _rel(ordered, _reference(q, cache, meta, scale)) < 1e-2
    assert int(ta.split_counters(q.device).abs().sum()) == 0


@pytest.mark.parametrize("n_reqs,page,pad", [(1, 16, False), (3, 32, True), (20, 16, True)])
def test_rope_in_decode_equals_rotary_kv_write_then_decode(n_reqs, page, pad, monkeypatch):
    # the decode kernel taking the rotary and the KV write: same output and cache bits as
    # the rotary kernel, then the KV-write kernel, then the decode kernel
    from modelport.layers import fused_ops as fo
    from modelport.layers import triton_attention as ta
    from modelport.layers.rotary import RopeSettings, RotaryEmbedding

    rng = random.Random(n_reqs + page)
    cases = [(rng.randint(0, 1500), 1) for _ in range(n_reqs)]
    q, k, v, cache, meta = _batch(cases, 32, 8, 128, page, seed=n_reqs + 7)
    if pad:  # the last row plays a CUDA-graph pad: no context, no slot
        meta.seq_lens[-1] = 0
        meta.seq_lens_cpu[-1] = 0
        meta.slot_mapping[-1] = -1
    positions = (meta.seq_lens.long() - 1).clamp(min=0)
    rotary = RotaryEmbedding(128, RopeSettings(500000.0, None, 4096)).to(DEV, q.dtype)
    cos_sin = rotary.cos_sin_cache
    scale = 128**-0.5
    t = q.shape[0]

    def fresh():
        return AttentionMetadata(**{**meta.__dict__, "backend_state": {}})

    monkeypatch.setattr(ta, "ROPE_IN_DECODE", True)
    assert ta.rope_fits(q, cache, meta, rotary)
    fused_cache = cache.clone()
    fused = ta.triton_paged_attention(q.clone(), fused_cache, fresh(), scale,
                                      rope=(k.clone(), v.clone(), positions, cos_sin))
    q2, k2 = q.clone(), k.clone()
    fo.apply_rotary_(positions, q2.view(t, -1), k2.view(t, -1), cos_sin, 128)
    ta.write_kv_triton(cache, k2, v, meta.slot_mapping)
    plain = ta.triton_paged_attention(q2, cache, fresh(), scale)
    assert torch.equal(fused_cache, cache)
    assert torch.equal(fused, plain)
    assert _rel(fused[: t - pad], _reference(q2, cache, meta, scale)[: t - pad]) < 1e-2


def test_padded_graph_rows_stay_finite_and_leave_real_rows_alone():
    from modelport.layers.triton_attention import triton_paged_attention

    q, k, v, cache, meta = _batch([(100, 1), (7, 1), (0, 1)], 16, 4, 64, 16, seed=5)
    # row 2 plays a CUDA-graph pad: context 0
    meta.seq_lens[2] = 0
    meta.seq_lens_cpu[2] = 0
    out = triton_paged_attention(q, cache, meta, 0.125)
    assert torch.isfinite(out).all() and out[2].abs().max() == 0
    ref = reference_paged_attention(
        q[:2].float(),
        cache.float(),
        AttentionMetadata(
            meta.slot_mapping[:2],
            meta.query_start_loc[:3],
            meta.seq_lens[:2],
            meta.block_tables[:2],
            1,
            101,
            [0, 1, 2],
            [101, 8],
            16,
        ),
        0.125,
    )
    assert _rel(out[:2], ref) < 1e-2


def test_attention_layer_picks_triton_on_cuda():
    from modelport.layers import triton_attention as ta
    from modelport.layers.attention import Attention, ForwardContext, forward_context

    q, k, v, cache, meta = _batch([(20, 5), (9, 1)], 8, 2, 64, 16, seed=9)
    layer = Attention(8, 64, 2, 0, 0.125)
    with forward_context(ForwardContext(meta, [cache])):
        out = layer(q.flatten(1), k.flatten(1), v.flatten(1))
    assert layer.backend is ta.triton_paged_attention
    assert _rel(out.view_as(q), _reference(q, cache, meta, 0.125)) < 1e-2


# ---------------------------------------------------------------------------------------
# fused small ops: same bits as the eager modules they replace
# ---------------------------------------------------------------------------------------
def test_fused_ops_equal_eager_modules():
    from modelport.layers import fused_ops as fo
    from modelport.layers.activation import SiluAndMul
    from modelport.layers.layernorm import RMSNorm
    from modelport.layers.rotary import RopeSettings, RotaryEmbedding

    torch.manual_seed(0)
    dt = torch.bfloat16
    x = torch.randn(37, 4096, device=DEV, dtype=dt)
    r = torch.randn(37, 4096, device=DEV, dtype=dt)
    norm = RMSNorm(4096, 1e-5).to(DEV, dt)
    norm.weight.data.normal_(1.0, 0.1)
    want_y, want_r = norm(x, r)
    got_y, got_r = fo.rms_norm(x, norm.weight, 1e-5, r)
    assert torch.equal(got_r, want_r)
    assert (got_y.float() - want_y.float()).abs().max() <= 2 * want_y.float().abs().max() * 2**-8
    assert (got_y != want_y).float().mean() < 0.01  # rsqrt/sum order: rare 1-ulp flips

    g = torch.randn(37, 2 * 1000, device=DEV, dtype=dt)
    want = SiluAndMul()(g)
    got = fo.silu_and_mul(g)
    assert (got != want).float().mean() < 0.01
    assert (got.float() - want.float()).abs().max() <= want.float().abs().max() * 2**-7

    settings = RopeSettings(
        500000.0,
        {
            "rope_type": "llama3",
            "factor": 8.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 8192,
        },
        4096,
    )
    old = torch.get_default_dtype()
    torch.set_default_dtype(dt)
    with torch.device(DEV):
        rot = RotaryEmbedding(128, settings)
    torch.set_default_dtype(old)
    qkv = torch.randn(37, (32 + 16) * 128, device=DEV, dtype=dt)
    q, k, _ = qkv.split([32 * 128, 8 * 128, 8 * 128], -1)
    pos = torch.randint(0, 4096, (37,), device=DEV)
    wq, wk = rot(pos, q.clone(), k.clone())
    gq, gk = fo.apply_rotary_(pos, q, k, rot.cos_sin_cache, 128)
    # the same products, each rounded to bf16 as torch rounds them: identical bits
    assert torch.equal(gq, wq) and torch.equal(gk, wk)


def test_fuse_small_ops_swaps_modules_and_keeps_outputs():
    from modelport.layers import fused_ops as fo
    from modelport.layers.layernorm import RMSNorm

    m = torch.nn.Sequential(RMSNorm(256, 1e-6)).to(DEV, torch.bfloat16)
    m[0].weight.data.normal_()
    x = torch.randn(5, 256, device=DEV, dtype=torch.bfloat16)
    before = m(x)
    assert fo.fuse_small_ops(m) == 1 and type(m[0]) is fo.FusedRMSNorm
    after = m(x)
    assert (after.float() - before.float()).abs().max() <= before.float().abs().max() * 2**-7


# ---------------------------------------------------------------------------------------
# fp8 (e4m3) KV cache: clamp + cast on write, exact upcast on read
# ---------------------------------------------------------------------------------------
def test_fp8_write_kv_matches_reference_saturates_and_skips_padding():
    from modelport.layers.triton_attention import write_kv_triton

    q, k, v, cache, meta = _batch([(5, 9), (0, 17), (31, 1)], 8, 2, 64, 16, seed=1, kv_dtype=FP8)
    k[0, 0, :4] = torch.tensor([1000.0, -1.0e4, 447.0, 460.0])  # outliers saturate to +-448
    v[2, 1, :3] = torch.tensor([3.0e38, -500.0, 1.0e-6])
    k[4] *= 37.0  # a whole row spread over the e4m3 range, rounding ties included
    want = cache.clone()
    write_kv(want, k, v, meta.slot_mapping)
    got = cache.clone()
    write_kv_triton(got, k, v, meta.slot_mapping)
    assert torch.equal(got.view(torch.uint8), want.view(torch.uint8))
    assert not got.float().isnan().any()
    flat = got.view(2, -1, 2, 64)
    assert flat[0, meta.slot_mapping[0], 0, :4].float().tolist() == [448.0, -448.0, 448.0, 448.0]
    assert flat[1, meta.slot_mapping[2], 1, :2].float().tolist() == [448.0, -448.0]
    # float32 and float16 inputs take the same clamp + round-to-nearest-even cast
    for dt in (torch.float32, torch.float16):
        want_dt, got_dt = cache.clone(), cache.clone()
        write_kv(want_dt, k.to(dt), v.to(dt), meta.slot_mapping)
        write_kv_triton(got_dt, k.to(dt), v.to(dt), meta.slot_mapping)
        assert torch.equal(got_dt.view(torch.uint8), want_dt.view(torch.uint8))
    # a -1 slot (a padded CUDA-graph row) writes nothing
    slots = meta.slot_mapping.clone()
    slots[3] = -1
    got2 = cache.clone()
    write_kv_triton(got2, k, v, slots)
    keep = torch.ones(len(slots), dtype=torch.bool, device=DEV)
    keep[3] = False
    want2 = cache.clone()
    write_kv(want2, k[keep], v[keep], meta.slot_mapping[keep])
    assert torch.equal(got2.view(torch.uint8), want2.view(torch.uint8))


def test_fp8_cache_is_supported_and_other_kv_dtypes_are_not():
    from modelport.layers.triton_attention import supports

    q = torch.empty(1, 8, 64, device=DEV, dtype=torch.bfloat16)
    for kv_dtype, ok in (
        (torch.bfloat16, True),
        (FP8, True),
        (torch.float8_e5m2, False),
        (torch.float16, False),
        (torch.float32, False),
    ):
        cache = torch.empty(2, 4, 16, 2, 64, device=DEV, dtype=kv_dtype)
        assert supports(q, cache, 64) is ok, kv_dtype
    assert supports(q.half(), torch.empty(2, 4, 16, 2, 64, device=DEV, dtype=FP8), 64)


@pytest.mark.parametrize(
    "heads,kv_heads,head_dim,dtype",
    [
        (32, 8, 128, torch.bfloat16),
        (8, 8, 64, torch.bfloat16),
        (14, 2, 64, torch.bfloat16),
        (32, 8, 128, torch.float16),
    ],
)
@pytest.mark.parametrize("seed", [0, 1])
def test_fp8_mixed_prefill_decode_and_prefix_hits_match_reference(
    heads, kv_heads, head_dim, dtype, seed
):
    from modelport.layers.triton_attention import triton_paged_attention, write_kv_triton

    rng = random.Random(seed)
    cases = [(0, rng.randint(2, 200)) for _ in range(2)]  # fresh prompts
    cases += [(rng.randint(1, 300), rng.randint(2, 150)) for _ in range(3)]  # prefix hits
    cases += [(16 * rng.randint(1, 8), 16), (0, 64), (47, 1), (63, 1)]  # block edges
    cases += [(rng.randint(1, 700), 1) for _ in range(5)]  # decodes
    rng.shuffle(cases)
    q, k, v, cache, meta = _batch(
        cases, heads, kv_heads, head_dim, 16, seed, dtype=dtype, kv_dtype=FP8
    )
    write_kv_triton(cache, k, v, meta.slot_mapping)
    scale = head_dim**-0.5
    out = triton_paged_attention(q, cache, meta, scale)
    assert out.dtype == dtype
    # the same fp8 cache read by the reference: only accumulation order and rounding differ
    assert _rel(out, _reference(q, cache, meta, scale)) < 1e-2
    # and the reference backend on the raw fp8 cache (its own upcast) agrees too
    m = AttentionMetadata(**{**meta.__dict__, "backend_state": {}})
    assert _rel(out, reference_paged_attention(q, cache, m, scale)) < 2e-2


@pytest.mark.parametrize("n_reqs", [1, 3, 16, 200])
@pytest.mark.parametrize("page", [16, 32])
def test_fp8_decode_split_k_matches_reference(n_reqs, page):
    from modelport.layers.triton_attention import triton_paged_attention, write_kv_triton

    rng = random.Random(n_reqs * page)
    cases = [(rng.randint(0, 2100), 1) for _ in range(n_reqs)]
    q, k, v, cache, meta = _batch(cases, 32, 8, 128, page, seed=n_reqs, kv_dtype=FP8)
    write_kv_triton(cache, k, v, meta.slot_mapping)
    out = triton_paged_attention(q, cache, meta, 128**-0.5)
    assert _rel(out, _reference(q, cache, meta, 128**-0.5)) < 1e-2


def test_fp8_padded_graph_rows_stay_finite():
    from modelport.layers.triton_attention import triton_paged_attention

    q, k, v, cache, meta = _batch([(100, 1), (7, 1), (0, 1)], 16, 4, 64, 16, seed=5, kv_dtype=FP8)
    meta.seq_lens[2] = 0
    meta.seq_lens_cpu[2] = 0
    out = triton_paged_attention(q, cache, meta, 0.125)
    assert torch.isfinite(out).all() and out[2].abs().max() == 0


def test_attention_layer_picks_triton_for_an_fp8_cache():
    from modelport.layers import triton_attention as ta
    from modelport.layers.attention import Attention, ForwardContext, forward_context

    q, k, v, cache, meta = _batch([(20, 5), (9, 1)], 8, 2, 64, 16, seed=9, kv_dtype=FP8)
    layer = Attention(8, 64, 2, 0, 0.125)
    with forward_context(ForwardContext(meta, [cache])):
        out = layer(q.flatten(1), k.flatten(1), v.flatten(1))
    assert layer.backend is ta.triton_paged_attention
    assert layer._write is ta.write_kv_triton
    assert _rel(out.view_as(q), _reference(q, cache, meta, 0.125)) < 1e-2


# ---------------------------------------------------------------------------------------
# decode launch configs by cache kind (triton_attention.DECODE_CONFIGS / DECODE_CANDIDATES):
# every candidate the decode-sweep benchmark times must be correct, whichever is picked
# ---------------------------------------------------------------------------------------
def _candidates(kind):
    """The candidate configs as test params (none where triton is missing: CPU collection)."""
    try:
        from modelport.layers.triton_attention import DECODE_CANDIDATES
    except ImportError:
        return []
    return [pytest.param(c, id=c.name) for c in DECODE_CANDIDATES[kind]]


@pytest.mark.parametrize("cfg", _candidates("fp8"))
def test_fp8_decode_candidate_configs_match_reference(cfg, monkeypatch):
    from modelport.layers import triton_attention as ta

    monkeypatch.setitem(ta.DECODE_CONFIGS, "fp8", ((1, cfg),))
    for n_reqs, dtype, codes in (
        (3, torch.bfloat16, True),
        (40, torch.bfloat16, False),
        (40, torch.float16, True),
    ):
        rng = random.Random(n_reqs)
        cases = [(rng.randint(0, 700), 1) for _ in range(n_reqs)]
        q, k, v, cache, meta = _batch(cases, 32, 8, 128, 16, seed=n_reqs, dtype=dtype, kv_dtype=FP8)
        if codes:  # every finite e4m3 code: subnormals, +-0 and +-448 included
            u = torch.randint(0, 256, cache.shape, device=DEV, dtype=torch.uint8)
            u[(u & 0x7F) == 0x7F] = 0x7E
            cache = u.view(FP8)
            q = q * 0.05
        out = ta.triton_paged_attention(q, cache, meta, 128**-0.5)
        assert meta.backend_state["triton"].decode_cfg == cfg
        assert _rel(out, _reference(q, cache, meta, 128**-0.5)) < 1e-2, (n_reqs, dtype, codes)


@pytest.mark.parametrize("cfg", _candidates("16bit"))
def test_16bit_decode_candidate_configs_match_reference(cfg, monkeypatch):
    from modelport.layers import triton_attention as ta

    monkeypatch.setitem(ta.DECODE_CONFIGS, "16bit", ((1, cfg),))
    for n_reqs in (3, 40):
        rng = random.Random(n_reqs)
        cases = [(rng.randint(0, 700), 1) for _ in range(n_reqs)]
        q, k, v, cache, meta = _batch(cases, 32, 8, 128, 16, seed=n_reqs)
        out = ta.triton_paged_attention(q, cache, meta, 128**-0.5)
        assert _rel(out, _reference(q, cache, meta, 128**-0.5)) < 1e-2


def test_fp8_default_decode_keeps_pad_rows_zero_and_splits_by_bucket():
    from modelport.layers import triton_attention as ta

    q, k, v, cache, meta = _batch([(100, 1), (7, 1), (0, 1)], 32, 8, 128, 16, seed=5, kv_dtype=FP8)
    meta.seq_lens[2] = 0
    meta.seq_lens_cpu[2] = 0
    out = ta.triton_paged_attention(q, cache, meta, 128**-0.5)
    assert torch.isfinite(out).all() and out[2].abs().max() == 0
    plan = meta.backend_state["triton"]
    cfg = ta.decode_config(3, FP8)
    assert plan.decode_cfg == cfg and plan.splits == ta.decode_splits(3, 8, cfg.programs)


def test_profiling_forward_attention_memory_stays_linear_in_tokens():
    # the runner sizes the KV cache from the peak of a cache-less forward at the token
    # budget; its attention must not hold [heads, t, t] scores (17 GiB here in bf16) that no
    # real step makes, or a large --max-num-batched-tokens silently shrinks the cache
    from modelport.layers.attention import Attention, ForwardContext, forward_context

    t, h, kh, d = 16384, 32, 8, 128
    g = torch.Generator(device=DEV).manual_seed(0)
    q, k, v = (torch.randn(t, n * d, generator=g, device=DEV, dtype=torch.bfloat16)
               for n in (h, kh, kh))
    layer = Attention(h, d, kh, 0, d**-0.5)
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    with forward_context(ForwardContext(None, [])):
        out = layer(q, k, v)
    torch.cuda.synchronize()
    assert torch.cuda.max_memory_allocated() - base < 1 << 30
    # its first rows against a dense causal reference
    n = 64
    ref = torch.nn.functional.scaled_dot_product_attention(
        q[:n].view(n, h, d).transpose(0, 1).float(),
        k[:n].view(n, kh, d).transpose(0, 1).float().repeat_interleave(h // kh, 0),
        v[:n].view(n, kh, d).transpose(0, 1).float().repeat_interleave(h // kh, 0),
        is_causal=True, scale=d**-0.5).transpose(0, 1).reshape(n, h * d)
    torch.testing.assert_close(out[:n].float(), ref, atol=2e-2, rtol=2e-2)
