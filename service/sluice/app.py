"""The Quart application: the worker's shared state, error handlers, lifespan; the ``/v1`` routes are :mod:`sluice.routes`.

Every request: request id and gateway key (:func:`create_app`'s
``identify``) -> the route (:mod:`sluice.routes`) -> one log line ->
release (:class:`GatewayHTTPConnection`'s ``finally``).

Invariants:

* Every error a client gets is JSON in the route's API shape (OpenAI's, or
  Anthropic's on ``/v1/messages*``) with a 4xx/5xx status; no HTML error
  page, no bare 500 (see :func:`error_response`).
* Every upstream request the route opens is closed, whatever window the
  client leaves in: :class:`GatewayHTTPConnection` releases the request's
  relay after the response, also when the response head was never sent.
* Every admitted request is released exactly once (same ``finally``), so a
  key's concurrent-stream count cannot leak.
* Every response carries ``x-request-id`` (the client's, or a new one).
* No configured secret reaches a client in bytes the gateway relays from an
  upstream: error responses, the final event of a stream, non-streamed
  completions and the upstream's model list go through the full
  :class:`~sluice.redaction.Scrubber` (provider and gateway keys); streamed
  content through one holding only the provider keys (see
  :func:`create_app`).
* A stream is admitted only while the worker's relays hold less than its
  memory budget (:class:`~sluice.budget.MemoryBudget`); otherwise 503
  ``overloaded`` with ``retry-after``, before any upstream request.
"""

from __future__ import annotations

import json
import logging
import os
import uuid
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import trio
from quart import Response, g, request
from quart.helpers import _split_blueprint_path
from quart_cors import cors
from quart_trio import QuartTrio
from quart_trio.wrappers import TrioRequest
from werkzeug.exceptions import HTTPException

from . import errors
from .budget import MemoryBudget
from .config import Settings
from .connection import KeepAliveHTTPConnection
from .dashboard import dashboard
from .logs import redact
from .limits import KeyTable, LimitStore, LocalLimitStore
from .metrics import GatewayMetrics
from .policies import BACKPRESSURE_HEADER
from .prometheus import CONTENT_TYPE as PROMETHEUS_CONTENT_TYPE
from .prometheus import PrometheusMetrics
from .redaction import Scrubber
from .relay import StreamRelay
from .router import Deployment, Router, RouterEvents
from .routes import EXCHANGE_SCOPE_KEY, STREAMING_APIS, Exchange, api, exchange, grammar_for_path
from .simulator import Simulator, SimulatorLimits
from .tracing import Tracing, build_tracing
from .upstream import failure_code

if TYPE_CHECKING:
    from opentelemetry.sdk.trace import TracerProvider

log = logging.getLogger("sluice")

request_log = logging.getLogger("sluice.request")


@dataclass
class GatewayState:
    """Everything the routes share within one worker."""

    settings: Settings
    prometheus: PrometheusMetrics = field(init=False)
    metrics: GatewayMetrics = field(init=False)
    #: bytes held in all streams' relay buffers, against ``settings.memory_budget``
    memory: MemoryBudget = field(init=False)
    router: Router | None = None
    keys: KeyTable = field(init=False)
    limits: LimitStore = field(default_factory=LocalLimitStore)
    simulator: Simulator | None = None
    simulator_scope: trio.CancelScope | None = None
    #: streams in flight, for graceful shutdown
    relays: set[StreamRelay] = field(default_factory=set)
    #: set on SIGTERM/SIGINT: /health answers 503 and new streams are refused
    draining: bool = False
    #: every configured secret: scrubbed from errors, completions, model lists, final events
    scrubber: Scrubber = field(default_factory=Scrubber)
    #: the provider keys only (what an upstream was ever sent): scrubbed from streamed content
    stream_scrubber: Scrubber = field(default_factory=Scrubber)
    #: OpenTelemetry, when an endpoint is configured; ``None`` = off, and free
    tracing: Tracing | None = None

    def __post_init__(self) -> None:
        self.prometheus = PrometheusMetrics(
            max_label_values=self.settings.metrics_max_label_values, models=(m.name for m in self.settings.models)
        )
        self.metrics = GatewayMetrics(self.prometheus)
        self.memory = MemoryBudget(self.settings.memory_budget)
        self.prometheus.memory_budget.set(self.memory.limit)
        self.prometheus.max_streams.set(self.settings.max_streams)
        self.keys = KeyTable(self.settings)

    async def drain(self, timeout: float, cut_short: trio.Event | None = None) -> None:
        """Let in-flight streams finish for ``timeout`` s (or until ``cut_short`` is set), then end the rest with an error event."""
        self.draining = True
        with trio.move_on_after(timeout):
            while self.relays and not (cut_short is not None and cut_short.is_set()):
                await trio.sleep(0.05)
        for relay in list(self.relays):
            relay.shut_down()


