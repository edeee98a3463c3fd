"""The simulator: its scheme (sans-IO) and its behaviour over real sockets."""

from __future__ import annotations

import json
import tracemalloc

import httpx2
import pytest
import trio

from sluice.simulator import SimParamError, parse_behaviour, simulated_tokens

from .rawclient import RawStream
from .support import GatewayFactory, RunningSimulator, chat_body, parse_sse, stream_chat, wait_until


def test_behaviour_comes_from_the_model_name_and_headers_win() -> None:
    behaviour = parse_behaviour("sim:tokens=5,itl_ms=20,ttft_ms=100", {"x-sim-tokens": "7"})
    assert (behaviour.tokens, behaviour.itl_ms, behaviour.ttft_ms) == (7, 20.0, 100.0)
    assert parse_behaviour("gpt-4o-mini").tokens == 16


@pytest.mark.parametrize("model", ["sim:tokens=x", "sim:nope=1", "sim:fault=meteor", "sim:tokens", "sim:itl_ms=-1"])
def test_bad_parameters_are_rejected(model: str) -> None:
    with pytest.raises(SimParamError):
        parse_behaviour(model)


def test_text_is_deterministic_and_depends_on_prompt_and_seed() -> None:
    assert simulated_tokens("a", 10) == simulated_tokens("a", 10)
    assert simulated_tokens("a", 10) != simulated_tokens("b", 10)
    assert simulated_tokens("a", 10, seed="s") != simulated_tokens("a", 10)
    tokens = simulated_tokens("a", 3)
    assert not tokens[0].startswith(" ") and all(t.startswith(" ") for t in tokens[1:])


@pytest.fixture
async def sim_http(simulator: RunningSimulator) -> httpx2.AsyncClient:
    async with httpx2.AsyncClient(base_url=simulator.base_url, timeout=10) as http:
        yield http  # type: ignore[misc]


async def _stream(http: httpx2.AsyncClient, body: dict, headers: dict | None = None) -> tuple[int, bytes]:
    with trio.fail_after(10):
        async with http.stream("POST", "chat/completions", json=body, headers=headers) as response:
            return response.status_code, b"".join([c async for c in response.aiter_raw()])


async def test_stream_is_openai_shaped_and_ends_with_done(sim_http: httpx2.AsyncClient) -> None:
    status, raw = await _stream(sim_http, chat_body("sim:tokens=6", content="p"))
    sse = parse_sse(raw)
    assert status == 200
    assert sse.text == "".join(simulated_tokens("p", 6))
    assert sse.chunks[0]["choices"][0]["delta"]["role"] == "assistant"
    assert sse.chunks[-1]["choices"][0]["finish_reason"] == "stop"
    assert all(c["object"] == "chat.completion.chunk" for c in sse.chunks)
    assert sse.ended_with_done


async def test_include_usage_adds_a_usage_chunk(sim_http: httpx2.AsyncClient) -> None:
    body = chat_body("sim:tokens=4", content="one two three", stream_options={"include_usage": True})
    _, raw = await _stream(sim_http, body)
    sse = parse_sse(raw)
    assert sse.chunks[-1]["choices"] == []
    assert sse.chunks[-1]["usage"] == {"prompt_tokens": 3, "completion_tokens": 4, "total_tokens": 7}
    assert all("usage" in c for c in sse.chunks)


async def test_n_choices_each_get_the_text(sim_http: httpx2.AsyncClient) -> None:
    _, raw = await _stream(sim_http, chat_body("sim:tokens=3", content="n", n=2))
    texts: dict[int, str] = {}
    for chunk in parse_sse(raw).chunks:
        for choice in chunk["choices"]:
            texts[choice["index"]] = texts.get(choice["index"], "") + (choice["delta"].get("content") or "")
    assert texts == {0: "".join(simulated_tokens("n", 3)), 1: "".join(simulated_tokens("n", 3))}


async def test_max_tokens_caps_the_text(sim_http: httpx2.AsyncClient) -> None:
    response = await sim_http.post("chat/completions", json=chat_body("sim:tokens=10", stream=False, max_tokens=3))
    body = response.json()
    assert body["choices"][0]["finish_reason"] == "length"
    assert body["usage"]["completion_tokens"] == 3


async def test_status_fault_with_retry_after(sim_http: httpx2.AsyncClient) -> None:
    response = await sim_http.post("chat/completions", json=chat_body("sim:fault=status,status_code=429,retry_after=2"))
    assert response.status_code == 429
    assert response.headers["retry-after"] == "2"
    assert response.json()["error"]["type"] == "rate_limit_error"


async def test_fail_times_applies_the_fault_only_to_the_first_requests(sim_http: httpx2.AsyncClient) -> None:
    model = "sim:tokens=1,fault=status,status_code=503,fail_times=2,fault_key=k"
    statuses = [(await sim_http.post("chat/completions", json=chat_body(model, stream=False))).status_code for _ in range(3)]
    assert statuses == [503, 503, 200]


