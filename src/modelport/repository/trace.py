"""Triton's request tracing: settings (global and per model), sampling, and the trace file.

Why settings are layered: Triton keeps one global setting (from --trace-config, changed
through /v2/trace/setting) and, per model, only the fields a user set for that model; the
other fields follow the global ones, also when those change later. Clearing a model field
(null) falls back to the global value; clearing a global field falls back to the start-up
(--trace-config) value. Each effective setting has its own sampling counter and remaining
count, reset whenever its values change, as Triton recreates its TraceSetting objects.

Timestamps are `time.perf_counter_ns()` values (CLOCK_MONOTONIC, like Triton's
steady_clock), taken at the same points the statistics use; see ModelVersion.infer.

Output (Triton's JSON trace format): a JSON array of objects, per trace first
`{"id", "model_name", "model_version"[, "request_id"][, "parent_id"]}`, then one
`{"id", "timestamps": [{"name", "ns"}]}` per timestamp and, at level TENSORS, one
`{"id", "activity", "tensor": {"name", "data", "shape", "dtype"}}` per tensor. With
log_frequency 0 each trace is appended to trace_file as it completes (the file stays valid
JSON); with log_frequency N, every N traces go to `trace_file.<index>`, and what is left
goes there when the count runs out, the setting changes, or the server stops.
"""

from __future__ import annotations

import json
import logging
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from modelport.repository.errors import InvalidArgument, Unsupported

logger = logging.getLogger("modelport.trace")

TIMESTAMPS = 1
TENSORS = 2
LEVEL_NAMES = {"TIMESTAMPS": TIMESTAMPS, "TENSORS": TENSORS}
UINT32_MAX = 2**32 - 1
INT32_MAX = 2**31 - 1
# the settings a model may override; trace_file is the server's (start-up only)
FIELDS = ("trace_level", "trace_rate", "trace_count", "log_frequency")


def level_names(level: int) -> list[str]:
    if not level:
        return ["OFF"]
    return [n for n, bit in LEVEL_NAMES.items() if level & bit]


@dataclass(frozen=True)
class TraceConfig:
    """The start-up trace settings (tritonserver's --trace-config)."""

    level: int = 0  # TIMESTAMPS | TENSORS bits; 0: OFF
    rate: int = 1000  # one of every `rate` requests is traced
    count: int = -1  # traces left to collect; -1: no limit
    log_frequency: int = 0  # traces per indexed file; 0: one file, appended
    file: str = ""

    def __post_init__(self) -> None:
        if self.level & ~(TIMESTAMPS | TENSORS):
            raise ValueError(f"bad trace level bits {self.level}")
        if not 0 <= self.rate <= UINT32_MAX:
            raise ValueError(f"trace rate must be in [0, {UINT32_MAX}], got {self.rate}")
        if not -1 <= self.count <= INT32_MAX:
            raise ValueError(f"trace count must be >= -1, got {self.count}")
        if not 0 <= self.log_frequency <= UINT32_MAX:
            raise ValueError(f"trace log frequency must be >= 0, got {self.log_frequency}")

    def values(self) -> dict[str, int]:
        return {
            "trace_level": self.level,
            "trace_rate": self.rate,
            "trace_count": self.count,
            "log_frequency": self.log_frequency,
        }


def parse_trace_config(items: list[str]) -> TraceConfig:
    """`--trace-config [triton,]<setting>=<value>` as tritonserver spells them: level (may
    repeat: TIMESTAMPS, TENSORS, OFF), rate, count, file, log-frequency (or log_frequency),
    mode (triton only)."""
    kw: dict[str, Any] = {}
    level = 0
    level_given = False
    for raw in items:
        item = raw.strip()
        if item.startswith("triton,"):
            item = item[len("triton,") :]
        elif "," in item.split("=", 1)[0]:
            mode = item.split(",", 1)[0]
            raise ValueError(f"--trace-config {raw!r}: trace mode {mode!r} is not supported")
        key, sep, value = item.partition("=")
        key = key.strip().replace("_", "-")
        value = value.strip()
        if not sep:
            raise ValueError(f"--trace-config {raw!r}: expected <setting>=<value>")
        try:
            if key == "level":
                level_given = True
                up = value.upper()
                if up == "OFF":
                    level = 0
                elif up in LEVEL_NAMES:
                    level |= LEVEL_NAMES[up]
                else:
                    raise ValueError(f"unknown trace level {value!r}")
            elif key == "rate":
                kw["rate"] = int(value)
            elif key == "count":
                kw["count"] = int(value)
            elif key == "log-frequency":
                kw["log_frequency"] = int(value)
            elif key == "file":
                kw["file"] = value
            elif key == "mode":
                if value != "triton":
                    raise ValueError(f"trace mode {value!r} is not supported (only 'triton')")
            else:
                raise ValueError(f"unknown setting {key!r}")
        except ValueError as e:
            raise ValueError(f"--trace-config {raw!r}: {e}") from None
    if level_given:
        kw["level"] = level
    try:
        return TraceConfig(**kw)
    except ValueError as e:
        raise ValueError(f"--trace-config: {e}") from None


