"""Backpressure: one stream's policy applied to each batch, in bytes (no sockets).

A :class:`StreamBackpressure` stands between a stream's producer and its
channel. The producer asks it how much the next upstream read may return
(:meth:`~StreamBackpressure.read_allowance`) and hands it each framed batch
(:meth:`~StreamBackpressure.offer`); the consumer takes batches from the
channel and leaves the one that did not fit its last write in
:attr:`~StreamBackpressure.carried`, where ``drop_oldest`` may still drop it.

Invariants:

* A batch's bytes are taken from the stream's
  :class:`~sluice.budget.StreamBudget` before the batch enters the channel,
  and given back if it never does (a cancelled send delivers nothing). The
  consumer gives them back once the batch was written.
* ``block`` and ``error`` read the upstream only when the budget has room,
  and no more than the room less the framer's partial event: while the
  client does not read, neither does the producer, and TCP backpressure
  reaches the upstream. The other policies keep reading, in reads of at
  most half the budget, and drop or merge queued batches to stay inside it.
* Each policy keeps its meaning in bytes: ``block`` waits for room,
  ``error`` waits at most ``max_wait`` and then ends the stream with
  :class:`~sluice.errors.BackpressureOverflow`, ``drop_newest`` discards the
  new batch, ``drop_oldest`` discards the oldest whole events not yet being
  written, ``coalesce`` merges what is queued (lossless; it waits like
  ``block`` only when even the merged batch does not fit). Only whole events
  are dropped, and only of an API whose grammar allows it (else ``block``).
* The channel's item capacity still bounds the number of queued batches.
* Cost: one method call per upstream read and one per batch; nothing per token.
"""

from __future__ import annotations

from collections.abc import Callable

import trio

from .budget import StreamBudget
from .errors import BackpressureOverflow
from .metrics import StreamStats
from .policies import Backpressure
from .upstream_body import READ_SIZE
from .wire.grammar import StreamFramer

#: the smallest upstream read, also when the budget has less room
MIN_READ = 1024

#: the grammar's merge of queued events: (merged, events merged away), or None when nothing merges
Coalesce = Callable[[bytes], tuple[bytes, int] | None]


def effective_policy(policy: Backpressure, *, droppable: bool) -> Backpressure:
    """The policy a stream runs: an API whose events cannot go missing never drops (``block`` instead)."""
    if policy in (Backpressure.DROP_OLDEST, Backpressure.DROP_NEWEST) and not droppable:
        return Backpressure.BLOCK  # whole events of this API cannot go missing (docs/architecture.md)
    return policy


