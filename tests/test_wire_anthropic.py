"""The Anthropic Messages grammar: stream decisions, error events and coalescing, with bytes only."""

from __future__ import annotations

import json
from typing import Any

import anthropic
import httpx2
import pytest
from anthropic.types import ErrorResponse, RawMessageStreamEvent
from hypothesis import given, settings
from hypothesis import strategies as st
from pydantic import TypeAdapter

from sluice.errors import (
    InvalidRequest,
    NotFound,
    Overloaded,
    PayloadTooLarge,
    RateLimited,
    SluiceError,
    StreamInterrupted,
    Unauthorized,
    UpstreamStatusError,
    UpstreamTimeout,
)
from sluice.wire.anthropic import (
    MESSAGES,
    MessagesFramer,
    anthropic_error_type,
    coalesce,
    parse_count_tokens_request,
    parse_messages_request,
)
from sluice.wire.grammar import Usage

STREAM_EVENT: TypeAdapter[Any] = TypeAdapter(RawMessageStreamEvent)


def event(kind: str, **fields: Any) -> bytes:
    body = {"type": kind, **fields}
    return f"event: {kind}\ndata: ".encode() + json.dumps(body, separators=(",", ":")).encode() + b"\n\n"


MESSAGE_START = event(
    "message_start",
    message={
        "id": "msg_1", "type": "message", "role": "assistant", "model": "claude-x", "content": [],
        "stop_reason": None, "stop_sequence": None, "usage": {"input_tokens": 25, "output_tokens": 1},
    },
)
PING = b'event: ping\ndata: {"type": "ping"}\n\n'
BLOCK_START = event("content_block_start", index=0, content_block={"type": "text", "text": ""})
BLOCK_STOP = event("content_block_stop", index=0)
MESSAGE_STOP = event("message_stop")
OVERLOADED = event("error", error={"type": "overloaded_error", "message": "Overloaded"})


def text(chunk: str, index: int = 0) -> bytes:
    return event("content_block_delta", index=index, delta={"type": "text_delta", "text": chunk})


def json_part(chunk: str, index: int = 1) -> bytes:
    return event("content_block_delta", index=index, delta={"type": "input_json_delta", "partial_json": chunk})


def message_delta(output_tokens: int) -> bytes:
    return event("message_delta", delta={"stop_reason": "end_turn", "stop_sequence": None}, usage={"output_tokens": output_tokens})


def feed_all(framer: MessagesFramer, stream: bytes, cuts: list[int] = []) -> bytes:  # noqa: B006
    out = b""
    previous = 0
    for cut in [*sorted(cuts), len(stream)]:
        out += framer.feed(stream[previous:cut])
        previous = cut
    return out


def test_message_start_is_held_until_the_first_content_block_and_pings_before_it_dropped() -> None:
    framer = MESSAGES.new_framer()
    assert framer.feed(MESSAGE_START + PING) == b""
    assert not framer.content_started
    assert framer.feed(BLOCK_START + text("Hi")) == MESSAGE_START + BLOCK_START + text("Hi")
    assert framer.content_started
    assert framer.events == 3 and framer.content_deltas == 1
    assert framer.feed(PING) == PING  # after content, the upstream's pings pass


def test_error_before_content_is_held_and_nothing_is_forwarded() -> None:
    framer = MESSAGES.new_framer()
    assert framer.feed(MESSAGE_START + OVERLOADED + BLOCK_START) == b""
    assert framer.finished and not framer.done and not framer.content_started
    assert framer.upstream_error == MESSAGE_START + OVERLOADED
    assert framer.events == 0  # message_start was never returned by feed
    assert framer.usage == Usage(input_tokens=25, output_tokens=1)


def test_error_after_content_ends_the_stream_unforwarded() -> None:
    framer = MESSAGES.new_framer()
    out = framer.feed(MESSAGE_START + BLOCK_START + text("a") + OVERLOADED + text("late"))
    assert out == MESSAGE_START + BLOCK_START + text("a")
    assert framer.upstream_error == OVERLOADED
    assert framer.feed(text("more")) == b""


