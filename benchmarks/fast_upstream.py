"""The benchmark's upstream: chat completions from pre-rendered bytes on raw trio sockets.

``python -m benchmarks.fast_upstream PORT``

Why not the simulator: straight from the load generator the simulator
delivers ~117 000 tokens/s (it renders each chunk per token through its
grammar layer and frames it with h11), so no gateway could show more and
every difference above that was invisible. This upstream does no per-token
object work: each answer is rendered once, the first time its shape is
asked for, and kept as the exact bytes to write (HTTP head, chunked framing
and all); a request after that costs one ``json.loads`` of its body, a cache
lookup and the sends.

What it answers (what ``benchmarks/loadgen.py`` and the gateways send):

* ``POST /v1/chat/completions`` with the simulator's ``sim:`` model syntax
  for ``tokens``, ``ttft_ms``, ``itl_ms`` and ``seed`` (faults and ``x-sim-*``
  headers are the simulator's: run ``--upstream simulator`` for them),
  ``stream`` true or false, ``stream_options.include_usage``, ``n``,
  ``max_tokens``/``max_completion_tokens``. The chunks are the simulator's
  chat chunks byte for byte (its ``ChunkEncoder``), except that the text is
  a function of the model string alone, not of the prompt (so one rendering
  serves every prompt), and each rendering has one fixed id.
* ``GET /sim/stats``, ``POST /sim/reset``, ``GET /health``: the simulator's
  counters and per-request records (``model``, ``started_at``,
  ``closed_at``, ``ended_at``, ``outcome``: ``CLOCK_MONOTONIC`` seconds), which
  the ``cancel`` and ``memory`` scenarios read.

Invariants:

* Flow control is honoured: every write is a non-blocking ``send`` of what
  the kernel takes, then a wait until the socket is writable; nothing is
  buffered in user space beyond the one pre-rendered ``bytes`` object the
  answer already is (shared by every request of that shape).
* Every event (one per token) is its own HTTP chunk, as providers' servers
  write them (one write, one chunk): the gateway's chunked decoding is
  measured at its real cost. With no delay, a streamed answer is one
  ``bytes`` (head + body) written in as few sends as the peer's window allows; with a delay, the head goes at
  once and each token's chunk at its time (``ttft_ms + i * itl_ms`` after the
  request), one sleep per stream per token, the last token's chunk together
  with the closing chunks and the body's end.
* A client that closes its connection while an answer waits for its next
  token is noticed at once (a watcher waits on the socket), and its record's
  ``closed_at`` is when it was noticed; a client that closes during a write
  is noticed by the failing write.
* Every counted request ends in exactly one of ``requests_completed`` and
  ``requests_closed_by_client``.
* HTTP/1.1 keep-alive: requests on one connection are answered in order
  until the client closes or sends ``connection: close``.
"""

from __future__ import annotations

import json
import socket
import sys
import time
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any

import trio

from sluice.simulator.behaviour import (
    ChunkEncoder,
    SimParamError,
    completion_body,
    error_body,
    iter_tokens,
    parse_behaviour,
)
from sluice.simulator.server import ClientGone, RawSocket, SimulatorStats, accept_forever, listening_socket

#: the largest request head and body accepted; the load generator's are a few hundred bytes
MAX_HEAD = 64 * 1024
MAX_BODY = 1024 * 1024
#: renderings kept (least recently used dropped first); the cancel scenario asks for 25 seeds
CACHE_ENTRIES = 512
#: the most tokens one answer may ask for (the simulator's own limit)
MAX_TOKENS = 100_000
STREAM_HEAD = (
    b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ncache-control: no-cache\r\n"
    b"transfer-encoding: chunked\r\n\r\n"
)
LAST_CHUNK = b"0\r\n\r\n"


def frame(payload: bytes) -> bytes:
    """``payload`` as one chunk of chunked transfer-coding (nothing for an empty payload)."""
    return b"%x\r\n%s\r\n" % (len(payload), payload) if payload else b""


def simple_response(status: int, body: bytes, reason: str = "OK") -> bytes:
    return (
        f"HTTP/1.1 {status} {reason}\r\ncontent-type: application/json\r\ncontent-length: {len(body)}\r\n\r\n".encode()
        + body
    )


class BadRequest(Exception):
    """A request this upstream does not answer; the client gets a 400 with the message."""


@dataclass(frozen=True, slots=True)
class Shape:
    """What a rendering depends on: the cache key."""

    model: str
    stream: bool
    include_usage: bool
    n: int
    max_tokens: int | None


@dataclass(frozen=True, slots=True)
class Rendering:
    """One answer as the bytes to write: ``pieces[0]`` at once, ``pieces[i]`` (i >= 1) at ``due[i]`` seconds."""

    pieces: tuple[bytes, ...]
    due: tuple[float, ...]

    @property
    def delayed(self) -> bool:
        return self.due[-1] > 0