class StreamBackpressure:
    """One stream's policy between its producer and its channel, counted against its byte budget."""

    __slots__ = (
        "carried",
        "_send",
        "_receive",
        "_policy",
        "_budget",
        "_stats",
        "_capacity",
        "_max_wait",
        "_coalesce",
        "_half_budget",
        "_read_floor",
    )

    def __init__(
        self,
        send: trio.MemorySendChannel[bytes],
        receive: trio.MemoryReceiveChannel[bytes],
        *,
        policy: Backpressure,
        budget: StreamBudget,
        stats: StreamStats,
        capacity: int,
        max_wait: float,
        coalesce: Coalesce,
    ) -> None:
        #: a batch the consumer took from the channel that did not fit its last write; the next one starts with it
        self.carried: bytes | None = None
        self._send = send
        self._receive = receive
        self._policy = policy
        self._budget = budget
        self._stats = stats
        self._capacity = capacity
        self._max_wait = max_wait
        self._coalesce = coalesce
        #: a consumer write and a non-waiting policy's read are at most half the budget
        self._half_budget = max(1, budget.capacity // 2)
        #: the waiting policies read once at least this much fits (no trickle of tiny reads)
        self._read_floor = max(1, min(READ_SIZE, budget.capacity // 4))

    async def read_allowance(self, framer: StreamFramer) -> int:
        """How many bytes the next upstream read may return, waiting for room if the policy waits.

        ``block`` and ``error`` read only what fits: while the client does not
        read, neither does the producer, and TCP backpressure reaches the
        upstream with at most the budget held here. The other policies keep
        the upstream flowing, in reads of at most half the budget. The part
        of an event the framer holds back comes out with the next batch, so
        it counts as taken already.
        """
        policy = self._policy
        budget = self._budget
        half = self._half_budget
        if policy is not Backpressure.BLOCK and policy is not Backpressure.ERROR:
            return min(READ_SIZE, half)
        if not budget.fits(self._read_floor):
            await self._wait_for_room(self._read_floor)
        # At most half the budget: one batch is written while the next is read.
        # An event longer than the budget still has to be read to its end: in 1 KiB steps.
        return max(MIN_READ, min(READ_SIZE, half, budget.available - framer.pending_bytes))

    async def _wait_for_room(self, size: int) -> None:
        """Wait until ``size`` bytes fit the budget; ``error`` waits at most ``max_wait``, then ends the stream."""
        stats = self._stats
        waited_from = trio.current_time()
        try:
            if self._policy is Backpressure.ERROR:
                with trio.move_on_after(self._max_wait):
                    await self._budget.wait_until_fits(size)
                    return
                raise BackpressureOverflow(
                    f"The client read too slowly: no room in the stream's buffer for {self._max_wait * 1000:g} ms."
                )
            await self._budget.wait_until_fits(size)
        finally:
            stats.blocked_seconds += trio.current_time() - waited_from

    async def offer(self, payload: bytes) -> None:
        """Queue one batch, applying the stream's policy when its bytes or the channel do not fit.

        Each policy keeps its meaning in bytes: ``block`` waits for room,
        ``error`` waits at most ``max_wait``, ``drop_newest`` discards this
        batch, ``drop_oldest`` discards the oldest events not yet being
        written (queued batches, then the oldest events of the newest
        queued one, then of this one) until this one fits,
        ``coalesce`` merges what is queued with it (and waits like ``block``
        only when even the merged batch does not fit beside the write in
        flight).
        """
        budget = self._budget
        send_channel = self._send
        size = len(payload)
        if budget.fits(size):
            try:
                send_channel.send_nowait(payload)
            except trio.WouldBlock:
                pass
            else:
                budget.take(size)
                return
        stats = self._stats
        policy = self._policy
        if policy is Backpressure.BLOCK or policy is Backpressure.ERROR:
            if not budget.fits(size):
                await self._wait_for_room(size)
            # Counted before the send: the consumer may take and write it before send() returns.
            budget.take(size)
            waited_from = trio.current_time()
            try:
                if policy is Backpressure.BLOCK:
                    await send_channel.send(payload)
                else:
                    with trio.move_on_after(self._max_wait):
                        await send_channel.send(payload)
                        return
                    budget.release(size)
                    raise BackpressureOverflow(
                        f"The client read too slowly: no room in the stream's buffer for {self._max_wait * 1000:g} ms."
                    )
            except trio.Cancelled:
                budget.release(size)  # not sent: a cancelled memory-channel send delivers nothing
                raise
            finally:
                stats.blocked_seconds += trio.current_time() - waited_from
        elif policy is Backpressure.DROP_NEWEST:
            stats.dropped += payload.count(b"\n\n")
        elif policy is Backpressure.DROP_OLDEST:
            receive = self._receive
            while not budget.fits(size) or receive.statistics().current_buffer_used >= self._capacity:
                # The oldest batch not yet being written: the one the consumer carried over, then the queue's.
                carried = self.carried
                if carried is not None:
                    oldest, self.carried = carried, None
                else:
                    try:
                        oldest = receive.receive_nowait()
                    except trio.WouldBlock:
                        break  # nothing queued: what is held is the write in flight (at most half the budget)
                budget.release(len(oldest))
                kept = b""
                if receive.statistics().current_buffer_used == 0 and (carried is not None or self._capacity >= 2):
                    # Nothing newer is queued: drop only this batch's oldest events, as
                    # many as the new batch needs room for (a batch can be half the budget).
                    kept = newest_events(oldest, budget.available - size)
                stats.dropped += oldest.count(b"\n\n", 0, len(oldest) - len(kept))
                if kept:
                    budget.take(len(kept))
                    if carried is not None:
                        self.carried = kept
                    else:
                        send_channel.send_nowait(kept)
                    break
            if not budget.fits(size):
                # Nothing left to drop but the write in flight: the new batch's own oldest events go.
                kept = newest_events(payload, budget.available)
                stats.dropped += payload.count(b"\n\n", 0, size - len(kept))
                payload, size = kept, len(kept)
                if not payload:
                    return
            budget.take(size)
            send_channel.send_nowait(payload)
        else:  # COALESCE: take back what is queued and merge it with the new batch.
            receive = self._receive
            queued: list[bytes] = []
            while True:
                try:
                    queued.append(receive.receive_nowait())
                except trio.WouldBlock:
                    break
            budget.release(sum(len(batch) for batch in queued))
            queued.append(payload)
            joined = b"".join(queued)
            coalesced = self._coalesce(joined)
            merged, merged_away = coalesced if coalesced is not None else (joined, 0)
            stats.coalesced += merged_away
            if not budget.fits(len(merged)):
                # Merging saved what it could; the rest waits for the client, losslessly.
                await self._wait_for_room(len(merged))
            budget.take(len(merged))
            send_channel.send_nowait(merged)


def newest_events(batch: bytes, room: int) -> bytes:
    """The newest whole events of ``batch`` that fit in ``room`` bytes (``b""`` if none)."""
    if room <= 0:
        return b""
    if len(batch) <= room:
        return batch
    # An event starts right after a blank line: the first boundary at or past the cut.
    boundary = batch.find(b"\n\n", max(0, len(batch) - room - 2))
    if boundary < 0:
        return b""
    return batch[boundary + 2 :]
