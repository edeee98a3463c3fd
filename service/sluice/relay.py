"""The per-stream relay: one nursery, a producer, a bounded channel, a consumer.

::

    upstream socket ──▶ producer task ──▶ memory channel (capacity N) ──▶ consumer ──▶ client
                        (EventFramer,       (what one upstream read      (this object's
                         policy on full)     returned, as one item)       __anext__, run by
                                                                          Quart's send loop)

:class:`StreamRelay` is a Quart ``ResponseBody``: an async context manager
that is also an async iterator. ``__aenter__`` opens the stream's nursery and
starts the producer; Quart's send loop iterates it (that iteration *is* the
consumer); ``__aexit__`` cancels and joins the nursery. Owning the nursery in
an object, rather than yielding from inside one in an async generator, keeps
cancellation landing in the right task (PEP 789).

Invariants:

* The stream's nursery owns its upstream response: whatever ends the stream
  (done, upstream fault, client gone), :meth:`StreamRelay.release` closes the
  upstream response, shielded, exactly once.
* The producer never raises into the nursery: a failure becomes the stream's
  terminal error event, so the consumer is never cancelled by its producer.
* The client receives whole events in upstream order, then exactly one
  terminal event: ``data: [DONE]`` or one ``data: {"error": ...}``, each
  preceded by one ``: sluice {...}`` figures comment. Nothing follows it.
* Retries happen only while nothing of the upstream's body has reached the
  channel (pings are comments, not content).
* The stream's memory bound in the gateway is in bytes: its
  :class:`~sluice.budget.StreamBudget`. The producer takes a batch's bytes
  from it before the batch enters the channel; the consumer gives them back
  once the batch was written to the client (when Quart asks for the next
  one), so the budget covers the queue *and* the write in flight. Under
  ``block`` and ``error`` the producer reads the upstream only when the
  budget has room, and no more than the room; the other policies keep
  reading and drop or merge queued batches to stay inside it. Reads and
  consumer writes are at most half the budget each, so one batch is read
  while another is written, and a policy that discards queued batches
  always has room to make. The channel's item capacity (``buffer_size``)
  still bounds the number of queued batches. Not counted: copies of a
  batch below the relay (h11's framed copy of the write in flight) and
  the part of an event the framer holds back (it is subtracted from the
  next read).
* No configured secret reaches the client: the terminal event (an upstream's
  error event, or a gateway error quoting the upstream) goes through the full
  scrubber; streamed content, whole events per upstream read, through the
  provider-key scrubber (a few ``in`` scans per read, none without keys).

Hedging (a model with ``hedge_after_ms``/``hedge_after``): if no token has
arrived by the hedge delay, a second producer starts the same request on
another deployment, in the same nursery, feeding the same channel. The first
producer to have a token to send *claims* the stream (a plain check-and-set:
trio runs one task at a time); the other is cancelled at once and its
upstream response closed. The client sees one stream, from one upstream.
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Awaitable, Callable
from types import TracebackType
from typing import Any

import httpx2
import trio
from quart.wrappers.response import ResponseBody

from .budget import StreamBudget
from .errors import (
    BackpressureOverflow,
    ShuttingDown,
    SluiceError,
    StreamInterrupted,
    UpstreamTimeout,
)
from .metrics import GatewayMetrics, HedgeState, Outcome, StreamStats
from .policies import Backpressure
from .redaction import Scrubber
from .router import Deployment, OpenedStream
from .upstream_body import READ_SIZE, UpstreamBody
from .wire.grammar import Grammar, StreamFramer
from .wire.sse import comment_event

log = logging.getLogger("sluice.stream")

#: how long a finished stream may keep reading the upstream's end of body
REUSE_GRACE = 0.25
#: the smallest upstream read, also when the budget has less room
_MIN_READ = 1024

OpenUpstream = Callable[[], Awaitable[OpenedStream]]
OpenHedge = Callable[[Deployment], Awaitable[OpenedStream]]
#: open the request again after ``failed`` broke before any content (elsewhere when there is an elsewhere)
OpenRetry = Callable[[Deployment], Awaitable[OpenedStream]]


class _Producer:
    """One upstream request feeding the stream: the first, a reopen of it, or a hedge."""

    __slots__ = ("opened", "scope", "forwarded", "error", "running", "is_hedge")

    def __init__(self, opened: OpenedStream | None, *, is_hedge: bool = False) -> None:
        self.opened = opened
        self.scope = trio.CancelScope()
        #: something of this producer's upstream body reached the channel
        self.forwarded = False
        self.error: SluiceError | None = None
        self.running = True
        self.is_hedge = is_hedge

    async def aclose(self) -> None:
        if self.opened is not None:
            await self.opened.aclose()


class StreamRelay(ResponseBody):
    """One client stream, from its upstream request to its final event."""

    def __init__(
        self,
        *,
        grammar: Grammar,
        new_framer: Callable[[], StreamFramer] | None = None,
        open_upstream: OpenUpstream,
        open_retry: OpenRetry | None = None,
        stats: StreamStats,
        metrics: GatewayMetrics,
        capacity: int,
        budget: StreamBudget,
        policy: Backpressure,
        max_wait: float,
        first_token_timeout: float,
        idle_timeout: float,
        ping_interval: float,
        max_reopens: int,
        open_hedge: OpenHedge | None = None,
        hedge_delay: float | None = None,
        observe_first_token: Callable[[float], None] | None = None,
        scrubber: Scrubber | None = None,
        stream_scrubber: Scrubber | None = None,
    ) -> None:
        self._grammar = grammar
        self._new_framer = new_framer or grammar.new_framer
        #: the framer of the request that serves the stream (the last one tried, until one wins)
        self._framer: StreamFramer | None = None
        self._open_upstream = open_upstream
        self._open_retry = open_retry
        self._open_hedge = open_hedge if hedge_delay is not None else None
        self._hedge_delay = hedge_delay
        self._observe_first_token = observe_first_token
        self.stats = stats
        self._metrics = metrics
        self._capacity = capacity
        self.budget = budget
        #: bytes of the batch Quart is writing now; given back when it asks for the next
        self._in_flight = 0
        #: a batch taken from the channel that did not fit the last write; the next one starts with it
        self._carried: bytes | None = None
        #: a consumer write and a non-waiting policy's read are at most half the budget
        self._half_budget = max(1, budget.capacity // 2)
        #: the waiting policies read once at least this much fits (no trickle of tiny reads)
        self._read_floor = max(1, min(READ_SIZE, budget.capacity // 4))
        if policy in (Backpressure.DROP_OLDEST, Backpressure.DROP_NEWEST) and not grammar.droppable:
            policy = Backpressure.BLOCK  # whole events of this API cannot go missing (docs/architecture.md)
        self._policy = policy
        self._max_wait = max_wait
        self._first_token_deadline = stats.started_at + first_token_timeout
        self._idle_timeout = idle_timeout
        self._ping_interval = ping_interval
        self._reopens_left = max_reopens
        self._scrubber = scrubber or Scrubber()
        #: ``None`` when there is nothing to scan for: the hot path pays one ``is None``
        self._scrub_content = stream_scrubber.scrub if stream_scrubber else None

        self._producers: list[_Producer] = []
        #: the producer whose upstream serves the stream (set by :meth:`_claim`)
        self._winner: _Producer | None = None
        self._hedge_timer = trio.CancelScope()
        self._nursery_manager: Any = None
        self._nursery: trio.Nursery | None = None
        self._receive: trio.MemoryReceiveChannel[bytes] | None = None
        #: set by the producer when the stream cannot finish; sent as the final event
        self._error: SluiceError | None = None
        self._upstream_error_event: bytes | None = None
        self._producer_scope = trio.CancelScope()
        self._finished = False
        self._released = False

    # --- before the response head -------------------------------------------------

    async def open(self) -> None:
        """Open the upstream request (with retries); raise a client-visible error if it fails.

        Runs in the route, before the response head, so a failure here gets
        its own HTTP status. On any exit by exception the stream is released.
        """
        try:
            with trio.move_on_at(self._first_token_deadline) as deadline:
                opened = await self._open_upstream()
                self._producers.append(_Producer(opened))
            if deadline.cancelled_caught:
                raise UpstreamTimeout("The upstream did not answer in time.")
        except BaseException as exc:
            if isinstance(exc, SluiceError):
                self.stats.status = exc.status
                self.stats.end_with_error(exc.code)
            await self.release()
            raise

    @property
    def queue_depth(self) -> int:
        """Batches waiting in the channel for the client right now."""
        return self._receive.statistics().current_buffer_used if self._receive is not None else 0

    @property
    def first_deployment(self) -> str:
        """The deployment the stream opened on (a hedge that wins is in the figures)."""
        opened = self._producers[0].opened if self._producers else None
        return opened.deployment.name if opened is not None else ""

    # --- the nursery --------------------------------------------------------------

    async def __aenter__(self) -> StreamRelay:
        self._nursery_manager = trio.open_nursery()
        self._nursery = await self._nursery_manager.__aenter__()
        send_channel, self._receive = trio.open_memory_channel[bytes](self._capacity)
        self.stats.streamed = True
        self._nursery.start_soon(self._produce, send_channel)
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> bool | None:
        assert self._nursery is not None
        if exc_type is None and self._finished:
            # Finished normally: the producer may still be reading the end of
            # the upstream body so its connection can be reused; briefly.
            self._nursery.cancel_scope.deadline = trio.current_time() + REUSE_GRACE
        else:
            # The client is gone: nothing the producer reads has a reader.
            self._nursery.cancel_scope.cancel()
        try:
            return await self._nursery_manager.__aexit__(exc_type, exc, tb)
        finally:
            await self.release()

    async def release(self) -> None:
        """Close the upstream response and account for the stream; idempotent, shielded."""
        if self._released:
            return
        self._released = True
        for producer in self._producers:
            await producer.aclose()  # shielded
        stats = self.stats
        stats.ended_at = trio.current_time()
        if stats.outcome is Outcome.RUNNING:
            stats.outcome = Outcome.CLIENT_DISCONNECT
        if self._receive is not None:
            stats.peak_queue = self._receive.statistics().peak_buffer_used
        stats.peak_bytes = self.budget.peak
        self._in_flight = 0
        self.budget.release_all()
        self._metrics.stream_finished(stats)
        log.info({"event": "stream", **stats.figures()})

    # --- the consumer (Quart's send loop iterates this) -----------------------------

    def __aiter__(self) -> StreamRelay:
        return self

    async def __anext__(self) -> bytes:
        if self._in_flight:
            # Quart asks for the next batch once the last one was written.
            self.budget.release(self._in_flight)
            self._in_flight = 0
        if self._finished:
            raise StopAsyncIteration
        receive = self._receive
        assert receive is not None
        try:
            try:
                if self._carried is not None:
                    item, self._carried = self._carried, None
                else:
                    item = receive.receive_nowait()
            except trio.WouldBlock:
                if self.stats.first_token_at is None:
                    # Waiting for the first token: keep proxies and browsers
                    # from cutting an idle connection.
                    with trio.move_on_after(self._ping_interval) as waiting:
                        item = await receive.receive()
                    if waiting.cancelled_caught:
                        self.stats.pings += 1
                        return self._grammar.ping_event
                else:
                    item = await receive.receive()
        except trio.EndOfChannel:
            return self._finish()
        # Batch: whatever else is already queued goes out in the same write,
        # up to half the budget (so a drop policy always has queued batches
        # to drop while a write is stuck).
        parts: list[bytes] | None = None
        size = len(item)
        limit = self._half_budget
        while size < limit:
            try:
                more = receive.receive_nowait()
            except trio.WouldBlock:
                break
            except trio.EndOfChannel:
                if parts is None:
                    parts = [item]
                parts.append(self._finish())
                break
            if size + len(more) > limit:
                self._carried = more  # still held: it goes out first in the next write
                break
            if parts is None:
                parts = [item]
            parts.append(more)
            size += len(more)
        self._in_flight = size
        return item if parts is None else b"".join(parts)

    def _finish(self) -> bytes:
        """The stream's last bytes: the figures comment and one terminal event."""
        self._finished = True
        stats = self.stats
        stats.ended_at = trio.current_time()
        if self._receive is not None:
            stats.peak_queue = self._receive.statistics().peak_buffer_used
        stats.peak_bytes = self.budget.peak
        framer = self._framer if self._framer is not None else self._new_framer()
        if self._upstream_error_event is not None:
            stats.end_with_error("upstream_error_event")
            terminal = self._upstream_error_event
        elif self._error is not None:
            stats.end_with_error(self._error.code)
            terminal = framer.error_event(self._error)
        else:
            stats.outcome = Outcome.DONE
            terminal = framer.terminal
        return comment_event(stats.comment_text()) + self._scrubber.scrub(terminal)

    # --- the producer ------------------------------------------------------------------

    def shut_down(self) -> None:
        """End the stream now with a ``server_shutting_down`` error event (graceful shutdown).

        The producer stops and closes the upstream; the consumer delivers what
        is queued, then the error event, so the client sees why it ended.
        """
        if self._finished or self._error is not None or self._upstream_error_event is not None:
            return
        self._error = ShuttingDown("The gateway is shutting down; retry the request.")
        self._producer_scope.cancel()

    async def _produce(self, send_channel: trio.MemorySendChannel[bytes]) -> None:
        async with send_channel:
            try:
                with self._producer_scope:
                    if self._open_hedge is None:
                        await self._pump(send_channel, self._producers[0])
                    else:
                        await self._race(send_channel)
            except SluiceError as exc:
                self._error = exc
            except Exception:
                # A bug or an unmapped library error must still end the stream visibly.
                log.exception("relay producer failed")
                self._error = StreamInterrupted("The gateway failed while relaying the stream.")

    # --- hedging ---------------------------------------------------------------------

    async def _race(self, send_channel: trio.MemorySendChannel[bytes]) -> None:
        """The first request, and a hedge if no token came by the hedge delay; one wins."""
        assert self._hedge_delay is not None and self._open_hedge is not None
        first = self._producers[0]
        async with trio.open_nursery() as race:
            race.start_soon(self._contend, race, send_channel, first)
            with self._hedge_timer:
                await trio.sleep_until(self.stats.started_at + self._hedge_delay)
                assert first.opened is not None
                try:
                    opened = await self._open_hedge(first.opened.deployment)
                except SluiceError:
                    self.stats.hedge = HedgeState.FAILED
                    return
                hedge = _Producer(opened, is_hedge=True)
                self._producers.append(hedge)
                self.stats.hedge = HedgeState.STARTED
                race.start_soon(self._contend, race, send_channel, hedge)
        if self.stats.hedge is HedgeState.STARTED:
            self.stats.hedge = HedgeState.FAILED  # started, and neither request produced a token
        winner = self._winner
        if winner is not None:
            if winner.error is not None:
                raise winner.error
            return
        # Nobody produced anything: the stream fails as the first request did.
        for producer in self._producers:
            if producer.error is not None:
                raise producer.error

    async def _contend(
        self, race: trio.Nursery, send_channel: trio.MemorySendChannel[bytes], producer: _Producer
    ) -> None:
        with producer.scope:
            try:
                await self._pump(send_channel, producer)
            except SluiceError as exc:
                producer.error = exc
            finally:
                producer.running = False
                if self._winner is not producer:
                    await producer.aclose()  # shielded: the loser's upstream sees the close now
        if self._winner is producer or not any(p.running for p in self._producers):
            # Done, or every request failed before a token: no hedge is due any more.
            race.cancel_scope.cancel()

    def _claim(self, producer: _Producer) -> bool:
        """The stream goes to the first producer with something to send; tell the others."""
        if self._winner is not None:
            return self._winner is producer
        self._winner = producer
        stats = self.stats
        stats.first_token_at = trio.current_time()
        if producer.opened is not None:
            stats.deployment = producer.opened.deployment.name
        if self._observe_first_token is not None:
            self._observe_first_token(stats.first_token_at - stats.started_at)
        if stats.hedge is HedgeState.STARTED:
            stats.hedge = HedgeState.WON if producer.is_hedge else HedgeState.LOST
        self._hedge_timer.cancel()
        for other in self._producers:
            if other is not producer:
                other.scope.cancel()
        return True

    # --- one upstream request -----------------------------------------------------------

    async def _pump(self, send_channel: trio.MemorySendChannel[bytes], producer: _Producer) -> None:
        stats = self.stats
        framer = self._new_framer()
        if self._winner is None:
            self._framer = framer
        scrub_content = self._scrub_content
        deadline_at = self._first_token_deadline
        idle_timeout = self._idle_timeout
        # Moving a scope's deadline costs trio a heap update and a context
        # manager (~4 % of the gateway's CPU when done on every read), so it
        # moves at most every `slack` seconds: a stream is cut after between
        # idle_timeout and idle_timeout + slack of silence.
        slack = idle_timeout / 8
        while True:
            assert producer.opened is not None
            response = producer.opened.response
            # One scope per attempt (a scope is single-use); its deadline moves
            # with the reads rather than a new scope per read.
            deadline = trio.CancelScope(deadline=deadline_at)
            move_after = -math.inf
            try:
                with deadline:
                    body = UpstreamBody(response)
                    try:
                        while chunk := await body.read(await self._read_allowance(framer)):
                            payload = framer.feed(chunk)
                            # Only the framed batch is kept (and counted): let the read go
                            # before a wait for room, or a stalled stream holds it twice.
                            chunk = b""
                            if payload:
                                if scrub_content is not None:
                                    # Whole events: a key cannot straddle two payloads.
                                    payload = scrub_content(payload)
                                if not producer.forwarded:
                                    if not self._claim(producer):
                                        return  # another request won the race
                                    self._framer = framer
                                    producer.forwarded = True
                                stats.batches += 1
                                await self._offer(send_channel, payload)
                            if framer.finished:
                                if framer.upstream_error is not None and not producer.forwarded:
                                    break  # maybe retried elsewhere (below): not the stream's yet
                                if not self._claim(producer):
                                    return
                                self._framer = framer
                                if framer.done:
                                    self._account(framer)  # before the consumer writes the figures
                                    await self._drain_for_reuse(send_channel, body)
                                break
                            now = trio.current_time()
                            if now >= move_after:
                                deadline.deadline = now + idle_timeout + slack
                                move_after = now + slack
                    finally:
                        await body.aclose()
            except httpx2.HTTPError as exc:
                if await self._reopen_if_untouched(producer):
                    framer = self._renew_framer(producer)
                    continue
                raise StreamInterrupted(
                    f"The upstream connection broke mid-stream ({type(exc).__name__})."
                ) from None
            finally:
                if self._winner is producer:
                    self._account(framer)
            if deadline.cancelled_caught:
                if producer.forwarded:
                    raise UpstreamTimeout(f"The upstream sent nothing for {idle_timeout:g} s.")
                raise UpstreamTimeout("The upstream sent no first token in time.")
            if framer.upstream_error is not None and not producer.forwarded:
                # An error event before any content (Anthropic's overloaded_error in
                # a 200, say): another deployment may well succeed.
                if await self._reopen_if_untouched(producer):
                    framer = self._renew_framer(producer)
                    continue
            break
        if framer.done:
            return
        if framer.upstream_error is not None:
            if not self._claim(producer):
                return
            self._framer = framer
            self._upstream_error_event = framer.upstream_error
            return
        if framer.malformed is not None:
            raise StreamInterrupted(f"The upstream sent a malformed stream: {framer.malformed}")
        raise StreamInterrupted(f"The upstream ended the stream without {self._grammar.terminal_name}.")

    def _renew_framer(self, producer: _Producer) -> StreamFramer:
        framer = self._new_framer()
        if self._winner is None or self._winner is producer:
            self._framer = framer
        return framer

    def _account(self, framer: StreamFramer) -> None:
        stats = self.stats
        stats.chunks = framer.events
        stats.tokens = framer.content_deltas
        usage = framer.usage
        if usage is not None:
            if usage.output_tokens is not None:
                stats.usage_completion_tokens = usage.output_tokens
            if usage.input_tokens is not None:
                stats.usage_input_tokens = usage.input_tokens

    async def _drain_for_reuse(self, send_channel: trio.MemorySendChannel[bytes], body: UpstreamBody) -> None:
        """After ``[DONE]``: let the consumer finish, then read the body's end.

        The upstream ends its body right after ``[DONE]``; reading that end
        (usually already buffered) returns the connection to the pool instead
        of closing it, which saves a connect per request. Bounded: an upstream
        that keeps the body open after ``[DONE]`` loses its connection instead.
        """
        await send_channel.aclose()
        with trio.move_on_after(REUSE_GRACE):
            while await body.read():
                pass

    async def _reopen_if_untouched(self, producer: _Producer) -> bool:
        """Retry a request that broke before any of its body reached the client."""
        if producer.forwarded or self._reopens_left <= 0:
            return False
        self._reopens_left -= 1
        failed = producer.opened.deployment if producer.opened is not None else None
        await producer.aclose()
        producer.opened = None
        if self._open_retry is not None and failed is not None:
            producer.opened = await self._open_retry(failed)
        else:
            producer.opened = await self._open_upstream()
        return True

    async def _read_allowance(self, framer: StreamFramer) -> int:
        """How many bytes the next upstream read may return, waiting for room if the policy waits.

        ``block`` and ``error`` read only what fits: while the client does not
        read, neither does the producer, and TCP backpressure reaches the
        upstream with at most the budget held here. The other policies keep
        the upstream flowing, in reads of at most half the budget. The part
        of an event the framer holds back comes out with the next batch, so
        it counts as taken already.
        """
        policy = self._policy
        budget = self.budget
        half = self._half_budget
        if policy is not Backpressure.BLOCK and policy is not Backpressure.ERROR:
            return min(READ_SIZE, half)
        if not budget.fits(self._read_floor):
            await self._wait_for_room(self._read_floor)
        # At most half the budget: one batch is written while the next is read.
        # An event longer than the budget still has to be read to its end: in 1 KiB steps.
        return max(_MIN_READ, min(READ_SIZE, half, budget.available - framer.pending_bytes))

    async def _wait_for_room(self, size: int) -> None:
        """Wait until ``size`` bytes fit the budget; ``error`` waits at most ``max_wait``, then ends the stream."""
        stats = self.stats
        waited_from = trio.current_time()
        try:
            if self._policy is Backpressure.ERROR:
                with trio.move_on_after(self._max_wait):
                    await self.budget.wait_until_fits(size)
                    return
                raise BackpressureOverflow(
                    f"The client read too slowly: no room in the stream's buffer for {self._max_wait * 1000:g} ms."
                )
            await self.budget.wait_until_fits(size)
        finally:
            stats.blocked_seconds += trio.current_time() - waited_from

    async def _offer(self, send_channel: trio.MemorySendChannel[bytes], payload: bytes) -> None:
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
        budget = self.budget
        size = len(payload)
        if budget.fits(size):
            try:
                send_channel.send_nowait(payload)
            except trio.WouldBlock:
                pass
            else:
                budget.take(size)
                return
        stats = self.stats
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
            assert receive is not None
            while not budget.fits(size) or receive.statistics().current_buffer_used >= self._capacity:
                # The oldest batch not yet being written: the one the consumer carried over, then the queue's.
                carried = self._carried
                if carried is not None:
                    oldest, self._carried = carried, None
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
                    kept = _newest_events(oldest, budget.available - size)
                stats.dropped += oldest.count(b"\n\n", 0, len(oldest) - len(kept))
                if kept:
                    budget.take(len(kept))
                    if carried is not None:
                        self._carried = kept
                    else:
                        send_channel.send_nowait(kept)
                    break
            if not budget.fits(size):
                # Nothing left to drop but the write in flight: the new batch's own oldest events go.
                kept = _newest_events(payload, budget.available)
                stats.dropped += payload.count(b"\n\n", 0, size - len(kept))
                payload, size = kept, len(kept)
                if not payload:
                    return
            budget.take(size)
            send_channel.send_nowait(payload)
        else:  # COALESCE: take back what is queued and merge it with the new batch.
            receive = self._receive
            assert receive is not None
            queued: list[bytes] = []
            while True:
                try:
                    queued.append(receive.receive_nowait())
                except trio.WouldBlock:
                    break
            budget.release(sum(len(batch) for batch in queued))
            queued.append(payload)
            joined = b"".join(queued)
            coalesced = self._grammar.coalesce(joined)
            merged, merged_away = coalesced if coalesced is not None else (joined, 0)
            stats.coalesced += merged_away
            if not budget.fits(len(merged)):
                # Merging saved what it could; the rest waits for the client, losslessly.
                await self._wait_for_room(len(merged))
            budget.take(len(merged))
            send_channel.send_nowait(merged)


def _newest_events(batch: bytes, room: int) -> bytes:
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
