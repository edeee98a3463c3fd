"""trio-floor: a relay of Sluice's exact shape on raw trio sockets, and nothing else.

Per client connection: read one request, open a connection to the upstream,
forward the request's bytes; then a producer task reads the upstream into a
bounded trio memory channel and a consumer writes to the client, draining
what is queued into one write (the same batching Sluice does). A watcher
notices the client leaving and cancels the nursery, which closes the
upstream socket. No HTTP library, no parsing of the response: the upstream's
bytes pass through untouched.

It is the cost of trio itself for this shape; whatever Sluice spends above
it is Sluice's to explain. Run: ``python -m benchmarks.floor PORT UPSTREAM_PORT``.
"""

from __future__ import annotations

import sys

import trio

CAPACITY = 16


async def relay(client: trio.SocketStream, upstream_port: int) -> None:
    buffer = b""
    while b"\r\n\r\n" not in buffer:
        data = await client.receive_some(65536)
        if not data:
            return
        buffer += data
    head, _, body = buffer.partition(b"\r\n\r\n")
    length = 0
    for line in head.split(b"\r\n"):
        if line.lower().startswith(b"content-length:"):
            length = int(line.split(b":", 1)[1])
    while len(body) < length:
        data = await client.receive_some(65536)
        if not data:
            return
        body += data
    upstream = await trio.open_tcp_stream("127.0.0.1", upstream_port)
    async with upstream:
        await upstream.send_all(head + b"\r\n\r\n" + body)
        send_channel, receive_channel = trio.open_memory_channel[bytes](CAPACITY)
        async with trio.open_nursery() as nursery:

            async def produce() -> None:
                async with send_channel:
                    while data := await upstream.receive_some(65536):
                        await send_channel.send(data)

            async def consume() -> None:
                try:
                    async for data in receive_channel:
                        parts = [data]
                        while True:
                            try:
                                parts.append(receive_channel.receive_nowait())
                            except (trio.WouldBlock, trio.EndOfChannel):
                                break
                        await client.send_all(b"".join(parts) if len(parts) > 1 else data)
                except trio.BrokenResourceError:
                    pass
                nursery.cancel_scope.cancel()

            async def watch_client() -> None:
                try:
                    while await client.receive_some(4096):
                        pass
                except trio.BrokenResourceError:
                    pass
                nursery.cancel_scope.cancel()

            nursery.start_soon(produce)
            nursery.start_soon(consume)
            nursery.start_soon(watch_client)


async def handle(client: trio.SocketStream, upstream_port: int) -> None:
    async with client:
        try:
            await relay(client, upstream_port)
        except (trio.BrokenResourceError, OSError):
            pass


async def main(port: int, upstream_port: int) -> None:
    listeners = await trio.open_tcp_listeners(port, host="127.0.0.1", backlog=4096)
    await trio.serve_listeners(lambda c: handle(c, upstream_port), listeners)


if __name__ == "__main__":
    trio.run(main, int(sys.argv[1]), int(sys.argv[2]))
