"""Errors carrying Triton's status codes so every protocol can render them in its own shape.

Why our own codes: one error raised deep in a backend must become HTTP 400/404/503 with
`{"error": msg}` on the REST side and the matching gRPC status on the gRPC side; the
mapping lives in the entrypoints, the code travels with the error.
"""

from __future__ import annotations

import enum


class Status(enum.Enum):
    INVALID_ARG = "INVALID_ARG"
    NOT_FOUND = "NOT_FOUND"
    UNAVAILABLE = "UNAVAILABLE"
    UNSUPPORTED = "UNSUPPORTED"
    ALREADY_EXISTS = "ALREADY_EXISTS"
    INTERNAL = "INTERNAL"


class ServingError(Exception):
    """An error with a Triton status code; str(e) is the message clients see."""

    status: Status = Status.INTERNAL

    def __init__(self, message: str, status: Status | None = None) -> None:
        super().__init__(message)
        if status is not None:
            self.status = status

    @property
    def message(self) -> str:
        return str(self)


class InvalidArgument(ServingError):
    status = Status.INVALID_ARG


class NotFound(ServingError):
    status = Status.NOT_FOUND


class Unavailable(ServingError):
    status = Status.UNAVAILABLE


class Unsupported(ServingError):
    status = Status.UNSUPPORTED


class ModelConfigError(ServingError):
    """A config.pbtxt (or model directory) that cannot be loaded; the model stays unavailable."""

    status = Status.INVALID_ARG


def unknown_model(name: str, version: int | None = None) -> NotFound:
    if version is None or version < 0:
        return NotFound(f"Request for unknown model: '{name}' is not found")
    return NotFound(f"Request for unknown model: '{name}' version {version} is not found")


def not_ready(name: str, version: int | None = None) -> Unavailable:
    if version is None or version < 0:
        return Unavailable(f"Request for unknown model: '{name}' has no available versions")
    return Unavailable(
        f"Request for unknown model: '{name}' version {version} is not at ready state"
    )


def needs_streaming(name: str) -> Unsupported:
    """A unary infer on a decoupled model (or an ensemble decoupled through a step)."""
    return Unsupported(
        f"model '{name}' uses the decoupled transaction policy: use streaming "
        "(gRPC ModelStreamInfer or generate_stream)"
    )
