"""Chaos through real sockets: clients that die at random moments, in every window, at scale.

Everything here runs the real hypercorn gateway against the real simulator,
and kills clients the way real ones die: a FIN, an RST (SO_LINGER 0), an
HTTP/2 RST_STREAM, a whole HTTP/2 connection dropped. What each test holds
the gateway to is the README's promise: whatever window a client leaves in,
the upstream request is closed (the simulator saw the close), nothing of the
stream keeps running (``active_streams`` 0, the simulator idle), no fd or
trio task is left behind, and the next client is served normally.

Timings (abort-to-upstream-close delays) are printed, never asserted: the
machine is a loaded 2-core box shared with other test runs.
"""

from __future__ import annotations

import gc
import random
import socket
import time
from typing import Any

import httpx2
import pytest
import trio

from sluice.simulator import simulated_tokens

from .rawclient import H2Client, RawStream
from .support import (
    Gateway,
    GatewayFactory,
    RunningSimulator,
    chat_body,
    health_figures,
    parse_sse,
    percentile,
    stream_chat,
    wait_until,
    wait_until_async,
)

#: a stream far longer than any test reads of it, tokens spaced so hundreds at once stay cheap
LONG_MODEL = "sim:tokens=5000,itl_ms=50"
RSS_SLACK = 30 * 1024 * 1024


def data_events(body: bytes | bytearray) -> int:
    return bytes(body).count(b"data: {")


def print_delays(label: str, delays_ms: list[float]) -> None:
    p50, p99 = percentile(delays_ms, 0.5), percentile(delays_ms, 0.99)
    print(
        f"\n[chaos] {label}: abort-to-upstream-close over {len(delays_ms)} aborts: "
        f"p50 {p50 if p50 is None else round(p50, 2)} ms, p99 {p99 if p99 is None else round(p99, 2)} ms"
    )


def upstream_close_delays(simulator: RunningSimulator, aborted_at: dict[str, float]) -> list[float]:
    """ms from each client's close call to the simulator seeing its upstream request closed."""
    closed = {r["model"]: r["closed_at"] for r in simulator.stats.records if r["closed_at"] is not None}
    return [(closed[model] - at) * 1000 for model, at in aborted_at.items() if model in closed]


async def serve_one_full_stream(gateway: Gateway, content: str = "after the chaos") -> None:
    """The next request after the chaos streams to its end, text exact, then [DONE]."""
    async with httpx2.AsyncClient(base_url=gateway.url, timeout=30) as http:
        response, sse = await stream_chat(http, chat_body("sim:tokens=12", content=content))
    assert response.status_code == 200
    assert sse.ended_with_done and sse.error is None
    assert sse.text == "".join(simulated_tokens(content, 12))


async def gateway_figures(gateway: Gateway) -> dict[str, int]:
    """``GET /health``'s process figures, after a garbage collection.

    The gateway runs in the test's own process: an object an earlier test's
    teardown dropped in a reference cycle (a socket among them) would
    otherwise close whenever the collector next runs, and move the fd count
    under this test's feet.
    """
    gc.collect()
    return await health_figures(gateway.url)


async def warm_baseline(gateway: Gateway) -> dict[str, int]:
    """The figures to come back to: after one whole stream, so the upstream pool holds its idle connection."""
    await serve_one_full_stream(gateway, "warm up")
    previous = await gateway_figures(gateway)
    # Settled when two readings agree: the warm-up client's own connection is gone.
    with trio.fail_after(30):
        while True:
            await trio.sleep(0.1)
            latest = await gateway_figures(gateway)
            if (latest["fds"], latest["tasks"]) == (previous["fds"], previous["tasks"]):
                return latest
            previous = latest


