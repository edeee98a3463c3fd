"""The framer shared by event-typed SSE grammars (OpenAI Responses, Anthropic Messages; sans-IO).

Both APIs stream ``event: <type>\\ndata: {json}\\n\\n`` events. They differ only
in which types are preamble, content, terminal and error, and in where
usage sits, so :class:`NamedEventFramer` does the cutting, holding and
capturing once, and a grammar subclasses it with those sets and a hook for
the few events it must read.

Invariants (besides those of :mod:`sluice.wire.grammar`):

* The forwarded bytes are the upstream's own events, byte for byte (line
  endings normalised to ``\\n``); only preamble keep-alives (``ping`` events,
  SSE comments before the first content event) are dropped, because the
  relay sends its own :attr:`~sluice.wire.grammar.Grammar.ping_event` while
  the client waits, and extra blank lines between events, so that the
  forwarded bytes never depend on where the upstream's reads were split.
* :attr:`upstream_error` and :attr:`terminal` start with the held preamble
  when no content was forwarded, so whichever the relay writes last, the
  client's SDK sees a well-formed stream (e.g. ``response.created`` first).
* A pending partial event, and the held preamble, never grow past
  ``max_event_size`` bytes: past that the stream is malformed.
* The common read (content already started, every event one ``event:`` line
  and one ``data: {...}`` line, no terminal/error/usage event in it) is
  decided with a few whole-buffer scans in C, as
  :class:`sluice.wire.sse.EventFramer` does; anything else goes event by
  event, and JSON is parsed only for the events a subclass names in
  :attr:`NamedEventFramer.inspected` (terminal, error, usage carriers).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any, ClassVar

from ..errors import SluiceError
from .grammar import Usage
from .sse import DEFAULT_MAX_EVENT_SIZE, take_whole_events


class NamedEventFramer:
    """Incremental framer for an ``event:``-typed SSE stream; subclasses give the API's event sets."""

    #: event types that end the stream cleanly
    terminal_types: ClassVar[frozenset[bytes]] = frozenset()
    #: event types that are the upstream's own error
    error_types: ClassVar[frozenset[bytes]] = frozenset()
    #: event types dropped while no content was forwarded (keep-alives)
    dropped_before_content: ClassVar[frozenset[bytes]] = frozenset()
    #: event types whose JSON :meth:`_inspect` reads (usage carriers; terminal and error types always are)
    inspected: ClassVar[frozenset[bytes]] = frozenset()
    #: the type of a content delta (a token, near enough)
    delta_type: ClassVar[bytes] = b""
    #: its ``event:`` line, counted with ``bytes.count`` on the common path (set from delta_type)
    delta_line: ClassVar[bytes] = b""
    #: substrings that send a read to the event-by-event path (set from the sets above)
    _attention: ClassVar[tuple[bytes, ...]] = ()

    __slots__ = (
        "_pending",
        "_preamble",
        "_preamble_events",
        "_max_event_size",
        "_terminal",
        "_input_tokens",
        "_output_tokens",
        "finished",
        "done",
        "upstream_error",
        "malformed",
        "content_started",
        "events",
        "content_deltas",
    )

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        cls.delta_line = b"event: " + cls.delta_type + b"\n"
        cls._attention = tuple(
            b"event: " + name + b"\n" for name in sorted(cls.terminal_types | cls.error_types | cls.inspected)
        )

    def __init__(self, max_event_size: int = DEFAULT_MAX_EVENT_SIZE) -> None:
        self._pending = b""
        self._preamble = b""
        self._preamble_events = 0
        self._max_event_size = max_event_size
        self._terminal = b""
        self._input_tokens: int | None = None
        self._output_tokens: int | None = None
        self.finished = False
        self.done = False
        self.upstream_error: bytes | None = None
        self.malformed: str | None = None
        self.content_started = False
        self.events = 0
        self.content_deltas = 0

    # --- what a subclass decides ------------------------------------------------------

    def _is_content(self, name: bytes) -> bool:
        """Whether an event of this type (not terminal, error or dropped) ends the preamble."""
        raise NotImplementedError

    def _inspect(self, name: bytes, obj: dict[str, Any]) -> None:
        """Read what a decision needs (usage) from an event named in :attr:`inspected` or terminal."""

    def _gateway_error_event(self, error: SluiceError) -> bytes:
        """The API's own error event for a gateway error (without preamble)."""
        raise NotImplementedError

    def _seen(self, consumed: bytes) -> None:
        """Called with the whole events each read consumed (up to a final one; sequence tracking)."""

    # --- the protocol -----------------------------------------------------------------

    @property
    def terminal(self) -> bytes:
        return self._terminal

    @property
    def usage(self) -> Usage | None:
        if self._input_tokens is None and self._output_tokens is None:
            return None
        return Usage(self._input_tokens, self._output_tokens)

    @property
    def pending_bytes(self) -> int:
        """Bytes of an event begun but not ended, held until it ends."""
        return len(self._pending)

    @property
    def has_partial_event(self) -> bool:
        return bool(self._pending.strip())

    def error_event(self, error: SluiceError) -> bytes:
        held = b"" if self.content_started else self._preamble
        return held + self._gateway_error_event(error)

    def feed(self, chunk: bytes) -> bytes:
        """Take one upstream read; return the whole events to forward (maybe ``b""``)."""
        if self.finished:
            return b""
        taken = take_whole_events(self._pending, chunk, self._max_event_size)
        if taken is None:
            self._fail(f"an upstream event exceeded {self._max_event_size} bytes")
            return b""
        complete, self._pending = taken
        if not complete:
            return b""
        if self.content_started and self._plain(complete):
            self._seen(complete)
            self.events += complete.count(b"\n\n")
            self.content_deltas += complete.count(self.delta_line)
            return complete
        return self._scan_each(complete)

    # --- internals ----------------------------------------------------------------------

    def _plain(self, events: bytes) -> bool:
        """Every event is ``event: X\\ndata: {...}`` and none needs a decision (whole-buffer scans)."""
        count = events.count(b"\n\n")
        if not (
            events.count(b"\n") == 3 * count
            and events.startswith(b"event: ")
            and events.endswith(b"}\n\n")
            and events.count(b"}\n\nevent: ") == count - 1
            and events.count(b"\ndata: {") == count
        ):
            return False
        for marker in self._attention:
            if marker in events:
                return False
        return True

    def _scan_each(self, complete: bytes) -> bytes:
        parts = complete.split(b"\n\n")
        parts.pop()  # what follows the final blank line: empty, or one more newline
        out: list[bytes] = []
        consumed = len(parts)
        for position, event in enumerate(parts):
            if event.startswith(b"\n"):
                # Extra blank lines between events: nothing in SSE. Dropped, so that
                # the forwarded bytes do not depend on where the reads were split.
                event = event.lstrip(b"\n")
            if not event:
                continue
            name, payload = _fields(event)
            if payload is None:
                # A comment, or an event without data (SSE clients dispatch nothing for it):
                # harmless after content, a keep-alive before.
                if self.content_started:
                    out.append(event)
                continue
            stripped = payload.strip()
            if not (stripped.startswith(b"{") and stripped.endswith(b"}")):
                self._fail(f"the upstream sent an event whose data is not a JSON object: {payload[:80]!r}")
                consumed = position + 1
                break
            obj: dict[str, Any] | None = None
            if name is None:
                # No `event:` line: the type is the data's own `type` (rare; parse it).
                obj = _load_object(stripped)
                kind = obj.get("type") if obj is not None else None
                if not isinstance(kind, str):
                    self._fail(f"the upstream sent an event without a type: {payload[:80]!r}")
                    consumed = position + 1
                    break
                name = kind.encode()
            if name in self.error_types or name in self.terminal_types or name in self.inspected:
                if obj is None:
                    obj = _load_object(stripped)
                if obj is None:
                    self._fail(f"the upstream sent a {name.decode(errors='replace')} event that is not JSON")
                    consumed = position + 1
                    break
                self._inspect(name, obj)
                if name in self.error_types:
                    self.upstream_error = self._end_bytes(event)
                    self.finished = True
                    consumed = position + 1
                    break
                if name in self.terminal_types:
                    self._terminal = self._end_bytes(event)
                    self.done = self.finished = True
                    consumed = position + 1
                    break
            if self.content_started:
                out.append(event)
                self.events += 1
            elif name in self.dropped_before_content:
                continue
            elif self._is_content(name):
                self.content_started = True
                if self._preamble:
                    out.append(self._preamble[:-2])  # its events, rejoined below
                    self._preamble = b""
                    self.events += self._preamble_events
                out.append(event)
                self.events += 1
            else:
                self._preamble += event + b"\n\n"
                self._preamble_events += 1
                if len(self._preamble) > self._max_event_size:
                    self._fail(f"the upstream's preamble exceeded {self._max_event_size} bytes")
                    consumed = position + 1
                    break
                continue
            if name == self.delta_type:
                self.content_deltas += 1
        if self.finished:
            self._pending = b""
        self._seen(complete if consumed == len(parts) else b"\n\n".join(parts[:consumed]))
        if not out:
            return b""
        return b"\n\n".join(out) + b"\n\n"

    def _end_bytes(self, event: bytes) -> bytes:
        """A final event's bytes, after the preamble when no content was forwarded."""
        held = b"" if self.content_started else self._preamble
        return held + event + b"\n\n"

    def _fail(self, reason: str) -> None:
        self.malformed = reason
        self.finished = True
        self._pending = b""


