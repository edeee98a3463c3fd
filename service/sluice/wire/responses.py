"""OpenAI Responses (``POST /v1/responses``): the grammar of its request and stream (sans-IO).

The stream, in brief::

    event: response.created      data: {"type":..., "sequence_number":0, "response":{...}}
    event: response.in_progress  data: {... "sequence_number":1 ...}
    event: response.output_item.added / response.content_part.added / ...
    event: response.output_text.delta  data: {"item_id","output_index","content_index","delta",...}
    ...
    event: response.completed | response.incomplete   (terminal; "response":{"usage":{...}})
    event: response.failed | error                    (the upstream's error; no [DONE] in this API)

Every data object has ``type`` and an increasing ``sequence_number``.

Decisions (:class:`ResponsesFramer`):

* Preamble: ``response.created``, ``response.in_progress`` and
  ``response.queued``. Content: the first event of any other type (usually
  ``response.output_item.added``) -- from then on a retry would show the
  client a second response, so the preamble is released with it.
* Terminal: ``response.completed`` / ``response.incomplete``, as received
  (after the held preamble if no content was forwarded).
* Upstream error: ``event: error`` and ``response.failed``, as received.
* Usage: the terminal (or failed) event's ``response.usage``
  (``input_tokens``, ``output_tokens``); JSON is parsed only for those events.
* The last ``sequence_number`` is found with one ``bytes.rfind`` per read
  (its digits read only when needed), so :meth:`ResponsesFramer.error_event`
  continues the numbering (``last + 1``). The openai SDK's plain ``responses.create(stream=True)``
  ends silently on a stream without a terminal event, so a stream the
  gateway cuts short must end with this ``error`` event.

:func:`coalesce` merges consecutive ``response.output_text.delta`` events of
the same ``item_id``/``output_index``/``content_index``; the merged event
keeps the first one's ``sequence_number``, leaving gaps. The openai SDK (3.x)
reads ``sequence_number`` only to skip events at or before a resumed
stream's ``starting_after`` (``lib/streaming/responses/_responses.py``): it
needs the numbers increasing, not contiguous, so gaps are safe.
"""

from __future__ import annotations

import json
import re
from typing import Any, Final

from pydantic import BaseModel, ConfigDict, Field

from ..errors import SluiceError
from .named_events import NamedEventFramer, coalesce_runs, int_or_none
from .openai import BackpressureName, load_validated
from .request import ForwardedRequest

__all__ = [
    "PREAMBLE_TYPES",
    "RESPONSES",
    "ResponsesFramer",
    "ResponsesGrammar",
    "ResponsesRequest",
    "coalesce",
    "parse_responses_request",
]

PREAMBLE_TYPES: Final = frozenset({b"response.created", b"response.in_progress", b"response.queued"})
_SEQUENCE_KEY = b'"sequence_number":'
_NUMBER = re.compile(rb"[ \t]*([0-9]+)")


class ResponsesRequest(BaseModel):
    """The fields the gateway depends on; anything else (``tools``, ``reasoning``, ...) passes through."""

    model_config = ConfigDict(extra="allow", strict=True)

    model: str = Field(min_length=1)
    input: str | list[Any] | None = None
    stream: bool | None = None
    backpressure_strategy: BackpressureName | None = None


class ResponsesFramer(NamedEventFramer):
    """One upstream Responses stream, seen by the relay."""

    terminal_types = frozenset({b"response.completed", b"response.incomplete"})
    error_types = frozenset({b"error", b"response.failed"})
    delta_type = b"response.output_text.delta"

    __slots__ = ("_sequence_number", "_numbered", "_numbered_at")

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._sequence_number: int | None = None
        # The last consumed read that carries a number, and where: parsed only when asked.
        self._numbered = b""
        self._numbered_at = -1

    @property
    def last_sequence_number(self) -> int | None:
        """The ``sequence_number`` of the last whole event read from the upstream (that had one)."""
        if self._numbered_at >= 0:
            number = _leading_int(self._numbered, self._numbered_at)
            if number is not None:
                self._sequence_number = number
            self._numbered, self._numbered_at = b"", -1
        return self._sequence_number

    def _is_content(self, name: bytes) -> bool:
        return name not in PREAMBLE_TYPES

    def _inspect(self, name: bytes, obj: dict[str, Any]) -> None:
        response = obj.get("response")
        usage = response.get("usage") if isinstance(response, dict) else None
        if isinstance(usage, dict):
            self._input_tokens = int_or_none(usage.get("input_tokens"))
            self._output_tokens = int_or_none(usage.get("output_tokens"))

    def _seen(self, consumed: bytes) -> None:
        # The last event of a read carries its highest number: one rfind from the end per
        # read; the digits are read only when error_event needs them.
        at = consumed.rfind(_SEQUENCE_KEY)
        if at >= 0:
            self._numbered, self._numbered_at = consumed, at + len(_SEQUENCE_KEY)

    def _gateway_error_event(self, error: SluiceError) -> bytes:
        last = self.last_sequence_number
        event = {
            "type": "error",
            "code": error.code,
            "message": error.message,
            "param": error.param,
            "sequence_number": 0 if last is None else last + 1,
        }
        return b"event: error\ndata: " + json.dumps(event, separators=(",", ":")).encode() + b"\n\n"


