"""The Quart floor: stack-floor with quart-trio as the application, as Sluice is.

``python -m benchmarks.quart_floor PORT UPSTREAM_PORT``

One quart-trio route, served by hypercorn: the upstream request through
httpx2, its body through ``sluice.upstream_body.UpstreamBody``, a producer and
a consumer joined by a bounded memory channel inside a ``ResponseBody`` (as
``sluice.relay.StreamRelay`` is), the upstream's bytes passed through
untouched. No SSE framing, figures, error events, routing, limits, retries,
metrics or logs: what it spends is the fixed stack's own cost (trio,
quart-trio, hypercorn, httpx2); what Sluice spends above it is Sluice's. The
garbage collector is set as Sluice sets it.
"""

from __future__ import annotations

import sys
from types import TracebackType
from typing import Any

import httpx2
import trio
from hypercorn.config import Config
from hypercorn.trio import serve
from quart import Response, request
from quart.wrappers.response import ResponseBody
from quart_trio import QuartTrio

from sluice.server import LISTEN_BACKLOG, freeze_startup_heap
from sluice.upstream_body import UpstreamBody


class Relay(ResponseBody):
    """Producer -> channel -> consumer for one upstream response, in one nursery."""

    def __init__(self, response: httpx2.Response) -> None:
        self.response = response

    async def __aenter__(self) -> Relay:
        self._manager = trio.open_nursery()
        self._nursery = await self._manager.__aenter__()
        self._send, self._receive = trio.open_memory_channel[bytes](16)
        self._nursery.start_soon(self._produce)
        return self

    async def _produce(self) -> None:
        async with self._send:
            body = UpstreamBody(self.response)
            try:
                while chunk := await body.read():
                    await self._send.send(chunk)
            finally:
                await body.aclose()

    def __aiter__(self) -> Relay:
        return self

    async def __anext__(self) -> bytes:
        try:
            chunk = await self._receive.receive()
        except trio.EndOfChannel:
            raise StopAsyncIteration from None
        # Batching as Sluice and hypercorn-floor do: what is queued goes in one write.
        parts = [chunk]
        while True:
            try:
                parts.append(self._receive.receive_nowait())
            except (trio.WouldBlock, trio.EndOfChannel):
                break
        return chunk if len(parts) == 1 else b"".join(parts)

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> bool | None:
        self._nursery.cancel_scope.cancel()
        try:
            return await self._manager.__aexit__(exc_type, exc, tb)
        finally:
            with trio.CancelScope(shield=True):
                await self.response.aclose()


def make_app(upstream_url: str) -> QuartTrio:
    app = QuartTrio(__name__)
    clients: list[httpx2.AsyncClient] = []

    @app.before_serving
    async def start() -> None:
        clients.append(
            httpx2.AsyncClient(
                timeout=httpx2.Timeout(5, read=None),
                limits=httpx2.Limits(max_connections=8192, max_keepalive_connections=8192),
            )
        )

    @app.post("/v1/chat/completions")
    async def chat() -> Any:
        client = clients[0]
        body = await request.get_data()
        upstream_request = client.build_request(
            "POST", upstream_url, content=body, headers={"content-type": "application/json"}
        )
        response = await client.send(upstream_request, stream=True)
        return Response(Relay(response), status=response.status_code, headers={"content-type": "text/event-stream"})

    return app


def main() -> None:
    port, upstream_port = int(sys.argv[1]), int(sys.argv[2])
    config = Config()
    config.bind = [f"127.0.0.1:{port}"]
    config.backlog = LISTEN_BACKLOG  # as Sluice and hypercorn-floor: a burst of connects is not dropped into SYN retries
    app = make_app(f"http://127.0.0.1:{upstream_port}/v1/chat/completions")
    freeze_startup_heap()
    trio.run(serve, app, config)


if __name__ == "__main__":
    main()
