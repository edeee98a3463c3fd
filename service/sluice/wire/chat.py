"""OpenAI chat completions and legacy completions: their grammars (sans-IO).

Both stream data-only SSE: ``data: {chunk}\\n\\n`` events ending with
``data: [DONE]\\n\\n``; an error after the head is ``data: {"error": {...}}``.
Chat chunks carry text in ``choices[].delta.content``, legacy completions in
``choices[].text``. With ``stream_options.include_usage`` the last chunk
before ``[DONE]`` has ``"choices": []`` and a ``usage`` object.

Decisions (:class:`ChatFramer`, a thin wrapper over the optimised
:class:`~sluice.wire.sse.EventFramer`, which does all the scanning):

* No preamble: the first chunk is content (a chunk returned by ``feed``
  means a retry would duplicate it).
* Terminal: ``data: [DONE]``. Upstream error: the ``{"error": ...}`` event,
  re-serialised as ``data: {"error": <its error object>}``.
* Usage: the usage chunk's ``prompt_tokens`` / ``completion_tokens``.
* Asking for usage on the client's behalf: a streaming chat request that did
  not set ``stream_options.include_usage`` is forwarded with it set
  (:meth:`ChatRequest.body_for_model`), so the gateway always learns the
  token counts, and the framer for that request
  (:meth:`ChatRequest.new_framer`, the per-request framer the relay should
  use) strips the usage-only chunk (``"choices": []``) from what the client
  gets, while still recording its usage. The ``"usage": null`` field the
  upstream then adds to every chunk is left alone: rewriting every chunk
  would cost per-token work, and the openai SDK's chunk type has that
  field anyway. Legacy completions are forwarded as the client wrote them.

Coalescing: chat uses :func:`sluice.wire.openai.coalesce_events`, which
only merges ``delta`` chunks, so legacy completions have their own
:func:`coalesce_completions` (merging ``choices[].text`` per choice).
"""

from __future__ import annotations

import json
import re
from typing import Any, Final, Literal

from pydantic import BaseModel, ConfigDict, Field

from ..errors import SluiceError
from .grammar import Usage
from .openai import (
    BackpressureName,
    ChatCompletionRequest,
    StreamOptions,
    check_stream_options,
    coalesce_choices,
    coalesce_events,
    load_validated,
    single_choice_chunk,
)
from .request import ForwardedRequest, dump_json
from .sse import DEFAULT_MAX_EVENT_SIZE, DONE_EVENT, EventFramer, data_event

__all__ = [
    "CHAT",
    "COMPLETIONS",
    "ChatFramer",
    "ChatGrammar",
    "ChatRequest",
    "CompletionRequest",
    "CompletionsFramer",
    "coalesce_completions",
    "parse_chat",
    "parse_completions",
]

_INCLUDE_USAGE = b'"stream_options":{"include_usage":true},'
#: where a chunk carries a usage object (not ``"usage":null``)
_USAGE_OBJECT = re.compile(rb'"usage"\s*:\s*\{')


