"""Settings read from the environment under modelport's name or vLLM's: MODELPORT_<NAME> wins,
else VLLM_<NAME> (vLLM users keep their variables: VLLM_TORCH_PROFILER_DIR,
VLLM_SERVER_DEV_MODE, ...)."""

from __future__ import annotations

import os


def env_value(name: str) -> str | None:
    """MODELPORT_<name>, else VLLM_<name>, stripped (None: neither set, or set empty)."""
    for prefix in ("MODELPORT_", "VLLM_"):
        value = os.environ.get(prefix + name)
        if value is not None and value.strip():
            return value.strip()
    return None


def env_flag(name: str, default: bool) -> bool:
    """env_value(name) as a switch: 0 / false / no / off are off, any other value on."""
    value = env_value(name)
    if value is None:
        return default
    return value.lower() not in ("0", "false", "no", "off")
