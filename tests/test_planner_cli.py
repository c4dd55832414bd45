"""`modelport plan` end to end: table, --json, advice, and one-line errors with exit code 2."""

from __future__ import annotations

import json
import os
import shlex
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from modelport.entrypoints.cli import main

CONFIG_8B = Path(__file__).resolve().parents[1] / "bench" / "configs" / "llama-3.1-8b.json"


def _run(capsys, *argv: str) -> tuple[int, str, str]:
    rc = main(["plan", *argv])
    out, err = capsys.readouterr()
    return rc, out, err


def _json(capsys, *argv: str) -> dict:
    rc, out, err = _run(capsys, *argv, "--json")
    assert rc == 0, err
    assert len(out.strip().splitlines()) == 1  # one object, one line
    return json.loads(out)


SEED = ("--model", "llama-3.1-8b", "--gpu", "h100-80gb", "--max-model-len", "8192",
        "--max-num-seqs", "256", "--dtype", "bf16")  # fmt: skip


def test_seed_case_table_says_it_does_not_fit(capsys):
    rc, out, _ = _run(capsys, *SEED)
    assert rc == 0
    assert "128.0 KiB" in out
    assert "256 x 8192 tokens = 256.00 GiB" in out
    assert "DOES NOT FIT" in out
    assert "--kv-cache-dtype fp8" in out  # among the recommendations


def test_json_has_the_figures_and_a_serve_command_that_really_fits(capsys):
    d = _json(capsys, *SEED)
    assert d["kv_cache"]["bytes_per_token"] == 131072
    assert d["kv_cache"]["demand_bytes"] == 256 * 2**30
    assert d["verdict"]["fits"] is False
    assert d["parallelism"]["valid_tensor_parallel_sizes"] == [1, 2, 4, 8]
    cmd = shlex.split(d["serve_command"])
    assert cmd[:2] == ["modelport", "serve"]
    # re-plan exactly the recommended settings: they must fit
    flags = dict(zip(cmd[2::2], cmd[3::2], strict=True))
    again = _json(
        capsys,
        "--model", "llama-3.1-8b", "--gpu", "h100-80gb",
        "--dtype", flags["--dtype"],
        "--max-model-len", flags["--max-model-len"],
        "--max-num-seqs", flags["--max-num-seqs"],
        "--kv-cache-dtype", flags.get("--kv-cache-dtype", "auto"),
    )  # fmt: skip
    assert again["verdict"]["fits"] is True
    seqs = int(flags["--max-num-seqs"])
    assert again["kv_cache"]["full_length_sequences"] >= seqs
    # and no more: one sequence more does not fit
    more = _json(
        capsys,
        "--model", "llama-3.1-8b", "--gpu", "h100-80gb",
        "--dtype", flags["--dtype"],
        "--max-model-len", flags["--max-model-len"],
        "--max-num-seqs", str(seqs + 1),
        "--kv-cache-dtype", flags.get("--kv-cache-dtype", "auto"),
    )  # fmt: skip
    assert more["verdict"]["fits"] is False


def test_tp_3_is_refused_for_llama_8b(capsys):
    rc, out, err = _run(capsys, "--model", "llama-3.1-8b", "--gpu", "h100-80gb", "--num-gpus", "3")
    assert rc == 2 and out == ""
    assert err.startswith("modelport plan: error: --num-gpus: tensor parallel degree 3")
    assert "32 attention heads" in err and "8 KV heads" in err and "1, 2, 4, 8" in err


def test_warnings_high_utilization_and_tp_over_pcie(capsys):
    d = _json(capsys, "--model", "qwen2.5-7b", "--gpu", "l4", "--num-gpus", "2",
              "--max-model-len", "4096", "--max-num-seqs", "4",
              "--gpu-memory-utilization", "0.97")  # fmt: skip
    text = " ".join(d["warnings"])
    assert "0.97" in text and "OOM" in text
    assert "PCIe" in text


def test_data_parallel_advice_when_one_gpu_holds_the_model(capsys):
    d = _json(capsys, "--model", "llama-3.1-8b", "--gpu", "h100-80gb", "--num-gpus", "8",
              "--max-model-len", "8192", "--max-num-seqs", "64")  # fmt: skip
    assert d["verdict"]["fits"] is True
    assert any("8 data-parallel replicas of TP=1" in r for r in d["recommendations"])


def test_serve_command_runs_the_replicas(capsys):
    d = _json(capsys, "--model", "llama-3.1-8b", "--gpu", "h100-80gb", "--num-gpus", "4",
              "--tensor-parallel-size", "2", "--max-model-len", "8192")  # fmt: skip
    assert d["parallelism"]["data_parallel_replicas"] == 2
    assert "--tensor-parallel-size 2 --data-parallel-size 2 " in d["serve_command"]


