"""Calls and checks shared by the tests that talk to an OpenAI-compatible server over HTTP."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import httpx


@contextlib.contextmanager
def in_process(argv: list[str]) -> Iterator[Any]:
    """The OpenAI server of these `serve` flags in this process (build_app and starlette's
    TestClient, no port or uvicorn), its engine loaded: the client."""
    from starlette.testclient import TestClient

    from modelport.entrypoints.openai.api_server import build_app, make_parser

    app, service, _ = build_app(make_parser().parse_args(argv))
    with TestClient(app) as c:
        c.portal.call(service.start)
        c.portal.call(service.loaded.wait)
        assert service.state.engine is not None, service.state.load_error
        yield c


def post(base: str, path: str, body: dict, timeout: float = 180) -> httpx.Response:
    return httpx.post(f"{base}{path}", json=body, timeout=timeout)


def ok(r: httpx.Response) -> dict:
    assert r.status_code == 200, r.text
    return r.json()


def error(r: httpx.Response, status: int = 400) -> dict:
    """The body's error object, which must have exactly OpenAI's four fields."""
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"}
    return err
