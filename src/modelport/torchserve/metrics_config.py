"""TorchServe's metrics configuration (metrics.yaml) and the metric lines its backend logs.

metrics.yaml declares `ts_metrics` (the frontend's) and `model_metrics` (the handlers'), each
by type (counter / gauge / histogram) with a unit and dimension names; only declared metrics
are emitted, unless `model_metrics_auto_detect=true` lets undeclared handler metrics through.
A handler's metric reaches the frontend as a log line of ts.metrics (CachingMetric):
`[METRICS]Name.Unit:value|#Dim:val,Dim:val|#type:COUNTER|#hostname:host,timestamp[,request]`.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path

TYPES = ("counter", "gauge", "histogram")


@dataclass(frozen=True)
class MetricSpec:
    name: str
    type: str  # counter | gauge | histogram
    unit: str
    dimensions: tuple[str, ...]

    def __post_init__(self) -> None:
        if self.type not in TYPES:
            raise ValueError(f"metric {self.name}: type {self.type!r} is not one of {TYPES}")


@dataclass(frozen=True)
class MetricsConfig:
    path: str
    ts_metrics: dict[str, MetricSpec]
    model_metrics: dict[str, MetricSpec]


def default_metrics_yaml() -> str:
    """The metrics.yaml TorchServe ships (ts/configs/metrics.yaml), its default."""
    import ts

    return os.path.join(os.path.dirname(ts.__file__), "configs", "metrics.yaml")


def _specs(section: object, where: str) -> dict[str, MetricSpec]:
    if section is None:
        return {}
    if not isinstance(section, dict):
        raise ValueError(f"metrics config: {where} must be a mapping of metric types")
    out = {}
    for mtype, entries in section.items():
        for entry in entries or []:
            if not isinstance(entry, dict) or "name" not in entry:
                raise ValueError(f"metrics config: {where}.{mtype} entries need a name")
            dims = entry.get("dimensions") or []
            out[str(entry["name"])] = MetricSpec(
                str(entry["name"]),
                str(mtype).lower(),
                str(entry.get("unit", "")),
                tuple(str(d) for d in dims),
            )
    return out


def load_metrics_config(path: str | Path | None = None) -> MetricsConfig:
    import yaml

    path = str(path or default_metrics_yaml())
    try:
        doc = yaml.safe_load(Path(path).read_text()) or {}
    except (OSError, yaml.YAMLError) as e:
        raise ValueError(f"cannot read metrics config {path}: {e}") from e
    if not isinstance(doc, dict):
        raise ValueError(f"metrics config {path} must be a YAML mapping")
    return MetricsConfig(
        path,
        _specs(doc.get("ts_metrics"), "ts_metrics"),
        _specs(doc.get("model_metrics"), "model_metrics"),
    )


@dataclass(frozen=True)
class MetricLine:
    """One metric a handler logged (ts.metrics.caching_metric.CachingMetric.emit_metrics)."""

    name: str
    unit: str
    value: float
    dimensions: dict[str, str]
    type: str
    hostname: str
    timestamp: int
    request_id: str | None


_LINE = re.compile(
    r"\[METRICS\](?P<name>[^.|]+)\.(?P<unit>[^:|]*):(?P<value>[^|]+)\|#(?P<dims>[^|]*)"
    r"\|#type:(?P<type>\w+)\|#hostname:(?P<host>[^,]*),(?P<ts>\d+)(?:,(?P<req>.*))?$"
)


def parse_metric_line(line: str) -> MetricLine | None:
    m = _LINE.search(line.strip())
    if m is None:
        return None
    try:
        value = float(m["value"])
    except ValueError:
        return None
    dims = dict(d.split(":", 1) for d in m["dims"].split(",") if ":" in d)
    return MetricLine(
        m["name"],
        m["unit"],
        value,
        dims,
        m["type"].lower(),
        m["host"],
        int(m["ts"]),
        m["req"] or None,
    )
