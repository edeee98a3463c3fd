"""Per-stream figures and their aggregate (no I/O).

A :class:`StreamStats` is filled in by one relay as its stream runs; the
relay updates plain attributes per *batch*, never per token, and computes
derived figures (time to first token, tokens/s) once, when the stream ends.
:class:`GatewayMetrics` folds finished streams into totals and keeps the
live count; ``GET /metrics/backpressure`` serves :meth:`GatewayMetrics.snapshot`.

How a stream ended and what its hedge did are enums (:class:`Outcome`,
:class:`HedgeState`), never strings parsed back; they render to the wire
strings of the figures comment and the log line (``"done"``,
``"error:<code>"``, ``"client_disconnect"``; ``"won"``...) only in
:meth:`StreamStats.figures` and the aggregate's counters.
"""

from __future__ import annotations

import enum
import json
from collections import Counter
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import trio

if TYPE_CHECKING:
    from .prometheus import PrometheusMetrics
    from .tracing import RequestTrace

#: ``json.dumps(..., separators=...)`` builds a new encoder per call (about half its ~11 us here)
_COMPACT_JSON = json.JSONEncoder(separators=(",", ":"))


class Outcome(enum.Enum):
    """How a stream (or a non-streamed request) ended; ``ERROR`` comes with :attr:`StreamStats.error_code`."""

    RUNNING = "running"
    DONE = "done"
    CLIENT_DISCONNECT = "client_disconnect"
    ERROR = "error"


class HedgeState(enum.Enum):
    """What the stream's hedge did: ``WON`` (the hedge served the stream), ``LOST`` (the first request did)."""

    NONE = "none"
    STARTED = "started"
    WON = "won"
    LOST = "lost"
    #: the hedge could not open, or neither request produced a token
    FAILED = "failed"


@dataclass(slots=True)
class StreamStats:
    request_id: str
    model: str
    policy: str
    stream: bool = True
    #: the client API (``chat``, ``completions``, ``responses``, ``messages``...): a label everywhere
    api: str = "chat"
    started_at: float = field(default_factory=trio.current_time)
    first_token_at: float | None = None
    ended_at: float | None = None
    status: int = 200
    outcome: Outcome = Outcome.RUNNING
    #: the client-visible error's code when :attr:`outcome` is ``ERROR``
    error_code: str | None = None
    upstream_attempts: int = 0
    chunks: int = 0
    tokens: int = 0
    usage_completion_tokens: int | None = None
    #: the upstream's count of the request's input tokens, when it reported one
    usage_input_tokens: int | None = None
    batches: int = 0
    peak_queue: int = 0
    #: the most bytes the stream's relay held at once (its queue and the write in flight)
    peak_bytes: int = 0
    blocked_seconds: float = 0.0
    dropped: int = 0
    coalesced: int = 0
    pings: int = 0
    #: the deployment that served the stream (the hedge's, when it won)
    deployment: str | None = None
    hedge: HedgeState = HedgeState.NONE
    #: the stream's producer ran (its upstream request opened)
    streamed: bool = False
    #: the request's span when tracing is on (told of rare moments only; never per token)
    trace: RequestTrace | None = None

    def end_with_error(self, code: str | None) -> None:
        """The stream ended with the client-visible error ``code``."""
        self.outcome = Outcome.ERROR
        self.error_code = code

    @property
    def outcome_label(self) -> str:
        """The outcome as the figures and the log line spell it: ``done``, ``error:<code>``, ``client_disconnect``."""
        if self.outcome is Outcome.ERROR:
            return f"error:{self.error_code}"
        return self.outcome.value

    @property
    def ttft_ms(self) -> float | None:
        if self.first_token_at is None:
            return None
        return (self.first_token_at - self.started_at) * 1000.0

    @property
    def total_ms(self) -> float:
        end = self.ended_at if self.ended_at is not None else trio.current_time()
        return (end - self.started_at) * 1000.0

    @property
    def token_count(self) -> int:
        """Usage's completion tokens when the upstream reported them, else content deltas."""
        return self.usage_completion_tokens if self.usage_completion_tokens is not None else self.tokens

    @property
    def tokens_per_second(self) -> float | None:
        if self.first_token_at is None or self.ended_at is None:
            return None
        span = self.ended_at - self.first_token_at
        return self.token_count / span if span > 0 else None

    def figures(self) -> dict[str, Any]:
        ttft = self.ttft_ms
        tps = self.tokens_per_second
        return {
            "request_id": self.request_id,
            "api": self.api,
            "model": self.model,
            "stream": self.stream,
            "status": self.status,
            "outcome": self.outcome_label,
            "policy": self.policy,
            "attempts": self.upstream_attempts,
            "ttft_ms": None if ttft is None else round(ttft, 3),
            "total_ms": round(self.total_ms, 3),
            "chunks": self.chunks,
            "tokens": self.token_count,
            "input_tokens": self.usage_input_tokens,
            "tokens_per_s": None if tps is None else round(tps, 1),
            "peak_queue": self.peak_queue,
            "peak_bytes": self.peak_bytes,
            "blocked_ms": round(self.blocked_seconds * 1000.0, 3),
            "dropped": self.dropped,
            "coalesced": self.coalesced,
            "deployment": self.deployment,
            "hedge": self.hedge.value,
        }

    def comment_text(self) -> str:
        """One-line JSON for the ``: sluice {...}`` comment before the stream's last event."""
        return "sluice " + _COMPACT_JSON.encode(self.figures())


