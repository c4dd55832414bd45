"""Errors in TorchServe's JSON shape: {"code": 404, "type": "ModelNotFoundException", ...}.

Raised anywhere below the HTTP edge and turned into a response there, so the registry and
archive code never import the web framework.
"""

from __future__ import annotations


class TSError(Exception):
    """An error with TorchServe's status code and exception type name."""

    def __init__(self, code: int, type_: str, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.type = type_
        self.message = message

    def to_json(self) -> dict:
        return {"code": self.code, "type": self.type, "message": self.message}


def bad_request(message: str) -> TSError:
    return TSError(400, "BadRequestException", message)


def model_not_found(message: str) -> TSError:
    return TSError(404, "ModelNotFoundException", message)


def version_not_found(message: str) -> TSError:
    return TSError(404, "ModelVersionNotFoundException", message)


def conflict(message: str) -> TSError:
    return TSError(409, "ConflictStatusException", message)


def invalid_model(message: str) -> TSError:
    return TSError(400, "InvalidModelException", message)


def service_unavailable(message: str) -> TSError:
    return TSError(503, "ServiceUnavailableException", message)


def internal(message: str) -> TSError:
    return TSError(500, "InternalServerException", message)
