"""Opt-in piecewise CUDA graphs for prefill / mixed steps (runner/piecewise_graphs.py) on
CUDA: captured per token bucket, and the same results as the eager forward."""

from __future__ import annotations

import pytest
import torch

from helpers.tiny_models import make_tiny_llama_dir

pytestmark = pytest.mark.gpu

PROMPTS = [
    [256, 10, 20, 30],
    [256] + list(range(40, 120)),
    [256] + [(13 * i + 7) % 256 for i in range(299)],  # 300 tokens: the 512 bucket
    [256] + [(5 * i + 1) % 250 for i in range(699)],  # 700 tokens: 512 + 188 in two steps
]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return make_tiny_llama_dir(tmp_path_factory.mktemp("pw") / "m", hidden_size=256,
                               num_heads=4, num_kv_heads=1, intermediate_size=512,
                               num_layers=3, max_position_embeddings=1024)


def _llm(model_dir, piecewise: bool, monkeypatch):
    from modelport import LLM
    from modelport.runner import piecewise_graphs as pg

    monkeypatch.setattr(pg, "ENABLED", piecewise)
    return LLM(str(model_dir), device="cuda", dtype="bfloat16", max_model_len=1024,
               block_size=16, gpu_memory_utilization=0.3, max_num_batched_tokens=512)


def test_pieces_are_captured_per_bucket(model_dir, monkeypatch):
    llm = _llm(model_dir, True, monkeypatch)
    pw = llm.llm_engine.core.runner.piecewise
    assert pw is not None and pw.buckets == [16, 32, 64, 128, 256, 512]
    n_layers = len(llm.llm_engine.core.runner.model.model.layers)
    for b in pw.buckets:
        assert len(pw.pieces[b].graphs) == n_layers + 1 and len(pw.pieces[b].ops) == n_layers


@pytest.mark.parametrize("n", [5, 37, 256, 300])
def test_replay_hidden_states_equal_the_eager_forward(model_dir, monkeypatch, n):
    llm = _llm(model_dir, True, monkeypatch)
    runner = llm.llm_engine.core.runner
    ids = [(7 * i + 3) % 250 for i in range(n)]
    blocks = list(range(1, -(-n // 16) + 1))
    slots = [blocks[p // 16] * 16 + p % 16 for p in range(n)]
    args = (ids, list(range(n)), slots, [0, n], [n], [blocks])
    with torch.inference_mode():
        eager = runner._eager_forward(*args).float().clone()
        meta = runner._step_meta(runner.piecewise.slot_view(n), *args[3:])  # as launch() does
        replayed = runner.piecewise.replay(meta, ids, list(range(n)), slots).float()
    assert replayed.shape == eager.shape
    assert ((replayed - eager).norm() / eager.norm()).item() < 1e-2


def test_generation_equals_the_eager_prefill_path(model_dir, monkeypatch):
    from modelport import SamplingParams

    params = SamplingParams(temperature=0, max_tokens=10, ignore_eos=True, logprobs=2)
    runs = {}
    for piecewise in (True, False):
        llm = _llm(model_dir, piecewise, monkeypatch)
        assert (llm.llm_engine.core.runner.piecewise is not None) == piecewise
        runs[piecewise] = [o.outputs[0] for o in llm.generate(
            prompt_token_ids=PROMPTS, sampling_params=params, use_tqdm=False)]
        del llm
        torch.cuda.empty_cache()
    for a, b in zip(runs[True], runs[False]):
        assert a.token_ids[:8] == b.token_ids[:8]
        for da, db in zip(a.logprobs[:8], b.logprobs[:8]):
            for t, lp in da.items():
                if t in db:
                    assert abs(lp.logprob - db[t].logprob) < 0.05


def test_enforce_eager_captures_nothing(model_dir, monkeypatch):
    from modelport import LLM
    from modelport.runner import piecewise_graphs as pg

    monkeypatch.setattr(pg, "ENABLED", True)
    llm = LLM(str(model_dir), device="cuda", dtype="bfloat16", max_model_len=1024, block_size=16,
              gpu_memory_utilization=0.3, max_num_batched_tokens=512, enforce_eager=True)
    runner = llm.llm_engine.core.runner
    assert runner.piecewise is None and runner.graphs is None
