"""Each backpressure policy under a client that stops reading, through real sockets.

The client opens a stream with a tiny receive buffer and reads nothing until
the gateway has had to decide (the upstream blocked, or the upstream
finished); then it reads everything. Socket buffers are pinned small on
the gateway's client side and the simulator's side (its fixture sets a
64 KiB send buffer) so about a megabyte fills them, not tens of megabytes.
"""

from __future__ import annotations

import httpx2
import pytest

from sluice.simulator import simulated_tokens

from .support import Gateway, GatewayFactory, RunningSimulator, chat_body, parse_sse, wait_until
from .rawclient import RawStream

TOKENS = 6000
SMALL_BUFFERS = {"buffer_size": 4, "client_sndbuf": 8192}
#: coalesce merges the stalled stream's text (~36 KB for TOKENS tokens) into one chunk: it
#: keeps the upstream flowing only while that fits the stream's byte budget
ROOM_FOR_THE_TEXT = {"stream_buffer_bytes": 256 * 1024}


async def _stalled_stream(gateway: Gateway, policy: str, model: str = f"sim:tokens={TOKENS}") -> RawStream:
    raw = await RawStream.open(
        gateway.url, chat_body(model, content="flood"), headers={"x-sluice-backpressure": policy}, rcvbuf=4096
    )
    await raw.read_head()
    assert raw.status == 200
    return raw


async def test_block_is_lossless_and_pauses_the_upstream(
    start_gateway: GatewayFactory, simulator: RunningSimulator
) -> None:
    gateway = await start_gateway(**SMALL_BUFFERS)
    raw = await _stalled_stream(gateway, "block")
    (relay,) = gateway.state.relays
    # The stream's buffer is full and its producer waits, reading nothing more...
    await wait_until(lambda: relay.budget.waiting)
    assert simulator.stats.requests_completed == 0
    sse = parse_sse(await raw.read_all())
    # ...so TCP backpressure reached the provider: its writes waited (counted once they completed).
    assert simulator.stats.write_wait_seconds_total > 0
    assert sse.text == "".join(simulated_tokens("flood", TOKENS))
    assert sse.ended_with_done
    figures = sse.figures
    assert figures["dropped"] == 0
    assert figures["blocked_ms"] > 0
    assert 1 <= figures["peak_queue"] <= 4
    assert 0 < figures["peak_bytes"] <= gateway.settings.stream_buffer_bytes


@pytest.mark.parametrize("policy", ["drop_newest", "drop_oldest"])
async def test_drop_policies_keep_the_upstream_flowing_and_report_what_they_dropped(
    start_gateway: GatewayFactory, simulator: RunningSimulator, policy: str
) -> None:
    gateway = await start_gateway(**SMALL_BUFFERS)
    raw = await _stalled_stream(gateway, policy)
    # The upstream is never held back: it finishes while the client reads nothing.
    await wait_until(lambda: simulator.stats.requests_completed == 1)
    sse = parse_sse(await raw.read_all())
    assert sse.ended_with_done
    figures = sse.figures
    assert figures["dropped"] > 0
    assert figures["policy"] == policy
    delivered = len(sse.chunks)
    assert delivered + figures["dropped"] == figures["chunks"]
    assert figures["peak_bytes"] <= gateway.settings.stream_buffer_bytes
    async with httpx2.AsyncClient(base_url=gateway.url) as http:
        metrics = (await http.get("/metrics/backpressure")).json()
    assert metrics["dropped"] == figures["dropped"]
    assert metrics["by_policy"][policy]["dropped"] == figures["dropped"]


async def test_drop_newest_keeps_the_start_and_drop_oldest_keeps_the_end(
    start_gateway: GatewayFactory, simulator: RunningSimulator
) -> None:
    gateway = await start_gateway(**SMALL_BUFFERS)
    full = "".join(simulated_tokens("flood", TOKENS))
    texts = {}
    for policy in ("drop_newest", "drop_oldest"):
        raw = await _stalled_stream(gateway, policy)
        await wait_until(lambda: simulator.stats.requests_completed == len(texts) + 1)
        texts[policy] = parse_sse(await raw.read_all()).text
    # What went out before the buffers filled is intact under both.
    assert texts["drop_newest"].startswith(full[:100])
    assert texts["drop_oldest"].startswith(full[:100])
    # drop_oldest keeps the newest tokens, so the end survives; drop_newest loses it.
    assert texts["drop_oldest"].endswith(full[-200:])
    assert not texts["drop_newest"].endswith(full[-200:])


