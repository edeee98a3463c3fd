"""The OpenAI Responses grammar: stream decisions, error events and coalescing, with bytes only."""

from __future__ import annotations

import json
from typing import Any

import httpx2
import openai
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from openai.types.responses import ResponseErrorEvent

from sluice.errors import InvalidJSON, InvalidRequest, StreamInterrupted, UpstreamTimeout
from sluice.wire.grammar import Usage
from sluice.wire.responses import RESPONSES, ResponsesFramer, coalesce, parse_responses_request


def event(kind: str, sequence: int, **fields: Any) -> bytes:
    body = {"type": kind, "sequence_number": sequence, **fields}
    return f"event: {kind}\ndata: ".encode() + json.dumps(body, separators=(",", ":")).encode() + b"\n\n"


def created(sequence: int = 0) -> bytes:
    return event("response.created", sequence, response={"id": "resp_1", "status": "in_progress", "output": []})


def in_progress(sequence: int = 1) -> bytes:
    return event("response.in_progress", sequence, response={"id": "resp_1", "status": "in_progress"})


def item_added(sequence: int = 2) -> bytes:
    return event("response.output_item.added", sequence, output_index=0, item={"id": "msg_1", "type": "message"})


def delta(text: str, sequence: int, *, content_index: int = 0, item_id: str = "msg_1") -> bytes:
    return event(
        "response.output_text.delta", sequence, item_id=item_id, output_index=0, content_index=content_index, delta=text
    )


def completed(sequence: int, kind: str = "response.completed") -> bytes:
    usage = {"input_tokens": 12, "output_tokens": 5, "total_tokens": 17}
    return event(kind, sequence, response={"id": "resp_1", "status": "completed", "usage": usage})


UPSTREAM_ERROR = event("error", 9, code="server_error", message="boom", param=None)
FAILED = event("response.failed", 9, response={"id": "resp_1", "status": "failed", "error": {"code": "x"}})


def feed_all(framer: ResponsesFramer, stream: bytes, cuts: list[int] = []) -> bytes:  # noqa: B006
    out = b""
    previous = 0
    for cut in [*sorted(cuts), len(stream)]:
        out += framer.feed(stream[previous:cut])
        previous = cut
    return out


def test_preamble_is_held_then_released_with_the_first_content_event() -> None:
    framer = RESPONSES.new_framer()
    assert framer.feed(created() + in_progress()) == b""
    assert not framer.content_started
    out = framer.feed(item_added() + delta("Hi", 3))
    assert out == created() + in_progress() + item_added() + delta("Hi", 3)
    assert framer.content_started
    assert framer.events == 4
    assert framer.content_deltas == 1


def test_error_before_content_is_held_with_the_preamble_and_nothing_is_forwarded() -> None:
    framer = RESPONSES.new_framer()
    out = framer.feed(created() + in_progress() + UPSTREAM_ERROR + delta("late", 10))
    assert out == b""
    assert framer.finished and not framer.done
    assert not framer.content_started
    assert framer.upstream_error == created() + in_progress() + UPSTREAM_ERROR
    assert framer.events == 0  # the preamble was never returned by feed


@pytest.mark.parametrize("error", [UPSTREAM_ERROR, FAILED], ids=["error", "response.failed"])
def test_error_after_content_ends_the_stream_and_is_not_forwarded(error: bytes) -> None:
    framer = RESPONSES.new_framer()
    out = framer.feed(created() + item_added() + delta("a", 3) + error + delta("late", 10))
    assert out == created() + item_added() + delta("a", 3)
    assert framer.upstream_error == error
    assert framer.feed(delta("more", 11)) == b""


@pytest.mark.parametrize("kind", ["response.completed", "response.incomplete"])
def test_terminal_event_is_never_forwarded_and_carries_usage(kind: str) -> None:
    framer = RESPONSES.new_framer()
    out = framer.feed(created() + item_added() + delta("a", 3) + completed(4, kind))
    assert out == created() + item_added() + delta("a", 3)
    assert framer.done and framer.finished
    assert framer.terminal == completed(4, kind)
    assert framer.usage == Usage(input_tokens=12, output_tokens=5)


def test_a_stream_without_content_ends_with_its_preamble_in_the_terminal() -> None:
    framer = RESPONSES.new_framer()
    assert framer.feed(created() + in_progress() + completed(2)) == b""
    assert framer.terminal == created() + in_progress() + completed(2)