def _one_int(name: str, values: list[str], low: int, high: int) -> int:
    if len(values) != 1:
        raise InvalidArgument(f"expect only 1 value for '{name}'")
    text = values[0]
    try:
        v = int(text)
    except (TypeError, ValueError):
        raise InvalidArgument(f"Unable to parse '{name}', got: {text}") from None
    if name == "trace_count" and v < -1:
        raise InvalidArgument(f"Unable to parse '{name}'. Expecting value >= -1, got: {text}")
    if not low <= v <= high:
        raise InvalidArgument(
            f"Unable to parse '{name}', value is out of range [ {low}, {high} ], got: {text}"
        )
    return v


def parse_update(raw: dict[str, list[str] | None]) -> dict[str, int | None]:
    """Protocol values (a list of strings per setting; None or [] clears it) -> typed changes.

    Errors are Triton's: trace_file cannot change over the network, numbers must parse."""
    if "trace_file" in raw:
        raise Unsupported("trace file location can not be updated through network protocol")
    out: dict[str, int | None] = {}
    for name in FIELDS:
        if name not in raw:
            continue
        values = raw[name]
        if not values:
            out[name] = None
            continue
        if name == "trace_level":
            level = 0
            for v in values:
                if v == "OFF":
                    if len(values) != 1:
                        raise InvalidArgument("Expect only one trace level 'OFF' is specified")
                elif v in LEVEL_NAMES:
                    level |= LEVEL_NAMES[v]
                else:
                    raise InvalidArgument(
                        f"Unable to parse 'trace_level', got: {v} (expecting OFF, TIMESTAMPS "
                        "or TENSORS)"
                    )
            out[name] = level
        elif name == "trace_count":
            out[name] = _one_int(name, values, -1, INT32_MAX)
        else:
            out[name] = _one_int(name, values, 0, UINT32_MAX)
    return out


class TraceFile:
    """One trace_file path: the appended main file and the indexed `<path>.<n>` files."""

    def __init__(self, path: str) -> None:
        self.path = Path(path)
        self.index = 0
        self._main_open = False
        self._lock = threading.Lock()

    def append(self, entries: list[dict[str, Any]]) -> None:
        """Add to the main file, keeping it one valid JSON array."""
        if not entries:
            return
        body = ",".join(json.dumps(e) for e in entries)
        with self._lock:
            if not self._main_open:
                self.path.write_text(f"[{body}]")
                self._main_open = True
                return
            with open(self.path, "r+b") as f:
                f.seek(-1, 2)  # over the closing bracket
                f.write(f",{body}]".encode())

    def write_indexed(self, entries: list[dict[str, Any]]) -> None:
        with self._lock:
            target = self.path.with_name(f"{self.path.name}.{self.index}")
            self.index += 1
            target.write_text("[" + ",".join(json.dumps(e) for e in entries) + "]")


def _tensor_text(data: np.ndarray) -> str:
    flat = data.reshape(-1)
    if flat.dtype == object:
        return ",".join(
            x.decode("utf-8", "replace") if isinstance(x, bytes) else str(x) for x in flat
        )
    return ",".join(str(x) for x in flat.tolist())


@dataclass(eq=False)
class Trace:
    """One traced request; entries are written when the request ends (`Tracer.finish`)."""

    id: int
    level: int
    setting: _Setting
    entries: list[dict[str, Any]]
    children: list[Trace] = field(default_factory=list)

    @property
    def timestamps(self) -> bool:
        return bool(self.level & TIMESTAMPS)

    @property
    def tensors(self) -> bool:
        return bool(self.level & TENSORS)

    def stamp(self, name: str, ns: int) -> None:
        if self.level & TIMESTAMPS:
            self.entries.append({"id": self.id, "timestamps": [{"name": name, "ns": int(ns)}]})

    def tensor(self, activity: str, name: str, datatype: str, data: np.ndarray) -> None:
        if self.level & TENSORS:
            self.entries.append(
                {
                    "id": self.id,
                    "activity": activity,
                    "tensor": {
                        "name": name,
                        "data": _tensor_text(np.asarray(data)),
                        "shape": ",".join(str(d) for d in np.shape(data)),
                        "dtype": datatype,
                    },
                }
            )

    def all_entries(self) -> list[dict[str, Any]]:
        out = list(self.entries)
        for c in self.children:
            out.extend(c.all_entries())
        return out


@dataclass(eq=False)
class _Setting:
    """The live state of one effective setting: values, sampling counter, remaining count."""

    level: int
    rate: int
    remaining: int
    log_frequency: int
    file: TraceFile | None
    sample: int = 0
    in_flight: int = 0
    buffer: list[list[dict[str, Any]]] = field(default_factory=list)
    retired: bool = False

    def flush(self) -> None:
        """Write the buffered traces; a file that cannot be written loses them (logged),
        never the request that was traced."""
        if self.buffer and self.file is not None:
            entries = [e for t in self.buffer for e in t]
            try:
                if self.log_frequency:
                    self.file.write_indexed(entries)
                else:
                    self.file.append(entries)
            except OSError as e:
                logger.warning("cannot write traces to %s: %s", self.file.path, e)
        self.buffer.clear()


