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
