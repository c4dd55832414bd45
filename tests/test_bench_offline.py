"""The offline benchmark harness (`modelport bench throughput|latency`) on CPU with a tiny model."""

from __future__ import annotations

import argparse
import json

import pytest

from helpers.tiny_models import make_tiny_llama_dir
from modelport.bench import _harness as h
from modelport.bench import latency, throughput

KINDS = {"throughput": throughput, "latency": latency}


def main(argv: list[str]) -> int:
    """`modelport bench <kind> ...` minus the CLI dispatch (each kind's own add_args/run)."""
    assert argv[0] == "bench"
    mod = KINDS[argv[1]]
    p = argparse.ArgumentParser()
    mod.add_args(p)
    return mod.run(p.parse_args(argv[2:]))


def test_w1_workload_reproduces_bench_md_totals():
    # shared/BENCH.md: 256 requests, lengths uniform in [100, 1024], random.Random(0), prompts
    # first then output lengths -> 140,306 prompt tokens and 141,230 output tokens
    prompts, outs = h.w1_workload(256, (100, 1024), (100, 1024), 128256, 0)
    assert sum(map(len, prompts)) == 140_306
    assert sum(outs) == 141_230
    assert all(0 <= t < 128256 for p in prompts for t in p)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return make_tiny_llama_dir(tmp_path_factory.mktemp("bench") / "m", with_tokenizer=False)


def _read(path):
    lines = path.read_text().splitlines()
    assert len(lines) == 1
    return json.loads(lines[0])


def test_throughput_side_by_side_with_hf(tiny, tmp_path, capsys):
    out = tmp_path / "t.jsonl"
    rc = main(
        [
            "bench",
            "throughput",
            "--model",
            str(tiny),
            "--num-prompts",
            "5",
            "--input-len-range",
            "4",
            "40",
            "--output-len-range",
            "2",
            "9",
            "--kv-cache-memory",
            "8000000",
            "--max-num-batched-tokens",
            "32",
            "--backend",
            "both",
            "--hf-mode",
            "static",
            "--hf-batch-size",
            "3",
            "--output-json",
            str(out),
        ]
    )
    assert rc == 0
    r = _read(out)
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1]) == r
    _, outs = h.w1_workload(5, (4, 40), (2, 9), 259, 0)
    ours, hf = r["runs"]
    assert ours["backend"] == "modelport" and hf["backend"] == "hf-static"
    assert ours["output_tokens"] == hf["output_tokens"] == sum(outs)
    assert ours["output_tok_s"] > 0 and ours["seconds"] > 0
    assert ours["max_num_batched_tokens"] == (r["args"]["max_num_batched_tokens"] or 512)
    assert r["ratio_output_tok_s"] == round(ours["output_tok_s"] / hf["output_tok_s"], 2)
    assert r["env"]["device"] == "cpu" and r["env"]["torch"]
    assert r["args"]["num_prompts"] == 5 and r["args"]["backend"] == "both"


def test_latency_reports_ttft_and_itl(tiny, tmp_path):
    out = tmp_path / "l.jsonl"
    rc = main(
        [
            "bench",
            "latency",
            "--model",
            str(tiny),
            "--input-len",
            "24",
            "--output-len",
            "6",
            "--num-iters",
            "2",
            "--num-iters-warmup",
            "1",
            "--kv-cache-memory",
            "8000000",
            "--output-json",
            str(out),
        ]
    )
    assert rc == 0
    r = _read(out)
    (run,) = r["runs"]
    assert r["workload"] == {
        "batch_size": 1,
        "input_len": 24,
        "output_len": 6,
        "num_iters": 2,
        "greedy": True,
    }
    assert len(run["ttft_ms_all"]) == 2 and len(run["itl_ms_all"]) == 2
    assert run["ttft_ms"] > 0 and run["itl_ms"] > 0
    assert run["max_num_batched_tokens"] == 512  # no flag: the engine's CPU default, recorded
    # the first step() returns no later than the first token is back
    assert len(run["first_step_ms_all"]) == 2
    assert all(0 < f <= t for f, t in zip(run["first_step_ms_all"], run["ttft_ms_all"]))


