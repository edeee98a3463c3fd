"""Upstream faults: what a client sees for each, and that retries happen only before the first byte."""

from __future__ import annotations

import httpx2
import pytest

from sluice.simulator import simulated_tokens

from .support import Gateway, GatewayFactory, RunningSimulator, chat_body, stream_chat

FAST_RETRIES = {"retry_backoff_initial": 0.0, "retry_backoff_max": 0.0}


@pytest.fixture
async def fast_gateway(start_gateway: GatewayFactory) -> Gateway:
    return await start_gateway(**FAST_RETRIES)


@pytest.fixture
async def http(fast_gateway: Gateway) -> httpx2.AsyncClient:
    async with httpx2.AsyncClient(base_url=fast_gateway.url, timeout=30) as client:
        yield client  # type: ignore[misc]


@pytest.mark.parametrize("status", [429, 500, 502, 503, 504])
async def test_retriable_statuses_are_retried_then_succeed(http: httpx2.AsyncClient, status: int) -> None:
    model = f"sim:tokens=8,fault=status,status_code={status},retry_after=0,fail_times=2,fault_key=r{status}"
    response, sse = await stream_chat(http, chat_body(model, content="r"))
    assert response.status_code == 200
    assert sse.text == "".join(simulated_tokens("r", 8))
    assert sse.figures["attempts"] == 3


async def test_non_stream_requests_are_retried_too(http: httpx2.AsyncClient) -> None:
    model = "sim:tokens=4,fault=status,status_code=503,fail_times=1,fault_key=ns"
    response = await http.post("/v1/chat/completions", json=chat_body(model, stream=False, content="q"))
    assert response.status_code == 200
    assert response.json()["choices"][0]["message"]["content"] == "".join(simulated_tokens("q", 4))


async def test_retry_after_is_honoured(start_gateway: GatewayFactory, simulator: RunningSimulator) -> None:
    gateway = await start_gateway(**FAST_RETRIES)
    model = "sim:tokens=2,fault=status,status_code=429,retry_after_ms=150,fail_times=1,fault_key=ra"
    async with httpx2.AsyncClient(base_url=gateway.url) as http:
        response, sse = await stream_chat(http, chat_body(model))
    assert response.status_code == 200
    records = [r for r in simulator.stats.records if r["model"] == model]
    assert len(records) == 2
    # The second attempt started no sooner than the upstream asked.
    assert records[1]["started_at"] - records[0]["ended_at"] >= 0.15 - 0.01


async def test_429_is_relayed_with_retry_after_once_retries_are_spent(http: httpx2.AsyncClient) -> None:
    model = "sim:fault=status,status_code=429,retry_after=0,fault_key=spent"
    response = await http.post("/v1/chat/completions", json=chat_body(model))
    assert response.status_code == 429
    assert response.headers["retry-after"] == "0"
    assert response.json()["error"]["type"]


async def test_429_asking_for_more_than_the_budget_is_relayed_at_once(
    start_gateway: GatewayFactory, simulator: RunningSimulator
) -> None:
    gateway = await start_gateway(retry_budget=2.0)
    model = "sim:fault=status,status_code=429,retry_after=120,fault_key=long"
    async with httpx2.AsyncClient(base_url=gateway.url) as http:
        response = await http.post("/v1/chat/completions", json=chat_body(model))
    assert response.status_code == 429
    assert response.headers["retry-after"] == "120"
    assert simulator.stats.requests_started == 1


@pytest.mark.parametrize(("upstream", "client"), [(500, 502), (503, 502), (504, 504)])
async def test_persistent_upstream_failures_become_502_or_504(
    http: httpx2.AsyncClient, simulator: RunningSimulator, upstream: int, client: int
) -> None:
    model = f"sim:fault=status,status_code={upstream},fault_key=p{upstream}"
    response = await http.post("/v1/chat/completions", json=chat_body(model))
    assert response.status_code == client
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert str(upstream) in error["message"]
    assert simulator.stats.requests_started == 3  # retry_max_attempts


@pytest.mark.parametrize("status", [400, 404, 422])
async def test_upstream_4xx_is_relayed_with_its_status_and_body_without_retry(
    http: httpx2.AsyncClient, simulator: RunningSimulator, status: int
) -> None:
    model = f"sim:fault=status,status_code={status},fault_key=c{status}"
    response = await http.post("/v1/chat/completions", json=chat_body(model))
    assert response.status_code == status
    assert set(response.json()["error"]) == {"message", "type", "param", "code"}
    assert simulator.stats.requests_started == 1


@pytest.mark.parametrize("status", [401, 403])
async def test_upstream_401_and_403_are_a_502_about_the_gateways_credentials_without_retry(
    http: httpx2.AsyncClient, simulator: RunningSimulator, status: int
) -> None:
    # The upstream refused the operator's key: relaying its 401 would tell the
    # client (and its SDK) that the client's own key is wrong.
    model = f"sim:fault=status,status_code={status},fault_key=a{status}"
    response = await http.post("/v1/chat/completions", json=chat_body(model))
    assert response.status_code == 502
    assert response.json()["error"]["code"] == "upstream_auth_failed"
    assert simulator.stats.requests_started == 1


