"""vLLM's `enable_chunked_prefill` / `--[no-]enable-chunked-prefill`: accepted offline and on
the command line; off, each prompt runs whole (the step budget at least max_model_len)."""

from __future__ import annotations

import argparse
from pathlib import Path

import pytest

from helpers.tiny_models import make_tiny_llama_dir
from modelport import LLM, SamplingParams
from modelport.engine.arg_utils import EngineArgs


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_llama_dir(tmp_path_factory.mktemp("chunk") / "tiny")


def test_cli_flag_reaches_the_scheduler(tiny: Path) -> None:
    parser = EngineArgs.add_cli_args(argparse.ArgumentParser())
    for argv, chunked in (([], True), (["--enable-chunked-prefill"], True),
                          (["--no-enable-chunked-prefill"], False)):
        args = EngineArgs.from_cli_args(parser.parse_args(["--model", str(tiny), "--device",
                                                           "cpu", "--max-model-len", "512",
                                                           *argv]))
        sched = args.create_engine_config().scheduler_config
        assert sched.enable_chunked_prefill is chunked, argv
        assert sched.max_num_batched_tokens >= 512 or chunked


def test_offline_prompt_runs_whole_with_the_same_tokens(tiny: Path) -> None:
    prompt = list(range(3, 203))  # 200 tokens: several 64-token chunks when chunking
    sp = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True)
    chunked = LLM(str(tiny), device="cpu", max_model_len=256, max_num_batched_tokens=64)
    want = chunked.generate([prompt], sp, use_tqdm=False)[0].outputs[0].token_ids
    del chunked
    whole = LLM(str(tiny), device="cpu", max_model_len=256, enable_chunked_prefill=False)
    sched = whole.llm_engine.config.scheduler_config
    assert not sched.enable_chunked_prefill and sched.max_num_batched_tokens >= 256
    assert whole.generate([prompt], sp, use_tqdm=False)[0].outputs[0].token_ids == want


def test_whole_prompts_need_a_budget_of_max_model_len(tiny: Path) -> None:
    with pytest.raises(ValueError, match=r"max_num_batched_tokens \(64\) must be >= max_model_len"):
        LLM(str(tiny), device="cpu", max_model_len=256, max_num_batched_tokens=64,
            enable_chunked_prefill=False)