def test_error_event_continues_the_sequence_numbers_and_parses_as_the_sdks_error_event() -> None:
    framer = RESPONSES.new_framer()
    framer.feed(created() + item_added() + delta("a", 3) + delta("b", 41))
    emitted = framer.error_event(UpstreamTimeout("The upstream sent nothing for 30 s."))
    head, _, data = emitted.partition(b"\n")
    assert head == b"event: error"
    assert emitted.endswith(b"\n\n")
    parsed = ResponseErrorEvent.model_validate(json.loads(data.removeprefix(b"data: ")))
    assert parsed.sequence_number == 42
    assert parsed.code == "upstream_timeout"
    assert parsed.message == "The upstream sent nothing for 30 s."


def test_error_event_before_content_follows_the_held_preamble() -> None:
    framer = RESPONSES.new_framer()
    framer.feed(created() + in_progress(sequence=1))
    emitted = framer.error_event(StreamInterrupted("cut"))
    assert emitted.startswith(created() + in_progress(sequence=1) + b"event: error\n")
    assert b'"sequence_number":2}' in emitted


def test_sequence_number_is_read_with_spaces_and_across_reads() -> None:
    framer = RESPONSES.new_framer()
    framer.feed(b'event: response.created\ndata: {"type": "response.created", "sequence_number": 7}\n')
    assert framer.last_sequence_number is None  # the event is not whole yet
    framer.feed(b"\n")
    assert framer.last_sequence_number == 7


def test_the_openai_sdk_reads_the_gateways_error_event_as_the_streams_last_event() -> None:
    """Through the SDK's own stream decoder: the cut stream ends with a typed error event, not silently.

    (The openai SDK raises only for ``{"error": ...}`` data; a Responses
    ``error`` event is yielded as ``ResponseErrorEvent`` for the client to see.)
    """
    framer = RESPONSES.new_framer()
    body = framer.feed(created() + item_added() + delta("Hi", 3)) + framer.error_event(StreamInterrupted("cut"))

    def handler(request: httpx2.Request) -> httpx2.Response:
        return httpx2.Response(200, headers={"content-type": "text/event-stream"}, content=body)

    transport = httpx2.MockTransport(handler)
    client = openai.OpenAI(api_key="k", base_url="http://test/v1", http_client=httpx2.Client(transport=transport))
    seen = list(client.responses.create(model="m", input="hi", stream=True))
    assert [item.type for item in seen] == [
        "response.created", "response.output_item.added", "response.output_text.delta", "error",
    ]
    last = seen[-1]
    assert isinstance(last, ResponseErrorEvent)
    assert (last.code, last.message, last.sequence_number) == ("stream_interrupted", "cut", 4)


def test_malformed_data_ends_the_stream_unforwarded() -> None:
    framer = RESPONSES.new_framer()
    out = framer.feed(created() + item_added() + b"event: response.output_text.delta\ndata: not json\n\n" + delta("b", 4))
    assert out == created() + item_added()
    assert framer.malformed is not None and framer.finished


def test_terminal_event_that_is_not_json_is_malformed() -> None:
    framer = RESPONSES.new_framer()
    framer.feed(created() + item_added() + b"event: response.completed\ndata: {not json}\n\n")
    assert framer.malformed is not None
    assert not framer.done


def test_event_without_an_event_line_is_classified_by_its_type() -> None:
    framer = RESPONSES.new_framer()
    bare = b'data: {"type":"response.completed","sequence_number":3,"response":{"usage":{"input_tokens":1,"output_tokens":2}}}\n\n'
    framer.feed(created() + item_added() + bare)
    assert framer.done
    assert framer.usage == Usage(1, 2)


def test_a_runaway_event_is_bounded() -> None:
    framer = ResponsesFramer(max_event_size=1024)
    framer.feed(b"event: response.output_text.delta\ndata: {" + b"x" * 2000)
    assert framer.malformed is not None


# --- every split ---------------------------------------------------------------

