"""Switch for the CPU decode fast paths (fewer ops per layer: one rms_norm, q and k rotated
in one pass, a batch-1 decode attention without the per-request loop).

Every fast path computes the same bits as the plain code it replaces (checked in
tests/test_models_llama.py). ``ENABLED`` is read at call time, so a benchmark can compare
both in one process (``MODELPORT_CPU_FAST_DECODE=0`` starts with them off).
"""

from __future__ import annotations

import os

ENABLED = os.environ.get("MODELPORT_CPU_FAST_DECODE", "1") != "0"
