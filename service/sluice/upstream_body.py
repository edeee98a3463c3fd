"""Reading a streaming upstream body below httpx2: the one hand-written layer of the hot path.

httpx2 still does everything else for an upstream request: connecting, TLS,
proxies, the pool, the request, the response head, retries' bookkeeping.
Once the head of an HTTP/1.1 ``Transfer-Encoding: chunked`` response is in,
:class:`UpstreamBody` reads the body itself: ``receive_some`` on the
connection's trio stream (a TLS stream when the upstream is https) and
:class:`~sluice.wire.chunked.ChunkedDecoder` for the framing.

Why: an LLM stream is one small chunk per token, and every chunk read
through ``Response.aiter_raw()`` climbs six async-generator layers, two
exception-mapping context managers, a cancel scope and h11's event machine.
Measured on a socket pair, one chunk costs ~185 us of CPU (both ends) that
way and ~100 us read directly; in the gateway that was ~40 % of its CPU per
token (``benchmarks/README.md``, where the time goes).

How the connection goes back to the pool: httpcore reuses a connection only
when its h11 state says the response ended. h11 is kept at a point of the
body it can end from, fed real bytes only, never the body's chunks after
the first read:

* The body's first bytes may have arrived with the head and sit in h11's
  buffer (h11's public ``trailing_data``); h11 parses them (they are in its
  buffer, and its public API has no way to drop them), and the decoder reads
  them too.
* If they end inside a chunk, h11 is fed the following reads only up to the
  end of that chunk (:meth:`ChunkedDecoder.end_of_chunk_in`): usually the
  first read. From then on h11 sits between two chunks with an empty
  buffer, and only the decoder reads.
* When the body ends cleanly, h11 is handed the zero-size last chunk
  (``0\r\n\r\n``) so it reaches the end of the response on its own terms,
  and ``response.aclose()`` returns the connection to the pool as it would
  after ``aiter_raw()``.

Why so: h11 costs ~5 us per chunk here, the decoder ~1.3 us. Feeding h11
every read until a read happened to end between chunks (as before) kept it
parsing the whole body when reads end inside chunks, which is the rule when
tokens come back to back (issue 17: 2 072 of 2 075 reads in the throughput
scenario). Feeding h11 a prefix that ends at a chunk boundary uses h11's
public API only (``receive_data``, ``next_event``, ``trailing_data``), no
synthetic bytes but the last chunk, and costs the chunks of the head's read
plus one. Emptying h11's buffer instead (its private ``_receive_buffer``)
would save those few chunks per response but tie this module to h11's
internals for no measurable gain.

Invariants:

* The bytes :meth:`UpstreamBody.read` returns, concatenated, are exactly
  what ``aiter_raw()`` would have returned (``tests/test_upstream_body.py``
  checks it over TCP and TLS, for every split of head and body).
* A connection goes back to the pool only after its body was read to the
  last chunk; any other exit (cancelled, broken, malformed) leaves h11
  mid-response, so ``response.aclose()`` closes the connection. Bytes after
  the last chunk keep the connection out of the pool too, except when h11
  read them itself (with the head, or in the read that ended the chunk it
  was fed up to the end of): it then judges them as it would through
  ``aiter_raw()``.
* h11 is fed a prefix of the bytes the decoder read, up to a chunk boundary
  at the latest, then nothing but the last chunk at a clean end.
* Errors are httpx2's: :class:`httpx2.ReadError` for a broken connection,
  :class:`httpx2.RemoteProtocolError` for bad framing or a body cut short.
* Any response this module cannot read that way (HTTP/2, a length-delimited
  body, a proxy's connection, another httpcore2 layout) is read through
  ``aiter_raw()`` instead: slower, never wrong. Reaching the connection
  takes httpcore2's private attributes; :func:`direct_reader_parts` checks
  every hop, and a test fails if the pinned version stops offering them.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import h11
import httpcore2
import httpx2
import trio

from .wire.chunked import ChunkedDecoder, ChunkedFramingError

#: bytes per read, as httpcore2 reads
READ_SIZE = 64 * 1024
#: what ends a chunked body with no trailers
_LAST_CHUNK = b"0\r\n\r\n"


def direct_reader_parts(response: httpx2.Response) -> tuple[h11.Connection, trio.abc.ReceiveStream] | None:
    """The h11 state and trio stream behind a chunked HTTP/1.1 response, or ``None``."""
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
    except AttributeError:
        return None
    if not isinstance(state, h11.Connection) or not isinstance(stream, trio.abc.ReceiveStream):
        return None
    if state.their_state is not h11.SEND_BODY:
        return None
    return state, stream


class UpstreamBody:
    """One upstream response's body, read chunk by chunk; see the module docstring."""

    __slots__ = ("_response", "_ended", "_h11", "_stream", "_decoder", "_buffered", "_lockstep", "_fallback")

    def __init__(self, response: httpx2.Response) -> None:
        self._response = response
        #: :meth:`read` returned the end of the body
        self._ended = False
        parts = direct_reader_parts(response)
        self._fallback: AsyncIterator[bytes] | None = None
        if parts is None:
            self._fallback = response.aiter_raw()
            return
        self._h11, self._stream = parts
        self._decoder = ChunkedDecoder()
        #: body bytes that came in with the head, still in h11's buffer
        self._buffered: bytes | None = self._h11.trailing_data[0]
        #: h11 is fed what the decoder is fed, until the chunk in progress ends
        self._lockstep = True

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
        while self._buffered is not None:
            # In slices of max_bytes (h11 has all of it already: it is not fed again).
            buffered = self._buffered
            self._buffered = buffered[max_bytes:] or None
            payload = self._take(buffered[:max_bytes], already_in_h11=True)
            if payload:
                return payload
        decoder = self._decoder
        while not decoder.finished:
            try:
                data = await self._stream.receive_some(max_bytes)
            except (trio.BrokenResourceError, trio.ClosedResourceError) as exc:
                raise httpx2.ReadError(f"The upstream connection broke: {exc!r}") from exc
            if not data:
                raise httpx2.RemoteProtocolError(
                    "peer closed connection without sending complete message body (incomplete chunked read)"
                )
            payload = self._take(data, already_in_h11=False)
            if payload:
                return payload
        self._ended = True
        return b""

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

    def _take(self, data: bytes, *, already_in_h11: bool) -> bytes:
        if self._lockstep:
            return self._take_in_lockstep(data, already_in_h11=already_in_h11)
        decoder = self._decoder
        try:
            payload = decoder.feed(data)
        except ChunkedFramingError as exc:
            raise httpx2.RemoteProtocolError(f"The upstream's chunked body is malformed: {exc}") from None
        if decoder.finished and not decoder.unused:
            self._end_h11()
        return payload

    def _take_in_lockstep(self, data: bytes, *, already_in_h11: bool) -> bytes:
        # h11 has been fed exactly what the decoder has: feed it this read up
        # to the end of the chunk in progress (when it ends in this read), and
        # no more from then on.
        decoder = self._decoder
        end = None if already_in_h11 else decoder.end_of_chunk_in(data)
        try:
            payload = decoder.feed(data)
        except ChunkedFramingError as exc:
            raise httpx2.RemoteProtocolError(f"The upstream's chunked body is malformed: {exc}") from None
        if end is None:
            if not already_in_h11:
                self._h11.receive_data(data)
            self._drain_h11()
            return payload
        if end:
            self._h11.receive_data(data[:end])
            self._drain_h11()
        self._lockstep = False
        if decoder.finished and not decoder.unused:
            self._end_h11()
        return payload

    def _end_h11(self) -> None:
        """The body ended cleanly: let h11 reach the end of the response too."""
        self._h11.receive_data(_LAST_CHUNK)
        self._drain_h11()

    def _drain_h11(self) -> None:
        """Advance h11 over what it was fed (its events carry nothing the decoder lacks)."""
        state = self._h11
        try:
            while True:
                event: Any = state.next_event()
                if event is h11.NEED_DATA or isinstance(event, h11.EndOfMessage) or event is h11.PAUSED:
                    return
        except h11.RemoteProtocolError as exc:
            raise httpx2.RemoteProtocolError(f"The upstream's response is malformed: {exc}") from None
