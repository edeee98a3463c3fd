"""The simulator speaks every API the gateway relays, each in its own grammar, with the chat endpoint's options.

Through real sockets against the standalone simulator: the real ``openai``
and ``anthropic`` SDKs (sync clients in a worker thread, as in
test_relay.py), and raw reads of the event streams validated event by event
against the SDKs' own pydantic models.
"""

from __future__ import annotations

import base64
import json
import struct
from typing import Any

import anthropic
import httpx2
import openai
import pytest
import trio
from anthropic.types import (
    Message,
    MessageTokensCount,
    RawContentBlockDeltaEvent,
    RawContentBlockStartEvent,
    RawContentBlockStopEvent,
    RawMessageDeltaEvent,
    RawMessageStartEvent,
    RawMessageStopEvent,
)
from anthropic.types.shared import ErrorResponse
from openai.types import Completion, CreateEmbeddingResponse
from openai.types.responses import (
    Response,
    ResponseCompletedEvent,
    ResponseContentPartAddedEvent,
    ResponseContentPartDoneEvent,
    ResponseCreatedEvent,
    ResponseErrorEvent,
    ResponseIncompleteEvent,
    ResponseInProgressEvent,
    ResponseOutputItemAddedEvent,
    ResponseOutputItemDoneEvent,
    ResponseTextDeltaEvent,
    ResponseTextDoneEvent,
)
from pydantic import BaseModel

from sluice.simulator import simulated_tokens
from sluice.simulator.embeddings import embedding

from .support import RunningSimulator, chat_body, parse_sse, wait_until

RESPONSES_EVENTS: dict[str, type[BaseModel]] = {
    "response.created": ResponseCreatedEvent,
    "response.in_progress": ResponseInProgressEvent,
    "response.output_item.added": ResponseOutputItemAddedEvent,
    "response.content_part.added": ResponseContentPartAddedEvent,
    "response.output_text.delta": ResponseTextDeltaEvent,
    "response.output_text.done": ResponseTextDoneEvent,
    "response.content_part.done": ResponseContentPartDoneEvent,
    "response.output_item.done": ResponseOutputItemDoneEvent,
    "response.completed": ResponseCompletedEvent,
    "response.incomplete": ResponseIncompleteEvent,
    "error": ResponseErrorEvent,
}
MESSAGES_EVENTS: dict[str, type[BaseModel]] = {
    "message_start": RawMessageStartEvent,
    "content_block_start": RawContentBlockStartEvent,
    "content_block_delta": RawContentBlockDeltaEvent,
    "content_block_stop": RawContentBlockStopEvent,
    "message_delta": RawMessageDeltaEvent,
    "message_stop": RawMessageStopEvent,
    "error": ErrorResponse,
}
GUARD = 20.0  # seconds: only a "stop waiting" bound


def _root(simulator: RunningSimulator) -> str:
    return simulator.base_url.removesuffix("/v1")


def _openai(simulator: RunningSimulator) -> openai.OpenAI:
    return openai.OpenAI(base_url=simulator.base_url, api_key="sk-sim", max_retries=0, timeout=GUARD)


def _anthropic(simulator: RunningSimulator) -> anthropic.Anthropic:
    return anthropic.Anthropic(base_url=_root(simulator), api_key="sk-ant-sim", max_retries=0, timeout=GUARD)


async def _in_thread(fn: Any) -> Any:
    with trio.fail_after(GUARD * 2):
        return await trio.to_thread.run_sync(fn)


def _expected(prompt: str, count: int) -> str:
    return "".join(simulated_tokens(prompt, count))


async def _post(simulator: RunningSimulator, path: str, body: dict[str, Any], headers: dict[str, str] | None = None) -> httpx2.Response:
    async with httpx2.AsyncClient(timeout=GUARD) as http:
        return await http.post(_root(simulator) + path, json=body, headers=headers)


def _named_events(raw: bytes) -> list[tuple[str | None, str]]:
    """(event name, data) per server-sent event."""
    events = []
    for block in raw.decode().split("\n\n"):
        if not block.strip():
            continue
        name, data = None, ""
        for line in block.split("\n"):
            if line.startswith("event: "):
                name = line[7:]
            elif line.startswith("data: "):
                data = line[6:]
        events.append((name, data))
    return events


