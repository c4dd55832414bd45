"""vLLM's torch-profiler workflow: MODELPORT_TORCH_PROFILER_DIR (or vLLM's name,
VLLM_TORCH_PROFILER_DIR) turns it on; start_profile / stop_profile (LLM's methods, the
server's POST /start_profile and /stop_profile) record a torch.profiler trace in every
process that runs the model: the engine core (each data-parallel replica's) and each
tensor-parallel rank. Each writes its own gzipped Chrome trace, ``<name>.<ns>.pt.trace.json.gz``
(TensorBoard's trace handler), into the directory; Perfetto and TensorBoard open them.

Knobs, read where the profiler runs (each also under its MODELPORT_ name):
VLLM_TORCH_PROFILER_RECORD_SHAPES (off), VLLM_TORCH_PROFILER_WITH_STACK (on, as vLLM's),
VLLM_TORCH_PROFILER_WITH_MEMORY (off), VLLM_TORCH_PROFILER_WITH_FLOPS (off).
"""

from __future__ import annotations

import logging
import os
import socket
from dataclasses import dataclass
from typing import Any

from modelport.envs import env_flag, env_value

logger = logging.getLogger(__name__)


class TorchProfilerError(RuntimeError):
    """A start_profile / stop_profile that cannot happen (profiler off, already started,
    not started); the engine is unaffected."""


def profiler_dir() -> str | None:
    """The directory the traces go to (absolute), or None: the profiler is off."""
    value = env_value("TORCH_PROFILER_DIR")
    return os.path.abspath(os.path.expanduser(value)) if value is not None else None


def not_enabled_message() -> str:
    return ("the torch profiler is off: set MODELPORT_TORCH_PROFILER_DIR (or "
            "VLLM_TORCH_PROFILER_DIR) to a directory for the traces before the engine starts")


@dataclass(frozen=True)
class ProfilerSettings:
    dir: str
    record_shapes: bool = False
    with_stack: bool = True
    with_memory: bool = False
    with_flops: bool = False

    @classmethod
    def from_env(cls) -> ProfilerSettings | None:
        path = profiler_dir()
        if path is None:
            return None
        return cls(dir=path,
                   record_shapes=env_flag("TORCH_PROFILER_RECORD_SHAPES", False),
                   with_stack=env_flag("TORCH_PROFILER_WITH_STACK", True),
                   with_memory=env_flag("TORCH_PROFILER_WITH_MEMORY", False),
                   with_flops=env_flag("TORCH_PROFILER_WITH_FLOPS", False))


def worker_name(config: Any, tp_rank: int = 0) -> str:
    """The trace's file name prefix: host, data-parallel replica, tensor-parallel rank, pid."""
    par = getattr(config, "parallel_config", None)
    dp = int(getattr(par, "data_parallel_rank", 0) or 0)
    return f"{socket.gethostname()}_dp{dp}_tp{tp_rank}_pid{os.getpid()}"


class TorchProfiler:
    """One process's profiler: start() / stop(); stop() writes the trace file."""

    def __init__(self, settings: ProfilerSettings, name: str, device_type: str) -> None:
        self.settings = settings
        self.name = name
        self.device_type = device_type
        self._prof: Any = None

    @classmethod
    def from_env(cls, config: Any, tp_rank: int = 0) -> TorchProfiler | None:
        settings = ProfilerSettings.from_env()
        if settings is None:
            return None
        device_type = "cuda" if str(getattr(config, "device", "cpu")).startswith("cuda") else "cpu"
        prof = cls(settings, worker_name(config, tp_rank), device_type)
        if tp_rank == 0:
            logger.info("torch profiler on: start_profile / stop_profile write traces to %s "
                        "(record_shapes=%s, with_stack=%s, with_memory=%s, with_flops=%s)",
                        settings.dir, settings.record_shapes, settings.with_stack,
                        settings.with_memory, settings.with_flops)
        return prof

    @property
    def running(self) -> bool:
        return self._prof is not None

    def require(self, running: bool) -> None:
        """TorchProfilerError unless the profiler is running (running=True) or not."""
        if running and self._prof is None:
            raise TorchProfilerError("the torch profiler is not running: call start_profile "
                                     "first")
        if not running and self._prof is not None:
            raise TorchProfilerError("the torch profiler is already running: call "
                                     "stop_profile first")

    def start(self) -> None:
        import torch
        from torch.profiler import ProfilerActivity, profile, tensorboard_trace_handler

        self.require(running=False)
        os.makedirs(self.settings.dir, exist_ok=True)
        activities = [ProfilerActivity.CPU]
        if self.device_type == "cuda" and torch.cuda.is_available():
            activities.append(ProfilerActivity.CUDA)
        s = self.settings
        prof = profile(activities=activities, record_shapes=s.record_shapes,
                       with_stack=s.with_stack, profile_memory=s.with_memory,
                       with_flops=s.with_flops,
                       on_trace_ready=tensorboard_trace_handler(s.dir, worker_name=self.name,
                                                                use_gzip=True))
        prof.start()
        self._prof = prof
        logger.info("torch profiler started (%s); traces go to %s", self.name, s.dir)

    def stop(self) -> None:
        """Stop and write the trace (the export may take a while for a long profile)."""
        self.require(running=True)
        prof, self._prof = self._prof, None
        import torch

        if self.device_type == "cuda" and torch.cuda.is_available():
            torch.cuda.synchronize()
        prof.stop()  # on_trace_ready writes <name>.<ns>.pt.trace.json.gz
        logger.info("torch profiler stopped (%s); trace written to %s", self.name,
                    self.settings.dir)
