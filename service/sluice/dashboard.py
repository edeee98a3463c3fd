"""The live view: ``GET /dashboard`` (one self-contained page) and ``GET /dashboard/events`` (its SSE feed).

The feed sends one JSON snapshot per second (:data:`FEED_INTERVAL`): this
worker's streams in flight, its deployments' health and cooldowns, and the
last minute's rates. The page renders each snapshot as it arrives.

Invariants:

* Nothing here runs per token or per request: a snapshot reads the state the
  relays and the router keep anyway (:func:`snapshot`), once per second per
  viewer, with rows for the oldest :data:`MAX_ROWS` streams only (the rest
  are counted); the rates come from a ring of per-second totals
  (:class:`RateWindow`) filled by one ticker task per worker.
* The feed is not a relay: it is not in ``GatewayState.relays``, so a drain
  never waits for it; it ends by itself within a tick once the gateway drains,
  and at once (Quart's send loop is cancelled) when the viewer leaves.
* The page loads nothing from anywhere else: inline CSS and JS, no build step.
* Access: open when the gateway has no keys and no ``admin_api_key``;
  otherwise only with the admin key (:func:`presented_admin_key`): as
  ``Authorization: Bearer`` (scripts), or the ``sluice_admin`` cookie (the
  browser: ``GET /dashboard?key=K`` sets it, HttpOnly, SameSite=Strict,
  path ``/dashboard``, and redirects to ``/dashboard`` so the key leaves the
  address bar; EventSource cannot send headers, but it sends the cookie).
  Gateway keys, even valid ones, do not open it. With keys configured and no
  admin key set, the dashboard is closed.
* Figures are per worker: with ``workers > 1`` each request (and each
  viewer's feed) lands on one worker, which shows its own streams.
"""

from __future__ import annotations

import heapq
import hmac
import json
from collections import deque
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import trio
from quart import Blueprint, Response, current_app, redirect, request

from . import errors
from .routes import SSE_HEADERS

if TYPE_CHECKING:
    from .app import GatewayState
    from .metrics import GatewayMetrics

dashboard = Blueprint("dashboard", __name__)

#: seconds between two snapshots of the feed (and two samples of the rates)
FEED_INTERVAL = 1.0
#: streams listed in a snapshot (the oldest); the rest are counted
MAX_ROWS = 100
#: the window of the rates, seconds
RATE_WINDOW = 60.0
ADMIN_COOKIE = "sluice_admin"
_RATES_EXTENSION = "sluice.dashboard.rates"


# --- the rates (sans-IO) ----------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Totals:
    """Monotonic counters of one worker at one instant."""

    requests: int
    tokens: int
    errors: int
    disconnects: int


def totals_of(metrics: GatewayMetrics, live_tokens: int) -> Totals:
    """The counters now: finished streams' figures plus the tokens of streams still running."""
    outcomes = metrics.outcomes
    return Totals(
        requests=metrics.requests,
        tokens=metrics.totals["tokens"] + live_tokens,
        errors=sum(count for outcome, count in outcomes.items() if outcome.startswith("error:")),
        disconnects=outcomes["client_disconnect"],
    )


class RateWindow:
    """A ring of ``(time, Totals)`` samples covering the last ``window`` seconds; rates are differences.

    The oldest sample kept is the newest one at least ``window`` s old, so
    the rates cover a full window once the worker has run that long (and
    the time since the first sample before: then the "per minute" counts
    are what happened so far, not an extrapolation).
    """

    def __init__(self, window: float = RATE_WINDOW) -> None:
        self.window = window
        self._samples: deque[tuple[float, Totals]] = deque()

    def record(self, now: float, totals: Totals) -> None:
        samples = self._samples
        samples.append((now, totals))
        while len(samples) > 2 and samples[1][0] <= now - self.window:
            samples.popleft()

    def rates(self, now: float, current: Totals) -> dict[str, float]:
        """Requests, errors and disconnects in the window (a count, not extrapolated), and tokens per second over it."""
        if not self._samples:
            return {"window_s": 0.0, "requests_per_min": 0, "tokens_per_s": 0.0, "errors_per_min": 0, "disconnects_per_min": 0}
        then, old = self._samples[0]
        span = now - then

        def grown(new: int, before: int) -> int:
            # A stream's final count (the upstream's usage) may be below the deltas counted live.
            return max(0, new - before)

        return {
            "window_s": round(min(span, self.window), 1),
            "requests_per_min": grown(current.requests, old.requests),
            "tokens_per_s": round(grown(current.tokens, old.tokens) / span, 1) if span > 0 else 0.0,
            "errors_per_min": grown(current.errors, old.errors),
            "disconnects_per_min": grown(current.disconnects, old.disconnects),
        }


