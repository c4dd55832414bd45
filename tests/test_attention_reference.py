"""The torch reference paged attention against a naive dense computation."""

import random

import torch

from modelport.layers.attention import AttentionMetadata, reference_paged_attention, write_kv


def dense_attention(q, k, v, scale):
    # q [n, H, D] at the last n positions of a context k/v [S, KH, D]
    n, h, _ = q.shape
    s, kh, _ = k.shape
    k = k.repeat_interleave(h // kh, dim=1)
    v = v.repeat_interleave(h // kh, dim=1)
    scores = torch.einsum("nhd,shd->hns", q.double(), k.double()) * scale
    qpos = torch.arange(s - n, s).unsqueeze(1)
    scores = scores.masked_fill(torch.arange(s).unsqueeze(0) > qpos, float("-inf"))
    return torch.einsum("hns,shd->nhd", scores.softmax(-1), v.double()).float()


def build(lens_new, lens_ctx, bs=4, nb=64, kvh=2, h=4, d=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    cache = torch.zeros(2, nb, bs, kvh, d)
    perm = list(range(nb))
    random.Random(seed).shuffle(perm)
    tables, qsl, slots, ks, vs, i = [], [0], [], [], [], 0
    for n_new, total in zip(lens_new, lens_ctx):
        nblk = -(-total // bs)
        t = perm[i : i + nblk]
        i += nblk
        tables.append(t)
        k = torch.randn(total, kvh, d, generator=g)
        v = torch.randn(total, kvh, d, generator=g)
        ks.append(k)
        vs.append(v)
        # cached part written directly; the new tokens through write_kv like the model does
        old = total - n_new
        for p in range(old):
            cache[0, t[p // bs], p % bs] = k[p]
            cache[1, t[p // bs], p % bs] = v[p]
        slots += [t[p // bs] * bs + p % bs for p in range(old, total)]
        qsl.append(qsl[-1] + n_new)
    mb = max(len(t) for t in tables)
    tt = torch.zeros(len(tables), mb, dtype=torch.int32)
    for r, t in enumerate(tables):
        tt[r, : len(t)] = torch.tensor(t)
    k_new = torch.cat([k[len(k) - n:] for k, n in zip(ks, lens_new)])
    v_new = torch.cat([v[len(v) - n:] for v, n in zip(vs, lens_new)])
    slot_t = torch.tensor(slots)
    write_kv(cache, k_new, v_new, slot_t)
    meta = AttentionMetadata(slot_t, torch.tensor(qsl), torch.tensor(lens_ctx), tt,
                             max(lens_new), max(lens_ctx), qsl, list(lens_ctx), bs)
    q = torch.randn(sum(lens_new), h, d, generator=g)
    return q, cache, meta, ks, vs


def check(lens_new, lens_ctx):
    q, cache, meta, ks, vs = build(lens_new, lens_ctx)
    out = reference_paged_attention(q, cache, meta, 0.25)
    qsl = meta.query_start_loc_cpu
    for r in range(len(lens_new)):
        ref = dense_attention(q[qsl[r]:qsl[r + 1]], ks[r], vs[r], 0.25)
        torch.testing.assert_close(out[qsl[r]:qsl[r + 1]], ref, atol=1e-5, rtol=1e-4)


def test_mixed_prefill_chunks_prefix_hits_and_decode():
    # fresh prefill, a chunk continuing after cached blocks (prefix hit), decodes at block edges
    check([7, 3, 1, 1], [7, 11, 8, 13])


def test_batched_decode_ragged_lengths():
    check([1, 1, 1, 1, 1], [1, 4, 5, 16, 33])


def test_dummy_attention_runs_in_bounded_query_chunks(monkeypatch):
    # the cache-less forward the runner profiles peak memory with: causal GQA attention in
    # query chunks whose scores stay under DUMMY_ATTENTION_SCORES elements, equal to one dense pass
    from modelport.layers import attention as attn_mod

    t, h, kh, d = 37, 4, 2, 16
    g = torch.Generator().manual_seed(5)
    q, k, v = (torch.randn(t, n * d, generator=g) for n in (h, kh, kh))
    seen = []
    real = attn_mod.grouped_attention

    def spy(qc, kc, vc, mask, scale, cap=None):
        seen.append(qc.shape[1] * qc.shape[2] * kc.shape[2])  # heads x rows x keys
        return real(qc, kc, vc, mask, scale, cap)

    monkeypatch.setattr(attn_mod, "grouped_attention", spy)
    monkeypatch.setattr(attn_mod, "DUMMY_ATTENTION_SCORES", h * t * 5)  # 5 query rows a chunk
    layer = attn_mod.Attention(h, d, kh, 0, 0.3)
    with attn_mod.forward_context(attn_mod.ForwardContext(None, [])):
        got = layer(q, k, v).view(t, h, d)
    want = dense_attention(q.view(t, h, d), k.view(t, kh, d), v.view(t, kh, d), 0.3)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    assert len(seen) == -(-t // 5) and max(seen) <= h * t * 5
