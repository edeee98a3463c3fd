"""The relay end to end: simulator -> real httpx2 -> gateway on hypercorn -> real client socket."""

from __future__ import annotations

import logging
from typing import Any

import h11
import httpx2
import pytest
import trio

from sluice.connection import KeepAliveHTTPConnection
from sluice.simulator import simulated_tokens

from .support import Gateway, GatewayFactory, RunningSimulator, chat_body, stream_chat, wait_until
from .rawclient import RawStream


async def test_stream_delivers_the_simulators_exact_text_then_done(client: httpx2.AsyncClient) -> None:
    response, sse = await stream_chat(client, chat_body("sim:tokens=40", content="tell me a story"))
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/event-stream")
    assert sse.text == "".join(simulated_tokens("tell me a story", 40))
    assert sse.ended_with_done
    assert sse.error is None
    assert sse.chunks[-1]["choices"][0]["finish_reason"] == "stop"


async def test_figures_comment_precedes_done_and_counts_the_stream(client: httpx2.AsyncClient) -> None:
    _, sse = await stream_chat(client, chat_body("sim:tokens=25"))
    assert sse.events[-2].startswith(b": sluice ")
    figures = sse.figures
    assert figures["outcome"] == "done"
    assert figures["tokens"] == 25
    assert figures["chunks"] == 27  # the role chunk, 25 tokens, the finish chunk
    assert figures["ttft_ms"] is not None and figures["ttft_ms"] >= 0
    assert figures["attempts"] == 1
    assert {"total_ms", "tokens_per_s", "peak_queue", "blocked_ms", "dropped", "coalesced"} <= set(figures)


async def test_streams_one_after_another_reuse_one_upstream_connection(
    client: httpx2.AsyncClient, simulator: RunningSimulator
) -> None:
    # The relay reads the body below httpx2 (sluice.upstream_body); reading it
    # to its end must still hand the connection back to httpx2's pool.
    for n in range(5):
        _, sse = await stream_chat(client, chat_body("sim:tokens=30,itl_ms=2", content=f"story {n}"))
        assert sse.text == "".join(simulated_tokens(f"story {n}", 30))
        assert sse.ended_with_done
    assert simulator.stats.requests_completed == 5
    assert simulator.stats.connections_accepted == 1


async def test_usage_chunk_is_relayed_and_counts_tokens(client: httpx2.AsyncClient) -> None:
    body = chat_body("sim:tokens=12", stream_options={"include_usage": True})
    _, sse = await stream_chat(client, body)
    usage_chunks = [c for c in sse.chunks if c.get("usage")]
    assert len(usage_chunks) == 1 and usage_chunks[0]["choices"] == []
    assert usage_chunks[0]["usage"]["completion_tokens"] == 12
    assert sse.figures["tokens"] == 12
    assert sse.ended_with_done


async def test_non_stream_completion_is_relayed(client: httpx2.AsyncClient) -> None:
    response = await client.post("/v1/chat/completions", json=chat_body("sim:tokens=9", stream=False, content="hi"))
    assert response.status_code == 200
    completion = response.json()
    assert completion["object"] == "chat.completion"
    assert completion["choices"][0]["message"]["content"] == "".join(simulated_tokens("hi", 9))
    assert response.headers["x-request-id"]


async def test_unknown_fields_are_forwarded_and_backpressure_field_is_not(
    client: httpx2.AsyncClient, simulator: RunningSimulator
) -> None:
    body = chat_body("sim:tokens=3", stream=False, tools=[{"type": "function", "function": {"name": "f"}}])
    body["backpressure_strategy"] = "coalesce"
    body["max_tokens"] = 2
    response = await client.post("/v1/chat/completions", json=body)
    assert response.status_code == 200
    # max_tokens reached the upstream: the simulator cut the text at 2 tokens.
    assert response.json()["choices"][0]["finish_reason"] == "length"
    assert response.json()["usage"]["completion_tokens"] == 2


async def test_models_are_relayed_from_the_upstream(client: httpx2.AsyncClient) -> None:
    response = await client.get("/v1/models")
    assert response.status_code == 200
    assert response.json()["object"] == "list"
    assert any(m["id"] == "sim" for m in response.json()["data"])


async def test_health_reports_active_streams(gateway: Gateway, client: httpx2.AsyncClient) -> None:
    raw = await RawStream.open(gateway.url, chat_body("sim:tokens=500,itl_ms=20"))
    await raw.read_until(b"data: {")
    health = (await client.get("/health")).json()
    assert health["status"] == "ok" and health["active_streams"] == 1
    assert set(health["process"]) == {"pid", "fds", "tasks", "rss_bytes"} and health["process"]["tasks"] > 1
    await raw.close_fin()
    await wait_until(lambda: gateway.state.metrics.active_streams == 0)