def test_custom_gpu_from_explicit_figures(capsys):
    d = _json(capsys, "--model", "mistral-7b", "--gpu-memory-gib", "48",
              "--gpu-bandwidth-tbps", "0.864", "--gpu-tflops", "181",
              "--max-model-len", "8192", "--max-num-seqs", "8")  # fmt: skip
    assert d["device"]["memory_bytes"] == 48 * 2**30
    assert d["roofline"]["itl_ms_min"] == pytest.approx(
        d["weights"]["resident_per_gpu_bytes"] / 0.864e12 * 1e3, rel=1e-3
    )


TINY_CONFIG = {"architectures": ["LlamaForCausalLM"], "vocab_size": 1000, "hidden_size": 256,
               "intermediate_size": 512, "num_hidden_layers": 4, "num_attention_heads": 8,
               "num_key_value_heads": 2, "max_position_embeddings": 1024,
               "torch_dtype": "float32"}  # fmt: skip


def test_hf_config_folder(capsys, tmp_path):
    (tmp_path / "config.json").write_text(json.dumps(TINY_CONFIG))
    d = _json(capsys, "--model", str(tmp_path), "--gpu", "a10g", "--max-num-seqs", "4")
    assert d["settings"]["dtype"] == "bfloat16"  # fp32 checkpoints run bf16 on CUDA
    assert d["kv_cache"]["bytes_per_token"] == 2 * 4 * 2 * 32 * 2


@pytest.mark.parametrize(
    ("argv", "flag", "needle"),
    [
        (("--model", "llama-9b", "--gpu", "h100"), "--model", "neither a preset"),
        (("--model", "llama-3.1-8b", "--gpu", "tpu-v5"), "--gpu", "unknown GPU preset"),
        (("--model", "llama-3.1-8b", "--gpu", "h100", "--max-num-seqs", "-1"),
         "--max-num-seqs", "must be > 0"),
        (("--model", "llama-3.1-8b", "--gpu", "cpu", "--memory", "-8"), "--memory", "> 0"),
        (("--model", "llama-3.1-8b", "--gpu", "cpu"), "--memory", "host RAM"),
        (("--model", "llama-3.1-8b", "--gpu", "cpu", "--memory", "8", "--kv-cache-memory", "-5"),
         "--kv-cache-memory", "must be > 0"),
        (("--model", "llama-3.1-8b", "--gpu", "h100", "--gpu-memory-gib", "0"),
         "--gpu-memory-gib", "> 0"),
        (("--model", "llama-3.1-8b", "--gpu", "h100", "-q", "gguf-q9"), "--quantization", "unknown"),
        (("--model", "llama-3.1-8b", "--gpu", "cpu", "--memory", "64", "--num-gpus", "2"),
         "--num-gpus", "one host"),
        (("--model", "llama-3.1-8b", "--gpu", "h100", "--interconnect", "wifi"),
         "--interconnect", "nvlink"),
    ],
)  # fmt: skip
def test_bad_input_is_one_line_naming_the_flag(capsys, argv, flag, needle):
    rc, out, err = _run(capsys, *argv)
    assert rc == 2 and out == ""
    assert len(err.strip().splitlines()) == 1
    assert err.startswith(f"modelport plan: error: {flag}: ")
    assert needle in err


def test_config_missing_fields_names_model_and_the_field(capsys, tmp_path):
    (tmp_path / "config.json").write_text(
        json.dumps(
            {
                "architectures": ["LlamaForCausalLM"],
                "vocab_size": 10,
                "num_hidden_layers": 2,
                "num_attention_heads": 2,
            }
        )  # fmt: skip
    )
    rc, _, err = _run(capsys, "--model", str(tmp_path), "--gpu", "h100")
    assert rc == 2
    assert err.startswith("modelport plan: error: --model: ") and "hidden_size" in err


