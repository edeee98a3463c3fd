"""The upstream pool survives cancelled requests (why httpx2, not httpx 0.28.1).

httpcore 1.0.9 could leave a dead connection in the pool when a request was
cancelled mid-body (httpcore issue 1093). This cancels many streams
mid-body, then checks that the same client still serves every request.
"""

from __future__ import annotations

import ssl

import httpx2
import pytest
import trio
import trustme
from httpcore2._backends.trio import TrioStream

from sluice.policies import RetryPolicy
from sluice.upstream import UpstreamClient
from sluice.upstream_body import UpstreamBody
from sluice.upstream_pool import UpstreamTransport

from .support import GatewayFactory, RunningSimulator, wait_until


async def test_pool_still_serves_after_many_cancelled_streams(simulator: RunningSimulator) -> None:
    upstream = UpstreamClient(
        simulator.base_url, api_key=None, max_connections=16, connect_timeout=5, retry_policy=RetryPolicy(max_attempts=1)
    )
    body = b'{"model":"sim:tokens=1000,itl_ms=5","stream":true,"messages":[{"role":"user","content":"x"}]}'

    async def cancelled_mid_body() -> None:
        with trio.CancelScope() as scope:
            response = await upstream.open_chat_stream(body)
            try:
                async for _ in response.aiter_raw():
                    scope.cancel()  # mid-body: the first bytes are in, the rest never read
            finally:
                with trio.CancelScope(shield=True):
                    await response.aclose()

    async with trio.open_nursery() as nursery:
        for _ in range(64):
            nursery.start_soon(cancelled_mid_body)
    await wait_until(lambda: simulator.stats.requests_closed_by_client == 64)

    quick = b'{"model":"sim:tokens=3","messages":[{"role":"user","content":"x"}]}'
    with trio.fail_after(10):
        for _ in range(32):
            response = await upstream.chat_completion(quick)
            assert response.status_code == 200
    await upstream.aclose()


async def test_a_chat_request_is_the_one_build_request_would_make() -> None:
    # UpstreamClient builds chat requests from parts prepared once (for speed);
    # they must not differ from httpx2's own build_request in anything sent.
    upstream = UpstreamClient(
        "https://api.example.com/v1", api_key="sk-test", max_connections=4, connect_timeout=3,
        retry_policy=RetryPolicy(max_attempts=1),
    )
    body = b'{"model":"m","stream":true,"messages":[]}'
    ours = upstream.chat_request(body)
    theirs = upstream._client.build_request(
        "POST", "chat/completions", content=body, headers={"content-type": "application/json"}
    )
    assert (ours.method, ours.url, ours.headers.raw, ours.extensions) == (
        theirs.method, theirs.url, theirs.headers.raw, theirs.extensions
    )
    assert ours.url == "https://api.example.com/v1/chat/completions"
    assert ours.headers["authorization"] == "Bearer sk-test"
    assert ours.content == body
    await upstream.aclose()


# --- the pool probes an idle socket only when it is used (issue 17) ------------------------------------


