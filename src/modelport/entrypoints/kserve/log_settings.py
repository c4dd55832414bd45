"""Triton's logging extension over the "modelport" loggers (--log-* flags, /v2/logging).

Why a handler of our own: Triton's log_info / log_warning / log_error switch levels on and
off independently (errors only, say, or warnings without info), which one logger level
cannot express. Once engaged (a --log-* flag, or the first change through the API), a
handler on the "modelport" logger gates each record by its level, formats it in Triton's
"default" or "ISO8601" layout, and writes it to stderr or --log-file; the "modelport"
logger stops propagating to the root handlers so nothing is printed twice. Verbose level
> 0 lets DEBUG records through. `release()` (server stop) puts everything back.

Python's logging is per process: two servers in one process share these settings.
"""

from __future__ import annotations

import logging
import os
import sys
import threading
import time
from dataclasses import dataclass, replace
from typing import IO, Any

from modelport.repository.errors import InvalidArgument, Unsupported

ROOT = "modelport"
FORMATS = ("default", "ISO8601")
UINT32_MAX = 2**32 - 1


@dataclass(frozen=True)
class LogConfig:
    file: str = ""
    info: bool = True
    warning: bool = True
    error: bool = True
    verbose: int = 0
    format: str = "default"

    def __post_init__(self) -> None:
        if self.format not in FORMATS:
            raise ValueError(f"invalid argument for log_format, got: {self.format}")
        if not 0 <= self.verbose <= UINT32_MAX:
            raise ValueError(f"log verbose level must be >= 0, got {self.verbose}")


def _letter(levelno: int) -> str:
    if levelno >= logging.ERROR:
        return "E"
    if levelno >= logging.WARNING:
        return "W"
    return "I"  # Triton prints verbose messages as info


class TritonFormatter(logging.Formatter):
    """`I1205 15:42:46.123456 4242 model.py:88] msg` or, ISO8601,
    `2026-12-05T15:42:46Z I 4242 model.py:88] msg` (Triton's two layouts)."""

    def __init__(self, fmt: str) -> None:
        super().__init__()
        self.layout = fmt

    def format(self, record: logging.LogRecord) -> str:
        msg = record.getMessage()
        if record.exc_info:
            msg = f"{msg}\n{self.formatException(record.exc_info)}"
        where = f"{record.filename}:{record.lineno}"
        pid = record.process or os.getpid()
        if self.layout == "ISO8601":
            stamp = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(record.created))
            return f"{stamp} {_letter(record.levelno)} {pid} {where}] {msg}"
        t = time.localtime(record.created)
        usec = int((record.created % 1) * 1_000_000)
        stamp = time.strftime("%m%d %H:%M:%S", t) + f".{usec:06d}"
        return f"{_letter(record.levelno)}{stamp} {pid} {where}] {msg}"


class _Gate(logging.Filter):
    def __init__(self, control: LogControl) -> None:
        super().__init__()
        self.control = control

    def filter(self, record: logging.LogRecord) -> bool:
        c = self.control.config
        if record.levelno >= logging.ERROR:
            return c.error
        if record.levelno >= logging.WARNING:
            return c.warning
        if record.levelno >= logging.INFO:
            return c.info
        return c.verbose > 0


class LogControl:
    """The server's log settings and the handler that applies them."""

    def __init__(self, config: LogConfig | None = None, engage: bool = False) -> None:
        self.config = config or LogConfig()
        self._lock = threading.Lock()
        self._handler: logging.Handler | None = None
        self._stream: IO[str] | None = None
        self._saved: tuple[int, bool] | None = None
        if engage:
            self.engage()

    @property
    def engaged(self) -> bool:
        return self._handler is not None

    def engage(self) -> None:
        with self._lock:
            if self._handler is not None:
                return
            if self.config.file:
                self._stream = open(self.config.file, "a", buffering=1)  # noqa: SIM115
                handler: logging.Handler = logging.StreamHandler(self._stream)
            else:
                handler = logging.StreamHandler(sys.stderr)
            handler.addFilter(_Gate(self))
            handler.setFormatter(TritonFormatter(self.config.format))
            logger = logging.getLogger(ROOT)
            self._saved = (logger.level, logger.propagate)
            logger.addHandler(handler)
            logger.propagate = False
            self._handler = handler
            self._apply_level()

    def release(self) -> None:
        with self._lock:
            if self._handler is None:
                return
            logger = logging.getLogger(ROOT)
            logger.removeHandler(self._handler)
            if self._saved is not None:
                logger.setLevel(self._saved[0])
                logger.propagate = self._saved[1]
            self._handler = None
            if self._stream is not None:
                self._stream.close()
                self._stream = None

    def _apply_level(self) -> None:
        logging.getLogger(ROOT).setLevel(logging.DEBUG if self.config.verbose > 0 else logging.INFO)
        if self._handler is not None:
            self._handler.setFormatter(TritonFormatter(self.config.format))

    def settings(self) -> dict[str, Any]:
        c = self.config
        return {
            "log_file": c.file,
            "log_info": c.info,
            "log_warning": c.warning,
            "log_error": c.error,
            "log_verbose_level": c.verbose,
            "log_format": c.format,
        }

    def update(self, values: dict[str, Any]) -> None:
        """Typed values by Triton's setting names (bool, int, str); all are checked before
        any applies. Unknown names are ignored, as Triton does."""
        if "log_file" in values:
            raise Unsupported("log file location can not be updated through network protocol")
        changes: dict[str, Any] = {}
        for name, attr in (
            ("log_info", "info"),
            ("log_warning", "warning"),
            ("log_error", "error"),
        ):
            if name in values:
                v = values[name]
                if not isinstance(v, bool):
                    raise InvalidArgument(f"expect boolean for '{name}'")
                changes[attr] = v
        if "log_verbose_level" in values:
            v = values["log_verbose_level"]
            if isinstance(v, bool) or not isinstance(v, int) or not 0 <= v <= UINT32_MAX:
                raise InvalidArgument("expect int32 for 'log_verbose_level'")
            changes["verbose"] = v
        if "log_format" in values:
            v = values["log_format"]
            if not isinstance(v, str):
                raise InvalidArgument("expect string for 'log_format'")
            if v not in FORMATS:
                raise InvalidArgument(f"invalid argument for log_format, got: {v}")
            changes["format"] = v
        if not changes:
            return
        self.config = replace(self.config, **changes)
        if not self.engaged:
            self.engage()
        with self._lock:
            self._apply_level()


__all__ = ["LogConfig", "LogControl", "TritonFormatter"]
