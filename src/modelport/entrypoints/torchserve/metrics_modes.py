"""TorchServe's metrics modes over a metrics.yaml (config.properties `metrics_mode`,
`metrics_config`, `model_metrics_auto_detect`).

- prometheus: the frontend metrics and handler metrics the YAML declares are served on
  /metrics, each with the YAML's dimensions as labels (handler metrics also get Hostname).
- log: the same metrics go to `$METRICS_LOCATION/ts_metrics.log` (frontend) and
  `model_metrics.log` (handlers), one line each in TorchServe's format; /metrics is empty.
- legacy: ts_inference_requests_total / _latency_ / _queue_latency_ on /metrics (as modelport
  does without metrics_mode), everything else to the log files.

Without `metrics_mode` modelport keeps serving the three ts_inference series (TSMetrics).
"""

from __future__ import annotations

import logging
import os
import socket
import time
from bisect import bisect_left
from datetime import datetime
from pathlib import Path
from typing import IO

from modelport.entrypoints.torchserve.metrics import TSMetrics, _escape
from modelport.torchserve.metrics_config import (
    MetricsConfig,
    MetricSpec,
    load_metrics_config,
    parse_metric_line,
)
from modelport.torchserve.ts_config import TSConfig

logger = logging.getLogger("modelport.torchserve")

MODES = ("log", "prometheus", "legacy")
# prometheus simpleclient's default buckets, which TorchServe's histograms use
BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0)
_LEGACY = ("ts_inference_requests_total", "ts_inference_latency_microseconds",
           "ts_queue_latency_microseconds")  # fmt: skip


def _num(v: float) -> str:
    return repr(float(v))


class _Series:
    """One metric's samples by label values: a number, or [bucket counts, count, sum]."""

    def __init__(self, spec: MetricSpec, labels: tuple[str, ...]) -> None:
        self.spec = spec
        self.labels = labels
        self.samples: dict[tuple[str, ...], float | list] = {}

    def update(self, key: tuple[str, ...], value: float) -> None:
        t = self.spec.type
        if t == "counter":
            if value >= 0:
                self.samples[key] = self.samples.get(key, 0.0) + value
        elif t == "gauge":
            self.samples[key] = value
        else:
            h = self.samples.setdefault(key, [[0] * (len(BUCKETS) + 1), 0, 0.0])
            h[0][bisect_left(BUCKETS, value)] += 1
            h[1] += 1
            h[2] += value

    def render(self) -> list[str]:
        s = self.spec
        out = [
            f"# HELP {s.name} Torchserve prometheus {s.type} metric with unit: {s.unit}",
            f"# TYPE {s.name} {s.type}",
        ]
        for key, v in sorted(self.samples.items()):
            pairs = [f'{n}="{_escape(val)}"' for n, val in zip(self.labels, key)]
            if not isinstance(v, list):
                out.append(f"{s.name}{{{','.join(pairs)}}} {_num(v)}")
                continue
            cumulative = 0
            for bound, n in zip([*map(_num, BUCKETS), "+Inf"], v[0]):
                cumulative += n
                le = ",".join([*pairs, f'le="{bound}"'])
                out.append(f"{s.name}_bucket{{{le}}} {_num(cumulative)}")
            out.append(f"{s.name}_count{{{','.join(pairs)}}} {_num(v[1])}")
            out.append(f"{s.name}_sum{{{','.join(pairs)}}} {_num(v[2])}")
        return out