class KeepAliveServer:
    """A raw HTTP/1.1 upstream on 127.0.0.1: answers every request on a connection with a small JSON 200.

    With ``close_after_response`` it closes each connection right after its
    first response, without ``connection: close``: what an upstream whose
    keep-alive timeout fired does to a connection the client keeps pooled.
    """

    def __init__(
        self, *, close_after_response: bool = False, tls: ssl.SSLContext | None = None, set_cookie: bool = False
    ) -> None:
        self.close_after_response = close_after_response
        #: answer every request with a ``set-cookie`` (as some providers' load balancers do)
        self.set_cookie = set_cookie
        #: every request head received, in order
        self.heads: list[bytes] = []
        self.tls = tls
        self.requests = 0
        self.connections = 0
        #: connections the client closed (EOF read while waiting for a request)
        self.closed_by_client = 0
        self.closed_by_server = 0
        self.port = 0

    async def serve(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
        self.port = listeners[0].socket.getsockname()[1]
        task_status.started()
        await trio.serve_listeners(self._handle, listeners)

    async def _handle(self, plain: trio.SocketStream) -> None:
        self.connections += 1
        stream: trio.abc.Stream = trio.SSLStream(plain, self.tls, server_side=True) if self.tls else plain
        buffer = b""
        async with stream:
            while True:
                while b"\r\n\r\n" not in buffer:
                    data = await stream.receive_some(65536)
                    if not data:
                        self.closed_by_client += 1
                        return
                    buffer += data
                head, _, buffer = buffer.partition(b"\r\n\r\n")
                self.heads.append(head)
                length = next(
                    (int(line.split(b":", 1)[1]) for line in head.split(b"\r\n") if line.lower().startswith(b"content-length:")),
                    0,
                )
                while len(buffer) < length:
                    buffer += await stream.receive_some(65536)
                buffer = buffer[length:]
                self.requests += 1
                body = b'{"ok":true}'
                cookie = b"set-cookie: affinity=client-%d; Path=/\r\n" % self.requests if self.set_cookie else b""
                await stream.send_all(
                    b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\n%scontent-length: %d\r\n\r\n%s"
                    % (cookie, len(body), body)
                )
                if self.close_after_response:
                    self.closed_by_server += 1
                    return


def _client_for(server: KeepAliveServer, **kwargs: object) -> UpstreamClient:
    return UpstreamClient(
        f"http://127.0.0.1:{server.port}/v1", api_key=None, connect_timeout=5,
        retry_policy=RetryPolicy(max_attempts=1), **kwargs,  # type: ignore[arg-type]
    )


async def test_a_connection_the_upstream_closed_while_idle_does_not_fail_the_next_request(nursery: trio.Nursery) -> None:
    server = KeepAliveServer(close_after_response=True)
    await nursery.start(server.serve)
    failures: list[str] = []
    upstream = _client_for(server, max_connections=4, on_failure=failures.append)
    with trio.fail_after(10):
        for expected in range(1, 6):
            response = await upstream.complete("/chat/completions", b"{}")
            assert response.status_code == 200
            # the pooled connection is now one the server closed: the next
            # request must go out on a new one, not fail on this one
            await wait_until(lambda: server.closed_by_server == expected)
    assert server.requests == 5 and server.connections == 5
    assert failures == []  # no attempt failed: nothing was retried
    await upstream.aclose()


async def test_an_idle_connection_past_its_keep_alive_is_closed_by_a_request_that_does_not_use_it(
    nursery: trio.Nursery,
) -> None:
    # The keep-alive timer still runs on every pool pass, without a probe: a
    # request to another origin closes the expired idle connections it does not use.
    server = KeepAliveServer()
    await nursery.start(server.serve)
    limits = httpx2.Limits(max_connections=4, max_keepalive_connections=4, keepalive_expiry=0.05)
    async with httpx2.AsyncClient(transport=UpstreamTransport(limits=limits)) as client:
        with trio.fail_after(10):
            async with trio.open_nursery() as both:  # two connections, both idle afterwards
                for _ in range(2):
                    both.start_soon(client.post, f"http://127.0.0.1:{server.port}/v1/x")
            assert server.connections == 2
            await trio.sleep(0.2)  # past the expiry: a bound, not a measurement
            response = await client.post(f"http://localhost:{server.port}/v1/x")
            assert response.status_code == 200
            await wait_until(lambda: server.closed_by_client == 2)
        assert server.connections == 3


async def test_a_request_probes_at_most_the_idle_connection_it_uses(nursery: trio.Nursery, monkeypatch: pytest.MonkeyPatch) -> None:
    # httpcore2's own pool polls every idle connection on each of the two pool
    # passes of a request: with 16 idle connections, ~30 poll calls a request.
    server = KeepAliveServer()
    await nursery.start(server.serve)
    upstream = _client_for(server, max_connections=32)
    with trio.fail_after(10):
        async with trio.open_nursery() as many:  # 16 pooled connections
            gate = trio.Event()

            async def one() -> None:
                await gate.wait()
                await upstream.complete("/chat/completions", b"{}")

            for _ in range(16):
                many.start_soon(one)
            await trio.sleep(0)
            gate.set()
        assert server.connections == 16
        probes = 0
        get_extra_info = TrioStream.get_extra_info

        def counting(self: TrioStream, info: str) -> object:
            nonlocal probes
            probes += info == "is_readable"
            return get_extra_info(self, info)

        monkeypatch.setattr(TrioStream, "get_extra_info", counting)
        for _ in range(10):
            response = await upstream.complete("/chat/completions", b"{}")
            assert response.status_code == 200
    assert server.connections == 16  # every request reused an idle connection
    assert 0 < probes <= 10  # one probe a request, on the connection it uses
    await upstream.aclose()


async def test_a_first_attempt_that_succeeds_never_builds_a_retry_controller(
    nursery: trio.Nursery, monkeypatch: pytest.MonkeyPatch
) -> None:
    # tenacity's controller costs ~60 us a request: only a retry pays for it.
    server = KeepAliveServer()
    await nursery.start(server.serve)
    upstream = _client_for(server, max_connections=4)
    upstream.retry_policy = RetryPolicy(max_attempts=3)
    built: list[RetryPolicy] = []
    retrying = RetryPolicy.retrying

    def recording(self: RetryPolicy, **kwargs: object) -> object:
        built.append(self)
        return retrying(self, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(RetryPolicy, "retrying", recording)
    with trio.fail_after(10):
        response = await upstream.complete("/chat/completions", b"{}")
        assert response.status_code == 200
        stream = await upstream.open_stream("/chat/completions", b"{}")
        await stream.aclose()
    assert built == []
    await upstream.aclose()


async def test_a_request_s_head_and_body_go_out_in_one_write(nursery: trio.Nursery, monkeypatch: pytest.MonkeyPatch) -> None:
    # httpcore2 writes the head and the body separately: two sends a request.
    server = KeepAliveServer()
    await nursery.start(server.serve)
    upstream = _client_for(server, max_connections=4)
    sends: list[int] = []
    send_all = trio.SocketStream.send_all

    async def counting(self: trio.SocketStream, data: bytes) -> None:
        if not bytes(data).startswith(b"HTTP/1.1 "):  # the server's answers are sent in this process too
            sends.append(len(data))
        await send_all(self, data)

    with trio.fail_after(10):
        await upstream.complete("/chat/completions", b"{}")  # connected; the next request reuses it
        monkeypatch.setattr(trio.SocketStream, "send_all", counting)
        body = b'{"model":"m","messages":[]}'
        response = await upstream.complete("/chat/completions", body)
        assert response.status_code == 200
        assert len(sends) == 1 and sends[0] > len(body)
        # a body beyond the cork limit goes out whole (the server reads all of it to answer)
        sends.clear()
        response = await upstream.complete("/chat/completions", b"x" * 300_000)
        assert response.status_code == 200
        assert sum(sends) > 300_000
    assert server.requests == 3
    await upstream.aclose()


async def test_a_tls_request_s_head_and_body_go_out_in_one_write(nursery: trio.Nursery, monkeypatch: pytest.MonkeyPatch) -> None:
    authority = trustme.CA()
    server_context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    authority.issue_cert("127.0.0.1").configure_cert(server_context)
    client_context = ssl.create_default_context()
    authority.configure_trust(client_context)
    server = KeepAliveServer(tls=server_context)
    await nursery.start(server.serve)
    limits = httpx2.Limits(max_connections=4, max_keepalive_connections=4)
    writes: list[int] = []
    send_all = trio.SSLStream.send_all

    async def counting(self: trio.SSLStream[trio.SocketStream], data: bytes) -> None:
        if not self.server_side:
            writes.append(len(data))
        await send_all(self, data)

    async with httpx2.AsyncClient(transport=UpstreamTransport(limits=limits, verify=client_context)) as client:
        with trio.fail_after(10):
            url = f"https://127.0.0.1:{server.port}/v1/chat/completions"
            assert (await client.post(url, content=b"{}")).status_code == 200
            monkeypatch.setattr(trio.SSLStream, "send_all", counting)
            response = await client.post(url, content=b'{"model":"m"}')
            assert response.status_code == 200 and response.json() == {"ok": True}
    assert writes and len(writes) == 1
    assert server.requests == 2 and server.connections == 1


# --- requests go out on the transport, not through AsyncClient.send (issue 17) -------------------------


async def test_a_stream_sent_on_the_transport_is_what_client_send_returns_and_is_read_directly(
    simulator: RunningSimulator,
) -> None:
    # UpstreamClient sends on its transport, skipping AsyncClient.send's auth,
    # redirect, cookie and hook machinery; the response must be the one
    # client.send returns in what the gateway reads: its request, its status
    # and headers, and the stream wrapper through which UpstreamBody finds the
    # connection (or the body would be read through aiter_raw, at twice the cost).
    upstream = UpstreamClient(
        simulator.base_url, api_key=None, max_connections=4, connect_timeout=5, retry_policy=RetryPolicy(max_attempts=1)
    )
    body = b'{"model":"sim:tokens=5","stream":true,"messages":[{"role":"user","content":"x"}]}'
    with trio.fail_after(10):
        ours = await upstream.open_chat_stream(body)
        theirs = await upstream._client.send(upstream.chat_request(body), stream=True)
        read = []
        for response in (ours, theirs):
            reader = UpstreamBody(response)
            try:
                assert reader.direct
                parts = []
                while part := await reader.read():
                    parts.append(part)
                read.append(b"".join(parts))
            finally:
                await reader.aclose()
    assert type(ours.stream) is type(theirs.stream)
    assert ours.request.url == theirs.request.url and ours.request.content == body
    assert (ours.status_code, ours.http_version) == (theirs.status_code, theirs.http_version) == (200, "HTTP/1.1")
    assert ours.headers["content-type"] == theirs.headers["content-type"]
    assert read[0].count(b"data: ") == read[1].count(b"data: ") > 5  # 5 tokens, the final chunk(s) and [DONE]
    await upstream.aclose()


async def test_an_upstreams_cookie_never_reaches_another_clients_request(
    nursery: trio.Nursery, start_gateway: GatewayFactory
) -> None:
    # One client per upstream is shared by every client of the gateway: a
    # cookie the upstream set on one answer (a load balancer's affinity, a
    # session) must not go upstream on anyone's later request.
    server = KeepAliveServer(set_cookie=True)
    await nursery.start(server.serve)
    gateway = await start_gateway(upstream_base_url=f"http://127.0.0.1:{server.port}/v1")
    with trio.fail_after(20):
        async with httpx2.AsyncClient(base_url=gateway.url, timeout=10) as client:
            for _ in range(3):
                answered = await client.post("/v1/embeddings", json={"model": "m", "input": "x"})
                assert answered.status_code == 200
                answered = await client.post("/v1/chat/completions", json={"model": "m", "messages": [{"role": "user", "content": "x"}]})
                assert answered.status_code == 200
    assert len(server.heads) == 6
    assert not [head for head in server.heads if b"\r\ncookie:" in head.lower()]
