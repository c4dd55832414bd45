"""Prometheus metrics with Triton's names, served on their own port (Triton's 8002).

Why hand-written exposition: prometheus_client appends `_total` to counters, and users'
dashboards and alerts are written against Triton's exact names
(`nv_inference_request_success{model="m",version="1"}`). The numbers come from the same
ModelStats as the statistics API, read at scrape time.
"""

from __future__ import annotations

import asyncio
import contextlib

from modelport.repository import custom_metrics as cm
from modelport.repository.manager import RepositoryManager

# name, type, help, getter(stats dict, pending) -> number
_METRICS = [
    ("nv_inference_request_success", "counter", "Number of successful inference requests, all batch sizes",
     lambda s, p: s["inference_stats"]["success"]["count"]),
    ("nv_inference_request_failure", "counter", "Number of failed inference requests, all batch sizes",
     lambda s, p: s["inference_stats"]["fail"]["count"]),
    ("nv_inference_count", "counter", "Number of inferences performed (does not include cached requests)",
     lambda s, p: s["inference_count"]),
    ("nv_inference_exec_count", "counter", "Number of model executions performed (does not include cached requests)",
     lambda s, p: s["execution_count"]),
    ("nv_inference_request_duration_us", "counter", "Cumulative inference request duration in microseconds",
     lambda s, p: (s["inference_stats"]["success"]["ns"] + s["inference_stats"]["fail"]["ns"]) // 1000),
    ("nv_inference_queue_duration_us", "counter", "Cumulative inference queuing duration in microseconds",
     lambda s, p: s["inference_stats"]["queue"]["ns"] // 1000),
    ("nv_inference_compute_input_duration_us", "counter", "Cumulative compute input duration in microseconds",
     lambda s, p: s["inference_stats"]["compute_input"]["ns"] // 1000),
    ("nv_inference_compute_infer_duration_us", "counter", "Cumulative compute inference duration in microseconds",
     lambda s, p: s["inference_stats"]["compute_infer"]["ns"] // 1000),
    ("nv_inference_compute_output_duration_us", "counter", "Cumulative inference compute output duration in microseconds",
     lambda s, p: s["inference_stats"]["compute_output"]["ns"] // 1000),
    ("nv_inference_pending_request_count", "gauge", "Instantaneous number of pending requests awaiting execution per-model.",
     lambda s, p: p),
]  # fmt: skip

# Triton's per-model response cache counters: only for models whose config enables the cache
# while the server has one (name, help, getter(stats dict))
_CACHE_METRICS = [
    ("nv_cache_num_hits_per_model", "Number of cache hits per model",
     lambda s: s["inference_stats"]["cache_hit"]["count"]),
    ("nv_cache_num_misses_per_model", "Number of cache misses per model",
     lambda s: s["inference_stats"]["cache_miss"]["count"]),
    ("nv_cache_hit_duration_per_model", "Total cache hit duration per model, in microseconds",
     lambda s: s["inference_stats"]["cache_hit"]["ns"] // 1000),
    ("nv_cache_miss_duration_per_model",
     "Total cache miss (insert+lookup) duration per model, in microseconds",
     lambda s: s["inference_stats"]["cache_miss"]["ns"] // 1000),
]  # fmt: skip


def _escape(v: str) -> str:
    return v.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def render(manager: RepositoryManager, counter_latencies: bool = True) -> str:
    """counter_latencies False (--metrics-config counter_latencies=false): without the
    cumulative *_duration_us counters."""
    rows = []
    cached = []
    for model in manager.served():
        row = (model.name, str(model.version), model.stats.as_dict(), model.stats.pending)
        rows.append(row)
        if getattr(model, "cache_enabled", False):
            cached.append(row)
    lines = []
    for name, kind, help_text, get in _METRICS:
        if not counter_latencies and name.endswith("_duration_us"):
            continue
        lines.append(f"# HELP {name} {help_text}")
        lines.append(f"# TYPE {name} {kind}")
        # a python model's MetricFamily of this name and kind is this family (as in Triton)
        extra = manager.custom_metrics.builtin_series(name)
        for model, version, stats, pending in rows:
            labels = f'model="{_escape(model)}",version="{_escape(version)}"'
            value = get(stats, pending)
            added = extra.pop((("model", model), ("version", version)), None)
            if added is not None:
                value = cm.fmt(value + added)
            lines.append(f"{name}{{{labels}}} {value}")
        lines.extend(cm.series_line(name, key, v) for key, v in extra.items())
    for name, help_text, get in _CACHE_METRICS if cached else ():
        lines.append(f"# HELP {name} {help_text}")
        lines.append(f"# TYPE {name} counter")
        for model, version, stats, _pending in cached:
            labels = f'model="{_escape(model)}",version="{_escape(version)}"'
            lines.append(f"{name}{{{labels}}} {get(stats)}")
    lines.extend(manager.custom_metrics.render())  # python models' pb_utils.MetricFamily
    return "\n".join(lines) + "\n"


class MetricsServer:
    """A minimal HTTP/1.1 server answering GET /metrics (anything else: 404)."""

    def __init__(
        self, manager: RepositoryManager, host: str, port: int, counter_latencies: bool = True
    ) -> None:
        self.manager = manager
        self.counter_latencies = counter_latencies
        self.host = host
        self.requested_port = port
        self.port = 0
        self._server: asyncio.base_events.Server | None = None

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            request_line = await asyncio.wait_for(reader.readline(), 10)
            while True:  # drain headers
                line = await asyncio.wait_for(reader.readline(), 10)
                if line in (b"\r\n", b"\n", b""):
                    break
            parts = request_line.decode("latin-1").split()
            path = parts[1].split("?")[0] if len(parts) > 1 else ""
            if len(parts) > 1 and parts[0] == "GET" and path == "/metrics":
                body = render(self.manager, self.counter_latencies).encode()
                status, ctype = "200 OK", "text/plain; version=0.0.4; charset=utf-8"
            else:
                body, status, ctype = b"not found\n", "404 Not Found", "text/plain"
            writer.write(
                f"HTTP/1.1 {status}\r\nContent-Type: {ctype}\r\nContent-Length: {len(body)}\r\n"
                "Connection: close\r\n\r\n".encode()
                + body
            )
            await writer.drain()
        except (asyncio.TimeoutError, ConnectionError):
            pass
        finally:
            writer.close()
            with contextlib.suppress(Exception):
                await writer.wait_closed()

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._handle, self.host, self.requested_port)
        self.port = self._server.sockets[0].getsockname()[1]

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._server.wait_closed(), 2)
            self._server = None
