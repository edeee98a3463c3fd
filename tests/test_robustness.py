"""Stalled clients, shutdown, admission, authentication and CORS, through real sockets."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from typing import Any

import httpx2
import trio

from sluice.simulator import simulated_tokens

from .rawclient import RawStream
from .support import GatewayFactory, RunningSimulator, SSEResult, chat_body, parse_sse, stream_chat, wait_until


async def test_a_client_that_stops_reading_is_cut_and_its_upstream_closed(
    start_gateway: GatewayFactory, simulator: RunningSimulator
) -> None:
    gateway = await start_gateway(stall_timeout=1.0, client_sndbuf=8192, buffer_size=4)
    raw = await RawStream.open(gateway.url, chat_body("sim:tokens=50000,itl_ms=1"), rcvbuf=4096)
    await raw.read_head()
    # It never reads again: the kernel aborts the connection after the stall
    # timeout, the stream is cancelled, and the cancellation reaches the upstream.
    await wait_until(lambda: simulator.stats.requests_closed_by_client == 1, timeout=30)
    await wait_until(lambda: gateway.state.metrics.active_streams == 0, timeout=30)
    assert gateway.state.metrics.outcomes["client_disconnect"] == 1


async def stream_in_background(
    nursery: trio.Nursery, http: httpx2.AsyncClient, body: dict[str, Any], simulator: RunningSimulator
) -> list[tuple[httpx2.Response, SSEResult]]:
    """Start one stream in ``nursery``; return once its upstream request is running (the list fills when it ends)."""
    results: list[tuple[httpx2.Response, SSEResult]] = []

    async def run() -> None:
        results.append(await stream_chat(http, body))

    nursery.start_soon(run)
    await wait_until(lambda: simulator.stats.active_requests == 1)
    return results


async def test_draining_ends_open_streams_with_a_visible_error(
    start_gateway: GatewayFactory, simulator: RunningSimulator
) -> None:
    gateway = await start_gateway()
    async with httpx2.AsyncClient(base_url=gateway.url) as http:
        async with trio.open_nursery() as nursery:
            results = await stream_in_background(nursery, http, chat_body("sim:tokens=5000,itl_ms=10"), simulator)
            nursery.start_soon(gateway.state.drain, 0.1)
            await wait_until(lambda: gateway.state.draining)
            health = await http.get("/health")
            refused = await http.post("/v1/chat/completions", json=chat_body("sim"))
        [(_, sse)] = results
    assert health.status_code == 503 and health.json()["status"] == "draining"
    assert health.headers["connection"] == "close"  # keep-alive connections do not outlive the drain
    assert refused.status_code == 503 and refused.json()["error"]["code"] == "server_shutting_down"
    assert sse.error is not None and sse.error["code"] == "server_shutting_down"
    assert not sse.ended_with_done
    await wait_until(lambda: simulator.stats.requests_closed_by_client == 1)


async def test_streams_that_finish_within_the_drain_period_finish_normally(
    start_gateway: GatewayFactory, simulator: RunningSimulator
) -> None:
    gateway = await start_gateway()
    async with httpx2.AsyncClient(base_url=gateway.url) as http:
        async with trio.open_nursery() as nursery:
            results = await stream_in_background(nursery, http, chat_body("sim:tokens=10,itl_ms=20", content="s"), simulator)
            await gateway.state.drain(30)  # returns as soon as the stream is done
        [(_, sse)] = results
    assert sse.ended_with_done
    assert sse.text == "".join(simulated_tokens("s", 10))


async def test_sigterm_drains_and_exits_zero() -> None:
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    with socket_port() as port:
        pass  # released again; the gateway binds it with SO_REUSEADDR
    process = subprocess.Popen(
        [sys.executable, "-m", "sluice.cli", "serve", "--port", str(port), "--drain-timeout", "0.3"],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    try:
        async with httpx2.AsyncClient(base_url=f"http://127.0.0.1:{port}", timeout=10) as http:
            with trio.fail_after(30):
                while True:
                    try:
                        if (await http.get("/health")).status_code == 200:
                            break
                    except httpx2.TransportError:
                        await trio.sleep(0.1)
            raw = b""
            signalled = False
            async with http.stream(
                "POST", "/v1/chat/completions", json=chat_body("sim:tokens=5000,itl_ms=10")
            ) as response:
                async for chunk in response.aiter_raw():
                    raw += chunk
                    if not signalled and b'"content"' in raw:
                        process.send_signal(signal.SIGTERM)  # mid-stream
                        signalled = True
        sse = parse_sse(raw)
        assert sse.error is not None and sse.error["code"] == "server_shutting_down"
        assert await trio.to_thread.run_sync(lambda: process.wait(timeout=30)) == 0
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()


class socket_port:
    """A free TCP port on 127.0.0.1 (closed again before use)."""

    def __enter__(self) -> int:
        import socket

        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        return self.sock.getsockname()[1]

    def __exit__(self, *exc: object) -> None:
        self.sock.close()


async def test_over_the_stream_cap_new_requests_get_503_with_retry_after(
    start_gateway: GatewayFactory, simulator: RunningSimulator
) -> None:
    gateway = await start_gateway(max_streams=1)
    raw = await RawStream.open(gateway.url, chat_body("sim:tokens=1000,itl_ms=10"))
    await raw.read_until(b"data: {")
    async with httpx2.AsyncClient(base_url=gateway.url) as http:
        response = await http.post("/v1/chat/completions", json=chat_body("sim"))
    assert response.status_code == 503
    assert response.headers["retry-after"] == "1"
    assert response.json()["error"]["code"] == "overloaded"
    await raw.close_fin()


async def test_gateway_api_keys_guard_the_api(start_gateway: GatewayFactory) -> None:
    gateway = await start_gateway(api_keys="key-one,key-two")
    async with httpx2.AsyncClient(base_url=gateway.url) as http:
        missing = await http.post("/v1/chat/completions", json=chat_body("sim:tokens=2", stream=False))
        wrong = await http.get("/v1/models", headers={"authorization": "Bearer nope"})
        right = await http.post(
            "/v1/chat/completions",
            json=chat_body("sim:tokens=2", stream=False),
            headers={"authorization": "Bearer key-two"},
        )
        health = await http.get("/health")
    for response in (missing, wrong):
        assert response.status_code == 401
        assert set(response.json()["error"]) == {"message", "type", "param", "code"}
        assert response.json()["error"]["code"] == "invalid_api_key"
    assert right.status_code == 200
    assert health.status_code == 200


async def test_cors_is_off_unless_configured(start_gateway: GatewayFactory) -> None:
    closed = await start_gateway()
    opened = await start_gateway(cors_origins="https://app.example")
    origin = {"origin": "https://app.example"}
    async with httpx2.AsyncClient() as http:
        off = await http.get(closed.url + "/health", headers=origin)
        on = await http.get(opened.url + "/health", headers=origin)
        other = await http.get(opened.url + "/health", headers={"origin": "https://evil.example"})
        preflight = await http.options(
            opened.url + "/v1/chat/completions",
            headers={**origin, "access-control-request-method": "POST", "access-control-request-headers": "content-type"},
        )
    assert "access-control-allow-origin" not in off.headers
    assert on.headers["access-control-allow-origin"] == "https://app.example"
    assert "access-control-allow-credentials" not in on.headers
    assert "access-control-allow-origin" not in other.headers
    assert preflight.headers["access-control-allow-origin"] == "https://app.example"
