"""The chat and legacy completions grammars: the protocol over EventFramer, usage on the client's behalf."""

from __future__ import annotations

import json

import httpx2
import openai
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from sluice.errors import InvalidRequest, StreamInterrupted
from sluice.wire.chat import (
    CHAT,
    COMPLETIONS,
    ChatFramer,
    CompletionsFramer,
    coalesce_completions,
    parse_chat,
    parse_completions,
)
from sluice.wire.grammar import Usage
from sluice.wire.sse import DONE_EVENT


def chunk(content: str, index: int = 0) -> bytes:
    body = {"id": "x", "object": "chat.completion.chunk", "choices": [{"index": index, "delta": {"content": content}}]}
    return b"data: " + json.dumps(body, separators=(",", ":")).encode() + b"\n\n"


def text_chunk(text: str, index: int = 0) -> bytes:
    body = {"id": "x", "object": "text_completion", "choices": [{"index": index, "text": text, "finish_reason": None, "logprobs": None}]}
    return b"data: " + json.dumps(body, separators=(",", ":")).encode() + b"\n\n"


USAGE_CHUNK = b'data: {"id":"x","choices":[],"usage":{"prompt_tokens":11,"completion_tokens":7,"total_tokens":18}}\n\n'
ERROR = b'data: {"error":{"message":"boom","type":"server_error","param":null,"code":"x"}}\n\n'
CHAT_BODY = b'{"model":"m","messages":[{"role":"user","content":"hi"}],"stream":true}'


def feed_all(framer: ChatFramer, stream: bytes, cuts: list[int] = []) -> bytes:  # noqa: B006
    out = b""
    previous = 0
    for cut in [*sorted(cuts), len(stream)]:
        out += framer.feed(stream[previous:cut])
        previous = cut
    return out


def test_chunks_are_content_from_the_first_and_done_is_the_terminal() -> None:
    framer = CHAT.new_framer()
    assert framer.feed(chunk("a") + chunk("b") + DONE_EVENT) == chunk("a") + chunk("b")
    assert framer.content_started and framer.done and framer.finished
    assert framer.terminal == DONE_EVENT
    assert (framer.events, framer.content_deltas) == (2, 2)


def test_error_before_content_is_held_and_nothing_is_forwarded() -> None:
    framer = CHAT.new_framer()
    assert framer.feed(ERROR + chunk("late")) == b""
    assert not framer.content_started and framer.finished
    assert framer.upstream_error == ERROR


def test_error_after_content_ends_the_stream_unforwarded() -> None:
    framer = CHAT.new_framer()
    assert framer.feed(chunk("a") + ERROR) == chunk("a")
    assert framer.upstream_error == ERROR


def test_usage_is_read_from_the_usage_chunk_and_forwarded_when_the_client_asked() -> None:
    framer = CHAT.new_framer()
    assert framer.feed(chunk("a") + USAGE_CHUNK + DONE_EVENT) == chunk("a") + USAGE_CHUNK
    assert framer.usage == Usage(input_tokens=11, output_tokens=7)
    assert framer.raw_usage == {"prompt_tokens": 11, "completion_tokens": 7, "total_tokens": 18}


def test_error_event_is_the_openai_error_object() -> None:
    framer = CHAT.new_framer()
    emitted = framer.error_event(StreamInterrupted("cut"))
    assert emitted == StreamInterrupted("cut").to_sse_event()
    assert CHAT.error_body(StreamInterrupted("cut")) == StreamInterrupted("cut").to_json_bytes()


def test_malformed_event_is_not_forwarded() -> None:
    framer = CHAT.new_framer()
    assert framer.feed(chunk("a") + b"data: not json\n\n") == chunk("a")
    assert framer.malformed is not None


# --- usage on the client's behalf ------------------------------------------------


def test_a_streaming_request_without_include_usage_asks_for_it_keeping_the_clients_bytes() -> None:
    parsed = CHAT.parse_request(CHAT_BODY, max_model_name_length=None)
    forwarded = parsed.body_for_model(None)
    assert forwarded == b'{"stream_options":{"include_usage":true},' + CHAT_BODY[1:]
    assert json.loads(forwarded)["stream_options"] == {"include_usage": True}
    renamed = json.loads(parsed.body_for_model("other"))
    assert renamed["model"] == "other" and renamed["stream_options"] == {"include_usage": True}


