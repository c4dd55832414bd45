"""Tensor-parallel ranks 1..N-1 as child processes driven by rank 0 (the engine's runner).

Rank 0 broadcasts each step's flat inputs; every rank runs its slice of the model and the
row-parallel layers all-reduce, so rank 0 ends with whole hidden states and samples alone.
Children are plain subprocesses (not multiprocessing) so that an engine core which is itself
a daemonic process may start them.
"""

from __future__ import annotations

import contextlib
import datetime
import os
import pickle
import socket
import subprocess
import sys
import tempfile
import weakref
from typing import Any

import torch
import torch.distributed as dist

STARTUP_TIMEOUT = datetime.timedelta(minutes=10)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def init_process_group(device_type: str, rank: int, size: int, port: int) -> None:
    backend = "nccl" if device_type == "cuda" else "gloo"
    dist.init_process_group(
        backend, init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=size,
        timeout=STARTUP_TIMEOUT,
    )


def cpu_threads_per_rank(size: int) -> int:
    """Ranks share the host's cores; oversubscribed OpenMP threads stall on every barrier."""
    return max(1, (os.cpu_count() or 1) // size)


def broadcast(msg: Any) -> Any:
    """Rank 0 sends msg to every rank; other ranks receive it (pass None)."""
    box = [msg]
    dist.broadcast_object_list(box, src=0)
    return box[0]


class TPWorkers:
    """The child ranks of one tensor-parallel group, as seen from rank 0."""

    def __init__(self, config: Any, device_type: str) -> None:
        self.size = config.parallel_config.tensor_parallel_size
        port = _free_port()
        fd, self._config_path = tempfile.mkstemp(prefix="modelport-tp-", suffix=".pkl")
        with os.fdopen(fd, "wb") as f:
            pickle.dump(config, f)
        self.procs = [
            subprocess.Popen([sys.executable, "-m", "modelport.parallel.worker",
                              self._config_path, str(rank), str(port)])
            for rank in range(1, self.size)
        ]
        self._finalizer = weakref.finalize(self, _stop, self.procs, self._config_path)
        if device_type == "cuda":  # NCCL binds rank 0 to the current device: the group's first
            torch.cuda.set_device(torch.device(config.device).index or 0)
        init_process_group(device_type, 0, self.size, port)

    def send(self, msg: Any) -> None:
        for p in self.procs:
            if p.poll() is not None:
                raise RuntimeError(f"tensor-parallel worker pid {p.pid} exited with {p.returncode}")
        broadcast(msg)

    def barrier(self) -> None:
        """Wait for every rank (after a message they answer with a barrier of their own)."""
        dist.barrier()

    def shutdown(self) -> None:
        with contextlib.suppress(Exception):
            broadcast(None)  # the ranks leave their loop and exit by themselves
        for p in self.procs:
            with contextlib.suppress(subprocess.TimeoutExpired):
                p.wait(timeout=10)
        self._finalizer()


def _stop(procs: list[subprocess.Popen], path: str) -> None:
    """Last resort (also at interpreter exit): end ranks still waiting for rank 0."""
    for p in procs:
        if p.poll() is None:  # SIGKILL: ranks ignore SIGTERM (core_client.prepare_child_process)
            p.kill()
            with contextlib.suppress(subprocess.TimeoutExpired):
                p.wait(timeout=5)
    with contextlib.suppress(OSError):
        os.unlink(path)
    if dist.is_initialized():
        with contextlib.suppress(Exception):
            dist.destroy_process_group()


# this rank's torch profiler (vLLM's VLLM_TORCH_PROFILER_DIR, engine/torch_profiler.py):
# made on rank 0's first "torch_profile" message
_profiler: Any = None


def _torch_profile(runner: Any, action: str) -> None:
    """This rank's side of EngineCore.start_profile / stop_profile ("start" / "stop", or
    "exit": rank 0 left mid-profile): its own trace file. A failure is logged, not raised:
    rank 0 reports its own, and this rank serves on."""
    import logging

    from modelport.engine.torch_profiler import TorchProfiler

    global _profiler
    log = logging.getLogger(__name__)
    rank = dist.get_rank()
    try:
        if _profiler is None and action != "exit":
            _profiler = TorchProfiler.from_env(runner.config, tp_rank=rank)
            if _profiler is None:
                log.warning("tensor-parallel rank %d: no torch profiler directory in this "
                            "process's environment; no trace from this rank", rank)
        if _profiler is not None and action == "start":
            _profiler.start()
        elif _profiler is not None and _profiler.running:
            _profiler.stop()
    except Exception:
        log.exception("tensor-parallel rank %d: torch profiler %s failed", rank, action)
    if action == "stop":
        dist.barrier()  # rank 0 waits here until every rank's trace is written


def worker_loop(runner: Any) -> None:
    """Serve rank 0's messages until it sends None (or its connection drops)."""
    with torch.inference_mode():
        while True:
            msg = broadcast(None)
            if msg is None:
                _torch_profile(runner, "exit")
                return
            kind, args = msg
            if kind == "fwd":
                runner._eager_forward(*args)
            elif kind == "lora_fwd":  # a step with LoRA requests (lora/manager.py)
                from modelport.lora.layers import lora_mapping

                placements, spec, fwd = args
                with lora_mapping(runner.lora.follow(placements, spec)):
                    runner._eager_forward(*fwd)
            elif kind == "kv":
                runner.init_kv_cache(args)
            elif kind == "profile":
                runner.profile_run()
            elif kind == "sleep":  # sleep mode: rank 0 sleeps and wakes with every rank
                runner.sleep(args)
            elif kind == "wake":
                runner.wake_up(args)
            elif kind == "torch_profile":  # "start" / "stop": this rank's own trace
                _torch_profile(runner, args)
            else:
                raise RuntimeError(f"unknown tensor-parallel message {kind!r}")