async def test_reset_fault_breaks_the_connection(sim_http: httpx2.AsyncClient) -> None:
    with pytest.raises(httpx2.HTTPError):
        await _stream(sim_http, chat_body("sim:tokens=10,fault=reset,after=2"))


async def test_malformed_no_done_and_error_event_faults(sim_http: httpx2.AsyncClient) -> None:
    _, raw = await _stream(sim_http, chat_body("sim:tokens=4,fault=malformed,after=1"))
    assert b"data: {not json\n\n" in raw and raw.endswith(b"data: [DONE]\n\n")
    _, raw = await _stream(sim_http, chat_body("sim:tokens=4,fault=no_done"))
    assert b"[DONE]" not in raw and b'"finish_reason":"stop"' in raw
    _, raw = await _stream(sim_http, chat_body("sim:tokens=4,fault=error_event,after=2"))
    assert raw.endswith(b'"code": "simulated"}}\n\n') and b"[DONE]" not in raw


async def test_stall_fault_sends_nothing_more(sim_http: httpx2.AsyncClient) -> None:
    received = b""
    with trio.move_on_after(0.3):
        async with sim_http.stream("POST", "chat/completions", json=chat_body("sim:tokens=10,fault=stall,after=2")) as r:
            async for chunk in r.aiter_raw():
                received += chunk
    assert received.count(b'"content"') == 3  # the role chunk's empty content and two tokens
    assert b"[DONE]" not in received


async def test_disconnect_before_headers(sim_http: httpx2.AsyncClient) -> None:
    with pytest.raises(httpx2.HTTPError):
        await sim_http.post("chat/completions", json=chat_body("sim:fault=disconnect_before_headers"))


async def test_a_client_closing_mid_stream_is_counted_promptly(simulator: RunningSimulator) -> None:
    raw = await RawStream.open(_root(simulator), chat_body("sim:tokens=1000,itl_ms=50"))
    await raw.read_until(b'"content"')
    await raw.close_fin()
    await wait_until(lambda: simulator.stats.requests_closed_by_client == 1)
    [record] = simulator.stats.records
    assert record["outcome"] == "closed_by_client"
    assert record["closed_at"] is not None


def _root(simulator: RunningSimulator) -> str:
    return simulator.base_url.removesuffix("/v1")


async def test_keep_alive_serves_several_requests_on_one_connection(
    sim_http: httpx2.AsyncClient, simulator: RunningSimulator
) -> None:
    for _ in range(3):
        response = await sim_http.post("chat/completions", json=chat_body("sim:tokens=2", stream=False))
        assert response.status_code == 200
    stats = (await sim_http.get(_root(simulator) + "/sim/stats")).json()
    assert stats["requests_completed"] == 3


async def test_models_unknown_routes_and_bad_bodies(sim_http: httpx2.AsyncClient) -> None:
    assert (await sim_http.get("models")).json()["data"][0]["id"] == "sim"
    assert (await sim_http.get("nothing")).status_code == 404
    assert (await sim_http.get("chat/completions")).status_code == 405
    assert (await sim_http.post("chat/completions", content=b"{")).status_code == 400
    bad = await sim_http.post("chat/completions", json=chat_body("sim:tokens=lots"))
    assert bad.status_code == 400 and json.loads(bad.content)["error"]["code"] == "invalid_sim_param"


async def test_reset_route_zeroes_the_counters(sim_http: httpx2.AsyncClient, simulator: RunningSimulator) -> None:
    await sim_http.post("chat/completions", json=chat_body("sim:tokens=1", stream=False))
    await sim_http.post(_root(simulator) + "/sim/reset")
    assert (await sim_http.get(_root(simulator) + "/sim/stats")).json()["requests_started"] == 0


async def test_the_simulator_answers_health_checks(simulator: RunningSimulator) -> None:
    async with httpx2.AsyncClient() as http:
        health = await http.get(simulator.base_url.removesuffix("/v1") + "/health")
    assert health.status_code == 200 and health.json() == {"status": "ok", "active_requests": 0}


@pytest.mark.parametrize("content", ['"\\ud800"', '[{"type": "text", "text": "\\udfff x"}]', '[{"type": "text", "text": 5}]'])
async def test_odd_but_valid_json_content_does_not_crash_the_simulator(simulator: RunningSimulator, content: str) -> None:
    body = '{"model": "sim:tokens=3", "stream": true, "messages": [{"role": "user", "content": %s}]}' % content
    async with httpx2.AsyncClient() as http:
        response = await http.post(simulator.base_url + "/chat/completions", content=body)
    assert response.status_code == 200 and parse_sse(response.content).ended_with_done


# --- limits (issue 14) ------------------------------------------------------------------