def test_include_usage_false_is_overridden_and_other_stream_options_kept() -> None:
    raw = b'{"model":"m","messages":[{"role":"user","content":"hi"}],"stream":true,"stream_options":{"include_usage":false,"x":1}}'
    forwarded = json.loads(parse_chat(raw).body_for_model(None))
    assert forwarded["stream_options"] == {"include_usage": True, "x": 1}


def test_a_request_that_asked_for_usage_or_does_not_stream_is_forwarded_as_written() -> None:
    asked = b'{"model":"m","messages":[{"role":"user","content":"hi"}],"stream":true,"stream_options":{"include_usage":true}}'
    plain = b'{"model":"m","messages":[{"role":"user","content":"hi"}]}'
    for raw in (asked, plain):
        parsed = parse_chat(raw)
        assert parsed.body_for_model(None) == raw
        framer = parsed.new_framer()
        assert framer.feed(chunk("a") + USAGE_CHUNK + DONE_EVENT) == chunk("a") + USAGE_CHUNK


def test_the_added_usage_chunk_is_stripped_but_its_usage_recorded() -> None:
    framer = parse_chat(CHAT_BODY).new_framer()
    out = framer.feed(chunk("a") + chunk("b") + USAGE_CHUNK + DONE_EVENT)
    assert out == chunk("a") + chunk("b")
    assert framer.usage == Usage(11, 7)
    assert framer.events == 2 and framer.done


def test_a_stream_of_only_the_added_usage_chunk_has_no_content() -> None:
    framer = parse_chat(CHAT_BODY).new_framer()
    assert framer.feed(USAGE_CHUNK) == b""
    assert not framer.content_started and framer.events == 0


def test_the_openai_sdk_reads_the_stripped_stream_as_a_stream_without_usage() -> None:
    framer = parse_chat(CHAT_BODY).new_framer()
    body = framer.feed(chunk("Hel") + chunk("lo") + USAGE_CHUNK + DONE_EVENT) + framer.terminal

    def handler(request: httpx2.Request) -> httpx2.Response:
        return httpx2.Response(200, headers={"content-type": "text/event-stream"}, content=body)

    transport = httpx2.MockTransport(handler)
    client = openai.OpenAI(api_key="k", base_url="http://t/v1", http_client=httpx2.Client(transport=transport))
    items = list(client.chat.completions.create(model="m", messages=[{"role": "user", "content": "hi"}], stream=True))
    assert "".join(item.choices[0].delta.content or "" for item in items) == "Hello"
    assert all(item.usage is None for item in items)


USAGE_NULL_CHUNK = b'data: {"id":"x","choices":[{"index":0,"delta":{"content":"u"}}],"usage":null}\n\n'


@settings(max_examples=200)
@given(st.lists(st.sampled_from(["content", "usage", "usage_null"]), max_size=30))
def test_only_usage_only_chunks_are_stripped_wherever_they_sit_in_a_read(kinds: list[str]) -> None:
    events = {"content": chunk("a"), "usage": USAGE_CHUNK, "usage_null": USAGE_NULL_CHUNK}
    stream = b"".join(events[kind] for kind in kinds)
    framer = ChatFramer(strip_usage=True)
    out = framer.feed(stream + DONE_EVENT)
    assert out == b"".join(events[kind] for kind in kinds if kind != "usage")
    assert framer.events == sum(kind != "usage" for kind in kinds)
    assert framer.done


@settings(max_examples=200)
@given(st.lists(st.text(max_size=10), max_size=20), st.booleans(), st.data())
def test_every_split_of_a_stream_decides_as_feeding_it_whole(texts: list[str], strip: bool, data: st.DataObject) -> None:
    tail = data.draw(st.sampled_from([USAGE_CHUNK + DONE_EVENT, ERROR, b"data: nope\n\n", DONE_EVENT, b""]))
    stream = b"".join(chunk(t) for t in texts) + tail
    whole = ChatFramer(strip_usage=strip)
    cuts = data.draw(st.lists(st.integers(0, len(stream)), max_size=10))
    split = ChatFramer(strip_usage=strip)

    def state(framer: ChatFramer, out: bytes) -> tuple[object, ...]:
        return (out, framer.finished, framer.done, framer.upstream_error, framer.malformed, framer.content_started,
                framer.events, framer.content_deltas, framer.usage)

    assert state(split, feed_all(split, stream, cuts)) == state(whole, whole.feed(stream))


