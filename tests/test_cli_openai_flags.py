"""`modelport serve` and the api_server module take the same vLLM-named flags; `wants()` picks
the OpenAI frontend for --model or when no other frontend is asked for."""

from __future__ import annotations

import argparse

import pytest

from modelport.entrypoints.cli import build_parser
from modelport.entrypoints.openai import frontend
from modelport.entrypoints.openai.api_server import engine_args_from, make_parser

FLAGS = [
    "--model", "/models/llama", "--port", "8001", "--tensor-parallel-size", "1",
    "--gpu-memory-utilization", "0.8", "--max-model-len", "8192", "--enable-prefix-caching",
    "--served-model-name", "llama", "alias", "--api-key", "k", "--max-num-seqs", "4",
    "--max-num-batched-tokens", "64", "--enforce-eager", "--load-format", "dummy",
    "--kv-cache-memory", "1GiB", "--dtype", "float32", "--max-waiting-requests", "9",
    "--seed", "5", "--block-size", "32",
]  # fmt: skip


@pytest.mark.parametrize("form", ["serve", "api_server"])
def test_same_vllm_flags_in_both_launch_forms(form: str) -> None:
    if form == "serve":
        args = build_parser().parse_args(["serve", *FLAGS])
    else:
        args = make_parser().parse_args(FLAGS)
    assert args.port == 8001 and args.api_key == "k"
    assert args.served_model_name == ["llama", "alias"]
    ea = engine_args_from(args)
    assert ea.model == "/models/llama" and ea.served_model_name == "llama"
    assert ea.max_model_len == 8192 and ea.gpu_memory_utilization == 0.8
    assert ea.max_num_seqs == 4 and ea.max_num_batched_tokens == 64
    assert ea.enforce_eager and ea.enable_prefix_caching and ea.load_format == "dummy"
    assert ea.kv_cache_memory == 1 << 30 and ea.dtype == "float32"
    assert ea.max_waiting_requests == 9 and ea.seed == 5 and ea.block_size == 32


def test_wants_default_model_unless_another_frontend_is_asked_for() -> None:
    ns = argparse.Namespace
    assert frontend.wants(ns(model=None))  # `modelport serve`: the embedded default
    assert frontend.wants(ns(model="/m", model_repository="/repo"))
    # a repository alone: /v1 routes for its `llm` models, but no default LLM of our own
    assert frontend.wants(ns(model=None, model_repository="/repo"))
    assert not frontend._own_engine(ns(model=None, model_repository="/repo"))
    assert frontend._own_engine(ns(model="/m", model_repository="/repo"))
    assert not frontend.wants(ns(model=None, model_store="/store", models=["a.mar"]))
    assert not frontend.wants(ns(model=None, ts_config="config.properties"))


def test_bad_flag_values_are_rejected() -> None:
    with pytest.raises(SystemExit):
        build_parser().parse_args(["serve", "--kv-cache-memory", "lots"])
    with pytest.raises(SystemExit):
        build_parser().parse_args(["serve", "--port", "eighty"])
