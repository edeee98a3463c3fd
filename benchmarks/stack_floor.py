"""The stack floor: Sluice's shape as a raw ASGI callable on hypercorn, reading the upstream with httpx2.

``python -m benchmarks.stack_floor PORT UPSTREAM_PORT``

What trio-floor is to trio, this is to the stack Sluice is fixed to:
hypercorn (trio worker) serving a bare ASGI callable (no Quart), httpx2 for
the upstream request and ``sluice.upstream_body.UpstreamBody`` for its body,
a producer and a consumer joined by a bounded memory channel, the
upstream's bytes passed through untouched (no SSE framing, no figures, no
error events, no limits, no metrics). Everything Sluice spends above it is
Quart and Sluice's own work; everything it spends above hypercorn-floor
(the same shape with a raw socket upstream) is httpx2's.
"""

from __future__ import annotations

import sys
from typing import Any

import httpx2
import trio
from hypercorn.config import Config
from hypercorn.trio import serve

from sluice.server import LISTEN_BACKLOG, freeze_startup_heap
from sluice.upstream_body import UpstreamBody

from .hypercorn_floor import lifespan, pump

HEAD = [(b"content-type", b"text/event-stream"), (b"cache-control", b"no-cache")]


def make_app(upstream_url: str) -> Any:
    client = httpx2.AsyncClient(
        timeout=httpx2.Timeout(5, read=None),
        limits=httpx2.Limits(max_connections=8192, max_keepalive_connections=8192),
    )

    async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] == "lifespan":
            await lifespan(receive, send)
            return
        body = b""
        while True:
            message = await receive()
            body += message.get("body", b"")
            if not message.get("more_body"):
                break
        request = client.build_request("POST", upstream_url, content=body, headers={"content-type": "application/json"})
        response = await client.send(request, stream=True)
        try:
            await send({"type": "http.response.start", "status": response.status_code, "headers": HEAD})

            async def produce(sender: trio.MemorySendChannel[bytes]) -> None:
                async with sender:
                    upstream_body = UpstreamBody(response)
                    try:
                        while chunk := await upstream_body.read():
                            await sender.send(chunk)
                    finally:
                        await upstream_body.aclose()

            await pump(produce, receive, send)
        finally:
            with trio.CancelScope(shield=True):
                await response.aclose()

    return app


def main() -> None:
    port, upstream_port = int(sys.argv[1]), int(sys.argv[2])
    config = Config()
    config.bind = [f"127.0.0.1:{port}"]
    config.keep_alive_timeout = 75
    config.backlog = LISTEN_BACKLOG  # as Sluice and hypercorn-floor: a burst of connects is not dropped into SYN retries
    app = make_app(f"http://127.0.0.1:{upstream_port}/v1/chat/completions")
    freeze_startup_heap()  # the garbage collector set as Sluice sets it
    trio.run(serve, app, config)


if __name__ == "__main__":
    main()
