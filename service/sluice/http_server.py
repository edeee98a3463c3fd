"""Hypercorn's trio worker loop with Sluice's connection limits.

:func:`serve` is ``hypercorn.trio.serve`` (``worker_serve``) for the one
case Sluice uses — plain TCP listeners, no TLS, no QUIC — with two parts
swapped for subclasses, because hypercorn builds both inside that function
and offers no setting for what they change:

* :class:`GatewayTCPServer` (hypercorn's per-connection ``TCPServer``) gives
  a connection two deadlines where hypercorn has one. Hypercorn times every
  wait for a request head with ``keep_alive_timeout``, so a client that
  connects and sends nothing, or half a head, holds a task and an fd as long
  as an idle keep-alive connection may (75 s). Here the wait for a head
  (from the connection's start, or from the first byte of the next request
  on a kept-alive one) is ``request_head_timeout``; only the quiet time
  between requests is ``keep_alive_timeout``.
* :class:`SheddingListener` (trio's ``SocketListener``) handles running out
  of file descriptors. ``trio.serve_listeners`` logs a traceback and retries
  every 100 ms on ``EMFILE``, so the log fills with tracebacks and new
  connections wait unanswered in the backlog. Here the listener keeps one
  descriptor in reserve; out of descriptors, it spends the reserve on
  accepting the waiting connection, answers it ``503`` + ``Retry-After`` +
  ``connection: close``, closes it and takes the reserve back. The
  connections already served are untouched. One warning is logged when
  shedding starts and one line when it ends, with the count.

A third, smaller change: a connection the client closed while idle is
closed at once (hypercorn held it, fd and task, until its idle timer fired).

A fourth, for cancel latency: the connection's reader is the first to know
that the client went away (a read returns EOF or a reset). Each connection
offers a :class:`ClientWatch` to its requests (in the ASGI scope's
``state``, under :data:`CLIENT_WATCH`); a response registers what must
happen at once when its client leaves (the relay ends its upstream
connections), and the reader calls it right there, before hypercorn turns
the close into ``http.disconnect`` for the app's receiver task to take in
a later turn of the scheduler.

And a fifth, for speed: the connection offers its HTTP/1.x requests
:meth:`GatewayTCPServer.write_body` (under :data:`BODY_WRITER`), one body
chunk straight into h11 and the socket. Through ASGI each chunk is a
message dict, hypercorn's dispatch on its type and state, a ``Body`` event
(and a copy of the bytes), the protocol's dispatch on the event, then h11;
for a stream that is once per token. The response's head and end still
go through ASGI, so hypercorn's checks on them stand.

And one for speed: every write to a client (for a stream, one per batch of
tokens) first tries a plain non-blocking ``send`` with no await in between
(:meth:`GatewayTCPServer._send_now`). Hypercorn's write takes the
connection's send lock, opens a shielded cancel scope, and goes through
trio's ``send_all``, whose socket wrapper yields to the scheduler after
every successful send: together about a quarter of the gateway's CPU per
token. A write that cannot go out whole at once (a full socket buffer: a
slow client) goes the original way for the rest, so it keeps hypercorn's
guarantees: whole, in order, under the lock, never cut by a cancellation.

Invariant: each accepted connection ends within ``request_head_timeout``
unless it sends a complete request head, and between requests within
``keep_alive_timeout`` (both checked by ``tests/test_connections.py``
through real sockets).
"""

from __future__ import annotations

import errno
import logging
import os
import resource
import socket
from collections.abc import Awaitable, Callable
from functools import partial
from typing import Any

import h11
from h11._writers import ChunkedWriter
import trio
from hypercorn.config import Config
from hypercorn.events import Closed, RawData, Updated
from hypercorn.trio.lifespan import Lifespan
from hypercorn.trio.tcp_server import MAX_RECV, TCPServer
from hypercorn.trio.worker_context import WorkerContext
from hypercorn.typing import ConnectionState, LifespanState
from hypercorn.utils import raise_shutdown, repr_socket_addr, ShutdownError, wrap_app

from . import errors

log = logging.getLogger("sluice")

_OUT_OF_DESCRIPTORS = {errno.EMFILE, errno.ENFILE}


class GatewayConfig(Config):
    """Hypercorn's config plus the one setting it lacks."""

    #: seconds a connection may take to send a complete request head
    request_head_timeout: float = 10.0


#: the key of the connection's :class:`ClientWatch` in each request's ASGI ``scope["state"]``
CLIENT_WATCH = "sluice.client_watch"
#: the key of the connection's :meth:`GatewayTCPServer.write_body` in an HTTP/1.x request's ``scope["state"]``
BODY_WRITER = "sluice.write_body"