# --- the snapshot ---------------------------------------------------------------------------


def _live_tokens(state: GatewayState) -> int:
    return sum(relay.tokens_so_far for relay in state.relays)


def snapshot(state: GatewayState, rates: RateWindow, now: float) -> dict[str, Any]:
    """What the page shows, from in-memory state only: the oldest :data:`MAX_ROWS` streams in flight and a count of the rest."""
    streams = []
    # The rows are built for the shown streams only: with a thousand in flight a
    # full snapshot cost ~10 ms of the loop every second (and 200 KB per viewer).
    oldest = heapq.nsmallest(MAX_ROWS, state.relays, key=lambda relay: relay.stats.started_at)
    for relay in oldest:
        stats = relay.stats
        ttft = stats.ttft_ms
        age = now - stats.started_at
        streaming_for = now - stats.first_token_at if stats.first_token_at is not None else 0.0
        tokens = relay.tokens_so_far
        streams.append(
            {
                "request_id": stats.request_id,
                "api": stats.api,
                "model": stats.model,
                "deployment": stats.deployment or relay.first_deployment or None,
                "policy": stats.policy,
                "age_s": round(age, 1),
                "ttft_ms": None if ttft is None else round(ttft, 1),
                "tokens": tokens,
                "tokens_per_s": round(tokens / streaming_for, 1) if streaming_for > 0 else None,
                "queue_depth": relay.queue_depth,
                "bytes_held": relay.budget.held,
            }
        )
    deployments = []
    if state.router is not None:
        for deployment in state.router.deployments:
            cooling = deployment.cooling(now)
            deployments.append(
                {
                    "name": deployment.name,
                    "active": deployment.active,
                    "consecutive_failures": deployment.consecutive_failures,
                    "cooling": cooling,
                    "cooldown_left_s": round(deployment.cooldown_until - now, 1) if cooling else 0.0,
                }
            )
    memory = state.memory
    return {
        "draining": state.draining,
        "active_streams": state.metrics.active_streams,
        "streams": streams,
        "streams_not_shown": len(state.relays) - len(streams),
        "deployments": deployments,
        "rates": rates.rates(now, totals_of(state.metrics, _live_tokens(state))),
        "memory": {"used": memory.used, "limit": memory.limit},
    }


# --- access ---------------------------------------------------------------------------------


def _state() -> GatewayState:
    return current_app.extensions["sluice"]  # type: ignore[no-any-return]


def presented_admin_key() -> str | None:
    """The admin key the request carries: ``Authorization: Bearer``, else the ``sluice_admin`` cookie."""
    scheme, _, presented = request.headers.get("authorization", "").partition(" ")
    if scheme.lower() == "bearer" and presented.strip():
        return presented.strip()
    return request.cookies.get(ADMIN_COOKIE)


def _is_admin_key(state: GatewayState, presented: str | None) -> bool:
    admin = state.settings.admin_api_key
    if admin is None or not presented:
        return False
    return hmac.compare_digest(presented.encode(), admin.get_secret_value().encode())


def _closed(state: GatewayState) -> bool:
    return state.settings.admin_api_key is not None or state.keys.enabled


def _require_admin(state: GatewayState, presented: str | None) -> None:
    if not _closed(state) or _is_admin_key(state, presented):
        return
    if state.settings.admin_api_key is None:
        raise errors.Unauthorized(
            "The dashboard needs an admin key when gateway keys are configured: set admin_api_key (SLUICE_ADMIN_API_KEY)."
        )
    raise errors.Unauthorized(
        "Missing or invalid admin key: open /dashboard?key=<admin key> in a browser, or send 'Authorization: Bearer <admin key>'.",
        headers={"www-authenticate": "Bearer"},
    )


# --- routes ---------------------------------------------------------------------------------


@dashboard.get("/dashboard")
async def page() -> Response:
    state = _state()
    from_query = request.args.get("key")
    if from_query is not None:
        _require_admin(state, from_query)
        # The key goes into an HttpOnly cookie and out of the address bar (and of the history).
        response: Response = redirect("/dashboard", code=303)  # type: ignore[assignment]
        response.set_cookie(ADMIN_COOKIE, from_query, path="/dashboard", httponly=True, samesite="Strict")
        return response
    _require_admin(state, presented_admin_key())
    return Response(PAGE, status=200, content_type="text/html; charset=utf-8", headers=_PAGE_HEADERS)


