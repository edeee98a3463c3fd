"""Every API a client speaks, through the gateway, with the relay's guarantees (issue 15).

Real hypercorn, real sockets, the real ``openai`` and ``anthropic`` SDKs
(sync clients in a worker thread), against the simulator and, for the
Anthropic upstream's headers, against what the simulator recorded.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any, TypeVar

import anthropic
import httpx2
import openai
import pytest
import trio

from sluice.config import DeploymentConfig, ModelConfig
from sluice.simulator import simulated_tokens

from .rawclient import RawStream
from .support import Gateway, GatewayFactory, RunningSimulator, parse_sse, wait_until

GUARD = 30.0  # seconds: only a "stop waiting" bound
T = TypeVar("T")
PROMPT = "tell me"


async def in_thread(call: Callable[[], T]) -> T:
    with trio.fail_after(GUARD):
        return await trio.to_thread.run_sync(call, abandon_on_cancel=True)


def openai_client(gateway: Gateway, **options: Any) -> openai.OpenAI:
    return openai.OpenAI(base_url=gateway.base_url, api_key="unused", max_retries=0, timeout=GUARD, **options)


def anthropic_client(gateway: Gateway, **options: Any) -> anthropic.Anthropic:
    return anthropic.Anthropic(base_url=gateway.url, api_key="unused", max_retries=0, timeout=GUARD, **options)


def expected_text(count: int) -> str:
    return "".join(simulated_tokens(PROMPT, count))


# --- the APIs work, stream and not, with text identical to chat's --------------------------


async def test_responses_create_stream_and_not_and_the_stream_helper(gateway: Gateway) -> None:
    def calls() -> tuple[str, list[str], str, Any]:
        with openai_client(gateway) as client:
            whole = client.responses.create(model="sim:tokens=12", input=PROMPT)
            events = list(client.responses.create(model="sim:tokens=12", input=PROMPT, stream=True))
            deltas = [e.delta for e in events if e.type == "response.output_text.delta"]
            with client.responses.stream(model="sim:tokens=12", input=PROMPT) as stream:
                final = stream.get_final_response()
            return whole.output_text, [e.type for e in events], "".join(deltas), final

    text, types, streamed, final = await in_thread(calls)
    assert text == streamed == final.output_text == expected_text(12)
    assert types[0] == "response.created" and types[-1] == "response.completed"
    assert final.usage is not None and final.usage.output_tokens == 12


async def test_an_openai_agents_sdk_agent_runs_through_the_gateway(gateway: Gateway) -> None:
    """The Agents SDK's default model talks the Responses API: run and run_streamed, through Sluice."""
    agents = pytest.importorskip("agents")

    def run_agent() -> tuple[str, str]:
        import asyncio

        async def main() -> tuple[str, str]:
            agents.set_tracing_disabled(True)
            agents.set_default_openai_client(openai.AsyncOpenAI(base_url=gateway.base_url, api_key="unused", max_retries=0))
            agents.set_default_openai_api("responses")
            agent = agents.Agent(name="assistant", instructions="Be brief.", model="sim:tokens=8")
            ran = await agents.Runner.run(agent, PROMPT)
            streamed = agents.Runner.run_streamed(agent, PROMPT)
            async for _ in streamed.stream_events():
                pass
            return ran.final_output, streamed.final_output

        return asyncio.run(main())

    ran, streamed = await in_thread(run_agent)
    assert ran == streamed == expected_text(8)


async def test_anthropic_messages_create_stream_and_count_tokens(gateway: Gateway, simulator: RunningSimulator) -> None:
    def calls() -> tuple[str, str, Any, int]:
        with anthropic_client(gateway) as client:
            message = client.messages.create(
                model="sim:tokens=9", max_tokens=100, messages=[{"role": "user", "content": PROMPT}]
            )
            with client.messages.stream(
                model="sim:tokens=9", max_tokens=100, messages=[{"role": "user", "content": PROMPT}]
            ) as stream:
                streamed = "".join(stream.text_stream)
                final = stream.get_final_message()
            counted = client.messages.count_tokens(model="sim:tokens=9", messages=[{"role": "user", "content": PROMPT}])
            return message.content[0].text, streamed, final, counted.input_tokens  # type: ignore[union-attr]

    text, streamed, final, counted = await in_thread(calls)
    assert text == streamed == expected_text(9)
    assert final.usage.output_tokens == 9 and final.usage.input_tokens > 0 and counted > 0
    # The upstream was asked in Anthropic's dialect: the version header went along.
    messages_records = [r for r in simulator.stats.records if r["api"] == "messages"]
    assert messages_records and all(r["anthropic_version"] for r in messages_records)


