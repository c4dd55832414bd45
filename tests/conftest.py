import gc
import sys
from pathlib import Path

import pytest

# tests/helpers is importable as `helpers`
sys.path.insert(0, str(Path(__file__).parent))


@pytest.fixture(autouse=True)
def _torchserve_log_location(tmp_path_factory, monkeypatch):
    """TorchServe's config snapshots go to $LOG_LOCATION/config and its metrics logs to
    $METRICS_LOCATION (./logs without them): each test gets its own, so no test writes into
    the repository or restores another's snapshot."""
    logs = str(tmp_path_factory.mktemp("ts-logs"))
    monkeypatch.setenv("LOG_LOCATION", logs)
    monkeypatch.setenv("METRICS_LOCATION", logs)


# The files that take longest on a CPU (`pytest --durations=0`, summed per file, session 44),
# run first: pytest-xdist hands whole files (--dist loadfile) to workers in collection order,
# so a long file met last would keep one worker busy while the other idles.
SLOW_FILES = (
    "test_moe_tensor_parallel_quant.py", "test_torchserve_start_stop.py",
    "test_openai_reasoning.py", "test_openai_server.py", "test_tensor_parallel_quant.py",
    "test_openai_vllm_extras.py", "test_openai_tool_calls.py", "test_structured_outputs.py",
    "test_expert_parallel.py", "test_moe_quantized_cuda.py", "test_torchserve_server.py",
    "test_moe_few_tokens.py", "test_vllm_parity_s30.py", "test_triton_offline.py",
    "test_w4_codes_gemm.py", "test_w4_gemv_half2.py",
)


def pytest_collection_modifyitems(config, items):
    rank = {name: i for i, name in enumerate(SLOW_FILES)}
    items.sort(key=lambda item: rank.get(item.path.name, len(SLOW_FILES)))  # stable
    try:
        import torch

        has_cuda = torch.cuda.is_available()
    except Exception:
        has_cuda = False
    if has_cuda:
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def _free_cuda_after_gpu_tests(request):
    """A GPU test's engines (reference cycles keep them until a collection) would otherwise
    hold their weights and KV cache while the next test's engine sizes its own."""
    yield
    if "gpu" in request.keywords:
        import torch

        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()


@pytest.fixture(scope="module")
def lib():
    """The CPU C kernels (layers/csrc/cpu_decode.c), built for this machine."""
    from modelport.layers import cpu_kernels

    built = cpu_kernels.load_library()
    assert built is not None, "the C kernels must build on the test machines (cc is there)"
    return built
