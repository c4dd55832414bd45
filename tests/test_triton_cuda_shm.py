"""Triton's CUDA shared memory extension over HTTP and gRPC, through tritonclient.

Without CUDA (CI, laptops) the server answers as a Triton built without GPU support: the
status lists nothing, registering fails with Triton's words, unregistering is a no-op. The
`gpu` test registers device memory shared from this process with a server process (a CUDA
IPC handle cannot be opened by the process that made it) and runs an inference through it.
"""

from __future__ import annotations

import base64
import ctypes
from pathlib import Path

import numpy as np
import pytest
import tritonclient.grpc as grpcclient
import tritonclient.http as httpclient
from tritonclient.utils import InferenceServerException

from helpers.server_proc import free_port, serving
from modelport.entrypoints.kserve.cuda_ipc import cuda_available
from modelport.entrypoints.kserve.embedded import EmbeddedServer

PROTOCOLS = ["http", "grpc"]
HANDLE = base64.b64encode(bytes(64))  # what tritonclient's get_raw_handle returns

MODEL_PY = """
import numpy as np

import triton_python_backend_utils as pb_utils


class TritonPythonModel:
    def execute(self, requests):
        out = []
        for r in requests:
            x = pb_utils.get_input_tensor_by_name(r, "INPUT0").as_numpy()
            out.append(pb_utils.InferenceResponse([pb_utils.Tensor("OUTPUT0", x * 2)]))
        return out
"""
CONFIG = """
name: "double"
backend: "python"
max_batch_size: 0
input [{ name: "INPUT0" data_type: TYPE_FP32 dims: [ 4 ] }]
output [{ name: "OUTPUT0" data_type: TYPE_FP32 dims: [ 4 ] }]
"""


def _repo(root: Path) -> Path:
    (root / "double" / "1").mkdir(parents=True)
    (root / "double" / "1" / "model.py").write_text(MODEL_PY)
    (root / "double" / "config.pbtxt").write_text(CONFIG)
    return root


def client(url, protocol):
    return (httpclient if protocol == "http" else grpcclient).InferenceServerClient(url)


# -- a server without CUDA -------------------------------------------------------------


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    repo = _repo(tmp_path_factory.mktemp("cudashm") / "models")
    srv = EmbeddedServer([repo], metrics_port=-1).start()
    yield srv
    srv.stop()


def _regions(status, protocol):
    return list(status) if protocol == "http" else list(status.regions)


@pytest.mark.skipif(cuda_available(), reason="checks the answers of a server without CUDA")
@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_cuda_shm_without_gpu_answers_as_triton(server, protocol):
    url = server.http_url if protocol == "http" else server.grpc_url
    c = client(url, protocol)
    assert _regions(c.get_cuda_shared_memory_status(), protocol) == []
    with pytest.raises(InferenceServerException) as e:
        c.register_cuda_shared_memory(f"{protocol}_region", HANDLE, 0, 64)
    assert (
        f"failed to register CUDA shared memory region: '{protocol}_region', GPUs not supported"
        in str(e.value)
    )
    if protocol == "http":
        assert e.value.status() == "400"
    else:
        assert e.value.status() == "StatusCode.INVALID_ARGUMENT"
    with pytest.raises(InferenceServerException, match="Unable to find cuda shared memory"):
        c.get_cuda_shared_memory_status(f"{protocol}_region")
    c.unregister_cuda_shared_memory(f"{protocol}_region")  # nothing there: a no-op, as Triton
    c.unregister_cuda_shared_memory()
    assert _regions(c.get_cuda_shared_memory_status(), protocol) == []


def test_cuda_shared_memory_is_a_listed_extension(server):
    meta = httpclient.InferenceServerClient(server.http_url).get_server_metadata()
    assert "cuda_shared_memory" in meta["extensions"]
    assert "system_shared_memory" in meta["extensions"]


@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_one_registry_keeps_the_two_kinds_apart(server, protocol):
    import tritonclient.utils.shared_memory as shm

    url = server.http_url if protocol == "http" else server.grpc_url
    c = client(url, protocol)
    name = f"sys_{protocol}"
    region = shm.create_shared_memory_region(name, f"/{name}", 16)
    try:
        c.register_system_shared_memory(name, f"/{name}", 16)
        assert _regions(c.get_cuda_shared_memory_status(), protocol) == []
        with pytest.raises(InferenceServerException, match="Unable to find cuda shared memory"):
            c.get_cuda_shared_memory_status(name)
        c.unregister_cuda_shared_memory(name)  # a CUDA unregister leaves a system region
        c.unregister_cuda_shared_memory()
        assert len(_regions(c.get_system_shared_memory_status(), protocol)) == 1
        if not cuda_available():  # the name is taken, but without a GPU that comes second
            with pytest.raises(InferenceServerException, match="GPUs not supported"):
                c.register_cuda_shared_memory(name, HANDLE, 0, 16)
    finally:
        c.unregister_system_shared_memory(name)
        shm.destroy_shared_memory_region(region)


class _StandInDevice:
    """Host bytes standing in for an opened IPC handle: the registry's data path on CPU."""

    opened: list[_StandInDevice] = []

    def __init__(self, raw_handle: bytes, device_id: int, byte_size: int) -> None:
        self.raw_handle, self.device_id = raw_handle, device_id
        self.mem = bytearray(byte_size)
        self.closed = False
        _StandInDevice.opened.append(self)

    def read(self, start: int, size: int) -> bytes:
        return bytes(self.mem[start : start + size])

    def write(self, start: int, data: bytes) -> None:
        self.mem[start : start + len(data)] = data

    def close(self) -> None:
        self.closed = True