def _fields(event: bytes) -> tuple[bytes | None, bytes | None]:
    """An event's ``event`` field and joined ``data`` field (SSE rules; ``None`` when absent)."""
    if event.startswith(b"event: ") and event.count(b"\n") == 1:
        # The common shape: `event: X` then one `data: ...` line.
        head, _, line = event.partition(b"\n")
        if line.startswith(b"data: "):
            return head[7:], line[6:]
    name: bytes | None = None
    data: list[bytes] = []
    for line in event.split(b"\n"):
        if not line or line.startswith(b":"):
            continue
        field, _, value = line.partition(b":")
        if value.startswith(b" "):
            value = value[1:]
        if field == b"event":
            name = value
        elif field == b"data":
            data.append(value)
    return name, (b"\n".join(data) if data else None)


def _load_object(payload: bytes) -> dict[str, Any] | None:
    try:
        obj = json.loads(payload)
    except (ValueError, RecursionError):
        return None
    return obj if isinstance(obj, dict) else None


def int_or_none(value: object) -> int | None:
    """A token count as the upstream reported it (``bool`` is not a count)."""
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def coalesce_runs(
    payload: bytes,
    head: bytes,
    mergeable: Callable[[bytes], dict[str, Any] | None],
    run_key: Callable[[dict[str, Any]], tuple[Any, ...]],
    merge: Callable[[dict[str, Any], dict[str, Any]], None],
) -> tuple[bytes, int]:
    """Merge consecutive mergeable events of one run key; return (events, events merged away).

    ``mergeable`` parses an event into its data object, or ``None`` for a
    barrier (kept byte for byte, as is a run of one event); ``merge`` folds
    the next event of a run into the first. A merged run is written as
    ``head`` + its JSON. Paid only while a ``coalesce`` stream's channel is
    full: one ``json.loads`` per mergeable event.
    """
    events = payload.split(b"\n\n")
    events.pop()
    out: list[bytes] = []
    run: dict[str, Any] | None = None
    run_raw = b""
    key: tuple[Any, ...] = ()
    run_merged = 0
    merged = 0

    def flush() -> None:
        if run is not None:
            out.append(run_raw if run_merged == 0 else head + _dump(run) + b"\n\n")

    for event in events:
        data = mergeable(event)
        if data is None:
            flush()
            run = None
            out.append(event + b"\n\n")
            continue
        this_key = run_key(data)
        if run is not None and this_key == key:
            merge(run, data)
            run_merged += 1
            merged += 1
            continue
        flush()
        run, run_raw, key, run_merged = data, event + b"\n\n", this_key, 0
    flush()
    return b"".join(out), merged


def _dump(obj: dict[str, Any]) -> bytes:
    return json.dumps(obj, separators=(",", ":"), ensure_ascii=False).encode()
