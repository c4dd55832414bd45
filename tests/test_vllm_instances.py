"""Instances of a repository written for Triton's vLLM backend: as there, each instance of the
instance_group runs its own engine, requests are spread over them, and a KIND_GPU instance's
engine is placed on the GPU its group names (its CUDA_VISIBLE_DEVICES); KIND_GPU refuses an
engine that spans several GPUs. This machine has no GPU: the server is told it has two, and
the engines run on the CPU with the placement in their configs."""

from __future__ import annotations

import asyncio
import json

import httpx
import pytest

from helpers.tiny_models import make_tiny_llama_dir
from modelport import LLM, SamplingParams
from modelport.entrypoints.kserve.embedded import EmbeddedServer
from modelport.repository import manager as repo_manager

ENGINE = {"enforce_eager": True, "max_model_len": 128, "kv_cache_memory_bytes": 4 << 20,
          "device": "cpu"}


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("instances")
    weights = make_tiny_llama_dir(root / "weights")
    engine = {"model": str(weights), **ENGINE}
    models = {
        "two_gpus": ('backend: "vllm"\ninstance_group [ { kind: KIND_GPU, gpus: [1, 0] } ]\n',
                     engine),
        "model_x2": ('backend: "vllm"\ninstance_group [ { count: 2, kind: KIND_MODEL } ]\n',
                     engine),
        "gpu_tp2": ('backend: "vllm"\ninstance_group [ { kind: KIND_GPU, gpus: [0] } ]\n',
                    {**engine, "tensor_parallel_size": 2}),
    }
    repo = root / "models"
    for name, (cfg, args) in models.items():
        (repo / name / "1").mkdir(parents=True)
        (repo / name / "config.pbtxt").write_text(cfg)
        (repo / name / "1" / "model.json").write_text(json.dumps(args))
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(repo_manager, "gpu_count", lambda: 2)
        mp.setenv("CUDA_VISIBLE_DEVICES", "7,GPU-5e1f")  # the server's GPUs 0 and 1
        srv = EmbeddedServer([repo], exit_on_error=False).start()  # gpu_tp2 fails on purpose
    ref = LLM(str(weights), max_model_len=128, kv_cache_memory=4 << 20)
    yield srv, ref
    srv.stop()


def _generate(srv, model: str, prompt: str, n: int) -> str:
    r = httpx.post(f"http://{srv.http_url}/v2/models/{model}/generate", json={
        "text_input": prompt, "exclude_input_in_output": True,
        "parameters": {"max_tokens": n, "temperature": 0, "ignore_eos": True}}, timeout=60)
    assert r.status_code == 200, r.text
    return r.json()["text_output"]


async def _at_once(srv, model: str, prompts: list[str], n: int) -> list[str]:
    async with httpx.AsyncClient(timeout=60) as c:
        rs = await asyncio.gather(*(c.post(
            f"http://{srv.http_url}/v2/models/{model}/generate", json={
                "text_input": p, "exclude_input_in_output": True,
                "parameters": {"max_tokens": n, "temperature": 0, "ignore_eos": True}})
            for p in prompts))
    assert all(r.status_code == 200 for r in rs), [r.text for r in rs]
    return [r.json()["text_output"] for r in rs]


def test_kind_gpu_runs_an_engine_on_each_named_gpu(setup) -> None:
    srv, ref = setup
    backend = srv.manager.get("two_gpus").backend
    # gpus [1, 0] count the server's GPUs: its CUDA_VISIBLE_DEVICES entries 1 and 0
    assert [e.engine_config.cuda_visible_devices for e in backend.engines] == ["GPU-5e1f", "7"]
    assert len({e.client._proc.pid for e in backend.engines}) == 2  # two engine cores
    assert backend.llm is backend.engines[0]


@pytest.mark.parametrize("model", ["two_gpus", "model_x2"])
def test_requests_are_spread_over_the_instances_engines(setup, model, monkeypatch) -> None:
    srv, ref = setup
    backend = srv.manager.get(model).backend
    assert len(backend.engines) == 2
    sent = [0, 0]
    for i, engine in enumerate(backend.engines):
        def counted(*a, _i=i, _orig=engine.generate, **kw):
            sent[_i] += 1
            return _orig(*a, **kw)
        monkeypatch.setattr(engine, "generate", counted)
    prompts = [f"prompt number {i}" for i in range(8)]
    want = [o.outputs[0].text for o in ref.generate(
        prompts, SamplingParams(temperature=0, max_tokens=24, ignore_eos=True),
        use_tqdm=False)]
    assert asyncio.run(_at_once(srv, model, prompts, 24)) == want
    assert sum(sent) == 8 and min(sent) >= 2, sent  # both engines took requests
    before = list(sent)
    for prompt, text in zip(prompts[:4], want[:4]):  # one after the other: in turn
        assert _generate(srv, model, prompt, 24) == text
    assert [a - b for a, b in zip(sent, before)] == [2, 2], (before, sent)
    if model == "model_x2":  # KIND_MODEL: no GPU placement of its own
        assert {e.engine_config.cuda_visible_devices for e in backend.engines} == {None}


def test_kind_gpu_refuses_a_multi_gpu_engine(setup) -> None:
    srv, _ = setup
    index = {m["name"]: m for m in httpx.post(f"http://{srv.http_url}/v2/repository/index",
                                              json={}).json()}
    assert index["gpu_tp2"]["state"] == "UNAVAILABLE"
    assert ("KIND_GPU is currently for single-GPU models, please specify KIND_MODEL"
            in index["gpu_tp2"]["reason"]), index["gpu_tp2"]
    assert _generate(srv, "two_gpus", "still serving", 4) != ""
