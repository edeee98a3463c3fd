"""Decisions, without I/O: which backpressure policy a stream uses, what to retry, how long to wait.

Backpressure policies say what a stream's producer does when a new batch
does not fit its byte budget (``stream_buffer_bytes``: what the relay holds,
queued or being written; see :mod:`sluice.budget`) or its channel is full:

``block``
    Wait for room (lossless). The upstream is read only when there is
    room, and no more than the room, so TCP backpressure reaches the
    provider. The default.
``drop_oldest`` / ``drop_newest``
    Discard the oldest events not yet being written until the new batch
    fits (whole batches, then the oldest events of the last one), or the
    new batch; count the events discarded.
``error``
    Wait up to ``max_wait_ms`` for room, then end the stream with an error event.
``coalesce``
    Lossless: merge queued content deltas of the same choice into one chunk
    (see :func:`sluice.wire.openai.coalesce_events`); the upstream keeps
    flowing while the merged text fits the budget, then waits as ``block``.

Retries (before the first byte reaches the client, never after) are run by
tenacity; this module builds its policy: which failures qualify, capped
exponential backoff with jitter, ``Retry-After``/``retry-after-ms``
honoured, bounded attempts and a total time budget.
"""

from __future__ import annotations

import email.utils
import enum
import time
from collections.abc import Mapping
from dataclasses import dataclass

import tenacity

from .errors import InvalidRequest

RETRIABLE_STATUSES = frozenset({429, 500, 502, 503, 504})


class Backpressure(enum.StrEnum):
    BLOCK = "block"
    DROP_OLDEST = "drop_oldest"
    DROP_NEWEST = "drop_newest"
    ERROR = "error"
    COALESCE = "coalesce"


BACKPRESSURE_HEADER = "x-sluice-backpressure"


def choose_backpressure(header: str | None, body_field: str | None, default: Backpressure) -> Backpressure:
    """The header wins over the body field, which wins over the gateway default."""
    chosen = header if header is not None else body_field
    if chosen is None:
        return default
    try:
        return Backpressure(chosen.strip().lower())
    except ValueError:
        names = ", ".join(p.value for p in Backpressure)
        raise InvalidRequest(
            f"Unknown backpressure strategy {chosen!r}; use one of: {names}.",
            param=BACKPRESSURE_HEADER if header is not None else "backpressure_strategy",
            code="invalid_value",
        ) from None


# --- retries ------------------------------------------------------------------------


class RetriableUpstreamError(Exception):
    """An attempt failed in a way worth another try; carries what the upstream asked for."""

    def __init__(self, cause: BaseException, *, retry_after: float | None = None) -> None:
        super().__init__(str(cause))
        self.cause = cause
        self.retry_after = retry_after


def parse_retry_after(headers: Mapping[str, str], *, now: float | None = None) -> float | None:
    """Seconds the upstream asked us to wait, from ``retry-after-ms`` or ``retry-after``.

    ``retry-after`` may be delta-seconds or an HTTP-date. Returns ``None`` when
    absent or unparseable, and never a negative number.
    """
    millis = headers.get("retry-after-ms")
    if millis is not None:
        try:
            return max(0.0, float(millis) / 1000.0)
        except ValueError:
            pass
    value = headers.get("retry-after")
    if value is None:
        return None
    value = value.strip()
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    if when is None:
        return None
    current = time.time() if now is None else now
    return max(0.0, when.timestamp() - current)


@dataclass(frozen=True, slots=True)
class RetryPolicy:
    """How hard to try an upstream before the first byte goes to the client."""

    max_attempts: int = 3
    backoff_initial: float = 0.2
    backoff_max: float = 5.0
    jitter: float = 0.2
    budget: float = 15.0  # seconds, across all attempts and waits

    def retrying(self, *, after: RetriableUpstreamError | None = None, started: float | None = None) -> tenacity.AsyncRetrying:
        """A fresh tenacity controller (it holds per-request state).

        With ``after``, the failure of a first attempt the caller ran without
        tenacity (most requests succeed at once, and tenacity's machinery
        costs ~60 us a request), the controller decides as if it had run that
        attempt itself, started at ``started`` (``time.monotonic()``): it
        counts it, waits what it asked for, and stops on the same attempt
        and budget.
        """
        controller_class = tenacity.AsyncRetrying if after is None else _AfterFirstAttempt
        controller = controller_class(
            retry=tenacity.retry_if_exception_type(RetriableUpstreamError),
            wait=_HonourRetryAfter(
                tenacity.wait_exponential_jitter(
                    multiplier=self.backoff_initial, max=self.backoff_max, jitter=self.jitter
                )
            ),
            stop=tenacity.stop_after_attempt(self.max_attempts) | tenacity.stop_before_delay(self.budget),
            reraise=True,
        )
        if isinstance(controller, _AfterFirstAttempt):
            controller.first_failure = after
            controller.first_started = time.monotonic() if started is None else started
        return controller


class _AfterFirstAttempt(tenacity.AsyncRetrying):
    """tenacity's controller, entering its loop with the first attempt already run and failed."""

    first_failure: BaseException | None = None
    first_started: float = 0.0

    def __aiter__(self) -> tenacity.AsyncRetrying:
        super().__aiter__()
        state = self._retry_state
        state.start_time = self.first_started
        failure = self.first_failure
        assert failure is not None
        # What AttemptManager.__exit__ records for a failed attempt: the first
        # step of the loop then decides retry, stop and wait from it.
        state.set_exception((type(failure), failure, failure.__traceback__))
        return self


class _HonourRetryAfter(tenacity.wait.wait_base):
    """Wait what the upstream asked for; otherwise the backoff."""

    def __init__(self, backoff: tenacity.wait.wait_base) -> None:
        self.backoff = backoff

    def __call__(self, retry_state: tenacity.RetryCallState) -> float:
        outcome = retry_state.outcome
        if outcome is not None and outcome.failed:
            error = outcome.exception()
            if isinstance(error, RetriableUpstreamError) and error.retry_after is not None:
                return error.retry_after
        return self.backoff(retry_state)
