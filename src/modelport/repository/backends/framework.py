"""Shared machinery of framework backends (TorchScript, ONNX Runtime): batch in, batch out.

Why this layer: Triton's framework backends concatenate the requests of a batch along the
first dimension, run the model once, and split each output back by the row counts. Only
requests with identical non-batch shapes can be concatenated, so a batch is split into
groups by shape first. The model call runs on the instance's own thread so the event loop
never blocks and instances run in parallel (torch and onnxruntime release the GIL).
"""

from __future__ import annotations

import asyncio
import time
from abc import abstractmethod
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np
from tritonclient.grpc import model_config_pb2 as mc

from modelport.repository.backends.base import Backend, BackendContext, BatchItem, InstanceSpec
from modelport.repository.errors import InvalidArgument, ServingError
from modelport.repository.tensors import InferResponse, InferTensor, wire_of_config, wire_of_numpy


class TensorBackend(Backend):
    """A model that maps a dict of (batched) arrays to a dict of arrays, one call per batch."""

    def __init__(self, ctx: BackendContext) -> None:
        super().__init__(ctx)
        self._threads = [
            ThreadPoolExecutor(1, thread_name_prefix=spec.name) for spec in self.instances
        ]
        self._handles: list[Any] = []
        self._out_types = {
            o.name: wire_of_config(mc.DataType.Name(o.data_type)) for o in self.config.output
        }

    @abstractmethod
    def load_instance(self, spec: InstanceSpec) -> Any:
        """Build one instance (runs on that instance's thread)."""

    @abstractmethod
    def run(self, handle: Any, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Run the model once on concatenated inputs (runs on the instance's thread)."""

    async def load(self) -> None:
        loop = asyncio.get_running_loop()
        self._handles = list(
            await asyncio.gather(
                *(
                    loop.run_in_executor(t, self.load_instance, spec)
                    for t, spec in zip(self._threads, self.instances)
                )
            )
        )
        self._mark_ready()

    async def unload(self) -> None:
        self._handles = []
        for t in self._threads:
            t.shutdown(wait=False, cancel_futures=True)

    def _groups(self, items: list[BatchItem]) -> list[list[BatchItem]]:
        if self.config.max_batch_size == 0:
            return [[it] for it in items]
        groups: dict[tuple, list[BatchItem]] = {}
        for it in items:
            key = tuple(
                sorted((n, t.data.shape[1:], t.datatype) for n, t in it.request.inputs.items())
            )
            groups.setdefault(key, []).append(it)
        return list(groups.values())

    async def run_batch(self, instance: int, items: list[BatchItem]) -> list[Any]:
        loop = asyncio.get_running_loop()
        results: dict[int, Any] = {}
        for group in self._groups(items):
            start = time.perf_counter_ns()
            try:
                if len(group) == 1:
                    inputs = {n: t.data for n, t in group[0].request.inputs.items()}
                else:
                    names = list(group[0].request.inputs)
                    inputs = {
                        n: np.concatenate([it.request.inputs[n].data for it in group])
                        for n in names
                    }
                outputs = await loop.run_in_executor(
                    self._threads[instance], self.run, self._handles[instance], inputs
                )
                split = self._split(group, outputs)
            except ServingError as e:
                split = [e] * len(group)
            except Exception as e:  # a framework error fails this group only
                err = ServingError(
                    f"Failed to process the request(s) for model '{self.config.name}', "
                    f"message: {type(e).__name__}: {e}"
                )
                split = [err] * len(group)
            end = time.perf_counter_ns()
            for it, res in zip(group, split):
                it.compute_start_ns, it.compute_end_ns = start, end
                results[id(it)] = res
        return [results[id(it)] for it in items]

    def _split(self, group: list[BatchItem], outputs: dict[str, np.ndarray]) -> list[Any]:
        batching = self.config.max_batch_size > 0
        rows = [
            (next(iter(it.request.inputs.values())).data.shape[0] if it.request.inputs else 1)
            for it in group
        ]
        for name, arr in outputs.items():
            want = self._out_types.get(name)
            have = wire_of_numpy(arr.dtype)
            if want is not None and want != have:
                raise InvalidArgument(
                    f"model '{self.config.name}' produced output '{name}' of type {have}, "
                    f"the config declares {want}"
                )
            if batching and (arr.ndim == 0 or arr.shape[0] != sum(rows)):
                raise ServingError(
                    f"model '{self.config.name}' output '{name}' has shape {list(arr.shape)}; "
                    f"its first dimension must be the batch size {sum(rows)}"
                )
        out = []
        offset = 0
        for it, n in zip(group, rows):
            tensors = {}
            for name, arr in outputs.items():
                part = arr[offset : offset + n] if batching else arr
                tensors[name] = InferTensor(name, wire_of_numpy(arr.dtype), part)
            offset += n
            out.append(InferResponse(self.config.name, self.ctx.version, tensors, id=it.request.id))
        return out