def _validated(raw: bytes, models: dict[str, type[BaseModel]]) -> list[dict[str, Any]]:
    """Each event's data, checked against the SDK's model for its name; ``ping`` left out."""
    datas = []
    for name, data in _named_events(raw):
        assert name is not None, data
        if name == "ping":
            continue
        parsed = json.loads(data)
        assert parsed["type"] == name
        models[name].model_validate(parsed)
        datas.append(parsed)
    return datas


# --- Responses ------------------------------------------------------------------------


async def test_responses_stream_is_the_apis_event_sequence_and_each_event_validates(simulator: RunningSimulator) -> None:
    response = await _post(simulator, "/v1/responses", {"model": "sim:tokens=5", "input": "hi there", "stream": True})
    assert response.status_code == 200 and response.headers["content-type"] == "text/event-stream"
    events = _validated(response.content, RESPONSES_EVENTS)
    assert [e["type"] for e in events] == [
        "response.created",
        "response.in_progress",
        "response.output_item.added",
        "response.content_part.added",
        *["response.output_text.delta"] * 5,
        "response.output_text.done",
        "response.content_part.done",
        "response.output_item.done",
        "response.completed",
    ]
    assert [e["sequence_number"] for e in events] == list(range(len(events)))
    assert len({e["response"]["id"] for e in events if "response" in e}) == 1
    assert "".join(e["delta"] for e in events if e["type"] == "response.output_text.delta") == _expected("hi there", 5)
    assert events[-1]["response"]["usage"]["input_tokens"] == 2 and events[-1]["response"]["usage"]["output_tokens"] == 5
    assert b"[DONE]" not in response.content


async def test_responses_through_the_openai_sdk_create_and_stream_helper(simulator: RunningSimulator) -> None:
    def use_sdk() -> tuple[str, str, str, Any]:
        sdk = _openai(simulator)
        try:
            whole = sdk.responses.create(model="sim:tokens=7", input="say it")
            deltas = "".join(
                event.delta
                for event in sdk.responses.create(model="sim:tokens=7", input=[{"role": "user", "content": "say it"}], stream=True)
                if event.type == "response.output_text.delta"
            )
            with sdk.responses.stream(model="sim:tokens=7", input="say it") as stream:
                final = stream.get_final_response()
            return whole.output_text, deltas, final.output_text, final.usage
        finally:
            sdk.close()

    whole, deltas, final, usage = await _in_thread(use_sdk)
    assert whole == deltas == final == _expected("say it", 7)
    assert (usage.input_tokens, usage.output_tokens, usage.total_tokens) == (2, 7, 9)


async def test_responses_body_validates_and_max_output_tokens_makes_it_incomplete(simulator: RunningSimulator) -> None:
    done = await _post(simulator, "/v1/responses", {"model": "sim:tokens=4", "input": "x"})
    Response.model_validate(done.json())
    assert (done.json()["object"], done.json()["status"]) == ("response", "completed")
    capped = await _post(simulator, "/v1/responses", {"model": "sim:tokens=9", "input": "x", "max_output_tokens": 3})
    assert capped.json()["status"] == "incomplete"
    assert capped.json()["incomplete_details"] == {"reason": "max_output_tokens"}
    assert capped.json()["usage"]["output_tokens"] == 3
    streamed = await _post(simulator, "/v1/responses", {"model": "sim:tokens=9", "input": "x", "max_output_tokens": 3, "stream": True})
    assert _validated(streamed.content, RESPONSES_EVENTS)[-1]["type"] == "response.incomplete"


# --- Anthropic Messages ------------------------------------------------------------------


async def test_messages_stream_is_the_apis_event_sequence_and_each_event_validates(simulator: RunningSimulator) -> None:
    body = {"model": "sim:tokens=4", "max_tokens": 100, "stream": True, "messages": [{"role": "user", "content": "a b c"}]}
    response = await _post(simulator, "/v1/messages", body)
    assert response.status_code == 200
    names = [name for name, _ in _named_events(response.content)]
    assert names == [
        "message_start", "ping", "content_block_start", *["content_block_delta"] * 4,
        "content_block_stop", "message_delta", "message_stop",
    ]  # fmt: skip
    events = _validated(response.content, MESSAGES_EVENTS)
    assert events[0]["message"]["usage"]["input_tokens"] == 3
    assert events[-2]["usage"] == {"output_tokens": 4} and events[-2]["delta"]["stop_reason"] == "end_turn"
    assert "".join(e["delta"]["text"] for e in events if e["type"] == "content_block_delta") == _expected("a b c", 4)