async def test_legacy_completions_and_embeddings(gateway: Gateway) -> None:
    def calls() -> tuple[str, str, list[float], list[float]]:
        with openai_client(gateway) as client:
            whole = client.completions.create(model="sim:tokens=7", prompt=PROMPT)
            streamed = "".join(
                c.choices[0].text for c in client.completions.create(model="sim:tokens=7", prompt=PROMPT, stream=True)
                if c.choices
            )
            as_base64 = client.embeddings.create(model="sim", input="hello").data[0].embedding
            as_floats = client.embeddings.create(model="sim", input="hello", encoding_format="float").data[0].embedding
            return whole.choices[0].text, streamed, as_base64, as_floats

    whole, streamed, as_base64, as_floats = await in_thread(calls)
    assert whole == streamed == expected_text(7)
    assert len(as_base64) == len(as_floats) > 0 and as_base64 == pytest.approx(as_floats)


async def test_each_stream_carries_its_api_in_figures_and_metrics(gateway: Gateway) -> None:
    async with httpx2.AsyncClient(base_url=gateway.url, timeout=GUARD) as http:
        for path, body in [
            ("/v1/responses", {"model": "sim:tokens=3", "input": PROMPT, "stream": True}),
            ("/v1/messages", {"model": "sim:tokens=3", "max_tokens": 9, "stream": True,
                              "messages": [{"role": "user", "content": PROMPT}]}),
        ]:
            response = await http.post(path, json=body)
            figures = [line for line in response.text.splitlines() if line.startswith(": sluice ")]
            assert response.status_code == 200 and json.loads(figures[0][len(": sluice ") :])["api"] == path[4:]
        metrics = (await http.get("/metrics")).text
    assert 'sluice_requests_total{api="responses",model="sim:tokens=3",status="200"} 1.0' in metrics
    assert 'sluice_requests_total{api="messages",model="sim:tokens=3",status="200"} 1.0' in metrics


# --- the relay's guarantees, per API ---------------------------------------------------------


@pytest.mark.parametrize(
    ("path", "body"),
    [
        ("/v1/responses", {"input": PROMPT}),
        ("/v1/messages", {"max_tokens": 100000, "messages": [{"role": "user", "content": PROMPT}]}),
        ("/v1/completions", {"prompt": PROMPT}),
    ],
    ids=["responses", "messages", "completions"],
)
async def test_a_client_killed_mid_stream_closes_the_upstream(
    gateway: Gateway, simulator: RunningSimulator, path: str, body: dict[str, Any]
) -> None:
    raw = await RawStream.open(gateway.url, {"model": "sim:tokens=5000,itl_ms=10", "stream": True, **body}, path=path)
    with trio.fail_after(GUARD):
        await raw.read_head()
        assert raw.status == 200
        while raw.body.count(b"\n\n") < 8:
            await raw.read_some()
    await raw.close_rst()
    await wait_until(lambda: simulator.stats.requests_closed_by_client == 1, timeout=GUARD)
    await wait_until(lambda: gateway.state.metrics.active_streams == 0, timeout=GUARD)


async def test_an_upstream_reset_mid_stream_reaches_each_sdk_as_an_error(gateway: Gateway) -> None:
    def calls() -> tuple[str, BaseException | None]:
        with openai_client(gateway) as client:
            events = list(client.responses.create(model="sim:tokens=50,fault=reset,after=5", input=PROMPT, stream=True))
        with anthropic_client(gateway) as client:
            try:
                with client.messages.stream(
                    model="sim:tokens=50,fault=reset,after=5", max_tokens=100,
                    messages=[{"role": "user", "content": PROMPT}],
                ) as stream:
                    for _ in stream.text_stream:
                        pass
            except anthropic.APIError as exc:
                return events[-1].type, exc
        return events[-1].type, None

    last_responses_event, anthropic_error = await in_thread(calls)
    # The Responses stream ends with the gateway's own error event (the SDK yields it rather than raising).
    assert last_responses_event == "error"
    assert anthropic_error is not None