class IdleTimer:
    """hypercorn's ``TrioSingleTask`` (the connection's idle timer: ``restart``, ``stop``) without its per-restart costs.

    hypercorn restarts the timer twice a connection and once more per
    request (the head deadline when it opens, the keep-alive wait after each
    response) with ``nursery.start`` under a lock: a task handshake, a
    nursery of its own and a lock each time, ~1.5 % of a one-request
    connection's CPU. Here a restart cancels the running timer and spawns
    the next with ``start_soon`` inside a cancel scope made before the
    spawn; no await is left between the cancel and the new scope, so the
    lock has nothing to guard.

    Invariant, as hypercorn's: at most one timer runs; after ``stop`` (or a
    later ``restart``) a timer already spawned never acts, also one that
    has not started running yet (its scope is cancelled before its first
    checkpoint).
    """

    __slots__ = ("_scope",)

    def __init__(self) -> None:
        self._scope: trio.CancelScope | None = None

    async def restart(self, task_group: Any, action: Callable[[], Awaitable[None]]) -> None:
        if self._scope is not None:
            self._scope.cancel()
        scope = self._scope = trio.CancelScope()
        task_group._nursery.start_soon(_run_in_scope, scope, action)  # the nursery hypercorn's start uses

    async def stop(self) -> None:
        if self._scope is not None:
            self._scope.cancel()
        self._scope = None


async def _run_in_scope(scope: trio.CancelScope, action: Callable[[], Awaitable[None]]) -> None:
    with scope:
        await action()


class ClientWatch:
    """One connection's callbacks for the moment its client is found gone; each runs once, synchronously."""

    __slots__ = ("_on_gone",)

    def __init__(self) -> None:
        self._on_gone: set[Callable[[], None]] = set()

    def add(self, on_gone: Callable[[], None]) -> None:
        self._on_gone.add(on_gone)

    def discard(self, on_gone: Callable[[], None]) -> None:
        self._on_gone.discard(on_gone)

    def client_gone(self) -> None:
        callbacks, self._on_gone = self._on_gone, set()
        for on_gone in callbacks:
            on_gone()


