"""Custom metrics of python models (`pb_utils.MetricFamily`), kept by the server.

Triton's python backend lets model.py register counters, gauges and histograms that appear on
the metrics endpoint next to nv_inference_*. Instance processes send the operations here
(repository/python_stub.py batches them; backends/python_backend.py applies them in order),
and `metric.value()` asks this registry, so a value is always what the endpoint shows.

Why not prometheus_client: its counters are exposed as `<name>_total`, while Triton (and the
dashboards written against it) expose a custom counter under the name the model gave; the
Triton exposition in entrypoints/kserve/metrics.py is written by hand for the same reason.

Triton's rules, kept here: one family per name in the whole server; asking again for a name
with the same kind returns the existing family (the first description stays), with another
kind fails ("Family name already exists with different type"). A series is one label set of a
family, shared by every Metric (of any model or instance) that asked for those labels and
reference-counted: it disappears when the last holder lets it go -- its MetricFamily object
is deleted, or its instance process ends (model unload). Families themselves stay
registered, as in Triton (its registry never removes one), so a reload finds them again.

Names of the server's own families (nv_inference_*): Triton has no reserved-name check --
custom and built-in families share one prometheus-cpp registry -- so it is the same rule: a
custom family under a built-in name of another kind fails ("Family name already exists with
different type"); one of the same kind *is* the built-in family. modelport does the same: the
metrics endpoint shows such series inside the built-in family (one HELP / TYPE block, the
built-in description), and a series with exactly the built-in labels (model, version) is
added to the built-in number, as Triton's shared counter would be. What differs: value() of
such a series returns only what the model added, where Triton's returns the shared total.
"""

from __future__ import annotations

import bisect
import math
import re
import threading
from dataclasses import dataclass, field

COUNTER, GAUGE, HISTOGRAM = 0, 1, 2  # pb_utils.MetricFamily.COUNTER / GAUGE / HISTOGRAM
KIND_NAMES = {COUNTER: "counter", GAUGE: "gauge", HISTOGRAM: "histogram"}

# the families entrypoints/kserve/metrics.py writes (Triton's names), by kind
BUILTIN_FAMILIES = {
    "nv_inference_request_success": COUNTER,
    "nv_inference_request_failure": COUNTER,
    "nv_inference_count": COUNTER,
    "nv_inference_exec_count": COUNTER,
    "nv_inference_request_duration_us": COUNTER,
    "nv_inference_queue_duration_us": COUNTER,
    "nv_inference_compute_input_duration_us": COUNTER,
    "nv_inference_compute_infer_duration_us": COUNTER,
    "nv_inference_compute_output_duration_us": COUNTER,
    "nv_inference_pending_request_count": GAUGE,
}

_METRIC_NAME = re.compile(r"^[a-zA-Z_:][a-zA-Z0-9_:]*$")
_LABEL_NAME = re.compile(r"^[a-zA-Z_][a-zA-Z0-9_]*$")

LabelKey = tuple[tuple[str, str], ...]


class CustomMetricError(Exception):
    """An operation the registry refuses; the message is prometheus-cpp's / Triton's."""


def check_metric_name(name: str) -> None:
    if not _METRIC_NAME.match(name) or name.startswith("__"):
        raise CustomMetricError("Invalid metric name")


def label_key(labels: dict[str, str]) -> LabelKey:
    """Labels as a hashable, sorted key (Triton keeps them in a std::map: sorted by name)."""
    for k, v in labels.items():
        if not isinstance(k, str) or not _LABEL_NAME.match(k) or k.startswith("__"):
            raise CustomMetricError("Invalid label name")
        if not isinstance(v, str):
            raise CustomMetricError(f"label '{k}': attempt to access JSON non-string as string")
    return tuple(sorted(labels.items()))


def check_buckets(buckets: list[float]) -> tuple[float, ...]:
    b = tuple(float(x) for x in buckets)
    if any(x >= y for x, y in zip(b, b[1:])):
        raise CustomMetricError("Bucket Boundaries must be strictly sorted")
    return b


def fmt(value: float) -> str:
    """A number as prometheus-cpp writes it (16 significant digits, +Inf / -Inf / Nan)."""
    if math.isnan(value):
        return "Nan"
    if math.isinf(value):
        return "+Inf" if value > 0 else "-Inf"
    return format(value, ".16g")


@dataclass
class _Series:
    refs: int = 0
    value: float = 0.0
    buckets: tuple[float, ...] = ()
    counts: list[int] = field(default_factory=list)  # per bucket, +Inf last (not cumulative)
    total: int = 0


