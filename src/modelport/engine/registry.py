"""Engines loaded by other parts of the server (Triton repository `llm` models), by served name.

The OpenAI routes look a request's `model` up here first, so an LLM that a model repository
loads is reachable through /v1 on the same port as its /v2 generate endpoints.
"""

from __future__ import annotations

from typing import Any

_ENGINES: dict[str, Any] = {}


def register(name: str, engine: Any) -> None:
    if name in _ENGINES and _ENGINES[name] is not engine:
        raise ValueError(f"an engine is already served as {name!r}")
    _ENGINES[name] = engine


def unregister(name: str, engine: Any) -> None:
    if _ENGINES.get(name) is engine:
        del _ENGINES[name]


def lookup(name: str | None) -> Any | None:
    return _ENGINES.get(name) if name else None


def engines() -> list[Any]:
    return list(_ENGINES.values())