@pytest.mark.parametrize("how", ["fin", "rst"])
async def test_client_disconnect_closes_the_upstream_request(
    gateway: Gateway, simulator: RunningSimulator, how: str
) -> None:
    raw = await RawStream.open(gateway.url, chat_body("sim:tokens=2000,itl_ms=10"))
    await raw.read_until(b"data: {")
    assert simulator.stats.requests_closed_by_client == 0
    await (raw.close_fin() if how == "fin" else raw.close_rst())
    await wait_until(lambda: simulator.stats.requests_closed_by_client == 1)
    await wait_until(lambda: gateway.state.metrics.active_streams == 0)
    assert gateway.state.metrics.outcomes["client_disconnect"] == 1
    assert simulator.stats.requests_completed == 0


@pytest.mark.parametrize("how", ["fin", "rst"])
async def test_upstream_connection_ends_on_the_disconnect_before_the_stream_closes_its_response(
    gateway: Gateway, simulator: RunningSimulator, monkeypatch: pytest.MonkeyPatch, how: str
) -> None:
    # The upstream must not wait for the stream's tasks to be rescheduled and
    # unwound to its response's close: the disconnect itself ends the upstream
    # connection. Every close of an upstream response is held here until the
    # simulator has seen its connection end; if only that close could end it,
    # the hold runs out and the order is wrong.
    raw = await RawStream.open(gateway.url, chat_body("sim:tokens=2000,itl_ms=10"))
    await raw.read_until(b"data: {")
    [record] = simulator.stats.records
    upstream_ended_first: list[bool] = []
    close_response = httpx2.Response.aclose

    async def close_once_the_upstream_saw_the_end(response: httpx2.Response) -> None:
        with trio.move_on_after(5.0):  # only a bound on the wait: the fix needs none of it
            while record["closed_at"] is None:
                await trio.sleep(0.005)
        upstream_ended_first.append(record["closed_at"] is not None)
        await close_response(response)

    monkeypatch.setattr(httpx2.Response, "aclose", close_once_the_upstream_saw_the_end)
    await (raw.close_fin() if how == "fin" else raw.close_rst())
    await wait_until(lambda: gateway.state.metrics.active_streams == 0)
    assert upstream_ended_first and all(upstream_ended_first)
    assert gateway.state.metrics.outcomes["client_disconnect"] == 1
    # The stream's own end is still a plain disconnect: nothing took the ended connection for an upstream fault.
    assert gateway.state.metrics.outcomes.get("error:stream_interrupted", 0) == 0
    # A connection ended that way is never handed to the next request.
    follow_up = await RawStream.open(gateway.url, chat_body("sim:tokens=3"))
    await follow_up.read_until(b"data: [DONE]")


@pytest.mark.parametrize("how", ["fin", "rst"])
async def test_upstream_connection_ends_when_the_gateway_reads_the_close_before_the_app_hears_of_it(
    gateway: Gateway, simulator: RunningSimulator, monkeypatch: pytest.MonkeyPatch, how: str
) -> None:
    # The connection's reader finds the client gone first; the upstream must not
    # wait for the request's receiver task to take http.disconnect in a later turn.
    # Here http.disconnect reaches the app only once the simulator has seen its
    # connection end; if only the app could end it, the hold runs out.
    upstream_ended_first: list[bool] = []
    take_messages = KeepAliveHTTPConnection.handle_messages

    async def hear_of_the_disconnect_late(self: Any, nursery: trio.Nursery, request: Any, receive: Any) -> None:
        async def held_receive() -> Any:
            message = await receive()
            if message["type"] == "http.disconnect":
                [record] = simulator.stats.records
                with trio.move_on_after(5.0):  # only a bound on the wait: the fix needs none of it
                    while record["closed_at"] is None:
                        await trio.sleep(0.005)
                upstream_ended_first.append(record["closed_at"] is not None)
            return message

        await take_messages(self, nursery, request, held_receive)

    monkeypatch.setattr(KeepAliveHTTPConnection, "handle_messages", hear_of_the_disconnect_late)
    raw = await RawStream.open(gateway.url, chat_body("sim:tokens=2000,itl_ms=10"))
    await raw.read_until(b"data: {")
    await (raw.close_fin() if how == "fin" else raw.close_rst())
    await wait_until(lambda: gateway.state.metrics.active_streams == 0)
    assert upstream_ended_first == [True]
    assert gateway.state.metrics.outcomes["client_disconnect"] == 1


async def test_a_half_closed_client_never_gets_a_clean_end_to_a_stream_cut_short(
    gateway: Gateway, simulator: RunningSimulator
) -> None:
    # A client that shuts down its sending side can still read. The gateway
    # takes it as leaving (hypercorn's rule) and ends the upstream at once; the
    # response must then stop without its chunked end: a clean end without the
    # API's terminal event would read as a complete, silently truncated stream.
    raw = await RawStream.open(gateway.url, chat_body("sim:tokens=2000,itl_ms=10"))
    await raw.read_until(b"data: {")
    await raw.stream.send_eof()
    with trio.fail_after(10):
        await raw.read_all()
    await wait_until(lambda: simulator.stats.requests_closed_by_client == 1)
    assert raw.conn.their_state is not h11.DONE or b"data: [DONE]" in raw.body
    assert b"data: [DONE]" not in raw.body
    await wait_until(lambda: gateway.state.metrics.active_streams == 0)
    assert gateway.state.metrics.outcomes["client_disconnect"] == 1