def test_message_stop_is_the_terminal_never_forwarded_and_usage_is_cumulative() -> None:
    framer = MESSAGES.new_framer()
    body = MESSAGE_START + BLOCK_START + text("a") + text("b") + BLOCK_STOP + message_delta(7) + message_delta(9)
    out = framer.feed(body + MESSAGE_STOP)
    assert out == body
    assert framer.done and framer.terminal == MESSAGE_STOP
    assert framer.usage == Usage(input_tokens=25, output_tokens=9)


def test_an_empty_message_ends_with_its_preamble_in_the_terminal() -> None:
    framer = MESSAGES.new_framer()
    assert framer.feed(MESSAGE_START + message_delta(0) + MESSAGE_STOP) == b""
    assert framer.terminal == MESSAGE_START + message_delta(0) + MESSAGE_STOP


def test_malformed_data_ends_the_stream_unforwarded() -> None:
    framer = MESSAGES.new_framer()
    out = framer.feed(MESSAGE_START + BLOCK_START + b"event: content_block_delta\ndata: not json\n\n" + text("b"))
    assert out == MESSAGE_START + BLOCK_START
    assert framer.malformed is not None


def test_message_start_that_is_not_json_is_malformed() -> None:
    framer = MESSAGES.new_framer()
    framer.feed(b"event: message_start\ndata: {oops}\n\n")
    assert framer.malformed is not None


@pytest.mark.parametrize(
    ("error", "kind"),
    [
        (InvalidRequest("bad"), "invalid_request_error"),
        (Unauthorized("key"), "authentication_error"),
        (NotFound("where"), "not_found_error"),
        (RateLimited("slow down"), "rate_limit_error"),
        (StreamInterrupted("cut"), "api_error"),
        (Overloaded("busy"), "overloaded_error"),
        (UpstreamTimeout("late"), "timeout_error"),
        (UpstreamStatusError(529, "overloaded"), "overloaded_error"),
        (UpstreamStatusError(418, "teapot"), "invalid_request_error"),
    ],
)
def test_error_event_parses_as_the_sdks_error_response(error: SluiceError, kind: str) -> None:
    framer = MESSAGES.new_framer()
    framer.feed(MESSAGE_START + BLOCK_START + text("a"))
    emitted = framer.error_event(error)
    head, _, data = emitted.partition(b"\n")
    assert head == b"event: error" and emitted.endswith(b"\n\n")
    parsed = ErrorResponse.model_validate(json.loads(data.removeprefix(b"data: ")))
    assert parsed.error.type == kind
    assert parsed.error.message == error.message
    assert ErrorResponse.model_validate_json(MESSAGES.error_body(error)).error.type == kind


def test_a_payload_too_large_is_anthropics_request_too_large() -> None:
    # Anthropic's documented 413 type; the SDK's ErrorType literal does not list it, so no model check.
    assert anthropic_error_type(PayloadTooLarge("big")) == "request_too_large"
    assert json.loads(MESSAGES.error_body(PayloadTooLarge("big")))["error"]["type"] == "request_too_large"


def test_an_upstreams_own_anthropic_error_body_is_relayed_as_it_was() -> None:
    body = {"type": "error", "error": {"type": "overloaded_error", "message": "Overloaded"}, "request_id": "r"}
    assert json.loads(MESSAGES.error_body(UpstreamStatusError(529, "x", body=body))) == body


def test_error_event_before_content_follows_the_held_message_start() -> None:
    framer = MESSAGES.new_framer()
    framer.feed(MESSAGE_START)
    emitted = framer.error_event(StreamInterrupted("cut"))
    assert emitted.startswith(MESSAGE_START + b"event: error\n")


def test_the_anthropic_sdk_raises_on_the_gateways_error_event() -> None:
    """Through the SDK's own stream decoder: every forwarded event parses, and the cut ends in an APIError."""
    framer = MESSAGES.new_framer()
    body = framer.feed(MESSAGE_START + PING + BLOCK_START + text("Hi")) + framer.error_event(StreamInterrupted("cut"))

    def handler(request: httpx2.Request) -> httpx2.Response:
        return httpx2.Response(200, headers={"content-type": "text/event-stream"}, content=body)

    transport = httpx2.MockTransport(handler)
    client = anthropic.Anthropic(api_key="k", base_url="http://test", http_client=httpx2.Client(transport=transport))
    seen: list[str] = []
    with pytest.raises(anthropic.APIStatusError) as caught:
        for item in client.messages.create(
            model="m", max_tokens=10, messages=[{"role": "user", "content": "hi"}], stream=True
        ):
            seen.append(item.type)
    assert seen == ["message_start", "content_block_start", "content_block_delta"]
    assert caught.value.body == {"type": "error", "error": {"type": "api_error", "message": "cut"}}


