"""The default per-step token budget: vLLM's table by usage context (offline LLM / server)
and GPU size, learned through NVML without a CUDA context in the front end; max_num_seqs 256
everywhere; and the CUDA-graph batch limit (--cuda-graph-sizes, 512 by default)."""

from __future__ import annotations

import logging
import sys
import types

import pytest
import torch

from helpers.tiny_models import make_tiny_llama_dir
from modelport.config import default_max_num_batched_tokens, is_large_gpu
from modelport.engine import gpu_info
from modelport.engine.arg_utils import EngineArgs
from modelport.planner.hardware import resolve_device
from modelport.planner.model_source import resolve_model
from modelport.planner.plan import PlanRequest, make_plan

GIB = 2**30


def test_the_table_by_context_and_gpu():
    assert default_max_num_batched_tokens(False) == 512
    assert default_max_num_batched_tokens(False, offline=True, large_gpu=True) == 512
    assert default_max_num_batched_tokens(True) == 2048
    assert default_max_num_batched_tokens(True, offline=True) == 8192
    assert default_max_num_batched_tokens(True, large_gpu=True) == 8192
    assert default_max_num_batched_tokens(True, offline=True, large_gpu=True) == 16384
    assert is_large_gpu(int(79.2 * GIB), "NVIDIA H100 80GB HBM3")
    assert is_large_gpu(int(139.8 * GIB), "NVIDIA H200")
    assert not is_large_gpu(int(79.2 * GIB), "NVIDIA A100-SXM4-80GB")  # vLLM measured it slower
    assert not is_large_gpu(24 * GIB, "NVIDIA L4")


class FakeNVML(types.ModuleType):
    """pynvml's calls the front end makes, over a table of physical devices."""

    class NVMLError(Exception):
        pass

    def __init__(self, devices: dict, fail_init: bool = False) -> None:
        super().__init__("pynvml")
        self.devices, self.fail_init, self.open = devices, fail_init, 0

    def nvmlInit(self):
        if self.fail_init:
            raise self.NVMLError("driver not loaded")
        self.open += 1

    def nvmlShutdown(self):
        self.open -= 1

    def nvmlDeviceGetHandleByIndex(self, i):
        if not 0 <= i < len(self.devices["by_index"]):
            raise self.NVMLError("invalid index")
        return self.devices["by_index"][i]

    def nvmlDeviceGetHandleByUUID(self, uuid):
        if uuid not in self.devices["by_uuid"]:
            raise self.NVMLError("not found")
        return self.devices["by_uuid"][uuid]

    def nvmlDeviceGetName(self, h):
        return h[1].encode()  # older bindings return bytes

    def nvmlDeviceGetMemoryInfo(self, h):
        return types.SimpleNamespace(total=h[0], used=0, free=h[0])


H100, L4 = (int(79.2 * GIB), "NVIDIA H100 80GB HBM3"), (24 * GIB, "NVIDIA L4")


@pytest.fixture
def nvml(monkeypatch):
    fake = FakeNVML({"by_index": [L4, L4, H100], "by_uuid": {"GPU-5e1f": H100}})
    monkeypatch.setitem(sys.modules, "pynvml", fake)
    monkeypatch.setattr(torch.cuda, "is_initialized", lambda: False)
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    return fake


def test_nvml_answers_by_cuda_visible_devices(nvml, monkeypatch):
    assert gpu_info.total_memory_and_name("cuda") == L4
    assert gpu_info.total_memory_and_name("cuda:2") == H100
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "2,0")  # CUDA's cuda:0 is physical device 2
    assert gpu_info.total_memory_and_name("cuda:0") == H100
    assert gpu_info.total_memory_and_name("cuda:1") == L4
    assert gpu_info.total_memory_and_name("cuda:2") is None  # not visible
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "GPU-5e1f")
    assert gpu_info.total_memory_and_name("cuda") == H100
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "GPU-0000")
    assert gpu_info.total_memory_and_name("cuda") is None
    # an engine core placed on its own GPUs (a KIND_GPU instance): its CUDA_VISIBLE_DEVICES
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "2,0")
    assert gpu_info.total_memory_and_name("cuda", "1") == L4
    assert gpu_info.total_memory_and_name("cuda:1", "0,2") == H100
    assert gpu_info.total_memory_and_name("cuda:1", "0") is None
    assert nvml.open == 0  # every init shut down


