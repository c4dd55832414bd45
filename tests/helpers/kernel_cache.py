"""A MODELPORT_CACHE folder for a test module (or a test) that starts tensor-parallel
engines, with the CPU C kernels (layers/csrc/cpu_decode.c) already built in it.

A tensor-parallel rank is a fresh process: it builds the kernels into $MODELPORT_CACHE
unless they are there (~2.5 s of cc). With a cache folder per test (so that no test writes
GGUF conversions into ~/.cache) every tensor-parallel engine compiled them again; a folder
per module, seeded with the library this process has loaded, has them from the start.
Entries in it are keyed by their source file's path, size and mtime (loader/cache.py), so
tests sharing it do not see each other's conversions of different files.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest


def seeded_cache(root: Path) -> Path:
    """``root / "cache"``, holding the CPU kernels this process uses (built there if this
    process had not built or loaded them yet)."""
    from modelport.layers import cpu_kernels

    cache = root / "cache"
    cache.mkdir(parents=True, exist_ok=True)
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MODELPORT_CACHE", str(cache))
        lib = cpu_kernels.load_library()
    if lib is not None:  # <cache>/cpu_kernels/<key>/lib...so, maybe in another test's cache
        built = Path(lib._name).parent
        target = cache / built.parent.name / built.name
        if built.is_dir() and not target.exists():  # else a rank builds them, as before
            shutil.copytree(built, target)
    return cache
