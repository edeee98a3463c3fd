"""The Quart application: routes, error handlers, lifespan.

Data path of ``POST /v1/chat/completions``::

    authenticate (limits.KeyTable) -> validate (wire.openai) -> route (router)
    -> admit (limits) -> pick policy (policies) -> StreamRelay.open()
    (deployment, retries, fallbacks) -> Response(StreamRelay) -> Quart's send
    loop iterates it -> release (limits, metrics, one log line)

Invariants:

* Every error a client gets is OpenAI-shaped JSON with a 4xx/5xx status;
  no HTML error page, no bare 500 (see :func:`error_response`).
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
from typing import Any

import trio
from quart import Response, g, request
from quart_cors import cors
from quart_trio import QuartTrio
from werkzeug.exceptions import HTTPException

from . import errors
from .budget import MemoryBudget
from .config import Settings
from .connection import KeepAliveHTTPConnection
from .logs import redact
from .limits import KeyTable, LimitStore, LocalLimitStore, VirtualKey
from .metrics import GatewayMetrics, StreamStats
from .policies import BACKPRESSURE_HEADER, choose_backpressure
from .prometheus import CONTENT_TYPE as PROMETHEUS_CONTENT_TYPE
from .prometheus import PrometheusMetrics
from .redaction import Scrubber
from .relay import StreamRelay
from .router import Deployment, Router, RouterEvents
from .simulator import Simulator, SimulatorLimits
from .wire.openai import parse_chat_request

log = logging.getLogger("sluice")

SSE_HEADERS = {
    "content-type": "text/event-stream; charset=utf-8",
    "cache-control": "no-cache",
    "x-accel-buffering": "no",  # nginx in front must not buffer the stream
}
_RELAY_SCOPE_KEY = "sluice.relay"
_STATS_SCOPE_KEY = "sluice.stats"
_ADMITTED_SCOPE_KEY = "sluice.admitted"
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

    def __post_init__(self) -> None:
        self.prometheus = PrometheusMetrics(
            max_label_values=self.settings.metrics_max_label_values, models=(m.name for m in self.settings.models)
        )
        self.metrics = GatewayMetrics(self.prometheus)
        self.memory = MemoryBudget(self.settings.memory_budget)
        self.prometheus.memory_budget.set(self.memory.limit)
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
            state: GatewayState = self.app.extensions["sluice"]
            relay: StreamRelay | None = self.scope.get(_RELAY_SCOPE_KEY)  # type: ignore[assignment]
            if relay is not None:
                await relay.release()
                state.relays.discard(relay)
            admitted: tuple[VirtualKey, Any] | None = self.scope.get(_ADMITTED_SCOPE_KEY)  # type: ignore[assignment]
            if admitted is not None:
                key, lease = admitted
                stats: StreamStats | None = self.scope.get(_STATS_SCOPE_KEY)  # type: ignore[assignment]
                with trio.CancelScope(shield=True), trio.move_on_after(2.0):
                    await state.limits.release(key, lease, stats.token_count if stats is not None else 0)


class SluiceApp(QuartTrio):
    asgi_http_class = GatewayHTTPConnection  # type: ignore[assignment]


def error_response(error: errors.SluiceError, scrubber: Scrubber | None = None) -> Response:
    body = error.to_json_bytes()
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


def create_app(settings: Settings) -> SluiceApp:
    app = SluiceApp("sluice")
    app.config.update(
        MAX_CONTENT_LENGTH=settings.max_body_bytes,
        BODY_TIMEOUT=settings.body_timeout,
        RESPONSE_TIMEOUT=None,  # streams are long; their own deadlines bound them
    )
    state = GatewayState(settings)
    app.extensions["sluice"] = state
    provider_keys = [
        settings.upstream_api_key.get_secret_value() if settings.upstream_api_key else None,
        *(os.environ.get(d.api_key_env or "") for m in settings.models for d in m.deployments),
    ]
    gateway_keys = [key.secret.decode() for key in state.keys.keys]
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

    keys = state.keys

    @app.before_request
    async def identify() -> None:
        """A request id for every request; a gateway key for everything under /v1/ when keys are set."""
        g.request_id = request.headers.get("x-request-id") or uuid.uuid4().hex
        g.started_at = trio.current_time()
        g.key = None
        if not keys.enabled or not request.path.startswith("/v1/"):
            return
        scheme, _, presented = request.headers.get("authorization", "").partition(" ")
        key = keys.lookup(presented.strip()) if scheme.lower() == "bearer" else None
        if key is None and "x-api-key" in request.headers:
            key = keys.lookup(request.headers["x-api-key"].strip())  # how Anthropic's SDKs send a key
        if key is None:
            raise errors.Unauthorized(
                "Missing or invalid API key: send 'Authorization: Bearer <key>' (or 'x-api-key: <key>').",
                headers={"www-authenticate": "Bearer"},
            )
        g.key = key

    @app.after_request
    async def tag_and_log(response: Response) -> Response:
        request_id = getattr(g, "request_id", None) or uuid.uuid4().hex
        response.headers["x-request-id"] = request_id
        if state.draining:
            # Hypercorn keeps idle keep-alive connections open while it drains; a
            # proxy that sends its next request on one would reach a gateway that
            # refuses it. Closing after each response sends the proxy elsewhere.
            response.headers["connection"] = "close"
        if request.scope.get(_RELAY_SCOPE_KEY) is None and request.scope.get(_STATS_SCOPE_KEY) is None:
            # Streams and completions log their own line when they end; this is everything else.
            if request.path.startswith("/v1/") or response.status_code >= 400:
                request_log.info(
                    {
                        "event": "request",
                        "request_id": request_id,
                        "method": request.method,
                        "path": request.path,
                        "status": response.status_code,
                        "key": g.key.name if getattr(g, "key", None) is not None else None,
                        "total_ms": round((trio.current_time() - getattr(g, "started_at", trio.current_time())) * 1000, 3),
                    }
                )
            if request.path == "/v1/chat/completions" and response.status_code >= 400:
                state.prometheus.request_refused(getattr(g, "model", "-"), response.status_code)
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

    @app.post("/v1/chat/completions")
    async def chat_completions() -> Response:
        raw = await request.get_data(cache=False)
        parsed = parse_chat_request(raw, max_model_name_length=settings.max_model_name_length)  # type: ignore[arg-type]
        g.model = parsed.model.model
        policy = choose_backpressure(
            request.headers.get(BACKPRESSURE_HEADER), parsed.model.backpressure_strategy, settings.backpressure
        )
        router = state.router
        assert router is not None
        route = router.route(parsed.model.model)
        metrics = state.metrics
        if state.draining:
            raise errors.ShuttingDown("The gateway is shutting down.", headers={"retry-after": "1"})
        if metrics.active_streams >= settings.max_streams:
            raise errors.Overloaded(
                f"The gateway is at its limit of {settings.max_streams} concurrent streams.",
                headers={"retry-after": "1"},
            )
        memory = state.memory
        if memory.full:
            memory.refused += 1
            state.prometheus.memory_budget_refusals.inc()
            raise errors.Overloaded(
                f"The gateway's stream buffers are full ({memory.used} of {memory.limit} bytes held); retry shortly.",
                headers={"retry-after": "1"},
            )
        key: VirtualKey | None = g.key
        if key is not None and key.limited:
            try:
                lease = await state.limits.admit(key)
            except errors.RateLimited as refused:
                state.prometheus.rate_limited.labels(getattr(refused, "limit", "requests")).inc()
                raise
            request.scope[_ADMITTED_SCOPE_KEY] = (key, lease)
        stats = StreamStats(request_id=g.request_id, model=parsed.model.model, policy=policy.value, stream=parsed.stream)
        request.scope[_STATS_SCOPE_KEY] = stats

        def count_attempt() -> None:
            stats.upstream_attempts += 1

        metrics.stream_started()
        if not parsed.stream:
            return await _complete(
                router, route, parsed, stats, metrics, count_attempt, settings.completion_timeout, state.scrubber
            )

        async def open_upstream() -> Any:
            return await router.open_stream(route, parsed, on_attempt=count_attempt)

        async def open_hedge(primary: Deployment) -> Any:
            return await router.open_stream(
                route, parsed, on_attempt=count_attempt, exclude=(primary,), with_fallbacks=False
            )

        relay = StreamRelay(
            open_upstream=open_upstream,
            stats=stats,
            metrics=metrics,
            capacity=settings.buffer_size,
            budget=state.memory.stream(settings.stream_buffer_bytes),
            policy=policy,
            max_wait=settings.max_wait_ms / 1000.0,
            first_token_timeout=settings.first_token_timeout,
            idle_timeout=settings.idle_timeout,
            ping_interval=settings.ping_interval,
            max_reopens=settings.retry_max_attempts - 1,
            open_hedge=open_hedge,
            hedge_delay=route.hedge_delay(settings.hedge_min_samples),
            observe_first_token=lambda seconds: router.observe_first_token(route, seconds),
            scrubber=state.scrubber,
            stream_scrubber=state.stream_scrubber,
        )
        request.scope[_RELAY_SCOPE_KEY] = relay
        state.relays.add(relay)
        await relay.open()
        response = Response(relay, status=200, headers=SSE_HEADERS)
        response.headers["x-sluice-deployment"] = relay.first_deployment
        response.timeout = None
        return response

    @app.get("/v1/models")
    async def models() -> Response:
        router = state.router
        assert router is not None
        if router.passthrough is None:
            return Response(router.models_document(), status=200, content_type="application/json")
        upstream_response = await router.default_client.list_models()
        return Response(state.scrubber.scrub(upstream_response.content), status=200, content_type="application/json")

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


async def _complete(
    router: Router,
    route: Any,
    parsed: Any,
    stats: StreamStats,
    metrics: GatewayMetrics,
    count_attempt: Any,
    timeout: float,
    scrubber: Scrubber,
) -> Response:
    """A non-streaming completion: relay the upstream's JSON and status, configured secrets scrubbed."""
    try:
        with trio.move_on_after(timeout) as deadline:
            upstream_response, deployment = await router.complete(route, parsed, on_attempt=count_attempt)
        if deadline.cancelled_caught:
            raise errors.UpstreamTimeout(f"The upstream did not complete within {timeout:g} s.")
    except errors.SluiceError as exc:
        stats.status, stats.outcome = exc.status, f"error:{exc.code}"
        raise
    except BaseException:
        stats.outcome = "client_disconnect"
        raise
    else:
        stats.outcome = "done"
        stats.first_token_at = trio.current_time()
        stats.deployment = deployment.name
        stats.tokens = _completion_tokens(upstream_response.content)
    finally:
        stats.ended_at = trio.current_time()
        metrics.stream_finished(stats)
        logging.getLogger("sluice.stream").info({"event": "completion", **stats.figures()})
    response = Response(
        scrubber.scrub(upstream_response.content), status=upstream_response.status_code, content_type="application/json"
    )
    response.headers["x-sluice-deployment"] = deployment.name
    return response


def _completion_tokens(content: bytes) -> int:
    """``usage.completion_tokens`` of a completion body (for tokens/minute limits and metrics)."""
    try:
        usage = json.loads(content).get("usage") or {}
    except (ValueError, AttributeError):
        return 0
    tokens = usage.get("completion_tokens") if isinstance(usage, dict) else None
    return tokens if isinstance(tokens, int) else 0


async def _serve_simulator(state: GatewayState, *, task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
    """Run the embedded simulator until the app stops (its own scope: lifespan must not wait on it)."""
    assert state.simulator is not None
    with trio.CancelScope() as scope:
        state.simulator_scope = scope
        await state.simulator.serve("127.0.0.1", 0, task_status=task_status)
