"""Gemma / Gemma 2 / Gemma 3 (text) and windowed Mistral / Qwen2 against HF transformers, and
sliding-window + soft-capped attention in the reference backend and the Triton kernels.

The tiny models use a 6-token window, so ~20-token prompts (chunked in 16-token prefill
steps over 4-token KV blocks) and the decode steps after them see the window cut in.
"""

from __future__ import annotations

import json
import math
import random
from pathlib import Path

import pytest
import torch

from helpers.tiny_models import _save, run_one_sequence
from modelport import LLM, SamplingParams
from modelport.config import LoadConfig
from modelport.layers import cpu_fast
from modelport.layers.attention import (
    Attention,
    AttentionMetadata,
    ForwardContext,
    forward_context,
    reference_paged_attention,
)
from modelport.loader import load_model, load_model_config, resolve_model

WINDOW = 6
VOCAB = 384  # > the byte tokenizer's 259 ids
PROMPT = [256] + [(11 * i + 5) % 250 for i in range(21)]  # 22 tokens, > the window
KINDS = ("gemma", "gemma2", "gemma3", "mistral", "qwen2")
# per kind: the window of each layer as HF runs it
LAYER_WINDOWS = {
    "gemma": [None, None],
    "gemma2": [WINDOW, None, WINDOW],
    "gemma3": [WINDOW, None, WINDOW, None],
    "mistral": [WINDOW, WINDOW],
    "qwen2": [None, WINDOW, WINDOW],
}


def _hf_config(kind: str):  # noqa: ANN202 - a transformers config
    import transformers as tf

    common = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=128,
                  num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                  max_position_embeddings=256, rms_norm_eps=1e-6, bos_token_id=256,
                  eos_token_id=257, pad_token_id=258, initializer_range=0.1)
    if kind == "gemma":
        return tf.GemmaConfig(num_hidden_layers=2, **common)
    if kind == "gemma2":  # small caps: the tanh bites on scores and logits alike
        return tf.Gemma2Config(num_hidden_layers=3, sliding_window=WINDOW,
                               query_pre_attn_scalar=12, attn_logit_softcapping=1.5,
                               final_logit_softcapping=2.0, **common)
    if kind == "gemma3":
        rope = {"full_attention": {"rope_type": "linear", "factor": 2.0, "rope_theta": 1e6},
                "sliding_attention": {"rope_type": "default", "rope_theta": 1e4}}
        return tf.Gemma3TextConfig(num_hidden_layers=4, sliding_window=WINDOW,
                                   sliding_window_pattern=2, query_pre_attn_scalar=12,
                                   final_logit_softcapping=3.0, rope_parameters=rope, **common)
    if kind == "mistral":
        return tf.MistralConfig(num_hidden_layers=2, sliding_window=WINDOW, **common)
    if kind == "qwen3":
        return tf.Qwen3Config(num_hidden_layers=3, use_sliding_window=True,
                              sliding_window=WINDOW, max_window_layers=2, **common)
    return tf.Qwen2Config(num_hidden_layers=3, use_sliding_window=True, sliding_window=WINDOW,
                          max_window_layers=1, **common)


def _make(path: Path, kind: str) -> Path:
    from transformers import AutoModelForCausalLM

    torch.manual_seed(1)
    model = AutoModelForCausalLM.from_config(_hf_config(kind), attn_implementation="eager")
    with torch.no_grad():  # norms and biases away from their 0 / 1 init: the test sees them
        for name, p in model.named_parameters():
            if "norm" in name or name.endswith(".bias"):
                p.add_(torch.randn_like(p) * 0.3)
    return _save(model.eval(), path, with_tokenizer=True)


@pytest.fixture(scope="module", params=KINDS)
def kind_dir(request, tmp_path_factory) -> tuple[str, Path]:
    return request.param, _make(tmp_path_factory.mktemp(request.param) / "m", request.param)


def _hf(path: Path):  # noqa: ANN202
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, local_files_only=True,
                                                attn_implementation="eager").eval()


def _ours(path: Path) -> torch.nn.Module:
    src = resolve_model(str(path))
    return load_model(src, load_model_config(src), LoadConfig(), torch.float32,
                      torch.device("cpu"))


def _hf_greedy(hf, prompt: list[int], n: int) -> list[int]:
    ids = torch.tensor([prompt])
    with torch.no_grad():
        out = hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n,
                          min_new_tokens=n, do_sample=False, eos_token_id=None, pad_token_id=258)
    got = out[0, len(prompt):].tolist()
    assert len(got) == n
    return got


