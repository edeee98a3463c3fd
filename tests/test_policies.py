"""Policy decisions (backpressure choice, Retry-After parsing, retry timing), no sockets."""

from __future__ import annotations

import email.utils
import time

import pytest
import tenacity
import trio

from sluice.errors import InvalidRequest, UpstreamStatusError
from sluice.policies import (
    Backpressure,
    RetriableUpstreamError,
    RetryPolicy,
    choose_backpressure,
    parse_retry_after,
)


def test_header_beats_body_field_beats_default() -> None:
    assert choose_backpressure("coalesce", "drop_newest", Backpressure.BLOCK) is Backpressure.COALESCE
    assert choose_backpressure(None, "drop_newest", Backpressure.BLOCK) is Backpressure.DROP_NEWEST
    assert choose_backpressure(None, None, Backpressure.ERROR) is Backpressure.ERROR


def test_unknown_backpressure_header_is_400_naming_the_header() -> None:
    with pytest.raises(InvalidRequest) as caught:
        choose_backpressure("maybe", None, Backpressure.BLOCK)
    assert caught.value.param == "x-sluice-backpressure"


@pytest.mark.parametrize(
    ("headers", "expected"),
    [
        ({"retry-after": "3"}, 3.0),
        ({"retry-after": "0.5"}, 0.5),
        ({"retry-after-ms": "250"}, 0.25),
        ({"retry-after-ms": "250", "retry-after": "9"}, 0.25),
        ({"retry-after": "-4"}, 0.0),
        ({"retry-after": "soon"}, None),
        ({}, None),
    ],
)
def test_retry_after_forms(headers: dict[str, str], expected: float | None) -> None:
    assert parse_retry_after(headers) == expected


def test_retry_after_http_date() -> None:
    now = 1_700_000_000.0
    header = email.utils.formatdate(now + 30, usegmt=True)
    assert parse_retry_after({"retry-after": header}, now=now) == pytest.approx(30.0, abs=1.0)


def _fail(retry_after: float | None = None) -> RetriableUpstreamError:
    return RetriableUpstreamError(UpstreamStatusError(503, "busy"), retry_after=retry_after)


async def test_retries_stop_after_max_attempts() -> None:
    policy = RetryPolicy(max_attempts=3, backoff_initial=0, backoff_max=0, jitter=0)
    attempts = 0
    with pytest.raises(RetriableUpstreamError):
        async for attempt in policy.retrying():
            with attempt:
                attempts += 1
                raise _fail()
    assert attempts == 3


async def test_retry_after_is_honoured_as_the_wait() -> None:
    policy = RetryPolicy(max_attempts=2, backoff_initial=0, backoff_max=0, jitter=0)
    controller = policy.retrying()
    waits: list[float] = []
    controller.sleep = lambda seconds: _record(waits, seconds)  # type: ignore[method-assign]
    attempts = 0
    async for attempt in controller:
        with attempt:
            attempts += 1
            if attempts == 1:
                raise _fail(retry_after=0.75)
    assert waits == [0.75]


async def _record(waits: list[float], seconds: float) -> None:
    waits.append(seconds)
    await trio.lowlevel.checkpoint()


async def test_a_retry_after_beyond_the_budget_gives_up_at_once() -> None:
    policy = RetryPolicy(max_attempts=5, budget=1.0)
    attempts = 0
    with trio.fail_after(5), pytest.raises(RetriableUpstreamError):
        async for attempt in policy.retrying():
            with attempt:
                attempts += 1
                raise _fail(retry_after=30)
    assert attempts == 1


async def test_non_retriable_errors_are_not_retried() -> None:
    attempts = 0
    with pytest.raises(ValueError):
        async for attempt in RetryPolicy().retrying():
            with attempt:
                attempts += 1
                raise ValueError("no")
    assert attempts == 1
    assert isinstance(RetryPolicy().retrying(), tenacity.AsyncRetrying)


async def test_a_controller_told_of_a_failed_first_attempt_counts_it_and_waits_what_it_asked() -> None:
    # The upstream client runs a first attempt without tenacity and hands its
    # failure over: the controller must decide as if it had run it.
    policy = RetryPolicy(max_attempts=3, backoff_initial=0, backoff_max=0, jitter=0)
    controller = policy.retrying(after=_fail(retry_after=0.5))
    waits: list[float] = []
    controller.sleep = lambda seconds: _record(waits, seconds)  # type: ignore[method-assign]
    attempts = 0
    with pytest.raises(RetriableUpstreamError):
        async for attempt in controller:
            with attempt:
                attempts += 1
                raise _fail()
    assert attempts == 2  # the first one was the caller's
    assert waits == [0.5, 0.0]


async def test_a_controller_told_of_a_first_attempt_that_spent_the_budget_gives_up_at_once() -> None:
    policy = RetryPolicy(max_attempts=5, budget=1.0)
    attempts = 0
    with trio.fail_after(5), pytest.raises(RetriableUpstreamError):
        async for attempt in policy.retrying(after=_fail(), started=time.monotonic() - 2.0):
            with attempt:
                attempts += 1
    assert attempts == 0


async def test_a_controller_told_of_a_failed_first_attempt_of_one_allowed_gives_up() -> None:
    attempts = 0
    with pytest.raises(RetriableUpstreamError):
        async for attempt in RetryPolicy(max_attempts=1).retrying(after=_fail()):
            with attempt:
                attempts += 1
    assert attempts == 0
