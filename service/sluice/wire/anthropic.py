"""Anthropic Messages (``POST /v1/messages``): the grammar of its request and stream (sans-IO).

The stream, in brief::

    event: message_start        data: {"type":"message_start","message":{..., "usage":{"input_tokens":N,...}}}
    event: content_block_start  data: {"type":"content_block_start","index":0,"content_block":{...}}
    event: content_block_delta  data: {"type":"content_block_delta","index":0,"delta":{"type":"text_delta","text":"Hi"}}
    event: content_block_stop   data: {"type":"content_block_stop","index":0}
    ... (one start/deltas/stop per block; ``input_json_delta`` carries ``partial_json``)
    event: message_delta        data: {"type":"message_delta","delta":{"stop_reason":...},"usage":{"output_tokens":N}}
    event: message_stop         data: {"type":"message_stop"}
    event: ping                 data: {"type": "ping"}        (keep-alive, anywhere)
    event: error                data: {"type":"error","error":{"type":"overloaded_error","message":...}}

Decisions (:class:`MessagesFramer`):

* Preamble: everything before the first ``content_block_*`` event
  (``message_start``; a ``message_delta`` of an empty message), held and
  released with it. Upstream ``ping`` events before content are dropped
  (the relay pings a waiting client itself); after content they pass.
* Terminal: ``message_stop``, as received. Upstream error: ``event: error``.
* Usage: ``input_tokens`` from ``message_start``'s ``message.usage``,
  ``output_tokens`` from ``message_delta``'s ``usage`` (cumulative: the last
  wins). JSON is parsed only for those two, the terminal and the error.
* The SDK ignores data without an ``event:`` line; the framer still reads
  such an event's ``type`` from its JSON (rare path) to classify it.

Errors use Anthropic's shape, ``{"type":"error","error":{"type","message"}}``,
both before the head (:meth:`MessagesGrammar.error_body`) and as the final
event (:meth:`MessagesFramer.error_event`); :func:`anthropic_error_type`
maps the gateway's HTTP status to Anthropic's error types.
"""

from __future__ import annotations

import json
from typing import Any, Final

from pydantic import BaseModel, ConfigDict, Field

from ..errors import SluiceError, UpstreamStatusError
from .named_events import NamedEventFramer, coalesce_runs, int_or_none
from .openai import BackpressureName, load_validated
from .request import ForwardedRequest

__all__ = [
    "COUNT_TOKENS_PATH",
    "MESSAGES",
    "CountTokensRequest",
    "MessagesFramer",
    "MessagesGrammar",
    "MessagesRequest",
    "anthropic_error_type",
    "coalesce",
    "error_object",
    "parse_count_tokens_request",
    "parse_messages_request",
]

#: the upstream path of a ``count_tokens`` request (:func:`parse_count_tokens_request`)
COUNT_TOKENS_PATH: Final = "/messages/count_tokens"

#: Anthropic's error type per HTTP status (docs' "HTTP errors"; the SDK's ``ErrorType``)
_ERROR_TYPES: Final = {
    400: "invalid_request_error",
    401: "authentication_error",
    402: "billing_error",
    403: "permission_error",
    404: "not_found_error",
    413: "request_too_large",
    429: "rate_limit_error",
    500: "api_error",
    502: "api_error",
    503: "overloaded_error",
    504: "timeout_error",
    529: "overloaded_error",
}


def anthropic_error_type(error: SluiceError) -> str:
    """The Anthropic error type a client's SDK expects for the gateway's ``error``."""
    kind = _ERROR_TYPES.get(error.status)
    if kind is not None:
        return kind
    return "invalid_request_error" if 400 <= error.status < 500 else "api_error"


def error_object(error: SluiceError) -> dict[str, Any]:
    """``{"type":"error","error":{"type","message"}}``; an upstream's own Anthropic error body as it was."""
    if isinstance(error, UpstreamStatusError) and _is_anthropic_error(error.body):
        assert error.body is not None
        return error.body
    return {"type": "error", "error": {"type": anthropic_error_type(error), "message": error.message}}


def _is_anthropic_error(body: object) -> bool:
    return isinstance(body, dict) and body.get("type") == "error" and isinstance(body.get("error"), dict)


class MessagesRequest(BaseModel):
    """The fields the gateway depends on; anything else (``system``, ``tools``, ...) passes through."""

    model_config = ConfigDict(extra="allow", strict=True)

    model: str = Field(min_length=1)
    max_tokens: int = Field(ge=1)  # required: Anthropic answers 400 without it
    messages: list[dict[str, Any]] = Field(min_length=1)
    stream: bool | None = None
    backpressure_strategy: BackpressureName | None = None


class CountTokensRequest(BaseModel):
    """``POST /v1/messages/count_tokens``: a Messages body without ``max_tokens`` or streaming."""

    model_config = ConfigDict(extra="allow", strict=True)

    model: str = Field(min_length=1)
    messages: list[dict[str, Any]] = Field(min_length=1)