class ChatFramer:
    """One upstream chat stream (satisfies :class:`sluice.wire.grammar.StreamFramer`).

    The protocol's fields are read-only properties over the wrapped
    :class:`EventFramer`; ``feed`` adds one call to it (per read, not per
    event), plus, while a usage chunk is to be stripped and has not come,
    one ``is None`` check.
    """

    __slots__ = ("_framer", "_strip_usage", "_stripped")

    def __init__(self, *, strip_usage: bool = False, max_event_size: int = DEFAULT_MAX_EVENT_SIZE) -> None:
        self._framer = EventFramer(max_event_size)
        self._strip_usage = strip_usage
        self._stripped = 0

    def feed(self, chunk: bytes) -> bytes:
        framer = self._framer
        if not self._strip_usage or framer.usage is not None:
            return framer.feed(chunk)
        payload = framer.feed(chunk)
        if framer.usage is not None and payload:
            payload = self._without_usage_chunk(payload)
        return payload

    def _without_usage_chunk(self, payload: bytes) -> bytes:
        """``payload`` less the usage-only chunk(s) the gateway asked for (rare path: parses them).

        Only the events that carry a usage object are looked at: the read that
        carries the usage chunk is often a whole fast stream's tail, hundreds
        of events, and splitting it into events to check each one cost ~4 %
        of the gateway's CPU at full throughput.
        """
        kept: list[bytes] = []
        copied = 0  # payload[:copied] is decided
        # A usage *object*: OpenAI-style upstreams send `"usage":null` in every
        # chunk once usage is asked for, and those are content, not to be parsed.
        found = _USAGE_OBJECT.search(payload)
        while found is not None:
            at = found.start()
            start = payload.rfind(b"\n\n", copied, at)
            start = copied if start < 0 else start + 2
            end = payload.find(b"\n\n", at)
            end = len(payload) if end < 0 else end + 2
            if _is_usage_only(payload[start : end - 2]):
                kept.append(payload[copied:start])
                copied = end
                self._stripped += 1
            found = _USAGE_OBJECT.search(payload, end)
        if not copied:
            return payload
        kept.append(payload[copied:])
        return b"".join(kept)

    @property
    def finished(self) -> bool:
        return self._framer.finished

    @property
    def pending_bytes(self) -> int:
        return self._framer.pending_bytes

    @property
    def done(self) -> bool:
        return self._framer.done

    @property
    def malformed(self) -> str | None:
        return self._framer.malformed

    @property
    def upstream_error(self) -> bytes | None:
        error = self._framer.error
        if error is None:
            return None
        return data_event(json.dumps({"error": error}, separators=(",", ":")).encode())

    @property
    def events(self) -> int:
        return self._framer.events - self._stripped

    @property
    def content_started(self) -> bool:
        return self._framer.events > self._stripped

    @property
    def content_deltas(self) -> int:
        return self._framer.content_deltas

    @property
    def has_partial_event(self) -> bool:
        return self._framer.has_partial_event

    @property
    def terminal(self) -> bytes:
        return DONE_EVENT

    @property
    def raw_usage(self) -> dict[str, Any] | None:
        """The upstream's usage object as sent (``prompt_tokens``, ``completion_tokens``, details...)."""
        return self._framer.usage

    @property
    def usage(self) -> Usage | None:
        usage = self._framer.usage
        if usage is None:
            return None
        return Usage(_count(usage.get("prompt_tokens")), _count(usage.get("completion_tokens")))

    def error_event(self, error: SluiceError) -> bytes:
        return error.to_sse_event()


class CompletionsFramer(ChatFramer):
    """One upstream legacy-completions stream: as chat, with ``choices[].text`` counted as content."""

    __slots__ = ("_text_deltas",)

    def __init__(self, *, strip_usage: bool = False, max_event_size: int = DEFAULT_MAX_EVENT_SIZE) -> None:
        super().__init__(strip_usage=strip_usage, max_event_size=max_event_size)
        self._text_deltas = 0

    def feed(self, chunk: bytes) -> bytes:
        payload = ChatFramer.feed(self, chunk)
        if payload:
            self._text_deltas += payload.count(b'"text":"') - payload.count(b'"text":""')
        return payload

    @property
    def content_deltas(self) -> int:
        return self._text_deltas


def _is_usage_only(event: bytes) -> bool:
    if b'"usage"' not in event or not event.startswith(b"data:"):
        return False
    try:
        chunk = json.loads(event[5:])
    except ValueError:
        return False
    return isinstance(chunk, dict) and chunk.get("choices") == [] and isinstance(chunk.get("usage"), dict)


def _count(value: object) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) else None


# --- requests -------------------------------------------------------------------


class ChatRequest(ForwardedRequest):
    """A chat or completions request; streaming chat asks the upstream for usage (see the module doc)."""

    __slots__ = ("adds_usage", "_framer_type")

    def __init__(self, *, adds_usage: bool, framer_type: type[ChatFramer], **fields: Any) -> None:
        super().__init__(new_framer=framer_type, **fields)
        #: the gateway sets ``stream_options.include_usage`` and strips the usage chunk
        self.adds_usage = adds_usage
        self._framer_type = framer_type

    def new_framer(self) -> ChatFramer:
        return self._framer_type(strip_usage=self.adds_usage)

    def body_for_model(self, upstream_model: str | None) -> bytes:
        if not self.adds_usage:
            return super().body_for_model(upstream_model)
        fields = self.forwarded_fields(upstream_model)
        if fields is None and "stream_options" not in self.body and json.detect_encoding(self._raw) == "utf-8":
            # Splice the field in after the opening brace: the client's own bytes otherwise
            # (the key is not in the body, and duplicate keys were refused, so it appears once).
            start = self._raw.index(b"{") + 1
            return self._raw[:start] + _INCLUDE_USAGE + self._raw[start:]
        if fields is None:
            fields = dict(self.body)
        options = fields.get("stream_options")
        fields["stream_options"] = {**(options if isinstance(options, dict) else {}), "include_usage": True}
        return dump_json(fields)


