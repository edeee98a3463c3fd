"""Serving the app with hypercorn's trio worker, configured for long streams.

Why each hypercorn setting:

* ``read_timeout = None``: a stream is a long response; hypercorn must not
  cut a connection that is busy sending.
* ``backlog``: :data:`LISTEN_BACKLOG`.
* ``graceful_timeout``: on shutdown, in-flight streams get this long to finish.
* ``keep_alive_timeout`` / ``request_head_timeout``: how long a connection
  may sit idle between requests / take to send a request head
  (:mod:`sluice.http_server` gives the second its own deadline).

It is served by :func:`sluice.http_server.serve`, hypercorn's trio worker
loop with Sluice's connection handler and listener.

The gateway creates its listening socket itself and hands it to hypercorn
as ``fd://N``: that is how per-connection options hypercorn does not know
(``SO_SNDBUF``, inherited by every accepted socket) get set.
"""

from __future__ import annotations

import gc
import logging
import signal
import socket
import sys
from typing import Any

import trio

from .app import create_app
from .config import Settings
from .http_server import GatewayConfig, serve


#: listen backlog of the gateway's socket: the default (100) drops a burst of
#: connects into SYN retries (1 s, 3 s stalls) before the gateway sees them
LISTEN_BACKLOG = 4096


class CannotListen(Exception):
    """The gateway's address cannot be bound: in use, not permitted, or not on this host."""

    def __init__(self, host: str, port: int, reason: str) -> None:
        super().__init__(host, port, reason)
        self.host, self.port, self.reason = host, port, reason

    def __str__(self) -> str:
        address = f"[{self.host}]" if ":" in self.host else self.host
        return f"cannot listen on {address}:{self.port}: {self.reason}"


def listening_socket(settings: Settings) -> socket.socket:
    """The gateway's one listening socket: bound and listening, or :class:`CannotListen`.

    No ``SO_REUSEPORT``: the port belongs to one gateway. Its ``--workers``
    share this very socket (the supervisor creates it and hands it to each
    worker), and a second gateway started on the same port is refused by the
    kernel with ``EADDRINUSE``. It listens at once, so the port is taken (and
    connections queue) before any worker is ready.
    """
    family = socket.AF_INET6 if ":" in settings.host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    # SO_REUSEADDR only lets a restarted gateway bind over connections left in
    # TIME_WAIT; it never lets two listening sockets share a port.
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    if settings.stall_timeout > 0:
        # Inherited by every accepted connection. Hypercorn's writes to the
        # client are shielded and have no timeout of their own; with this, the
        # kernel aborts a connection whose sent data stays unacknowledged
        # (including a zero window: a client that stopped reading) for this
        # long, and the stream is cancelled like any disconnect.
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_USER_TIMEOUT, int(settings.stall_timeout * 1000))
    if settings.client_sndbuf:
        # A fixed send buffer turns off the kernel's autotuning (megabytes per
        # socket on loopback): what a stalled client can park stays bounded.
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, settings.client_sndbuf)
    try:
        sock.bind((settings.host, settings.port))
        sock.listen(LISTEN_BACKLOG)
    except OSError as exc:  # EADDRINUSE, EACCES, EADDRNOTAVAIL, a host name that does not resolve
        sock.close()
        raise CannotListen(settings.host, settings.port, exc.strerror or str(exc)) from None
    return sock


def hypercorn_config(settings: Settings, sock: socket.socket) -> GatewayConfig:
    config = GatewayConfig()
    # detach(): hypercorn's own socket object takes the descriptor over; ours
    # must not close it when it is garbage-collected.
    config.bind = [f"fd://{sock.detach()}"]
    config.backlog = LISTEN_BACKLOG
    config.read_timeout = None
    config.keep_alive_timeout = settings.keep_alive_timeout
    config.request_head_timeout = settings.request_head_timeout
    config.graceful_timeout = 5.0
    config.accesslog = None
    # hypercorn's own messages go through our JSON handler, once.
    config.errorlog = logging.getLogger("hypercorn.error")
    return config


#: after a second signal, how long streams may take to write their final event before serving is cancelled
_FINAL_EVENTS_GRACE = 5.0


