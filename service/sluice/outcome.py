"""How a stream ends: its last bytes, and the figures it is accounted with (no sockets).

Invariants:

* A stream's last bytes are one ``: sluice {...}`` figures comment, then
  exactly one terminal event: the upstream's own error event (relayed as it
  came, scrubbed), the gateway's error in the stream's API's words, or the
  API's clean end. :func:`last_bytes` chooses it and sets the outcome.
* Whatever is still running when the stream is released was cut by the
  client: :func:`settle` records that, the stream's peaks, and the one log
  line, once (the relay calls it from its idempotent ``release``). The
  request's trace (when tracing is on) hears of the error event or the
  disconnect here; its span ends with the request (``app._release``).
* The stream's counts come from the framer of the request that served it,
  copied once per stream end (:func:`account`), never per token.
"""

from __future__ import annotations

import logging

import trio

from .budget import StreamBudget
from .errors import SluiceError
from .metrics import GatewayMetrics, Outcome, StreamStats
from .redaction import Scrubber
from .wire.grammar import StreamFramer
from .wire.sse import comment_event

log = logging.getLogger("sluice.stream")


def account(stats: StreamStats, framer: StreamFramer) -> None:
    """Copy the serving framer's counts (events, content deltas, usage) into the figures."""
    stats.chunks = framer.events
    stats.tokens = framer.content_deltas
    usage = framer.usage
    if usage is not None:
        if usage.output_tokens is not None:
            stats.usage_completion_tokens = usage.output_tokens
        if usage.input_tokens is not None:
            stats.usage_input_tokens = usage.input_tokens


def record_peaks(stats: StreamStats, receive: trio.MemoryReceiveChannel[bytes], budget: StreamBudget) -> None:
    """The deepest the channel got, in batches, and the most bytes the stream held."""
    stats.peak_queue = receive.statistics().peak_buffer_used
    stats.peak_bytes = budget.peak


def last_bytes(
    stats: StreamStats,
    framer: StreamFramer,
    *,
    upstream_error_event: bytes | None,
    error: SluiceError | None,
    scrubber: Scrubber,
) -> bytes:
    """The figures comment and the one terminal event; sets how the stream ended."""
    if upstream_error_event is not None:
        stats.end_with_error("upstream_error_event")
        terminal = upstream_error_event
        if stats.trace is not None:
            stats.trace.error_event("upstream_error_event")
    elif error is not None:
        stats.end_with_error(error.code)
        terminal = framer.error_event(error)
        if stats.trace is not None:
            stats.trace.error_event(error.code or "error")
    else:
        stats.outcome = Outcome.DONE
        terminal = framer.terminal
    return comment_event(stats.comment_text()) + scrubber.scrub(terminal)


def settle(stats: StreamStats, metrics: GatewayMetrics) -> None:
    """The stream is over: a stream still running was cut by its client; count it and log its line."""
    stats.ended_at = trio.current_time()
    if stats.outcome is Outcome.RUNNING:
        stats.outcome = Outcome.CLIENT_DISCONNECT
        if stats.trace is not None:
            stats.trace.client_disconnected()
    metrics.stream_finished(stats)
    if log.isEnabledFor(logging.INFO):  # the figures dict is built only for a line that is written
        log.info({"event": "stream", **stats.figures()})
