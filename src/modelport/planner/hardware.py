"""The accelerator being planned for: a preset (H100-80GB, L4, CPU, ...) or explicit figures."""

from __future__ import annotations

from dataclasses import dataclass

from modelport.planner.errors import PlanError
from modelport.planner.presets import require_gpu_preset

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

    @property
    def is_cpu(self) -> bool:
        return self.kind == "cpu"


def _positive(flag: str, value: float | None) -> None:
    if value is not None and not value > 0:
        raise PlanError(flag, f"must be > 0, got {value}")


def resolve_device(
    gpu: str | None,
    *,
    memory_gib: float | None = None,
    gpu_memory_gib: float | None = None,
    bandwidth_tbps: float | None = None,
    tflops: float | None = None,
    interconnect: str | None = None,
) -> Device:
    """A preset with optional overrides, or a custom GPU when all three figures are given."""
    for flag, v in (
        ("--memory", memory_gib),
        ("--gpu-memory-gib", gpu_memory_gib),
        ("--gpu-bandwidth-tbps", bandwidth_tbps),
        ("--gpu-tflops", tflops),
    ):
        _positive(flag, v)
    if interconnect is not None and interconnect not in INTERCONNECTS:
        raise PlanError("--interconnect", f"must be one of {', '.join(INTERCONNECTS)}")
    if gpu is None:
        missing = [
            f
            for f, v in (
                ("--gpu-memory-gib", gpu_memory_gib),
                ("--gpu-bandwidth-tbps", bandwidth_tbps),
                ("--gpu-tflops", tflops),
            )
            if v is None
        ]
        if missing:
            raise PlanError(
                "--gpu",
                "give a preset, or describe the GPU with "
                f"--gpu-memory-gib, --gpu-bandwidth-tbps and --gpu-tflops "
                f"(missing {', '.join(missing)})",
            )
        entry = {
            "name": "custom GPU",
            "memory_gib": gpu_memory_gib,
            "fp8": False,
            "interconnect": "pcie",
        }
    else:
        entry = require_gpu_preset(gpu)
    is_cpu = entry.get("interconnect") == "none"
    if is_cpu:
        if gpu_memory_gib is not None:
            raise PlanError("--gpu-memory-gib", "is for GPUs; give host RAM with --memory")
        if memory_gib is None:
            raise PlanError("--memory", "--gpu cpu needs the host RAM in GiB (e.g. --memory 16)")
        mem = memory_gib
    else:
        if memory_gib is not None:
            raise PlanError(
                "--memory", "is for --gpu cpu; override GPU memory with --gpu-memory-gib"
            )
        mem = gpu_memory_gib if gpu_memory_gib is not None else entry["memory_gib"]
    return Device(
        name=entry["name"],
        kind="cpu" if is_cpu else "cuda",
        memory_bytes=int(mem * GIB),
        bandwidth_bytes_s=(bandwidth_tbps or entry.get("bandwidth_tbps") or 0) * 1e12,
        flops=(tflops or entry.get("tflops") or 0) * 1e12,
        fp8=bool(entry.get("fp8")),
        interconnect="none" if is_cpu else (interconnect or entry["interconnect"]),
    )