def test_an_engine_placed_on_its_own_gpu_is_sized_by_it(nvml, tiny, monkeypatch):
    """The front end's first GPU is an L4, the instance's (physical 2) an H100: the server
    default for the H100 (8,192), not the L4's (2,048); CUDA already up in this process
    numbers its own devices, so NVML answers for the instance's."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_initialized", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda i: pytest.fail(
        "torch answered for another process's GPU"))

    def budget(**kw):
        return EngineArgs(model=str(tiny), device="cuda", usage_context="server",
                          **kw).create_engine_config().scheduler_config.max_num_batched_tokens

    assert budget(cuda_visible_devices="2") == 8192
    assert budget(cuda_visible_devices="0") == 2048


def test_no_nvml_means_no_answer(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_initialized", lambda: False)
    monkeypatch.setitem(sys.modules, "pynvml", FakeNVML({}, fail_init=True))
    assert gpu_info.total_memory_and_name("cuda") is None
    monkeypatch.setitem(sys.modules, "pynvml", None)  # not installed: import fails
    assert gpu_info.total_memory_and_name("cuda") is None


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return make_tiny_llama_dir(tmp_path_factory.mktemp("budget"))


@pytest.mark.parametrize("context, gpu, want", [
    ("offline", H100, 16384), ("server", H100, 8192), ("offline", L4, 8192),
    ("server", L4, 2048), ("server", None, 2048),
])
def test_engine_args_pick_the_budget_on_cuda(tiny, monkeypatch, caplog, context, gpu, want):
    # a CUDA device as the front end sees it (no GPU here: availability and NVML faked)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr("modelport.engine.arg_utils.total_memory_and_name",
                        lambda device, visible=None: gpu)
    with caplog.at_level(logging.INFO, logger="modelport.engine.arg_utils"):
        cfg = EngineArgs(model=str(tiny), device="cuda", usage_context=context).create_engine_config()
    assert cfg.scheduler_config.max_num_batched_tokens == want
    # vLLM's 1,024 sequences on large GPUs measured slower here (W2, session 37): 256 stays
    assert cfg.scheduler_config.max_num_seqs == 256
    assert cfg.max_graph_batch == 512
    where = f"{gpu[1]}, {gpu[0] / 2**30:.1f} GiB" if gpu else "an unknown GPU"
    assert f"max_num_batched_tokens {want} (the {context} default on {where})" in caplog.text
    given = EngineArgs(model=str(tiny), device="cuda", usage_context=context,
                       max_num_batched_tokens=1024).create_engine_config()
    assert given.scheduler_config.max_num_batched_tokens == 1024
    given = EngineArgs(model=str(tiny), device="cuda", usage_context=context,
                       max_num_seqs=12, cuda_graph_sizes=[64]).create_engine_config()
    assert (given.scheduler_config.max_num_batched_tokens, given.scheduler_config.max_num_seqs,
            given.max_graph_batch) == (want, 12, 64)


@pytest.mark.parametrize("sizes", [[1, 2, 4], [0]])
def test_cuda_graph_sizes_take_one_positive_size(tiny, sizes):
    with pytest.raises(ValueError, match="give one size, the largest decode batch"):
        EngineArgs(model=str(tiny), device="cpu", cuda_graph_sizes=sizes).create_engine_config()


def test_cpu_budget_and_a_bad_context(tiny):
    sc = EngineArgs(model=str(tiny), device="cpu", usage_context="offline"
                    ).create_engine_config().scheduler_config
    assert (sc.max_num_batched_tokens, sc.max_num_seqs) == (512, 256)
    with pytest.raises(ValueError, match="usage_context must be 'offline' or 'server'"):
        EngineArgs(model=str(tiny), device="cpu", usage_context="batch").create_engine_config()


@pytest.mark.parametrize("gpu, want", [("h100-80gb", 8192), ("h200", 8192), ("a100-80gb", 2048),
                                       ("l4", 2048), ("cpu", 512)])
def test_planner_plans_serve_with_its_default_budget(gpu, want):
    dev = resolve_device(gpu, memory_gib=64) if gpu == "cpu" else resolve_device(gpu)
    p = make_plan(PlanRequest(resolve_model("llama-3.1-8b"), dev, max_model_len=8192))
    assert p.max_num_batched_tokens == want