class GatewayTCPServer(TCPServer):
    """Hypercorn's connection handler with a request-head deadline of its own (see the module docstring)."""

    config: GatewayConfig

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        # True while the running deadline is the keep-alive one: set when a response
        # completes and the connection goes idle (hypercorn's Updated(idle=True)),
        # cleared when a request head arrives or when bytes of one do.
        self._keep_alive_wait = False
        self._heads_received = 0
        self._client_watch = ClientWatch()
        self.idle_task = IdleTimer()  # type: ignore[assignment]
        # Each connection's own state dict (hypercorn shares one among all): each request's
        # scope["state"] is a shallow copy of it, so the requests of a connection share its watch.
        self.state = ConnectionState({**self.state, CLIENT_WATCH: self._client_watch, BODY_WRITER: self.write_body})
        #: the client's socket, written to directly when nothing else is writing (plain TCP only)
        self._plain_socket = self.stream.socket if isinstance(self.stream, trio.SocketStream) else None

    async def protocol_send(self, event: Any) -> None:
        if isinstance(event, RawData):
            await trio.lowlevel.checkpoint_if_cancelled()  # as the send lock's acquire would
            rest = self._send_now(event.data)
            if rest is None:
                await self.protocol.handle(Closed())
            elif rest:
                await super().protocol_send(RawData(rest))
            return
        if isinstance(event, Updated):
            # Bytes of the next request can arrive before the previous response's
            # recycle: then the connection is not idle but waiting for a head.
            self._keep_alive_wait = event.idle and not self._next_request_begun()
            self._heads_received += not event.idle
        await super().protocol_send(event)

    async def write_body(self, data: bytes) -> None:
        """Send one more chunk of the HTTP/1.x response under way: its framing, then the write.

        A chunked body's framing is written here, byte for byte as h11 would
        (h11 is pinned to a minor version; without its ``_writer`` attribute
        every chunk goes through h11 again); anything else goes through h11.

        For a response whose head went through ASGI (``http.response.start``:
        hypercorn's state and header checks) and whose end will (the last
        ``http.response.body``): in between, this is what hypercorn does per
        body message, less its layers. Errors as hypercorn has them: a
        connection whose client broke the protocol takes nothing more.
        """
        connection = self.protocol.protocol.connection
        if (
            data
            and type(getattr(connection, "_writer", None)) is ChunkedWriter
            and connection.our_state is h11.SEND_BODY
            and connection.their_state is not h11.ERROR
        ):
            # What h11 would write, framed here: for Data in SEND_BODY h11's state
            # machine stays where it is and its chunked writer keeps no count, so
            # only the framing is h11's job, and its event, transition check and
            # three-part list cost more than the rest of a token's write.
            await self.protocol_send(RawData(b"%x\r\n%b\r\n" % (len(data), data)))
            return
        try:
            framed = connection.send(h11.Data(data=data))
        except h11.LocalProtocolError:
            if connection.their_state is not h11.ERROR:
                raise
            return
        await self.protocol_send(RawData(framed))

    def _send_now(self, data: bytes) -> bytes | None:
        """Write what the socket takes at once, without awaiting; return the rest (``None``: the client is gone).

        Only when no other write is under way (the send lock is free, so none
        is half done); nothing here awaits, so none can start meanwhile.
        Whatever is left is written after it, hypercorn's way.
        """
        sock = self._plain_socket
        if sock is None or self.send_lock.locked() or not data:
            return data
        if sock.did_shutdown_SHUT_WR:
            return None
        try:
            sent = os.write(sock.fileno(), data)  # a plain send(2); fileno() is -1 once closed: EBADF
        except BlockingIOError:
            return data
        except OSError:
            return None  # reset, broken pipe or closed: what hypercorn maps to Closed
        return data[sent:]

    def _next_request_begun(self) -> bool:
        connection = getattr(self.protocol.protocol, "connection", None)  # HTTP/1.1 only: h11's buffer
        return isinstance(connection, h11.Connection) and bool(connection.trailing_data[0])

    async def _read_data(self) -> None:
        # hypercorn's loop, less its read_timeout (Sluice runs with None: streams are
        # long), plus one step: bytes that start a request but not a whole head end the
        # keep-alive wait and start the head deadline. Checked after the bytes are
        # handled, so a complete head (the common case) costs no timer restart.
        while True:
            try:
                data = await self._receive()
            except (trio.ClosedResourceError, trio.BrokenResourceError):
                self._client_watch.client_gone()
                break
            if not data:
                self._client_watch.client_gone()
            was_idle, heads = self._keep_alive_wait, self._heads_received
            await self.protocol.handle(RawData(bytes(data)))
            if data == b"":
                break
            if was_idle and self._heads_received == heads:
                self._keep_alive_wait = False
                await self.idle_task.restart(self._task_group, self._idle_timeout)
        await self.protocol.handle(Closed())
        # The client is gone: no deadline is left to wait for. (In hypercorn the
        # running idle timer keeps the connection's task group, and so its fd and
        # task, alive until the timer fires: up to keep_alive_timeout.)
        await self.idle_task.stop()

    async def _receive(self) -> bytes:
        """``receive_some``, less the turn of the scheduler trio's socket takes after a read it waited for.

        trio's socket methods yield once more after a successful call, even
        right after waiting for readiness: an EOF or a reset then reaches
        :class:`ClientWatch` one turn later than it could. The wait for
        readiness is this method's checkpoint; a read that did not wait
        checkpoints after it, so a client that keeps sending cannot starve
        the other tasks.
        """
        sock = self._plain_socket
        if sock is None:
            return await self.stream.receive_some(MAX_RECV)
        waited = False
        while True:
            try:
                data = os.read(sock.fileno(), MAX_RECV)  # a plain recv(2); fileno() is -1 once closed: EBADF
            except BlockingIOError:
                await trio.lowlevel.wait_readable(sock)
                waited = True
                continue
            except OSError as exc:
                raise trio.BrokenResourceError(exc) from exc
            if data and not waited:
                await trio.lowlevel.checkpoint()
            return data

    async def _idle_timeout(self) -> None:
        timeout = self.config.keep_alive_timeout if self._keep_alive_wait else self.config.request_head_timeout
        with trio.move_on_after(timeout):
            await self.context.terminated.wait()
        with trio.CancelScope(shield=True):
            await self._initiate_server_close()