async def test_messages_through_the_anthropic_sdk_create_stream_and_count_tokens(simulator: RunningSimulator) -> None:
    messages = [{"role": "user", "content": [{"type": "text", "text": "tell me"}]}]

    def use_sdk() -> tuple[Any, str, Any, Any]:
        sdk = _anthropic(simulator)
        try:
            whole = sdk.messages.create(model="sim:tokens=6", max_tokens=50, messages=messages)
            with sdk.messages.stream(model="sim:tokens=6", max_tokens=50, messages=messages) as stream:
                text = "".join(stream.text_stream)
                final = stream.get_final_message()
            count = sdk.messages.count_tokens(model="sim", messages=messages, system="be brief")
            return whole, text, final, count
        finally:
            sdk.close()

    whole, text, final, count = await _in_thread(use_sdk)
    assert whole.content[0].text == text == final.content[0].text == _expected("tell me", 6)
    assert (final.usage.input_tokens, final.usage.output_tokens) == (2, 6)
    assert final.stop_reason == whole.stop_reason == "end_turn"
    assert count.input_tokens == 4  # the messages' two words and the system prompt's two
    records = [r for r in simulator.stats.records if r["api"] in ("messages", "count_tokens")]
    assert len(records) == 3 and all(r["anthropic_version"] == anthropic._constants.ANTHROPIC_API_VERSION for r in records)
    assert simulator.stats.authorization_seen == 3


async def test_messages_body_and_count_tokens_validate_and_x_api_key_counts_as_a_credential(simulator: RunningSimulator) -> None:
    body = {"model": "sim:tokens=8", "max_tokens": 3, "messages": [{"role": "user", "content": "cap"}]}
    response = await _post(simulator, "/v1/messages", body, {"x-api-key": "k", "anthropic-version": "2023-06-01"})
    message = Message.model_validate(response.json())
    assert (message.stop_reason, message.usage.output_tokens) == ("max_tokens", 3)
    counted = await _post(simulator, "/v1/messages/count_tokens", {"model": "sim", "messages": body["messages"]})
    assert MessageTokensCount.model_validate(counted.json()).input_tokens == 1
    assert simulator.stats.authorization_seen == 1
    assert simulator.stats.records[0]["anthropic_version"] == "2023-06-01"
    assert simulator.stats.records[1]["anthropic_version"] is None


# --- legacy completions and embeddings -----------------------------------------------------


async def test_completions_through_the_openai_sdk_stream_and_not(simulator: RunningSimulator) -> None:
    def use_sdk() -> tuple[Any, str, list[Any]]:
        sdk = _openai(simulator)
        try:
            whole = sdk.completions.create(model="sim:tokens=5", prompt="once upon")
            chunks = list(sdk.completions.create(model="sim:tokens=5", prompt="once upon", stream=True))
            return whole, "".join(c.choices[0].text for c in chunks), chunks
        finally:
            sdk.close()

    whole, streamed, chunks = await _in_thread(use_sdk)
    Completion.model_validate(whole.model_dump())
    assert whole.object == "text_completion" and whole.choices[0].text == streamed == _expected("once upon", 5)
    assert chunks[-1].choices[0].finish_reason == "stop" and all(c.object == "text_completion" for c in chunks)
    raw = await _post(simulator, "/v1/completions", {"model": "sim:tokens=2", "prompt": "p", "stream": True})
    assert parse_sse(raw.content).ended_with_done


async def test_completions_stream_n_choices_and_include_usage(simulator: RunningSimulator) -> None:
    body = {"model": "sim:tokens=3", "prompt": ["two words"], "n": 2, "stream": True, "stream_options": {"include_usage": True}}
    sse = parse_sse((await _post(simulator, "/v1/completions", body)).content)
    texts: dict[int, str] = {}
    for chunk in sse.chunks[:-1]:
        [choice] = chunk["choices"]
        texts[choice["index"]] = texts.get(choice["index"], "") + choice["text"]
    assert texts == {0: _expected("two words", 3), 1: _expected("two words", 3)}
    assert sse.chunks[-1]["choices"] == [] and sse.chunks[-1]["usage"] == {"prompt_tokens": 2, "completion_tokens": 6, "total_tokens": 8}
    assert sse.ended_with_done