async def assert_back_to_baseline(gateway: Gateway, baseline: dict[str, int]) -> dict[str, int]:
    """Open fds and trio tasks settle exactly at the baseline (the wait only stops a hang)."""
    latest: dict[str, int] = {}

    async def settled() -> bool:
        nonlocal latest
        latest = await gateway_figures(gateway)
        return latest["fds"] == baseline["fds"] and latest["tasks"] == baseline["tasks"]

    try:
        await wait_until_async(settled, timeout=30)
    except trio.TooSlowError:
        pytest.fail(f"process figures did not return to the baseline: {latest} vs {baseline}")
    return latest


# --- hundreds of clients killed mid-stream, HTTP/1.1 --------------------------------------


@pytest.mark.parametrize(("streams", "rounds"), [(100, 3), (300, 2)])
async def test_hundreds_of_clients_killed_mid_stream_close_every_upstream_and_leak_nothing(
    start_gateway: GatewayFactory, simulator: RunningSimulator, streams: int, rounds: int
) -> None:
    """Each round opens ``streams`` streams at once and kills each at a random point, half by RST, half by FIN.

    After every round every upstream request is closed and nothing of the
    streams is left running; after all rounds the gateway's fds and tasks are
    exactly what they were before, RSS is near its steady state, and the next
    request is served whole.
    """
    gateway = await start_gateway()
    rng = random.Random(f"chaos-{streams}")
    baseline = await warm_baseline(gateway)
    rss_after_first_round: int | None = None
    delays: dict[str, list[float]] = {"rst": [], "fin": []}

    for round_no in range(rounds):
        aborted_at: dict[str, float] = {}
        kinds: dict[str, str] = {}
        started_before = simulator.stats.requests_started

        async def doomed(i: int) -> None:
            model = f"{LONG_MODEL},seed=r{round_no}s{i}"
            kill_after = rng.randint(0, 6)  # data events read before the kill; 0: right after the head
            rst = i % 2 == 0
            raw = await RawStream.open(gateway.url, chat_body(model, content=f"doomed {i}"))
            await raw.read_head()
            assert raw.status == 200
            while data_events(raw.body) < kill_after:
                await raw.read_some()
            kinds[model] = "rst" if rst else "fin"
            aborted_at[model] = time.monotonic()
            await (raw.close_rst() if rst else raw.close_fin())
            RawStream.opened.remove(raw)

        async with trio.open_nursery() as nursery:
            for i in range(streams):
                nursery.start_soon(doomed, i)

        opened = simulator.stats.requests_started - started_before
        assert opened == streams  # no retries, no duplicate requests
        await wait_until(lambda: simulator.stats.active_requests == 0, timeout=60)
        await wait_until(lambda: gateway.state.metrics.active_streams == 0, timeout=60)
        assert simulator.stats.requests_closed_by_client == streams * (round_no + 1)
        assert simulator.stats.requests_faulted == 0
        assert gateway.state.metrics.outcomes["client_disconnect"] == streams * (round_no + 1)
        for kind in ("rst", "fin"):
            delays[kind] += upstream_close_delays(simulator, {m: t for m, t in aborted_at.items() if kinds[m] == kind})

        await serve_one_full_stream(gateway)
        figures = await assert_back_to_baseline(gateway, baseline)
        if rss_after_first_round is None:
            rss_after_first_round = figures["rss_bytes"]
        print(f"\n[chaos] {streams} streams, round {round_no + 1}: figures {figures} (baseline {baseline})")

    assert rss_after_first_round is not None
    final = await gateway_figures(gateway)
    assert final["rss_bytes"] <= rss_after_first_round + RSS_SLACK, (final, rss_after_first_round)
    print_delays(f"{streams} concurrent HTTP/1.1 streams x {rounds} rounds, RST", delays["rst"])
    print_delays(f"{streams} concurrent HTTP/1.1 streams x {rounds} rounds, FIN", delays["fin"])
    print_delays(f"{streams} concurrent HTTP/1.1 streams x {rounds} rounds, all", delays["rst"] + delays["fin"])


# --- HTTP/2 ---------------------------------------------------------------------------------