@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_cuda_region_inputs_and_outputs_share_the_system_path(server, protocol, monkeypatch):
    from modelport.entrypoints.kserve import shared_memory

    monkeypatch.setattr(shared_memory, "cuda_available", lambda: True)
    monkeypatch.setattr(shared_memory, "CudaIpcBuffer", _StandInDevice)
    url = server.http_url if protocol == "http" else server.grpc_url
    c = client(url, protocol)
    m = httpclient if protocol == "http" else grpcclient
    handle = bytes(range(64))
    name = f"dev_{protocol}"
    c.register_cuda_shared_memory(name, base64.b64encode(handle), 0, 64)
    try:
        dev = _StandInDevice.opened[-1]
        assert (dev.raw_handle, dev.device_id) == (handle, 0)  # base64 / bytes decoded
        status = c.get_cuda_shared_memory_status(name)
        if protocol == "http":
            assert status == [{"name": name, "device_id": 0, "byte_size": 64}]
        else:
            assert status.regions[name].byte_size == 64
        with pytest.raises(InferenceServerException, match="already in manager"):
            c.register_cuda_shared_memory(name, base64.b64encode(handle), 0, 64)
        with pytest.raises(InferenceServerException, match="'raw_handle' must be a valid"):
            c.register_cuda_shared_memory("short", base64.b64encode(b"x" * 10), 0, 64)
        x = np.array([1.5, -2.0, 3.0, 4.25], dtype=np.float32)
        dev.write(16, x.tobytes())
        inp = m.InferInput("INPUT0", [4], "FP32")
        inp.set_shared_memory(name, 16, offset=16)
        out = m.InferRequestedOutput("OUTPUT0")
        out.set_shared_memory(name, 16, offset=32)
        c.infer("double", [inp], outputs=[out])
        np.testing.assert_array_equal(np.frombuffer(dev.read(32, 16), np.float32), x * 2)
    finally:
        c.unregister_cuda_shared_memory(name)
    assert dev.closed
    assert _regions(c.get_cuda_shared_memory_status(), protocol) == []


# -- a server with CUDA ------------------------------------------------------------------


class _DeviceRegion:
    """cudaMalloc'd memory and its IPC handle, made here with ctypes (or tritonclient's
    cuda_shared_memory when cuda-python is installed)."""

    def __init__(self, byte_size: int) -> None:
        from modelport.entrypoints.kserve.cuda_ipc import _cudart

        self.lib = lib = _cudart()
        lib.cudaMalloc.argtypes = [ctypes.POINTER(ctypes.c_void_p), ctypes.c_size_t]
        lib.cudaIpcGetMemHandle.argtypes = [ctypes.c_char_p, ctypes.c_void_p]
        lib.cudaMemcpy.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
        lib.cudaFree.argtypes = [ctypes.c_void_p]
        self.ptr = ctypes.c_void_p()
        assert lib.cudaSetDevice(0) == 0
        assert lib.cudaMalloc(ctypes.byref(self.ptr), byte_size) == 0
        handle = ctypes.create_string_buffer(64)
        assert lib.cudaIpcGetMemHandle(handle, self.ptr) == 0
        self.raw_handle = base64.b64encode(handle.raw)

    def write(self, offset: int, array: np.ndarray) -> None:
        data = np.ascontiguousarray(array)
        dst = ctypes.c_void_p(self.ptr.value + offset)
        assert self.lib.cudaMemcpy(dst, data.ctypes.data, data.nbytes, 1) == 0  # host->device

    def read(self, offset: int, dtype, count: int) -> np.ndarray:
        out = np.empty(count, dtype=dtype)
        src = ctypes.c_void_p(self.ptr.value + offset)
        assert self.lib.cudaMemcpy(out.ctypes.data, src, out.nbytes, 2) == 0  # device->host
        return out

    def free(self) -> None:
        self.lib.cudaFree(self.ptr)


@pytest.mark.gpu
@pytest.mark.skipif(not cuda_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_inference_through_cuda_shared_memory(tmp_path, protocol):
    repo = _repo(tmp_path / "models")
    grpc_port = free_port()
    argv = ["-m", "modelport", "serve", "--model-repository", str(repo),
            "--grpc-port", str(grpc_port), "--metrics-port", "-1"]  # fmt: skip
    with serving(argv, tmp_path / "server.log", ready_path="/v2/health/ready") as base:
        url = base.removeprefix("http://") if protocol == "http" else f"127.0.0.1:{grpc_port}"
        c = client(url, protocol)
        m = httpclient if protocol == "http" else grpcclient
        x = np.arange(4, dtype=np.float32) + 1
        region = _DeviceRegion(64)
        try:
            region.write(16, x)
            c.register_cuda_shared_memory("gpu_io", region.raw_handle, 0, 64)
            status = c.get_cuda_shared_memory_status()
            rows = list(status) if protocol == "http" else list(status.regions.values())
            assert len(rows) == 1
            inp = m.InferInput("INPUT0", [4], "FP32")
            inp.set_shared_memory("gpu_io", 16, offset=16)
            out = m.InferRequestedOutput("OUTPUT0")
            out.set_shared_memory("gpu_io", 16, offset=32)
            c.infer("double", [inp], outputs=[out])
            np.testing.assert_array_equal(region.read(32, np.float32, 4), x * 2)
            np.testing.assert_array_equal(region.read(16, np.float32, 4), x)  # input intact
        finally:
            c.unregister_cuda_shared_memory()
            region.free()