class SheddingListener(trio.abc.Listener[trio.SocketStream]):
    """trio's socket listener that, out of file descriptors, turns new connections away instead of stalling.

    (A wrapper: ``trio.SocketListener`` is final.)
    """

    def __init__(self, sock: socket.socket) -> None:
        self._listener = trio.SocketListener(trio.socket.from_stdlib_socket(sock))
        self._listening = sock  # the same socket: accepted from directly when shedding
        self._reserve: int | None = os.open(os.devnull, os.O_RDONLY)
        self._shedding = False  # between the first EMFILE and the next accept that succeeds
        self._shed = 0  # connections turned away meanwhile
        self._refusal = _refusal_bytes()

    async def accept(self) -> trio.SocketStream:
        while True:
            try:
                stream = await self._listener.accept()
            except OSError as exc:
                if exc.errno not in _OUT_OF_DESCRIPTORS:
                    raise
                await self._shed_one()
                continue
            if self._shedding:
                log.warning({"event": "connections_shed", "count": self._shed, "reason": "file descriptor limit"})
                self._shedding, self._shed = False, 0
            if self._reserve is None:
                self._take_reserve()
            return stream

    async def _shed_one(self) -> None:
        if not self._shedding:
            self._shedding = True
            # (Nothing here may open a file: there is no descriptor to open it with.)
            log.error(
                "file descriptor limit reached (RLIMIT_NOFILE %d): answering new connections with 503 until some close",
                resource.getrlimit(resource.RLIMIT_NOFILE)[0],
            )
        if self._reserve is not None:
            os.close(self._reserve)
            self._reserve = None
        try:
            conn, _ = self._listening.accept()  # the waiting connection, on the reserve's descriptor
        except BlockingIOError:
            pass  # the client gave up meanwhile
        except OSError as exc:
            if exc.errno not in _OUT_OF_DESCRIPTORS:
                raise
            # Even the reserve is gone (another part of the process took it): wait, don't spin.
            await trio.sleep(0.1)
        else:
            self._shed += 1
            with conn:
                conn.setblocking(False)
                try:
                    conn.send(self._refusal)  # small: fits an empty socket buffer at once
                    conn.shutdown(socket.SHUT_WR)
                except OSError:
                    pass
        self._take_reserve()
        await trio.lowlevel.checkpoint()

    def _take_reserve(self) -> None:
        try:
            self._reserve = os.open(os.devnull, os.O_RDONLY)
        except OSError:
            self._reserve = None  # taken again on the next accept that finds a descriptor free

    async def aclose(self) -> None:
        if self._reserve is not None:
            os.close(self._reserve)
            self._reserve = None
        await self._listener.aclose()


def _refusal_bytes() -> bytes:
    error = errors.TooManyConnections("The gateway has too many open connections; retry shortly.")
    body = error.to_json_bytes()
    head = (
        f"HTTP/1.1 {error.status} Service Unavailable\r\ncontent-type: application/json\r\n"
        f"content-length: {len(body)}\r\nretry-after: 1\r\nconnection: close\r\n\r\n"
    )
    return head.encode() + body


async def serve(
    app: Any,
    config: GatewayConfig,
    *,
    shutdown_trigger: Callable[[], Awaitable[None]] | None = None,
    task_status: trio.TaskStatus[list[str]] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Serve ``app`` on ``config.bind`` until ``shutdown_trigger`` returns (hypercorn's ``worker_serve``, trimmed).

    ``task_status`` gets the bound URLs. On shutdown, hypercorn's order is
    kept: stop accepting, give open connections ``graceful_timeout``, then run
    the app's lifespan shutdown.
    """
    asgi_app = wrap_app(app, config.wsgi_max_body_size, None)
    lifespan_state: LifespanState = {}
    lifespan = Lifespan(asgi_app, config, lifespan_state)
    context = WorkerContext(None)
    async with trio.open_nursery() as lifespan_nursery:
        await lifespan_nursery.start(lifespan.handle_lifespan)
        await lifespan.wait_for_startup()
        async with trio.open_nursery() as server_nursery:
            sockets = config.create_sockets()
            listeners = []
            binds = []
            for sock in sockets.insecure_sockets:
                sock.listen(config.backlog)
                listeners.append(SheddingListener(sock))
                binds.append(f"http://{repr_socket_addr(sock.family, sock.getsockname())}")
            task_status.started(binds)
            try:
                async with trio.open_nursery(strict_exception_groups=True) as nursery:
                    if shutdown_trigger is not None:
                        nursery.start_soon(raise_shutdown, shutdown_trigger)
                    handler = partial(GatewayTCPServer, asgi_app, config, context, ConnectionState(lifespan_state.copy()))
                    nursery.start_soon(partial(trio.serve_listeners, handler, listeners, handler_nursery=server_nursery))
                    await trio.sleep_forever()
            except BaseExceptionGroup as error:
                _, other_errors = error.split((ShutdownError, KeyboardInterrupt))
                if other_errors is not None:
                    raise other_errors
            finally:
                await context.terminated.set()
                server_nursery.cancel_scope.deadline = trio.current_time() + config.graceful_timeout
        await lifespan.wait_for_shutdown()
        lifespan_nursery.cancel_scope.cancel()