class ConfiguredMetrics(TSMetrics):
    """TSMetrics driven by a metrics.yaml and a metrics mode (see the module docstring)."""

    def __init__(
        self,
        config: MetricsConfig,
        mode: str,
        *,
        auto_detect: bool = False,
        log_dir: Path | None = None,
        hostname: str | None = None,
    ) -> None:
        super().__init__()
        if mode not in MODES:
            raise ValueError(f"metrics_mode {mode!r} is not one of {MODES}")
        self.config = config
        self.mode = mode
        self.auto_detect = auto_detect
        self.hostname = hostname or socket.gethostname()
        self.log_dir = log_dir or Path("logs")
        self._series: dict[str, _Series] = {}
        self._model_names = set(config.model_metrics)  # grows with auto-detected ones
        for spec in config.ts_metrics.values():
            self._series[spec.name] = _Series(spec, spec.dimensions)
        for spec in config.model_metrics.values():
            self._add_model_series(spec)
        self._files: dict[str, IO[str]] = {}

    def _add_model_series(self, spec: MetricSpec) -> _Series:
        # "Dimension Hostname is automatically added for model metrics" (metrics.yaml)
        labels = spec.dimensions + (() if "Hostname" in spec.dimensions else ("Hostname",))
        series = self._series[spec.name] = _Series(spec, labels)
        return series

    # -- where a sample goes --

    def _log(self, file: str, text: str) -> None:
        f = self._files.get(file)
        if f is None:
            try:
                self.log_dir.mkdir(parents=True, exist_ok=True)
                f = self._files[file] = open(self.log_dir / file, "a", encoding="utf-8")  # noqa: SIM115
            except OSError as e:
                logger.error("cannot open metrics log %s: %s", file, e)
                return
        now = datetime.now()
        stamp = now.strftime("%Y-%m-%dT%H:%M:%S") + f",{now.microsecond // 1000:03d}"
        f.write(f"{stamp} - {text}\n")
        f.flush()

    def _emit(
        self,
        series: _Series,
        value: float,
        dims: dict[str, str],
        *,
        model: bool,
        request_id: str | None = None,
        timestamp: int | None = None,
    ) -> None:
        s = series.spec
        to_prometheus = self.mode == "prometheus"
        if to_prometheus:
            series.update(tuple(dims.get(n, "") for n in series.labels), value)
            return
        if self.mode == "legacy" and s.name in _LEGACY:
            return  # TSMetrics.observe counts these for /metrics
        shown = ",".join(f"{n}:{dims.get(n, '')}" for n in s.dimensions
                         if n.lower() != "hostname")  # fmt: skip
        tail = f"#hostname:{self.hostname}"
        if request_id:
            tail += f",requestID:{request_id}"
        tail += f",timestamp:{timestamp or int(time.time())}"
        line = f"{s.name}.{s.unit}:{_num(value)}|#{shown}|{tail}"
        self._log("model_metrics.log" if model else "ts_metrics.log", line)

    def _frontend(self, name: str, value: float, dims: dict[str, str]) -> None:
        series = self._series.get(name)
        if series is not None and name in self.config.ts_metrics:
            full = {"hostname": self.hostname, "Hostname": self.hostname, "Level": "Host", **dims}
            self._emit(series, value, full, model=False)

    # -- the frontend's hooks --

    def observe(self, model: str, version: str, latency_s: float, queue_s: float) -> None:
        super().observe(model, version, latency_s, queue_s)
        queue_s = max(queue_s, 0.0)
        dims = {"model_name": model, "model_version": version, "ModelName": model}
        self._frontend("ts_inference_requests_total", 1, dims)
        self._frontend("ts_inference_latency_microseconds", latency_s * 1e6, dims)
        self._frontend("ts_queue_latency_microseconds", queue_s * 1e6, dims)
        self._frontend("QueueTime", queue_s * 1e3, dims)
        self._frontend("WorkerThreadTime", max(latency_s - queue_s, 0.0) * 1e3, dims)

    def request_status(self, code: int) -> None:
        if 200 <= code < 300:
            self._frontend("Requests2XX", 1, {})
        elif 400 <= code < 500:
            self._frontend("Requests4XX", 1, {})
        elif code >= 500:
            self._frontend("Requests5XX", 1, {})

    def backend_metrics(self, lines: tuple[str, ...]) -> None:
        """Handler metrics (ts.metrics log lines from a worker): kept where metrics.yaml
        declares them (or any, with model_metrics_auto_detect)."""
        for raw in lines:
            m = parse_metric_line(raw)
            if m is None:
                continue
            series = self._series.get(m.name)
            if series is None or m.name not in self._model_names:
                if series is not None or not self.auto_detect:
                    continue  # a frontend metric's name, or undeclared: dropped
                mtype = m.type if m.type in ("counter", "gauge", "histogram") else "gauge"
                dims = tuple(n for n in m.dimensions if n != "Hostname")
                spec = MetricSpec(m.name, mtype, m.unit, dims)
                self._model_names.add(m.name)
                series = self._add_model_series(spec)
            dims = {**m.dimensions, "Hostname": m.hostname}
            self._emit(series, m.value, dims, model=True, request_id=m.request_id,
                       timestamp=m.timestamp)  # fmt: skip

    def render(self) -> str:
        if self.mode == "legacy":
            return super().render()
        if self.mode == "log":
            return ""
        lines: list[str] = []
        for series in self._series.values():
            lines += series.render()
        return "\n".join(lines) + "\n" if lines else ""

    def close(self) -> None:
        for f in self._files.values():
            f.close()
        self._files.clear()


def metrics_for(cfg: TSConfig) -> TSMetrics:
    """The frontend's metrics for a config.properties: TSMetrics unless metrics_mode is set."""
    mode = (cfg.extra.get("metrics_mode") or "").replace(" ", "").lower()
    if not mode:
        return TSMetrics()
    if mode not in MODES:
        # as TorchServe's ConfigManager.getMetricsMode: an unknown mode is "log", with an error
        logger.error("metrics_mode %r is not supported; using log", mode)
        mode = "log"
    config = load_metrics_config(cfg.extra.get("metrics_config") or None)
    auto = (cfg.extra.get("model_metrics_auto_detect") or "").strip().lower() == "true"
    log_dir = Path(os.environ.get("METRICS_LOCATION") or "logs").absolute()
    return ConfiguredMetrics(config, mode, auto_detect=auto, log_dir=log_dir)
