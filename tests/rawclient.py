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
        body: dict[str, Any] | None,
        *,
        headers: dict[str, str] | None = None,
        rcvbuf: int | None = None,
        path: str = "/v1/chat/completions",
    ) -> RawStream:
        """POST ``body`` as JSON to ``path``; with ``body=None``, a GET of ``path``."""
        parts = urlsplit(url)
        sock = trio.socket.socket(trio.socket.AF_INET, trio.socket.SOCK_STREAM)
        if rcvbuf is not None:
            # Set before connect so the window is small from the handshake on.
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
        await sock.connect((parts.hostname, parts.port))
        raw = cls(trio.SocketStream(sock))
        cls.opened.append(raw)
        payload = json.dumps(body).encode() if body is not None else b""
        request_headers = [
            ("host", f"{parts.hostname}:{parts.port}"),
            *([("content-type", "application/json")] if body is not None else []),
            ("content-length", str(len(payload))),
            ("connection", "close"),
            *((headers or {}).items()),
        ]
        method = "POST" if body is not None else "GET"
        data = raw.conn.send(h11.Request(method=method, target=path, headers=request_headers))
        if payload:
            data += raw.conn.send(h11.Data(data=payload))
        data += raw.conn.send(h11.EndOfMessage())
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


# --- HTTP/2 (appended) ---------------------------------------------------------------


class H2Response:
    """One HTTP/2 stream's response, as the client received it so far."""

    def __init__(self) -> None:
        self.status: int | None = None
        self.body = bytearray()
        self.ended = False
        self.reset = False


class H2Client:
    """Many requests on one HTTP/2 connection (h2c with prior knowledge), for chaos tests.

    One task runs :meth:`pump` (reads frames, acknowledges data so flow
    control never stalls the server); the test opens streams, resets single
    streams (``RST_STREAM``) or drops the whole connection. Sends go through a
    lock: the pump's window updates and the test's frames share the socket.
    """

    opened: list[H2Client] = []

    def __init__(self, sock_stream: trio.SocketStream, authority: str) -> None:
        import h2.config
        import h2.connection

        self.stream = sock_stream
        self.authority = authority
        self.conn = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True, header_encoding="utf-8"))
        self.responses: dict[int, H2Response] = {}
        self.closed = False
        self.terminated = False
        self._send_lock = trio.Lock()

    @classmethod
    async def connect(cls, url: str) -> H2Client:
        parts = urlsplit(url)
        stream = await trio.open_tcp_stream(parts.hostname or "127.0.0.1", parts.port or 80)
        client = cls(stream, f"{parts.hostname}:{parts.port}")
        cls.opened.append(client)
        client.conn.initiate_connection()
        await client._flush()
        return client

    async def _flush(self) -> None:
        async with self._send_lock:
            data = self.conn.data_to_send()
            if data and not self.closed:
                await self.stream.send_all(data)

    async def post(self, body: dict[str, Any], *, path: str = "/v1/chat/completions", headers: dict[str, str] | None = None) -> int:
        """Open a stream with one POST; return its stream id."""
        payload = json.dumps(body).encode()
        stream_id = self.conn.get_next_available_stream_id()
        request_headers = [
            (":method", "POST"),
            (":scheme", "http"),
            (":authority", self.authority),
            (":path", path),
            ("content-type", "application/json"),
            ("content-length", str(len(payload))),
            *((headers or {}).items()),
        ]
        self.responses[stream_id] = H2Response()
        self.conn.send_headers(stream_id, request_headers)
        self.conn.send_data(stream_id, payload, end_stream=True)
        await self._flush()
        return stream_id

    async def reset_stream(self, stream_id: int) -> None:
        """Cancel one stream (RST_STREAM, CANCEL); the connection stays up."""
        from h2.errors import ErrorCodes

        self.conn.reset_stream(stream_id, error_code=ErrorCodes.CANCEL)
        self.responses[stream_id].reset = True
        await self._flush()

    async def pump(self) -> None:
        """Read and handle frames until the connection ends (run it in a task)."""
        import h2.events

        while not self.closed:
            try:
                data = await self.stream.receive_some(65536)
            except (trio.ClosedResourceError, trio.BrokenResourceError, OSError):
                break
            if not data:
                break
            for event in self.conn.receive_data(data):
                response = self.responses.get(getattr(event, "stream_id", 0) or 0)
                if isinstance(event, h2.events.ResponseReceived) and response is not None:
                    response.status = int(dict(event.headers)[":status"])
                elif isinstance(event, h2.events.DataReceived):
                    if response is not None:
                        response.body += event.data
                    self.conn.acknowledge_received_data(event.flow_controlled_length, event.stream_id)
                elif isinstance(event, h2.events.StreamEnded) and response is not None:
                    response.ended = True
                elif isinstance(event, h2.events.StreamReset) and response is not None:
                    response.reset = True
                elif isinstance(event, h2.events.ConnectionTerminated):
                    self.terminated = True
            try:
                await self._flush()
            except (trio.ClosedResourceError, trio.BrokenResourceError, OSError):
                break
        self.closed = True

    async def close_rst(self) -> None:
        """Drop the connection abruptly: no GOAWAY, a TCP RST."""
        self.closed = True
        if self.stream.socket.fileno() != -1:
            self.stream.socket.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        await self.stream.aclose()