async def test_h2_reset_streams_and_a_dropped_connection_close_their_upstreams(
    gateway: Gateway, simulator: RunningSimulator
) -> None:
    """h2c with prior knowledge: RST_STREAM closes just that stream's upstream; the others keep flowing.

    Then the whole connection is dropped (TCP RST, no GOAWAY) and every
    remaining stream's upstream closes too.
    """
    streams = 40
    baseline = await warm_baseline(gateway)
    client = await H2Client.connect(gateway.url)
    aborted_at: dict[str, float] = {}
    try:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(client.pump)
            ids: dict[int, str] = {}
            for i in range(streams):
                model = f"{LONG_MODEL},seed=h2s{i}"
                ids[await client.post(chat_body(model, content=f"h2 {i}"))] = model
            await wait_until(
                lambda: all(data_events(r.body) >= 1 for r in client.responses.values()), timeout=60
            )
            assert all(r.status == 200 for r in client.responses.values())
            assert simulator.stats.active_requests == streams

            # (a) cancel every other stream; the connection and its other streams live on.
            doomed = sorted(ids)[::2]
            for stream_id in doomed:
                aborted_at[ids[stream_id]] = time.monotonic()
                await client.reset_stream(stream_id)
            await wait_until(lambda: simulator.stats.requests_closed_by_client == len(doomed), timeout=60)
            await wait_until(lambda: gateway.state.metrics.active_streams == streams - len(doomed), timeout=60)
            survivors = [client.responses[s] for s in sorted(ids) if s not in doomed]
            seen = [data_events(r.body) for r in survivors]
            await wait_until(
                lambda: all(data_events(r.body) > n for r, n in zip(survivors, seen, strict=True)), timeout=60
            )
            assert not any(r.ended or r.reset for r in survivors)

            # (b) drop the connection with everything still streaming.
            for stream_id in sorted(ids):
                if stream_id not in doomed:
                    aborted_at[ids[stream_id]] = time.monotonic()
            await client.close_rst()
            nursery.cancel_scope.cancel()
    finally:
        if not client.closed:
            await client.close_rst()
        H2Client.opened.remove(client)

    await wait_until(lambda: simulator.stats.requests_closed_by_client == streams, timeout=60)
    await wait_until(lambda: gateway.state.metrics.active_streams == 0, timeout=60)
    assert simulator.stats.active_requests == 0
    assert gateway.state.metrics.outcomes["client_disconnect"] == streams
    print_delays(f"{streams} HTTP/2 streams on one connection (RST_STREAM, then connection RST)", upstream_close_delays(simulator, aborted_at))
    await serve_one_full_stream(gateway)
    await assert_back_to_baseline(gateway, baseline)


async def test_h2_client_is_served_a_whole_stream(gateway: Gateway) -> None:
    """The gateway speaks h2c with prior knowledge: a stream arrives whole, ending with [DONE]."""
    client = await H2Client.connect(gateway.url)
    try:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(client.pump)
            stream_id = await client.post(chat_body("sim:tokens=20", content="over h2"))
            response = client.responses[stream_id]
            await wait_until(lambda: response.ended or client.closed, timeout=30)
            nursery.cancel_scope.cancel()
    finally:
        await client.close_rst()
        H2Client.opened.remove(client)
    sse = parse_sse(bytes(response.body))
    assert response.status == 200 and sse.ended_with_done
    assert sse.text == "".join(simulated_tokens("over h2", 20))


# --- every window a client can leave in ---------------------------------------------------------


