"""What the relay needs to know about a client API's stream: the grammar protocol (sans-IO).

Sluice relays several streaming APIs (OpenAI chat completions and legacy
completions, OpenAI Responses, Anthropic Messages). The relay is one piece
of code; each API is one :class:`Grammar`, a small module in ``wire/`` that
knows its API's wire format and nothing about trio, sockets or Quart, like
h11's ``Connection``: bytes in, decisions out.

A grammar answers, for one API:

* how a client request is parsed and validated (:meth:`Grammar.parse_request`),
  and how a refusal before the response head is shaped (:meth:`Grammar.error_body`);
* per upstream response, a :class:`StreamFramer` that cuts the upstream's
  bytes into whole events and says what they mean: content, the stream's
  clean end, the upstream's own error, a malformed stream, usage;
* how the gateway itself ends a stream it must cut short
  (:meth:`StreamFramer.error_event`), keeps a waiting client's connection
  alive (:attr:`Grammar.ping_event`), and merges queued events losslessly
  when a ``coalesce`` stream's channel is full (:meth:`Grammar.coalesce`).

Invariants every grammar keeps (each grammar's tests check them for every
split of every stream, with hypothesis):

* :meth:`StreamFramer.feed` returns whole events in upstream order, never a
  partial one, and nothing after :attr:`StreamFramer.finished` is true.
* Events before the first *content* event (the preamble: e.g. Responses'
  ``response.created``, Anthropic's ``message_start``) are held back and
  returned together with the first content event, so that a request that
  fails before any content can be retried elsewhere without the client
  seeing two preambles. If the stream ends before any content, the held
  preamble is part of :attr:`StreamFramer.terminal`.
* The terminal event (chat's ``[DONE]``; Responses' ``response.completed`` /
  ``response.incomplete``; Anthropic's ``message_stop``) is never returned by
  ``feed``: the relay writes its figures comment, then :attr:`terminal`.
* An upstream error event (inside a 200) is never returned by ``feed``
  either: it is kept in :attr:`StreamFramer.upstream_error`, so the relay
  can retry (no content yet) or end the stream with it. Like
  :attr:`StreamFramer.terminal`, it starts with the held preamble when no
  content was returned, so either can be the stream's last write.
* Nothing here does per-token JSON parsing on the common path: events are
  classified with ``bytes`` scans; JSON is parsed only for the rare events a
  decision needs (errors, usage, the terminal event).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Protocol

from ..errors import SluiceError


@dataclass(frozen=True, slots=True)
class Usage:
    """Token counts as the upstream reported them (``None``: not reported)."""

    input_tokens: int | None = None
    output_tokens: int | None = None


class ParsedRequest(Protocol):
    """A validated client request, ready to forward."""

    @property
    def model_name(self) -> str:
        """The public model name the client asked for (routing key)."""
        ...

    @property
    def stream(self) -> bool: ...

    @property
    def body(self) -> Mapping[str, Any]:
        """The request's JSON object as parsed (read, never changed, by tracing)."""
        ...

    @property
    def backpressure_strategy(self) -> str | None:
        """The policy the client named in the body (the gateway's own field, never forwarded), if any."""
        ...

    def body_for_model(self, upstream_model: str | None) -> bytes:
        """The bytes to send upstream, with ``model`` replaced when the deployment names another."""
        ...

    def new_framer(self) -> StreamFramer:
        """The framer for one attempt of *this* request (use it rather than :meth:`Grammar.new_framer`).

        A grammar may tune it to what the client asked: chat forwards
        ``stream_options.include_usage`` on the client's behalf when it was
        not asked for, and this framer strips the extra usage chunk.
        """
        ...


class StreamFramer(Protocol):
    """One upstream response's event stream, seen by the relay (one per attempt; sans-IO)."""

    #: nothing more will come out of :meth:`feed` (clean end, upstream error, or malformed)
    finished: bool
    #: the stream ended cleanly; :attr:`terminal` holds its last bytes
    done: bool
    #: the upstream's own error event, as received (held back from :meth:`feed`)
    upstream_error: bytes | None
    #: why the stream is malformed, when it is (the relay ends it with a gateway error)
    malformed: str | None
    #: a content event has been returned by :meth:`feed` (retrying would duplicate it)
    content_started: bool
    #: events returned so far
    events: int
    #: content deltas returned so far (a token, near enough)
    content_deltas: int

    @property
    def pending_bytes(self) -> int:
        """Bytes of an event begun but not ended, held until it ends (the relay reads less by this much)."""
        ...

    def feed(self, chunk: bytes) -> bytes:
        """Bytes of one upstream read in; whole, forwardable events out (maybe ``b""``)."""
        ...

    @property
    def terminal(self) -> bytes:
        """The clean end's bytes (held preamble included), valid once :attr:`done`."""
        ...

    @property
    def usage(self) -> Usage | None:
        """Usage from the events seen so far, when the upstream reported any."""
        ...

    def error_event(self, error: SluiceError) -> bytes:
        """The event that ends this stream with a gateway error, in the API's own shape.

        Continues the stream's own numbering where the API has one (Responses'
        ``sequence_number``), and includes any held preamble first when no
        content was sent yet, so the client's SDK sees a well-formed stream.
        """
        ...


class Grammar(Protocol):
    """One client API's wire format, as the relay and routes need it."""

    #: short name: the ``api`` label of metrics and logs ("chat", "responses", ...)
    name: str
    #: the upstream path under a deployment's base URL ("/chat/completions", ...)
    upstream_path: str
    #: sent while the client waits for the first content event
    ping_event: bytes
    #: how the stream's clean end is called, for messages ("[DONE]", "message_stop", ...)
    terminal_name: str
    #: whether whole events may be dropped (``drop_oldest``/``drop_newest``) without
    #: breaking the stream's structure for a client; if not, those policies act as ``block``
    droppable: bool

    def parse_request(self, raw: bytes, *, max_model_name_length: int | None) -> ParsedRequest:
        """Validate a request body; raise :class:`~sluice.errors.InvalidRequest` (a 400) when it is not valid."""
        ...

    def new_framer(self) -> StreamFramer:
        """A framer that forwards what the upstream sends (prefer :meth:`ParsedRequest.new_framer`)."""
        ...

    def coalesce(self, payload: bytes) -> tuple[bytes, int] | None:
        """Merge consecutive content deltas of ``payload`` (whole events) losslessly.

        Returns the merged bytes and how many events were merged away, or
        ``None`` when this grammar cannot merge losslessly (the relay then
        applies ``block``).
        """
        ...

    def error_body(self, error: SluiceError) -> bytes:
        """The JSON body of a refusal before the response head, in the API's error shape."""
        ...
