"""One exception hierarchy for the gateway, mapped once to OpenAI's error shape.

Every error a client can see is a :class:`SluiceError`. Each carries the HTTP
status it maps to and the four fields of OpenAI's error object
(``message``, ``type``, ``param``, ``code``), so there is exactly one place
(:meth:`SluiceError.to_dict`) that decides what a client reads, whether the
error becomes a 4xx/5xx response before the stream starts or a final
``data: {"error": ...}`` event after it started.

Invariant: messages never contain upstream credentials. The gateway builds
its messages from its own text and the upstream's status, never from the
request it sent upstream; where a message or body quotes the upstream's own
words, the app scrubs every configured secret from it on the way out
(:mod:`sluice.redaction`).

Every attribute an error carries is declared on its class and set by its
constructor (nothing is attached after the fact): :class:`UpstreamError`,
the base of every error the upstream caused, has ``upstream_status`` (what
the provider answered, for metrics, when it answered at all);
:class:`RateLimited` has ``limit`` (which of the key's limits refused).
"""

from __future__ import annotations

import json
from typing import Any, ClassVar


class SluiceError(Exception):
    """Base of every client-visible error."""

    status: ClassVar[int] = 500
    type: ClassVar[str] = "server_error"
    code: ClassVar[str | None] = None

    def __init__(
        self,
        message: str,
        *,
        param: str | None = None,
        code: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.param = param
        if code is not None:
            self.code = code  # type: ignore[misc]  # per-instance override of the class default
        self.headers: dict[str, str] = headers or {}

    def to_dict(self) -> dict[str, Any]:
        return {
            "error": {
                "message": self.message,
                "type": self.type,
                "param": self.param,
                "code": self.code,
            }
        }

    def to_json_bytes(self) -> bytes:
        return json.dumps(self.to_dict(), separators=(",", ":")).encode()

    def to_sse_event(self) -> bytes:
        """The one final event a broken stream ends with (no ``[DONE]`` after it)."""
        return b"data: " + self.to_json_bytes() + b"\n\n"


# --- the client's fault (4xx) -------------------------------------------------


class InvalidRequest(SluiceError):
    status = 400
    type = "invalid_request_error"
    code = "invalid_request"


class InvalidJSON(InvalidRequest):
    code = "invalid_json"


class ConflictingFraming(InvalidRequest):
    """``Content-Length`` and ``Transfer-Encoding`` in one HTTP/1.1 request (RFC 9112 6.3: reject and close)."""

    code = "conflicting_framing"


class Unauthorized(SluiceError):
    status = 401
    type = "invalid_request_error"
    code = "invalid_api_key"


class NotFound(SluiceError):
    status = 404
    type = "invalid_request_error"
    code = "not_found"


class MethodNotAllowed(SluiceError):
    status = 405
    type = "invalid_request_error"
    code = "method_not_allowed"


class PayloadTooLarge(SluiceError):
    status = 413
    type = "invalid_request_error"
    code = "request_too_large"


class RateLimited(SluiceError):
    """A virtual key is over one of its limits."""

    status = 429
    type = "rate_limit_error"
    code = "rate_limit_exceeded"
    #: the limit that refused: ``requests``, ``tokens`` or ``streams`` (a metrics label)
    limit: str = "requests"

    def __init__(self, message: str, *, limit: str = "requests", headers: dict[str, str] | None = None) -> None:
        super().__init__(message, headers=headers)
        self.limit = limit


# --- the upstream's fault -------------------------------------------------------


class UpstreamError(SluiceError):
    """Base of every error the upstream caused: unreachable, late, refused, broken, or a non-2xx.

    The router moves a request that failed this way to another deployment
    (except for the statuses that say the request itself is wrong).
    """

    status = 502
    type = "upstream_error"
    code = "upstream_error"
    #: the status the upstream answered with, when it answered (``None``: no answer, or a broken stream)
    upstream_status: int | None = None

    def __init__(
        self,
        message: str,
        *,
        upstream_status: int | None = None,
        param: str | None = None,
        code: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message, param=param, code=code, headers=headers)
        self.upstream_status = upstream_status


class UpstreamStatusError(UpstreamError):
    """The upstream answered with a non-2xx status; relayed with that status.

    ``body`` is the upstream's own error body when it was OpenAI-shaped JSON,
    so a client sees exactly what the provider said.
    """

    def __init__(
        self,
        status: int,
        message: str,
        *,
        body: dict[str, Any] | None = None,
        upstream_status: int | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message, upstream_status=upstream_status, headers=headers)
        self.status = status  # type: ignore[misc]  # per-instance override of the class default
        #: the upstream's OpenAI-shaped error body, relayed as it is
        self.body = body

    def to_dict(self) -> dict[str, Any]:
        if self.body is not None:
            return self.body
        return super().to_dict()


class UpstreamAuthFailed(UpstreamError):
    """The upstream refused the gateway's own credentials (its 401/403): the operator's problem.

    Never relayed as a 401: the client's SDK would report the *client's* key
    as invalid. The upstream's body (which may quote the key) is not relayed.
    """

    code = "upstream_auth_failed"


class UpstreamUnavailable(UpstreamError):
    """Could not reach the upstream, or it broke before answering (502)."""

    code = "upstream_unavailable"


class UpstreamTimeout(UpstreamError):
    """The upstream did not answer in time (504)."""

    status = 504
    code = "upstream_timeout"


class StreamInterrupted(UpstreamError):
    """A stream that had started could not finish; sent as the final event."""

    code = "stream_interrupted"


# --- the gateway's own limits ---------------------------------------------------


class BackpressureOverflow(SluiceError):
    """The ``error`` backpressure policy gave up on a reader too slow to keep up."""

    status = 503
    type = "server_error"
    code = "backpressure_overflow"


class Overloaded(SluiceError):
    status = 503
    type = "server_error"
    code = "overloaded"


class TooManyConnections(SluiceError):
    """The worker is out of file descriptors; a new connection is answered with this and closed."""

    status = 503
    type = "server_error"
    code = "too_many_connections"


class ShuttingDown(SluiceError):
    status = 503
    type = "server_error"
    code = "server_shutting_down"
