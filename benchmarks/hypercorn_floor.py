"""hypercorn-floor: Sluice's exact shape as a raw ASGI callable on hypercorn, with no HTTP client library.

``python -m benchmarks.hypercorn_floor PORT UPSTREAM_PORT``

The reference every issue-17 target is measured against, in the same run:
what a relay of Sluice's shape costs on the server Sluice is fixed to
(hypercorn, trio worker, Sluice's hypercorn settings) when nothing else is
in the way. Per request:

* the client's body is read from ASGI ``receive`` and sent upstream as a
  ``POST`` on the client's path, over a raw trio socket taken from a small
  pool of idle upstream connections (LIFO; opened when none is idle);
* the response head is read by hand (status, ``content-length`` or
  ``transfer-encoding: chunked``, ``connection: close``) and the client gets
  the same status and ``content-type``;
* a producer reads the upstream socket, decodes the chunked framing with
  :class:`ChunkDecoder` (``bytes.find`` and slices, no validation beyond
  what framing needs) and puts what one read gave into a bounded trio
  memory channel; a consumer drains the channel (``receive_nowait`` until it
  would block) into one ASGI body send; a watcher waits for
  ``http.disconnect`` and cancels the nursery, which closes the upstream
  socket;
* the body bytes pass through untouched; non-stream answers are relayed the
  same way.

Invariants: an upstream connection goes back to the pool only after a
clean end of its body with no bytes left over and no ``connection: close``;
any other end (client gone, upstream error, cancellation) closes it.

No framing, figures, validation, routing, limits, retries, metrics or logs:
what Sluice spends above this is Sluice's, Quart's and httpx2's (see
stack-floor and quart-floor for the two library layers). The garbage
collector is set as Sluice sets it.
"""

from __future__ import annotations

import sys
from collections.abc import Awaitable, Callable
from typing import Any

import trio
from hypercorn.config import Config
from hypercorn.trio import serve

from sluice.server import LISTEN_BACKLOG, freeze_startup_heap

CAPACITY = 16
#: idle upstream connections kept; more are closed when they come back
POOL_SIZE = 1024
MAX_HEAD = 64 * 1024


class UpstreamError(Exception):
    """The upstream's answer is not HTTP/1.1 as this relay reads it."""


class ChunkDecoder:
    """Chunked transfer-coding to payload, minimal (sans-IO): one ``find`` per size line, one slice per chunk.

    Reads what the upstreams here send: size lines (extensions ignored), no
    trailers. A trailer line is left in :attr:`unused`, so such a connection
    is closed rather than pooled; the framing is not otherwise checked.
    """

    __slots__ = ("_buffer", "_left", "_crlf", "finished", "unused")

    def __init__(self) -> None:
        self._buffer = b""  # a partial size line (or last-chunk line) from the previous read
        self._left = 0  # payload bytes left of the current chunk
        self._crlf = 0  # bytes left of the CRLF after it
        self.finished = False
        self.unused = b""

    def feed(self, data: bytes) -> bytes:
        """The payload the raw bytes ``data`` complete."""
        if self.finished:
            self.unused += data
            return b""
        buffer = self._buffer + data if self._buffer else data
        self._buffer = b""
        parts = []
        position, end = 0, len(buffer)
        while position < end:
            if self._left:
                take = min(self._left, end - position)
                parts.append(buffer[position : position + take])
                position += take
                self._left -= take
                if not self._left:
                    self._crlf = 2
            elif self._crlf:
                skip = min(self._crlf, end - position)
                position += skip
                self._crlf -= skip
            else:
                line_end = buffer.find(b"\r\n", position)
                if line_end < 0:
                    self._buffer = buffer[position:]
                    break
                size = int(buffer[position:line_end].split(b";", 1)[0], 16)
                if size == 0:
                    blank_end = buffer.find(b"\r\n", line_end + 2)
                    if blank_end < 0:
                        self._buffer = buffer[position:]
                        break
                    self.finished = True
                    self.unused = buffer[blank_end + 2 :]
                    break
                position = line_end + 2
                self._left = size
        if not parts:
            return b""
        return parts[0] if len(parts) == 1 else b"".join(parts)


async def read_head(stream: trio.SocketStream) -> tuple[int, dict[bytes, bytes], bytes]:
    """The response's status and headers (names lower-cased), and the body bytes read past the head."""
    data = b""
    while (end := data.find(b"\r\n\r\n")) < 0:
        more = await stream.receive_some(65536)
        if not more:
            raise UpstreamError("the upstream closed before a response head")
        data += more
        if len(data) > MAX_HEAD:
            raise UpstreamError("response head too long")
    lines = data[:end].split(b"\r\n")
    status = int(lines[0].split(b" ", 2)[1])
    headers = {}
    for line in lines[1:]:
        name, _, value = line.partition(b":")
        headers[name.strip().lower()] = value.strip()
    return status, headers, data[end + 4 :]