class GatewayHTTPConnection(KeepAliveHTTPConnection):
    """The keep-alive-safe connection handler, plus a guarantee: the request's relay is released.

    A client can leave before the response head is sent, or between the head
    and the first body write; then Quart never enters the relay's body, and
    only this ``finally`` is left to close the upstream request it opened.
    """

    async def handle_request(self, nursery: trio.Nursery, request: Any, send: Any) -> None:  # type: ignore[override]
        try:
            await super().handle_request(nursery, request, send)
        finally:
            held: Exchange | None = self.scope.get(EXCHANGE_SCOPE_KEY)  # type: ignore[assignment]
            if held is not None:
                await _release(self.app.extensions["sluice"], held)


async def _release(state: GatewayState, held: Exchange) -> None:
    """Close the request's upstream and give back its key's slot and tokens (idempotent per part)."""
    if held.relay is not None:
        await held.relay.release()
        state.relays.discard(held.relay)
    if held.admitted is not None:
        key, lease = held.admitted
        held.admitted = None
        tokens = held.stats.token_count if held.stats is not None else 0
        with trio.CancelScope(shield=True), trio.move_on_after(2.0):
            await state.limits.release(key, lease, tokens)
    if held.trace is not None:
        held.trace.end(held.stats)


class GatewayRequest(TrioRequest):
    """quart-trio's request, whose ``blueprints`` does not import on every read.

    Quart's property runs ``from ..helpers import _split_blueprint_path`` each
    time it is read (twice a request: before- and after-request hooks):
    ~12 us a read here, against ~2.4 us for the same answer without it.
    """

    @property
    def blueprints(self) -> list[str]:
        blueprint = self.blueprint
        return [] if blueprint is None else _split_blueprint_path(blueprint)


class SluiceApp(QuartTrio):
    asgi_http_class = GatewayHTTPConnection  # type: ignore[assignment]
    request_class = GatewayRequest


def error_response(error: errors.SluiceError, scrubber: Scrubber | None = None) -> Response:
    """The error in the shape of the route's API (Anthropic's on ``/v1/messages*``, OpenAI's elsewhere)."""
    body = grammar_for_path(request.path).error_body(error)
    if scrubber is not None:
        body = scrubber.scrub(body)
    response = Response(body, status=error.status, content_type="application/json")
    for name, value in error.headers.items():
        # Some (retry-after) are copied from the upstream's response: its words too.
        response.headers[name] = scrubber.scrub_text(value) if scrubber is not None else value
    return response


_HTTP_ERRORS: dict[int, type[errors.SluiceError]] = {
    400: errors.InvalidRequest,
    401: errors.Unauthorized,
    404: errors.NotFound,
    405: errors.MethodNotAllowed,
    413: errors.PayloadTooLarge,
}


