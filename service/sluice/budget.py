"""Byte budgets: how many bytes of relayed body the gateway holds, per stream and in all.

A stream's relay holds bytes between an upstream read and the moment the
client's socket took them: in its channel, and in the one write Quart has
in flight. :class:`StreamBudget` counts those bytes for one stream; the
producer takes bytes from it before it queues a batch, the consumer gives
them back once the batch was written. :class:`MemoryBudget` is the sum over
all of a worker's streams, and the admission check for new ones.

Neither does I/O or decides a policy: the relay decides what to do when a
batch does not fit (wait, drop, merge, fail; see :mod:`sluice.policies`).

Invariants:

* ``held`` is what was taken and not yet released; it never goes negative,
  and every take and release of a stream moves its :class:`MemoryBudget`
  by the same amount, so the worker's ``used`` is the sum of its streams'
  ``held``.
* ``fits(n)`` is true when ``held + n <= capacity``, and also when nothing
  is held: a single batch larger than the whole budget goes through alone
  rather than never (the relay keeps batches under the budget by reading no
  more than it has room for, so this is the rare case, not the rule).
* :meth:`StreamBudget.wait_until_fits` returns as soon as ``fits(n)``;
  every release wakes the waiter, so a producer blocked on a full budget
  resumes once the consumer wrote enough.
"""

from __future__ import annotations

import trio


class MemoryBudget:
    """Bytes held in relay buffers across every stream of one worker; full refuses new streams."""

    __slots__ = ("limit", "used", "peak", "refused")

    def __init__(self, limit: int) -> None:
        if limit < 1:
            raise ValueError("a memory budget needs at least one byte")
        self.limit = limit
        #: bytes held by all streams right now
        self.used = 0
        self.peak = 0
        #: streams refused because the budget was full
        self.refused = 0

    @property
    def full(self) -> bool:
        return self.used >= self.limit

    def stream(self, capacity: int) -> StreamBudget:
        """A budget for one new stream, counted in this one."""
        return StreamBudget(capacity, self)

    def _add(self, count: int) -> None:
        self.used += count
        if self.used > self.peak:
            self.peak = self.used


class StreamBudget:
    """Bytes one stream holds between its upstream read and the client's socket."""

    __slots__ = ("capacity", "held", "peak", "waiting", "_shared", "_room")

    def __init__(self, capacity: int, shared: MemoryBudget | None = None) -> None:
        if capacity < 1:
            raise ValueError("a stream budget needs at least one byte")
        self.capacity = capacity
        self.held = 0
        #: the most this stream held at once
        self.peak = 0
        #: a producer is waiting in :meth:`wait_until_fits` right now
        self.waiting = False
        self._shared = shared
        #: set by every release; replaced by whoever waits next
        self._room = trio.Event()

    @property
    def available(self) -> int:
        """Bytes that fit right now (0 when full)."""
        return max(0, self.capacity - self.held)

    def fits(self, count: int) -> bool:
        return self.held + count <= self.capacity or self.held == 0

    def take(self, count: int) -> None:
        """Count ``count`` more bytes as held (the caller decided they may be)."""
        self.held += count
        if self.held > self.peak:
            self.peak = self.held
        if self._shared is not None:
            self._shared._add(count)

    def release(self, count: int) -> None:
        """``count`` held bytes are gone (written to the client, dropped or merged away)."""
        if count > self.held:
            raise ValueError(f"released {count} bytes but only {self.held} are held")
        self.held -= count
        if self._shared is not None:
            self._shared._add(-count)
        self._room.set()

    def release_all(self) -> None:
        """The stream ended: whatever it still holds is freed with it."""
        if self.held:
            self.release(self.held)

    async def wait_until_fits(self, count: int) -> None:
        """Return once ``count`` more bytes fit (at once if they do)."""
        while not self.fits(count):
            if self._room.is_set():
                self._room = trio.Event()
            self.waiting = True
            try:
                await self._room.wait()
            finally:
                self.waiting = False