@dashboard.get("/dashboard/events")
async def events() -> Response:
    state = _state()
    _require_admin(state, presented_admin_key())
    if state.draining:
        raise errors.ShuttingDown("The gateway is shutting down.", headers={"retry-after": "1"})
    response = Response(_feed(state, current_app.extensions[_RATES_EXTENSION]), status=200, headers=SSE_HEADERS)
    response.timeout = None  # a feed runs as long as its viewer stays
    return response


async def _feed(state: GatewayState, rates: RateWindow) -> AsyncIterator[bytes]:
    """One ``data:`` snapshot per tick until the gateway drains; the viewer leaving cancels it in the send loop."""
    # No nursery or cancel scope around a yield (PEP 789): only a sleep between them.
    yield b"retry: 2000\n\n"
    while True:
        draining = state.draining  # read once: the last snapshot says "draining" before the end
        body = snapshot(state, rates, trio.current_time())
        yield b"data: " + json.dumps(body, separators=(",", ":")).encode() + b"\n\n"
        if draining:
            yield b"event: end\ndata: {}\n\n"  # the page stops reconnecting
            return
        await trio.sleep(FEED_INTERVAL)


@dashboard.before_app_serving
async def start_sampling() -> None:
    app = current_app._get_current_object()  # type: ignore[attr-defined]
    state: GatewayState = app.extensions["sluice"]
    rates = RateWindow()
    app.extensions[_RATES_EXTENSION] = rates
    scope = trio.CancelScope()
    app.extensions["sluice.dashboard.sampler"] = scope
    app.nursery.start_soon(_sample, state, rates, scope)


@dashboard.after_app_serving
async def stop_sampling() -> None:
    current_app.extensions["sluice.dashboard.sampler"].cancel()


async def _sample(state: GatewayState, rates: RateWindow, scope: trio.CancelScope) -> None:
    """The ticker behind the rates: one sample of the totals per :data:`FEED_INTERVAL`, until the app stops."""
    with scope:
        while True:
            rates.record(trio.current_time(), totals_of(state.metrics, _live_tokens(state)))
            await trio.sleep(FEED_INTERVAL)


_PAGE_HEADERS = {
    "cache-control": "no-store",
    # Belt and braces for "no external assets": the browser itself refuses any.
    "content-security-policy": "default-src 'none'; script-src 'unsafe-inline'; style-src 'unsafe-inline'; connect-src 'self'",
    "x-frame-options": "DENY",
}

