"""Triton's response cache: `--cache-config local,size=N` plus `response_cache { enable: true }`.

Both must be on for a model's requests to be cached (Triton's rule): the server-wide cache is
one byte-bounded LRU shared by every model, as Triton's `local` cache implementation.

What a request's key covers: model name, model version, and for every input (by name) its
datatype, shape and bytes -- Triton's key is the model name, version, input names and input
bytes. modelport also puts in the requested outputs, classification and custom request
parameters (request id, priority, timeout, sequence flags and binary_data_output are never in
it): requests Triton would answer with the other request's response (a different output
subset, a reshaped input) are misses here.

What is cached is the whole successful response as the client got it (outputs, datatypes,
shapes, parameters); a hit hands back copies of it under the new request's id. An entry is
its output bytes plus names, datatypes, shapes and parameters; one larger than the cache is
not inserted (Triton logs "Failed to insert key"), and inserting evicts least recently used
entries until it fits.

Entries of a previous load of a model are never used (they age out of the LRU).

Thread-safe (one lock); lookups and insertions are quick dict operations, so callers on the
event loop call it directly.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import logging
import threading
import time
from collections import OrderedDict
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from modelport.repository.tensors import InferRequest, InferResponse, InferTensor, to_raw

logger = logging.getLogger("modelport.cache")

CACHE_IMPLEMENTATIONS = ("local",)


def _tensor_bytes(t: InferTensor) -> int:
    if t.data.dtype == object:
        return sum(4 + len(x if isinstance(x, bytes) else str(x).encode()) for x in t.data.flat)
    return int(t.data.nbytes)


def _param_json(params: dict[str, Any]) -> str:
    return json.dumps(params, sort_keys=True, separators=(",", ":"), default=str)


@dataclass
class CacheEntry:
    """A successful response as stored: its outputs (private copies) and parameters."""

    outputs: dict[str, InferTensor]
    parameters: dict[str, Any] = field(default_factory=dict)
    nbytes: int = 0

    @classmethod
    def of(cls, resp: InferResponse) -> CacheEntry:
        outputs = {
            n: InferTensor(t.name, t.datatype, np.array(t.data, copy=True))
            for n, t in resp.outputs.items()
        }
        size = sum(
            len(n.encode()) + len(t.datatype) + 8 * t.data.ndim + _tensor_bytes(t)
            for n, t in outputs.items()
        )
        params = dict(resp.parameters)
        if params:
            size += len(_param_json(params))
        return cls(outputs, params, size)

    def response(self, model_name: str, version: int, request_id: str) -> InferResponse:
        outputs = {
            n: InferTensor(t.name, t.datatype, np.array(t.data, copy=True))
            for n, t in self.outputs.items()
        }
        return InferResponse(
            model_name, version, outputs, id=request_id, parameters=dict(self.parameters)
        )


def request_key(model_name: str, version: int, req: InferRequest, load: int = 0) -> bytes:
    """The cache key of a request to `model_name` version `version` (see the module doc);
    `load` tells loads of the model apart (a reload, maybe with new files under the same
    version, never answers from what the previous load computed)."""
    h = hashlib.blake2b(digest_size=20)

    def put(b: bytes) -> None:
        h.update(len(b).to_bytes(8, "little"))
        h.update(b)

    put(model_name.encode())
    put(str(int(version)).encode())
    put(str(int(load)).encode())
    for name in sorted(req.inputs):
        t = req.inputs[name]
        put(name.encode())
        put(t.datatype.encode())
        put(",".join(str(d) for d in t.data.shape).encode())
        put(to_raw(t.data, t.datatype))
    outs = req.requested_outputs
    put(b"*" if outs is None else "\0".join(sorted(outs)).encode())
    put(_param_json(dict(sorted(req.classification.items()))).encode())
    put(_param_json(req.parameters).encode())
    return h.digest()


class ResponseCache:
    """A byte-bounded LRU of responses, shared by all models (Triton's `local` cache)."""

    def __init__(self, size_bytes: int) -> None:
        if size_bytes <= 0:
            raise ValueError("the response cache size must be a positive number of bytes")
        self.size = int(size_bytes)
        self._items: OrderedDict[bytes, CacheEntry] = OrderedDict()
        self._used = 0
        self._lock = threading.Lock()
        self.num_lookups = 0
        self.num_hits = 0
        self.num_misses = 0
        self.num_evictions = 0
        self.num_insertions = 0

    def __len__(self) -> int:
        return len(self._items)

    @property
    def used_bytes(self) -> int:
        return self._used

    def __contains__(self, key: bytes) -> bool:
        return key in self._items

    def lookup(self, key: bytes) -> CacheEntry | None:
        with self._lock:
            self.num_lookups += 1
            entry = self._items.get(key)
            if entry is None:
                self.num_misses += 1
                return None
            self._items.move_to_end(key)
            self.num_hits += 1
            return entry

    def insert(self, key: bytes, entry: CacheEntry) -> None:
        """Insert (evicting least recently used entries); ValueError when it can never fit."""
        if entry.nbytes > self.size:
            raise ValueError(
                f"entry of {entry.nbytes} bytes is larger than the cache ({self.size} bytes)"
            )
        with self._lock:
            old = self._items.pop(key, None)
            if old is not None:  # raced with an identical request: keep the newer
                self._used -= old.nbytes
            while self._items and self._used + entry.nbytes > self.size:
                _, evicted = self._items.popitem(last=False)
                self._used -= evicted.nbytes
                self.num_evictions += 1
            self._items[key] = entry
            self._used += entry.nbytes
            self.num_insertions += 1

    def clear(self) -> None:
        with self._lock:
            self._items.clear()
            self._used = 0


_loads = itertools.count(1)


@dataclass
class Miss:
    """A lookup that found nothing: what storing the computed response needs."""

    key: bytes
    lookup_ns: int


class ModelCache:
    """One model version's use of the server's cache, with Triton's statistics: a hit is
    recorded here; a miss is recorded by `store` once the response was computed (failed
    requests are neither inserted nor counted as misses, as in Triton)."""

    def __init__(self, cache: ResponseCache, model_name: str, version: int, stats: Any) -> None:
        self.cache = cache
        self.model_name = model_name
        self.version = version
        self.stats = stats  # ModelStats
        self.load = next(_loads)

    def lookup(self, req: InferRequest, t0: int) -> InferResponse | Miss:
        start = time.perf_counter_ns()
        key = request_key(self.model_name, self.version, req, self.load)
        entry = self.cache.lookup(key)
        if entry is None:
            return Miss(key, time.perf_counter_ns() - start)
        resp = entry.response(self.model_name, self.version, req.id)
        end = time.perf_counter_ns()
        self.stats.record_cache_hit(end - t0, queue_ns=start - t0, hit_ns=end - start)
        return resp

    def store(self, miss: Miss, resp: InferResponse) -> None:
        start = time.perf_counter_ns()
        try:
            self.cache.insert(miss.key, CacheEntry.of(resp))
        except ValueError as e:
            logger.error(
                "Failed to insert key [%s] into response cache: %s (model '%s')",
                miss.key.hex(),
                e,
                self.model_name,
            )
        self.stats.record_cache_miss(miss.lookup_ns + time.perf_counter_ns() - start)


def parse_cache_config(
    cache_config: Iterable[str], byte_size: int | None = None
) -> ResponseCache | None:
    """`--cache-config <cache>,<key>=<value>` (repeatable) and the older
    `--response-cache-byte-size N` -> the server's cache, or None when none is configured.

    Raises ValueError with Triton's complaint for flags it rejects."""
    values = [v for v in cache_config if v]
    if values and byte_size:
        raise ValueError(
            "incompatible flags --response-cache-byte-size and --cache-config: use "
            "--cache-config local,size=N"
        )
    if not values:
        return ResponseCache(byte_size) if byte_size else None
    names: dict[str, dict[str, str]] = {}
    for v in values:
        name, sep, setting = v.partition(",")
        key, eq, value = setting.partition("=")
        if not name or not sep or not eq or not key:
            raise ValueError(
                f"--cache-config option format is '<cache name>,<setting>=<value>', got '{v}'"
            )
        names.setdefault(name.strip(), {})[key.strip()] = value.strip()
    if len(names) > 1:
        raise ValueError(
            f"found multiple cache configurations ({', '.join(sorted(names))}), only one cache "
            "implementation may be configured"
        )
    ((name, settings),) = names.items()
    if name not in CACHE_IMPLEMENTATIONS:
        raise ValueError(f"cache '{name}' is not available; modelport has the 'local' cache only")
    unknown = sorted(set(settings) - {"size"})
    if unknown:
        raise ValueError(f"unknown local cache setting(s) {unknown}; the local cache takes 'size'")
    if "size" not in settings:
        raise ValueError("the local cache needs a size: --cache-config local,size=<bytes>")
    try:
        size = int(settings["size"])
    except ValueError:
        raise ValueError(
            f"local cache size '{settings['size']}' is not a number of bytes"
        ) from None
    if size <= 0:
        raise ValueError(f"local cache size must be positive, got {size}")
    return ResponseCache(size)


__all__ = [
    "CacheEntry",
    "Miss",
    "ModelCache",
    "ResponseCache",
    "parse_cache_config",
    "request_key",
]