@pytest.mark.parametrize(
    ("path", "body", "event"),
    [
        ("/v1/responses", {"input": PROMPT}, b"event: response.completed"),
        ("/v1/messages", {"max_tokens": 100, "messages": [{"role": "user", "content": PROMPT}]}, b"event: message_stop"),
    ],
    ids=["responses", "messages"],
)
async def test_an_error_event_before_any_content_is_retried_on_another_deployment(
    start_gateway: GatewayFactory, start_simulator: Any, path: str, body: dict[str, Any], event: bytes
) -> None:
    failing, healthy = await start_simulator(), await start_simulator()
    deployments = [
        # The simulator serves both APIs on one port, as vLLM does.
        DeploymentConfig(base_url=failing.base_url, model="sim:tokens=6,fault=error_event,after=0", weight=1000,
                         name="failing", apis=["responses", "messages"]),
        DeploymentConfig(base_url=healthy.base_url, model="sim:tokens=6", weight=0.001, name="healthy",
                         apis=["responses", "messages"]),
    ]
    gateway = await start_gateway(models=[ModelConfig(name="m", strategy="weighted", deployments=deployments)])
    async with httpx2.AsyncClient(base_url=gateway.url, timeout=GUARD) as http:
        response = await http.post(path, json={"model": "m", "stream": True, **body})
    assert response.status_code == 200
    raw = response.content
    assert event in raw and b"event: error" not in raw
    # One preamble only: the failed attempt's was held back, never sent.
    first = b"response.created" if path == "/v1/responses" else b"message_start"
    assert raw.count(b"event: " + first) == 1
    assert healthy.stats.requests_completed == 1
    figures = json.loads(raw.split(b": sluice ", 1)[1].split(b"\n", 1)[0])
    assert figures["deployment"] == "healthy" and figures["attempts"] == 2


async def test_an_error_event_before_content_on_the_only_deployment_is_retried_there(
    gateway: Gateway, simulator: RunningSimulator
) -> None:
    body = {"model": "sim:tokens=4,fault=error_event,after=0,fail_times=1", "max_tokens": 50, "stream": True,
            "messages": [{"role": "user", "content": PROMPT}]}
    async with httpx2.AsyncClient(base_url=gateway.url, timeout=GUARD) as http:
        response = await http.post("/v1/messages", json=body)
    assert response.status_code == 200 and b"event: message_stop" in response.content
    assert b"overloaded_error" not in response.content and simulator.stats.requests_started == 2


async def test_a_stream_the_gateway_cuts_ends_with_that_apis_own_error_event(start_gateway: GatewayFactory) -> None:
    gateway = await start_gateway(idle_timeout=0.3)
    async with httpx2.AsyncClient(base_url=gateway.url, timeout=GUARD) as http:
        responses = await http.post("/v1/responses", json={"model": "sim:tokens=20,fault=stall,after=3", "input": PROMPT, "stream": True})
        messages = await http.post("/v1/messages", json={"model": "sim:tokens=20,fault=stall,after=3", "max_tokens": 50,
                                                         "stream": True, "messages": [{"role": "user", "content": PROMPT}]})
    r_events = parse_sse(responses.content).events
    m_events = parse_sse(messages.content).events
    assert r_events[-1].startswith(b"event: error\ndata: ")
    r_error = json.loads(r_events[-1].split(b"data: ", 1)[1])
    numbers = [json.loads(e.split(b"data: ", 1)[1])["sequence_number"] for e in r_events if b"data: " in e]
    assert r_error["type"] == "error" and r_error["code"] == "upstream_timeout" and numbers == sorted(numbers)
    assert r_error["sequence_number"] == numbers[-2] + 1  # continues the stream's own numbering
    assert m_events[-1].startswith(b"event: error\ndata: ")
    m_error = json.loads(m_events[-1].split(b"data: ", 1)[1])
    assert m_error["type"] == "error" and m_error["error"]["type"] == "timeout_error"
    assert b"[DONE]" not in responses.content + messages.content  # never another API's terminal event


async def test_messages_pings_while_waiting_for_the_first_token_in_its_own_form(start_gateway: GatewayFactory) -> None:
    gateway = await start_gateway(ping_interval=0.1)
    async with httpx2.AsyncClient(base_url=gateway.url, timeout=GUARD) as http:
        response = await http.post("/v1/messages", json={"model": "sim:tokens=2,ttft_ms=600", "max_tokens": 9, "stream": True,
                                                         "messages": [{"role": "user", "content": PROMPT}]})
    assert b'event: ping\ndata: {"type": "ping"}\n\n' in response.content
    assert b"event: message_stop" in response.content


