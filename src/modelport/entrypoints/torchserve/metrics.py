"""TorchServe's frontend metrics in Prometheus text format, under TorchServe's metric names.

TorchServe exposes its two latency series as *counters* of accumulated microseconds without
a `_total` suffix; prometheus_client would rename them, so the exposition is written here
(it is three series; the format is simple and stable).
"""

from __future__ import annotations

from collections import defaultdict

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

Labels = tuple[str, str]  # (model_name, model_version)

_SERIES = (
    ("ts_inference_requests_total", "Total number of inference requests.", "requests"),
    (
        "ts_inference_latency_microseconds",
        "Cumulative inference duration in microseconds",
        "inference_us",
    ),
    ("ts_queue_latency_microseconds", "Cumulative queue duration in microseconds", "queue_us"),
)


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


class TSMetrics:
    def __init__(self) -> None:
        self.requests: dict[Labels, float] = defaultdict(float)
        self.inference_us: dict[Labels, float] = defaultdict(float)
        self.queue_us: dict[Labels, float] = defaultdict(float)

    def observe(self, model: str, version: str, latency_s: float, queue_s: float) -> None:
        key = (model, version)
        self.requests[key] += 1
        self.inference_us[key] += latency_s * 1e6
        self.queue_us[key] += max(queue_s, 0.0) * 1e6

    def request_status(self, code: int) -> None:
        """An API response's status (Requests2XX/4XX/5XX); counted in metrics_modes only."""

    def backend_metrics(self, lines: tuple[str, ...]) -> None:
        """Metric lines a handler logged; kept in metrics_modes only."""

    def render(self) -> str:
        lines = []
        for name, doc, attr in _SERIES:
            lines.append(f"# HELP {name} {doc}")
            lines.append(f"# TYPE {name} counter")
            for (model, version), v in sorted(getattr(self, attr).items()):
                labels = f'model_name="{_escape(model)}",model_version="{_escape(version)}"'
                lines.append(f"{name}{{{labels}}} {v:.1f}")
        return "\n".join(lines) + "\n"
