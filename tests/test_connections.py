"""The HTTP/1.1 connection around the streams: kept alive when it can be, closed when it must be (issue 14, items 1-4).

Every test here talks over one raw socket (``RawConnection``) or a pooled
client held to one connection, because the bugs these guard against are
invisible to a client that opens a fresh connection per request: the
response is right, and the *next* request on the same connection hangs.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import AsyncIterator

import httpx2
import pytest
import trio

from deploy.fleet import free_port

from sluice.config import DeploymentConfig, ModelConfig

from .rawclient import RawConnection
from .support import Gateway, GatewayFactory, RunningSimulator, chat_body, wait_until

HANG_GUARD = 20  # seconds: only ends a wait that would otherwise hang; a pass takes milliseconds


@pytest.fixture
async def connection(gateway: Gateway) -> AsyncIterator[RawConnection]:
    conn = await RawConnection.open(gateway.url)
    yield conn
    await conn.aclose()


async def routed_gateway(start_gateway: GatewayFactory, simulator: RunningSimulator) -> Gateway:
    """A gateway with a model table: an unknown /v1 route is refused from the head (nothing to pass it through to)."""
    deployment = DeploymentConfig(base_url=simulator.base_url, model="sim:tokens=3")
    return await start_gateway(models=[ModelConfig(name="sim:tokens=3", deployments=[deployment])])


def chat_bytes(**extra: object) -> bytes:
    return json.dumps(chat_body("sim:tokens=3", stream=False, **extra)).encode()


# --- 1. a response sent before the request body was read -------------------------------


async def test_an_unknown_route_with_a_large_body_answers_404_and_the_connection_serves_the_next_request(
    start_gateway: GatewayFactory, simulator: RunningSimulator
) -> None:
    gateway = await routed_gateway(start_gateway, simulator)
    connection = await RawConnection.open(gateway.url)
    async with connection.stream:
        with trio.fail_after(HANG_GUARD):
            await connection.send_request("POST", "/v1/no-such-route", b"x" * 300_000, pause_after=1000)
            status, headers, body = await connection.read_response()
            assert status == 404 and json.loads(body)["error"]["type"] == "invalid_request_error"
            assert headers.get("connection") != "close"  # drained, so kept alive
            await connection.send_request("GET", "/health")
            assert (await connection.read_response())[0] == 200
            await connection.send_request("POST", "/v1/chat/completions", chat_bytes(), headers={"content-type": "application/json"})
            status, _, body = await connection.read_response()
        assert status == 200 and json.loads(body)["choices"][0]["message"]["content"]


async def test_a_401_sent_before_the_body_was_read_keeps_the_connection_usable(start_gateway: GatewayFactory) -> None:
    gateway = await start_gateway(api_keys=["sk-gateway"])
    connection = await RawConnection.open(gateway.url)
    async with connection.stream:
        with trio.fail_after(HANG_GUARD):
            padded = chat_bytes(user="u" * 200_000)
            await connection.send_request(
                "POST", "/v1/chat/completions", padded, headers={"content-type": "application/json"}, pause_after=1000
            )
            assert (await connection.read_response())[0] == 401
            await connection.send_request(
                "POST",
                "/v1/chat/completions",
                chat_bytes(),
                headers={"content-type": "application/json", "authorization": "Bearer sk-gateway"},
            )
            assert (await connection.read_response())[0] == 200


async def test_an_announced_oversize_body_gets_413_with_connection_close_and_then_eof(start_gateway: GatewayFactory) -> None:
    gateway = await start_gateway(max_body_bytes=4096)
    connection = await RawConnection.open(gateway.url)
    async with connection.stream:
        with trio.fail_after(HANG_GUARD):
            # The head announces 10 MB; only 1 KB follows. Waiting for the rest would
            # hold the error for nothing: the gateway answers at once and closes.
            await connection.send_raw(
                b"POST /v1/chat/completions HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\n"
                b"content-length: 10000000\r\n\r\n" + b"{" * 1024
            )
            status, headers, body = await connection.read_response()
            assert status == 413 and headers["connection"] == "close"
            assert json.loads(body)["error"]["code"] == "request_too_large"
            assert await connection.read_until_eof() == b""


async def test_a_chunked_body_over_the_limit_gets_413_and_the_connection_closes(start_gateway: GatewayFactory) -> None:
    gateway = await start_gateway(max_body_bytes=4096)
    connection = await RawConnection.open(gateway.url)
    async with connection.stream:
        with trio.fail_after(HANG_GUARD):
            chunk = b"x" * 3000
            await connection.send_raw(
                b"POST /v1/chat/completions HTTP/1.1\r\nhost: x\r\ntransfer-encoding: chunked\r\n\r\n"
                + (b"%x\r\n%s\r\n" % (len(chunk), chunk)) * 3  # 9 000 bytes, no end in sight
            )
            status, headers, _ = await connection.read_response()
            assert status == 413 and headers["connection"] == "close"
            assert await connection.read_until_eof() == b""


async def test_a_pooled_client_keeps_working_after_early_errors_on_its_one_connection(
    start_gateway: GatewayFactory, simulator: RunningSimulator
) -> None:
    """What the ``openai`` SDK met: after a 404 with a body, its next call on the pooled connection hung."""
    gateway = await routed_gateway(start_gateway, simulator)
    opened: list[object] = []

    async def count_connections(request: httpx2.Request) -> None:
        # httpcore2 reports each new connection through its trace hook.
        async def trace(name: str, info: dict[str, object]) -> None:
            if name == "connection.connect_tcp.complete":
                opened.append(info)

        request.extensions["trace"] = trace

    limits = httpx2.Limits(max_connections=1, max_keepalive_connections=1)
    async with httpx2.AsyncClient(base_url=gateway.url, limits=limits, timeout=HANG_GUARD,
                                  event_hooks={"request": [count_connections]}) as client:
        with trio.fail_after(HANG_GUARD * 3):
            for _ in range(3):
                response = await client.post("/v1/no-such-route", content=b"y" * 300_000)
                assert response.status_code == 404
            for _ in range(10):
                response = await client.post("/v1/chat/completions", json=chat_body("sim:tokens=3", stream=False))
                assert response.status_code == 200
    assert len(opened) == 1


async def test_the_openai_sdk_keeps_working_after_a_404_with_a_body(
    start_gateway: GatewayFactory, simulator: RunningSimulator
) -> None:
    openai = pytest.importorskip("openai")
    gateway = await routed_gateway(start_gateway, simulator)

    def calls() -> list[str]:
        client = openai.OpenAI(base_url=gateway.base_url, api_key="unused", max_retries=0, timeout=HANG_GUARD)
        with client:
            try:
                client.post("/no-such-route", cast_to=object, body={"input": "z" * 300_000})
            except openai.NotFoundError:
                pass
            return [
                client.chat.completions.create(
                    model="sim:tokens=3", messages=[{"role": "user", "content": "hi"}]
                ).choices[0].message.content or ""
                for _ in range(5)
            ]

    with trio.fail_after(HANG_GUARD * 3):
        answers = await trio.to_thread.run_sync(calls, abandon_on_cancel=True)
    assert len(answers) == 5 and all(answers)


async def test_the_gateway_closes_the_connection_after_a_connection_close_response(gateway: Gateway) -> None:
    """A client that asked for ``Connection: close`` and waits for EOF gets it; otherwise it holds an fd and a task forever."""
    connection = await RawConnection.open(gateway.url)
    async with connection.stream:
        await connection.send_raw(b"GET /health HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n")
        with trio.fail_after(HANG_GUARD):
            received = await connection.read_until_eof()
    assert received.startswith(b"HTTP/1.1 200")


# --- 2. idle keep-alive connections ------------------------------------------------------


async def test_an_idle_keep_alive_connection_is_closed_at_the_keep_alive_timeout(start_gateway: GatewayFactory) -> None:
    gateway = await start_gateway(keep_alive_timeout=0.5, request_head_timeout=30)
    connection = await RawConnection.open(gateway.url)
    async with connection.stream:
        with trio.fail_after(HANG_GUARD):
            await connection.send_request("GET", "/health")
            assert (await connection.read_response())[0] == 200
            await connection.send_request(
                "POST", "/v1/chat/completions", json.dumps(chat_body("sim:tokens=3")).encode(),
                headers={"content-type": "application/json"},
            )
            status, _, body = await connection.read_response()
            assert status == 200 and body.endswith(b"data: [DONE]\n\n")
            assert await connection.read_until_eof() == b""
    await wait_until(lambda: gateway.state.metrics.active_streams == 0, timeout=HANG_GUARD)


# --- 3. a request head that never completes --------------------------------------------


@pytest.mark.parametrize("sent", [b"", b"GET /health HTTP/1.1\r\nhost: x\r\n"], ids=["nothing", "half a head"])
async def test_a_connection_that_never_completes_a_request_head_is_closed_at_the_head_timeout(
    start_gateway: GatewayFactory, sent: bytes
) -> None:
    gateway = await start_gateway(keep_alive_timeout=300, request_head_timeout=0.5)
    connection = await RawConnection.open(gateway.url)
    async with connection.stream:
        await connection.send_raw(sent)
        with trio.fail_after(HANG_GUARD):
            assert await connection.read_until_eof() == b""


async def test_a_half_sent_second_request_is_held_only_for_the_head_timeout(start_gateway: GatewayFactory) -> None:
    """The keep-alive wait ends when the next request starts: from its first byte, the head timeout applies."""
    gateway = await start_gateway(keep_alive_timeout=300, request_head_timeout=0.5)
    connection = await RawConnection.open(gateway.url)
    async with connection.stream:
        with trio.fail_after(HANG_GUARD):
            await connection.send_request("GET", "/health")
            assert (await connection.read_response())[0] == 200
            await connection.send_raw(b"GET /he")
            assert await connection.read_until_eof() == b""


async def test_requests_outlasting_both_deadlines_are_served_whole_then_the_keep_alive_wait_closes(
    start_gateway: GatewayFactory,
) -> None:
    """The idle timer runs only while the connection waits for a head or between requests.

    Each request here takes ~0.8 s against deadlines of 0.25 s: a timer not
    stopped when a head came (or a stale one acting after a restart) would
    cut them.
    """
    gateway = await start_gateway(keep_alive_timeout=0.25, request_head_timeout=0.25)
    connection = await RawConnection.open(gateway.url)
    async with connection.stream:
        with trio.fail_after(HANG_GUARD):
            for _ in range(2):
                await connection.send_request(
                    "POST", "/v1/chat/completions", json.dumps(chat_body("sim:tokens=8,itl_ms=100")).encode(),
                    headers={"content-type": "application/json"},
                )
                status, _, body = await connection.read_response()
                assert status == 200 and body.endswith(b"data: [DONE]\n\n")
                assert body.count(b'"content"') >= 8
            assert await connection.read_until_eof() == b""  # then the keep-alive wait ends it
    await wait_until(lambda: gateway.state.metrics.active_streams == 0, timeout=HANG_GUARD)


async def test_a_slow_but_complete_head_is_served(start_gateway: GatewayFactory) -> None:
    gateway = await start_gateway(keep_alive_timeout=300, request_head_timeout=5)
    connection = await RawConnection.open(gateway.url)
    async with connection.stream:
        with trio.fail_after(HANG_GUARD):
            for piece in (b"GET /hea", b"lth HTTP/1.1\r\n", b"host: x\r\n\r\n"):
                await connection.send_raw(piece)
                await trio.sleep(0.05)
            assert (await connection.read_response())[0] == 200


async def test_connections_the_client_closes_are_released_at_once_not_at_their_deadline(start_gateway: GatewayFactory) -> None:
    gateway = await start_gateway(keep_alive_timeout=300, request_head_timeout=300)
    before = len(os.listdir("/proc/self/fd"))  # gateway and test share this process
    for used in (False, True) * 10:
        connection = await RawConnection.open(gateway.url)
        if used:  # idle between requests, or never used: both must go when the client goes
            await connection.send_request("GET", "/health")
            await connection.read_response()
        await connection.aclose()
    await wait_until(lambda: len(os.listdir("/proc/self/fd")) <= before, timeout=HANG_GUARD)


# --- 4. conflicting framing headers ------------------------------------------------------


async def test_content_length_together_with_transfer_encoding_is_refused_with_400_and_closed(
    connection: RawConnection, gateway: Gateway, simulator: RunningSimulator
) -> None:
    body = json.dumps(chat_body("sim:tokens=3", stream=False)).encode()
    with trio.fail_after(HANG_GUARD):
        await connection.send_raw(
            b"POST /v1/chat/completions HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\n"
            b"content-length: 4\r\ntransfer-encoding: chunked\r\n\r\n"
            + b"%x\r\n%s\r\n0\r\n\r\n" % (len(body), body)
        )
        status, headers, error = await connection.read_response()
        assert status == 400 and headers["connection"] == "close"
        assert json.loads(error)["error"]["code"] == "conflicting_framing"
        assert await connection.read_until_eof() == b""
    assert simulator.stats.requests_started == 0  # nothing reached the upstream


# --- 2. the fd limit ---------------------------------------------------------------------


async def test_at_the_fd_limit_the_gateway_serves_its_connections_and_sheds_new_ones_with_one_log_line(
    simulator: RunningSimulator, tmp_path: object
) -> None:
    """A real process with RLIMIT_NOFILE = 128: idle connections fill it, accepts then fail with EMFILE."""
    port = free_port()
    code = (
        "import resource, sys; resource.setrlimit(resource.RLIMIT_NOFILE, (128, 128));"
        "from sluice.cli import main; sys.exit(main())"
    )
    process = subprocess.Popen(
        [sys.executable, "-c", code, "serve", "--port", str(port), "--upstream-base-url", simulator.base_url,
         "--keep-alive-timeout", "300", "--request-head-timeout", "300"],
        env={k: v for k, v in os.environ.items() if k != "PROMETHEUS_MULTIPROC_DIR"},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    url = f"http://127.0.0.1:{port}"
    held: list[RawConnection] = []
    try:
        with trio.fail_after(60):
            while True:
                try:
                    first = await RawConnection.open(url)
                    break
                except OSError:
                    assert process.poll() is None, "the gateway exited"
                    await trio.sleep(0.1)
            held.append(first)
            stream_request = json.dumps(chat_body("sim:tokens=3")).encode()
            await first.send_request("POST", "/v1/chat/completions", stream_request, headers={"content-type": "application/json"})
            assert (await first.read_response())[0] == 200  # and the upstream connection it used is pooled
            # Fill the fd table with idle connections (each costs the gateway one fd).
            for _ in range(160):
                held.append(await RawConnection.open(url))
            # A new connection is accepted and turned away with a 503, not left in the backlog.
            shed = await RawConnection.open(url)
            held.append(shed)
            await shed.send_request("GET", "/health")
            status, headers, body = await shed.read_response()
            assert status == 503 and headers["connection"] == "close" and headers["retry-after"]
            assert json.loads(body)["error"]["code"] == "too_many_connections"
            # The connection the gateway holds still serves, streams included (on the pooled upstream connection).
            await first.send_request("POST", "/v1/chat/completions", stream_request, headers={"content-type": "application/json"})
            status, _, body = await first.read_response()
            assert status == 200 and body.endswith(b"data: [DONE]\n\n")
            for _ in range(20):  # many more refusals: still one log line
                extra = await RawConnection.open(url)
                await extra.send_request("GET", "/health")
                assert (await extra.read_response())[0] == 503
                await extra.aclose()
            # Capacity comes back when idle connections go: accepts work again.
            for conn in held[1:]:
                await conn.aclose()
            del held[1:]
            while True:
                again = await RawConnection.open(url)
                await again.send_request("GET", "/health")
                status = (await again.read_response())[0]
                await again.aclose()
                if status == 200:
                    break
                await trio.sleep(0.1)
    finally:
        # The process goes first: a cancelled test must not leave a gateway behind.
        process.terminate()
        try:
            _, stderr = await trio.to_thread.run_sync(lambda: process.communicate(timeout=60))
        except BaseException:
            process.kill()
            _, stderr = process.communicate()
            raise
        finally:
            for conn in held:
                conn.stream.socket.close()
    log = stderr.decode()
    assert "Traceback" not in log
    started = [line for line in log.splitlines() if "file descriptor limit reached" in line]
    ended = [json.loads(line) for line in log.splitlines() if '"connections_shed"' in line]
    assert len(started) == 1, log[-3000:]  # one line when shedding starts, not one per accept
    assert len(ended) == 1 and ended[0]["count"] >= 21  # and one when it ends, with the count


# --- the body's chunked framing, written by the gateway itself --------------------------


async def test_streams_framed_by_the_gateway_are_whole_chunked_bodies_and_the_connection_serves_the_next_request(
    connection: RawConnection,
) -> None:
    # GatewayTCPServer.write_body frames a stream's chunks itself, outside
    # h11: a strict client (h11) must read every byte as valid chunked
    # framing, and the server's h11 must still end the response and start the
    # next cycle, or the next request on the socket would hang.
    from sluice.simulator import simulated_tokens

    with trio.fail_after(HANG_GUARD):
        for n, model in enumerate(["sim:tokens=30,itl_ms=2", "sim:tokens=300", "sim:tokens=1"]):
            await connection.send_request(
                "POST", "/v1/chat/completions", json.dumps(chat_body(model, content=f"story {n}")).encode()
            )
            status, headers, body = await connection.read_response()
            assert status == 200 and headers["transfer-encoding"] == "chunked"
            events = body.split(b"\n\n")
            assert events.pop() == b"" and events[-1] == b"data: [DONE]" and events[-2].startswith(b": sluice ")
            text = "".join(
                json.loads(event[6:])["choices"][0]["delta"].get("content") or ""
                for event in events[:-2]
            )
            assert text == "".join(simulated_tokens(f"story {n}", int(model.split("=")[1].split(",")[0])))
        await connection.send_request("POST", "/v1/chat/completions", chat_bytes())
        status, _, body = await connection.read_response()
        assert status == 200 and json.loads(body)["choices"][0]["message"]["content"]