# ---------------------------------------------------------------------------------------
# models against HF
# ---------------------------------------------------------------------------------------
def test_logits_match_hf_and_the_window_matters(kind_dir) -> None:
    kind, path = kind_dir
    model = _ours(path)
    attns = [m for m in model.modules() if isinstance(m, Attention)]
    assert [a.sliding_window for a in attns] == LAYER_WINDOWS[kind]
    with torch.no_grad():
        ref = _hf(path)(torch.tensor([PROMPT])).logits[0]
    ours = run_one_sequence(model, PROMPT, block_size=4)
    torch.testing.assert_close(ours, ref, atol=1e-4, rtol=1e-4)
    if kind == "gemma2":
        assert ours.abs().max() < 2.0  # final_logit_softcapping=2.0
        assert all(a.logits_soft_cap == 1.5 for a in attns)
    if any(LAYER_WINDOWS[kind]):  # without the window the late positions come out different
        for a in attns:
            a.backend_kwargs.pop("sliding_window", None)
        full = run_one_sequence(model, PROMPT, block_size=4)
        assert not torch.allclose(full[WINDOW:], ref[WINDOW:], atol=1e-3)
        torch.testing.assert_close(full[:WINDOW], ref[:WINDOW], atol=1e-4, rtol=1e-4)


def test_the_planner_counts_the_models_rotary_tables(kind_dir) -> None:
    """planner.memory.buffer_bytes: one cos/sin table shared by the layers (two in Gemma 3,
    whose sliding layers have their own base frequency), as the models build them."""
    from modelport.planner.memory import buffer_bytes

    _, path = kind_dir
    model = _ours(path)
    tables = {b.data_ptr(): b for name, b in model.named_buffers(remove_duplicate=False)
              if name.endswith("cos_sin_cache")}
    held = sum(b.numel() * b.element_size() for b in tables.values())
    size = next(iter(tables.values())).element_size()
    assert held == buffer_bytes(load_model_config(resolve_model(str(path))), size)


def test_llm_greedy_matches_hf_generate(kind_dir) -> None:
    # 16-token prefill chunks over 4-token blocks: the 22-token prompt is prefilled in two
    # chunks, the second seeing the first through the cache and the window
    kind, path = kind_dir
    hf = _hf(path)
    prompts = [PROMPT, [256, 7, 8, 9, 10], PROMPT[:9] + [200, 201, 202, 203]]
    want = [_hf_greedy(hf, p, 8) for p in prompts]
    llm = LLM(str(path), kv_cache_memory=4 << 20, block_size=4, max_num_batched_tokens=16)
    sp = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)
    batched = llm.generate(prompt_token_ids=prompts, sampling_params=sp, use_tqdm=False)
    assert [o.outputs[0].token_ids for o in batched] == want
    for p, w in zip(prompts, want):  # one at a time, each a prefix-cache hit now
        out = llm.generate(prompt_token_ids=[p], sampling_params=sp, use_tqdm=False)[0]
        assert out.outputs[0].token_ids == w
        assert out.num_cached_tokens == {22: 20, 5: 4, 13: 12}[len(p)]


@pytest.mark.parametrize("kind, legacy, windows", [
    # configs written before transformers 5: no layer_types (HF's per-model rule), Gemma 3's
    # rope as rope_theta / rope_scaling (global) + rope_local_base_freq
    ("gemma2", {"layer_types": None}, [WINDOW, None, WINDOW]),
    ("gemma3", {"layer_types": None, "rope_parameters": None, "rope_theta": 1e6,
                "rope_scaling": {"rope_type": "linear", "factor": 2.0},
                "rope_local_base_freq": 1e4}, [WINDOW, None, WINDOW, None]),
    ("qwen3", {"layer_types": None}, [None, None, WINDOW]),
])
def test_configs_without_layer_types_match_hf(tmp_path: Path, kind, legacy, windows) -> None:
    path = _make(tmp_path / "m", kind)
    cfg = json.loads((path / "config.json").read_text())
    cfg.update({k: v for k, v in legacy.items() if v is not None})
    for k in (k for k, v in legacy.items() if v is None):
        del cfg[k]
    (path / "config.json").write_text(json.dumps(cfg))
    model = _ours(path)
    assert [m.sliding_window for m in model.modules() if isinstance(m, Attention)] == windows
    with torch.no_grad():
        ref = _hf(path)(torch.tensor([PROMPT])).logits[0]
    torch.testing.assert_close(run_one_sequence(model, PROMPT, block_size=4), ref,
                               atol=1e-4, rtol=1e-4)


