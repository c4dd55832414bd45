"""The CUDA KV-cache budget's arithmetic, with torch.cuda's memory queries replaced (no GPU):
free blocks inside part-used allocator segments are not counted as room for the cache (an
online-FP8 MoE model ran out of memory allocating its cache on an H100 when they were)."""

from types import SimpleNamespace

import pytest
import torch

from modelport.runner.model_runner import ModelRunner

GiB = 2**30


def _runner(util: float = 0.9, fixed: int | None = None) -> SimpleNamespace:
    cfg = SimpleNamespace(cache_config=SimpleNamespace(gpu_memory_utilization=util,
                                                       kv_cache_memory=fixed))
    return SimpleNamespace(device=torch.device("cuda", 0), config=cfg, profile_run=lambda: None)


@pytest.fixture
def cuda_memory(monkeypatch):
    """A device of 80 GiB: 20 GiB allocated (peak 24 during profiling), 1 GiB used outside
    torch; after empty_cache the allocator still reserves `stuck` GiB beyond what is allocated."""
    state = {"stuck": 0.0, "emptied": 0}

    def reserved(_d=None):
        return int((20 + state["stuck"] + (0 if state["emptied"] else 4)) * GiB)

    def mem_get_info(_d=None):
        return (int(80 * GiB - 1 * GiB - reserved()), 80 * GiB)

    def empty_cache():
        state["emptied"] += 1

    for name, fn in {
        "empty_cache": empty_cache, "reset_peak_memory_stats": lambda _d=None: None,
        "synchronize": lambda _d=None: None, "max_memory_allocated": lambda _d=None: 24 * GiB,
        "memory_allocated": lambda _d=None: 20 * GiB, "memory_reserved": reserved,
        "mem_get_info": mem_get_info,
    }.items():
        monkeypatch.setattr(torch.cuda, name, fn)
    return state


def test_budget_is_the_utilization_share_less_peak_and_others(cuda_memory):
    assert ModelRunner._cuda_kv_budget(_runner()) == int(80 * GiB * 0.9) - 24 * GiB - 1 * GiB


def test_part_used_segments_are_not_counted_as_free(cuda_memory):
    cuda_memory["stuck"] = 8.75
    expected = int(80 * GiB * 0.9) - 24 * GiB - 1 * GiB - int(8.75 * GiB)
    assert ModelRunner._cuda_kv_budget(_runner()) == expected


def test_a_fixed_kv_cache_memory_must_fit_what_is_really_free(cuda_memory):
    cuda_memory["stuck"] = 8.0  # free: 80 - 1 - 28 = 51 GiB
    assert ModelRunner._cuda_kv_budget(_runner(fixed=50 * GiB)) == 50 * GiB
    with pytest.raises(ValueError, match=r"kv_cache_memory 52\.00 GiB does not fit: 51\.00 GiB"):
        ModelRunner._cuda_kv_budget(_runner(fixed=52 * GiB))


def test_no_room_left_is_a_clear_error(cuda_memory):
    cuda_memory["stuck"] = 60
    with pytest.raises(ValueError, match="no memory left for the KV cache"):
        ModelRunner._cuda_kv_budget(_runner())


def test_profiling_forward_runs_the_sampler_at_its_widest(tmp_path, monkeypatch):
    # the peak the KV budget subtracts includes sampling max_num_seqs rows with top-k, top-p
    # and logprobs (sorts and copies of [rows, vocab]), as vLLM's profile run does; through a
    # plain Sampler, so custom logits processors never see the dummy rows
    from helpers.tiny_models import load_cpu, make_tiny_llama_dir
    from modelport.runner import model_runner

    model = load_cpu(make_tiny_llama_dir(tmp_path / "m"))
    seen = []

    class Spy(model_runner.Sampler):
        def __call__(self, logits, rows):
            seen.append((tuple(logits.shape), logits.dtype, self.logits_processors, rows))
            tokens, lps = super().__call__(logits, rows)
            seen.append((tokens, lps))
            return tokens, lps

    monkeypatch.setattr(model_runner, "Sampler", Spy)
    sched = SimpleNamespace(max_num_batched_tokens=24, max_model_len=16, max_num_seqs=5)
    runner = SimpleNamespace(model=model, tp_workers=None, device=torch.device("cpu"),
                             config=SimpleNamespace(scheduler_config=sched))
    ModelRunner.profile_run(runner)
    (shape, dtype, processors, rows), (tokens, lps) = seen
    assert shape == (5, model.config.vocab_size) and dtype == torch.float32 and processors is None
    assert len(rows) == 5 and all(r.params.top_k == model_runner.PROFILE_TOP_K and
                                  r.params.top_p < 1 and not r.params.greedy for r in rows)
    assert tokens.shape == (5,) and all(len(lp.token_ids) >= model_runner.PROFILE_LOGPROBS
                                        for lp in lps)
    seen.clear()
    runner.pooler = object()  # a pooling model's runner: no sampler in its profile
    ModelRunner.profile_run(runner)
    assert seen == []
