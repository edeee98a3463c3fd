"""EventFramer: SSE framing for the relay, tested with bytes only."""

from __future__ import annotations

import json
from unittest import mock

from hypothesis import example, given, settings
from hypothesis import strategies as st

from sluice.wire import sse
from sluice.wire.sse import EventFramer, comment_event


def chunk(content: str, index: int = 0) -> bytes:
    body = {"id": "x", "object": "chat.completion.chunk", "choices": [{"index": index, "delta": {"content": content}}]}
    return b"data: " + json.dumps(body, separators=(",", ":")).encode() + b"\n\n"


def test_complete_events_pass_through_untouched() -> None:
    framer = EventFramer()
    data = chunk("a") + chunk("b")
    assert framer.feed(data) == data
    assert framer.events == 2
    assert framer.content_deltas == 2
    assert not framer.finished


def test_partial_event_is_held_until_complete() -> None:
    framer = EventFramer()
    data = chunk("hello")
    assert framer.feed(data[:10]) == b""
    assert framer.has_partial_event
    assert framer.feed(data[10:]) == data


def test_done_is_held_back_and_ends_the_stream() -> None:
    framer = EventFramer()
    out = framer.feed(chunk("a") + b"data: [DONE]\n\n" + chunk("after"))
    assert out == chunk("a")
    assert framer.done and framer.finished
    assert framer.feed(chunk("more")) == b""


def test_upstream_error_event_is_captured_not_forwarded() -> None:
    framer = EventFramer()
    error = b'data: {"error":{"message":"boom","type":"server_error","param":null,"code":"x"}}\n\n'
    out = framer.feed(chunk("a") + error)
    assert out == chunk("a")
    assert framer.error == {"message": "boom", "type": "server_error", "param": None, "code": "x"}


def test_content_mentioning_error_is_not_an_error_event() -> None:
    framer = EventFramer()
    data = chunk('the "error" word')
    assert framer.feed(data) == data
    assert framer.error is None


def test_malformed_event_ends_the_stream_and_is_not_forwarded() -> None:
    framer = EventFramer()
    out = framer.feed(chunk("a") + b"data: {not json\n\n" + chunk("b"))
    assert out == chunk("a")
    assert framer.malformed is not None


def test_crlf_line_endings_split_across_reads() -> None:
    framer = EventFramer()
    data = chunk("a").replace(b"\n", b"\r\n")
    cut = data.index(b"\r\n") + 1  # split between \r and \n
    out = framer.feed(data[:cut]) + framer.feed(data[cut:])
    assert out == chunk("a")


def test_usage_chunk_is_recorded() -> None:
    framer = EventFramer()
    usage = b'data: {"id":"x","choices":[],"usage":{"prompt_tokens":1,"completion_tokens":7,"total_tokens":8}}\n\n'
    framer.feed(usage)
    assert framer.usage == {"prompt_tokens": 1, "completion_tokens": 7, "total_tokens": 8}


def test_comments_and_multiline_events() -> None:
    framer = EventFramer()
    data = b": keep-alive\n\nevent: message\ndata: {\"choices\":[]}\n\n"
    assert framer.feed(data) == data
    assert framer.events == 1


def test_runaway_event_is_bounded() -> None:
    framer = EventFramer(max_event_size=1024)
    framer.feed(b"data: {" + b"x" * 2000)
    assert framer.malformed is not None


def test_comment_event_is_one_line() -> None:
    assert comment_event("a\nb") == b": a b\n\n"


@given(st.lists(st.text(max_size=20), max_size=30), st.data())
def test_any_split_of_a_stream_yields_the_same_events(contents: list[str], data: st.DataObject) -> None:
    stream = b"".join(chunk(c) for c in contents) + b"data: [DONE]\n\n"
    cuts = sorted(data.draw(st.lists(st.integers(0, len(stream)), max_size=10)))
    framer = EventFramer()
    out = b""
    previous = 0
    for cut in [*cuts, len(stream)]:
        out += framer.feed(stream[previous:cut])
        previous = cut
    assert out == b"".join(chunk(c) for c in contents)
    assert framer.done
    assert framer.events == len(contents)


def _framer_state(framer: EventFramer) -> tuple[object, ...]:
    return (
        framer.done, framer.error, framer.malformed, framer.usage, framer.events, framer.content_deltas,
        framer.has_partial_event,
    )


event_kinds = st.one_of(
    st.text(max_size=12).map(chunk),
    st.just(b"data: [DONE]\n\n"),
    st.just(b": ping\n\n"),
    st.just(b'data: {"error":{"message":"boom"}}\n\n'),
    st.just(b'data: {"choices":[],"usage":{"completion_tokens":3}}\n\n'),
    st.just(b'data: {"choices":[],"usage":null}\n\n'),
    st.just(b"data: not json\n\n"),
    st.just(b'data: {"a":\ndata: 1}\n\n'),
    st.just(b"data: {\n: comment}\n\n"),
    st.just(b"data: {unclosed\n\n"),
    st.just(b"id: }\n\n"),
    st.just(b"data: x}\n\n"),
    st.just(b'data: {"content":"data: {"}\n\n'),
    st.just(b"\n\n"),
    st.just(b'data: {"choices":[{"delta":{"content":"e"}}],"error":null}\n\n'),
)


@settings(max_examples=400)
@given(
    events=st.lists(event_kinds, min_size=1, max_size=30),
    tail=st.sampled_from([b"", b'data: {"partial', b"data: [DO"]),
)
@example(events=[chunk("a"), b"data: x}\n\n"], tail=b"")
@example(events=[chunk("a"), b"data: {\n: comment}\n\n"], tail=b"")
@example(events=[chunk("a"), b"data: {unclosed\n\n"], tail=b"")
@example(events=[chunk("a"), b"data: [DONE]\n\n"], tail=b'data: {"partial')
@example(events=[chunk("a"), chunk("b"), b'data: {"choices":[],"usage":{"completion_tokens":3}}\n\n', b"data: [DONE]\n\n"], tail=b"")
@example(events=[chunk("a"), chunk("b"), b'data: {"error":{"message":"boom"}}\n\n', chunk("c")], tail=b"")
@example(events=[chunk("a"), b'data: {"choices":[{"delta":{"content":"e"}}],"error":null}\n\n', chunk("c")], tail=b"")
@example(events=[chunk("a"), b"data: x}\n\n", b'data: {"choices":[],"usage":{"completion_tokens":3}}\n\n'], tail=b"")
@example(events=[b": ping\n\n", chunk("a"), b'data: {"choices":[],"usage":{"completion_tokens":3}}\n\n'], tail=b"")
def test_the_whole_read_fast_path_decides_as_the_event_by_event_scan(events: list[bytes], tail: bytes) -> None:
    read = b"".join(events) + tail
    fast = EventFramer()
    fast_out = fast.feed(read)
    with mock.patch.object(sse, "_plain_data_events", lambda events: 0):
        each = EventFramer()
        each_out = each.feed(read)
    assert fast_out == each_out
    assert _framer_state(fast) == _framer_state(each)