async def test_coalesce_delivers_every_token_without_stalling_the_upstream(
    start_gateway: GatewayFactory, simulator: RunningSimulator
) -> None:
    gateway = await start_gateway(**SMALL_BUFFERS, **ROOM_FOR_THE_TEXT)
    raw = await _stalled_stream(gateway, "coalesce")
    await wait_until(lambda: simulator.stats.requests_completed == 1)
    sse = parse_sse(await raw.read_all())
    assert sse.text == "".join(simulated_tokens("flood", TOKENS))
    assert sse.ended_with_done
    figures = sse.figures
    assert figures["coalesced"] > 0
    assert figures["dropped"] == 0
    assert len(sse.chunks) < figures["chunks"]  # fewer, larger chunks reached the client


async def test_coalesce_waits_losslessly_once_even_the_merged_text_fills_the_byte_budget(
    start_gateway: GatewayFactory, simulator: RunningSimulator
) -> None:
    gateway = await start_gateway(**SMALL_BUFFERS, stream_buffer_bytes=16 * 1024)
    # ttft_ms: the head arrives alone, so no body bytes come with it (those go through as one batch).
    raw = await _stalled_stream(gateway, "coalesce", model=f"sim:tokens={TOKENS},ttft_ms=50")
    (relay,) = gateway.state.relays
    await wait_until(lambda: relay.budget.waiting)
    assert simulator.stats.requests_completed == 0
    assert relay.budget.held <= 16 * 1024
    sse = parse_sse(await raw.read_all())
    assert sse.text == "".join(simulated_tokens("flood", TOKENS))
    assert sse.ended_with_done
    assert sse.figures["coalesced"] > 0
    assert sse.figures["peak_bytes"] <= 16 * 1024


async def test_error_policy_ends_a_stalled_stream_with_an_error_event(
    start_gateway: GatewayFactory, simulator: RunningSimulator
) -> None:
    gateway = await start_gateway(**SMALL_BUFFERS, max_wait_ms=50)
    raw = await _stalled_stream(gateway, "error")
    # The upstream request is closed as soon as the stream gives up...
    await wait_until(lambda: simulator.stats.requests_closed_by_client == 1)
    # ...and the client, once it reads again, gets what was queued, then the error.
    sse = parse_sse(await raw.read_all())
    assert gateway.state.metrics.outcomes["error:backpressure_overflow"] == 1
    assert sse.error is not None
    assert sse.error["code"] == "backpressure_overflow"
    assert set(sse.error) == {"message", "type", "param", "code"}
    assert not sse.ended_with_done
    assert sse.events[-1].startswith(b'data: {"error"')
    # What was queued before the overflow was delivered, in order, before the error.
    assert "".join(simulated_tokens("flood", TOKENS)).startswith(sse.text)


async def test_body_field_picks_the_policy(start_gateway: GatewayFactory, simulator: RunningSimulator) -> None:
    gateway = await start_gateway(**SMALL_BUFFERS)
    body = chat_body(f"sim:tokens={TOKENS}", content="flood", backpressure_strategy="drop_newest")
    raw = await RawStream.open(gateway.url, body, rcvbuf=4096)
    await wait_until(lambda: simulator.stats.requests_completed == 1)
    sse = parse_sse(await raw.read_all())
    assert sse.figures["policy"] == "drop_newest"


async def test_gateway_default_policy_applies_without_a_choice(
    start_gateway: GatewayFactory, simulator: RunningSimulator
) -> None:
    gateway = await start_gateway(**SMALL_BUFFERS, **ROOM_FOR_THE_TEXT, backpressure="coalesce")
    raw = await RawStream.open(gateway.url, chat_body(f"sim:tokens={TOKENS}", content="flood"), rcvbuf=4096)
    await wait_until(lambda: simulator.stats.requests_completed == 1)
    sse = parse_sse(await raw.read_all())
    assert sse.figures["policy"] == "coalesce"
    assert sse.text == "".join(simulated_tokens("flood", TOKENS))


async def test_unknown_policy_header_is_a_400(client: httpx2.AsyncClient) -> None:
    response = await client.post(
        "/v1/chat/completions", json=chat_body("sim"), headers={"x-sluice-backpressure": "pray"}
    )
    assert response.status_code == 400
    assert response.json()["error"]["param"] == "x-sluice-backpressure"


async def test_a_fast_reader_never_triggers_a_policy(client: httpx2.AsyncClient) -> None:
    from .support import stream_chat

    _, sse = await stream_chat(client, chat_body("sim:tokens=300", content="x"), headers={"x-sluice-backpressure": "drop_newest"})
    assert sse.text == "".join(simulated_tokens("x", 300))
    assert sse.figures["dropped"] == 0
