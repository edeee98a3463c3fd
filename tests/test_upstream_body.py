"""Reading an upstream body below httpx2 gives what httpx2 gives, over TCP and TLS, and pools as it does.

A scripted upstream on a real socket writes each response as a list of
separate writes (a short pause between them makes them separate reads), so
each test fixes where the head ends and the body's reads split: inside a
chunk, inside a size line, between a chunk and its CRLF, all in one read.
"""

from __future__ import annotations

import ssl
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

import httpx2
import pytest
import trio
import trustme

from sluice.upstream_body import UpstreamBody, direct_reader_parts

HEAD = b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ntransfer-encoding: chunked\r\n\r\n"
EVENTS = [b'data: {"n":%d,"choices":[{"delta":{"content":"tok%d"}}]}\n\n' % (n, n) for n in range(5)]
PAYLOAD = b"".join(EVENTS)


def chunk(data: bytes) -> bytes:
    return b"%x\r\n%s\r\n" % (len(data), data)


WIRE = b"".join(chunk(event) for event in EVENTS) + b"0\r\n\r\n"
FIRST = chunk(EVENTS[0])

#: how the head and body reach the client: each item is one write
SPLITS = {
    "head alone, then a chunk per read": [HEAD] + [chunk(e) for e in EVENTS] + [b"0\r\n\r\n"],
    "head with half a chunk": [HEAD + FIRST[:20], FIRST[20:], WIRE[len(FIRST) :]],
    "head with part of a size line": [HEAD + b"3", WIRE[1:]],
    "head with a chunk but not its CRLF": [HEAD + FIRST[:-2], FIRST[-2:] + WIRE[len(FIRST) :]],
    "head with a chunk and half its CRLF": [HEAD + FIRST[:-1], WIRE[len(FIRST) - 1 :]],
    "everything in one read": [HEAD + WIRE],
    "a byte per read": [HEAD] + [FIRST[i : i + 1] for i in range(len(FIRST))] + [WIRE[len(FIRST) :]],
}


@dataclass
class ScriptedUpstream:
    """Answers each request with the next script (a list of writes; ``None`` closes); counts connections."""

    url: str
    scripts: list[list[bytes | None]] = field(default_factory=list)
    connections: int = 0
    closed: int = 0


@pytest.fixture(params=["tcp", "tls"])
async def upstream(request: pytest.FixtureRequest, nursery: trio.Nursery) -> AsyncIterator[tuple[ScriptedUpstream, httpx2.AsyncClient]]:
    tls = request.param == "tls"
    ca = trustme.CA()
    listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
    port = listeners[0].socket.getsockname()[1]
    if tls:
        server_context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        ca.issue_cert("127.0.0.1").configure_cert(server_context)
        listeners = [trio.SSLListener(listener, server_context, https_compatible=True) for listener in listeners]
    scripted = ScriptedUpstream(f"{'https' if tls else 'http'}://127.0.0.1:{port}/v1/chat/completions")

    async def serve_connection(stream: trio.abc.Stream) -> None:
        scripted.connections += 1
        buffer = b""
        try:
            while True:
                while b"\r\n\r\n" not in buffer:
                    data = await stream.receive_some(65536)
                    if not data:
                        return
                    buffer += data
                head, _, buffer = buffer.partition(b"\r\n\r\n")
                length = next(
                    (int(line.split(b":")[1]) for line in head.split(b"\r\n") if line.lower().startswith(b"content-length:")),
                    0,
                )
                while len(buffer) < length:
                    buffer += await stream.receive_some(65536)
                buffer = buffer[length:]
                for write in scripted.scripts.pop(0):
                    if write is None:
                        return
                    await stream.send_all(write)
                    await trio.sleep(0.005)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass
        finally:
            scripted.closed += 1
            await trio.aclose_forcefully(stream)

    await nursery.start(trio.serve_listeners, serve_connection, listeners)
    client_context = ssl.create_default_context()
    ca.configure_trust(client_context)
    async with httpx2.AsyncClient(verify=client_context) as client:
        yield scripted, client


async def read_all(body: UpstreamBody) -> bytes:
    parts = []
    while part := await body.read():
        parts.append(part)
    return b"".join(parts)


