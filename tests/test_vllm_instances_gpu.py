"""Instances of a vLLM-backend repository on a real GPU (run on the GPU machine; skipped
without CUDA): ``count: 2, kind: KIND_GPU, gpus: [0]`` starts two engine cores, both on GPU 0
(each holding memory there), and requests sent at once land on both with the offline LLM's
greedy text."""

from __future__ import annotations

import asyncio
import json
import os

import httpx
import pytest
import torch

from helpers.tiny_models import make_tiny_llama_dir
from modelport import LLM, SamplingParams
from modelport.engine.gpu_info import visible_entries
from modelport.entrypoints.kserve.embedded import EmbeddedServer

ENGINE = {"enforce_eager": True, "max_model_len": 128, "kv_cache_memory_bytes": 64 << 20}


def _gpu_processes() -> int:
    """How many processes NVML lists on GPU 0 (counted: its pids may be the host's)."""
    listing = torch.cuda.list_gpu_processes(0)
    return sum(line.startswith("process") for line in listing.splitlines())


@pytest.mark.gpu
def test_kind_gpu_count_two_runs_two_engines_on_the_gpu(tmp_path) -> None:
    weights = make_tiny_llama_dir(tmp_path / "weights")
    model_dir = tmp_path / "models" / "llm"
    (model_dir / "1").mkdir(parents=True)
    (model_dir / "config.pbtxt").write_text(
        'backend: "vllm"\ninstance_group [ { count: 2, kind: KIND_GPU, gpus: [0] } ]\n')
    (model_dir / "1" / "model.json").write_text(json.dumps({"model": str(weights), **ENGINE}))
    prompts = [f"prompt number {i}" for i in range(8)]
    ref = LLM(str(weights), enforce_eager=True, max_model_len=128, kv_cache_memory=64 << 20)
    # one request at a time, as each request below runs alone or with few others: batch-1
    # greedy text, which a larger batch's kernels could tip on a near-tie of random weights
    params = SamplingParams(temperature=0, max_tokens=16, ignore_eos=True)
    want = [ref.generate([p], params, use_tqdm=False)[0].outputs[0].text for p in prompts]
    del ref
    before, free_before = _gpu_processes(), torch.cuda.mem_get_info(0)[0]
    srv = EmbeddedServer([tmp_path / "models"], exit_on_error=False).start()
    try:
        backend = srv.manager.get("llm").backend
        first = (visible_entries(os.environ.get("CUDA_VISIBLE_DEVICES")) or ["0"])[0]  # GPU 0
        assert [e.engine_config.cuda_visible_devices for e in backend.engines] == [first] * 2
        pids = [e.client._proc.pid for e in backend.engines]
        assert len(set(pids)) == 2
        if before:  # both engine cores hold memory on GPU 0
            assert _gpu_processes() == before + 2
        else:  # NVML in a container may list no process: two engines' KV caches at least
            assert free_before - torch.cuda.mem_get_info(0)[0] >= 2 * ENGINE["kv_cache_memory_bytes"]
        sent = [0, 0]
        for i, engine in enumerate(backend.engines):
            def counted(*a, _i=i, _orig=engine.generate, **kw):
                sent[_i] += 1
                return _orig(*a, **kw)
            engine.generate = counted

        async def one(c: httpx.AsyncClient, p: str) -> str:
            r = await c.post(f"http://{srv.http_url}/v2/models/llm/generate", json={
                "text_input": p, "exclude_input_in_output": True,
                "parameters": {"max_tokens": 16, "temperature": 0, "ignore_eos": True}})
            assert r.status_code == 200, r.text
            return r.json()["text_output"]

        async def in_pairs() -> list[str]:  # two at a time: one on each engine
            async with httpx.AsyncClient(timeout=120) as c:
                out: list[str] = []
                for i in range(0, len(prompts), 2):
                    out += await asyncio.gather(*(one(c, p) for p in prompts[i:i + 2]))
                return out

        assert asyncio.run(in_pairs()) == want
        assert sent == [4, 4], sent
    finally:
        srv.stop()
