"""KIND_GPU instances on a real GPU (run on the GPU machine; skipped without CUDA)."""

from __future__ import annotations

import asyncio

import numpy as np
import pytest

from modelport.repository import testing
from modelport.repository.manager import RepositoryManager
from modelport.repository.tensors import InferRequest, InferTensor

CONFIG = """
name: "gpu_linear"
platform: "pytorch_libtorch"
max_batch_size: 8
input [{ name: "INPUT__0" data_type: TYPE_FP32 dims: [ 3 ] }]
output [{ name: "OUTPUT__0" data_type: TYPE_FP32 dims: [ 2 ] }]
instance_group [{ count: 2 kind: KIND_GPU gpus: [ 0 ] }]
dynamic_batching { max_queue_delay_microseconds: 1000 }
"""


@pytest.mark.gpu
def test_torchscript_kind_gpu_instances_run_on_cuda(tmp_path):
    model_dir = tmp_path / "gpu_linear"
    testing.build_torch_linear(model_dir / "1" / "model.pt")
    (model_dir / "config.pbtxt").write_text(CONFIG)

    async def main():
        manager = RepositoryManager([tmp_path])
        await manager.start()
        try:
            assert manager.index()[0]["state"] == "READY", manager.index()
            model = manager.get("gpu_linear")
            devices = {str(h[1]) for h in model.backend._handles}
            x = np.random.default_rng(0).standard_normal((32, 1, 3)).astype(np.float32)
            outs = await asyncio.gather(
                *(
                    manager.infer(
                        InferRequest(
                            "gpu_linear", inputs={"INPUT__0": InferTensor("INPUT__0", "FP32", row)}
                        )
                    )
                    for row in x
                )
            )
            return devices, [o.outputs["OUTPUT__0"].data for o in outs], x, model.stats.as_dict()
        finally:
            await manager.stop()

    devices, outs, x, stats = asyncio.run(main())
    assert devices == {"cuda:0"}
    for row, out in zip(x, outs):
        np.testing.assert_allclose(out, testing.linear_reference(row), rtol=1e-4, atol=1e-5)
    assert stats["execution_count"] < 32  # batched on the GPU instances