async def fetch(client: httpx2.AsyncClient, url: str, *, direct: bool) -> tuple[bytes, bool]:
    async with client.stream("POST", url, content=b"{}") as response:
        if direct:
            body = UpstreamBody(response)
            try:
                return await read_all(body), body.direct
            finally:
                await body.aclose()
        return b"".join([part async for part in response.aiter_raw()]), False


@pytest.mark.parametrize("split", list(SPLITS))
async def test_reads_what_httpx2_reads_and_the_connection_is_reused(
    upstream: tuple[ScriptedUpstream, httpx2.AsyncClient], split: str
) -> None:
    scripted, client = upstream
    scripted.scripts = [SPLITS[split], SPLITS[split], SPLITS[split]]
    through_httpx2, _ = await fetch(client, scripted.url, direct=False)
    read_directly, was_direct = await fetch(client, scripted.url, direct=True)
    assert was_direct
    assert read_directly == through_httpx2 == PAYLOAD
    # The pool took the connection back: the next request reuses it.
    again, _ = await fetch(client, scripted.url, direct=True)
    assert again == PAYLOAD
    assert scripted.connections == 1


async def test_a_body_cut_short_is_a_protocol_error_and_its_connection_is_not_reused(
    upstream: tuple[ScriptedUpstream, httpx2.AsyncClient],
) -> None:
    scripted, client = upstream
    scripted.scripts = [[HEAD, WIRE[:30], None], SPLITS["everything in one read"]]
    with pytest.raises(httpx2.RemoteProtocolError, match="incomplete chunked read"):
        async with client.stream("POST", scripted.url, content=b"{}") as response:
            await _read_until_error(UpstreamBody(response))
    assert (await fetch(client, scripted.url, direct=True))[0] == PAYLOAD
    assert scripted.connections == 2


async def _read_until_error(body: UpstreamBody) -> None:
    try:
        while await body.read():
            pass
    finally:
        await body.aclose()


async def test_malformed_framing_is_a_protocol_error_and_its_connection_is_closed(
    upstream: tuple[ScriptedUpstream, httpx2.AsyncClient],
) -> None:
    scripted, client = upstream
    scripted.scripts = [[HEAD, FIRST + b"zz\r\n"], SPLITS["everything in one read"]]
    with pytest.raises(httpx2.RemoteProtocolError, match="malformed"):
        async with client.stream("POST", scripted.url, content=b"{}") as response:
            await _read_until_error(UpstreamBody(response))
    assert (await fetch(client, scripted.url, direct=True))[0] == PAYLOAD
    assert scripted.connections == 2


async def test_stopping_mid_body_closes_the_connection_at_once(
    upstream: tuple[ScriptedUpstream, httpx2.AsyncClient],
) -> None:
    scripted, client = upstream
    endless = [HEAD] + [chunk(EVENTS[0])] * 400
    scripted.scripts = [endless, SPLITS["everything in one read"]]
    async with client.stream("POST", scripted.url, content=b"{}") as response:
        body = UpstreamBody(response)
        assert await body.read() == EVENTS[0]
        await body.aclose()
        # the upstream sees the close now, not when the response is closed
        with trio.fail_after(5):
            while scripted.closed < 1:
                await trio.sleep(0.01)
    assert (await fetch(client, scripted.url, direct=True))[0] == PAYLOAD
    assert scripted.connections == 2


async def test_a_length_delimited_body_is_read_through_httpx2(
    upstream: tuple[ScriptedUpstream, httpx2.AsyncClient],
) -> None:
    scripted, client = upstream
    head = b"HTTP/1.1 200 OK\r\ncontent-length: %d\r\n\r\n" % len(PAYLOAD)
    scripted.scripts = [[head, PAYLOAD], SPLITS["everything in one read"]]
    assert await fetch(client, scripted.url, direct=True) == (PAYLOAD, False)
    assert await fetch(client, scripted.url, direct=True) == (PAYLOAD, True)
    assert scripted.connections == 1


async def test_the_pinned_httpx2_offers_the_connection_to_read_directly(
    upstream: tuple[ScriptedUpstream, httpx2.AsyncClient],
) -> None:
    # If an httpx2/httpcore2 upgrade moves its internals, this fails (and the
    # gateway would silently fall back to the slower aiter_raw path).
    scripted, client = upstream
    scripted.scripts = [SPLITS["everything in one read"]]
    async with client.stream("POST", scripted.url, content=b"{}") as response:
        assert direct_reader_parts(response) is not None
        await response.aread()