def _asks_usage(options: StreamOptions | None) -> bool:
    return options is not None and options.include_usage is True


def parse_chat(raw: bytes, *, max_model_name_length: int | None = None) -> ChatRequest:
    """Validate a chat-completions body: JSON without repeated keys, the fields the gateway depends on, model length."""
    body, validated = load_validated(raw, ChatCompletionRequest, max_model_name_length)
    check_stream_options(validated.stream, validated.stream_options)
    stream = bool(validated.stream)
    return ChatRequest(
        adds_usage=stream and not _asks_usage(validated.stream_options),
        framer_type=ChatFramer,
        raw=raw,
        body=body,
        validated=validated,
        model_name=validated.model,
        stream=stream,
        backpressure_strategy=validated.backpressure_strategy,
    )


class CompletionRequest(BaseModel):
    """Legacy ``/v1/completions``: the fields the gateway depends on; anything else passes through."""

    model_config = ConfigDict(extra="allow", strict=True)

    model: str = Field(min_length=1)
    prompt: str | list[str] | list[int] | list[list[int]]
    max_tokens: int | None = Field(default=None, ge=0)
    temperature: float | None = Field(default=None, ge=0, le=2)
    n: int | None = Field(default=None, ge=1, le=128)
    stream: bool | None = None
    stream_options: StreamOptions | None = None
    backpressure_strategy: BackpressureName | None = None


def parse_completions(raw: bytes, *, max_model_name_length: int | None = None) -> ChatRequest:
    """Validate a legacy completions body (same JSON checks as chat: duplicate keys, model length)."""
    body, validated = load_validated(raw, CompletionRequest, max_model_name_length)
    check_stream_options(validated.stream, validated.stream_options)
    return ChatRequest(
        adds_usage=False,
        framer_type=CompletionsFramer,
        raw=raw,
        body=body,
        validated=validated,
        model_name=validated.model,
        stream=bool(validated.stream),
        backpressure_strategy=validated.backpressure_strategy,
    )


# --- coalescing -----------------------------------------------------------------


def coalesce_completions(payload: bytes) -> tuple[bytes, int]:
    """Merge consecutive text chunks per choice; return (events, events merged away).

    The completions twin of :func:`~sluice.wire.openai.coalesce_events` (the
    same :func:`~sluice.wire.openai.coalesce_choices`): a run of plain text
    chunks (one choice with only ``index``/``text``, no ``finish_reason``, no
    ``logprobs``, no usage) collapses into one chunk per choice index,
    keeping the first chunk's metadata; anything else is a barrier kept as
    is, so each choice's text is unchanged and in order.
    """
    return coalesce_choices(payload, _mergeable_text_chunk, _merge_text)


def _mergeable_text_chunk(event: bytes) -> dict[str, Any] | None:
    found = single_choice_chunk(event)
    if found is None:
        return None
    chunk, choice = found
    if (
        not isinstance(choice.get("text"), str)
        or not isinstance(choice.get("index", 0), int)
        or set(choice) - {"index", "text", "finish_reason", "logprobs"}
    ):
        return None
    return chunk


def _merge_text(first: dict[str, Any], more: dict[str, Any]) -> None:
    first["text"] += more["text"]


# --- the grammars ---------------------------------------------------------------


class ChatGrammar:
    """Chat completions or legacy completions (satisfies :class:`sluice.wire.grammar.Grammar`)."""

    ping_event = b": ping\n\n"
    #: a data-only stream of independent chunks: dropping one loses its tokens, not the stream's shape
    droppable = True
    terminal_name = "[DONE]"

    def __init__(self, name: Literal["chat", "completions"]) -> None:
        self.name = name
        self.upstream_path = "/chat/completions" if name == "chat" else "/completions"
        self._framer_type: type[ChatFramer] = ChatFramer if name == "chat" else CompletionsFramer

    def parse_request(self, raw: bytes, *, max_model_name_length: int | None) -> ChatRequest:
        parse = parse_chat if self.name == "chat" else parse_completions
        return parse(raw, max_model_name_length=max_model_name_length)

    def new_framer(self) -> ChatFramer:
        """A framer that forwards every chunk; prefer the request's :meth:`ChatRequest.new_framer`."""
        return self._framer_type()

    def coalesce(self, payload: bytes) -> tuple[bytes, int] | None:
        return coalesce_events(payload) if self.name == "chat" else coalesce_completions(payload)

    def error_body(self, error: SluiceError) -> bytes:
        return error.to_json_bytes()


CHAT: Final = ChatGrammar("chat")
COMPLETIONS: Final = ChatGrammar("completions")
