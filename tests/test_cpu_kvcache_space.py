"""vLLM's VLLM_CPU_KVCACHE_SPACE (GiB; MODELPORT_CPU_KVCACHE_SPACE first): the KV cache of an
engine on the CPU when kv_cache_memory is not given."""

from __future__ import annotations

import pytest

from helpers.tiny_models import make_tiny_llama_dir
from modelport import LLM
from modelport.config import DEFAULT_CPU_KV_CACHE_MEMORY
from modelport.engine.arg_utils import EngineArgs


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return make_tiny_llama_dir(tmp_path_factory.mktemp("kvspace") / "m")


@pytest.fixture(autouse=True)
def _clean_env(monkeypatch):
    monkeypatch.delenv("VLLM_CPU_KVCACHE_SPACE", raising=False)
    monkeypatch.delenv("MODELPORT_CPU_KVCACHE_SPACE", raising=False)


def _kv(model_dir, **kw):
    cfg = EngineArgs(model=str(model_dir), device="cpu", max_model_len=64,
                     **kw).create_engine_config()
    return cfg.cache_config.kv_cache_memory


def test_the_variable_sizes_the_cpu_cache_in_gib(model_dir, monkeypatch) -> None:
    assert _kv(model_dir) is None  # unset: the default budget
    monkeypatch.setenv("VLLM_CPU_KVCACHE_SPACE", "0.25")
    assert _kv(model_dir) == 1 << 28
    monkeypatch.setenv("MODELPORT_CPU_KVCACHE_SPACE", "2")  # modelport's name wins
    assert _kv(model_dir) == 2 << 30
    assert _kv(model_dir, kv_cache_memory=1 << 20) == 1 << 20  # the argument wins
    monkeypatch.setenv("MODELPORT_CPU_KVCACHE_SPACE", "0")  # 0: the default, as in vLLM
    monkeypatch.delenv("VLLM_CPU_KVCACHE_SPACE")
    assert _kv(model_dir) is None


@pytest.mark.parametrize("value", ["lots", "-1", "nan", "inf"])
def test_a_value_that_is_no_size_is_refused(model_dir, monkeypatch, value) -> None:
    monkeypatch.setenv("VLLM_CPU_KVCACHE_SPACE", value)
    with pytest.raises(ValueError, match=rf"VLLM_CPU_KVCACHE_SPACE is '{value}'.*in GiB"):
        _kv(model_dir)


def test_the_engine_gets_as_many_blocks_as_that_budget_gives(model_dir, monkeypatch) -> None:
    monkeypatch.setenv("VLLM_CPU_KVCACHE_SPACE", str(1 / 1024))  # 1 MiB
    by_env = LLM(str(model_dir), device="cpu", max_model_len=64)
    monkeypatch.delenv("VLLM_CPU_KVCACHE_SPACE")
    by_arg = LLM(str(model_dir), device="cpu", max_model_len=64, kv_cache_memory=1 << 20)
    default = LLM(str(model_dir), device="cpu", max_model_len=64)
    blocks = [llm.llm_engine.num_kv_blocks for llm in (by_env, by_arg, default)]
    assert blocks[0] == blocks[1] and blocks[2] > blocks[0]
    assert blocks[2] == blocks[0] * (DEFAULT_CPU_KV_CACHE_MEMORY >> 20)


def test_the_cpu_plan_counts_the_same_budget(model_dir, monkeypatch, capsys) -> None:
    import json

    from modelport.entrypoints.cli import main

    def plan_blocks() -> int:
        capsys.readouterr()
        assert main(["plan", "--model", str(model_dir), "--gpu", "cpu", "--memory", "8",
                     "--max-model-len", "64", "--json"]) == 0
        return json.loads(capsys.readouterr().out)["kv_cache"]["num_blocks"]

    default = plan_blocks()
    monkeypatch.setenv("VLLM_CPU_KVCACHE_SPACE", str(1 / 1024))
    engine = LLM(str(model_dir), device="cpu", max_model_len=64).llm_engine.num_kv_blocks
    assert plan_blocks() == engine and default == engine * (DEFAULT_CPU_KV_CACHE_MEMORY >> 20)
