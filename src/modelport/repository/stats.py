"""Per model-version statistics in the shape of Triton's statistics extension.

The same counters feed /v2/models/{m}/stats, gRPC ModelStatistics and the Prometheus
metrics (nv_inference_*), so the three can never disagree.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field
from typing import Any


@dataclass
class Duration:
    count: int = 0
    ns: int = 0

    def add(self, ns: int, count: int = 1) -> None:
        self.count += count
        self.ns += max(int(ns), 0)

    def as_dict(self) -> dict[str, int]:
        return {"count": self.count, "ns": self.ns}


@dataclass
class BatchStat:
    compute_input: Duration = field(default_factory=Duration)
    compute_infer: Duration = field(default_factory=Duration)
    compute_output: Duration = field(default_factory=Duration)


@dataclass
class ModelStats:
    name: str
    version: int
    inference_count: int = 0  # rows (batch elements) inferred successfully
    execution_count: int = 0  # model executions (batches)
    last_inference_ms: int = 0
    success: Duration = field(default_factory=Duration)
    fail: Duration = field(default_factory=Duration)
    queue: Duration = field(default_factory=Duration)
    compute_input: Duration = field(default_factory=Duration)
    compute_infer: Duration = field(default_factory=Duration)
    compute_output: Duration = field(default_factory=Duration)
    batches: dict[int, BatchStat] = field(default_factory=dict)
    cache_hit: Duration = field(default_factory=Duration)
    cache_miss: Duration = field(default_factory=Duration)
    pending: int = 0  # requests received and not yet answered
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def record_success(self, rows: int, total_ns: int, queue_ns: int, infer_ns: int) -> None:
        with self._lock:
            self.inference_count += rows
            self.last_inference_ms = int(time.time() * 1000)
            self.success.add(total_ns)
            self.queue.add(queue_ns)
            self.compute_input.add(0)
            self.compute_infer.add(infer_ns)
            self.compute_output.add(0)

    def record_cache_hit(self, total_ns: int, queue_ns: int, hit_ns: int) -> None:
        """A request answered from the response cache (Triton's UpdateSuccessCacheHit): a
        success with its request and queue time and the lookup as cache_hit; no inference,
        execution or compute counts (the model did not run)."""
        with self._lock:
            self.success.add(total_ns)
            self.queue.add(queue_ns)
            self.cache_hit.add(hit_ns)

    def record_cache_miss(self, miss_ns: int) -> None:
        """A successful request the cache did not have: lookup plus insertion time, which
        Triton also adds to the request's duration (UpdateSuccessCacheMiss)."""
        with self._lock:
            self.success.ns += max(int(miss_ns), 0)
            self.cache_miss.add(miss_ns)

    def record_failure(self, total_ns: int) -> None:
        with self._lock:
            self.fail.add(total_ns)

    def record_execution(self, rows: int, infer_ns: int) -> None:
        with self._lock:
            self.execution_count += 1
            b = self.batches.setdefault(rows, BatchStat())
            b.compute_input.add(0)
            b.compute_infer.add(infer_ns)
            b.compute_output.add(0)

    def as_dict(self) -> dict[str, Any]:
        """Triton's JSON statistics of one model version."""
        with self._lock:
            return {
                "name": self.name,
                "version": str(self.version),
                "last_inference": self.last_inference_ms,
                "inference_count": self.inference_count,
                "execution_count": self.execution_count,
                "inference_stats": {
                    "success": self.success.as_dict(),
                    "fail": self.fail.as_dict(),
                    "queue": self.queue.as_dict(),
                    "compute_input": self.compute_input.as_dict(),
                    "compute_infer": self.compute_infer.as_dict(),
                    "compute_output": self.compute_output.as_dict(),
                    "cache_hit": self.cache_hit.as_dict(),
                    "cache_miss": self.cache_miss.as_dict(),
                },
                "batch_stats": [
                    {
                        "batch_size": size,
                        "compute_input": b.compute_input.as_dict(),
                        "compute_infer": b.compute_infer.as_dict(),
                        "compute_output": b.compute_output.as_dict(),
                    }
                    for size, b in sorted(self.batches.items())
                ],
            }
