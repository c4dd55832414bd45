"""Tensor parallelism on CPU (gloo): the sharded model computes what the single-rank one does."""

from __future__ import annotations

import pytest
import torch

from helpers.tiny_models import make_tiny_llama_dir, make_tiny_qwen2_dir
from modelport import LLM, SamplingParams
from modelport.config import LoadConfig
from modelport.loader import load_model, load_model_config, resolve_model
from modelport.parallel.tensor_parallel import shard_model

PROMPTS = [[256, 10, 20, 30], [256] + list(range(40, 77)), [256, 99]]


def test_shards_reassemble_the_full_projections(tmp_path) -> None:
    d = make_tiny_qwen2_dir(tmp_path / "q")  # q/k/v with bias
    src = resolve_model(str(d))
    cfg = load_model_config(src)
    full = load_model(src, cfg, LoadConfig(), torch.float32, torch.device("cpu"))
    parts = []
    for rank in range(2):
        m = load_model(src, cfg, LoadConfig(), torch.float32, torch.device("cpu"))
        shard_model(m, rank, 2)
        parts.append(m)
    attn = [p.model.layers[0].self_attn for p in parts]
    ref = full.model.layers[0].self_attn
    x = torch.randn(5, cfg.hidden_size)
    q, k, v = ref.qkv_proj.split(ref.qkv_proj(x))
    qs, ks, vs = zip(*(a.qkv_proj.split(a.qkv_proj(x)) for a in attn))
    torch.testing.assert_close(torch.cat(qs, -1), q)
    torch.testing.assert_close(torch.cat(ks, -1), k)
    torch.testing.assert_close(torch.cat(vs, -1), v)
    assert attn[0].attn.num_heads == cfg.num_attention_heads // 2
    mlp = [p.model.layers[0].mlp for p in parts]
    h = torch.randn(5, cfg.intermediate_size)
    partial = sum(m.down_proj.inner(h[:, i * 64 : (i + 1) * 64]) for i, m in enumerate(mlp))
    torch.testing.assert_close(partial, full.model.layers[0].mlp.down_proj(h))


def test_tp2_greedy_equals_tp1(tmp_path) -> None:
    d = make_tiny_llama_dir(tmp_path / "m")
    greedy = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)
    kw = dict(kv_cache_memory=4 << 20, block_size=8, max_num_batched_tokens=16)
    want = LLM(str(d), **kw).generate(prompt_token_ids=PROMPTS, sampling_params=greedy,
                                      use_tqdm=False)
    llm = LLM(str(d), tensor_parallel_size=2, **kw)
    try:
        got = llm.generate(prompt_token_ids=PROMPTS, sampling_params=greedy, use_tqdm=False)
        assert [o.outputs[0].token_ids for o in got] == [o.outputs[0].token_ids for o in want]
        # each rank holds half the KV heads: twice the blocks fit in the same budget
        assert llm.llm_engine.num_kv_blocks == 2 * LLM(str(d), **kw).llm_engine.num_kv_blocks
    finally:
        llm.llm_engine.core.shutdown()


def test_tp_must_divide_heads(tmp_path) -> None:
    d = make_tiny_llama_dir(tmp_path / "m")  # 4 heads, 2 KV heads
    with pytest.raises(ValueError, match="tensor_parallel_size 3 must divide num_attention_heads"):
        LLM(str(d), tensor_parallel_size=3)