# --- legacy completions -----------------------------------------------------------


def test_completions_count_text_deltas_as_content() -> None:
    framer = COMPLETIONS.new_framer()
    assert isinstance(framer, CompletionsFramer)
    out = framer.feed(text_chunk("Hel") + text_chunk("") + text_chunk("lo") + DONE_EVENT)
    assert out == text_chunk("Hel") + text_chunk("") + text_chunk("lo")
    assert framer.content_deltas == 2 and framer.events == 3 and framer.done


@given(st.lists(st.text(max_size=8), max_size=20), st.data())
def test_every_split_of_a_completions_stream_counts_the_same(texts: list[str], data: st.DataObject) -> None:
    stream = b"".join(text_chunk(t) for t in texts) + DONE_EVENT
    framer = CompletionsFramer()
    out = feed_all(framer, stream, data.draw(st.lists(st.integers(0, len(stream)), max_size=10)))
    assert out == stream[: -len(DONE_EVENT)]
    assert framer.content_deltas == sum(1 for t in texts if t)


def test_completions_request_is_validated_and_forwarded_as_written() -> None:
    raw = b'{"model":"m","prompt":"Say hi","stream":true,"max_tokens":5,"echo":false}'
    parsed = COMPLETIONS.parse_request(raw, max_model_name_length=8)
    assert parsed.model_name == "m" and parsed.stream
    assert parsed.body_for_model(None) == raw
    assert isinstance(parsed.new_framer(), CompletionsFramer)


@pytest.mark.parametrize(
    ("raw", "param", "code"),
    [
        (b'{"model":"m"}', "prompt", "missing_required_parameter"),
        (b'{"model":"m","prompt":{"a":1}}', "prompt", "invalid_value"),
        (b'{"model":"m","prompt":"p","prompt":"q"}', "prompt", "duplicate_key"),
        (b'{"model":"mmmmmmmmm","prompt":"p"}', "model", "invalid_value"),
        (b'{"model":"m","prompt":"p","stream_options":{"include_usage":true}}', "stream_options", "invalid_value"),
    ],
)
def test_invalid_completions_request_is_a_400(raw: bytes, param: str, code: str) -> None:
    with pytest.raises(InvalidRequest) as caught:
        parse_completions(raw, max_model_name_length=8)
    assert (caught.value.param, caught.value.code) == (param, code)


def test_coalesce_completions_merges_text_per_choice_losslessly() -> None:
    payload = text_chunk("Hel") + text_chunk("lo") + text_chunk("x", index=1) + text_chunk("y", index=1)
    merged, merged_away = COMPLETIONS.coalesce(payload)  # type: ignore[misc]
    assert merged_away == 2
    texts = [json.loads(e[6:])["choices"][0] for e in merged.split(b"\n\n")[:-1]]
    assert [(c["index"], c["text"]) for c in texts] == [(0, "Hello"), (1, "xy")]


@given(st.lists(st.tuples(st.text(max_size=5), st.integers(0, 1), st.booleans()), max_size=20))
def test_coalesce_completions_is_lossless(parts: list[tuple[str, int, bool]]) -> None:
    finish = b'data: {"id":"x","choices":[{"index":0,"text":"","finish_reason":"stop","logprobs":null}]}\n\n'
    payload = b"".join((finish if barrier else b"") + text_chunk(t, i) for t, i, barrier in parts)
    merged, merged_away = coalesce_completions(payload)

    def per_choice(data: bytes) -> dict[int, str]:
        found: dict[int, str] = {}
        for event in data.split(b"\n\n")[:-1]:
            choice = json.loads(event[6:])["choices"][0]
            found[choice["index"]] = found.get(choice["index"], "") + choice["text"]
        return found

    assert per_choice(merged) == per_choice(payload)
    assert merged.count(b"\n\n") == payload.count(b"\n\n") - merged_away


def test_chat_coalesce_is_openais_coalesce_events() -> None:
    merged, merged_away = CHAT.coalesce(chunk("a") + chunk("b"))  # type: ignore[misc]
    assert merged_away == 1
    assert json.loads(merged[6:])["choices"][0]["delta"]["content"] == "ab"
