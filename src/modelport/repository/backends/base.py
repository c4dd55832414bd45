"""The contract between a loaded model version and whatever framework runs it.

A backend owns its instances (threads, sessions or processes) and runs one batch at a time
per instance; the dynamic batcher in front of it decides what a batch is. Like Triton's
`execute(requests) -> responses`, errors are per request: an entry of the returned list may
be an exception, which fails that request only.

Decoupled models (config `model_transaction_policy { decoupled: true }`, e.g. an LLM
streaming tokens) answer through `BatchItem.stream` instead: put each InferResponse (or an
exception) on it, then STREAM_END; run_batch returns None for such items. A new backend
(the engine's `llm`) subclasses Backend and calls backends.register_backend("llm", cls).
"""

from __future__ import annotations

import asyncio
import contextlib
from abc import ABC, abstractmethod
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tritonclient.grpc import model_config_pb2 as mc

from modelport.repository.custom_metrics import CustomMetrics
from modelport.repository.tensors import InferRequest, InferResponse
from modelport.serving.rate_limiter import Gate

STREAM_END = object()  # put on BatchItem.stream after a decoupled request's last response

# BLS: a python model calling another model through the server; the callee's responses as
# they come (one for a model that is not decoupled)
BLSHandler = Callable[[InferRequest], AsyncIterator[InferResponse]]
# pb_utils.load_model / unload_model / is_model_ready: (calling model, op, args) -> value
ModelControlHandler = Callable[[str, str, dict[str, Any]], Awaitable[Any]]


@dataclass(frozen=True)
class BackendContext:
    config: mc.ModelConfig  # autocompleted and validated
    model_dir: Path
    version: int
    bls: BLSHandler | None = None
    metrics: CustomMetrics | None = None  # the server's custom metrics (pb_utils.MetricFamily)
    model_control: ModelControlHandler | None = None  # the server's model loading API

    @property
    def version_dir(self) -> Path:
        return self.model_dir / str(self.version)

    @property
    def repository(self) -> Path:
        return self.model_dir.parent

    def model_file(self, default: str) -> Path:
        return self.version_dir / (self.config.default_model_filename or default)


@dataclass(eq=False)
class BatchItem:
    """One request inside a batch; `stream` receives responses of decoupled models."""

    request: InferRequest
    stream: asyncio.Queue | None = None
    compute_start_ns: int = 0
    compute_end_ns: int = 0
    extra: dict[str, Any] = field(default_factory=dict)
    # the client went away (gRPC cancel, a closed stream): Triton's request.is_cancelled().
    # A backend that can tell its running code sets on_cancel when the item starts
    cancelled: bool = False
    on_cancel: Callable[[], None] | None = None

    def cancel(self) -> None:
        if self.cancelled:
            return
        self.cancelled = True
        if self.on_cancel is not None:
            self.on_cancel()


@dataclass(frozen=True)
class InstanceSpec:
    """One instance to create: Triton's instance_group expanded (name, kind, device)."""

    name: str
    kind: str  # "CPU" | "GPU" | "MODEL"
    device_id: int


def expand_instances(cfg: mc.ModelConfig) -> list[InstanceSpec]:
    specs = []
    kinds = mc.ModelInstanceGroup.Kind
    for group in cfg.instance_group:
        kind = kinds.Name(group.kind).removeprefix("KIND_")
        devices = list(group.gpus) if group.kind == mc.ModelInstanceGroup.KIND_GPU else [0]
        for dev in devices:
            for _ in range(group.count):
                specs.append(InstanceSpec(f"{group.name}_{len(specs)}", kind, dev))
    return specs or [InstanceSpec(f"{cfg.name}_0", "CPU", 0)]


class Backend(ABC):
    """A loaded model version. Subclasses implement load / run_batch / unload."""

    def __init__(self, ctx: BackendContext) -> None:
        self.ctx = ctx
        self.config = ctx.config
        self.instances = expand_instances(ctx.config)
        self._idle: asyncio.Queue[int] = asyncio.Queue()
        self._gates: list[Gate] | None = None  # rate limiter (--rate-limit execution_count)

    @property
    def num_instances(self) -> int:
        return len(self.instances)

    @abstractmethod
    async def load(self) -> None:
        """Create every instance; raise ModelConfigError (or any error) to fail the load."""

    @abstractmethod
    async def run_batch(self, instance: int, items: list[BatchItem]) -> list[Any]:
        """Run one batch on instance `instance`: one InferResponse or exception per item."""

    async def unload(self) -> None:  # noqa: B027 - optional hook
        """Release instances (finalize user code, free sessions)."""

    def _mark_ready(self) -> None:
        for i in range(self.num_instances):
            self._idle.put_nowait(i)

    def limit(self, gates: list[Gate] | None) -> None:
        """Gate instance i's batches on `gates[i]` (Triton's rate limiter); None: ungated."""
        assert gates is None or len(gates) == len(self.instances)
        self._gates = gates

    async def run_limited(self, instance: int, items: list[BatchItem]) -> list[Any]:
        """run_batch once the instance holds its rate-limiter resources (released after,
        also on error). The wait happens before the backend stamps compute_start_ns, so it
        counts as queue time in the statistics, as in Triton."""
        gates = self._gates
        if gates is None or instance >= len(gates):  # (a backend with its own slots: llm)
            return await self.run_batch(instance, items)
        gate = gates[instance]
        await gate.acquire()
        try:
            return await self.run_batch(instance, items)
        finally:
            gate.release()

    async def execute(self, items: list[BatchItem]) -> list[Any]:
        """Pick an idle instance, run the batch there, give the instance back."""
        instance = await self._idle.get()
        try:
            return await self.run_limited(instance, items)
        finally:
            with contextlib.suppress(asyncio.QueueFull):
                self._idle.put_nowait(instance)
