"""The GPU machine has no network: every run_all.sh stage must start with only its image's
packages and the wheels a device session carries (bench/gpu/preflight.py, on the CPU)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench" / "gpu"))
import preflight  # noqa: E402


def test_stages_start_with_only_the_gpu_images_packages(capsys: pytest.CaptureFixture) -> None:
    # w2 (the HTTP stack, whose unpinned upstream releases add dependencies) and hf (slow on a
    # CPU) are left to `bench/gpu/preflight.py` before a device session
    rc = preflight.main(["--wheels", "msgspec", "gguf", "--only", "gpu-tests", "w3", "w1",
                         "quant-decode", "scripts"])
    out = capsys.readouterr().out
    assert rc == 0, out
    assert out.count("ok  ") == 5


def test_a_package_the_image_lacks_fails_the_stage_that_imports_it(
    capsys: pytest.CaptureFixture,
) -> None:
    # without msgspec (the engine's IPC messages) the engine cannot start there
    assert preflight.main(["--wheels", "gguf", "--only", "w3"]) == 1
    out = capsys.readouterr().out
    assert "FAIL w3" in out and "No module named 'msgspec' (not on the GPU machine" in out
    hidden = preflight.hidden_modules(
        preflight.with_requirements(preflight.image_packages()) | {"modelport"})
    assert "tritonclient" in hidden and "fastapi" in hidden and "torch" not in hidden