# --- errors in the route's API shape ---------------------------------------------------------


async def test_errors_on_messages_routes_are_anthropic_shaped(start_gateway: GatewayFactory, simulator: RunningSimulator) -> None:
    gateway = await start_gateway(api_keys=["sk-gateway"])
    async with httpx2.AsyncClient(base_url=gateway.url, timeout=GUARD) as http:
        unauthorized = await http.post("/v1/messages", json={"model": "sim", "max_tokens": 5, "messages": []})
        invalid = await http.post(
            "/v1/messages", headers={"x-api-key": "sk-gateway"},
            json={"model": "sim", "messages": [{"role": "user", "content": "hi"}]},  # no max_tokens
        )
        chat_shaped = await http.post("/v1/responses", json={"model": "sim"}, headers={"authorization": "Bearer sk-gateway"})
    assert unauthorized.status_code == 401
    assert unauthorized.json()["type"] == "error" and unauthorized.json()["error"]["type"] == "authentication_error"
    assert invalid.status_code == 400 and invalid.json()["error"]["type"] == "invalid_request_error"
    assert invalid.json()["type"] == "error"
    assert chat_shaped.status_code == 400 and set(chat_shaped.json()["error"]) == {"message", "type", "param", "code"}


async def test_a_model_served_only_over_another_api_gets_a_4xx_in_that_routes_shape(
    start_gateway: GatewayFactory, simulator: RunningSimulator
) -> None:
    claude = DeploymentConfig(base_url=simulator.base_url, model="sim:tokens=3", provider="anthropic")
    gpt = DeploymentConfig(base_url=simulator.base_url, model="sim:tokens=3")
    gateway = await start_gateway(
        models=[ModelConfig(name="claude", deployments=[claude]), ModelConfig(name="gpt", deployments=[gpt])],
    )
    async with httpx2.AsyncClient(base_url=gateway.url, timeout=GUARD) as http:
        on_chat = await http.post("/v1/chat/completions", json={"model": "claude", "messages": [{"role": "user", "content": "x"}]})
        on_messages = await http.post("/v1/messages", json={"model": "gpt", "max_tokens": 5,
                                                             "messages": [{"role": "user", "content": "x"}]})
        served = await http.post("/v1/messages", json={"model": "claude", "max_tokens": 5,
                                                       "messages": [{"role": "user", "content": "x"}]})
    assert on_chat.status_code == 400 and on_chat.json()["error"]["code"] == "model_not_supported"
    assert on_messages.status_code == 400 and on_messages.json()["type"] == "error"
    assert served.status_code == 200 and served.json()["content"][0]["text"] == "".join(simulated_tokens("x", 3))


# --- against an independent fake upstream ----------------------------------------------------
#
# The simulator and the grammars were written from the same notes; this upstream is
# not: it replays event streams shaped like the providers' documented examples
# (Anthropic's tool-use stream with a ping after content; a Responses stream with a
# function call), cut into odd-sized writes, and the SDKs' view through Sluice must
# equal their view of the upstream itself.


def _named(events: list[tuple[str, dict[str, Any]]]) -> bytes:
    return b"".join(f"event: {name}\ndata: {json.dumps(data)}\n\n".encode() for name, data in events)


