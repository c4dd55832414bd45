"""A handler's own reason phrase on the status line, as TorchServe writes it.

`context.set_response_status(418, "I am a teapot")` makes TorchServe answer
`HTTP/1.1 418 I am a teapot`. ASGI has no field for the reason phrase (servers write the
standard one for the code), so a response names its phrase in an internal header,
REASON_HEADER, and the uvicorn HTTP protocol built here takes that header out and writes the
status line with the phrase. Every server that carries TorchServe's inference routes runs
this protocol (`http_protocol()`); behind any other server the header would go out as is.

How: the protocol wraps the ASGI app it runs, outermost, so whatever middleware sits in
between, it sees the final `http.response.start`; while it passes that message on, a context
variable holds the phrase, and the transport the protocol writes to puts it into the status
line of the one write that message makes (uvicorn writes a response head in one piece).
"""

from __future__ import annotations

import asyncio
import contextvars
import importlib.util
import logging
import re
from typing import Any

logger = logging.getLogger("modelport.torchserve")

REASON_HEADER = "x-modelport-reason-phrase"
_REASON_HEADER_B = REASON_HEADER.encode()
_PHRASE: contextvars.ContextVar[bytes | None] = contextvars.ContextVar("ts_reason", default=None)
# RFC 9112 reason-phrase, ASCII only: Netty (TorchServe) refuses anything else
_VALID = re.compile(r"[\t \x21-\x7e]*")


def reason_header(phrase: str | None) -> dict[str, str]:
    """The header that asks for `phrase` on the status line ({} for None: the standard one).

    A phrase that cannot go on a status line (control characters, non-ASCII) keeps the
    standard one, with a warning: TorchServe fails such a response with a 500.
    """
    if phrase is None:
        return {}
    if not _VALID.fullmatch(phrase):
        logger.warning("reason phrase %r is not printable ASCII: the standard one is sent", phrase)
        return {}
    return {REASON_HEADER: phrase}


class _ReasonApp:
    """The app as the protocol runs it: the phrase header leaves every response here."""

    def __init__(self, app: Any) -> None:
        self.app = app

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        async def send_with_phrase(message: Any) -> None:
            if message["type"] != "http.response.start":
                await send(message)
                return
            headers = list(message.get("headers") or ())
            phrase = next((v for k, v in headers if k.lower() == _REASON_HEADER_B), None)
            if phrase is None:
                await send(message)
                return
            kept = [(k, v) for k, v in headers if k.lower() != _REASON_HEADER_B]
            token = _PHRASE.set(bytes(phrase))
            try:
                await send({**message, "headers": kept})
            finally:
                _PHRASE.reset(token)

        await self.app(scope, receive, send_with_phrase)


class _ReasonTransport:
    """The connection's transport; a head written while a phrase is set gets it."""

    def __init__(self, transport: asyncio.Transport) -> None:
        self._transport = transport

    def write(self, data: bytes) -> None:
        phrase = _PHRASE.get()
        if phrase is not None and data.startswith(b"HTTP/"):
            end = data.find(b"\r\n")
            version, code = data[:end].split(b" ", 2)[:2]
            data = b"%s %s %s%s" % (version, code, phrase, data[end:])
        self._transport.write(data)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._transport, name)


def http_protocol(impl: str = "auto") -> type[asyncio.Protocol]:
    """uvicorn's HTTP/1.1 protocol with handler reason phrases, for `uvicorn.Config(http=...)`:
    `impl` "httptools" or "h11", or "auto" (httptools where installed, as uvicorn picks)."""
    if impl == "auto":
        impl = "httptools" if importlib.util.find_spec("httptools") else "h11"
    if impl == "httptools":
        from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol as base
    else:
        from uvicorn.protocols.http.h11_impl import H11Protocol as base

    class ReasonPhraseProtocol(base):  # type: ignore[misc, valid-type]
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            super().__init__(*args, **kwargs)
            self.app = _ReasonApp(self.app)

        def connection_made(self, transport: asyncio.BaseTransport) -> None:
            super().connection_made(_ReasonTransport(transport))  # type: ignore[arg-type]

    return ReasonPhraseProtocol
