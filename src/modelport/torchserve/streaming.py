"""Intermediate (streamed) responses of TorchServe handlers.

TorchServe handlers stream with `ts.handler_utils.utils.send_intermediate_predict_response`,
which encodes a predict-response frame of TorchServe's backend protocol and writes it to
`context.cl_socket`. In a modelport worker that socket is a `StreamSocket`: it decodes the
frame back into per-request responses and forwards them to the server with
`emit_partial`, so handlers written for TorchServe stream unchanged.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

from modelport.torchserve.messages import ItemResponse


@dataclass(frozen=True)
class PartialResponses:
    """Intermediate responses of one batch, keyed by request id."""

    responses: dict[str, ItemResponse]


class _Reader:
    def __init__(self, buf: bytes) -> None:
        self.buf = buf
        self.pos = 0

    def int(self) -> int:
        (v,) = struct.unpack_from("!i", self.buf, self.pos)
        self.pos += 4
        return v

    def bytes(self) -> bytes:
        n = self.int()
        out = self.buf[self.pos : self.pos + n]
        if len(out) != n:
            raise ValueError("truncated predict response frame")
        self.pos += n
        return out


def decode_predict_response(frame: bytes) -> dict[str, ItemResponse]:
    """Decode one frame of ts.protocol.otf_message_handler.create_predict_response."""
    r = _Reader(frame)
    code = r.int()
    r.bytes()  # batch-level message
    out: dict[str, ItemResponse] = {}
    while True:
        n = r.int()
        if n == -1:
            return out
        r.pos -= 4
        req_id = r.bytes().decode()
        content_type = r.bytes().decode() or None
        status = r.int()
        phrase = r.bytes().decode()
        headers = {}
        for _ in range(r.int()):
            key = r.bytes().decode()
            headers[key] = r.bytes().decode()
        body = r.bytes()
        # the backend sends "" for no phrase: that is the standard one here
        out[req_id] = ItemResponse(status or code, body, content_type, headers, phrase or None)


class StreamSocket:
    """Stands in for TorchServe's backend socket (`context.cl_socket`) inside a worker."""

    def sendall(self, frame: bytes) -> None:
        from modelport.serving.process_worker import emit_partial

        emit_partial(PartialResponses(decode_predict_response(bytes(frame))))
