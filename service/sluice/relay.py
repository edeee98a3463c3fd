"""The per-stream relay: one nursery, its producer(s), a bounded channel, a consumer.

::

    upstream socket ──▶ producer task ──▶ memory channel (capacity N) ──▶ consumer ──▶ client
                        (StreamFramer,      (what one upstream read      (this object's
                         backpressure)       returned, as one item)       __anext__, run by
                                                                          Quart's send loop)

:class:`StreamRelay` is a Quart ``ResponseBody``: an async context manager
that is also an async iterator. ``__aenter__`` opens the stream's nursery and
starts the producer; Quart's send loop iterates it (that iteration *is* the
consumer); ``__aexit__`` cancels and joins the nursery. Owning the nursery in
an object, rather than yielding from inside one in an async generator, keeps
cancellation landing in the right task (PEP 789).

Each other job of a stream has its own module: who serves it
(:mod:`sluice.hedging`: producers, the claim, the hedge race), what a batch
does when the client is slow (:mod:`sluice.backpressure`), and how it ends
(:mod:`sluice.outcome`: the last bytes, the accounting). This module holds
the nursery, the producer loop (:meth:`StreamRelay._pump`: ``body.read`` →
``framer.feed`` → ``offer``, one call each per upstream read), the consumer
and the release.

Invariants:

* The stream's nursery owns its upstream response: whatever ends the stream
  (done, upstream fault, client gone), :meth:`StreamRelay.release` closes the
  upstream response, shielded, exactly once.
* The producer never raises into the nursery: a failure becomes the stream's
  terminal error event, so the consumer is never cancelled by its producer.
* The client receives whole events in upstream order, then exactly one
  terminal event: the API's clean end or one error event in its words,
  preceded by one ``: sluice {...}`` figures comment. Nothing follows it.
* Retries happen only while nothing of the upstream's body has reached the
  channel (pings are comments, not content).
* A client that leaves mid-stream gets nothing more, least of all an end;
  its upstream connections are shut down the moment the gateway learns of
  it (:meth:`StreamRelay.client_gone`), before the stream's tasks unwind.
* The stream's memory bound in the gateway is in bytes: its
  :class:`~sluice.budget.StreamBudget`. The producer takes a batch's bytes
  from it before the batch enters the channel
  (:class:`~sluice.backpressure.StreamBackpressure`); the consumer gives them
  back once the batch was written to the client (when Quart asks for the
  next one), so the budget covers the queue *and* the write in flight.
  Consumer writes are at most half the budget, so one batch is read while
  another is written, and a policy that discards queued batches always has
  room to make. Not counted: copies of a batch below the relay (h11's
  framed copy of the write in flight) and the part of an event the framer
  holds back (it is subtracted from the next read).
* No configured secret reaches the client: the terminal event (an upstream's
  error event, or a gateway error quoting the upstream) goes through the full
  scrubber; streamed content, whole events per upstream read, through the
  provider-key scrubber (a few ``in`` scans per read, none without keys).
"""

from __future__ import annotations

import functools
import logging
import math
from collections.abc import Awaitable, Callable
from types import TracebackType
from typing import Any

import httpx2
import trio
from quart.wrappers.response import ResponseBody

from .backpressure import StreamBackpressure, effective_policy
from .budget import StreamBudget
from .errors import ShuttingDown, SluiceError, StreamInterrupted, UpstreamTimeout
from .hedging import OpenHedge, Producer, ProducerRace
from .metrics import GatewayMetrics, StreamStats
from .outcome import account, last_bytes, record_peaks, settle
from .policies import Backpressure
from .redaction import Scrubber
from .router import Deployment, OpenedStream
from .upstream_body import UpstreamBody
from .wire.grammar import Grammar, StreamFramer

log = logging.getLogger("sluice.stream")

#: how long a finished stream may keep reading the upstream's end of body
REUSE_GRACE = 0.25
#: how long a stream whose client left waits for the request's cancellation before it stops by itself
CLIENT_GONE_GRACE = 5.0