def create_app(settings: Settings, tracer_provider: TracerProvider | None = None) -> SluiceApp:
    """The gateway app; ``tracer_provider`` replaces the one the settings would build (tests read its spans)."""
    app = SluiceApp("sluice")
    app.config.update(
        MAX_CONTENT_LENGTH=settings.max_body_bytes,
        BODY_TIMEOUT=settings.body_timeout,
        RESPONSE_TIMEOUT=None,  # streams are long; their own deadlines bound them
    )
    state = GatewayState(settings)
    state.tracing = tracing = build_tracing(settings, tracer_provider)
    app.extensions["sluice"] = state
    provider_keys = [
        settings.upstream_api_key.get_secret_value() if settings.upstream_api_key else None,
        *(os.environ.get(d.api_key_env or "") for m in settings.models for d in m.deployments),
    ]
    gateway_keys = [key.secret.decode() for key in state.keys.keys]
    if settings.admin_api_key is not None:
        gateway_keys.append(settings.admin_api_key.get_secret_value())  # a secret like them, never sent upstream
    redact(*provider_keys, *gateway_keys)
    state.scrubber = Scrubber([*provider_keys, *gateway_keys])
    # Streamed content is scanned on every upstream read, so only for what an
    # upstream could echo: the keys it was sent. Gateway keys never go
    # upstream (requests carry the deployment's key, not the client's), and a
    # table of thousands of them would cost a scan each per read.
    state.stream_scrubber = Scrubber(provider_keys)

    @app.before_serving
    async def start_upstream() -> None:
        base_url = settings.upstream_base_url
        if base_url is None and not settings.models:
            state.simulator = Simulator(
                limits=SimulatorLimits(
                    max_tokens=settings.simulator_max_tokens,
                    max_stream_seconds=settings.simulator_max_stream_seconds,
                    max_model_name_length=settings.max_model_name_length,
                )
            )
            port = await app.nursery.start(_serve_simulator, state)
            base_url = f"http://127.0.0.1:{port}/v1"
            log.info("no upstream configured: serving from the embedded simulator at %s", base_url)
        store: Any = None
        if settings.redis_url:
            # Imported only when used: coredis alone adds ~14 MB to every worker's RSS.
            from .redis_state import RedisCooldowns, RedisLimitStore

            store = RedisLimitStore(settings.redis_url)
            await app.nursery.start(store.run)
            state.limits = store
        prometheus = state.prometheus
        shared_cooldowns: Any = None

        def deployment_failed(deployment: Deployment, error: errors.SluiceError) -> None:
            prometheus.deployment_failed(deployment.name, failure_code(error))
            log.warning({"event": "deployment_failed", "deployment": deployment.name, "code": error.code, "status": error.status})

        def cooled_down(deployment: Deployment) -> None:
            prometheus.cooldowns.labels(deployment.name).inc()
            log.warning({"event": "deployment_cooldown", "deployment": deployment.name, "seconds": settings.cooldown_seconds})
            if shared_cooldowns is not None:
                app.nursery.start_soon(shared_cooldowns.publish, deployment)

        state.router = Router(
            settings,
            base_url or "",
            RouterEvents(
                attempt_failed=prometheus.upstream_failed,
                deployment_failed=deployment_failed,
                fell_back=lambda deployment: prometheus.fallbacks.labels(deployment.name).inc(),
                cooled_down=cooled_down,
            ),
        )
        if store is not None:
            shared_cooldowns = RedisCooldowns(store.client, state.router.deployments)
            app.nursery.start_soon(shared_cooldowns.run)

    @app.after_serving
    async def stop_upstream() -> None:
        if state.router is not None:
            await state.router.aclose()
        if state.simulator_scope is not None:
            state.simulator_scope.cancel()
        if tracing is not None:
            await tracing.aclose()  # the last spans, bounded by otel_flush_timeout

    keys = state.keys

    # The streaming API a path is, if any (the request log and refusal metrics name it).
    api_by_path = {entry.path: entry.grammar.name for entry in STREAMING_APIS}

    @app.before_request
    async def identify() -> None:
        """A request id for every request; a gateway key for everything under /v1/ when keys are set."""
        # One context lookup each, not one per attribute: ``request`` and ``g``
        # are proxies that find the current context on every read (~1 us each).
        req = request._get_current_object()  # type: ignore[attr-defined]
        here = g._get_current_object()  # type: ignore[attr-defined]
        headers = req.headers
        path = req.path
        here.request_id = headers.get("x-request-id") or uuid.uuid4().hex
        here.started_at = trio.current_time()
        here.key = None
        here.api = api_by_path.get(path)
        trace = None
        if tracing is not None and path.startswith("/v1/"):
            rule = req.url_rule
            trace = tracing.start(headers, req.method, rule.rule if rule is not None else path)
            exchange().trace = trace
        if not keys.enabled or not path.startswith("/v1/"):
            return
        scheme, _, presented = headers.get("authorization", "").partition(" ")
        key = keys.lookup(presented.strip()) if scheme.lower() == "bearer" else None
        if key is None and "x-api-key" in headers:
            key = keys.lookup(headers["x-api-key"].strip())  # how Anthropic's SDKs send a key
        if key is None:
            raise errors.Unauthorized(
                "Missing or invalid API key: send 'Authorization: Bearer <key>' (or 'x-api-key: <key>').",
                headers={"www-authenticate": "Bearer"},
            )
        here.key = key
        if trace is not None:
            trace.key_name = key.name

    @app.after_request
    async def tag_and_log(response: Response) -> Response:
        req = request._get_current_object()  # type: ignore[attr-defined]
        here = g._get_current_object()  # type: ignore[attr-defined]
        request_id = getattr(here, "request_id", None) or uuid.uuid4().hex
        response.headers["x-request-id"] = request_id
        if state.draining:
            # Hypercorn keeps idle keep-alive connections open while it drains; a
            # proxy that sends its next request on one would reach a gateway that
            # refuses it. Closing after each response sends the proxy elsewhere.
            response.headers["connection"] = "close"
        held: Exchange | None = req.scope.get(EXCHANGE_SCOPE_KEY)
        if held is not None and held.trace is not None:
            held.trace.status_code = response.status_code
        if held is None or held.stats is None:
            # Streams and completions log their own line when they end; this is everything else.
            path = req.path
            if (path.startswith("/v1/") or response.status_code >= 400) and request_log.isEnabledFor(logging.INFO):
                request_log.info(
                    {
                        "event": "request",
                        "request_id": request_id,
                        "method": req.method,
                        "path": path,
                        "status": response.status_code,
                        "key": here.key.name if getattr(here, "key", None) is not None else None,
                        "total_ms": round((trio.current_time() - getattr(here, "started_at", trio.current_time())) * 1000, 3),
                    }
                )
            if getattr(here, "api", None) is not None and response.status_code >= 400:
                state.prometheus.request_refused(getattr(here, "model", "-"), response.status_code, here.api)
        return response

    if settings.cors_origins:
        # CORS is off unless origins are listed; never with credentials, so a
        # listed "*" cannot expose cookie-authenticated responses.
        app = cors(
            app,
            allow_origin=settings.cors_origins,
            allow_headers=["authorization", "content-type", "x-request-id", BACKPRESSURE_HEADER],
            allow_methods=["GET", "POST", "OPTIONS"],
            expose_headers=["x-request-id", "retry-after"],
            allow_credentials=False,
        )

    @app.errorhandler(errors.SluiceError)
    async def on_sluice_error(error: errors.SluiceError) -> Response:
        if tracing is not None:
            held: Exchange | None = request.scope.get(EXCHANGE_SCOPE_KEY)  # type: ignore[assignment]
            if held is not None and held.trace is not None:
                held.trace.error_type = error.code
        # An upstream's error body, or its words in the message, may quote a key.
        return error_response(error, state.scrubber)

    @app.errorhandler(HTTPException)
    async def on_http_error(error: HTTPException) -> Response:
        status = error.code or 500
        kind = _HTTP_ERRORS.get(status)
        if kind is None:
            kind = errors.InvalidRequest if status < 500 else errors.SluiceError
        if status == 404:
            message = f"Unknown request URL: {request.method} {request.path}."
        elif status == 405:
            message = f"Method {request.method} is not allowed for {request.path}."
        elif status == 413:
            message = f"The request body exceeds the limit of {settings.max_body_bytes} bytes."
        else:
            message = error.description or error.name
        mapped = kind(message)
        response = error_response(mapped)
        response.status_code = status
        if status == 405 and error.get_response().headers.get("Allow"):
            response.headers["allow"] = error.get_response().headers["Allow"]
        return response

    @app.errorhandler(Exception)
    async def on_unexpected(error: Exception) -> Response:
        log.exception("unhandled error")
        return error_response(errors.SluiceError("The gateway failed to handle the request."))

    @app.get("/metrics")
    async def prometheus_metrics() -> Response:
        state.prometheus.relay_buffered.set(state.memory.used)
        # Off the loop: a render costs CPU in proportion to the series, and every stream of this worker waits while the loop does.
        body = await state.prometheus.render_off_loop()
        return Response(body, status=200, content_type=PROMETHEUS_CONTENT_TYPE)

    @app.get("/health")
    async def health() -> Response:
        status = "draining" if state.draining else "ok"
        body: dict[str, Any] = {"status": status, "active_streams": state.metrics.active_streams}
        body["relay_buffered_bytes"] = state.memory.used
        probe_redis = getattr(state.limits, "probe", None)  # only the Redis store has one
        body["redis"] = await probe_redis() if probe_redis is not None else "off"
        body["process"] = process_figures()
        return Response(json.dumps(body), status=503 if state.draining else 200, content_type="application/json")

    @app.get("/metrics/backpressure")
    async def backpressure_metrics() -> dict[str, Any]:
        snapshot = state.metrics.snapshot()
        snapshot["buffer_size"] = settings.buffer_size
        snapshot["stream_buffer_bytes"] = settings.stream_buffer_bytes
        memory = state.memory
        snapshot["memory"] = {"used": memory.used, "peak": memory.peak, "limit": memory.limit, "refused": memory.refused}
        snapshot["default_policy"] = settings.backpressure.value
        return snapshot

    app.register_blueprint(api)
    app.register_blueprint(dashboard)
    return app


def process_figures() -> dict[str, int]:
    """This worker's pid, open fds, live trio tasks and RSS: what a leak would grow (chaos tests read them)."""
    tasks = 0
    pending = [trio.lowlevel.current_root_task()]
    while pending:
        task = pending.pop()
        tasks += 1
        for child_nursery in task.child_nurseries:
            pending.extend(child_nursery.child_tasks)
    with open("/proc/self/statm") as statm:
        rss_pages = int(statm.read().split()[1])
    return {
        "pid": os.getpid(),
        "fds": len(os.listdir("/proc/self/fd")),
        "tasks": tasks,
        "rss_bytes": rss_pages * os.sysconf("SC_PAGE_SIZE"),
    }


async def _serve_simulator(state: GatewayState, *, task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
    """Run the embedded simulator until the app stops (its own scope: lifespan must not wait on it)."""
    assert state.simulator is not None
    with trio.CancelScope() as scope:
        state.simulator_scope = scope
        await state.simulator.serve("127.0.0.1", 0, task_status=task_status)