def test_real_process_exit_code_2_and_no_traceback():
    proc = subprocess.run(
        [sys.executable, "-m", "modelport.entrypoints.cli", "plan", "--model", "nope",
         "--gpu", "h100"],  # fmt: skip
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr
    assert proc.stderr.strip().startswith("modelport plan: error: --model:")


def test_serve_command_from_a_config_without_weights_names_what_to_fill_in(capsys, tmp_path):
    """A bare config (bench/configs/*.json) cannot be served: the command says what goes there."""
    bare = ("--model", str(CONFIG_8B), "--gpu", "h100-80gb", "--max-num-seqs", "8",
            "--max-model-len", "8192")  # fmt: skip
    d = _json(capsys, *bare)
    assert shlex.split(d["serve_command"])[2:4] == ["--model", "MODEL_DIR"]
    assert "has no weights beside it" in d["serve_note"]
    rc, out, _ = _run(capsys, *bare)
    assert rc == 0 and "(MODEL_DIR: put here the folder holding this config.json" in out
    # a config naming its hub id: serve finds that id in the local HF cache
    cfg = json.loads(CONFIG_8B.read_text())
    (tmp_path / "config.json").write_text(json.dumps({**cfg, "_name_or_path": "org/some-8b"}))
    d = _json(capsys, "--model", str(tmp_path), *bare[2:])
    assert shlex.split(d["serve_command"])[2:4] == ["--model", "org/some-8b"]
    assert "local HF cache" in d["serve_note"]
    # the preset and a folder with weights keep their names, with no note
    assert _json(capsys, *SEED)["serve_note"] is None


# no --gpu: the planner plans for the machine it runs on (torch.cuda is faked either way)


def _no_cuda(monkeypatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)


def _fake_cuda(monkeypatch, name: str, total_memory: int, count: int = 1,
               capability: tuple[int, int] = (9, 0)) -> None:  # fmt: skip
    props = SimpleNamespace(name=name, total_memory=total_memory, major=capability[0],
                            minor=capability[1])  # fmt: skip
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: count)
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda index=0: props)


@pytest.fixture
def tiny_dir(tmp_path) -> Path:
    (tmp_path / "config.json").write_text(json.dumps(TINY_CONFIG))
    return tmp_path


def test_no_gpu_without_cuda_plans_for_this_machines_cpu(capsys, monkeypatch, tiny_dir):
    _no_cuda(monkeypatch)
    ram = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    d = _json(capsys, "--model", str(tiny_dir), "--max-num-seqs", "4")
    assert d["device"]["kind"] == "cpu" and d["device"]["count"] == 1
    assert d["device"]["memory_bytes"] == ram
    assert d["device"]["source"] == "this machine"
    assert d["device"]["detected"] == f"this machine's CPU ({ram / 2**30:.1f} GiB RAM)"
    assert d["settings"]["dtype"] == "float32"  # the CPU keeps an fp32 checkpoint's dtype
    assert d["verdict"]["fits"] is True
    assert "--device cpu" in d["serve_command"]
    # the same plan as --gpu cpu with that RAM, but for the device's provenance
    preset = _json(capsys, "--model", str(tiny_dir), "--max-num-seqs", "4", "--gpu", "cpu",
                   "--memory", str(ram / 2**30))  # fmt: skip
    assert preset["device"].pop("source") == "preset" and preset["device"].pop("detected") is None
    d["device"].pop("source"), d["device"].pop("detected")
    assert preset == d
    rc, out, err = _run(capsys, "--model", str(tiny_dir), "--max-num-seqs", "4")
    assert rc == 0 and err == ""
    assert out.splitlines()[0] == (
        f"device: this machine's CPU ({ram / 2**30:.1f} GiB RAM), as no --gpu was given"
    )
    # --memory still sets the RAM; a GPU figure without CUDA here is a custom GPU missing two
    d = _json(capsys, "--model", str(tiny_dir), "--memory", "16")
    assert d["device"]["memory_bytes"] == 16 * 2**30
    assert d["device"]["detected"] == "this machine's CPU (16.0 GiB RAM from --memory)"
    rc, out, err = _run(capsys, "--model", str(tiny_dir), "--gpu-memory-gib", "48")
    assert rc == 2 and out == "" and len(err.strip().splitlines()) == 1
    assert err.startswith("modelport plan: error: --gpu: this machine has no CUDA device")
    assert "missing --gpu-bandwidth-tbps, --gpu-tflops" in err


def test_no_gpu_with_cuda_plans_for_the_first_visible_gpu(capsys, monkeypatch, tiny_dir):
    total = 85_022_736_384  # an H100 80GB HBM3 as torch reports it
    _fake_cuda(monkeypatch, "NVIDIA H100 80GB HBM3", total)
    d = _json(capsys, "--model", str(tiny_dir), "--max-num-seqs", "4")
    dev = d["device"]
    assert (dev["kind"], dev["name"], dev["count"]) == ("cuda", "NVIDIA H100 80GB HBM3", 1)
    assert dev["memory_bytes"] == total and d["memory"]["device_bytes"] == total
    assert d["memory"]["usable_bytes"] == pytest.approx(0.9 * total, abs=1)
    assert dev["source"] == "this machine"
    # what the name does not say comes from the matching preset
    assert dev["bandwidth_bytes_per_s"] == pytest.approx(3.35e12)
    assert dev["fp8"] is True and dev["interconnect"] == "nvlink"
    assert "bandwidth and TFLOPS of the h100-80gb preset" in dev["detected"]
    assert d["settings"]["dtype"] == "bfloat16"  # fp32 checkpoints run bf16 on CUDA
    assert "--device cpu" not in d["serve_command"]
    rc, out, _ = _run(capsys, "--model", str(tiny_dir), "--max-num-seqs", "4")
    assert rc == 0
    assert out.splitlines()[0].startswith(
        "device: this machine's GPU, NVIDIA H100 80GB HBM3 (79.2 GiB; "
    )
    # --gpu-memory-gib overrides the device's memory; --memory is for the CPU
    d = _json(capsys, "--model", str(tiny_dir), "--gpu-memory-gib", "40")
    assert d["device"]["memory_bytes"] == 40 * 2**30
    rc, _, err = _run(capsys, "--model", str(tiny_dir), "--memory", "16")
    assert rc == 2 and err.startswith("modelport plan: error: --memory: is for --gpu cpu")
    # a preset is still the preset, whatever this machine has
    d = _json(capsys, "--model", str(tiny_dir), "--gpu", "l4")
    assert d["device"]["name"] == "L4" and d["device"]["source"] == "preset"
    assert d["device"]["memory_bytes"] == int(22.03 * 2**30)


