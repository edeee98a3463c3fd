"""Reading a streaming upstream body below httpx2: the one hand-written layer of the hot path.

httpx2 still does everything else for an upstream request: connecting, TLS,
proxies, the pool, the request, the response head, retries' bookkeeping.
Once the head of an HTTP/1.1 ``Transfer-Encoding: chunked`` response is in,
:class:`UpstreamBody` reads the body itself: a plain ``recv`` on the
connection's socket (``receive_some`` on its trio stream when the upstream
is https) and
:class:`~sluice.wire.chunked.ChunkedDecoder` for the framing.

Why: an LLM stream is one small chunk per token, and every chunk read
through ``Response.aiter_raw()`` climbs six async-generator layers, two
exception-mapping context managers, a cancel scope and h11's event machine.
Measured on a socket pair, one chunk costs ~185 us of CPU (both ends) that
way and ~100 us read directly; in the gateway that was ~40 % of its CPU per
token (``benchmarks/README.md``, where the time goes).

How the connection goes back to the pool: httpcore reuses a connection only
when its h11 state says the response ended. h11 never parses the body:

* The body's first bytes may have arrived with the head and sit in h11's
  buffer, not yet parsed (httpcore2 stops asking h11 for events at the
  response head). This module takes them out of that buffer and decodes
  them itself; h11 is left where the head left it, at the start of the body
  with an empty buffer, which for a chunked body is between two chunks.
* Every later read goes to the decoder only.
* When the body ends cleanly, h11 is handed the zero-size last chunk
  (``0\r\n\r\n``): from between two chunks that brings it to the end of
  the response on its own terms, and ``response.aclose()`` returns the
  connection to the pool as it would after ``aiter_raw()``.

Why h11's private buffer: h11 costs ~5 us per chunk here, the decoder ~1.3
us, so h11 must not parse the body, and its public API cannot drop bytes it
has buffered. The head's read often carries much of the body: ~64 KiB for
most streams of the throughput scenario. Two ways within the public API
were measured (``benchmarks/upstream_body_feed.py``: 512 one-token chunks,
reads ending inside chunks). Feeding h11 every read until a read happened
to end between chunks (before issue 17) had it parse the whole body: ~15-21
us per chunk through this module. Leaving h11 the head's read and feeding it
the following read up to the end of the chunk that read left open still had
it parse 30-40 % of the chunks: ~9-12 us. Taking the bytes out of its
buffer: ~6 us, whatever came with the head. So this module takes them out
of h11's ``_receive_buffer`` with the buffer's own ``maybe_extract_at_most``
(what h11's readers call). h11 is pinned to the minor version this was
checked on (``pyproject.toml``); :func:`direct_reader_parts` checks the
attribute, and a test fails if the pinned version stops offering it (the
body would then be read through ``aiter_raw()``: slower, never wrong). That
h11 is then exactly between two chunks is what the tests of every split of
head and body prove: from anywhere else, the last chunk alone would not end
the response, and the connection would not be reused.

Invariants:

* The bytes :meth:`UpstreamBody.read` returns, concatenated, are exactly
  what ``aiter_raw()`` would have returned (``tests/test_upstream_body.py``
  checks it over TCP and TLS, for every split of head and body).
* A connection goes back to the pool only after its body was read to the
  last chunk and nothing followed it; any other exit (cancelled, broken,
  malformed, bytes after the last chunk) leaves h11 mid-response, so
  ``response.aclose()`` closes the connection.
* h11 is fed no byte of the body, only the last chunk at a clean end.
* Errors are httpx2's: :class:`httpx2.ReadError` for a broken connection,
  :class:`httpx2.RemoteProtocolError` for bad framing or a body cut short.
* Any response this module cannot read that way (HTTP/2, a length-delimited
  body, a proxy's connection, another httpcore2 layout) is read through
  ``aiter_raw()`` instead: slower, never wrong. Reaching the connection
  takes httpcore2's private attributes, and taking over the body's first
  bytes h11's; :func:`direct_reader_parts` checks every hop, and a test
  fails if the pinned versions stop offering them.
"""

from __future__ import annotations

import os
from collections.abc import AsyncIterator
from typing import Any, Protocol

import h11
import httpcore2
import httpx2
import trio

from .wire.chunked import ChunkedDecoder, ChunkedFramingError

#: bytes per read, as httpcore2 reads
READ_SIZE = 64 * 1024
#: what ends a chunked body with no trailers
_LAST_CHUNK = b"0\r\n\r\n"


class H11ReceiveBuffer(Protocol):
    """What this module uses of h11's receive buffer (``h11._receivebuffer.ReceiveBuffer``)."""

    def __len__(self) -> int: ...

    def maybe_extract_at_most(self, count: int) -> bytearray | None: ...


def direct_reader_parts(
    response: httpx2.Response,
) -> tuple[h11.Connection, H11ReceiveBuffer, trio.abc.ReceiveStream] | None:
    """The h11 state, its receive buffer and the trio stream behind a chunked HTTP/1.1 response, or ``None``."""
    if response.extensions.get("http_version") != b"HTTP/1.1":
        return None
    if response.headers.get("transfer-encoding", "").lower() != "chunked":
        return None
    network_stream = response.extensions.get("network_stream")
    try:
        # httpx2's BoundAsyncStream -> AsyncResponseStream -> httpcore2's
        # PoolByteStream -> HTTP11ConnectionByteStream -> the connection.
        connection = response.stream._stream._httpcore_stream._stream._connection  # type: ignore[attr-defined]
        if not isinstance(connection, httpcore2.AsyncHTTP11Connection):
            return None
        if connection._network_stream is not network_stream:
            return None
        state = connection._h11_state
        stream = network_stream._stream  # type: ignore[union-attr]
        buffer = state._receive_buffer
        buffer.maybe_extract_at_most  # noqa: B018 (the attribute's presence is what is checked)
        len(buffer)
    except (AttributeError, TypeError):
        return None
    if not isinstance(state, h11.Connection) or not isinstance(stream, trio.abc.ReceiveStream):
        return None
    if state.their_state is not h11.SEND_BODY or len(buffer) != len(state.trailing_data[0]):
        return None
    return state, buffer, stream