async def test_unreachable_upstream_is_502(start_gateway: GatewayFactory) -> None:
    gateway = await start_gateway(upstream_base_url="http://127.0.0.1:9/v1", **FAST_RETRIES)
    async with httpx2.AsyncClient(base_url=gateway.url) as http:
        response = await http.post("/v1/chat/completions", json=chat_body("sim"))
    assert response.status_code == 502
    assert response.json()["error"]["code"] == "upstream_unavailable"


async def test_upstream_closing_before_headers_is_retried(http: httpx2.AsyncClient) -> None:
    model = "sim:tokens=3,fault=disconnect_before_headers,fail_times=1,fault_key=dbh"
    response, sse = await stream_chat(http, chat_body(model, content="d"))
    assert response.status_code == 200
    assert sse.text == "".join(simulated_tokens("d", 3))


async def test_reset_before_the_first_chunk_is_retried_transparently(
    http: httpx2.AsyncClient, simulator: RunningSimulator
) -> None:
    model = "sim:tokens=5,fault=reset,after=0,fail_times=1,fault_key=rb"
    response, sse = await stream_chat(http, chat_body(model, content="x"))
    assert response.status_code == 200
    assert sse.text == "".join(simulated_tokens("x", 5))
    assert sse.ended_with_done
    assert simulator.stats.requests_started == 2


async def test_reset_after_the_first_chunk_ends_with_one_error_event_and_no_retry(
    http: httpx2.AsyncClient, simulator: RunningSimulator
) -> None:
    model = "sim:tokens=50,fault=reset,after=5,fault_key=ra5"
    response, sse = await stream_chat(http, chat_body(model, content="x"))
    assert response.status_code == 200
    assert sse.error is not None and sse.error["code"] == "stream_interrupted"
    assert sse.events[-1].startswith(b'data: {"error"')
    assert sum(1 for e in sse.events if e.startswith(b'data: {"error"')) == 1
    assert not sse.ended_with_done
    assert "".join(simulated_tokens("x", 50)).startswith(sse.text)
    assert simulator.stats.requests_started == 1  # never retried after the first byte


async def test_stall_mid_stream_ends_with_a_timeout_error_event(start_gateway: GatewayFactory) -> None:
    gateway = await start_gateway(idle_timeout=0.3)
    async with httpx2.AsyncClient(base_url=gateway.url) as http:
        _, sse = await stream_chat(http, chat_body("sim:tokens=20,fault=stall,after=3"))
    assert sse.error is not None and sse.error["code"] == "upstream_timeout"
    assert len(sse.chunks) >= 1


async def test_stall_before_the_first_token_ends_with_a_timeout_error_event(
    start_gateway: GatewayFactory, simulator: RunningSimulator
) -> None:
    gateway = await start_gateway(first_token_timeout=0.3)
    async with httpx2.AsyncClient(base_url=gateway.url) as http:
        _, sse = await stream_chat(http, chat_body("sim:tokens=20,fault=stall,after=0"))
    assert sse.error is not None and sse.error["code"] == "upstream_timeout"
    assert sse.chunks == []
    from .support import wait_until

    await wait_until(lambda: simulator.stats.requests_closed_by_client == 1)


async def test_malformed_chunk_ends_with_an_error_event_and_is_not_forwarded(http: httpx2.AsyncClient) -> None:
    _, sse = await stream_chat(http, chat_body("sim:tokens=10,fault=malformed,after=2"))
    assert sse.error is not None and sse.error["code"] == "stream_interrupted"
    assert "malformed" in sse.error["message"]
    assert b"data: {not json" not in sse.raw


async def test_stream_ending_without_done_ends_with_an_error_event(http: httpx2.AsyncClient) -> None:
    _, sse = await stream_chat(http, chat_body("sim:tokens=10,fault=no_done", content="n"))
    assert sse.text == "".join(simulated_tokens("n", 10))
    assert sse.error is not None and "[DONE]" in sse.error["message"]
    assert not sse.ended_with_done


async def test_upstream_error_event_is_relayed_as_the_final_event(http: httpx2.AsyncClient) -> None:
    _, sse = await stream_chat(http, chat_body("sim:tokens=10,fault=error_event,after=4"))
    assert sse.error == {
        "message": "simulated upstream error",
        "type": "server_error",
        "param": None,
        "code": "simulated",
    }
    assert sse.events[-1].startswith(b'data: {"error"')
    assert sse.figures["outcome"] == "error:upstream_error_event"


async def test_slow_first_token_within_the_deadline_is_fine(http: httpx2.AsyncClient) -> None:
    response, sse = await stream_chat(http, chat_body("sim:tokens=3,ttft_ms=200"))
    assert sse.ended_with_done
    assert sse.figures["ttft_ms"] >= 200