PAGE = """<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>Sluice: live</title>
<style>
  :root { --fg: #1d2330; --muted: #6b7385; --line: #e3e6ec; --bg: #f7f8fa; --ok: #1f8a4c; --warn: #b7791f; --bad: #c53030; }
  * { box-sizing: border-box; }
  body { margin: 0; font: 14px/1.4 system-ui, -apple-system, "Segoe UI", sans-serif; color: var(--fg); background: var(--bg); }
  header { display: flex; align-items: baseline; gap: 16px; padding: 14px 24px; background: #fff; border-bottom: 1px solid var(--line); }
  header h1 { font-size: 18px; margin: 0; }
  #status { font-size: 13px; color: var(--muted); }
  #status.live::before { content: "\\25CF\\00a0"; color: var(--ok); }
  #status.down::before { content: "\\25CF\\00a0"; color: var(--bad); }
  main { padding: 16px 24px; display: grid; gap: 16px; }
  section { background: #fff; border: 1px solid var(--line); border-radius: 6px; padding: 12px 16px; }
  h2 { font-size: 13px; text-transform: uppercase; letter-spacing: .04em; color: var(--muted); margin: 0 0 8px; }
  .tiles { display: flex; gap: 12px; flex-wrap: wrap; }
  .tile { min-width: 150px; padding: 8px 12px; border: 1px solid var(--line); border-radius: 6px; }
  .tile b { display: block; font-size: 22px; font-variant-numeric: tabular-nums; }
  .tile span { color: var(--muted); font-size: 12px; }
  table { width: 100%; border-collapse: collapse; font-variant-numeric: tabular-nums; }
  th, td { text-align: left; padding: 5px 8px; border-bottom: 1px solid var(--line); white-space: nowrap; }
  th { font-size: 12px; color: var(--muted); font-weight: 600; }
  td.num, th.num { text-align: right; }
  td.id { font-family: ui-monospace, monospace; font-size: 12px; color: var(--muted); }
  .empty td { color: var(--muted); font-style: italic; }
  .pill { display: inline-block; padding: 0 8px; border-radius: 10px; font-size: 12px; color: #fff; background: var(--ok); }
  .pill.cooling { background: var(--bad); }
  .pill.failing { background: var(--warn); }
</style>
</head>
<body>
<header><h1>Sluice</h1><span id="status" class="down">connecting&hellip;</span></header>
<main>
  <section>
    <h2>Last minute</h2>
    <div class="tiles">
      <div class="tile"><b id="active">-</b><span>streams in flight</span></div>
      <div class="tile"><b id="rpm">-</b><span>requests / min</span></div>
      <div class="tile"><b id="tps">-</b><span>tokens / s</span></div>
      <div class="tile"><b id="epm">-</b><span>errors / min</span></div>
      <div class="tile"><b id="dpm">-</b><span>disconnects / min</span></div>
      <div class="tile"><b id="mem">-</b><span>relay buffers held</span></div>
    </div>
  </section>
  <section>
    <h2>Streams in flight</h2>
    <table>
      <thead><tr><th>request</th><th>api</th><th>model</th><th>deployment</th><th class="num">age s</th>
        <th class="num">TTFT ms</th><th class="num">tokens</th><th class="num">tokens/s</th><th class="num">queue</th>
        <th class="num">bytes held</th><th>policy</th></tr></thead>
      <tbody id="streams"></tbody>
    </table>
  </section>
  <section>
    <h2>Deployments</h2>
    <table>
      <thead><tr><th>deployment</th><th>health</th><th class="num">active</th><th class="num">failures in a row</th>
        <th class="num">cooldown left s</th></tr></thead>
      <tbody id="deployments"></tbody>
    </table>
  </section>
</main>
<script>
"use strict";
const $ = (id) => document.getElementById(id);
const show = (v) => (v === null || v === undefined ? "-" : String(v));
function cell(row, text, cls) {
  const td = row.insertCell();
  td.textContent = show(text);
  if (cls) td.className = cls;
  return td;
}
function fill(body, items, render, emptyText, columns) {
  body.replaceChildren();
  if (!items.length) {
    const row = body.insertRow();
    row.className = "empty";
    const td = cell(row, emptyText);
    td.colSpan = columns;
    return;
  }
  for (const item of items) render(body.insertRow(), item);
}
function bytes(n) {
  return n < 1024 ? n + " B" : n < 1048576 ? (n / 1024).toFixed(1) + " KiB" : (n / 1048576).toFixed(1) + " MiB";
}
function render(s) {
  $("active").textContent = s.active_streams;
  $("rpm").textContent = s.rates.requests_per_min;
  $("tps").textContent = s.rates.tokens_per_s;
  $("epm").textContent = s.rates.errors_per_min;
  $("dpm").textContent = s.rates.disconnects_per_min;
  $("mem").textContent = bytes(s.memory.used);
  fill($("streams"), s.streams, (row, t) => {
    row.className = "stream";
    row.dataset.requestId = t.request_id;
    cell(row, t.request_id, "id");
    cell(row, t.api);
    cell(row, t.model);
    cell(row, t.deployment);
    cell(row, t.age_s.toFixed(1), "num");
    cell(row, t.ttft_ms, "num");
    cell(row, t.tokens, "num");
    cell(row, t.tokens_per_s, "num");
    cell(row, t.queue_depth, "num");
    cell(row, t.bytes_held, "num");
    cell(row, t.policy);
  }, "no streams in flight", 11);
  if (s.streams_not_shown > 0) {
    const more = $("streams").insertRow();
    more.className = "empty";
    cell(more, "and " + s.streams_not_shown + " younger streams not listed").colSpan = 11;
  }
  fill($("deployments"), s.deployments, (row, d) => {
    row.className = "deployment";
    row.dataset.deployment = d.name;
    cell(row, d.name);
    const pill = document.createElement("span");
    pill.className = "pill" + (d.cooling ? " cooling" : d.consecutive_failures ? " failing" : "");
    pill.textContent = d.cooling ? "cooling down" : d.consecutive_failures ? "failing" : "healthy";
    row.insertCell().appendChild(pill);
    cell(row, d.active, "num");
    cell(row, d.consecutive_failures, "num");
    cell(row, d.cooling ? d.cooldown_left_s : "-", "num");
  }, "no deployments yet", 5);
  $("status").textContent = (s.draining ? "draining" : "live") + ", " + new Date().toLocaleTimeString();
}
const feed = new EventSource("dashboard/events");
feed.onopen = () => { $("status").className = "live"; };
feed.onmessage = (event) => render(JSON.parse(event.data));
feed.addEventListener("end", () => { feed.close(); $("status").className = "down"; $("status").textContent = "the gateway is shutting down"; });
feed.onerror = () => { $("status").className = "down"; $("status").textContent = "disconnected, retrying\\u2026"; };
</script>
</body>
</html>
"""