def render(shape: Shape, number: int) -> Rendering:
    """The whole answer for ``shape``, rendered once (sans-IO)."""
    behaviour = parse_behaviour(shape.model)
    if behaviour.fault is not None:
        raise BadRequest("the fast upstream does not simulate faults; run the benchmark with --upstream simulator")
    count = behaviour.tokens
    finish = "stop"
    if shape.max_tokens is not None and shape.max_tokens < count:
        count, finish = shape.max_tokens, "length"
    if count * shape.n > MAX_TOKENS:
        raise BadRequest(f"at most {MAX_TOKENS} tokens per answer")
    tokens = list(iter_tokens("", count, behaviour.seed))
    ttft, itl = behaviour.ttft_ms / 1000.0, behaviour.itl_ms / 1000.0
    completion_id, created = f"chatcmpl-fast-{number}", int(time.time())
    if not shape.stream:
        body = json.dumps(
            completion_body(completion_id, created, shape.model, "".join(tokens), finish, shape.n, 2, count)
        ).encode()
        delay = ttft + itl * max(0, count - 1)
        if not delay:
            return Rendering((simple_response(200, body),), (0.0,))
        return Rendering((b"", simple_response(200, body)), (0.0, delay))
    encoder = ChunkEncoder(completion_id, created, shape.model, include_usage=shape.include_usage)
    first = b"".join(encoder.role(i) for i in range(shape.n))
    closing = b"".join(encoder.finish(finish, i) for i in range(shape.n))
    if shape.include_usage:
        closing += encoder.usage(2, count)
    closing += b"data: [DONE]\n\n"
    events = [b"".join(encoder.content(token, i) for i in range(shape.n)) for token in tokens]
    if events:
        events[0] = first + events[0]
    else:
        events = [first]
    events[-1] += closing
    pieces = [frame(event) for event in events]
    if ttft == 0 and itl == 0:
        return Rendering((STREAM_HEAD + b"".join(pieces) + LAST_CHUNK,), (0.0,))
    pieces[-1] += LAST_CHUNK
    return Rendering((STREAM_HEAD, *pieces), (0.0, *(ttft + itl * i for i in range(len(pieces)))))


class Connection(RawSocket):
    """The simulator's raw socket, plus the bytes of a pipelined next request not yet consumed."""

    __slots__ = ("buffer",)

    def __init__(self, sock: socket.socket) -> None:
        super().__init__(sock)
        self.buffer = b""


