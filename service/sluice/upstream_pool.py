"""The upstream connection pool: httpcore2's, probing an idle socket only when it is about to be used,
and sending a request's head and body in one write.

httpcore2's pool calls ``has_expired()`` on every idle connection on every
pool pass (two passes per request: when it starts and when its response is
closed), and for an idle HTTP/1.1 connection that asks the kernel whether
the socket is readable (a ``poll`` system call): an idle connection that
reads as readable is one the server closed. With a few dozen idle
connections that was ~30 system calls and ~60 us of CPU per request
(issue 17). This pool keeps the library's pass, its keep-alive timer and its
decisions, and moves the readability probe to the one connection a request
was assigned to, just before the request is written on it.

Invariants:

* A connection the server closed while it sat idle never carries a request:
  the probe at use finds it readable, closes it and raises httpcore2's own
  ``ConnectionNotAvailable``, on which the pool drops it and assigns the
  request again (to another idle connection or a new one). The request does
  not fail and is not retried by the gateway.
* An idle connection past its keep-alive expiry is closed on the next pool
  pass, as the library does (the timer check costs no system call).
* A connection the server closed but no request picked stays in the pool
  until it is picked or its keep-alive expires: at most ``keepalive_expiry``
  (httpx2's 5 s by default) of one descriptor in CLOSE_WAIT; the library
  closed it at the next pass.
* Only plain HTTP/1.1 connections change behaviour; proxied and HTTP/2
  connections are the library's own.

httpcore2 writes a request's head and its body separately: two
``send_all`` calls (each with its own ``fail_after`` and exception
mapping) and two system calls for one small JSON request. The pool's
network streams (:class:`_CorkedTrioStream`, trio's TCP ones, with TLS or
without) hold
what httpcore2 writes until it reads, then send it as one write:

* Nothing written stays held once the connection reads: every ``read``
  sends what is held first (with the write timeout it was written with),
  so the response head is always read after the whole request went out.
  A request body larger than ``_CORK_LIMIT`` goes out as it grows.
* The stream is httpcore2's ``TrioStream`` (same ``_stream``, same
  ``get_extra_info``), so whatever reads the socket directly once the
  response head is in (:mod:`sluice.upstream_body`) finds what it expects.
* A failed held write raises httpcore2's ``WriteError``/``WriteTimeout``
  from the read, which the upstream client treats as any connection
  failure before the first byte (retriable).
"""

from __future__ import annotations

import ssl
import time
from collections.abc import Iterable

import httpcore2
import httpx2
import trio
from httpcore2._async.http11 import AsyncHTTP11Connection
from httpcore2._backends.trio import TrioBackend, TrioStream

#: held writes beyond this many bytes are sent at once (a request body is not buffered whole)
_CORK_LIMIT = 64 * 1024


class _CorkedTrioStream(TrioStream):
    """httpcore2's trio stream, holding writes until the next read (or ``_CORK_LIMIT`` bytes)."""

    def __init__(self, stream: trio.abc.Stream) -> None:
        super().__init__(stream)
        self._held: list[bytes] = []
        self._held_bytes = 0
        self._write_timeout: float | None = None

    async def write(self, buffer: bytes, timeout: float | None = None) -> None:
        if not buffer:
            return
        self._held.append(buffer)
        self._held_bytes += len(buffer)
        self._write_timeout = timeout
        if self._held_bytes >= _CORK_LIMIT:
            await self._send_held()

    async def read(self, max_bytes: int, timeout: float | None = None) -> bytes:
        if self._held:
            await self._send_held()
        return await super().read(max_bytes, timeout)

    async def start_tls(
        self, ssl_context: ssl.SSLContext, server_hostname: str | None = None, timeout: float | None = None
    ) -> httpcore2.AsyncNetworkStream:
        if self._held:
            await self._send_held()
        tls = await super().start_tls(ssl_context, server_hostname, timeout)
        assert isinstance(tls, TrioStream)
        return _CorkedTrioStream(tls._stream)  # a TLS connection's writes are merged the same way

    async def _send_held(self) -> None:
        held = self._held
        data = held[0] if len(held) == 1 else b"".join(held)
        self._held = []
        self._held_bytes = 0
        await super().write(data, self._write_timeout)


class _CorkingTrioBackend(TrioBackend):
    """httpcore2's trio backend whose plain TCP streams are :class:`_CorkedTrioStream`."""

    async def connect_tcp(
        self,
        host: str,
        port: int,
        timeout: float | None = None,
        local_address: str | None = None,
        socket_options: Iterable[tuple[int, int, int]] | None = None,
    ) -> httpcore2.AsyncNetworkStream:
        stream = await super().connect_tcp(host, port, timeout, local_address, socket_options)
        assert isinstance(stream, TrioStream)
        return _CorkedTrioStream(stream._stream)


class _ProbeOnUseConnection(httpcore2.AsyncHTTPConnection):
    """An ``AsyncHTTPConnection`` whose idle socket is probed when it is used, not on every pool pass."""

    def has_expired(self) -> bool:
        connection = self._connection
        if isinstance(connection, AsyncHTTP11Connection) and connection.is_idle():
            # The library's keep-alive timer without its socket probe (which
            # handle_async_request runs on the connection that gets used).
            expire_at = connection._expire_at
            return expire_at is not None and time.monotonic() > expire_at
        return super().has_expired()

    async def handle_async_request(self, request: httpcore2.Request) -> httpcore2.Response:
        connection = self._connection
        if connection is not None and connection.is_idle() and connection.has_expired():
            # The library's full check (timer and probe): expired or closed by
            # the server while idle. The pool drops a closed connection and
            # assigns the request again, as for any connection that became
            # unavailable between assignment and use.
            await self.aclose()
            raise httpcore2.ConnectionNotAvailable()
        return await super().handle_async_request(request)


class UpstreamConnectionPool(httpcore2.AsyncConnectionPool):
    """httpcore2's pool whose direct connections are :class:`_ProbeOnUseConnection`."""

    def create_connection(self, origin: httpcore2.Origin) -> httpcore2.AsyncConnectionInterface:
        connection = super().create_connection(origin)
        if type(connection) is httpcore2.AsyncHTTPConnection:
            # The subclass adds behaviour, no state: re-classing the library's
            # own instance keeps every argument it was built with, whatever
            # the library version passes.
            connection.__class__ = _ProbeOnUseConnection
        return connection


class UpstreamTransport(httpx2.AsyncHTTPTransport):
    """``httpx2.AsyncHTTPTransport`` (no proxy) over :class:`UpstreamConnectionPool`."""

    def __init__(
        self,
        *,
        limits: httpx2.Limits,
        socket_options: Iterable[tuple[int, int, int]] | None = None,
        verify: ssl.SSLContext | bool = True,
    ) -> None:
        super().__init__(limits=limits, socket_options=socket_options, verify=verify)
        # The same pool the transport just built (no proxy: the client is
        # given this transport, so environment proxies do not apply), with
        # our connection class.
        self._pool = UpstreamConnectionPool(
            ssl_context=httpx2.create_ssl_context(verify=verify),
            max_connections=limits.max_connections,
            max_keepalive_connections=limits.max_keepalive_connections,
            keepalive_expiry=limits.keepalive_expiry,
            socket_options=socket_options,
            network_backend=_CorkingTrioBackend(),
        )
