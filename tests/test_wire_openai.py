"""Chat request validation (wire/chat.parse_chat over wire/openai's checks) and delta coalescing, without sockets."""

from __future__ import annotations

import json

import pytest

from sluice.errors import InvalidJSON, InvalidRequest
from sluice.wire.chat import parse_chat
from sluice.wire.openai import coalesce_events


def body(**fields: object) -> bytes:
    base: dict[str, object] = {"model": "m", "messages": [{"role": "user", "content": "hi"}]}
    base.update(fields)
    return json.dumps({k: v for k, v in base.items() if v is not ...}).encode()


def test_valid_request_is_forwarded_byte_for_byte() -> None:
    raw = b'{"model":"m","messages":[{"role":"user","content":"hi"}],"tools":[{"type":"function"}],"temperature":1.0}'
    parsed = parse_chat(raw)
    assert parsed.body_for_model(None) is raw
    assert not parsed.stream


def test_backpressure_field_is_stripped_before_forwarding() -> None:
    parsed = parse_chat(body(stream=True, backpressure_strategy="coalesce", response_format={"type": "text"}))
    forwarded = json.loads(parsed.body_for_model(None))
    assert "backpressure_strategy" not in forwarded
    assert forwarded["response_format"] == {"type": "text"}
    assert parsed.backpressure_strategy == "coalesce"


@pytest.mark.parametrize(
    ("fields", "param"),
    [
        ({"model": ...}, "model"),
        ({"model": ""}, "model"),
        ({"messages": []}, "messages"),
        ({"messages": [{"role": "wizard", "content": "x"}]}, "messages[0].role"),
        ({"messages": [{"content": "x"}]}, "messages[0].role"),
        ({"temperature": 2.5}, "temperature"),
        ({"temperature": -0.1}, "temperature"),
        ({"temperature": "hot"}, "temperature"),
        ({"max_tokens": 0}, "max_tokens"),
        ({"max_completion_tokens": 0}, "max_completion_tokens"),
        ({"n": 0}, "n"),
        ({"stream": "yes"}, "stream"),
        ({"stream": True, "stream_options": {"include_usage": "yes"}}, "stream_options.include_usage"),
        ({"stream_options": {"include_usage": True}}, "stream_options"),
        ({"backpressure_strategy": "hope"}, "backpressure_strategy"),
    ],
)
def test_invalid_fields_name_their_param(fields: dict[str, object], param: str) -> None:
    with pytest.raises(InvalidRequest) as caught:
        parse_chat(body(**fields))
    assert caught.value.param == param
    assert caught.value.status == 400
    shape = caught.value.to_dict()["error"]
    assert set(shape) == {"message", "type", "param", "code"}


@pytest.mark.parametrize("raw", [b"", b"{", b"not json", b"\xff\xfe", b"[" * 100_000 + b"]" * 100_000])
def test_unparseable_bodies_are_400(raw: bytes) -> None:
    with pytest.raises(InvalidRequest):
        parse_chat(raw)


def test_non_object_body_is_400() -> None:
    with pytest.raises(InvalidRequest):
        parse_chat(b"[1, 2]")


def test_invalid_json_has_its_own_code() -> None:
    with pytest.raises(InvalidJSON) as caught:
        parse_chat(b"{oops")
    assert caught.value.code == "invalid_json"


def event(content: str | None = None, *, index: int = 0, finish: str | None = None, role: str | None = None) -> bytes:
    delta: dict[str, str] = {}
    if role is not None:
        delta["role"] = role
    if content is not None:
        delta["content"] = content
    chunk = {"id": "c", "object": "chat.completion.chunk", "choices": [{"index": index, "delta": delta, "finish_reason": finish}]}
    return b"data: " + json.dumps(chunk).encode() + b"\n\n"


def texts(payload: bytes) -> dict[int, str]:
    out: dict[int, str] = {}
    for raw in payload.split(b"\n\n")[:-1]:
        chunk = json.loads(raw[6:])
        for choice in chunk["choices"]:
            out[choice["index"]] = out.get(choice["index"], "") + (choice["delta"].get("content") or "")
    return out


def test_coalescing_merges_content_and_keeps_every_character() -> None:
    payload = event("", role="assistant") + event("Hel") + event("lo") + event(" wo") + event("rld")
    merged, merged_away = coalesce_events(payload)
    assert merged_away == 4
    assert merged.count(b"\n\n") == 1
    assert texts(merged) == {0: "Hello world"}
    assert json.loads(merged[6:-2])["choices"][0]["delta"]["role"] == "assistant"


def test_coalescing_keeps_choices_apart_and_barriers_in_place() -> None:
    payload = event("a", index=0) + event("x", index=1) + event("b", index=0) + event(None, finish="stop") + event("c")
    merged, merged_away = coalesce_events(payload)
    assert merged_away == 1
    assert texts(merged) == {0: "abc", 1: "x"}
    events = merged.split(b"\n\n")[:-1]
    assert json.loads(events[2][6:])["choices"][0]["finish_reason"] == "stop"


def test_coalescing_passes_unknown_events_through() -> None:
    odd = b'data: {"choices":[{"index":0,"delta":{"tool_calls":[{"index":0}]}}]}\n\n'
    merged, merged_away = coalesce_events(event("a") + odd + event("b"))
    assert merged_away == 0
    assert odd in merged


@pytest.mark.parametrize(
    ("raw", "param"),
    [
        (b'{"model":"a","messages":[{"role":"user","content":"x"}],"model":"b"}', "model"),
        (b'{"model":"a","n":1,"messages":[{"role":"user","content":"x"}],"n":5}', "n"),
        (b'{"model":"a","messages":[{"role":"user","role":"system","content":"x"}]}', "messages[0].role"),
        (b'{"model":"a","stream":true,"stream_options":{"include_usage":true,"include_usage":false},'
         b'"messages":[{"role":"user","content":"x"}]}', "stream_options.include_usage"),
        # the same key spelled with an escape is still the same key
        (b'{"model":"a","messages":[{"role":"user","content":"x"}],"max_tokens":1,"max_\\u0074okens":9}', "max_tokens"),
    ],
)
def test_duplicate_keys_are_refused_naming_where(raw: bytes, param: str) -> None:
    with pytest.raises(InvalidRequest) as caught:
        parse_chat(raw)
    assert caught.value.param == param
    assert caught.value.code == "duplicate_key"


def test_the_same_key_in_different_objects_is_fine() -> None:
    raw = b'{"model":"a","messages":[{"role":"user","content":"x"},{"role":"assistant","content":"y"}]}'
    assert parse_chat(raw).body_for_model(None) is raw


def test_a_model_name_over_the_limit_is_refused_without_echoing_it() -> None:
    with pytest.raises(InvalidRequest) as caught:
        parse_chat(body(model="m" * 257), max_model_name_length=256)
    assert caught.value.param == "model"
    assert "m" * 257 not in caught.value.message
    assert parse_chat(body(model="m" * 256), max_model_name_length=256).model_name == "m" * 256
