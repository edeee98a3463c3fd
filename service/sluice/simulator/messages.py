"""``POST /v1/messages`` and ``/v1/messages/count_tokens``: Anthropic's Messages grammar.

A stream, as the API sends it (every event named; the SDK ignores data without an ``event:`` line)::

    message_start (input usage), ping                with the head
    content_block_start (one text block, index 0)    with the first token
    content_block_delta (text_delta)                 one per token
    content_block_stop, message_delta (stop_reason, cumulative output usage), message_stop

The in-stream error is ``event: error`` with
``{"type":"error","error":{"type":"overloaded_error","message":"Overloaded"}}``
inside the 200, and the body ends after it. Errors before the head use the
same ``{"type":"error","error":{...}}`` shape (:func:`~.grammar.error_json`).
"""

from __future__ import annotations

import json
from typing import Any

from .grammar import Answer, BadRequest, ErrorStyle, Exchange, compact, positive_int, sse_event, text_of, words

OVERLOADED_EVENT = sse_event("error", {"type": "error", "error": {"type": "overloaded_error", "message": "Overloaded"}})


def _parse(payload: Any, *, generates: bool) -> Exchange:
    model = payload.get("model") if isinstance(payload, dict) else None
    messages = payload.get("messages") if isinstance(payload, dict) else None
    if not isinstance(model, str) or not isinstance(messages, list) or not messages:
        raise BadRequest("'model' (string) and 'messages' (non-empty list) are required.", param="messages")
    system = payload.get("system")
    input_tokens = sum(words(text_of(m.get("content"))) for m in messages if isinstance(m, dict)) + words(text_of(system))
    last = messages[-1]
    return Exchange(
        model=model,
        stream=generates and bool(payload.get("stream")),
        prompt=text_of(last.get("content")) if isinstance(last, dict) else "",
        input_tokens=input_tokens,
        max_tokens=positive_int(payload, "max_tokens"),
        generates=generates,
        payload=payload,
    )


def _stop_reason(answer: Answer) -> str:
    return "end_turn" if answer.finish == "stop" else "max_tokens"


def _message(exchange: Exchange, answer: Answer, content: list[dict[str, Any]], stop_reason: str | None, output: int) -> dict[str, Any]:
    return {
        "id": f"msg_sim{answer.number:012d}",
        "type": "message",
        "role": "assistant",
        "model": exchange.model,
        "content": content,
        "stop_reason": stop_reason,
        "stop_sequence": None,
        "usage": {
            "input_tokens": exchange.input_tokens,
            "cache_creation_input_tokens": 0,
            "cache_read_input_tokens": 0,
            "output_tokens": output,
        },
    }


class MessagesApi:
    name = "messages"
    errors: ErrorStyle = "anthropic"

    def parse(self, payload: Any) -> Exchange:
        return _parse(payload, generates=True)

    def body(self, exchange: Exchange, answer: Answer) -> bytes:
        content = [{"type": "text", "text": answer.text()}]
        return json.dumps(_message(exchange, answer, content, _stop_reason(answer), answer.tokens)).encode()

    def stream(self, exchange: Exchange, answer: Answer) -> MessagesRenderer:
        return MessagesRenderer(exchange, answer)


class CountTokensApi:
    name = "count_tokens"
    errors: ErrorStyle = "anthropic"

    def parse(self, payload: Any) -> Exchange:
        return _parse(payload, generates=False)

    def body(self, exchange: Exchange, answer: Answer) -> bytes:
        return compact({"input_tokens": exchange.input_tokens})

    def stream(self, exchange: Exchange, answer: Answer) -> Any:
        raise AssertionError("token counts are never streamed")  # Exchange.stream is always False here


class MessagesRenderer:
    _DELTA_HEAD = b'event: content_block_delta\ndata: {"type":"content_block_delta","index":0,"delta":{"type":"text_delta","text":'

    def __init__(self, exchange: Exchange, answer: Answer) -> None:
        self._exchange, self._answer = exchange, answer

    def opening(self) -> bytes:
        # As the API does, message_start reports output_tokens 1 before any text.
        start = {"type": "message_start", "message": _message(self._exchange, self._answer, [], None, 1)}
        return sse_event("message_start", start) + sse_event("ping", {"type": "ping"})

    def first(self) -> bytes:
        block = {"type": "content_block_start", "index": 0, "content_block": {"type": "text", "text": ""}}
        return sse_event("content_block_start", block)

    def token(self, token: str) -> bytes:
        return self._DELTA_HEAD + json.dumps(token).encode() + b"}}\n\n"

    def closing(self, *, terminal: bool) -> bytes:
        delta = {
            "type": "message_delta",
            "delta": {"stop_reason": _stop_reason(self._answer), "stop_sequence": None},
            "usage": {"output_tokens": self._answer.tokens},
        }
        out = sse_event("content_block_stop", {"type": "content_block_stop", "index": 0}) + sse_event("message_delta", delta)
        return out + (sse_event("message_stop", {"type": "message_stop"}) if terminal else b"")

    def malformed(self) -> bytes:
        return b"event: content_block_delta\ndata: {not json\n\n"

    def error_event(self) -> bytes:
        return OVERLOADED_EVENT
