"""`modelport generate`: a greedy completion of the embedded default model printed to stdout."""

from __future__ import annotations

import subprocess
import sys


def run_cli(*args: str, timeout: float = 240) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "modelport.entrypoints.cli", "generate", *args],
        capture_output=True, text=True, timeout=timeout,
    )  # fmt: skip


def test_generate_prints_a_greedy_completion() -> None:
    args = ("--prompt", "The capital of France is", "--max-tokens", "4", "--ignore-eos",
            "--max-model-len", "64")  # fmt: skip
    first = run_cli(*args)
    assert first.returncode == 0, first.stderr[-3000:]
    assert first.stdout.strip(), "no completion printed"
    assert "finish_reason=length" in first.stderr


def test_generate_rejects_bad_values_before_loading() -> None:
    r = run_cli("--prompt", "x", "--max-tokens", "0", timeout=60)
    assert r.returncode == 2
    assert "max_tokens" in r.stderr