async def test_client_leaving_during_a_retry_wait_stops_the_retries(
    start_gateway: GatewayFactory, simulator: RunningSimulator
) -> None:
    """Before the response head, while the gateway waits out a 429's Retry-After: no retry follows.

    The client is gone, so the request it asked for must not be made again:
    the upstream sees exactly the one attempt that failed, and nothing of the
    request stays running.
    """
    gateway = await start_gateway(retry_budget=30.0)
    baseline = await warm_baseline(gateway)
    model = "sim:tokens=5,fault=status,status_code=429,retry_after=2,fault_key=wait"
    raw = await RawStream.open(gateway.url, chat_body(model))
    await wait_until(lambda: simulator.stats.requests_faulted == 1)  # first attempt answered 429
    await raw.close_rst()
    await wait_until(lambda: gateway.state.metrics.active_streams == 0, timeout=30)
    # Longer than the Retry-After: a retry that was still pending would have happened by now.
    await trio.sleep(2.5)
    assert simulator.stats.requests_started == 2  # the warm-up and the one attempt that got 429
    assert simulator.stats.active_requests == 0
    assert raw.status is None  # it never got a head
    await serve_one_full_stream(gateway)
    await assert_back_to_baseline(gateway, baseline)


class SilentUpstream:
    """An upstream that accepts connections and reads requests but never answers.

    The gateway then sits waiting for the response head; the test sees from
    here whether the gateway closed the connection when its client left.
    """

    def __init__(self) -> None:
        self.connections = 0
        self.open = 0
        self.closed = 0
        self.requests = 0

    async def serve(self, *, task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED) -> None:
        listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
        task_status.started(listeners[0].socket.getsockname()[1])
        await trio.serve_listeners(self._handle, listeners)

    async def _handle(self, stream: trio.SocketStream) -> None:
        self.connections += 1
        self.open += 1
        try:
            while True:
                data = await stream.receive_some(65536)
                if not data:
                    break
                if b"\r\n\r\n" in data:
                    self.requests += 1
        except trio.BrokenResourceError:
            pass
        finally:
            self.open -= 1
            self.closed += 1
            await stream.aclose()


@pytest.mark.parametrize("stream", [True, False], ids=["stream", "non-stream"])
async def test_client_leaving_while_the_upstream_head_is_pending_closes_the_upstream_connection(
    start_gateway: GatewayFactory, nursery: trio.Nursery, stream: bool
) -> None:
    """The gateway waits for an upstream that has not answered yet; the client leaves: the upstream socket closes."""
    silent = SilentUpstream()
    port = await nursery.start(silent.serve)
    gateway = await start_gateway(upstream_base_url=f"http://127.0.0.1:{port}/v1")
    raw = await RawStream.open(gateway.url, chat_body("gpt-test", stream=stream))
    await wait_until(lambda: silent.requests == 1)
    await raw.close_rst()
    await wait_until(lambda: silent.open == 0 and silent.closed == 1, timeout=30)
    await wait_until(lambda: gateway.state.metrics.active_streams == 0, timeout=30)
    assert raw.status is None


async def test_client_leaving_a_non_stream_completion_closes_the_upstream(
    gateway: Gateway, simulator: RunningSimulator
) -> None:
    """A non-streaming request whose upstream is still thinking: the client leaves, the upstream request closes."""
    raw = await RawStream.open(gateway.url, chat_body("sim:tokens=5,ttft_ms=60000", stream=False))
    await wait_until(lambda: simulator.stats.active_requests == 1)
    await raw.close_fin()
    await wait_until(lambda: simulator.stats.requests_closed_by_client == 1, timeout=30)
    await wait_until(lambda: gateway.state.metrics.active_streams == 0, timeout=30)
    assert gateway.state.metrics.outcomes["client_disconnect"] == 1


async def test_client_leaving_halfway_through_its_request_body_leaves_nothing_behind(gateway: Gateway, simulator: RunningSimulator) -> None:
    """The client announces a body and dies halfway through sending it: no upstream request, no task, no fd left."""
    baseline = await warm_baseline(gateway)
    for how in ("fin", "rst"):
        sock = trio.socket.socket(trio.socket.AF_INET, trio.socket.SOCK_STREAM)
        host, port = gateway.url.removeprefix("http://").split(":")
        await sock.connect((host, int(port)))
        stream = trio.SocketStream(sock)
        await stream.send_all(
            b"POST /v1/chat/completions HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\n"
            b'content-length: 1000\r\n\r\n{"model": "sim", "messages": ['
        )
        await trio.sleep(0.05)  # let the gateway start reading the body
        if how == "rst":
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
        await stream.aclose()
    await assert_back_to_baseline(gateway, baseline)
    assert simulator.stats.requests_started == 1  # the warm-up only
    assert gateway.state.metrics.active_streams == 0