@dataclass
class _Family:
    name: str
    description: str
    kind: int
    series: dict[LabelKey, _Series] = field(default_factory=dict)


class CustomMetrics:
    """The server's custom metric families (one per RepositoryManager); thread-safe."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._families: dict[str, _Family] = {}

    def family_new(self, name: str, description: str, kind: int) -> None:
        if kind not in KIND_NAMES:
            raise CustomMetricError("Unsupported kind passed to MetricFamily constructor.")
        check_metric_name(name)
        builtin = BUILTIN_FAMILIES.get(name)
        if builtin is not None and builtin != kind:
            raise CustomMetricError("Family name already exists with different type")
        with self._lock:
            fam = self._families.get(name)
            if fam is None:
                self._families[name] = _Family(name, description, kind)
            elif fam.kind != kind:
                raise CustomMetricError("Family name already exists with different type")

    def metric_new(self, name: str, key: LabelKey, buckets: tuple[float, ...] | None) -> None:
        with self._lock:
            fam = self._families[name]
            s = fam.series.get(key)
            if s is None:
                s = fam.series[key] = _Series()
                if fam.kind == HISTOGRAM:
                    s.buckets = tuple(buckets or ())
                    s.counts = [0] * (len(s.buckets) + 1)
            s.refs += 1

    def metric_release(self, name: str, key: LabelKey, n: int = 1) -> None:
        with self._lock:
            fam = self._families.get(name)
            s = fam.series.get(key) if fam is not None else None
            if s is None:
                return
            s.refs -= n
            if s.refs <= 0:
                del fam.series[key]

    def apply(self, op: str, name: str, key: LabelKey, value: float) -> None:
        """increment / set / observe; the kind checks were made by the caller (pb_utils)."""
        with self._lock:
            fam = self._families.get(name)
            s = fam.series.get(key) if fam is not None else None
            if s is None:
                return
            if op == "increment":
                s.value += value
            elif op == "set":
                s.value = value
            elif op == "observe":
                s.counts[bisect.bisect_left(s.buckets, value)] += 1
                s.value += value
                s.total += 1

    def value(self, name: str, key: LabelKey) -> float:
        with self._lock:
            fam = self._families.get(name)
            s = fam.series.get(key) if fam is not None else None
            if s is None:
                raise CustomMetricError("Could not get metric value. Metric has been invalidated.")
            if fam.kind == HISTOGRAM:
                raise CustomMetricError("TRITONSERVER_METRIC_KIND_HISTOGRAM does not support Value")
            return s.value

    def render(self) -> list[str]:
        """Prometheus text lines, in the layout prometheus-cpp (Triton) writes."""
        out: list[str] = []
        with self._lock:
            for fam in self._families.values():
                if fam.name in BUILTIN_FAMILIES:
                    continue  # written inside the built-in family (`builtin_series`)
                out.append(f"# HELP {fam.name} {_escape_help(fam.description)}")
                out.append(f"# TYPE {fam.name} {KIND_NAMES[fam.kind]}")
                for key, s in fam.series.items():
                    if fam.kind != HISTOGRAM:
                        out.append(f"{fam.name}{_labels(key)} {fmt(s.value)}")
                        continue
                    out.append(f"{fam.name}_count{_labels(key)} {s.total}")
                    out.append(f"{fam.name}_sum{_labels(key)} {fmt(s.value)}")
                    cumulative = 0
                    for bound, n in zip((*s.buckets, math.inf), s.counts):
                        cumulative += n
                        le = _labels(key, ("le", fmt(bound)))
                        out.append(f"{fam.name}_bucket{le} {cumulative}")
        return out


    def builtin_series(self, name: str) -> dict[LabelKey, float]:
        """The custom series of a built-in family (a COUNTER or GAUGE of the same name)."""
        with self._lock:
            fam = self._families.get(name)
            return {} if fam is None else {k: s.value for k, s in fam.series.items()}


def _escape_help(v: str) -> str:
    return v.replace("\\", "\\\\").replace("\n", "\\n")


def _escape_value(v: str) -> str:
    return v.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def series_line(name: str, key: LabelKey, value: float) -> str:
    return f"{name}{_labels(key)} {fmt(value)}"


def _labels(key: LabelKey, extra: tuple[str, str] | None = None) -> str:
    items = list(key) + ([extra] if extra else [])
    if not items:
        return ""
    body = ",".join(f'{k}="{_escape_value(v)}"' for k, v in items)
    return "{" + body + "}"
