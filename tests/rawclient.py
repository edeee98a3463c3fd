"""A raw-socket HTTP/1.1 client for tests that need control httpx does not give.

Tests of backpressure need a client that stops reading (with a small receive
buffer, so the gateway's writes block soon); chaos tests need a client that
goes away by FIN or by RST at a chosen moment. h11 does the HTTP framing.
"""

from __future__ import annotations

import json
import socket
import struct
from typing import Any
from urllib.parse import urlsplit

import h11
import trio


class RawStream:
    """One request on its own connection; read the response body at the test's pace.

    Every stream opened is remembered in :attr:`opened` so the test fixture
    can close the ones a failing test left open: a client that stays
    connected without reading would otherwise pin the gateway's shielded
    send, and the test's nursery, forever.
    """

    opened: list[RawStream] = []

    def __init__(self, sock_stream: trio.SocketStream) -> None:
        self.stream = sock_stream
        self.conn = h11.Connection(h11.CLIENT)
        self.status: int | None = None
        self.headers: dict[str, str] = {}
        self.body = bytearray()
        self.ended = False

    @classmethod
    async def open(
        cls,
        url: str,
        body: dict[str, Any],
        *,
        headers: dict[str, str] | None = None,
        rcvbuf: int | None = None,
        path: str = "/v1/chat/completions",
    ) -> RawStream:
        parts = urlsplit(url)
        sock = trio.socket.socket(trio.socket.AF_INET, trio.socket.SOCK_STREAM)
        if rcvbuf is not None:
            # Set before connect so the window is small from the handshake on.
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
        await sock.connect((parts.hostname, parts.port))
        raw = cls(trio.SocketStream(sock))
        cls.opened.append(raw)
        payload = json.dumps(body).encode()
        request_headers = [
            ("host", f"{parts.hostname}:{parts.port}"),
            ("content-type", "application/json"),
            ("content-length", str(len(payload))),
            ("connection", "close"),
            *((headers or {}).items()),
        ]
        data = raw.conn.send(h11.Request(method="POST", target=path, headers=request_headers))
        data += raw.conn.send(h11.Data(data=payload)) + raw.conn.send(h11.EndOfMessage())
        await raw.stream.send_all(data)
        return raw

    async def read_head(self) -> None:
        while self.status is None:
            await self._pump()

    async def read_some(self) -> bytes:
        """Read until at least one more body byte arrived (or the end)."""
        before = len(self.body)
        while len(self.body) == before and not self.ended:
            await self._pump()
        return bytes(self.body[before:])

    async def read_until(self, marker: bytes) -> None:
        while marker not in self.body and not self.ended:
            await self._pump()

    async def read_all(self) -> bytes:
        while not self.ended:
            await self._pump()
        return bytes(self.body)

    async def _pump(self) -> None:
        while True:
            event = self.conn.next_event()
            if event is h11.NEED_DATA:
                data = await self.stream.receive_some(65536)
                self.conn.receive_data(data)
                if not data:
                    self.ended = True
                    return
                continue
            if isinstance(event, h11.Response):
                self.status = event.status_code
                self.headers = {k.decode(): v.decode() for k, v in event.headers}
                return
            if isinstance(event, h11.Data):
                self.body += event.data
                return
            if isinstance(event, (h11.EndOfMessage, h11.ConnectionClosed)):
                self.ended = True
                return

    async def close_fin(self) -> None:
        await self.stream.aclose()

    async def close_rst(self) -> None:
        # SO_LINGER with a zero timeout turns close() into an RST.
        self.stream.socket.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        await self.stream.aclose()