@pytest.mark.parametrize("policy", ["block", "error", "coalesce"])
@pytest.mark.parametrize("how", ["rst", "fin"])
async def test_client_dying_while_its_stream_channel_is_full_closes_the_upstream(
    start_gateway: GatewayFactory, simulator: RunningSimulator, policy: str, how: str
) -> None:
    """A client that stopped reading (tiny receive buffer) until the gateway's channel filled, then died.

    With ``block`` the producer is parked waiting for room in its byte
    budget and the consumer in hypercorn's shielded write; with ``error``
    the producer is in its bounded wait; with ``coalesce`` it keeps merging. Whichever, the death reaches the
    stream's nursery and the upstream request is closed.
    """
    gateway = await start_gateway(client_sndbuf=4096, buffer_size=2, max_wait_ms=600000, stall_timeout=0)
    baseline = await warm_baseline(gateway)
    raw = await RawStream.open(
        gateway.url,
        chat_body("sim:tokens=100000,itl_ms=0"),
        headers={"x-sluice-backpressure": policy},
        rcvbuf=4096,
    )
    await raw.read_head()
    [relay] = gateway.state.relays
    if policy == "coalesce":
        # Merging happens only when the channel is full.
        await wait_until(lambda: relay.stats.coalesced > 0, timeout=30)
    else:
        # The producer is parked on a full byte budget, reading nothing more.
        await wait_until(lambda: relay.budget.waiting, timeout=30)
    aborted = time.monotonic()
    await (raw.close_rst() if how == "rst" else raw.close_fin())
    await wait_until(lambda: simulator.stats.requests_closed_by_client == 1, timeout=30)
    await wait_until(lambda: gateway.state.metrics.active_streams == 0, timeout=30)
    assert simulator.stats.active_requests == 0
    record = simulator.stats.records[-1]
    print(f"\n[chaos] full channel ({policy}, {how}): abort-to-upstream-close {(record['closed_at'] - aborted) * 1000:.2f} ms")
    await serve_one_full_stream(gateway)
    await assert_back_to_baseline(gateway, baseline)


async def test_a_dying_client_does_not_disturb_its_neighbours(gateway: Gateway, simulator: RunningSimulator) -> None:
    """While clients around them die by RST and FIN, the streams that stay are delivered whole."""
    survivors: dict[int, Any] = {}

    async def survivor(i: int) -> None:
        async with httpx2.AsyncClient(base_url=gateway.url, timeout=60) as http:
            survivors[i] = await stream_chat(http, chat_body("sim:tokens=30,itl_ms=10", content=f"keep {i}"))

    async def victim(i: int) -> None:
        raw = await RawStream.open(gateway.url, chat_body(f"{LONG_MODEL},seed=v{i}"))
        await raw.read_until(b"data: {")
        await (raw.close_rst() if i % 2 else raw.close_fin())
        RawStream.opened.remove(raw)

    async with trio.open_nursery() as nursery:
        for i in range(20):
            nursery.start_soon(survivor, i)
            nursery.start_soon(victim, i)
    for i, (response, sse) in survivors.items():
        assert response.status_code == 200 and sse.ended_with_done
        assert sse.text == "".join(simulated_tokens(f"keep {i}", 30))
    assert len(survivors) == 20
    await wait_until(lambda: simulator.stats.requests_closed_by_client == 20, timeout=30)
    await wait_until(lambda: gateway.state.metrics.active_streams == 0, timeout=30)
