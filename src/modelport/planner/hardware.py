"""The accelerator being planned for: a preset (H100-80GB, L4, CPU, ...), explicit figures, or
(no --gpu) the machine the planner runs on, as vLLM sizes for the device it runs on."""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

from modelport.planner.errors import PlanError
from modelport.planner.presets import match_gpu_preset, require_gpu_preset

GIB = 1 << 30
INTERCONNECTS = ("nvlink", "pcie")


@dataclass(frozen=True)
class Device:
    """One device of the deployment (all devices of a plan are alike)."""

    name: str
    kind: str  # "cuda" | "cpu"
    memory_bytes: int  # per device (host RAM for cpu)
    bandwidth_bytes_s: float  # memory bandwidth
    flops: float  # dense bf16 peak
    fp8: bool  # native fp8 tensor cores
    interconnect: str  # "nvlink" | "pcie" | "none"
    source: str = "preset"  # "preset" | "custom" (the three figures) | "this machine" (no --gpu)
    detected: str | None = None  # this machine: what was found, in words
    visible: int = 0  # this machine: how many GPUs it has (0 for its CPU)

    @property
    def is_cpu(self) -> bool:
        return self.kind == "cpu"


def _positive(flag: str, value: float | None) -> None:
    if value is not None and not value > 0:
        raise PlanError(flag, f"must be > 0, got {value}")


def host_memory_bytes() -> int | None:
    """This machine's physical RAM, or None where the OS does not say (no os.sysconf)."""
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (AttributeError, ValueError, OSError):
        return None


@dataclass(frozen=True)
class LocalGPU:
    """The first visible CUDA device of this machine."""

    name: str
    memory_bytes: int
    count: int  # visible CUDA devices (CUDA_VISIBLE_DEVICES)
    capability: tuple[int, int] | None


def local_gpu() -> LocalGPU | None:
    """This machine's first visible GPU as torch sees it, or None without CUDA."""
    import torch

    if not torch.cuda.is_available():
        return None
    props = torch.cuda.get_device_properties(0)
    major, minor = getattr(props, "major", None), getattr(props, "minor", None)
    return LocalGPU(
        name=str(props.name),
        memory_bytes=int(props.total_memory),
        count=max(1, torch.cuda.device_count()),
        capability=None if major is None or minor is None else (int(major), int(minor)),
    )


def _local_gpu_entry(gpu: LocalGPU) -> tuple[dict[str, Any], str | None]:
    """A preset-like entry for this machine's GPU and the preset its name matches: memory and
    name come from the device; bandwidth, TFLOPS and interconnect from that preset (none: no
    roofline unless the flags give them, fp8 from the compute capability, PCIe)."""
    preset = match_gpu_preset(gpu.name)
    if preset is not None:
        entry = require_gpu_preset(preset)
        if "pcie" in gpu.name.lower():  # H100 PCIe, A100 80GB PCIe: no NVLink
            entry["interconnect"] = "pcie"
    else:
        fp8 = gpu.capability is not None and gpu.capability >= (8, 9)
        entry = {"fp8": fp8, "interconnect": "pcie"}
    entry["name"] = gpu.name
    entry["memory_gib"] = gpu.memory_bytes / GIB
    return entry, preset