async def test_embeddings_through_the_openai_sdk_base64_by_default_and_float(simulator: RunningSimulator) -> None:
    def use_sdk() -> tuple[Any, Any]:
        sdk = _openai(simulator)
        try:
            default = sdk.embeddings.create(model="text-embedding-3-small", input=["one fish", "two"])
            floats = sdk.embeddings.create(model="text-embedding-3-small", input="one fish", encoding_format="float", dimensions=8)
            return default, floats
        finally:
            sdk.close()

    default, floats = await _in_thread(use_sdk)
    assert [len(d.embedding) for d in default.data] == [1536, 1536]
    assert default.data[0].embedding == embedding("one fish", 1536) and default.data[1].embedding == embedding("two", 1536)
    assert floats.data[0].embedding == embedding("one fish", 8)
    assert default.usage.prompt_tokens == 3 and floats.usage.total_tokens == 2
    raw = await _post(simulator, "/v1/embeddings", {"model": "e", "input": "one fish", "encoding_format": "base64", "dimensions": 8})
    CreateEmbeddingResponse.model_validate({**raw.json(), "data": []})
    packed = base64.b64decode(raw.json()["data"][0]["embedding"])
    assert list(struct.unpack("<8f", packed)) == embedding("one fish", 8)
    assert abs(sum(v * v for v in embedding("one fish", 8)) - 1.0) < 1e-5


async def test_embeddings_refuse_bad_and_oversized_input(simulator: RunningSimulator) -> None:
    for body, param in (
        ({"model": "e", "input": ""}, "input"),
        ({"model": "e", "input": [1.5]}, "input"),
        ({"model": "e", "input": "x", "dimensions": 0}, "dimensions"),
        ({"model": "e", "input": ["x"] * 1000, "dimensions": 3072}, "input"),
    ):
        response = await _post(simulator, "/v1/embeddings", body)
        assert response.status_code == 400 and response.json()["error"]["param"] == param


# --- the same text and the same options on every API -----------------------------------------


async def test_every_api_gives_the_chat_endpoints_text_for_the_same_model_and_prompt(simulator: RunningSimulator) -> None:
    model, prompt = "sim:tokens=12,seed=s", "same words"
    chat = await _post(simulator, "/v1/chat/completions", chat_body(model, stream=False, content=prompt))
    text = chat.json()["choices"][0]["message"]["content"]
    assert text == "".join(simulated_tokens(prompt, 12, seed="s"))
    responses = await _post(simulator, "/v1/responses", {"model": model, "input": prompt})
    messages = await _post(simulator, "/v1/messages", {"model": model, "max_tokens": 99, "messages": [{"role": "user", "content": prompt}]})
    completions = await _post(simulator, "/v1/completions", {"model": model, "prompt": prompt})
    assert responses.json()["output"][0]["content"][0]["text"] == text
    assert messages.json()["content"][0]["text"] == text
    assert completions.json()["choices"][0]["text"] == text


async def test_latency_options_apply_to_every_api(simulator: RunningSimulator) -> None:
    # A stream's first content arrives after ttft_ms, not with the head: read until the head's events, then time out.
    for path, body, head, content in (
        ("/v1/responses", {"input": "x"}, b"event: response.in_progress", b"response.output_text.delta"),
        ("/v1/messages", {"max_tokens": 9, "messages": [{"role": "user", "content": "x"}]}, b"event: ping", b"content_block_delta"),
        ("/v1/completions", {"prompt": "x"}, b"", b'"text"'),
    ):
        received = b""
        async with httpx2.AsyncClient(timeout=GUARD) as http:
            with trio.move_on_after(0.5):
                payload = {**body, "model": "sim:tokens=2,ttft_ms=60000", "stream": True}
                async with http.stream("POST", _root(simulator) + path, json=payload) as response:
                    assert response.status_code == 200
                    async for chunk in response.aiter_raw():
                        received += chunk
        assert head in received and content not in received, path
    await wait_until(lambda: simulator.stats.requests_closed_by_client == 3)


# --- faults in each grammar's own form ------------------------------------------------------