ANTHROPIC_TOOL_STREAM = _named([
    ("message_start", {"type": "message_start", "message": {
        "id": "msg_014p7gG3wDgGV9EUtLvnow3U", "type": "message", "role": "assistant", "model": "claude-x",
        "stop_sequence": None, "usage": {"input_tokens": 472, "output_tokens": 2}, "content": [], "stop_reason": None}}),
    ("content_block_start", {"type": "content_block_start", "index": 0, "content_block": {"type": "text", "text": ""}}),
    ("ping", {"type": "ping"}),
    ("content_block_delta", {"type": "content_block_delta", "index": 0, "delta": {"type": "text_delta", "text": "Okay"}}),
    ("content_block_delta", {"type": "content_block_delta", "index": 0,
                             "delta": {"type": "text_delta", "text": ", let's check the weather"}}),
    ("content_block_stop", {"type": "content_block_stop", "index": 0}),
    ("content_block_start", {"type": "content_block_start", "index": 1, "content_block": {
        "type": "tool_use", "id": "toolu_01T1x1fJ34qAmk2tNTrN7Up6", "name": "get_weather", "input": {}}}),
    ("content_block_delta", {"type": "content_block_delta", "index": 1, "delta": {"type": "input_json_delta", "partial_json": ""}}),
    ("content_block_delta", {"type": "content_block_delta", "index": 1,
                             "delta": {"type": "input_json_delta", "partial_json": "{\"location\":"}}),
    ("ping", {"type": "ping"}),
    ("content_block_delta", {"type": "content_block_delta", "index": 1,
                             "delta": {"type": "input_json_delta", "partial_json": " \"San Francisco, CA\"}"}}),
    ("content_block_stop", {"type": "content_block_stop", "index": 1}),
    ("message_delta", {"type": "message_delta", "delta": {"stop_reason": "tool_use", "stop_sequence": None},
                       "usage": {"output_tokens": 89}}),
    ("message_stop", {"type": "message_stop"}),
])


def _response(status: str, output: list[dict[str, Any]], usage: dict[str, Any] | None) -> dict[str, Any]:
    return {"id": "resp_67c9fdcecf488190", "object": "response", "created_at": 1741290958, "status": status,
            "error": None, "incomplete_details": None, "instructions": None, "max_output_tokens": None,
            "model": "gpt-x", "output": output, "parallel_tool_calls": True, "previous_response_id": None,
            "reasoning": {"effort": None, "summary": None}, "store": True, "temperature": 1.0,
            "text": {"format": {"type": "text"}}, "tool_choice": "auto", "tools": [], "top_p": 1.0,
            "truncation": "disabled", "usage": usage, "user": None, "metadata": {}}


_CALL = {"type": "function_call", "id": "fc_12345", "call_id": "call_12345", "name": "get_weather", "arguments": "", "status": "in_progress"}
_MESSAGE = {"type": "message", "id": "msg_1", "status": "in_progress", "role": "assistant", "content": []}
_PART = {"type": "output_text", "text": "", "annotations": []}
_DONE_MESSAGE = {**_MESSAGE, "status": "completed", "content": [{**_PART, "text": "Hi there"}]}
_DONE_CALL = {**_CALL, "status": "completed", "arguments": "{\"city\":\"Paris\"}"}
_USAGE = {"input_tokens": 36, "input_tokens_details": {"cached_tokens": 0}, "output_tokens": 87,
          "output_tokens_details": {"reasoning_tokens": 0}, "total_tokens": 123}
RESPONSES_TOOL_STREAM = _named([
    (kind, {"type": kind, "sequence_number": n, **data}) for n, (kind, data) in enumerate([
        ("response.created", {"response": _response("in_progress", [], None)}),
        ("response.in_progress", {"response": _response("in_progress", [], None)}),
        ("response.output_item.added", {"output_index": 0, "item": _MESSAGE}),
        ("response.content_part.added", {"item_id": "msg_1", "output_index": 0, "content_index": 0, "part": _PART}),
        ("response.output_text.delta", {"item_id": "msg_1", "output_index": 0, "content_index": 0, "delta": "Hi", "logprobs": []}),
        ("response.output_text.delta", {"item_id": "msg_1", "output_index": 0, "content_index": 0, "delta": " there", "logprobs": []}),
        ("response.output_text.done", {"item_id": "msg_1", "output_index": 0, "content_index": 0, "text": "Hi there", "logprobs": []}),
        ("response.content_part.done", {"item_id": "msg_1", "output_index": 0, "content_index": 0, "part": {**_PART, "text": "Hi there"}}),
        ("response.output_item.done", {"output_index": 0, "item": _DONE_MESSAGE}),
        ("response.output_item.added", {"output_index": 1, "item": _CALL}),
        ("response.function_call_arguments.delta", {"item_id": "fc_12345", "output_index": 1, "delta": "{\"city\":"}),
        ("response.function_call_arguments.delta", {"item_id": "fc_12345", "output_index": 1, "delta": "\"Paris\"}"}),
        ("response.function_call_arguments.done", {"item_id": "fc_12345", "output_index": 1, "arguments": "{\"city\":\"Paris\"}"}),
        ("response.output_item.done", {"output_index": 1, "item": _DONE_CALL}),
        ("response.completed", {"response": _response("completed", [_DONE_MESSAGE, _DONE_CALL], _USAGE)}),
    ])
])