class GatewayMetrics:
    """Aggregate figures for one worker."""

    def __init__(self, prometheus: PrometheusMetrics | None = None) -> None:
        self.prometheus = prometheus
        self.active_streams = 0
        self.requests = 0
        self.outcomes: Counter[str] = Counter()
        self.by_policy: dict[str, Counter[str]] = {}
        self.totals: Counter[str] = Counter()
        self.blocked_seconds = 0.0
        self.peak_queue_max = 0
        self._ttft_ms: list[float] = []
        self.hedges: Counter[str] = Counter()

    def stream_started(self) -> None:
        self.active_streams += 1
        self.requests += 1
        if self.prometheus is not None:
            self.prometheus.streams_active.inc()

    def stream_finished(self, stats: StreamStats) -> None:
        self.active_streams -= 1
        if self.prometheus is not None:
            self.prometheus.streams_active.dec()
            self.prometheus.stream_finished(stats)
        self.outcomes[stats.outcome_label] += 1
        if stats.hedge is not HedgeState.NONE:
            self.hedges[stats.hedge.value] += 1
        policy = self.by_policy.setdefault(stats.policy, Counter())
        policy["streams"] += 1
        policy["dropped"] += stats.dropped
        policy["coalesced"] += stats.coalesced
        self.totals["chunks"] += stats.chunks
        self.totals["tokens"] += stats.token_count
        self.totals["dropped"] += stats.dropped
        self.totals["coalesced"] += stats.coalesced
        self.totals["pings"] += stats.pings
        self.blocked_seconds += stats.blocked_seconds
        if stats.peak_queue > self.peak_queue_max:
            self.peak_queue_max = stats.peak_queue
        ttft = stats.ttft_ms
        if ttft is not None:
            self._ttft_ms.append(ttft)
            if len(self._ttft_ms) > 4096:  # a bounded window for the percentiles
                del self._ttft_ms[:2048]

    def snapshot(self) -> dict[str, Any]:
        ttfts = sorted(self._ttft_ms)

        def pct(q: float) -> float | None:
            if not ttfts:
                return None
            return round(ttfts[min(len(ttfts) - 1, int(q * len(ttfts)))], 3)

        return {
            "active_streams": self.active_streams,
            "requests": self.requests,
            "outcomes": dict(self.outcomes),
            "chunks": self.totals["chunks"],
            "tokens": self.totals["tokens"],
            "dropped": self.totals["dropped"],
            "coalesced": self.totals["coalesced"],
            "pings": self.totals["pings"],
            "blocked_ms": round(self.blocked_seconds * 1000.0, 3),
            "peak_queue_max": self.peak_queue_max,
            "ttft_ms": {"p50": pct(0.5), "p99": pct(0.99), "window": len(ttfts)},
            "by_policy": {name: dict(counts) for name, counts in self.by_policy.items()},
            "hedges": dict(self.hedges),
        }
