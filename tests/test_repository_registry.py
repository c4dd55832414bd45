"""The backend registry: how the engine's `llm` backend plugs in (a streaming custom backend)."""

from __future__ import annotations

import asyncio

import numpy as np
import pytest

from modelport.repository.backends import backend_names, register_backend
from modelport.repository.backends.base import STREAM_END, Backend, BatchItem
from modelport.repository.manager import RepositoryManager
from modelport.repository.tensors import InferRequest, InferResponse, InferTensor

CONFIG = """
name: "countdown"
backend: "countdown_test"
model_transaction_policy { decoupled: true }
input [{ name: "N" data_type: TYPE_INT32 dims: [ 1 ] }]
output [{ name: "VALUE" data_type: TYPE_INT32 dims: [ 1 ] }]
parameters { key: "step" value: { string_value: "2" } }
"""


class Countdown(Backend):
    """Streams N, N-step, ... > 0: one response each, like tokens of a generation."""

    async def load(self) -> None:
        self.step = int(self.config.parameters["step"].string_value)
        self._mark_ready()

    async def run_batch(self, instance: int, items: list[BatchItem]) -> list:
        for it in items:
            n = int(it.request.inputs["N"].data[0])
            for v in range(n, 0, -self.step):
                out = InferTensor("VALUE", "INT32", np.array([v], dtype=np.int32))
                it.stream.put_nowait(
                    InferResponse(self.config.name, self.ctx.version, {"VALUE": out})
                )
            it.stream.put_nowait(STREAM_END)
        return [None] * len(items)


def test_registered_backend_loads_and_streams(tmp_path):
    register_backend("countdown_test", Countdown)
    assert "countdown_test" in backend_names()
    (tmp_path / "countdown" / "1").mkdir(parents=True)
    (tmp_path / "countdown" / "config.pbtxt").write_text(CONFIG)

    async def main():
        manager = RepositoryManager([tmp_path])
        await manager.start()
        try:
            req = InferRequest(
                "countdown", inputs={"N": InferTensor("N", "INT32", np.array([7], np.int32))}
            )
            return [int(r.outputs["VALUE"].data[0]) async for r in manager.stream(req)]
        finally:
            await manager.stop()

    assert asyncio.run(main()) == [7, 5, 3, 1]


def test_reserved_backend_name():
    with pytest.raises(ValueError, match="reserved"):
        register_backend("ensemble", Countdown)
