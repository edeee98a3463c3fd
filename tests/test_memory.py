"""What a client that stops reading costs the gateway, through real sockets.

A stalled client must cost at most its stream's byte budget in the relay and
capped kernel buffers on both of the gateway's sockets; and when the
worker's relays together hold their memory budget, new streams are refused
with 503 and Retry-After, until the memory is given back.
"""

from __future__ import annotations

import json
import socket
from typing import Any

import httpx2
import trio
import trio.testing
from prometheus_client.parser import text_string_to_metric_families

from sluice.config import Settings
from sluice.relay import StreamRelay
from sluice.server import listening_socket
from sluice.upstream import upstream_receive_buffer

from .rawclient import RawStream
from .support import Gateway, GatewayFactory, RunningSimulator, chat_body, parse_sse, wait_until

#: ~1 MB of events, far more than every buffer on the way; the head arrives on its own
#: (ttft_ms), so every body byte goes through the budget's reads
LONG_STREAM = "sim:tokens=6000,ttft_ms=50"
STREAM_BUDGET = 16 * 1024


async def _stalled(gateway: Gateway, policy: str = "block") -> RawStream:
    raw = await RawStream.open(
        gateway.url, chat_body(LONG_STREAM, content="flood"), headers={"x-sluice-backpressure": policy}, rcvbuf=4096
    )
    await raw.read_head()
    assert raw.status == 200
    return raw


async def _until_stuck(relay: StreamRelay) -> None:
    """Until the stream is stuck for good: its producer waits for room and nothing else can move.

    (Until the kernel buffers on the way are full, the relay's figures still
    move; once every task of the test's one trio loop is blocked, they stay.)
    """
    await wait_until(lambda: relay.budget.waiting and relay.budget.held > 0)
    with trio.fail_after(10):
        await trio.testing.wait_all_tasks_blocked(cushion=0.05)
    assert relay.budget.waiting


async def _counter(gateway: Gateway, name: str) -> float:
    async with httpx2.AsyncClient(base_url=gateway.url) as http:
        text = (await http.get("/metrics")).text
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name:
                return sample.value
    raise AssertionError(f"{name} not in /metrics")


async def test_a_client_that_stops_reading_leaves_at_most_the_stream_budget_in_the_relay(
    start_gateway: GatewayFactory, simulator: RunningSimulator
) -> None:
    gateway = await start_gateway(stream_buffer_bytes=STREAM_BUDGET)
    raw = await _stalled(gateway)
    (relay,) = gateway.state.relays
    # The relay filled its budget and stopped reading the upstream...
    await _until_stuck(relay)
    assert 0 < relay.budget.held <= STREAM_BUDGET
    assert gateway.state.memory.used == relay.budget.held
    assert await _counter(gateway, "sluice_relay_buffered_bytes") == relay.budget.held
    assert simulator.stats.requests_completed == 0
    # ...and the stream is intact once the client reads again.
    sse = parse_sse(await raw.read_all())
    assert sse.ended_with_done
    assert 0 < sse.figures["peak_bytes"] <= STREAM_BUDGET
    await wait_until(lambda: not gateway.state.relays)
    assert gateway.state.memory.used == 0


async def test_a_full_memory_budget_refuses_new_streams_with_503_and_admits_again_once_freed(
    start_gateway: GatewayFactory, simulator: RunningSimulator
) -> None:
    gateway = await start_gateway(stream_buffer_bytes=STREAM_BUDGET, memory_budget_bytes=STREAM_BUDGET // 2)
    raw = await _stalled(gateway)
    (relay,) = gateway.state.relays
    await _until_stuck(relay)
    assert gateway.state.memory.full
    async with httpx2.AsyncClient(base_url=gateway.url, timeout=30) as http:
        refused = await http.post("/v1/chat/completions", json=chat_body("sim"))
        assert refused.status_code == 503
        assert refused.headers["retry-after"] == "1"
        error = refused.json()["error"]
        assert set(error) == {"message", "type", "param", "code"}
        assert error["code"] == "overloaded"
        assert await _counter(gateway, "sluice_memory_budget_refusals_total") == 1
        assert (await http.get("/metrics/backpressure")).json()["memory"]["refused"] == 1
        # The stalled client goes away: its bytes are given back and streams are admitted again.
        await raw.close_rst()
        await wait_until(lambda: gateway.state.memory.used == 0)
        admitted = await http.post("/v1/chat/completions", json=chat_body("sim"))
        assert admitted.status_code == 200
        assert parse_sse(admitted.content).ended_with_done


def test_client_connections_inherit_a_capped_send_buffer() -> None:
    settings = Settings(host="127.0.0.1", port=0)
    assert settings.client_sndbuf == 65536
    listener = listening_socket(settings)
    listener.listen()
    with listener, socket.create_connection(listener.getsockname()) as client:
        accepted, _ = listener.accept()
        with accepted:
            # Linux doubles what is asked for (bookkeeping); autotuning would be 4 MB here.
            assert accepted.getsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF) == 2 * 65536
        assert client is not None


async def test_upstream_connections_have_a_capped_receive_buffer(start_gateway: GatewayFactory) -> None:
    gateway = await start_gateway()
    assert gateway.settings.upstream_rcvbuf == 65536
    router = gateway.state.router
    assert router is not None
    # A long, fast body read as fast as it comes: autotuning would grow the buffer past its start.
    body = json.dumps(chat_body("sim:tokens=20000", content="flood")).encode()
    response = await router.default_client.open_chat_stream(body)
    try:
        async for _ in response.aiter_raw():
            pass
        sock = response.extensions["network_stream"].get_extra_info("socket")
        # Linux doubles what is asked for (bookkeeping).
        assert sock.getsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF) == 2 * 65536
    finally:
        with trio.CancelScope(shield=True):
            await response.aclose()


def test_an_upstream_receive_buffer_is_never_set_below_what_the_connection_started_with(tmp_path: Any) -> None:
    sysctl = tmp_path / "tcp_rmem"
    sysctl.write_text("4096\t131072\t6291456\n")
    assert upstream_receive_buffer(8192, str(sysctl)) == 65536  # shrinking after connect stalls reads
    assert upstream_receive_buffer(1 << 20, str(sysctl)) == 1 << 20
    assert upstream_receive_buffer(8192, str(tmp_path / "missing")) == 8192
