"""Who serves a stream: its producers (the first request, reopens of it, a hedge) and the claim.

Every stream has one :class:`ProducerRace`. Without a hedge it holds one
producer, which claims the stream with its first content. With a hedge delay
(a model's ``hedge_after_ms``/``hedge_after``), :meth:`ProducerRace.run`
starts a second producer on another deployment if no token came by then; both
feed the same channel, and the first with something to send claims the
stream.

Invariants:

* At most one producer ever claims the stream, and only the claimant writes
  to the channel: :meth:`ProducerRace.claim` is a plain check-and-set (trio
  runs one task at a time, so it is atomic), called before a producer's
  first write.
* The claim cancels the hedge timer and every other producer at once; a
  loser's upstream response is closed in its own ``finally`` (shielded), so
  the loser's upstream sees the close before the race ends.
* The hedge state is set here only: ``STARTED`` when the hedge opens, then
  ``WON``/``LOST`` at the claim, or ``FAILED`` (the hedge could not open, or
  neither request produced a token).
* If no producer claims the stream, it fails as the first failed request did.
* Cost: nothing per token; a claim once per producer. The request's trace
  (when tracing is on) hears of the first token, the hedge's start and the
  claim, each once.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable

import trio

from .errors import SluiceError
from .metrics import HedgeState, StreamStats
from .router import Deployment, OpenedStream

#: open the same request on another deployment than the given one
OpenHedge = Callable[[Deployment], Awaitable[OpenedStream]]


class Producer:
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


#: run one producer: read its upstream into the stream's channel until it ends (raises a SluiceError on failure)
Pump = Callable[[Producer], Awaitable[None]]


class ProducerRace:
    """The producers that may serve one stream, and the one that does."""

    __slots__ = ("producers", "winner", "_timer", "_stats", "_observe_first_token")

    def __init__(self, stats: StreamStats, observe_first_token: Callable[[float], None] | None = None) -> None:
        self.producers: list[Producer] = []
        #: the producer whose upstream serves the stream (set by :meth:`claim`)
        self.winner: Producer | None = None
        self._timer = trio.CancelScope()
        self._stats = stats
        self._observe_first_token = observe_first_token

    def claim(self, producer: Producer) -> bool:
        """The stream goes to the first producer with something to send; tell the others."""
        if self.winner is not None:
            return self.winner is producer
        self.winner = producer
        stats = self._stats
        stats.first_token_at = trio.current_time()
        if producer.opened is not None:
            stats.deployment = producer.opened.deployment.name
        if self._observe_first_token is not None:
            self._observe_first_token(stats.first_token_at - stats.started_at)
        trace = stats.trace
        deployment = producer.opened.deployment if producer.opened is not None else None
        if trace is not None:
            trace.first_token(deployment)
        if stats.hedge is HedgeState.STARTED:
            stats.hedge = HedgeState.WON if producer.is_hedge else HedgeState.LOST
            if trace is not None:
                trace.hedge_claimed(producer.is_hedge, deployment)
        self._timer.cancel()
        for other in self.producers:
            if other is not producer:
                other.scope.cancel()
        return True

    async def run(self, pump: Pump, open_hedge: OpenHedge, hedge_delay: float) -> None:
        """The first request, and a hedge if no token came by the hedge delay; one wins."""
        stats = self._stats
        first = self.producers[0]
        async with trio.open_nursery() as race:
            race.start_soon(self._contend, race, pump, first)
            with self._timer:
                await trio.sleep_until(stats.started_at + hedge_delay)
                assert first.opened is not None
                try:
                    opened = await open_hedge(first.opened.deployment)
                except SluiceError:
                    stats.hedge = HedgeState.FAILED
                    return
                hedge = Producer(opened, is_hedge=True)
                self.producers.append(hedge)
                stats.hedge = HedgeState.STARTED
                if stats.trace is not None:
                    stats.trace.hedge_started(opened.deployment)
                race.start_soon(self._contend, race, pump, hedge)
        if stats.hedge is HedgeState.STARTED:
            stats.hedge = HedgeState.FAILED  # started, and neither request produced a token
        winner = self.winner
        if winner is not None:
            if winner.error is not None:
                raise winner.error
            return
        # Nobody produced anything: the stream fails as the first request did.
        for producer in self.producers:
            if producer.error is not None:
                raise producer.error

    async def _contend(self, race: trio.Nursery, pump: Pump, producer: Producer) -> None:
        with producer.scope:
            try:
                await pump(producer)
            except SluiceError as exc:
                producer.error = exc
            finally:
                producer.running = False
                if self.winner is not producer:
                    await producer.aclose()  # shielded: the loser's upstream sees the close now
        if self.winner is producer or not any(p.running for p in self.producers):
            # Done, or every request failed before a token: no hedge is due any more.
            race.cancel_scope.cancel()

    async def aclose(self) -> None:
        """Close every producer's upstream response (each shielded)."""
        for producer in self.producers:
            await producer.aclose()