# --- keep-alive connections (appended) ------------------------------------------------


class RawConnection:
    """One HTTP/1.1 connection kept alive across requests, as a pooling client uses it.

    h11 frames each exchange and starts the next cycle, so a test can send a
    request, read its response, and send the next request on the same socket,
    exactly what ``httpx`` and the ``openai`` SDK do with a pooled connection.
    :meth:`send_raw` writes bytes no well-behaved client would (a partial
    head, conflicting framing headers).
    """

    def __init__(self, stream: trio.SocketStream, host: str) -> None:
        self.stream = stream
        self.host = host
        self.conn = h11.Connection(h11.CLIENT)

    @classmethod
    async def open(cls, url: str) -> RawConnection:
        parts = urlsplit(url)
        assert parts.hostname is not None and parts.port is not None
        stream = await trio.open_tcp_stream(parts.hostname, parts.port)
        return cls(stream, f"{parts.hostname}:{parts.port}")

    async def send_request(
        self,
        method: str,
        path: str,
        body: bytes = b"",
        *,
        headers: dict[str, str] | None = None,
        pause_after: int | None = None,
    ) -> None:
        """Send a whole request; with ``pause_after``, only that much of the body at first, the rest 0.3 s later.

        The pause gives the server time to answer from the head alone, before
        the body is in, as it does when it refuses a request early.
        """
        request_headers = [("host", self.host), *((headers or {}).items())]
        if body or method == "POST":
            request_headers.append(("content-length", str(len(body))))
        head = self.conn.send(h11.Request(method=method, target=path, headers=request_headers))
        rest = (self.conn.send(h11.Data(data=body)) if body else b"") + self.conn.send(h11.EndOfMessage())
        data = head + rest
        if pause_after is not None:
            cut = len(head) + pause_after
            await self.stream.send_all(data[:cut])
            await trio.sleep(0.3)
            data = data[cut:]
        await self.stream.send_all(data)

    async def send_raw(self, data: bytes) -> None:
        await self.stream.send_all(data)

    async def read_response(self) -> tuple[int, dict[str, str], bytes]:
        """The next response; afterwards the connection is ready for the next request (if kept alive)."""
        status, headers, body = 0, {}, bytearray()
        while True:
            event = self.conn.next_event()
            if event is h11.NEED_DATA:
                self.conn.receive_data(await self.stream.receive_some(65536))
            elif isinstance(event, h11.Response):
                status = event.status_code
                headers = {k.decode(): v.decode() for k, v in event.headers}
            elif isinstance(event, h11.Data):
                body += event.data
            elif isinstance(event, h11.EndOfMessage):
                if self.conn.our_state is h11.DONE and self.conn.their_state is h11.DONE:
                    self.conn.start_next_cycle()
                return status, headers, bytes(body)
            elif isinstance(event, h11.ConnectionClosed):
                raise ConnectionError("the server closed the connection before a response")

    async def read_until_eof(self) -> bytes:
        """Everything the server sends until it closes the connection."""
        received = bytearray()
        while chunk := await self.stream.receive_some(65536):
            received += chunk
        return bytes(received)

    async def aclose(self) -> None:
        await self.stream.aclose()
