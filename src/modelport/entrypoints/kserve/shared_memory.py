"""Triton's system shared memory extension: tensors passed through POSIX shared memory.

A client on the same host creates a region (shm_open key such as "/input0"), registers it
under a name, and then names that region instead of sending tensor bytes; outputs can be
written into a region the same way. One registry serves HTTP and gRPC, as in Triton.
"""

from __future__ import annotations

import mmap
import os
import threading
from dataclasses import dataclass

from modelport.repository.errors import InvalidArgument, NotFound, ServingError, Status

SHM_DIR = "/dev/shm"


@dataclass
class Region:
    name: str
    key: str
    offset: int
    byte_size: int
    buffer: mmap.mmap

    def status(self) -> dict:
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

    def unregister(self, name: str = "") -> None:
        with self._lock:
            names = [name] if name else list(self._regions)
            for n in names:
                region = self._regions.pop(n, None)
                if region is not None:
                    region.buffer.close()

    def status(self, name: str = "") -> list[dict]:
        with self._lock:
            if name:
                if name not in self._regions:
                    raise NotFound(f"Unable to find system shared memory region: '{name}'")
                return [self._regions[name].status()]
            return [r.status() for r in self._regions.values()]

    def _span(self, name: str, offset: int, size: int) -> tuple[Region, int]:
        region = self._regions.get(name)
        if region is None:
            raise NotFound(f"Unable to find system shared memory region: '{name}'")
        if offset < 0 or size < 0 or offset + size > region.byte_size:
            raise InvalidArgument(
                f"shared memory region '{name}': {size} bytes at offset {offset} exceed its "
                f"byte_size {region.byte_size}"
            )
        return region, region.offset + offset

    def read(self, name: str, offset: int, size: int) -> bytes:
        with self._lock:
            region, start = self._span(name, offset, size)
            return bytes(region.buffer[start : start + size])

    def write(self, name: str, offset: int, size: int, data: bytes) -> None:
        with self._lock:
            region, start = self._span(name, offset, size)
            if len(data) > size:
                raise InvalidArgument(
                    f"output needs {len(data)} bytes, shared memory region '{name}' was given "
                    f"{size}"
                )
            region.buffer[start : start + len(data)] = data

    def close(self) -> None:
        self.unregister()