event_kinds = st.one_of(
    st.builds(delta, st.text(max_size=8), st.integers(0, 99)),
    st.just(created()),
    st.just(in_progress()),
    st.just(item_added()),
    st.just(completed(50)),
    st.just(completed(50, "response.incomplete")),
    st.just(UPSTREAM_ERROR),
    st.just(FAILED),
    st.just(b": keep-alive\n\n"),
    st.just(b"event: response.output_text.delta\ndata: not json\n\n"),
    st.just(b'data: {"type":"response.output_text.delta","sequence_number":5,"delta":"x"}\n\n'),
    st.just(b'event: response.output_text.delta\ndata: {"a":\ndata: 1}\n\n'),
    st.just(b"event: response.completed\ndata: {bad}\n\n"),
    st.just(b"event: response.output_text.delta\n\n"),
    st.just(b"\n\n"),
)


def state(framer: ResponsesFramer, out: bytes) -> tuple[object, ...]:
    return (
        out, framer.finished, framer.done, framer.terminal, framer.upstream_error, framer.malformed,
        framer.content_started, framer.events, framer.content_deltas, framer.usage, framer.last_sequence_number,
    )


@settings(max_examples=300)
@given(events=st.lists(event_kinds, min_size=1, max_size=12), crlf=st.booleans(), data=st.data())
def test_every_split_of_a_stream_decides_as_feeding_it_whole(events: list[bytes], crlf: bool, data: st.DataObject) -> None:
    stream = b"".join(events)
    if crlf:
        stream = stream.replace(b"\n", b"\r\n")
    whole = ResponsesFramer()
    expected = state(whole, whole.feed(stream))
    cuts = data.draw(st.lists(st.integers(0, len(stream)), max_size=12))
    split = ResponsesFramer()
    assert state(split, feed_all(split, stream, cuts)) == expected


@given(st.lists(st.text(max_size=10), min_size=1, max_size=30), st.data())
def test_every_split_of_a_clean_stream_forwards_it_all(texts: list[str], data: st.DataObject) -> None:
    body = created() + in_progress() + item_added() + b"".join(delta(t, 3 + i) for i, t in enumerate(texts))
    stream = body + completed(99)
    framer = ResponsesFramer()
    out = feed_all(framer, stream, data.draw(st.lists(st.integers(0, len(stream)), max_size=12)))
    assert out == body
    assert framer.done and framer.terminal == completed(99)
    assert framer.content_deltas == len(texts)
    assert framer.last_sequence_number == 99


# --- coalescing ----------------------------------------------------------------


def _texts(payload: bytes) -> list[tuple[int, str]]:
    found = []
    for raw in payload.split(b"\n\n")[:-1]:
        obj = json.loads(raw.partition(b"data: ")[2])
        if obj["type"] == "response.output_text.delta":
            found.append((obj["content_index"], obj["delta"]))
    return found


def test_coalesce_merges_consecutive_deltas_of_one_part_keeping_the_first_sequence_number() -> None:
    payload = delta("Hel", 3) + delta("lo", 4) + delta(" world", 5) + delta("!", 6, content_index=1)
    merged, merged_away = RESPONSES.coalesce(payload)  # type: ignore[misc]
    assert merged_away == 2
    events = merged.split(b"\n\n")[:-1]
    assert len(events) == 2
    first = json.loads(events[0].partition(b"data: ")[2])
    assert first["delta"] == "Hello world" and first["sequence_number"] == 3
    assert events[1] + b"\n\n" == delta("!", 6, content_index=1)  # a run of one: byte for byte


def test_coalesce_keeps_barriers_in_place() -> None:
    payload = delta("a", 3) + item_added(4) + delta("b", 5) + delta("c", 6)
    merged, merged_away = coalesce(payload)
    assert merged_away == 1
    assert merged.startswith(delta("a", 3) + item_added(4))


@given(st.lists(st.tuples(st.text(max_size=6), st.integers(0, 1), st.booleans()), max_size=20))
def test_coalesce_is_lossless(parts: list[tuple[str, int, bool]]) -> None:
    payload = b"".join(
        (item_added(i) if barrier else b"") + delta(text, 100 + i, content_index=index)
        for i, (text, index, barrier) in enumerate(parts)
    )
    merged, merged_away = coalesce(payload)
    before = _texts(payload)
    after = _texts(merged)
    assert len(after) == len(before) - merged_away
    for index in (0, 1):
        assert "".join(t for i, t in after if i == index) == "".join(t for i, t in before if i == index)