class Pool:
    """Idle upstream connections, last in first out."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.idle: list[trio.SocketStream] = []

    async def take(self) -> tuple[trio.SocketStream, bool]:
        """A connection, and whether it was idle in the pool (it may have been closed by the upstream since)."""
        if self.idle:
            return self.idle.pop(), True
        return await trio.open_tcp_stream("127.0.0.1", self.port), False

    def give_back(self, stream: trio.SocketStream) -> None:
        if len(self.idle) < POOL_SIZE:
            self.idle.append(stream)
        else:
            stream.socket.close()


async def lifespan(receive: Any, send: Any) -> None:
    """Answer the ASGI lifespan protocol until shutdown (nothing to start or stop)."""
    while True:
        message = await receive()
        if message["type"] == "lifespan.startup":
            await send({"type": "lifespan.startup.complete"})
        elif message["type"] == "lifespan.shutdown":
            await send({"type": "lifespan.shutdown.complete"})
            return


async def pump(produce: Callable[[trio.MemorySendChannel[bytes]], Awaitable[None]], receive: Any, send: Any) -> None:
    """The shape every floor shares with Sluice: ``produce`` -> bounded channel -> batching consumer, in one nursery.

    The consumer drains what is queued (``receive_nowait`` until it would
    block) into one ASGI body send; a watcher cancels the nursery on
    ``http.disconnect``, so the producer's upstream is abandoned at once.
    """
    sender, receiver = trio.open_memory_channel[bytes](CAPACITY)

    async def watch_disconnect(scope: trio.CancelScope) -> None:
        while (await receive())["type"] != "http.disconnect":
            pass
        scope.cancel()

    async with trio.open_nursery() as nursery:
        nursery.start_soon(watch_disconnect, nursery.cancel_scope)
        nursery.start_soon(produce, sender)
        async for data in receiver:
            parts = [data]
            while True:
                try:
                    parts.append(receiver.receive_nowait())
                except (trio.WouldBlock, trio.EndOfChannel):
                    break
            await send({"type": "http.response.body", "body": data if len(parts) == 1 else b"".join(parts), "more_body": True})
        await send({"type": "http.response.body", "body": b"", "more_body": False})
        nursery.cancel_scope.cancel()


def make_app(upstream_port: int) -> Any:
    pool = Pool(upstream_port)
    host = b"127.0.0.1:%d" % upstream_port

    async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] == "lifespan":
            await lifespan(receive, send)
            return
        if scope["type"] != "http":
            return
        body = b""
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            body += message.get("body", b"")
            if not message.get("more_body"):
                break
        request = (
            b"POST %s HTTP/1.1\r\nhost: %s\r\ncontent-type: application/json\r\ncontent-length: %d\r\n\r\n"
            % (scope["raw_path"], host, len(body))
        ) + body
        while True:
            upstream, reused = await pool.take()
            try:
                await upstream.send_all(request)
                status, headers, rest = await read_head(upstream)
                break
            except (UpstreamError, trio.BrokenResourceError, OSError):
                upstream.socket.close()
                if not reused:
                    raise  # a fresh connection failed: the upstream is broken, not just a stale pooled socket
        await relay(upstream, status, headers, rest, receive, send, pool)

    return app


async def relay(
    upstream: trio.SocketStream, status: int, headers: dict[bytes, bytes], rest: bytes, receive: Any, send: Any, pool: Pool
) -> None:
    """Producer -> bounded channel -> batching consumer, and a watcher that cancels all on ``http.disconnect``."""
    clean = False
    try:
        out_headers = [(b"content-type", headers.get(b"content-type", b"application/json"))]
        length = headers.get(b"content-length")
        if length is not None:
            out_headers.append((b"content-length", length))
        await send({"type": "http.response.start", "status": status, "headers": out_headers})
        async def produce(sender: trio.MemorySendChannel[bytes]) -> None:
            nonlocal clean
            async with sender:
                if b"chunked" in headers.get(b"transfer-encoding", b""):
                    decoder = ChunkDecoder()
                    data = rest
                    while True:
                        if data:
                            payload = decoder.feed(data)
                            if payload:
                                await sender.send(payload)
                            if decoder.finished:
                                clean = not decoder.unused
                                return
                        data = await upstream.receive_some(65536)
                        if not data:
                            return
                else:
                    left = int(length or 0)
                    data = rest
                    while True:
                        if data:
                            left -= len(data)
                            await sender.send(data)
                        if left <= 0:
                            clean = left == 0
                            return
                        data = await upstream.receive_some(65536)
                        if not data:
                            return

        await pump(produce, receive, send)
    finally:
        if clean and headers.get(b"connection", b"").lower() != b"close":
            pool.give_back(upstream)
        else:
            clean = False
            upstream.socket.close()


def config(port: int) -> Config:
    """Hypercorn's settings as Sluice sets them (``sluice.server.hypercorn_config``)."""
    cfg = Config()
    cfg.bind = [f"127.0.0.1:{port}"]
    cfg.backlog = LISTEN_BACKLOG
    cfg.read_timeout = None
    cfg.keep_alive_timeout = 75.0
    cfg.graceful_timeout = 5.0
    cfg.accesslog = None
    return cfg


def main() -> None:
    port, upstream_port = int(sys.argv[1]), int(sys.argv[2])
    app = make_app(upstream_port)
    freeze_startup_heap()  # the garbage collector set as Sluice sets it
    trio.run(serve, app, config(port))


if __name__ == "__main__":
    main()