async def serve_until_signalled(settings: Settings, sock: socket.socket | None = None) -> None:
    """Serve on ``sock`` (by default a socket of our own); on SIGTERM/SIGINT drain, then return.

    The first signal stops accepting and starts the drain: hypercorn stops
    accepting as soon as the shutdown trigger returns and then waits
    ``graceful_timeout`` for open connections; our drain runs beside it and,
    after ``drain_timeout``, ends each remaining stream with a
    ``server_shutting_down`` error event, well before hypercorn would cancel
    it silently. A second signal ends the drain at once, the same visible
    way. Signals after that are taken and ignored: none may escape as a
    ``KeyboardInterrupt``, which would cut every stream without its event
    and print a traceback.
    """
    app = create_app(settings)
    state = app.extensions["sluice"]
    config = hypercorn_config(settings, sock if sock is not None else listening_socket(settings))
    config.graceful_timeout = settings.drain_timeout + 5.0
    signalled = trio.Event()
    log = logging.getLogger("sluice")

    async def shutdown_trigger() -> None:
        await signalled.wait()

    async with trio.open_nursery() as nursery:
        cut_short = trio.Event()
        drained = trio.Event()

        async def drain() -> None:
            await state.drain(settings.drain_timeout, cut_short)
            drained.set()

        async def stop_now() -> None:
            await drained.wait()
            # Every stream has been given its final event; once written, stop
            # without waiting out graceful_timeout for idle keep-alive
            # connections (nothing is left to send on them).
            with trio.move_on_after(_FINAL_EVENTS_GRACE):
                while state.relays:
                    await trio.sleep(0.05)
            nursery.cancel_scope.cancel()

        async def watch_signals() -> None:
            # Receives until serving ends (this task is cancelled then), never
            # leaving a signal pending in the receiver: trio re-delivers those
            # when it closes, and SIGINT becomes a KeyboardInterrupt.
            with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
                async for signum in signals:
                    name = signal.Signals(signum).name
                    if not signalled.is_set():
                        log.info("%s: draining for up to %g s", name, settings.drain_timeout)
                        signalled.set()
                        nursery.start_soon(drain)
                    elif not cut_short.is_set():
                        log.info("%s again: ending the drain now", name)
                        cut_short.set()
                        nursery.start_soon(stop_now)

        nursery.start_soon(watch_signals)

        async def serve_then_stop(*, task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
            await serve(app, config, shutdown_trigger=shutdown_trigger, task_status=task_status)
            nursery.cancel_scope.cancel()

        await nursery.start(serve_then_stop)
        freeze_startup_heap()


def freeze_startup_heap() -> None:
    """Exclude everything start-up built from the garbage collector's full passes, and run them rarely.

    Measured (gc.callbacks timing in the gateway under the sustained
    benchmark): with the start-up heap (modules, the app, pools) in the
    oldest generation, a full collection took 27-68 ms on this machine kind,
    and whichever stream was starting waited that long for its first token:
    the sustained scenario's TTFT p99 was 70-90 ms (p50 9 ms); with the heap
    frozen once serving starts it was 25-35 ms in the same setup (with the
    collector off entirely, 15 ms: what is left is full passes over what
    requests allocate). Frozen objects are still freed by reference
    counting; they are only no longer scanned for cycles.
    """
    gc.collect()
    gc.freeze()
    # And collect young objects 10x less often than the default (700): each
    # pass stalls every stream, and a relay makes garbage at a steady rate,
    # so fewer, slightly larger young passes and far fewer full ones. With
    # this the sustained scenario's TTFT p99 fell from 25-35 ms to ~15 ms
    # (trio-floor 6-8 ms) and CPU per token by ~15 %.
    gc.set_threshold(7000, 10, 10)


def run(settings: Settings) -> int:
    """Serve until signalled; the process exit code (2: the address cannot be bound)."""
    if settings.workers > 1:
        from .workers import supervise

        return supervise(settings)
    try:
        sock = listening_socket(settings)
    except CannotListen as exc:
        print(f"sluice: {exc}", file=sys.stderr)
        return 2
    trio.run(serve_until_signalled, settings, sock)
    return 0


def run_worker(settings: Settings, sock: socket.socket, supervisor_pid: int) -> None:
    """One of ``--workers N`` processes (started by :mod:`sluice.workers`), serving the supervisor's socket."""
    from .logs import configure_logging
    from .workers import exit_with_supervisor

    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the supervisor turns Ctrl-C into one SIGTERM per worker
    exit_with_supervisor(supervisor_pid)
    configure_logging(settings.log_level)
    trio.run(serve_until_signalled, settings, sock)