def test_coalesce_concatenates_logprobs() -> None:
    a = event("response.output_text.delta", 3, item_id="m", output_index=0, content_index=0, delta="a", logprobs=[{"token": "a"}])
    b = event("response.output_text.delta", 4, item_id="m", output_index=0, content_index=0, delta="b", logprobs=[{"token": "b"}])
    merged, _ = coalesce(a + b)
    assert json.loads(merged.partition(b"data: ")[2])["logprobs"] == [{"token": "a"}, {"token": "b"}]


# --- requests ------------------------------------------------------------------


def test_request_forwards_the_clients_bytes_and_names_the_model() -> None:
    raw = b'{"model":"gpt-x","input":[{"role":"user","content":"hi"}],"stream":true,"reasoning":{"effort":"low"}}'
    parsed = RESPONSES.parse_request(raw, max_model_name_length=64)
    assert parsed.model_name == "gpt-x" and parsed.stream
    assert parsed.body_for_model(None) == raw
    assert json.loads(parsed.body_for_model("other"))["model"] == "other"
    assert isinstance(parsed.new_framer(), ResponsesFramer)


def test_request_strips_the_gateways_backpressure_field() -> None:
    parsed = parse_responses_request(b'{"model":"m","input":"hi","stream":true,"backpressure_strategy":"coalesce"}')
    assert parsed.backpressure_strategy == "coalesce"
    assert "backpressure_strategy" not in json.loads(parsed.body_for_model(None))


@pytest.mark.parametrize(
    ("raw", "param", "code"),
    [
        (b'{"input":"hi"}', "model", "missing_required_parameter"),
        (b'{"model":5,"input":"hi"}', "model", "invalid_value"),
        (b'{"model":"m","input":5}', "input", "invalid_value"),
        (b'{"model":"m","input":"hi","stream":"yes"}', "stream", "invalid_value"),
        (b'{"model":"m","model":"n","input":"hi"}', "model", "duplicate_key"),
        (b'{"model":"' + b"m" * 65 + b'","input":"hi"}', "model", "invalid_value"),
    ],
)
def test_invalid_request_is_a_400_in_openais_shape(raw: bytes, param: str, code: str) -> None:
    with pytest.raises(InvalidRequest) as caught:
        RESPONSES.parse_request(raw, max_model_name_length=64)
    assert caught.value.status == 400
    assert (caught.value.param, caught.value.code) == (param, code)
    body = json.loads(RESPONSES.error_body(caught.value))
    assert set(body["error"]) == {"message", "type", "param", "code"}


def test_request_that_is_not_json_is_invalid_json() -> None:
    with pytest.raises(InvalidJSON):
        RESPONSES.parse_request(b"{nope", max_model_name_length=None)


def test_the_sdks_stream_helper_accepts_coalesced_deltas_with_sequence_gaps() -> None:
    """The accumulating ``responses.stream()`` helper checks order and identity, not contiguous numbers."""
    response = {"id": "resp_1", "object": "response", "created_at": 1, "status": "in_progress", "model": "m",
                "output": [], "parallel_tool_calls": True, "tool_choice": "auto", "tools": []}
    message = {"id": "msg_1", "type": "message", "role": "assistant", "status": "in_progress", "content": []}
    part = {"type": "output_text", "text": "", "annotations": []}
    stream = (
        event("response.created", 0, response=response)
        + event("response.output_item.added", 1, output_index=0, item=message)
        + event("response.content_part.added", 2, item_id="msg_1", output_index=0, content_index=0, part=part)
        + delta("Hel", 3) + delta("lo", 4) + delta("!", 5)
    )
    framer = RESPONSES.new_framer()
    merged, merged_away = coalesce(framer.feed(stream))
    assert merged_away == 2
    body = merged + framer.error_event(StreamInterrupted("cut"))

    def handler(request: httpx2.Request) -> httpx2.Response:
        return httpx2.Response(200, headers={"content-type": "text/event-stream"}, content=body)

    transport = httpx2.MockTransport(handler)
    client = openai.OpenAI(api_key="k", base_url="http://test/v1", http_client=httpx2.Client(transport=transport))
    with client.responses.stream(model="m", input="hi") as events:
        seen = [(item.type, item.sequence_number, getattr(item, "snapshot", None)) for item in events]
    assert seen[-2:] == [("response.output_text.delta", 3, "Hello!"), ("error", 6, None)]