# ---------------------------------------------------------------------------------------
# load-time errors
# ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("kind, change, match", [
    ("gemma2", {"layer_types": ["sliding_attention", "chunked_attention", "full_attention"]},
     "unsupported layer_types entries"),
    ("gemma2", {"layer_types": ["sliding_attention"]}, "one entry per layer"),
    ("gemma2", {"hidden_activation": "relu"}, "hidden_activation='relu' is not supported"),
    ("gemma2", {"attn_logit_softcapping": -1}, "attn_logit_softcapping must be"),
    ("gemma3", {"use_bidirectional_attention": True}, "use_bidirectional_attention"),
    ("gemma3", {"rope_parameters": {"full_attention": {"rope_type": "proportional",
                                                        "factor": 2.0}}},
     "unsupported rope scaling type 'proportional'"),
    ("mistral", {"sliding_window": 0}, "sliding_window must be a positive integer"),
])
def test_bad_config_is_a_clear_error_at_load(tmp_path: Path, kind, change, match) -> None:
    path = _make(tmp_path / "m", kind)
    cfg = json.loads((path / "config.json").read_text())
    cfg.update(change)
    (path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match=match):
        _ours(path)


def test_gemma_config_without_tie_flag_ties_the_head(tmp_path: Path) -> None:
    # hub Gemma configs may omit tie_word_embeddings (HF's default: tied, no lm_head tensor)
    path = _make(tmp_path / "m", "gemma")
    cfg = json.loads((path / "config.json").read_text())
    del cfg["tie_word_embeddings"]
    (path / "config.json").write_text(json.dumps(cfg))
    model = _ours(path)
    assert model.lm_head.weight is model.model.embed_tokens.weight