class Tracer:
    """The server's trace settings and the traces they sample (one per server)."""

    def __init__(self, config: TraceConfig | None = None) -> None:
        self.config = config or TraceConfig()
        self._lock = threading.Lock()
        self._global: dict[str, int] = self.config.values()
        self._models: dict[str, dict[str, int]] = {}  # only the fields set for the model
        self._files: dict[str, TraceFile] = {}
        self._settings: dict[str | None, _Setting] = {}
        self._next_id = 1
        self.active = False  # some setting samples: the fast path skips tracing when not
        self._rebuild(None)

    # -- settings --

    def _file(self) -> TraceFile | None:
        path = self.config.file
        if not path:
            return None
        if path not in self._files:
            self._files[path] = TraceFile(path)
        return self._files[path]

    def _values(self, model: str | None) -> dict[str, int]:
        values = dict(self._global)
        if model is not None:
            values.update(self._models.get(model, {}))
        return values

    def _new_setting(self, model: str | None) -> _Setting:
        v = self._values(model)
        return _Setting(
            level=v["trace_level"],
            rate=v["trace_rate"],
            remaining=v["trace_count"],
            log_frequency=v["log_frequency"],
            file=self._file(),
        )

    def _retire(self, s: _Setting | None) -> None:
        if s is not None:
            s.retired = True
            s.flush()

    def _rebuild(self, model: str | None) -> None:
        """New counters for `model`'s setting, or for every setting after a global change."""
        if model is None:
            self._retire(self._settings.get(None))
            self._settings[None] = self._new_setting(None)
            for name in self._models:
                self._retire(self._settings.get(name))
                self._settings[name] = self._new_setting(name)
        else:
            self._retire(self._settings.pop(model, None))
            if self._models.get(model):
                self._settings[model] = self._new_setting(model)
            else:
                self._models.pop(model, None)
        self.active = any(s.level and s.rate for s in self._settings.values())

    def update(self, model: str | None, changes: dict[str, int | None]) -> None:
        """Apply typed changes (see parse_update): a value sets, None clears."""
        if not changes:
            return
        with self._lock:
            if model is None:
                defaults = self.config.values()
                for k, v in changes.items():
                    self._global[k] = defaults[k] if v is None else v
            else:
                own = self._models.setdefault(model, {})
                for k, v in changes.items():
                    if v is None:
                        own.pop(k, None)
                    else:
                        own[k] = v
            self._rebuild(model)

    def settings(self, model: str | None = None) -> dict[str, Any]:
        """Triton's trace setting response (values as strings, trace_level a list)."""
        with self._lock:
            s = self._settings.get(model) or self._settings[None]
            return {
                "trace_level": level_names(s.level),
                "trace_rate": str(s.rate),
                "trace_count": str(s.remaining),
                "log_frequency": str(s.log_frequency),
                "trace_file": self.config.file,
                "trace_mode": "triton",
            }

    # -- tracing --

    def start(
        self, model: str, version: int, request_id: str, parent: Trace | None
    ) -> Trace | None:
        """A trace for this request if it is sampled (always, under a traced ensemble)."""
        if parent is None and not self.active:
            return None
        with self._lock:
            if parent is not None:
                setting, level = parent.setting, parent.level
            else:
                setting = self._settings.get(model) or self._settings[None]
                if not setting.level or not setting.rate or setting.remaining == 0:
                    return None
                setting.sample += 1
                if setting.sample % setting.rate:
                    return None
                if setting.remaining > 0:
                    setting.remaining -= 1
                setting.in_flight += 1
                level = setting.level
            tid = self._next_id
            self._next_id += 1
        header: dict[str, Any] = {"id": tid, "model_name": model, "model_version": version}
        if request_id:
            header["request_id"] = request_id
        if parent is not None:
            header["parent_id"] = parent.id
        return Trace(tid, level, setting, [header])

    def finish(self, trace: Trace, parent: Trace | None) -> None:
        """The request ended: its entries go to the parent trace or to the file."""
        if parent is not None:
            parent.children.append(trace)
            return
        s = trace.setting
        with self._lock:
            s.in_flight -= 1
            s.buffer.append(trace.all_entries())
            full = s.log_frequency and len(s.buffer) >= s.log_frequency
            if not s.log_frequency or full or s.retired or (s.remaining == 0 and not s.in_flight):
                s.flush()

    def close(self) -> None:
        """Write what is buffered (server stop)."""
        with self._lock:
            for s in self._settings.values():
                s.flush()


__all__ = ["TraceConfig", "Tracer", "Trace", "parse_trace_config", "parse_update"]