async def test_client_leaving_before_the_first_token_closes_the_upstream(
    gateway: Gateway, simulator: RunningSimulator
) -> None:
    raw = await RawStream.open(gateway.url, chat_body("sim:tokens=5,ttft_ms=60000"))
    await raw.read_head()
    await wait_until(lambda: simulator.stats.active_requests == 1)
    await raw.close_rst()
    await wait_until(lambda: simulator.stats.requests_closed_by_client == 1)
    await wait_until(lambda: gateway.state.metrics.active_streams == 0)


async def test_pings_keep_the_stream_alive_before_the_first_token(start_gateway: GatewayFactory) -> None:
    gateway = await start_gateway(ping_interval=0.02)
    async with httpx2.AsyncClient(base_url=gateway.url) as http:
        _, sse = await stream_chat(http, chat_body("sim:tokens=3,ttft_ms=400"))
    first_data = next(i for i, e in enumerate(sse.events) if e.startswith(b"data:"))
    assert sse.events[0] == b": ping"
    assert all(e == b": ping" for e in sse.events[:first_data])
    assert sse.ended_with_done
    assert sse.figures["outcome"] == "done"


async def test_one_structured_log_line_per_stream(client: httpx2.AsyncClient, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="sluice.stream")
    await stream_chat(client, chat_body("sim:tokens=5"), headers={"x-request-id": "req-42"})
    records = [r for r in caplog.records if r.name == "sluice.stream" and isinstance(r.msg, dict)]
    assert len(records) == 1
    assert records[0].msg["request_id"] == "req-42"
    assert records[0].msg["outcome"] == "done"
    assert records[0].msg["tokens"] == 5


async def test_aggregate_metrics_sum_the_streams(client: httpx2.AsyncClient) -> None:
    for _ in range(3):
        await stream_chat(client, chat_body("sim:tokens=10"))
    metrics = (await client.get("/metrics/backpressure")).json()
    assert metrics["outcomes"] == {"done": 3}
    assert metrics["tokens"] == 30
    assert metrics["active_streams"] == 0
    assert metrics["ttft_ms"]["window"] == 3
    assert metrics["by_policy"]["block"]["streams"] == 3


async def test_the_openai_sdk_streams_and_completes_through_the_gateway(gateway: Gateway) -> None:
    openai = pytest.importorskip("openai")

    def use_sdk() -> tuple[str, str]:
        sdk = openai.OpenAI(base_url=gateway.base_url, api_key="not-needed", max_retries=0)
        streamed = "".join(
            chunk.choices[0].delta.content or ""
            for chunk in sdk.chat.completions.create(
                model="sim:tokens=30", messages=[{"role": "user", "content": "sdk"}], stream=True
            )
            if chunk.choices
        )
        completed = sdk.chat.completions.create(
            model="sim:tokens=30", messages=[{"role": "user", "content": "sdk"}]
        ).choices[0].message.content
        sdk.close()
        return streamed, completed or ""

    streamed, completed = await trio.to_thread.run_sync(use_sdk)
    expected = "".join(simulated_tokens("sdk", 30))
    assert streamed == expected
    assert completed == expected


async def test_the_openai_sdk_raises_on_a_stream_that_breaks(gateway: Gateway) -> None:
    openai = pytest.importorskip("openai")

    def use_sdk() -> str:
        sdk = openai.OpenAI(base_url=gateway.base_url, api_key="x", max_retries=0)
        text = ""
        try:
            for chunk in sdk.chat.completions.create(
                model="sim:tokens=30,fault=reset,after=5", messages=[{"role": "user", "content": "x"}], stream=True
            ):
                text += (chunk.choices[0].delta.content or "") if chunk.choices else ""
        except openai.APIError as exc:
            return f"raised: {exc.message}"
        finally:
            sdk.close()
        return "no error"

    outcome = await trio.to_thread.run_sync(use_sdk)
    assert outcome.startswith("raised:")
    assert "mid-stream" in outcome


async def test_request_id_is_taken_from_the_client(client: httpx2.AsyncClient) -> None:
    response, sse = await stream_chat(client, chat_body("sim:tokens=2"), headers={"x-request-id": "abc"})
    assert response.headers["x-request-id"] == "abc"
    assert sse.figures["request_id"] == "abc"


async def test_many_concurrent_streams_each_get_their_own_text(client: httpx2.AsyncClient) -> None:
    results: dict[int, str] = {}

    async def one(i: int) -> None:
        _, sse = await stream_chat(client, chat_body("sim:tokens=20,itl_ms=1", content=f"prompt {i}"))
        assert sse.ended_with_done
        results[i] = sse.text

    async with trio.open_nursery() as nursery:
        for i in range(40):
            nursery.start_soon(one, i)
    for i, text in results.items():
        assert text == "".join(simulated_tokens(f"prompt {i}", 20))
    assert len(results) == 40


async def test_malformed_sim_parameters_are_relayed_as_400(client: httpx2.AsyncClient) -> None:
    response = await client.post("/v1/chat/completions", json=chat_body("sim:tokens=many"))
    assert response.status_code == 400
    assert set(response.json()["error"]) == {"message", "type", "param", "code"}