async def test_a_status_fault_on_messages_is_anthropic_shaped_and_the_sdk_maps_it(simulator: RunningSimulator) -> None:
    for status, kind in ((529, "overloaded_error"), (429, "rate_limit_error"), (500, "api_error"), (400, "invalid_request_error")):
        body = {"model": f"sim:fault=status,status_code={status}", "max_tokens": 9, "messages": [{"role": "user", "content": "x"}]}
        response = await _post(simulator, "/v1/messages", body)
        assert response.status_code == status
        assert ErrorResponse.model_validate(response.json()).error.type == kind
        assert set(response.json()) == {"type", "error"}

    def use_sdk() -> type[Exception]:
        sdk = _anthropic(simulator)
        try:
            sdk.messages.create(model="sim:fault=status,status_code=529", max_tokens=9, messages=[{"role": "user", "content": "x"}])
        except anthropic.APIStatusError as exc:
            return type(exc)
        finally:
            sdk.close()
        return type(None)

    assert await _in_thread(use_sdk) is anthropic.OverloadedError
    bad = await _post(simulator, "/v1/messages", {"model": "sim:tokens=nope", "max_tokens": 9, "messages": [{"role": "user", "content": "x"}]})
    assert bad.status_code == 400 and bad.json()["error"]["type"] == "invalid_request_error" and bad.json()["type"] == "error"
    openai_shaped = await _post(simulator, "/v1/responses", {"model": "sim:fault=status,status_code=503", "input": "x"})
    assert openai_shaped.status_code == 503 and openai_shaped.json()["error"]["type"] == "server_error"


async def test_a_mid_stream_error_event_is_each_grammars_own_and_the_sdks_raise(simulator: RunningSimulator) -> None:
    model = "sim:tokens=6,fault=error_event,after=2"
    responses = await _post(simulator, "/v1/responses", {"model": model, "input": "x", "stream": True})
    events = _validated(responses.content, RESPONSES_EVENTS)
    assert events[-1]["type"] == "error" and events[-1]["sequence_number"] == len(events) - 1
    assert [e["type"] for e in events].count("response.output_text.delta") == 2
    messages = await _post(simulator, "/v1/messages", {"model": model, "max_tokens": 9, "stream": True, "messages": [{"role": "user", "content": "x"}]})
    events = _validated(messages.content, MESSAGES_EVENTS)
    assert events[-1] == {"type": "error", "error": {"type": "overloaded_error", "message": "Overloaded"}}
    completions = await _post(simulator, "/v1/completions", {"model": model, "prompt": "x", "stream": True})
    assert parse_sse(completions.content).error is not None

    def use_sdks() -> list[str]:
        outcomes = []
        sdk = _openai(simulator)
        try:
            with sdk.responses.stream(model=model, input="x") as stream:
                seen = [event.type for event in stream]
                try:
                    stream.get_final_response()
                except RuntimeError as exc:
                    outcomes.append(f"responses: {seen[-1]}, {exc}")
            try:
                list(sdk.completions.create(model=model, prompt="x", stream=True))
            except openai.APIError as exc:
                outcomes.append(f"completions: {exc.message}")
        finally:
            sdk.close()
        claude = _anthropic(simulator)
        try:
            with claude.messages.stream(model=model, max_tokens=9, messages=[{"role": "user", "content": "x"}]) as stream:
                stream.get_final_message()
        except anthropic.APIStatusError as exc:
            outcomes.append(f"messages: {exc.body}")
        finally:
            claude.close()
        return outcomes

    outcomes = await _in_thread(use_sdks)
    assert outcomes == [
        "responses: error, Didn't receive a `response.completed` event.",
        "completions: simulated upstream error",
        "messages: {'type': 'error', 'error': {'type': 'overloaded_error', 'message': 'Overloaded'}}",
    ]


async def test_an_error_event_before_any_content_comes_right_after_the_head_events(simulator: RunningSimulator) -> None:
    model = "sim:tokens=6,fault=error_event,after=0"
    responses = await _post(simulator, "/v1/responses", {"model": model, "input": "x", "stream": True})
    assert responses.status_code == 200
    assert [e["type"] for e in _validated(responses.content, RESPONSES_EVENTS)] == ["response.created", "response.in_progress", "error"]
    messages = await _post(simulator, "/v1/messages", {"model": model, "max_tokens": 9, "stream": True, "messages": [{"role": "user", "content": "x"}]})
    assert messages.status_code == 200
    assert [name for name, _ in _named_events(messages.content)] == ["message_start", "ping", "error"]
    chat = await _post(simulator, "/v1/chat/completions", chat_body(model))
    assert parse_sse(chat.content).chunks == [] and parse_sse(chat.content).error is not None