def test_latency_with_a_speculative_config(tiny, tmp_path):
    out = tmp_path / "s.jsonl"
    spec = {"method": "ngram", "num_speculative_tokens": 2}
    rc = main(["bench", "latency", "--model", str(tiny), "--input-len", "16", "--output-len", "6",
               "--num-iters", "1", "--num-iters-warmup", "0", "--kv-cache-memory", "8000000",
               "--speculative-config", json.dumps(spec), "--output-json", str(out)])
    assert rc == 0
    r = _read(out)
    assert r["args"]["speculative_config"] == spec and r["runs"][0]["itl_ms"] > 0
    with pytest.raises(SystemExit):
        main(["bench", "latency", "--model", str(tiny), "--speculative-config", "{bad"])


def test_latency_with_tensor_parallel_ranks(tiny, tmp_path):
    out = tmp_path / "tp.jsonl"
    rc = main(["bench", "latency", "--model", str(tiny), "--input-len", "16", "--output-len", "4",
               "--num-iters", "1", "--num-iters-warmup", "0", "--kv-cache-memory", "8000000",
               "--tensor-parallel-size", "2", "--output-json", str(out)])
    assert rc == 0
    r = _read(out)
    assert r["args"]["tensor_parallel_size"] == 2 and r["runs"][0]["itl_ms"] > 0


def test_model_config_with_dummy_weights(tmp_path):
    # what the H200 runs use (bench/configs/llama-3.1-8b.json), here with a tiny shape
    cfg = tmp_path / "tiny.json"
    cfg.write_text(
        json.dumps(
            {
                "architectures": ["LlamaForCausalLM"],
                "hidden_size": 32,
                "intermediate_size": 64,
                "num_hidden_layers": 1,
                "num_attention_heads": 4,
                "num_key_value_heads": 2,
                "vocab_size": 300,
                "max_position_embeddings": 256,
            }
        )
    )
    out = tmp_path / "d.jsonl"
    rc = main(
        [
            "bench",
            "throughput",
            "--model-config",
            str(cfg),
            "--load-format",
            "dummy",
            "--num-prompts",
            "3",
            "--input-len-range",
            "3",
            "10",
            "--output-len-range",
            "2",
            "4",
            "--kv-cache-memory",
            "4000000",
            "--output-json",
            str(out),
        ]
    )
    assert rc == 0
    (run,) = _read(out)["runs"]
    assert run["output_tokens"] == sum(h.w1_workload(3, (3, 10), (2, 4), 300, 0)[1])


def test_throughput_takes_vllms_fixed_input_and_output_lengths(tiny, tmp_path, capsys):
    # `vllm bench throughput --input-len N --output-len M`: every request exactly N / M long
    # (before, argparse read --input-len as an abbreviation of --input-len-range)
    out = tmp_path / "t.jsonl"
    rc = main(["bench", "throughput", "--model", str(tiny), "--num-prompts", "3",
               "--input-len", "12", "--output-len", "4", "--output-json", str(out)])
    assert rc == 0
    res = _read(out)
    assert res["workload"]["input_len_range"] == [12, 12]
    assert res["workload"]["output_len_range"] == [4, 4]
    run = res["runs"][0]
    assert run["prompt_tokens"] == 36 and run["output_tokens"] == 12


def test_lengths_past_the_models_context_are_refused_before_running(tiny):
    """The default W1 / W3 lengths on a 512-position model: a clear error naming the flags,
    not the engine's ValueError traceback from the middle of the run."""
    with pytest.raises(SystemExit, match=r"1152 tokens exceeds the model's max_model_len 512"):
        main(["bench", "latency", "--model", str(tiny)])
    with pytest.raises(SystemExit, match=r"max_model_len is 512; lower --input-len"):
        main(["bench", "throughput", "--model", str(tiny), "--num-prompts", "4"])
    with pytest.raises(SystemExit, match=r"exceeds the model's max_model_len 64"):
        main(["bench", "latency", "--model", str(tiny), "--max-model-len", "64",
              "--input-len", "60", "--output-len", "8"])
