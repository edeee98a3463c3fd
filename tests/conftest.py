"""Fixtures: a real simulator and a real hypercorn-served gateway on 127.0.0.1:0.

Every streaming test talks to the gateway through real sockets (Quart's test
client cannot model a client that goes away mid-stream). Everything started
here lives in the test's nursery and is cancelled when the test ends.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import httpx2
import pytest
import trio

from sluice.app import create_app
from sluice.config import Settings
from sluice.http_server import serve
from sluice.server import hypercorn_config, listening_socket
from sluice.simulator import Simulator

from .rawclient import RawStream
from .support import Gateway, GatewayFactory, RunningSimulator


@pytest.fixture
async def close_raw_clients(nursery: trio.Nursery) -> AsyncIterator[None]:
    """Close raw clients a test left open, before its services are torn down."""
    yield
    while RawStream.opened:
        raw = RawStream.opened.pop()
        with trio.move_on_after(5):
            try:
                await raw.close_rst()
            except (trio.ClosedResourceError, OSError):
                pass  # the test closed it already



@pytest.fixture
async def simulator(nursery: trio.Nursery) -> RunningSimulator:
    # A pinned send buffer: backpressure reaches the simulator's writes after
    # ~64 KiB instead of after the kernel's autotuned megabytes.
    sim = Simulator(send_buffer=65536)
    port = await nursery.start(sim.serve, "127.0.0.1", 0)
    return RunningSimulator(sim, f"http://127.0.0.1:{port}/v1")


@pytest.fixture
def start_simulator(nursery: trio.Nursery) -> Callable[[], Awaitable[RunningSimulator]]:
    """More simulators, for routing tests: each one a separate upstream with its own stats."""

    async def start() -> RunningSimulator:
        sim = Simulator(send_buffer=65536)
        port = await nursery.start(sim.serve, "127.0.0.1", 0)
        return RunningSimulator(sim, f"http://127.0.0.1:{port}/v1")

    return start


@pytest.fixture
def start_gateway(nursery: trio.Nursery, simulator: RunningSimulator, close_raw_clients: None) -> GatewayFactory:
    """Start a gateway with the given settings, pointed at the simulator by default."""

    async def start(tracer_provider: Any = None, **overrides: Any) -> Gateway:
        overrides.setdefault("upstream_base_url", simulator.base_url)
        settings = Settings(host="127.0.0.1", port=0, **overrides)
        app = create_app(settings, tracer_provider)
        binds = await nursery.start(serve, app, hypercorn_config(settings, listening_socket(settings)))
        return Gateway(url=binds[0], state=app.extensions["sluice"], settings=settings)

    return start


@pytest.fixture
async def gateway(start_gateway: GatewayFactory) -> Gateway:
    return await start_gateway()


@pytest.fixture
async def client(gateway: Gateway) -> AsyncIterator[httpx2.AsyncClient]:
    async with httpx2.AsyncClient(base_url=gateway.url, timeout=30) as http:
        yield http


