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

import logging
import socket

import trio
from hypercorn.config import Config
from hypercorn.trio import serve

from .app import create_app
from .config import Settings


def listening_socket(settings: Settings) -> socket.socket:
    family = socket.AF_INET6 if ":" in settings.host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    if settings.client_sndbuf is not None:
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


def run(settings: Settings) -> None:
    app = create_app(settings)
    sock = listening_socket(settings)
    trio.run(serve, app, hypercorn_config(settings, sock))