@pytest.mark.parametrize(
    ("model", "extra", "param"),
    [
        ("sim:tokens=100001", {}, "model"),
        ("sim:tokens=1000000000", {}, "model"),
        ("sim:tokens=60000", {"n": 2}, "n"),
        ("sim:tokens=1000,itl_ms=1000", {}, "model"),  # 999 s scheduled
        ("sim:ttft_ms=700000", {}, "model"),
        ("sim:fault=stall,stall_ms=700000", {}, "model"),
        ("sim:seed=" + "x" * 2000, {}, "model"),
    ],
)
async def test_requests_over_a_limit_get_400_naming_the_param(
    sim_http: httpx2.AsyncClient, simulator: RunningSimulator, model: str, extra: dict, param: str
) -> None:
    for stream in (True, False):
        response = await sim_http.post("chat/completions", json=chat_body(model, stream=stream, **extra))
        assert response.status_code == 400
        error = response.json()["error"]
        assert (error["type"], error["param"]) == ("invalid_request_error", param)
        assert set(error) == {"message", "type", "param", "code"}
    assert simulator.stats.requests_started == 0


async def test_the_limit_applies_to_what_is_generated(sim_http: httpx2.AsyncClient) -> None:
    # max_tokens brings a huge sim:tokens under the limit: the limit is on what would be generated.
    response = await sim_http.post("chat/completions", json=chat_body("sim:tokens=1000000000", stream=False, max_tokens=5))
    assert response.status_code == 200
    assert response.json()["choices"][0]["finish_reason"] == "length"
    status, raw = await _stream(sim_http, chat_body("sim:tokens=100000", content="cap"))
    assert status == 200 and parse_sse(raw).ended_with_done


async def test_the_embedded_simulator_refuses_over_its_limit_through_the_gateway(start_gateway: GatewayFactory) -> None:
    gateway = await start_gateway(upstream_base_url=None, simulator_max_tokens=1000, simulator_max_stream_seconds=5)
    async with httpx2.AsyncClient(base_url=gateway.url, timeout=30) as http:
        for body in (
            chat_body("sim:tokens=10000000"),
            chat_body("sim:tokens=1001", stream=False),
            chat_body("sim:tokens=600", n=2),
            chat_body("sim:tokens=100,itl_ms=100"),
        ):
            response = await http.post("/v1/chat/completions", json=body)
            assert response.status_code == 400, body
            error = response.json()["error"]
            assert error["type"] == "invalid_request_error" and error["param"] in ("model", "n")
            assert "1000 tokens" in error["message"] or "5 s" in error["message"]
        _, sse = await stream_chat(http, chat_body("sim:tokens=1000"))
        assert sse.ended_with_done and sse.figures["tokens"] == 1000


async def test_a_long_simulated_stream_holds_constant_memory_and_others_keep_flowing(start_gateway: GatewayFactory) -> None:
    """The embedded simulator shares the gateway's process: a 100 000-token answer must not be built in memory."""
    tokens = 100_000
    gateway = await start_gateway(upstream_base_url=None)
    async with httpx2.AsyncClient(base_url=gateway.url, timeout=60) as http:
        await stream_chat(http, chat_body("sim:tokens=50"))  # warm up pools, caches and imports
        small_done_while_big_ran: list[bool] = []
        big_done = False
        tracemalloc.start()
        try:
            baseline, _ = tracemalloc.get_traced_memory()

            async def big() -> None:
                nonlocal big_done
                marker = b'"delta":{"content":'
                seen, carry = 0, b""
                with trio.fail_after(120):
                    async with http.stream("POST", "/v1/chat/completions", json=chat_body(f"sim:tokens={tokens}")) as response:
                        assert response.status_code == 200
                        async for chunk in response.aiter_raw():  # read and drop: only the gateway's memory counts
                            window = carry + chunk
                            seen += window.count(marker)
                            carry = window[-(len(marker) - 1) :]  # too short to hold a whole marker: none counted twice
                assert carry.endswith(b"data: [DONE]\n\n") and seen == tokens
                big_done = True

            async def small() -> None:
                await wait_until(lambda: gateway.state.metrics.active_streams >= 1)
                _, sse = await stream_chat(http, chat_body("sim:tokens=5,itl_ms=5"))
                small_done_while_big_ran.append(sse.ended_with_done and not big_done)

            async with trio.open_nursery() as nursery:
                nursery.start_soon(big)
                nursery.start_soon(small)
            _, peak = tracemalloc.get_traced_memory()
        finally:
            tracemalloc.stop()
    assert small_done_while_big_ran == [True]
    # The whole answer as a list of tokens would be ~6 MB; the relay holds at most
    # buffer_size x 64 KiB (1 MiB) and the simulator one 64 KiB batch.
    print(f"traced peak growth during the stream: {peak - baseline} bytes")
    assert peak - baseline < 3_000_000, f"peak grew by {peak - baseline} bytes"
