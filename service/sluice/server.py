"""Serving the app with hypercorn's trio worker, configured for long streams.

Why each hypercorn setting:

* ``read_timeout = None``: a stream is a long response; hypercorn must not
  cut a connection that is busy sending.
* ``backlog = 4096``: the default (100) drops a burst of connects into SYN
  retries (1 s, 3 s stalls) before the gateway ever sees them.
* ``graceful_timeout``: on shutdown, in-flight streams get this long to finish.

The gateway creates its listening socket itself and hands it to hypercorn
as ``fd://N``: that is how per-connection options hypercorn does not know
(``SO_SNDBUF``, inherited by every accepted socket) get set.
"""

from __future__ import annotations

import gc
import logging
import signal
import socket
from typing import Any

import trio
from hypercorn.config import Config
from hypercorn.trio import serve

from .app import create_app
from .config import Settings


def listening_socket(settings: Settings, *, reuse_port: bool = False) -> socket.socket:
    family = socket.AF_INET6 if ":" in settings.host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    if reuse_port:
        # Several workers, one port: each worker listens on a socket of its own
        # and the kernel spreads new connections across them.
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
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
    sock.bind((settings.host, settings.port))
    return sock


def hypercorn_config(settings: Settings, sock: socket.socket) -> Config:
    config = Config()
    # detach(): hypercorn's own socket object takes the descriptor over; ours
    # must not close it when it is garbage-collected.
    config.bind = [f"fd://{sock.detach()}"]
    config.backlog = 4096
    config.read_timeout = None
    config.keep_alive_timeout = 75.0
    config.graceful_timeout = 5.0
    config.accesslog = None
    # hypercorn's own messages go through our JSON handler, once.
    config.errorlog = logging.getLogger("hypercorn.error")
    return config


async def serve_until_signalled(settings: Settings, *, reuse_port: bool = False) -> None:
    """Serve; on SIGTERM/SIGINT stop accepting, drain, end what is left visibly, return.

    Hypercorn stops accepting as soon as the shutdown trigger returns and then
    waits ``graceful_timeout`` for open connections; our drain runs beside it
    and, after ``drain_timeout``, ends each remaining stream with a
    ``server_shutting_down`` error event, well before hypercorn would cancel
    it silently.
    """
    app = create_app(settings)
    state = app.extensions["sluice"]
    config = hypercorn_config(settings, listening_socket(settings, reuse_port=reuse_port))
    config.graceful_timeout = settings.drain_timeout + 5.0
    signalled = trio.Event()

    async def shutdown_trigger() -> None:
        await signalled.wait()

    async with trio.open_nursery() as nursery:

        async def watch_signals() -> None:
            with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
                async for signum in signals:
                    logging.getLogger("sluice").info(
                        "%s: draining for up to %g s", signal.Signals(signum).name, settings.drain_timeout
                    )
                    signalled.set()
                    await state.drain(settings.drain_timeout)
                    return

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


def run(settings: Settings) -> None:
    if settings.workers > 1:
        from .workers import supervise

        supervise(settings)
    else:
        trio.run(serve_until_signalled, settings)


def run_worker(settings: Settings) -> None:
    """One of ``--workers N`` processes (started by :mod:`sluice.workers`)."""
    from .logs import configure_logging

    configure_logging(settings.log_level)
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the supervisor turns Ctrl-C into one SIGTERM per worker
    trio.run(lambda: serve_until_signalled(settings, reuse_port=True))
