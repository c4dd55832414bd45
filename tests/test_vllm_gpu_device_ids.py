"""GPU_DEVICE_IDS of a repository written for Triton's vLLM backend: a KIND_MODEL model's
engine core and its tensor-parallel ranks run with CUDA_VISIBLE_DEVICES set to those GPUs,
and bad values are load errors worded as that backend words them."""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from types import SimpleNamespace

import httpx
import pytest
from tritonclient.grpc import model_config_pb2 as mc

from helpers.tiny_models import make_tiny_llama_dir
from modelport.entrypoints.kserve.embedded import EmbeddedServer
from modelport.repository.backends import vllm as vllm_backend
from modelport.repository.errors import ModelConfigError

MODEL = 'backend: "vllm"\ninstance_group [ { count: 1, kind: KIND_MODEL } ]\n'


def _ids(value: str) -> str:
    return f'parameters {{ key: "GPU_DEVICE_IDS" value: {{ string_value: "{value}" }} }}\n'


@pytest.fixture(scope="module")
def srv(tmp_path_factory):
    root = tmp_path_factory.mktemp("gpuids")
    weights = make_tiny_llama_dir(root / "weights")
    engine = {"model": str(weights), "enforce_eager": True, "max_model_len": 128,
              "kv_cache_memory_bytes": 4 << 20, "device": "cpu"}
    models = {
        "pinned": (MODEL + _ids("3, 1"), {**engine, "tensor_parallel_size": 2}),
        "not_ints": (MODEL + _ids("0,a"), engine),
        "negative": (MODEL + _ids("0,-2"), engine),
        "twice": (MODEL + _ids("1,0,1"), engine),
        "too_few": (MODEL + _ids("0"), {**engine, "tensor_parallel_size": 2}),
        "in_json": (MODEL, {**engine, "cuda_visible_devices": "0"}),
    }
    repo = root / "models"
    for name, (cfg, args) in models.items():
        (repo / name / "1").mkdir(parents=True)
        (repo / name / "config.pbtxt").write_text(cfg)
        (repo / name / "1" / "model.json").write_text(json.dumps(args))
    srv = EmbeddedServer([repo], exit_on_error=False).start()  # the bad ones fail on purpose
    yield srv
    srv.stop()


def _environ(pid: int) -> dict[str, str]:
    raw = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
    return dict(item.decode().partition("=")[::2] for item in raw if item)


def _children(pid: int) -> list[int]:
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                status = Path(f"/proc/{entry}/status").read_text()
            except OSError:
                continue
            if f"\nPPid:\t{pid}\n" in status:
                found.append(int(entry))
    return found


def test_the_engine_and_its_ranks_see_only_the_named_gpus(srv) -> None:
    r = httpx.post(f"http://{srv.http_url}/v2/models/pinned/generate",
                   json={"text_input": "Hi", "parameters": {"max_tokens": 2}}, timeout=60)
    assert r.status_code == 200, r.text
    core = srv.manager.get("pinned").backend.llm.client._proc.pid
    ranks = [p for p in _children(core)
             if b"modelport.parallel.worker" in Path(f"/proc/{p}/cmdline").read_bytes()]
    assert len(ranks) == 1  # tensor-parallel rank 1 (rank 0 runs in the core)
    assert _environ(ranks[0]).get("CUDA_VISIBLE_DEVICES") == "3,1"
    assert os.environ.get("CUDA_VISIBLE_DEVICES") != "3,1"  # the server's own is untouched


def test_bad_values_are_load_errors(srv) -> None:
    index = {m["name"]: m for m in httpx.post(f"http://{srv.http_url}/v2/repository/index",
                                              json={}).json()}
    reasons = {
        "not_ints": "invalid value for GPU_DEVICE_IDS: '0,a'",
        "negative": "GPU_DEVICE_IDS contains invalid GPU ID(s): [-2]",
        "twice": "GPU_DEVICE_IDS contains duplicate GPU ID(s): [1]",
        "too_few": "GPU_DEVICE_IDS names 1 GPU(s) but tensor_parallel_size 2 x "
                   "data_parallel_size 1 ranks need 2",
        "in_json": "cuda_visible_devices",  # not an engine argument of model.json
    }
    for name, reason in reasons.items():
        assert index[name]["state"] == "UNAVAILABLE", index[name]
        assert reason in index[name]["reason"], index[name]


def test_other_instance_kinds_ignore_it_with_a_warning(caplog) -> None:
    cfg = mc.ModelConfig(name="m", backend="vllm")
    cfg.parameters["GPU_DEVICE_IDS"].string_value = "1"
    cfg.instance_group.add(kind=mc.ModelInstanceGroup.KIND_GPU, count=1)
    args = SimpleNamespace(tensor_parallel_size=1, data_parallel_size=1)
    with caplog.at_level(logging.WARNING):
        assert vllm_backend._gpu_device_ids(SimpleNamespace(config=cfg), args) is None
    assert "KIND_MODEL instances only" in caplog.text
    cfg.instance_group[0].kind = mc.ModelInstanceGroup.KIND_MODEL
    assert vllm_backend._gpu_device_ids(SimpleNamespace(config=cfg), args) == "1"
    args.data_parallel_size = 2  # replica 1 runs on the second GPU named
    with pytest.raises(ModelConfigError, match="data_parallel_size 2 ranks need 2"):
        vllm_backend._gpu_device_ids(SimpleNamespace(config=cfg), args)
    cfg.parameters["GPU_DEVICE_IDS"].string_value = "4,0"
    assert vllm_backend._gpu_device_ids(SimpleNamespace(config=cfg), args) == "4,0"
    cfg.parameters["GPU_DEVICE_IDS"].string_value = "x"
    with pytest.raises(ModelConfigError, match="comma-separated list of integer GPU IDs"):
        vllm_backend._gpu_device_ids(SimpleNamespace(config=cfg), args)