class MessagesFramer(NamedEventFramer):
    """One upstream Messages stream, seen by the relay."""

    terminal_types = frozenset({b"message_stop"})
    error_types = frozenset({b"error"})
    dropped_before_content = frozenset({b"ping"})
    inspected = frozenset({b"message_start", b"message_delta"})
    delta_type = b"content_block_delta"

    __slots__ = ()

    def _is_content(self, name: bytes) -> bool:
        return name.startswith(b"content_block_")

    def _inspect(self, name: bytes, obj: dict[str, Any]) -> None:
        if name == b"message_start":
            message = obj.get("message")
            usage = message.get("usage") if isinstance(message, dict) else None
        elif name == b"message_delta":
            usage = obj.get("usage")
        else:
            return
        if not isinstance(usage, dict):
            return
        for key in ("input_tokens", "output_tokens"):
            count = int_or_none(usage.get(key))
            if count is not None:
                if key == "input_tokens":
                    self._input_tokens = count
                else:
                    self._output_tokens = count

    def _gateway_error_event(self, error: SluiceError) -> bytes:
        return b"event: error\ndata: " + _dump(error_object(error)) + b"\n\n"


def _dump(obj: dict[str, Any]) -> bytes:
    return json.dumps(obj, separators=(",", ":"), ensure_ascii=False).encode()


def parse_messages_request(raw: bytes, *, max_model_name_length: int | None = None) -> ForwardedRequest:
    """Validate a Messages body; raise :class:`~sluice.errors.InvalidRequest` (shape it with ``error_body``)."""
    body, validated = load_validated(raw, MessagesRequest, max_model_name_length)
    return ForwardedRequest(
        raw=raw,
        body=body,
        validated=validated,
        model_name=validated.model,
        stream=bool(validated.stream),
        backpressure_strategy=validated.backpressure_strategy,
        new_framer=MessagesFramer,
    )


def parse_count_tokens_request(raw: bytes, *, max_model_name_length: int | None = None) -> ForwardedRequest:
    """Validate a ``count_tokens`` body (never streamed; upstream path ``/messages/count_tokens``)."""
    body, validated = load_validated(raw, CountTokensRequest, max_model_name_length)
    return ForwardedRequest(
        raw=raw,
        body=body,
        validated=validated,
        model_name=validated.model,
        stream=False,
        backpressure_strategy=None,
        new_framer=MessagesFramer,
    )


# --- coalescing -----------------------------------------------------------------

_DELTA_HEAD = b"event: content_block_delta\ndata: "
#: the one text field of each mergeable delta type
_DELTA_TEXT: Final = {"text_delta": "text", "input_json_delta": "partial_json", "thinking_delta": "thinking"}


def coalesce(payload: bytes) -> tuple[bytes, int]:
    """Merge consecutive ``content_block_delta`` events of one block and delta type losslessly.

    ``text_delta`` texts, ``input_json_delta`` partial JSON and
    ``thinking_delta`` thinking are concatenated; anything else (block
    start/stop, ``signature_delta``, ``citations_delta``, unknown fields) is
    a barrier kept byte for byte. A run of one event is kept byte for byte.
    """
    return coalesce_runs(payload, _DELTA_HEAD, _mergeable_delta, _delta_run, _merge_delta)


def _delta_run(delta: dict[str, Any]) -> tuple[Any, ...]:
    return (delta["index"], delta["delta"]["type"])


def _merge_delta(run: dict[str, Any], delta: dict[str, Any]) -> None:
    field = _DELTA_TEXT[delta["delta"]["type"]]
    run["delta"][field] += delta["delta"][field]


def _mergeable_delta(event: bytes) -> dict[str, Any] | None:
    if not event.startswith(_DELTA_HEAD) or event.count(b"\n") != 1:
        return None
    try:
        obj = json.loads(event[len(_DELTA_HEAD) :])
    except ValueError:
        return None
    if not isinstance(obj, dict) or obj.get("type") != "content_block_delta" or set(obj) != {"type", "index", "delta"}:
        return None
    delta = obj["delta"]
    if not isinstance(delta, dict) or not isinstance(obj["index"], int):
        return None
    kind = delta.get("type")
    field = _DELTA_TEXT.get(kind) if isinstance(kind, str) else None
    if field is None or set(delta) != {"type", field} or not isinstance(delta[field], str):
        return None
    return obj


class MessagesGrammar:
    """Anthropic Messages (satisfies :class:`sluice.wire.grammar.Grammar`)."""

    name = "messages"
    upstream_path = "/messages"
    ping_event = b'event: ping\ndata: {"type": "ping"}\n\n'
    #: items and content parts are opened and closed by events of their own: a dropped one breaks the SDK's state
    droppable = False
    terminal_name = "message_stop"

    def parse_request(self, raw: bytes, *, max_model_name_length: int | None) -> ForwardedRequest:
        return parse_messages_request(raw, max_model_name_length=max_model_name_length)

    def new_framer(self) -> MessagesFramer:
        return MessagesFramer()

    def coalesce(self, payload: bytes) -> tuple[bytes, int] | None:
        return coalesce(payload)

    def error_body(self, error: SluiceError) -> bytes:
        return _dump(error_object(error))


MESSAGES: Final = MessagesGrammar()
