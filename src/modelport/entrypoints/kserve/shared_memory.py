"""Triton's system and CUDA shared memory extensions: tensors passed through shared memory.

A client on the same host creates a region (shm_open key such as "/input0", or device
memory shared with cudaIpcGetMemHandle), registers it under a name, and then names that
region instead of sending tensor bytes; outputs can be written into a region the same way.
One registry serves HTTP and gRPC and both kinds, as in Triton (one name space: a name is
either a system or a CUDA region); inputs and outputs use the same parameters
(shared_memory_region / _offset / _byte_size) whatever the kind.
"""

from __future__ import annotations

import mmap
import os
import threading
from dataclasses import dataclass
from typing import Any

from modelport.entrypoints.kserve.cuda_ipc import (
    IPC_HANDLE_SIZE,
    CudaIpcBuffer,
    CudaUnavailable,
    cuda_available,
)
from modelport.repository.errors import InvalidArgument, NotFound, ServingError, Status

SHM_DIR = "/dev/shm"
SYSTEM = "system"
CUDA = "cuda"


@dataclass
class Region:
    name: str
    key: str
    offset: int
    byte_size: int
    buffer: Any  # mmap.mmap (system) or CudaIpcBuffer (cuda)
    kind: str = SYSTEM
    device_id: int = 0

    def status(self) -> dict:
        if self.kind == CUDA:
            return {"name": self.name, "device_id": self.device_id, "byte_size": self.byte_size}
        return {
            "name": self.name,
            "key": self.key,
            "offset": self.offset,
            "byte_size": self.byte_size,
        }


class SharedMemoryRegistry:
    def __init__(self) -> None:
        self._regions: dict[str, Region] = {}
        self._lock = threading.Lock()

    def register(self, name: str, key: str, offset: int, byte_size: int) -> None:
        if not name or not key:
            raise InvalidArgument("shared memory registration needs a region name and a key")
        with self._lock:
            if name in self._regions:
                raise ServingError(
                    f"shared memory region '{name}' already in manager", Status.ALREADY_EXISTS
                )
            base = key[1:] if key.startswith("/") else key
            if not base or "/" in base or "\0" in base or base in (".", ".."):
                # shm_open's rule; also keeps a request from naming any other file
                raise InvalidArgument(f"invalid shared memory key '{key}'")
            path = os.path.join(SHM_DIR, base)
            try:
                fd = os.open(path, os.O_RDWR)
            except OSError as e:
                raise InvalidArgument(
                    f"Unable to open shared memory region: '{key}': {e.strerror}"
                ) from None
            try:
                size = os.fstat(fd).st_size
                if offset < 0 or byte_size <= 0 or offset + byte_size > size:
                    raise InvalidArgument(
                        f"shared memory region '{name}': offset {offset} + byte_size {byte_size} "
                        f"exceeds the {size} bytes of '{key}'"
                    )
                buffer = mmap.mmap(fd, size)
            finally:
                os.close(fd)
            self._regions[name] = Region(name, key, offset, byte_size, buffer)

    def register_cuda(self, name: str, raw_handle: bytes, device_id: int, byte_size: int) -> None:
        """A region of device memory (`raw_handle`: a cudaIpcMemHandle_t's bytes)."""
        if not cuda_available():  # Triton built without GPU support answers so
            raise InvalidArgument(
                f"failed to register CUDA shared memory region: '{name}', GPUs not supported"
            )
        if not name:
            raise InvalidArgument("shared memory registration needs a region name")
        with self._lock:
            if name in self._regions:
                raise ServingError(
                    f"shared memory region '{name}' already in manager", Status.ALREADY_EXISTS
                )
            if len(raw_handle) != IPC_HANDLE_SIZE:
                raise InvalidArgument(
                    "'raw_handle' must be a valid base64 encode cudaIpcMemHandle_t"
                )
            if byte_size <= 0:
                raise InvalidArgument(
                    f"failed to register CUDA shared memory region '{name}': byte_size must "
                    f"be positive, got {byte_size}"
                )
            try:
                buffer = CudaIpcBuffer(raw_handle, device_id, byte_size)
            except CudaUnavailable:
                raise InvalidArgument(
                    f"failed to register CUDA shared memory region: '{name}', GPUs not supported"
                ) from None
            except (ValueError, RuntimeError) as e:
                raise InvalidArgument(
                    f"failed to register CUDA shared memory region '{name}': {e}"
                ) from None
            self._regions[name] = Region(name, "", 0, byte_size, buffer, CUDA, device_id)

    def unregister(self, name: str = "", kind: str = SYSTEM) -> None:
        """Drop `name` (if it is a region of `kind`), or every region of `kind`."""
        with self._lock:
            names = [name] if name else list(self._regions)
            for n in names:
                region = self._regions.get(n)
                if region is not None and region.kind == kind:
                    del self._regions[n]
                    region.buffer.close()

    def status(self, name: str = "", kind: str = SYSTEM) -> list[dict]:
        with self._lock:
            if name:
                region = self._regions.get(name)
                if region is None or region.kind != kind:
                    raise NotFound(f"Unable to find {kind} shared memory region: '{name}'")
                return [region.status()]
            return [r.status() for r in self._regions.values() if r.kind == kind]

    def _span(self, name: str, offset: int, size: int) -> tuple[Region, int]:
        region = self._regions.get(name)
        if region is None:
            raise NotFound(f"Unable to find shared memory region: '{name}'")
        if offset < 0 or size < 0 or offset + size > region.byte_size:
            raise InvalidArgument(
                f"shared memory region '{name}': {size} bytes at offset {offset} exceed its "
                f"byte_size {region.byte_size}"
            )
        return region, region.offset + offset

    def read(self, name: str, offset: int, size: int) -> bytes:
        with self._lock:
            region, start = self._span(name, offset, size)
            if region.kind == CUDA:
                return region.buffer.read(start, size)
            return bytes(region.buffer[start : start + size])

    def write(self, name: str, offset: int, size: int, data: bytes) -> None:
        with self._lock:
            region, start = self._span(name, offset, size)
            if len(data) > size:
                raise InvalidArgument(
                    f"output needs {len(data)} bytes, shared memory region '{name}' was given "
                    f"{size}"
                )
            if region.kind == CUDA:
                region.buffer.write(start, data)
            else:
                region.buffer[start : start + len(data)] = data

    def close(self) -> None:
        self.unregister(kind=SYSTEM)
        self.unregister(kind=CUDA)