async def test_no_done_malformed_and_reset_in_each_grammar(simulator: RunningSimulator) -> None:
    messages_body = {"max_tokens": 9, "stream": True, "messages": [{"role": "user", "content": "x"}]}
    cut = await _post(simulator, "/v1/responses", {"model": "sim:tokens=3,fault=no_done", "input": "x", "stream": True})
    assert [e["type"] for e in _validated(cut.content, RESPONSES_EVENTS)][-1] == "response.output_item.done"
    cut = await _post(simulator, "/v1/messages", {**messages_body, "model": "sim:tokens=3,fault=no_done"})
    assert [e["type"] for e in _validated(cut.content, MESSAGES_EVENTS)][-1] == "message_delta"
    cut = await _post(simulator, "/v1/completions", {"model": "sim:tokens=3,fault=no_done", "prompt": "x", "stream": True})
    assert b"[DONE]" not in cut.content and b'"finish_reason":"stop"' in cut.content
    bad = await _post(simulator, "/v1/responses", {"model": "sim:tokens=3,fault=malformed,after=1", "input": "x", "stream": True})
    assert b"event: response.output_text.delta\ndata: {not json\n\n" in bad.content and b"response.completed" in bad.content
    bad = await _post(simulator, "/v1/messages", {**messages_body, "model": "sim:tokens=3,fault=malformed,after=1"})
    assert b"event: content_block_delta\ndata: {not json\n\n" in bad.content and b"message_stop" in bad.content
    for path, body in (("/v1/responses", {"input": "x"}), ("/v1/messages", messages_body), ("/v1/completions", {"prompt": "x"})):
        with pytest.raises(httpx2.HTTPError):
            await _post(simulator, path, {**body, "model": "sim:tokens=10,fault=reset,after=2", "stream": True})
    # no_done and reset are faults (six); a malformed event in a stream that completes is not
    await wait_until(lambda: simulator.stats.active_requests == 0)
    assert (simulator.stats.requests_faulted, simulator.stats.requests_completed) == (6, 2)


async def test_fail_times_and_limits_apply_to_every_api(simulator: RunningSimulator) -> None:
    model = "sim:tokens=1,fault=status,status_code=503,fail_times=1,fault_key=every"
    first = await _post(simulator, "/v1/responses", {"model": model, "input": "x"})
    second = await _post(simulator, "/v1/messages", {"model": model, "max_tokens": 5, "messages": [{"role": "user", "content": "x"}]})
    assert (first.status_code, second.status_code) == (503, 200)
    over = await _post(simulator, "/v1/responses", {"model": "sim:tokens=100001", "input": "x", "stream": True})
    assert over.status_code == 400 and over.json()["error"]["code"] == "sim_limit_exceeded"
    over = await _post(simulator, "/v1/messages", {"model": "sim:tokens=100001", "max_tokens": 200000, "messages": [{"role": "user", "content": "x"}]})
    assert over.status_code == 400 and over.json()["error"]["type"] == "invalid_request_error"
    capped = await _post(simulator, "/v1/completions", {"model": "sim:tokens=100001", "prompt": "x", "max_tokens": 4})
    assert capped.status_code == 200 and capped.json()["choices"][0]["finish_reason"] == "length"


async def test_api_routes_refuse_bad_bodies_and_other_methods(simulator: RunningSimulator) -> None:
    async with httpx2.AsyncClient(base_url=_root(simulator), timeout=GUARD) as http:
        for path in ("/v1/responses", "/v1/completions", "/v1/embeddings"):
            assert (await http.post(path, content=b"{")).json()["error"]["code"] == "invalid_json"
            assert (await http.post(path, json={"model": "sim"})).status_code == 400
            assert (await http.get(path)).status_code == 405
        for path in ("/v1/messages", "/v1/messages/count_tokens"):
            refused = await http.post(path, json={"model": "sim", "messages": []})
            assert refused.status_code == 400 and refused.json()["type"] == "error"
            assert (await http.get(path)).json()["error"]["type"] == "invalid_request_error"
    assert simulator.stats.requests_started == 0
