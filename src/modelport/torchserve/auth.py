"""TorchServe-style token authorization: a key file with management, inference and API keys.

Why keep TorchServe's scheme rather than invent one: clients and scripts already read
`key_file.json` and send `Authorization: Bearer <key>`. The management and inference keys
expire (default 60 minutes) and are renewed with the API key through `/token?type=...`.
"""

from __future__ import annotations

import json
import os
import secrets
import time
from datetime import datetime, timezone
from pathlib import Path

from modelport.torchserve.errors import TSError

KINDS = ("management", "inference")


def _auth_error() -> TSError:
    return TSError(
        400,
        "InvalidKeyException",
        "Token Authorization failed. Token either incorrect, expired, or not provided correctly",
    )


class TokenAuth:
    """Holds the current keys and writes them to `key_file` (mode 0600)."""

    def __init__(self, key_file: Path, expiration_min: float = 60.0) -> None:
        self.key_file = Path(key_file)
        self.expiration_s = expiration_min * 60.0
        self._keys: dict[str, str] = {}
        self._expires: dict[str, float] = {}
        self.api_key = secrets.token_urlsafe(6)
        for kind in KINDS:
            self._new_key(kind)
        self._write()

    def _new_key(self, kind: str) -> None:
        self._keys[kind] = secrets.token_urlsafe(6)
        self._expires[kind] = time.time() + self.expiration_s

    def key(self, kind: str) -> str:
        return self._keys[kind]

    def _write(self) -> None:
        def stamp(t: float) -> str:
            return datetime.fromtimestamp(t, timezone.utc).isoformat().replace("+00:00", "Z")

        doc = {
            kind: {"key": self._keys[kind], "expiration time": stamp(self._expires[kind])}
            for kind in KINDS
        }
        doc["API"] = {"key": self.api_key}
        self.key_file.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.key_file, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            json.dump(doc, f, indent=2)

    @staticmethod
    def _bearer(header: str | None) -> str | None:
        if not header:
            return None
        scheme, _, token = header.partition(" ")
        return token.strip() if scheme.lower() == "bearer" and token.strip() else None

    def check(self, kind: str, authorization: str | None) -> None:
        """Raise InvalidKeyException unless the header carries the valid `kind` key."""
        token = self._bearer(authorization)
        if (
            token is None
            or not secrets.compare_digest(token, self._keys[kind])
            or time.time() > self._expires[kind]
        ):
            raise _auth_error()

    def regenerate(self, kind: str, authorization: str | None) -> str:
        """The /token API: needs the API key; replaces one key and rewrites the key file.

        As TorchServe's TokenAuthorizationHandler, every failure here (a wrong or missing API
        key, a `type` other than management or inference) is the same InvalidKeyException,
        worded "Authentication" where the other APIs say "Authorization".
        """
        token = self._bearer(authorization)
        if (
            token is None
            or not secrets.compare_digest(token, self.api_key)
            or kind not in KINDS
        ):
            raise TSError(
                400,
                "InvalidKeyException",
                "Token Authentication failed. "
                "Token either incorrect, expired, or not provided correctly",
            )
        self._new_key(kind)
        self._write()
        return self._keys[kind]

    def remove_key_file(self) -> None:
        self.key_file.unlink(missing_ok=True)
