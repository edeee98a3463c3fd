"""The byte budgets on their own: counting, fitting, waking a waiting producer."""

from __future__ import annotations

import pytest
import trio
import trio.testing

from sluice.budget import MemoryBudget, StreamBudget


def test_a_stream_budget_counts_what_is_taken_and_released() -> None:
    budget = StreamBudget(100)
    budget.take(60)
    assert (budget.held, budget.available) == (60, 40)
    budget.release(20)
    assert (budget.held, budget.available, budget.peak) == (40, 60, 60)


def test_a_batch_fits_while_it_stays_within_the_capacity() -> None:
    budget = StreamBudget(100)
    budget.take(60)
    assert budget.fits(40)
    assert not budget.fits(41)


def test_a_batch_larger_than_the_whole_budget_fits_only_alone() -> None:
    budget = StreamBudget(100)
    assert budget.fits(500)  # nothing held: it goes through rather than never
    budget.take(1)
    assert not budget.fits(500)


def test_releasing_more_than_is_held_is_a_bug_not_a_negative_count() -> None:
    budget = StreamBudget(100)
    budget.take(10)
    with pytest.raises(ValueError):
        budget.release(11)
    assert budget.held == 10


def test_every_stream_moves_the_worker_budget_by_the_same_bytes() -> None:
    memory = MemoryBudget(150)
    first, second = memory.stream(100), memory.stream(100)
    first.take(80)
    second.take(50)
    assert memory.used == 130 and not memory.full
    second.take(20)
    assert memory.used == 150 and memory.full
    first.release(30)
    assert memory.used == 120 and not memory.full
    first.release_all()
    second.release_all()
    assert (memory.used, memory.peak) == (0, 150)


async def test_a_waiting_producer_resumes_once_enough_was_released() -> None:
    budget = StreamBudget(100)
    budget.take(90)
    resumed = False

    async def producer() -> None:
        nonlocal resumed
        await budget.wait_until_fits(30)
        resumed = True

    with trio.fail_after(10):  # a hang bound, not a timing
        async with trio.open_nursery() as nursery:
            nursery.start_soon(producer)
            await trio.testing.wait_all_tasks_blocked()
            assert budget.waiting and not resumed
            budget.release(10)  # 80 held: 30 more still does not fit
            await trio.testing.wait_all_tasks_blocked()
            assert budget.waiting and not resumed
            budget.release(20)  # 60 held: now it does
    assert resumed and not budget.waiting


async def test_waiting_for_what_already_fits_returns_at_once() -> None:
    budget = StreamBudget(100)
    budget.take(50)
    with trio.move_on_after(5) as timeout:
        await budget.wait_until_fits(50)
    assert not timeout.cancelled_caught and not budget.waiting


def test_drop_oldest_keeps_the_newest_whole_events_of_a_batch_that_fit() -> None:
    from sluice.backpressure import newest_events as _newest_events

    batch = b"data: a\n\ndata: bb\n\ndata: ccc\n\n"
    assert _newest_events(batch, len(batch)) == batch
    assert _newest_events(batch, len(batch) - 1) == b"data: bb\n\ndata: ccc\n\n"
    assert _newest_events(batch, len(b"data: ccc\n\n")) == b"data: ccc\n\n"
    assert _newest_events(batch, len(b"data: ccc\n\n") - 1) == b""
    assert _newest_events(batch, 0) == b""