def test_every_event_this_file_builds_is_a_valid_sdk_stream_event() -> None:
    for raw in (MESSAGE_START, BLOCK_START, text("a"), json_part("{"), BLOCK_STOP, message_delta(3), MESSAGE_STOP):
        STREAM_EVENT.validate_python(json.loads(raw.partition(b"data: ")[2]))


# --- every split ---------------------------------------------------------------

event_kinds = st.one_of(
    st.text(max_size=8).map(text),
    st.text(max_size=8).map(json_part),
    st.just(MESSAGE_START),
    st.just(PING),
    st.just(BLOCK_START),
    st.just(BLOCK_STOP),
    st.integers(0, 50).map(message_delta),
    st.just(MESSAGE_STOP),
    st.just(OVERLOADED),
    st.just(b": comment\n\n"),
    st.just(b"event: content_block_delta\ndata: not json\n\n"),
    st.just(b'data: {"type":"message_stop"}\n\n'),
    st.just(b"event: message_delta\ndata: {bad}\n\n"),
    st.just(b'event: content_block_delta\ndata: {"a":\ndata: 1}\n\n'),
    st.just(b"\n\n"),
)


def state(framer: MessagesFramer, out: bytes) -> tuple[object, ...]:
    return (
        out, framer.finished, framer.done, framer.terminal, framer.upstream_error, framer.malformed,
        framer.content_started, framer.events, framer.content_deltas, framer.usage,
    )


@settings(max_examples=300)
@given(events=st.lists(event_kinds, min_size=1, max_size=12), crlf=st.booleans(), data=st.data())
def test_every_split_of_a_stream_decides_as_feeding_it_whole(events: list[bytes], crlf: bool, data: st.DataObject) -> None:
    stream = b"".join(events)
    if crlf:
        stream = stream.replace(b"\n", b"\r\n")
    whole = MessagesFramer()
    expected = state(whole, whole.feed(stream))
    cuts = data.draw(st.lists(st.integers(0, len(stream)), max_size=12))
    split = MessagesFramer()
    assert state(split, feed_all(split, stream, cuts)) == expected


@given(st.lists(st.text(max_size=10), min_size=1, max_size=30), st.data())
def test_every_split_of_a_clean_stream_forwards_it_all(texts: list[str], data: st.DataObject) -> None:
    body = MESSAGE_START + BLOCK_START + b"".join(text(t) for t in texts) + BLOCK_STOP + message_delta(len(texts))
    stream = MESSAGE_START[:0] + body + MESSAGE_STOP
    framer = MessagesFramer()
    assert feed_all(framer, stream, data.draw(st.lists(st.integers(0, len(stream)), max_size=12))) == body
    assert framer.done and framer.content_deltas == len(texts)
    assert framer.usage == Usage(25, len(texts))


# --- coalescing ----------------------------------------------------------------


def _joined(payload: bytes) -> dict[tuple[int, str], str]:
    found: dict[tuple[int, str], str] = {}
    for raw in payload.split(b"\n\n")[:-1]:
        obj = json.loads(raw.partition(b"data: ")[2])
        if obj["type"] == "content_block_delta":
            delta = obj["delta"]
            field = "text" if delta["type"] == "text_delta" else "partial_json"
            key = (obj["index"], delta["type"])
            found[key] = found.get(key, "") + delta[field]
    return found


def test_coalesce_merges_deltas_of_one_block_and_type() -> None:
    payload = text("Hel") + text("lo") + json_part('{"a"') + json_part(": 1}") + text("!", index=2)
    merged, merged_away = MESSAGES.coalesce(payload)  # type: ignore[misc]
    assert merged_away == 2
    assert merged == text("Hello") + json_part('{"a": 1}') + text("!", index=2)