class UpstreamBody:
    """One upstream response's body, read chunk by chunk; see the module docstring."""

    __slots__ = ("_response", "_ended", "_h11", "_stream", "_socket", "_drained", "_decoder", "_buffered", "_fallback")

    def __init__(self, response: httpx2.Response) -> None:
        self._response = response
        #: :meth:`read` returned the end of the body
        self._ended = False
        parts = direct_reader_parts(response)
        self._fallback: AsyncIterator[bytes] | None = None
        if parts is None:
            self._fallback = response.aiter_raw()
            return
        self._h11, h11_buffer, self._stream = parts
        #: the plain TCP socket behind the stream, read without trio's stream layers (``None``: TLS)
        self._socket = self._stream.socket if isinstance(self._stream, trio.SocketStream) else None
        #: the last read took all the socket had (less than it asked for): wait before the next
        self._drained = False
        self._decoder = ChunkedDecoder()
        #: body bytes that came in with the head, taken out of h11's buffer
        self._buffered: bytes | None = bytes(h11_buffer.maybe_extract_at_most(len(h11_buffer)) or b"") or None

    @property
    def direct(self) -> bool:
        """The body is read below httpx2 (``False``: through ``aiter_raw()``)."""
        return self._fallback is None

    async def read(self, max_bytes: int = READ_SIZE) -> bytes:
        """The next payload bytes of the body; ``b""`` once it has ended.

        At most ``max_bytes`` of the body are taken per call (the relay passes
        the room left in its stream's budget), also from the bytes that came
        in with the response head; chunk framing is removed from them, so a
        call returns at most that much payload. The fallback through
        ``aiter_raw()`` reads as httpx2 does.
        """
        if self._fallback is not None:
            try:
                return await self._fallback.__anext__()
            except StopAsyncIteration:
                self._ended = True
                return b""
        decoder = self._decoder
        while self._buffered is not None:
            buffered = self._buffered
            self._buffered = buffered[max_bytes:] or None
            payload = self._take(buffered[:max_bytes])
            if payload:
                return payload
        while not decoder.finished:
            try:
                if self._socket is not None:
                    data = await self._receive(self._socket, max_bytes)
                else:
                    data = await self._stream.receive_some(max_bytes)
            except (trio.BrokenResourceError, trio.ClosedResourceError, OSError) as exc:
                raise httpx2.ReadError(f"The upstream connection broke: {exc!r}") from exc
            if not data:
                raise httpx2.RemoteProtocolError(
                    "peer closed connection without sending complete message body (incomplete chunked read)"
                )
            payload = self._take(data)
            if payload:
                return payload
        self._ended = True
        return b""

    async def _receive(self, sock: trio.socket.SocketType, max_bytes: int) -> bytes:
        """``receive_some`` on a plain socket, waiting first when the last read emptied it.

        trio's socket tries the read first and waits only when it fails: a
        stream whose tokens come one at a time (the usual LLM stream) then
        pays a failing ``recv`` and its ``BlockingIOError`` on every token
        before the wait. After a read that took less than it asked for, the
        socket is most likely empty, so this waits first; after a full read
        it reads first, and yields after it as trio does, so a fast upstream
        cannot starve the other tasks. Errors are ``OSError``s (the caller
        maps them; ``fileno()`` is -1 once closed: ``EBADF``).
        """
        waited = self._drained
        if waited:
            await trio.lowlevel.wait_readable(sock)
        else:
            await trio.lowlevel.checkpoint_if_cancelled()
        while True:
            try:
                data = os.read(sock.fileno(), max_bytes)  # a plain recv(2)
            except BlockingIOError:
                await trio.lowlevel.wait_readable(sock)
                waited = True
                continue
            if not waited:
                await trio.lowlevel.cancel_shielded_checkpoint()
            self._drained = len(data) < max_bytes
            return data

    async def aclose(self) -> None:
        """Stop reading. A body not read to its end closes its response now (shielded).

        The upstream then sees the close at once, not when whoever owns the
        response gets round to closing it; the connection is not reused.
        """
        with trio.CancelScope(shield=True):
            if self._fallback is not None and hasattr(self._fallback, "aclose"):
                await self._fallback.aclose()
            if not self._ended:
                await self._response.aclose()

    def _take(self, data: bytes) -> bytes:
        # The body's end is clean only with nothing after it, in this read or
        # in what is left of the bytes that came with the head.
        decoder = self._decoder
        try:
            payload = decoder.feed(data)
        except ChunkedFramingError as exc:
            raise httpx2.RemoteProtocolError(f"The upstream's chunked body is malformed: {exc}") from None
        if decoder.finished and not decoder.unused and self._buffered is None:
            self._end_h11()
        return payload

    def _end_h11(self) -> None:
        """The body ended cleanly: let h11 reach the end of the response too."""
        state = self._h11
        state.receive_data(_LAST_CHUNK)
        try:
            while True:
                event: Any = state.next_event()
                if event is h11.NEED_DATA or isinstance(event, h11.EndOfMessage) or event is h11.PAUSED:
                    return
        except h11.RemoteProtocolError as exc:
            raise httpx2.RemoteProtocolError(f"The upstream's response is malformed: {exc}") from None