def _leading_int(data: bytes, start: int) -> int | None:
    """The non-negative integer at ``data[start:]`` after optional spaces (one regex match in C)."""
    match = _NUMBER.match(data, start)
    return int(match[1]) if match is not None else None


def parse_responses_request(raw: bytes, *, max_model_name_length: int | None = None) -> ForwardedRequest:
    """Validate a Responses body; raise :class:`~sluice.errors.InvalidRequest` (OpenAI's shape)."""
    body, validated = load_validated(raw, ResponsesRequest, max_model_name_length)
    return ForwardedRequest(
        raw=raw,
        body=body,
        validated=validated,
        model_name=validated.model,
        stream=bool(validated.stream),
        backpressure_strategy=validated.backpressure_strategy,
        new_framer=ResponsesFramer,
    )


# --- coalescing -----------------------------------------------------------------

_DELTA_HEAD = b"event: response.output_text.delta\ndata: "
_MERGEABLE_FIELDS = frozenset(
    {"type", "item_id", "output_index", "content_index", "delta", "sequence_number", "logprobs", "obfuscation"}
)


def coalesce(payload: bytes) -> tuple[bytes, int]:
    """Merge consecutive text deltas of one content part; return (events, events merged away).

    Lossless: the merged ``delta`` is the concatenation, ``logprobs`` lists
    are concatenated, the first event's ``sequence_number`` and
    ``obfuscation`` (random padding, not content) are kept. Any other event,
    or a delta with fields this does not know, is a barrier kept byte for
    byte. Cost: one ``json.loads`` per delta, paid only while a ``coalesce``
    stream's channel is full.
    """
    return coalesce_runs(payload, _DELTA_HEAD, _mergeable_delta, _part_of, _merge_delta)


def _part_of(delta: dict[str, Any]) -> tuple[Any, ...]:
    return (delta.get("item_id"), delta.get("output_index"), delta.get("content_index"))


def _merge_delta(run: dict[str, Any], delta: dict[str, Any]) -> None:
    run["delta"] += delta["delta"]
    if "logprobs" in delta or "logprobs" in run:
        run["logprobs"] = (run.get("logprobs") or []) + (delta.get("logprobs") or [])


def _mergeable_delta(event: bytes) -> dict[str, Any] | None:
    if not event.startswith(_DELTA_HEAD) or event.count(b"\n") != 1:
        return None
    try:
        obj = json.loads(event[len(_DELTA_HEAD) :])
    except ValueError:
        return None
    if (
        not isinstance(obj, dict)
        or obj.get("type") != "response.output_text.delta"
        or not isinstance(obj.get("delta"), str)
        or not isinstance(obj.get("logprobs", []), list)
        or not set(obj) <= _MERGEABLE_FIELDS
    ):
        return None
    return obj


class ResponsesGrammar:
    """OpenAI Responses (satisfies :class:`sluice.wire.grammar.Grammar`)."""

    name = "responses"
    upstream_path = "/responses"
    ping_event = b": ping\n\n"
    #: items and content parts are opened and closed by events of their own: a dropped one breaks the SDK's state
    droppable = False
    terminal_name = "response.completed"

    def parse_request(self, raw: bytes, *, max_model_name_length: int | None) -> ForwardedRequest:
        return parse_responses_request(raw, max_model_name_length=max_model_name_length)

    def new_framer(self) -> ResponsesFramer:
        return ResponsesFramer()

    def coalesce(self, payload: bytes) -> tuple[bytes, int] | None:
        return coalesce(payload)

    def error_body(self, error: SluiceError) -> bytes:
        return error.to_json_bytes()


RESPONSES: Final = ResponsesGrammar()