OpenUpstream = Callable[[], Awaitable[OpenedStream]]
#: open the request again after ``failed`` broke before any content (elsewhere when there is an elsewhere)
OpenRetry = Callable[[Deployment], Awaitable[OpenedStream]]

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
        self.stats = stats
        self._metrics = metrics
        self.budget = budget
        #: bytes of the batch Quart is writing now; given back when it asks for the next
        self._in_flight = 0
        #: a consumer write is at most half the budget
        self._half_budget = max(1, budget.capacity // 2)
        self._first_token_deadline = stats.started_at + first_token_timeout
        self._idle_timeout = idle_timeout
        self._ping_interval = ping_interval
        self._reopens_left = max_reopens
        self._scrubber = scrubber or Scrubber()
        #: ``None`` when there is nothing to scan for: the hot path pays one ``is None``
        self._scrub_content = stream_scrubber.scrub if stream_scrubber else None

        self._race = ProducerRace(stats, observe_first_token)
        self._send, self._receive = trio.open_memory_channel[bytes](capacity)
        self._backpressure = StreamBackpressure(
            self._send,
            self._receive,
            policy=effective_policy(policy, droppable=grammar.droppable),
            budget=budget,
            stats=stats,
            capacity=capacity,
            max_wait=max_wait,
            coalesce=grammar.coalesce,
        )
        self._nursery_manager: Any = None
        self._nursery: trio.Nursery | None = None
        #: set by the producer when the stream cannot finish; sent as the final event
        self._error: SluiceError | None = None
        self._upstream_error_event: bytes | None = None
        self._producer_scope = trio.CancelScope()
        self._finished = False
        self._released = False
        #: the client went away (:meth:`client_gone`): nothing more is written, least of all an end
        self._client_left = False

    # --- before the response head -------------------------------------------------

    async def open(self) -> None:
        """Open the upstream request (with retries); raise a client-visible error if it fails.

        Runs in the route, before the response head, so a failure here gets
        its own HTTP status. On any exit by exception the stream is released.
        """
        try:
            with trio.move_on_at(self._first_token_deadline) as deadline:
                opened = await self._open_upstream()
                self._race.producers.append(Producer(opened))
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
        return self._receive.statistics().current_buffer_used

    @property
    def tokens_so_far(self) -> int:
        """Content deltas framed so far (``stats.tokens`` is filled in when the stream ends)."""
        framer = self._framer
        return framer.content_deltas if framer is not None else self.stats.tokens

    @property
    def first_deployment(self) -> str:
        """The deployment the stream opened on (a hedge that wins is in the figures)."""
        producers = self._race.producers
        opened = producers[0].opened if producers else None
        return opened.deployment.name if opened is not None else ""

    # --- the nursery --------------------------------------------------------------

    async def __aenter__(self) -> StreamRelay:
        self._nursery_manager = trio.open_nursery()
        self._nursery = await self._nursery_manager.__aenter__()
        self.stats.streamed = True
        self._nursery.start_soon(self._produce, self._send)
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

    def client_gone(self) -> None:
        """The client went away mid-stream: stop the producers and end their upstream connections now.

        Called synchronously by whoever learns of it first: the connection's
        reader the moment its read finds the client gone
        (:class:`~sluice.http_server.ClientWatch`), else the request's receiver
        on ``http.disconnect``. The upstream sees the close in that same
        scheduling step, not after the consumer and the producer have each
        been rescheduled and unwound and the producer has closed its response
        (two to four more turns of trio's run queue: milliseconds at load).
        The producers are cancelled first, so none reads the shut-down
        connection and takes it for an upstream failure. The request's own
        cancellation follows (hypercorn hands the app ``http.disconnect``);
        until it lands, the consumer writes nothing: a stream its client left
        never ends with a clean terminal event. :meth:`release` still closes
        every response, as for any other end.
        """
        if self._finished or self._client_left:
            return  # the upstream is done with: the usual unwinding suffices
        self._client_left = True
        self._producer_scope.cancel()
        for producer in self._race.producers:
            if producer.opened is not None:
                producer.opened.shut_down()

    async def _await_cancellation(self) -> bytes:
        """The client left: wait for the request's cancellation, which is on its way; bounded, never a hang."""
        with trio.move_on_after(CLIENT_GONE_GRACE):
            await trio.sleep_forever()
        raise StopAsyncIteration  # (not reached in practice: hypercorn closed the connection long before)

    async def release(self) -> None:
        """Close the upstream response and account for the stream; idempotent, shielded."""
        if self._released:
            return
        self._released = True
        await self._race.aclose()  # each shielded
        record_peaks(self.stats, self._receive, self.budget)
        self._in_flight = 0
        self.budget.release_all()
        settle(self.stats, self._metrics)

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
        if self._client_left:
            return await self._await_cancellation()
        receive = self._receive
        backpressure = self._backpressure
        try:
            try:
                if backpressure.carried is not None:
                    item, backpressure.carried = backpressure.carried, None
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
            if self._client_left:
                return await self._await_cancellation()
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
                if self._client_left:
                    break  # no end for a client that left (the next call waits for the cancellation)
                if parts is None:
                    parts = [item]
                parts.append(self._finish())
                break
            if size + len(more) > limit:
                backpressure.carried = more  # still held: it goes out first in the next write
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
        record_peaks(stats, self._receive, self.budget)
        framer = self._framer if self._framer is not None else self._new_framer()
        return last_bytes(
            stats,
            framer,
            upstream_error_event=self._upstream_error_event,
            error=self._error,
            scrubber=self._scrubber,
        )

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
                        await self._pump(send_channel, self._race.producers[0])
                    else:
                        assert self._hedge_delay is not None
                        await self._race.run(
                            functools.partial(self._pump, send_channel), self._open_hedge, self._hedge_delay
                        )
            except SluiceError as exc:
                self._error = exc
            except Exception:
                # A bug or an unmapped library error must still end the stream visibly.
                log.exception("relay producer failed")
                self._error = StreamInterrupted("The gateway failed while relaying the stream.")

    # --- one upstream request -----------------------------------------------------------

    async def _pump(self, send_channel: trio.MemorySendChannel[bytes], producer: Producer) -> None:
        """Read one producer's upstream into the channel until its stream ends; retry it while untouched."""
        stats = self.stats
        race = self._race
        claim = race.claim
        offer = self._backpressure.offer
        read_allowance = self._backpressure.read_allowance
        framer = self._new_framer()
        if race.winner is None:
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
                        while chunk := await body.read(await read_allowance(framer)):
                            payload = framer.feed(chunk)
                            # Only the framed batch is kept (and counted): let the read go
                            # before a wait for room, or a stalled stream holds it twice.
                            chunk = b""
                            if payload:
                                if scrub_content is not None:
                                    # Whole events: a key cannot straddle two payloads.
                                    payload = scrub_content(payload)
                                if not producer.forwarded:
                                    if not claim(producer):
                                        return  # another request won the race
                                    self._framer = framer
                                    producer.forwarded = True
                                stats.batches += 1
                                await offer(payload)
                            if framer.finished:
                                if framer.upstream_error is not None and not producer.forwarded:
                                    break  # maybe retried elsewhere (below): not the stream's yet
                                if not claim(producer):
                                    return
                                self._framer = framer
                                if framer.done:
                                    account(stats, framer)  # before the consumer writes the figures
                                    await self._drain_for_reuse(send_channel, body)
                                break
                            now = trio.current_time()
                            if now >= move_after:
                                deadline.deadline = now + idle_timeout + slack
                                move_after = now + slack
                    finally:
                        await body.aclose()
            except httpx2.HTTPError as exc:
                if await self._reopen_if_untouched(producer, type(exc).__name__):
                    framer = self._renew_framer(producer)
                    continue
                raise StreamInterrupted(
                    f"The upstream connection broke mid-stream ({type(exc).__name__})."
                ) from None
            finally:
                if race.winner is producer:
                    account(stats, framer)
            if deadline.cancelled_caught:
                if producer.forwarded:
                    raise UpstreamTimeout(f"The upstream sent nothing for {idle_timeout:g} s.")
                raise UpstreamTimeout("The upstream sent no first token in time.")
            if framer.upstream_error is not None and not producer.forwarded:
                # An error event before any content (Anthropic's overloaded_error in
                # a 200, say): another deployment may well succeed.
                if await self._reopen_if_untouched(producer, "upstream_error_event"):
                    framer = self._renew_framer(producer)
                    continue
            break
        if framer.done:
            return
        if framer.upstream_error is not None:
            if not claim(producer):
                return
            self._framer = framer
            self._upstream_error_event = framer.upstream_error
            return
        if framer.malformed is not None:
            raise StreamInterrupted(f"The upstream sent a malformed stream: {framer.malformed}")
        raise StreamInterrupted(f"The upstream ended the stream without {self._grammar.terminal_name}.")

    def _renew_framer(self, producer: Producer) -> StreamFramer:
        framer = self._new_framer()
        winner = self._race.winner
        if winner is None or winner is producer:
            self._framer = framer
        return framer

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

    async def _reopen_if_untouched(self, producer: Producer, reason: str) -> bool:
        """Retry a request that broke (``reason``) before any of its body reached the client."""
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
        trace = self.stats.trace
        if trace is not None:
            trace.reopened(failed, reason, producer.opened.deployment)
        return True
