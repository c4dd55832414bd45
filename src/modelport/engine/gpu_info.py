"""What the front end learns about a GPU without creating a CUDA context: the engine core, a
spawned process, owns the device, and a context here would hold ~0.5 GiB of it. NVML
(nvidia-ml-py) answers from the driver; in a process whose CUDA is already up (the offline
``LLM`` runs its engine in-process) torch answers."""

from __future__ import annotations

import os
from typing import Any


def total_memory_and_name(device: str, visible: str | None = None) -> tuple[int, str] | None:
    """(total bytes, name) of the CUDA device ``device`` names, or None when neither NVML nor
    an initialized CUDA can say. ``visible``: the CUDA_VISIBLE_DEVICES of the process that
    will own the device when it is not this one's (an engine core placed on its own GPUs, as
    a KIND_GPU instance is); ``device`` counts within it."""
    import torch  # here: the CLI imports this module (via EngineArgs) for its flags alone

    index = torch.device(device).index or 0
    own = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is None:
        visible = own
    if torch.cuda.is_initialized() and visible == own:  # torch numbers this process's devices
        props = torch.cuda.get_device_properties(index)
        return int(props.total_memory), str(props.name)
    try:
        import pynvml
    except ImportError:
        return None
    try:
        pynvml.nvmlInit()
    except pynvml.NVMLError:
        return None
    try:
        handle = _handle(pynvml, index, visible)
        if handle is None:
            return None
        name = pynvml.nvmlDeviceGetName(handle)
        total = pynvml.nvmlDeviceGetMemoryInfo(handle).total
        return int(total), name.decode() if isinstance(name, bytes) else str(name)
    except pynvml.NVMLError:
        return None
    finally:
        pynvml.nvmlShutdown()


def visible_entries(visible: str | None) -> list[str] | None:
    """The entries of a CUDA_VISIBLE_DEVICES value (indices or GPU-/MIG- UUIDs), in CUDA's
    order; None when it is unset (every GPU visible)."""
    if visible is None:
        return None
    return [e.strip() for e in visible.split(",") if e.strip()]


def _handle(pynvml: Any, index: int, visible: str | None) -> Any:
    """NVML's handle for CUDA's device ``index``: CUDA_VISIBLE_DEVICES (``visible``)
    renumbers devices (indices or GPU-/MIG- UUIDs); NVML counts the physical ones."""
    entries = visible_entries(visible)
    if entries is None:
        return pynvml.nvmlDeviceGetHandleByIndex(index)
    if index >= len(entries):
        return None
    entry = entries[index]
    if entry.isdigit():
        return pynvml.nvmlDeviceGetHandleByIndex(int(entry))
    return pynvml.nvmlDeviceGetHandleByUUID(entry)
