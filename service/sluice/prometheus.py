"""``GET /metrics``: the gateway's figures in Prometheus text format (prometheus_client).

Every update happens once per request or per stream, from the figures the
relay already keeps (:class:`~sluice.metrics.StreamStats`), never per token.

With several workers (``sluice serve --workers N``) each worker process
writes its values to ``PROMETHEUS_MULTIPROC_DIR`` and any worker's
``/metrics`` aggregates them all (prometheus_client's multiprocess mode):
counters and histograms are summed, ``sluice_streams_active`` is the live
sum and ``sluice_channel_peak_depth`` the maximum.

Invariants:

* Every label has a bounded set of values. Labels a request chooses (the
  ``model`` a client names, the ``status`` and upstream error ``code`` an
  upstream chooses) go through a :class:`LabelValues`: configured names
  always pass, any other value takes one of ``max_label_values`` slots, first
  come, and the rest are counted as ``other``. The other labels (deployment,
  hedge outcome, limit) take values from the configuration or the gateway's
  own code. So the text ``/metrics`` renders is bounded whatever clients send.
* Rendering never runs on the event loop: :meth:`PrometheusMetrics.render_off_loop`
  renders in a worker thread, one scrape at a time (prometheus_client's
  values and label maps are guarded by its own locks).
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from typing import Any

import trio
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, disable_created_metrics, generate_latest
from prometheus_client.multiprocess import MultiProcessCollector

from .metrics import HedgeState, Outcome, StreamStats

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

# One ``*_created`` timestamp series per counter and label set doubles the
# output and is rarely scraped for; Prometheus does not need them.
disable_created_metrics()

_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
_DURATION_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0)
_MID_STREAM_UPSTREAM_FAILURES = frozenset({"stream_interrupted", "upstream_timeout", "upstream_error_event"})
#: the value a label takes once its budget of distinct values is spent
OTHER = "other"


class LabelValues:
    """The values one label may take: ``fixed`` ones, plus the first ``budget`` others; the rest are ``other``.

    A set lookup per call once a value is known (called once per request, never per token).
    """

    __slots__ = ("_known", "_budget")

    def __init__(self, budget: int, fixed: Iterable[str] = ()) -> None:
        self._known = set(fixed)
        self._budget = budget

    def __call__(self, value: str) -> str:
        if value in self._known:
            return value
        if self._budget <= 0:
            return OTHER
        self._budget -= 1
        self._known.add(value)
        return value


class LabelledChildren:
    """A labelled metric's children by label values, each looked up through ``labels()`` once.

    prometheus_client's ``labels()`` validates, converts and takes a lock on
    every call (~3 us here); a stream ends with four of them. The values are
    bounded by :class:`LabelValues` (and the fixed API names), so is this.
    """

    __slots__ = ("_metric", "_children")

    def __init__(self, metric: Any) -> None:
        self._metric = metric
        self._children: dict[tuple[str, ...], Any] = {}

    def __call__(self, *values: str) -> Any:
        child = self._children.get(values)
        if child is None:
            child = self._children[values] = self._metric.labels(*values)
        return child


class PrometheusMetrics:
    """The gateway's Prometheus series, in a registry of its own (one per app).

    ``max_label_values`` bounds each request-chosen label; ``models`` are the
    configured public model names, always shown as themselves.
    """

    def __init__(self, *, max_label_values: int = 100, models: Iterable[str] = ()) -> None:
        self.model_label = LabelValues(max_label_values, (name for name in models if name != "*"))
        self.status_label = LabelValues(max_label_values)
        self.code_label = LabelValues(max_label_values)
        self._render_lock = trio.Lock()
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter(
            "sluice_requests", "Requests by client API, public model and status.", ["api", "model", "status"], registry=r
        )
        self.streams_active = Gauge(
            "sluice_streams_active", "Requests in flight.", registry=r, multiprocess_mode="livesum"
        )
        self.ttft = Histogram(
            "sluice_time_to_first_token_seconds", "From request to first token.", ["api"],
            buckets=_LATENCY_BUCKETS, registry=r,
        )
        self.duration = Histogram(
            "sluice_stream_duration_seconds", "From request to last byte.", ["api"],
            buckets=_DURATION_BUCKETS, registry=r,
        )
        self.tokens = Counter("sluice_tokens", "Output tokens relayed.", ["api", "model"], registry=r)
        self.retries = Counter("sluice_upstream_retries", "Upstream attempts beyond the first.", registry=r)
        self.upstream_errors = Counter(
            "sluice_upstream_errors", "Upstream failures by error code.", ["code"], registry=r
        )
        self.fallbacks = Counter(
            "sluice_fallbacks", "Requests moved to another deployment.", ["deployment"], registry=r
        )
        self.cooldowns = Counter(
            "sluice_deployment_cooldowns", "Deployments put in cooldown.", ["deployment"], registry=r
        )
        self.disconnects = Counter("sluice_client_disconnects", "Streams the client left early.", registry=r)
        self.dropped = Counter("sluice_backpressure_dropped", "Events dropped by drop policies.", registry=r)
        self.coalesced = Counter("sluice_backpressure_coalesced", "Events merged by coalesce.", registry=r)
        self.hedges = Counter("sluice_hedges", "Hedged requests by outcome.", ["outcome"], registry=r)
        # ``key`` is a configured key's name (never the secret), so the label is bounded by the config.
        self.rate_limited = Counter(
            "sluice_rate_limited", "Requests refused by a key's limit, by limit and key name.", ["limit", "key"], registry=r
        )
        self.deployment_failures = Counter(
            "sluice_deployment_failures",
            "Requests a deployment gave up on (after its retries), by deployment and error code.",
            ["deployment", "code"],
            registry=r,
        )
        self.blocked = Counter(
            "sluice_producer_blocked_seconds",
            "Time producers waited on a full stream buffer (slow clients), summed over finished streams.",
            registry=r,
        )
        self.max_streams = Gauge(
            "sluice_max_streams", "The streams one gateway admits at once (max_streams x workers).", registry=r,
            multiprocess_mode="livesum",
        )
        self.channel_peak = Gauge(
            "sluice_channel_peak_depth", "Deepest any stream's channel got.", registry=r, multiprocess_mode="max"
        )
        self.relay_buffered = Gauge(
            "sluice_relay_buffered_bytes",
            "Bytes held in streams' relay buffers (set when /metrics is scraped).",
            registry=r,
            multiprocess_mode="livesum",
        )
        self.memory_budget = Gauge(
            "sluice_memory_budget_bytes", "The relay buffers' memory budget.", registry=r, multiprocess_mode="livesum"
        )
        self.memory_budget_refusals = Counter(
            "sluice_memory_budget_refusals", "Streams refused (503) because the memory budget was full.", registry=r
        )
        self._peak = 0
        self._requests = LabelledChildren(self.requests)
        self._ttft = LabelledChildren(self.ttft)
        self._duration = LabelledChildren(self.duration)
        self._tokens = LabelledChildren(self.tokens)

    def request_refused(self, model: str, status: int, api: str = "chat") -> None:
        """A request that ended before it reached the upstream (validation, auth, limits)."""
        self._requests(api, self.model_label(model), self.status_label(str(status))).inc()

    def upstream_failed(self, code: str) -> None:
        """One failed upstream attempt (``http_503``, ``upstream_unavailable``, ...)."""
        self.upstream_errors.labels(self.code_label(code)).inc()

    def deployment_failed(self, deployment: str, code: str) -> None:
        """A deployment gave up on a request; ``deployment`` is a configured name, ``code`` bounded as ``code``."""
        self.deployment_failures.labels(deployment, self.code_label(code)).inc()

    def stream_finished(self, stats: StreamStats) -> None:
        model = self.model_label(stats.model)
        api = stats.api
        self._requests(api, model, self.status_label(str(stats.status))).inc()
        self._duration(api).observe(stats.total_ms / 1000.0)
        ttft = stats.ttft_ms
        if ttft is not None:
            self._ttft(api).observe(ttft / 1000.0)
        if stats.token_count:
            self._tokens(api, model).inc(stats.token_count)
        if stats.upstream_attempts > 1:
            self.retries.inc(stats.upstream_attempts - 1)
        outcome = stats.outcome
        if outcome is Outcome.CLIENT_DISCONNECT:
            self.disconnects.inc()
        elif outcome is Outcome.ERROR and stats.streamed:
            # Failures before the stream opened are counted per attempt by the upstream client.
            code = stats.error_code
            if code is not None and code in _MID_STREAM_UPSTREAM_FAILURES:
                self.upstream_failed(code)
        if stats.dropped:
            self.dropped.inc(stats.dropped)
        if stats.coalesced:
            self.coalesced.inc(stats.coalesced)
        if stats.blocked_seconds:
            self.blocked.inc(stats.blocked_seconds)
        if stats.hedge is not HedgeState.NONE:
            self.hedges.labels(stats.hedge.value).inc()
        if stats.peak_queue > self._peak:
            self._peak = stats.peak_queue
            self.channel_peak.set(stats.peak_queue)

    async def render_off_loop(self) -> bytes:
        """:meth:`render` in a worker thread; concurrent scrapes wait their turn rather than pile up threads."""
        async with self._render_lock:
            return await trio.to_thread.run_sync(self.render)

    def render(self) -> bytes:
        """The text exposition (blocking: CPU in proportion to the series; call through :meth:`render_off_loop`)."""
        if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
            registry = CollectorRegistry()
            MultiProcessCollector(registry)
            return generate_latest(registry)
        return generate_latest(self.registry)