# ---------------------------------------------------------------------------------------
# reference attention with window / soft-cap against a naive loop
# ---------------------------------------------------------------------------------------
def _batch(cases, heads=4, kv_heads=2, d=16, page=4, seed=0):
    """cases: [(cached, new)]: random q and cache, blocks scattered, as the engine builds."""
    rng = random.Random(seed)
    g = torch.Generator().manual_seed(seed)
    need = sum(-(-(c + n) // page) for c, n in cases)
    free = list(range(need + 3))
    rng.shuffle(free)
    qsl, seq, tables, slots = [0], [], [], []
    for ctx, n in cases:
        blocks = [free.pop() for _ in range(-(-(ctx + n) // page))]
        tables.append(blocks)
        slots += [blocks[p // page] * page + p % page for p in range(ctx, ctx + n)]
        qsl.append(qsl[-1] + n)
        seq.append(ctx + n)
    cache = torch.randn(2, need + 3, page, kv_heads, d, generator=g)
    q = torch.randn(qsl[-1], heads, d, generator=g) * 2
    bt = torch.zeros(len(tables), max(map(len, tables)), dtype=torch.int32)
    for i, b in enumerate(tables):
        bt[i, : len(b)] = torch.tensor(b)
    meta = AttentionMetadata(
        slot_mapping=torch.tensor(slots), query_start_loc=torch.tensor(qsl, dtype=torch.int32),
        seq_lens=torch.tensor(seq, dtype=torch.int32), block_tables=bt,
        max_query_len=max(n for _, n in cases), max_seq_len=max(seq),
        query_start_loc_cpu=qsl, seq_lens_cpu=seq, block_size=page)
    return q, cache, meta


def _naive(q, cache, meta, scale, window, cap):
    """Position by position: query p sees keys t with p - window < t <= p."""
    page, kh, out = meta.block_size, cache.shape[3], torch.zeros_like(q, dtype=torch.float64)
    group = q.shape[1] // kh
    for i, seq in enumerate(meta.seq_lens_cpu):
        s, e = meta.query_start_loc_cpu[i], meta.query_start_loc_cpu[i + 1]
        rows = [meta.block_tables[i, t // page].item() for t in range(seq)]
        k = torch.stack([cache[0, b, t % page] for t, b in enumerate(rows)]).double()
        v = torch.stack([cache[1, b, t % page] for t, b in enumerate(rows)]).double()
        for j in range(e - s):
            p = seq - (e - s) + j
            seen = [t for t in range(p + 1) if window is None or t > p - window]
            for h in range(q.shape[1]):
                sc = k[seen, h // group] @ q[s + j, h].double() * scale
                if cap is not None:
                    sc = cap * torch.tanh(sc / cap)
                out[s + j, h] = torch.softmax(sc, 0) @ v[seen, h // group]
    return out


@pytest.mark.parametrize("window, cap", [(5, None), (None, 0.8), (3, 1.5), (1, None), (64, 2.0)])
@pytest.mark.parametrize("cases", [
    [(0, 13), (9, 6), (21, 1), (4, 1)],  # prefill, chunk after cached context, decodes
    [(21, 1), (3, 1), (8, 1)],  # decode-only batch
    [(30, 1)],  # one decode (the CPU fast path's shape)
], ids=["mixed", "decodes", "one"])
def test_reference_attention_window_softcap_match_naive(window, cap, cases, monkeypatch) -> None:
    q, cache, meta = _batch(cases, seed=len(cases) + (window or 0))
    want = _naive(q, cache, meta, 0.3, window, cap)
    for fast in (False, True):
        monkeypatch.setattr(cpu_fast, "ENABLED", fast)
        m = AttentionMetadata(**{**meta.__dict__, "backend_state": {}})
        got = reference_paged_attention(q, cache, m, 0.3, sliding_window=window, soft_cap=cap)
        torch.testing.assert_close(got.double(), want, atol=1e-5, rtol=1e-5)
    plain = reference_paged_attention(q, cache, meta, 0.3)
    assert not torch.allclose(plain.double(), want, atol=1e-3)  # the options do something


def test_attention_module_without_cache_applies_window_and_cap() -> None:
    # the profiling / dummy forward (no metadata) of a windowed, capped layer
    g = torch.Generator().manual_seed(3)
    t, h, kh, d = 11, 4, 2, 16
    q, k, v = (torch.randn(t, n * d, generator=g) for n in (h, kh, kh))
    attn = Attention(h, d, kh, 0, 0.25, sliding_window=4, logits_soft_cap=1.0)
    with forward_context(ForwardContext(None, [])):
        got = attn(q, k, v).view(t, h, d)
    cache = torch.stack([k.view(t, kh, d), v.view(t, kh, d)]).view(2, 1, t, kh, d)
    _, _, meta = _batch([(0, t)], page=t)
    meta.block_tables = torch.zeros(1, 1, dtype=torch.int32)
    want = _naive(q.view(t, h, d), cache, meta, 0.25, 4, 1.0)
    torch.testing.assert_close(got.double(), want, atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="sliding_window must be >= 1"):
        Attention(h, d, kh, 0, 0.25, sliding_window=0)


# ---------------------------------------------------------------------------------------
# CUDA (skipped without a GPU)
# ---------------------------------------------------------------------------------------
@pytest.mark.gpu
def test_gpu_gemma2_cuda_graphs_equal_eager(tmp_path: Path) -> None:
    # windowed + capped layers through the Triton kernels, decode CUDA graphs and piecewise
    # prefill graphs; the same tokens eagerly
    path = _make(tmp_path / "m", "gemma2")
    sp = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)
    prompts = [PROMPT, [256, 7, 8, 9, 10], PROMPT * 3]
    runs = []
    for eager in (False, True):
        llm = LLM(str(path), device="cuda", dtype="float16", block_size=16, max_model_len=256,
                  gpu_memory_utilization=0.2, enforce_eager=eager)
        runs.append([o.outputs[0].token_ids for o in llm.generate(
            prompt_token_ids=prompts, sampling_params=sp, use_tqdm=False)])
        del llm
    assert runs[0] == runs[1] and all(len(r) == 8 for r in runs[0])


def test_softcap_formula_matches_tanh() -> None:
    # the kernels' tanh (1 - 2 / (e^2y + 1)) at the limits and near zero
    ys = torch.tensor([-1e4, -30.0, -1.0, -1e-4, 0.0, 1e-4, 1.0, 30.0, 1e4], dtype=torch.float32)
    kernel = 1.0 - 2.0 / (torch.exp2(ys * (2.0 / math.log(2.0))) + 1.0)
    torch.testing.assert_close(kernel, torch.tanh(ys), atol=1e-6, rtol=0)