def test_no_gpu_on_an_unknown_gpu_has_its_memory_but_no_roofline(capsys, monkeypatch, tiny_dir):
    _fake_cuda(monkeypatch, "NVIDIA L40S", 48 * 2**30, capability=(8, 9))  # no L4
    d = _json(capsys, "--model", str(tiny_dir), "--max-num-seqs", "4")
    dev = d["device"]
    assert dev["memory_bytes"] == 48 * 2**30 and dev["name"] == "NVIDIA L40S"
    assert dev["fp8"] is True and dev["interconnect"] == "pcie"
    assert d["roofline"] is None and d["verdict"]["fits"] is True
    assert "no preset matches its name" in dev["detected"]
    # its bandwidth and TFLOPS from the flags give the roofline
    d = _json(capsys, "--model", str(tiny_dir), "--max-num-seqs", "4",
              "--gpu-bandwidth-tbps", "0.864", "--gpu-tflops", "362")  # fmt: skip
    assert d["device"]["memory_bytes"] == 48 * 2**30 and d["roofline"] is not None
    assert d["device"]["detected"] == "this machine's GPU, NVIDIA L40S (48.0 GiB)"


def test_no_gpu_and_no_num_gpus_takes_the_fewest_gpus_the_model_needs(capsys, monkeypatch):
    _fake_cuda(monkeypatch, "NVIDIA L4", int(22.03 * 2**30), count=4, capability=(8, 9))
    base = ("--model", "llama-3.1-8b", "--max-num-seqs", "4")
    # one L4 holds the bf16 weights but not one 131072-token sequence's KV beside them
    one = _json(capsys, *base, "--num-gpus", "1")
    assert one["verdict"]["engine_starts"] is False
    d = _json(capsys, *base)
    assert d["device"]["count"] == 2 and d["parallelism"]["tensor_parallel_size"] == 2
    assert d["verdict"]["engine_starts"] is True
    assert "GPU 0 of 4" in d["device"]["detected"]
    # a short context fits one GPU; -tp alone sets the GPUs
    d = _json(capsys, *base, "--max-model-len", "4096")
    assert d["device"]["count"] == 1
    d = _json(capsys, *base, "-tp", "4")
    assert d["device"]["count"] == 4 and d["parallelism"]["tensor_parallel_size"] == 4
    # none of this machine's GPUs suffice: plan one and let the advice say how many
    _fake_cuda(monkeypatch, "NVIDIA L4", int(22.03 * 2**30), count=1, capability=(8, 9))
    d = _json(capsys, *base)
    assert d["device"]["count"] == 1 and d["verdict"]["engine_starts"] is False
    assert any(r.startswith("more GPUs: TP=") for r in d["recommendations"])


def test_unknown_gpu_preset_is_one_clear_line(capsys, monkeypatch):
    _no_cuda(monkeypatch)
    rc, out, err = _run(capsys, "--model", "llama-3.1-8b", "--gpu", "tpu-v5")
    assert rc == 2 and out == ""
    assert len(err.strip().splitlines()) == 1
    assert err.startswith("modelport plan: error: --gpu: unknown GPU preset 'tpu-v5' (known: ")
    assert "h100-80gb" in err and "cpu" in err
    assert "leave --gpu out to plan for this machine" in err


def test_closed_stdout_ends_quietly() -> None:
    """`modelport plan ... | head -1`: the reader leaves early; no BrokenPipeError traceback,
    and the shell's SIGPIPE status."""
    p = subprocess.Popen(
        [sys.executable, "-m", "modelport", "plan", "--model", "llama-3.1-8b", "--gpu",
         "h100-80gb"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE,
    )  # fmt: skip
    p.stdout.close()  # before it writes: its first write finds no reader
    err = p.stderr.read().decode()
    assert p.wait() == 141, err
    assert "Traceback" not in err and "BrokenPipeError" not in err, err