class ReplayUpstream:
    """Answers every POST with one canned event stream, written in odd-sized pieces."""

    def __init__(self, streams: dict[str, bytes]) -> None:
        self.streams = streams

    async def serve(self, *, task_status: trio.TaskStatus[str] = trio.TASK_STATUS_IGNORED) -> None:
        import h11

        async def connection(stream: trio.SocketStream) -> None:
            http = h11.Connection(h11.SERVER)
            async with stream:
                request = None
                while True:
                    event = http.next_event()
                    if event is h11.NEED_DATA:
                        http.receive_data(await stream.receive_some(65536))
                    elif isinstance(event, h11.Request):
                        request = event
                    elif isinstance(event, h11.EndOfMessage):
                        break
                assert request is not None
                body = self.streams[request.target.decode().removeprefix("/v1")]
                await stream.send_all(http.send(h11.Response(status_code=200, headers=[
                    ("content-type", "text/event-stream"), ("transfer-encoding", "chunked")])))
                for start in range(0, len(body), 37):  # cuts events, lines and UTF-8 anywhere
                    await stream.send_all(http.send(h11.Data(data=body[start:start + 37])))
                await stream.send_all(http.send(h11.EndOfMessage()))

        listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
        task_status.started(f"http://127.0.0.1:{listeners[0].socket.getsockname()[1]}/v1")
        await trio.serve_listeners(connection, listeners)


async def test_provider_shaped_streams_read_the_same_through_sluice_as_direct(
    nursery: trio.Nursery, start_gateway: GatewayFactory
) -> None:
    upstream = await nursery.start(ReplayUpstream({"/messages": ANTHROPIC_TOOL_STREAM, "/responses": RESPONSES_TOOL_STREAM}).serve)
    gateway = await start_gateway(upstream_base_url=upstream)

    def read(base: str) -> tuple[Any, Any]:
        with anthropic.Anthropic(base_url=base.removesuffix("/v1"), api_key="k", max_retries=0, timeout=GUARD) as claude:
            with claude.messages.stream(model="claude-x", max_tokens=1024,
                                        messages=[{"role": "user", "content": "weather?"}]) as stream:
                message = stream.get_final_message()
        with openai.OpenAI(base_url=base, api_key="k", max_retries=0, timeout=GUARD) as client:
            with client.responses.stream(model="gpt-x", input="weather?") as stream:
                response = stream.get_final_response()
        return message, response

    direct = await in_thread(lambda: read(upstream))
    through = await in_thread(lambda: read(gateway.base_url))
    message, response = through
    assert message.model_dump() == direct[0].model_dump()
    assert message.content[1].input == {"location": "San Francisco, CA"} and message.usage.output_tokens == 89
    assert response.model_dump() == direct[1].model_dump()
    assert response.output_text == "Hi there" and response.output[1].arguments == "{\"city\":\"Paris\"}"


async def test_a_hedge_wins_a_messages_stream_whose_first_deployment_is_slow_to_its_first_content(
    start_gateway: GatewayFactory, start_simulator: Any
) -> None:
    """The slow upstream's message_start arrives at once, but only content claims the stream: the hedge wins."""
    slow, fast = await start_simulator(), await start_simulator()
    deployments = [
        DeploymentConfig(base_url=slow.base_url, model="sim:tokens=5,ttft_ms=5000", weight=1000, name="slow", apis=["messages"]),
        DeploymentConfig(base_url=fast.base_url, model="sim:tokens=5", weight=0.001, name="fast", apis=["messages"]),
    ]
    gateway = await start_gateway(models=[ModelConfig(name="m", strategy="weighted", hedge_after_ms=200, deployments=deployments)])
    async with httpx2.AsyncClient(base_url=gateway.url, timeout=GUARD) as http:
        response = await http.post("/v1/messages", json={"model": "m", "max_tokens": 50, "stream": True,
                                                          "messages": [{"role": "user", "content": PROMPT}]})
    raw = response.content
    assert raw.count(b"event: message_start") == 1 and raw.count(b"event: message_stop") == 1
    figures = json.loads(raw.split(b": sluice ", 1)[1].split(b"\n", 1)[0])
    assert figures["hedge"] == "won" and figures["deployment"] == "fast"
    await wait_until(lambda: slow.stats.requests_closed_by_client == 1, timeout=GUARD)
