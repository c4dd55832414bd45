"""Offline model and GPU presets shipped as JSON inside the package.

Names are matched loosely (case, dashes, dots, underscores and spaces are ignored) so that
``H100-80GB``, ``h100_80gb`` and ``meta-llama/Llama-3.1-8B-Instruct`` all resolve.
"""

from __future__ import annotations

import functools
import json
import re
from importlib import resources
from typing import Any

from modelport.planner.errors import PlanError


def _key(name: str) -> str:
    return re.sub(r"[^a-z0-9]", "", name.lower())


@functools.cache
def _load(filename: str) -> dict[str, dict[str, Any]]:
    text = (
        resources.files("modelport.planner")
        .joinpath("presets")
        .joinpath(filename)
        .read_text("utf-8")
    )
    data = json.loads(text)
    return {k: v for k, v in data.items() if not k.startswith("_")}


@functools.cache
def _index(filename: str) -> dict[str, str]:
    index: dict[str, str] = {}
    for canonical, entry in _load(filename).items():
        for alias in (canonical, entry.get("name", canonical), *entry.get("aliases", ())):
            index[_key(alias)] = canonical
    return index


def _find(filename: str, name: str) -> tuple[str, dict[str, Any]] | None:
    canonical = _index(filename).get(_key(name))
    if canonical is None:
        return None
    return canonical, _load(filename)[canonical]


def find_model_preset(name: str) -> tuple[str, dict[str, Any]] | None:
    """(canonical name, HF-style config dict) of a built-in model, or None."""
    found = _find("models.json", name)
    if found is None:
        return None
    canonical, entry = found
    return canonical, dict(entry["config"])


def find_gpu_preset(name: str) -> dict[str, Any] | None:
    """A GPU preset entry (name, memory_gib, bandwidth_tbps, tflops, fp8, interconnect)."""
    found = _find("gpus.json", name)
    return None if found is None else dict(found[1])


def match_gpu_preset(device_name: str) -> str | None:
    """The GPU preset a device name as the driver reports it names (``NVIDIA H100 80GB HBM3``
    -> h100-80gb, ``NVIDIA A100-SXM4-40GB`` -> a100-40gb), or None. An alias must match whole
    words of the name (``NVIDIA L40S`` is no L4); the longest match wins. Never the CPU."""
    words = re.findall(r"[a-z0-9]+", device_name.lower())
    index = _index("gpus.json")
    spans = sorted(
        ("".join(words[i:j]) for i in range(len(words)) for j in range(i + 1, len(words) + 1)),
        key=len,
        reverse=True,
    )
    for span in spans:
        canonical = index.get(span)
        if canonical is not None and _load("gpus.json")[canonical].get("interconnect") != "none":
            return canonical
    return None


def model_preset_names() -> list[str]:
    return sorted(_load("models.json"))


def gpu_preset_names() -> list[str]:
    return sorted(_load("gpus.json"))


def require_gpu_preset(name: str) -> dict[str, Any]:
    entry = find_gpu_preset(name)
    if entry is None:
        raise PlanError(
            "--gpu",
            f"unknown GPU preset {name!r} (known: {', '.join(gpu_preset_names())}); "
            "leave --gpu out to plan for this machine",
        )
    return entry


def model_hub_id(canonical: str) -> str:
    """The preset's hub id (org/name), the name `modelport serve` finds in the local HF cache."""
    aliases = _load("models.json").get(canonical, {}).get("aliases", [])
    return next((a for a in aliases if "/" in a), canonical)
