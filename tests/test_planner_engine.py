"""Planner and engine agree: the KV tokens `modelport plan` predicts for the embedded default
model on CPU are the tokens the engine allocates and logs at start-up."""

from __future__ import annotations

import json
import logging
import re

from modelport.entrypoints.cli import main

MAX_LEN = 2048


def test_planner_predicts_the_engines_kv_tokens_on_cpu(caplog, capsys):
    kv_cache_memory = 200 * 2**20 + 12345  # not a whole number of blocks: both must floor
    from modelport import LLM

    caplog.set_level(logging.INFO, logger="modelport")
    llm = LLM(kv_cache_memory=kv_cache_memory, device="cpu", max_model_len=MAX_LEN)
    engine = llm.llm_engine
    logged = [r.getMessage() for r in caplog.records if r.getMessage().startswith("KV cache: ")]
    assert logged, "the engine logs its KV cache size at start-up"
    blocks, block_size, tokens = map(
        int,
        re.fullmatch(r"KV cache: (\d+) blocks x (\d+) tokens = (\d+) tokens", logged[-1]).groups(),
    )
    assert (blocks, block_size) == (engine.num_kv_blocks, engine.block_size)
    del llm
    capsys.readouterr()
    rc = main(
        [
            "plan",
            "--gpu",
            "cpu",
            "--memory",
            "8",
            "--kv-cache-memory",
            str(kv_cache_memory),
            "--max-model-len",
            str(MAX_LEN),
            "--json",
        ]  # fmt: skip
    )
    assert rc == 0
    plan = json.loads(capsys.readouterr().out)
    assert plan["kv_cache"]["tokens"] == tokens
    assert plan["kv_cache"]["num_blocks"] == blocks
    assert plan["kv_cache"]["block_size"] == block_size
