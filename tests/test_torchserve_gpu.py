"""On a CUDA machine, workers get a gpu_id and BaseHandler puts the model on that device."""

from __future__ import annotations

import asyncio
import json
import sys
from pathlib import Path

import pytest

from modelport.torchserve.messages import InputParam, RequestItem
from modelport.torchserve.registry import ModelRegistry

sys.path.insert(0, str(Path(__file__).parent / "fixtures" / "torchserve"))
import ts_archives  # noqa: E402


@pytest.mark.gpu
def test_workers_use_the_gpu(tmp_path):
    import torch

    n_gpu = torch.cuda.device_count()
    store = tmp_path / "store"
    ts_archives.classifier_archive(store, tmp_path / "cls")
    ts_archives.llm_archive(store, tmp_path / "llm")

    async def main():
        reg = ModelRegistry(store, work_dir=tmp_path / "work")
        try:
            cls = await reg.register("classifier.mar", initial_workers=2)
            assert [w["gpuId"] for w in cls.describe()["workers"]] == [i % n_gpu for i in range(2)]
            body = json.dumps({"x": [1.0, 2.0, 3.0, 4.0]}).encode()
            item = RequestItem("r", [InputParam("body", "application/json", body)])
            outs = await asyncio.gather(*(cls.predict(item) for _ in range(4)))
            devices = {json.loads(o.response.body)["device"] for o in outs}
            assert devices <= {f"cuda:{i}" for i in range(n_gpu)} and devices
            llm = await reg.register("llm.mar", initial_workers=1)
            text = InputParam("body", "text/plain", b"Hello GPU")
            out = await llm.predict(RequestItem("q", [text]))
            assert out.response.status == 200
            assert out.response.body.decode("utf-8", "replace").startswith("Hello GPU")
        finally:
            await reg.stop()

    asyncio.run(main())
