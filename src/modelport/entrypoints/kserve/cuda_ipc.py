"""Device memory another process shared through a CUDA IPC handle (Triton's CUDA shm).

Why ctypes against libcudart and not a CUDA Python package: torch already loads the CUDA
runtime, and opening a handle is one call (cudaIpcOpenMemHandle); the copies in and out go
through torch, viewing the device pointer with `__cuda_array_interface__`.

A handle cannot be opened by the process that created it (a CUDA rule): clients run
elsewhere, as they do with Triton.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import glob
import os
import threading
from typing import Any

IPC_HANDLE_SIZE = 64  # sizeof(cudaIpcMemHandle_t)
_LAZY_ENABLE_PEER_ACCESS = 1  # cudaIpcMemLazyEnablePeerAccess

_lib: ctypes.CDLL | None = None
_lib_lock = threading.Lock()


class CudaUnavailable(RuntimeError):
    """This server has no usable CUDA device (no torch CUDA build, no GPU, no libcudart)."""


class _IpcHandle(ctypes.Structure):
    _fields_ = [("reserved", ctypes.c_char * IPC_HANDLE_SIZE)]


def cuda_available() -> bool:
    try:
        import torch
    except ImportError:
        return False
    return bool(torch.cuda.is_available())


def _candidates() -> list[str]:
    """torch's own CUDA runtime first (pip wheels ship it beside torch), then the system's."""
    out: list[str] = []
    try:
        import torch

        torch_lib = os.path.join(os.path.dirname(torch.__file__), "lib")
        site = os.path.dirname(os.path.dirname(torch.__file__))
        for pattern in (
            os.path.join(torch_lib, "libcudart*.so*"),
            os.path.join(site, "nvidia", "cuda_runtime", "lib", "libcudart.so*"),
            os.path.join(site, "nvidia", "cu*", "lib", "libcudart.so*"),
        ):
            out += sorted(glob.glob(pattern))
    except ImportError:
        pass
    found = ctypes.util.find_library("cudart")
    if found:
        out.append(found)
    return out + ["libcudart.so", "libcudart.so.13", "libcudart.so.12", "libcudart.so.11.0"]


def _cudart() -> ctypes.CDLL:
    global _lib
    with _lib_lock:
        if _lib is None:
            for name in _candidates():
                try:
                    lib = ctypes.CDLL(name)
                except OSError:
                    continue
                lib.cudaIpcOpenMemHandle.argtypes = [
                    ctypes.POINTER(ctypes.c_void_p),
                    _IpcHandle,
                    ctypes.c_uint,
                ]
                lib.cudaIpcCloseMemHandle.argtypes = [ctypes.c_void_p]
                lib.cudaGetErrorString.restype = ctypes.c_char_p
                lib.cudaSetDevice.argtypes = [ctypes.c_int]
                _lib = lib
                break
            else:
                raise CudaUnavailable("the CUDA runtime library (libcudart) was not found")
        return _lib


def _check(lib: ctypes.CDLL, err: int, what: str) -> None:
    if err != 0:
        msg = lib.cudaGetErrorString(err)
        raise RuntimeError(f"{what}: {msg.decode() if msg else f'CUDA error {err}'}")


class _DeviceBytes:
    """`byte_size` bytes at a device pointer, for torch.as_tensor."""

    def __init__(self, ptr: int, byte_size: int) -> None:
        self.__cuda_array_interface__ = {
            "shape": (byte_size,),
            "typestr": "|u1",
            "data": (ptr, False),
            "version": 2,
        }


class CudaIpcBuffer:
    """A registered CUDA shared memory region: `read` / `write` bytes at an offset."""

    def __init__(self, raw_handle: bytes, device_id: int, byte_size: int) -> None:
        if not cuda_available():
            raise CudaUnavailable("CUDA is not available")
        import torch

        if not 0 <= device_id < torch.cuda.device_count():
            raise ValueError(f"invalid CUDA device id {device_id}")
        if len(raw_handle) != IPC_HANDLE_SIZE:
            raise ValueError(
                f"a cudaIpcMemHandle_t has {IPC_HANDLE_SIZE} bytes, got {len(raw_handle)}"
            )
        self.device_id = device_id
        self.byte_size = byte_size
        self._device = torch.device("cuda", device_id)
        torch.cuda.init()
        lib = _cudart()
        with torch.cuda.device(device_id):
            _check(lib, lib.cudaSetDevice(device_id), "cudaSetDevice")
            ptr = ctypes.c_void_p()
            handle = _IpcHandle.from_buffer_copy(raw_handle)
            _check(
                lib,
                lib.cudaIpcOpenMemHandle(ctypes.byref(ptr), handle, _LAZY_ENABLE_PEER_ACCESS),
                "failed to open CUDA IPC handle",
            )
        self._ptr = int(ptr.value or 0)

    def _view(self, start: int, size: int) -> Any:
        import torch

        return torch.as_tensor(_DeviceBytes(self._ptr + start, size), device=self._device)

    def read(self, start: int, size: int) -> bytes:
        import torch

        if size == 0:
            return b""
        with torch.cuda.device(self.device_id):
            host = self._view(start, size).cpu()  # synchronous with respect to the host
        return host.numpy().tobytes()

    def write(self, start: int, data: bytes) -> None:
        import torch

        if not data:
            return
        src = torch.frombuffer(bytearray(data), dtype=torch.uint8)
        with torch.cuda.device(self.device_id):
            self._view(start, len(data)).copy_(src)
            torch.cuda.synchronize(self.device_id)  # the client reads once we answer

    def close(self) -> None:
        if self._ptr:
            lib = _cudart()
            import torch

            with torch.cuda.device(self.device_id):
                lib.cudaIpcCloseMemHandle(ctypes.c_void_p(self._ptr))
            self._ptr = 0
