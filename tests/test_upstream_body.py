"""Reading an upstream body below httpx2 gives what httpx2 gives, over TCP and TLS, and pools as it does.

A scripted upstream on a real socket writes each response as a list of
separate writes (a short pause between them makes them separate reads), so
each test fixes where the head ends and the body's reads split: inside a
chunk, inside a size line, between a chunk and its CRLF, all in one read.
"""

from __future__ import annotations

import socket
import ssl
import struct
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

import h11
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

#: a script item: the upstream resets the connection (RST) instead of writing
RESET = b"<reset>"

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
                    if write is RESET:
                        tcp = stream.transport_stream if isinstance(stream, trio.SSLStream) else stream
                        assert isinstance(tcp, trio.SocketStream)
                        tcp.socket.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                        return  # closed with SO_LINGER 0: a reset
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


def bulk_writes(chunks: int, with_head: int) -> tuple[list[bytes | None], bytes]:
    """A long body as writes that each end inside a chunk: the head comes with ``with_head`` and a half chunks."""
    events = [b'data: {"n":%d,"choices":[{"delta":{"content":"tok%d"}}]}\n\n' % (n, n) for n in range(chunks)]
    wire = b"".join(chunk(event) for event in events) + b"0\r\n\r\n"
    step = len(chunk(events[0]))  # about: the sizes vary by a few bytes
    cuts = [step * with_head + step // 2] + list(range(step * with_head + step // 2 + 10 * step, len(wire) - step, 10 * step))
    ends = [*cuts, len(wire)]
    writes: list[bytes | None] = [HEAD + wire[: cuts[0]]] + [wire[start:end] for start, end in zip(cuts, ends[1:])]
    return writes, b"".join(events)


async def test_h11_parses_no_body_chunk_and_the_connection_is_reused(
    upstream: tuple[ScriptedUpstream, httpx2.AsyncClient], monkeypatch: pytest.MonkeyPatch
) -> None:
    # h11 parses a chunk at ~5 us, the decoder at ~1.3: feeding h11 the body
    # in step with the decoder cost the bulk shape ~40 % of its CPU per token.
    # Here the head's read carries 3.5 chunks and every later read ends inside one.
    scripted, client = upstream
    writes, payload = bulk_writes(512, with_head=3)
    scripted.scripts = [writes, writes]
    h11_data_events = 0
    next_event = h11.Connection.next_event

    def counting_next_event(self: h11.Connection) -> object:
        nonlocal h11_data_events
        event = next_event(self)
        h11_data_events += isinstance(event, h11.Data)
        return event

    monkeypatch.setattr(h11.Connection, "next_event", counting_next_event)
    assert await fetch(client, scripted.url, direct=True) == (payload, True)
    assert h11_data_events == 0
    assert await fetch(client, scripted.url, direct=True) == (payload, True)
    assert h11_data_events == 0
    assert scripted.connections == 1


async def test_bytes_after_the_last_chunk_keep_the_connection_out_of_the_pool(
    upstream: tuple[ScriptedUpstream, httpx2.AsyncClient],
) -> None:
    scripted, client = upstream
    writes, payload = bulk_writes(40, with_head=1)
    junk = writes[-1] + b"HTTP/1.1 200 OK\r\n"  # type: ignore[operator]
    scripted.scripts = [[*writes[:-1], junk], SPLITS["everything in one read"]]
    assert await fetch(client, scripted.url, direct=True) == (payload, True)
    assert (await fetch(client, scripted.url, direct=True))[0] == PAYLOAD
    assert scripted.connections == 2


async def test_bytes_after_the_last_chunk_in_the_heads_read_keep_the_connection_out_of_the_pool(
    upstream: tuple[ScriptedUpstream, httpx2.AsyncClient],
) -> None:
    scripted, client = upstream
    scripted.scripts = [[HEAD + WIRE + b"HTTP/1.1 200 OK\r\n"], SPLITS["everything in one read"]]
    async with client.stream("POST", scripted.url, content=b"{}") as response:
        body = UpstreamBody(response)
        parts = []
        # the head's read taken in slices, the first ending with the body's end
        while part := await body.read(len(WIRE)):
            parts.append(part)
        await body.aclose()
    assert b"".join(parts) == PAYLOAD
    assert (await fetch(client, scripted.url, direct=True))[0] == PAYLOAD
    assert scripted.connections == 2


async def test_stopping_mid_body_after_the_heads_read_closes_the_connection(
    upstream: tuple[ScriptedUpstream, httpx2.AsyncClient],
) -> None:
    scripted, client = upstream
    writes, _ = bulk_writes(512, with_head=2)
    scripted.scripts = [writes, SPLITS["everything in one read"]]
    async with client.stream("POST", scripted.url, content=b"{}") as response:
        body = UpstreamBody(response)
        received = b""
        while len(received) < 20 * len(EVENTS[0]):  # past the chunks that came with the head
            received += await body.read()
        await body.aclose()
        with trio.fail_after(5):
            while scripted.closed < 1:
                await trio.sleep(0.01)
    assert (await fetch(client, scripted.url, direct=True))[0] == PAYLOAD
    assert scripted.connections == 2


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


async def test_a_reset_mid_body_is_a_read_error_and_the_next_request_gets_a_new_connection(
    upstream: tuple[ScriptedUpstream, httpx2.AsyncClient],
) -> None:
    scripted, client = upstream
    scripted.scripts = [[HEAD, FIRST, RESET], SPLITS["everything in one read"]]
    with pytest.raises(httpx2.ReadError):
        async with client.stream("POST", scripted.url, content=b"{}") as response:
            body = UpstreamBody(response)
            try:
                assert await body.read() == EVENTS[0]
                await body.read()  # the socket was emptied: this read waits, then finds the reset
            finally:
                await body.aclose()
    assert (await fetch(client, scripted.url, direct=True))[0] == PAYLOAD
    assert scripted.connections == 2


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


async def test_the_pinned_httpx2_and_h11_offer_the_connection_to_read_directly(
    upstream: tuple[ScriptedUpstream, httpx2.AsyncClient],
) -> None:
    # If an httpx2/httpcore2 upgrade moves its internals, or an h11 upgrade
    # its receive buffer, this fails (and the gateway would silently fall
    # back to the slower aiter_raw path).
    scripted, client = upstream
    scripted.scripts = [SPLITS["everything in one read"]]
    async with client.stream("POST", scripted.url, content=b"{}") as response:
        assert direct_reader_parts(response) is not None
        await response.aread()