def resolve_device(
    gpu: str | None,
    *,
    memory_gib: float | None = None,
    gpu_memory_gib: float | None = None,
    bandwidth_tbps: float | None = None,
    tflops: float | None = None,
    interconnect: str | None = None,
) -> Device:
    """A preset with optional overrides, a custom GPU when all three figures are given, else
    this machine: its first visible GPU (the figures override its own), or without CUDA its
    CPU and RAM (--memory overrides that)."""
    for flag, v in (
        ("--memory", memory_gib),
        ("--gpu-memory-gib", gpu_memory_gib),
        ("--gpu-bandwidth-tbps", bandwidth_tbps),
        ("--gpu-tflops", tflops),
    ):
        _positive(flag, v)
    if interconnect is not None and interconnect not in INTERCONNECTS:
        raise PlanError("--interconnect", f"must be one of {', '.join(INTERCONNECTS)}")
    figures = (
        ("--gpu-memory-gib", gpu_memory_gib),
        ("--gpu-bandwidth-tbps", bandwidth_tbps),
        ("--gpu-tflops", tflops),
    )
    source, here, preset = "preset", None, None
    if gpu is not None:
        entry = require_gpu_preset(gpu)
    elif all(v is not None for _, v in figures):
        source = "custom"
        entry = {
            "name": "custom GPU",
            "memory_gib": gpu_memory_gib,
            "fp8": False,
            "interconnect": "pcie",
        }
    else:
        source, here = "this machine", local_gpu()
        if here is None:
            missing = [f for f, v in figures if v is None]
            if len(missing) < len(figures):
                raise PlanError(
                    "--gpu",
                    "this machine has no CUDA device to take the other figures from: give a "
                    "preset, or describe the GPU with --gpu-memory-gib, --gpu-bandwidth-tbps "
                    f"and --gpu-tflops (missing {', '.join(missing)})",
                )
            entry = require_gpu_preset("cpu")
            ram = host_memory_bytes()
            entry["memory_gib"] = None if ram is None else ram / GIB
        else:
            entry, preset = _local_gpu_entry(here)
    is_cpu = entry.get("interconnect") == "none"
    if is_cpu:
        if gpu_memory_gib is not None:
            raise PlanError("--gpu-memory-gib", "is for GPUs; give host RAM with --memory")
        mem = memory_gib if memory_gib is not None else entry.get("memory_gib")
        if mem is None:
            raise PlanError(
                "--memory",
                "--gpu cpu needs the host RAM in GiB (e.g. --memory 16)"
                if gpu is not None
                else "this machine has no CUDA device and does not say how much RAM it has: "
                "give it in GiB (e.g. --memory 16), or --gpu PRESET",
            )
    else:
        if memory_gib is not None:
            raise PlanError(
                "--memory",
                "is for --gpu cpu; override GPU memory with --gpu-memory-gib"
                if here is None
                else f"is for --gpu cpu, and this machine has a GPU ({here.name}) to plan for; "
                "override its memory with --gpu-memory-gib",
            )
        mem = gpu_memory_gib if gpu_memory_gib is not None else entry["memory_gib"]
    memory_bytes = int(mem * GIB)
    if here is not None and gpu_memory_gib is None:
        memory_bytes = here.memory_bytes  # exact, not through GiB
    detected = None
    if source == "this machine":
        if here is None:
            given = " from --memory" if memory_gib is not None else ""
            detected = f"this machine's CPU ({memory_bytes / GIB:.1f} GiB RAM{given})"
        else:
            which = f"GPU 0 of {here.count}" if here.count > 1 else "GPU"
            about = [f"{memory_bytes / GIB:.1f} GiB"]
            if gpu_memory_gib is not None:
                about[0] += " from --gpu-memory-gib"
            if preset is not None:
                about.append(f"bandwidth and TFLOPS of the {preset} preset")
            elif bandwidth_tbps is None or tflops is None:
                about.append(
                    "no preset matches its name: no roofline without --gpu-bandwidth-tbps "
                    "and --gpu-tflops"
                )
            detected = f"this machine's {which}, {here.name} ({'; '.join(about)})"
    return Device(
        name=entry["name"],
        kind="cpu" if is_cpu else "cuda",
        memory_bytes=memory_bytes,
        bandwidth_bytes_s=(bandwidth_tbps or entry.get("bandwidth_tbps") or 0) * 1e12,
        flops=(tflops or entry.get("tflops") or 0) * 1e12,
        fp8=bool(entry.get("fp8")),
        interconnect="none" if is_cpu else (interconnect or entry["interconnect"]),
        source=source,
        detected=detected,
        visible=0 if here is None else here.count,
    )
