"""Calls and checks shared by the tests that talk to an OpenAI-compatible server over HTTP."""

from __future__ import annotations

import httpx


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