class FastUpstream:
    """The server: an accept loop and one task per connection."""

    def __init__(self) -> None:
        self.stats = SimulatorStats()
        self.port: int | None = None
        self._cache: OrderedDict[Shape, Rendering] = OrderedDict()
        self._ids = 0

    async def serve(self, host: str = "127.0.0.1", port: int = 0, *, task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED) -> None:
        listener = listening_socket(host, port)
        self.port = listener.getsockname()[1]
        try:
            async with trio.open_nursery() as nursery:
                task_status.started(self.port)

                def accepted(sock: socket.socket) -> None:
                    self.stats.connections_accepted += 1
                    nursery.start_soon(self._serve_connection, Connection(sock))

                await accept_forever(listener, accepted)
        finally:
            listener.close()

    async def _serve_connection(self, conn: Connection) -> None:
        try:
            while True:
                request = await self._read_request(conn)
                if request is None:
                    return
                method, path, headers, body = request
                await self._dispatch(conn, method, path, body)
                if headers.get(b"connection", b"").lower() == b"close" or conn.closed:
                    return
        except (ClientGone, OSError, trio.ClosedResourceError):
            pass
        finally:
            conn.close()

    async def _read_request(self, conn: Connection) -> tuple[bytes, bytes, dict[bytes, bytes], bytes] | None:
        data = conn.buffer
        while (end := data.find(b"\r\n\r\n")) < 0:
            if len(data) > MAX_HEAD:
                raise ClientGone("request head too long")
            more = await conn.recv()
            if not more:
                return None
            data += more
        lines = data[:end].split(b"\r\n")
        method, path, _ = lines[0].split(b" ", 2)
        headers = {}
        for line in lines[1:]:
            name, _, value = line.partition(b":")
            headers[name.strip().lower()] = value.strip()
        if b"transfer-encoding" in headers:
            await conn.send_all(simple_response(411, error_body("send a content-length"), "Length Required"))
            raise ClientGone("chunked request body")
        length = int(headers.get(b"content-length", b"0"))
        if length > MAX_BODY:
            raise ClientGone("request body too long")
        data = data[end + 4 :]
        while len(data) < length:
            more = await conn.recv()
            if not more:
                return None
            data += more
        conn.buffer = data[length:]
        return method, path.split(b"?", 1)[0], headers, data[:length]

    async def _dispatch(self, conn: Connection, method: bytes, path: bytes, body: bytes) -> None:
        if path == b"/v1/chat/completions" and method == b"POST":
            await self._chat(conn, body)
        elif path == b"/sim/stats":
            await conn.send_all(simple_response(200, json.dumps(self.stats.as_json()).encode()))
        elif path == b"/sim/reset" and method == b"POST":
            self.stats = SimulatorStats()
            await conn.send_all(simple_response(200, b'{"reset":true}'))
        elif path == b"/health":
            await conn.send_all(simple_response(200, b'{"status":"ok"}'))
        else:
            message = f"the fast upstream answers POST /v1/chat/completions only (not {method.decode()} {path.decode()})"
            await conn.send_all(simple_response(404, error_body(message, code="not_found"), "Not Found"))

    def rendering(self, body: bytes) -> tuple[str, Rendering]:
        """The model and the (cached) answer for a request body; :class:`BadRequest` for what it cannot answer."""
        try:
            payload = json.loads(body)
        except ValueError:
            raise BadRequest("the body is not valid JSON") from None
        if not isinstance(payload, dict) or not isinstance(payload.get("model"), str) or not payload.get("messages"):
            raise BadRequest("'model' (string) and 'messages' are required")
        options = payload.get("stream_options")
        limit = payload.get("max_completion_tokens", payload.get("max_tokens"))
        n = payload.get("n")
        shape = Shape(
            model=payload["model"],
            stream=bool(payload.get("stream")),
            include_usage=isinstance(options, dict) and options.get("include_usage") is True,
            n=n if isinstance(n, int) and 0 < n <= 128 else 1,
            max_tokens=limit if isinstance(limit, int) and limit > 0 else None,
        )
        cached = self._cache.get(shape)
        if cached is None:
            self._ids += 1
            try:
                cached = render(shape, self._ids)
            except SimParamError as exc:
                raise BadRequest(str(exc)) from None
            self._cache[shape] = cached
            if len(self._cache) > CACHE_ENTRIES:
                self._cache.popitem(last=False)
        return shape.model, cached

    async def _chat(self, conn: Connection, body: bytes) -> None:
        try:
            model, answer = self.rendering(body)
        except BadRequest as exc:
            await conn.send_all(simple_response(400, error_body(str(exc)), "Bad Request"))
            return
        stats = self.stats
        stats.requests_started += 1
        stats.active_requests += 1
        started = time.monotonic()
        record: dict[str, Any] = {"id": stats.requests_started, "api": "chat", "model": model, "outcome": "running",
                                  "started_at": started, "ended_at": None, "closed_at": None}
        stats.records.append(record)
        try:
            if answer.delayed:
                await self._write_timed(conn, answer, record)
            else:
                await conn.send_all(answer.pieces[0])
            record["outcome"] = "completed"
        except ClientGone:
            record["outcome"] = "closed_by_client"
            record["closed_at"] = record["closed_at"] or time.monotonic()
        finally:
            record["ended_at"] = time.monotonic()
            stats.active_requests -= 1
            if record["outcome"] == "completed":
                stats.requests_completed += 1
            else:
                record["outcome"] = "closed_by_client"  # cancelled from outside: the server is stopping
                stats.requests_closed_by_client += 1

    async def _write_timed(self, conn: Connection, answer: Rendering, record: dict[str, Any]) -> None:
        """Each piece at its time, while a watcher notices the client leaving between them."""
        gone = False
        async with trio.open_nursery() as nursery:

            async def watch() -> None:
                nonlocal gone
                while True:
                    try:
                        await trio.lowlevel.wait_readable(conn.sock)
                    except trio.ClosedResourceError:
                        return
                    try:
                        data = conn.sock.recv(65536)
                    except BlockingIOError:
                        continue
                    except OSError:
                        data = b""
                    if not data:
                        break
                    conn.buffer += data  # a pipelined next request: kept for later
                gone = True
                record["closed_at"] = time.monotonic()
                nursery.cancel_scope.cancel()

            nursery.start_soon(watch)
            begin = trio.current_time()
            try:
                for piece, due in zip(answer.pieces, answer.due):
                    if due:
                        await trio.sleep_until(begin + due)
                    if piece:
                        await conn.send_all(piece)
            except ClientGone:
                # A write failed first (reset by the peer): raised below, outside the nursery, not as a group.
                gone = True
                record["closed_at"] = record["closed_at"] or time.monotonic()
            nursery.cancel_scope.cancel()
        if gone:
            raise ClientGone("the client closed the connection")


def main() -> None:
    port = int(sys.argv[1])
    try:
        trio.run(FastUpstream().serve, "127.0.0.1", port)
    except KeyboardInterrupt:
        pass


if __name__ == "__main__":
    main()
