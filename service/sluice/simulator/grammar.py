"""What every simulated API has in common, without I/O.

An API module (``chat``, ``completions``, ``responses``, ``messages``,
``embeddings``) turns a request body into an :class:`Exchange` and renders
the answer: a whole body, or a stream through a :class:`StreamRenderer`. The
server owns timing, faults and sockets; a renderer only turns "the next
token" into that API's bytes, so every API gets the same latency and fault
options from one loop.

Invariants:

* A renderer never holds the text: it sees one token at a time and asks
  :attr:`Answer.text` for the whole text only where the wire format repeats
  it (Responses' ``done`` events), which regenerates it (bounded by
  :class:`~.behaviour.SimulatorLimits`).
* The same model and prompt give the same text on every API
  (:func:`~.behaviour.iter_tokens`).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal, Protocol

from .behaviour import error_body

ErrorStyle = Literal["openai", "anthropic"]


class BadRequest(Exception):
    """A request body the simulator cannot answer: 400 in the API's error shape."""

    def __init__(self, message: str, *, param: str | None = None, code: str | None = None) -> None:
        super().__init__(message)
        self.param = param
        self.code = code


@dataclass(frozen=True, slots=True)
class Exchange:
    """One parsed request: what to generate and how to answer it."""

    model: str
    stream: bool
    #: the text that seeds the answer (the last message's text for conversations)
    prompt: str
    input_tokens: int
    #: the request's own cap on generated tokens (``max_tokens`` and kin)
    max_tokens: int | None = None
    n: int = 1
    #: False for embeddings and token counting: no text, no stream
    generates: bool = True
    #: the parsed body, for the renderer's API-specific fields
    payload: Any = None


@dataclass(frozen=True, slots=True)
class Answer:
    """What the simulator decided to send for one exchange."""

    number: int
    created: int
    tokens: int
    #: ``length`` when the request's cap cut the answer, else ``stop``
    finish: Literal["stop", "length"]
    #: the whole text, regenerated on each call
    text: Callable[[], str]


class StreamRenderer(Protocol):
    """One streamed answer's bytes, event by event (``n`` choices included)."""

    def opening(self) -> bytes:
        """Sent with the response head, before the first token is due."""

    def first(self) -> bytes:
        """Sent just before the first token (or before the closing when there is none)."""

    def token(self, token: str) -> bytes: ...

    def closing(self, *, terminal: bool) -> bytes:
        """After the last token; ``terminal=False`` leaves out the event that says the answer is complete."""

    def malformed(self) -> bytes:
        """An event whose data does not parse (``fault=malformed``)."""

    def error_event(self) -> bytes:
        """The API's in-stream error (``fault=error_event``); the body ends after it."""


class Api(Protocol):
    """One simulated endpoint."""

    name: str
    errors: ErrorStyle

    def parse(self, payload: Any) -> Exchange:
        """The exchange for a decoded JSON body; raises :class:`BadRequest`."""

    def body(self, exchange: Exchange, answer: Answer) -> bytes:
        """The non-streamed answer."""

    def stream(self, exchange: Exchange, answer: Answer) -> StreamRenderer: ...


def compact(value: Any) -> bytes:
    return json.dumps(value, separators=(",", ":")).encode()


def sse_event(name: str, data: Any) -> bytes:
    """A named server-sent event (Responses' and Anthropic's grammar)."""
    return b"event: " + name.encode() + b"\ndata: " + compact(data) + b"\n\n"


def words(text: str) -> int:
    return len(text.split())


def text_of(content: Any) -> str:
    """A message content's text: a string, or the ``text`` of its parts joined."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        # A part whose "text" is not a string must not crash the handler.
        return "".join(p["text"] for p in content if isinstance(p, dict) and isinstance(p.get("text"), str))
    return ""


def positive_int(payload: dict[str, Any], *names: str) -> int | None:
    """The first of ``names`` that is a positive int (a cap on the answer), else None."""
    for name in names:
        value = payload.get(name)
        if isinstance(value, int) and not isinstance(value, bool) and value > 0:
            return value
    return None


def error_json(style: ErrorStyle, status: int, message: str, *, param: str | None = None, code: str | None = None) -> bytes:
    """An error body in the API family's shape, its ``type`` chosen from the status."""
    if style == "anthropic":
        return compact({"type": "error", "error": {"type": anthropic_error_type(status), "message": message}})
    kind = "rate_limit_error" if status == 429 else ("server_error" if status >= 500 else "invalid_request_error")
    return error_body(message, type_=kind, param=param, code=code)


_ANTHROPIC_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    413: "request_too_large",
    429: "rate_limit_error",
    503: "overloaded_error",
    529: "overloaded_error",
}


def anthropic_error_type(status: int) -> str:
    return _ANTHROPIC_TYPES.get(status, "api_error" if status >= 500 else "invalid_request_error")