def test_coalesce_keeps_barriers_and_unknown_deltas_in_place() -> None:
    signature = event("content_block_delta", index=0, delta={"type": "signature_delta", "signature": "s"})
    payload = text("a") + PING + text("b") + signature + text("c")
    merged, merged_away = coalesce(payload)
    assert (merged, merged_away) == (payload, 0)


@given(st.lists(st.tuples(st.text(max_size=6), st.integers(0, 1), st.booleans(), st.booleans()), max_size=20))
def test_coalesce_is_lossless(parts: list[tuple[str, int, bool, bool]]) -> None:
    payload = b"".join(
        (PING if barrier else b"") + (json_part(chunk, index) if is_json else text(chunk, index))
        for chunk, index, barrier, is_json in parts
    )
    merged, merged_away = coalesce(payload)
    assert _joined(merged) == _joined(payload)
    assert merged.count(b"\n\n") == payload.count(b"\n\n") - merged_away
    for raw in merged.split(b"\n\n")[:-1]:
        if not raw.startswith(b"event: ping"):
            STREAM_EVENT.validate_python(json.loads(raw.partition(b"data: ")[2]))


# --- requests ------------------------------------------------------------------


def test_request_forwards_the_clients_bytes() -> None:
    raw = b'{"model":"claude-x","max_tokens":64,"messages":[{"role":"user","content":"hi"}],"stream":true,"system":"s"}'
    parsed = MESSAGES.parse_request(raw, max_model_name_length=64)
    assert (parsed.model_name, parsed.stream) == ("claude-x", True)
    assert parsed.body_for_model(None) == raw
    assert json.loads(parsed.body_for_model("claude-y"))["model"] == "claude-y"
    assert isinstance(parsed.new_framer(), MessagesFramer)


@pytest.mark.parametrize(
    ("raw", "param", "code"),
    [
        (b'{"model":"m","messages":[{"role":"user","content":"hi"}]}', "max_tokens", "missing_required_parameter"),
        (b'{"model":"m","max_tokens":0,"messages":[{"role":"user","content":"hi"}]}', "max_tokens", "invalid_value"),
        (b'{"model":"m","max_tokens":"9","messages":[{"role":"user","content":"hi"}]}', "max_tokens", "invalid_value"),
        (b'{"model":"m","max_tokens":9,"messages":[]}', "messages", "invalid_value"),
        (b'{"max_tokens":9,"messages":[{"role":"user","content":"hi"}]}', "model", "missing_required_parameter"),
        (b'{"model":"m","max_tokens":9,"messages":[{"role":"user","content":"hi","role":"x"}]}', "messages[0].role", "duplicate_key"),
        (b'{"model":"m","max_tokens":9,"messages":[{"role":"user","content":"hi"}],"stream":1}', "stream", "invalid_value"),
    ],
)
def test_invalid_request_is_a_400_shaped_as_anthropics_error(raw: bytes, param: str, code: str) -> None:
    with pytest.raises(InvalidRequest) as caught:
        MESSAGES.parse_request(raw, max_model_name_length=64)
    assert (caught.value.param, caught.value.code) == (param, code)
    body = ErrorResponse.model_validate_json(MESSAGES.error_body(caught.value))
    assert body.error.type == "invalid_request_error"


def test_count_tokens_request_needs_model_and_messages_but_not_max_tokens() -> None:
    parsed = parse_count_tokens_request(b'{"model":"m","messages":[{"role":"user","content":"hi"}]}')
    assert parsed.model_name == "m" and not parsed.stream
    with pytest.raises(InvalidRequest) as caught:
        parse_count_tokens_request(b'{"model":"m"}')
    assert caught.value.param == "messages"


def test_backpressure_field_is_never_forwarded_to_anthropic() -> None:
    parsed = parse_messages_request(
        b'{"model":"m","max_tokens":9,"messages":[{"role":"user","content":"hi"}],"backpressure_strategy":"block"}'
    )
    assert parsed.backpressure_strategy == "block"
    assert "backpressure_strategy" not in json.loads(parsed.body_for_model(None))
