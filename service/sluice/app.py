"""The Quart application: routes, error handlers, lifespan.

Data path of ``POST /v1/chat/completions``::

    validate (wire.openai) -> pick policy (policies) -> StreamRelay.open()
    (upstream, retries) -> Response(StreamRelay) -> Quart's send loop iterates it

Invariants:

* Every error a client gets is OpenAI-shaped JSON with a 4xx/5xx status;
  no HTML error page, no bare 500 (see :func:`error_response`).
* Every upstream request the route opens is closed, whatever window the
  client leaves in: :class:`GatewayHTTPConnection` releases the request's
  relay after the response, also when the response head was never sent.
"""

from __future__ import annotations

import hmac
import json
import logging
import os
import uuid
from dataclasses import dataclass, field
from typing import Any

import trio
from quart import Response, request
from quart_cors import cors
from quart_trio import QuartTrio
from quart_trio.asgi import TrioASGIHTTPConnection
from werkzeug.exceptions import HTTPException

from . import errors
from .config import Settings
from .metrics import GatewayMetrics, StreamStats
from .policies import BACKPRESSURE_HEADER, choose_backpressure
from .relay import StreamRelay
from .simulator import Simulator
from .upstream import UpstreamClient
from .wire.openai import parse_chat_request

log = logging.getLogger("sluice")

SSE_HEADERS = {
    "content-type": "text/event-stream; charset=utf-8",
    "cache-control": "no-cache",
    "x-accel-buffering": "no",  # nginx in front must not buffer the stream
}
_RELAY_SCOPE_KEY = "sluice.relay"


@dataclass
class GatewayState:
    """Everything the routes share within one worker."""

    settings: Settings
    metrics: GatewayMetrics = field(default_factory=GatewayMetrics)
    upstream: UpstreamClient | None = None
    upstream_base_url: str | None = None
    simulator: Simulator | None = None
    simulator_scope: trio.CancelScope | None = None
    #: streams in flight, for graceful shutdown
    relays: set[StreamRelay] = field(default_factory=set)
    #: set on SIGTERM/SIGINT: /health answers 503 and new streams are refused
    draining: bool = False

    async def drain(self, timeout: float) -> None:
        """Let in-flight streams finish for ``timeout`` s, then end the rest with an error event."""
        self.draining = True
        with trio.move_on_after(timeout):
            while self.relays:
                await trio.sleep(0.05)
        for relay in list(self.relays):
            relay.shut_down()


class GatewayHTTPConnection(TrioASGIHTTPConnection):
    """Quart-trio's connection handler, plus a guarantee: the request's relay is released.

    A client can leave before the response head is sent, or between the head
    and the first body write; then Quart never enters the relay's body, and
    only this ``finally`` is left to close the upstream request it opened.
    """

    async def handle_request(self, nursery: trio.Nursery, request: Any, send: Any) -> None:  # type: ignore[override]
        try:
            await super().handle_request(nursery, request, send)
        finally:
            relay: StreamRelay | None = self.scope.get(_RELAY_SCOPE_KEY)  # type: ignore[assignment]
            if relay is not None:
                await relay.release()
                self.app.extensions["sluice"].relays.discard(relay)


class SluiceApp(QuartTrio):
    asgi_http_class = GatewayHTTPConnection  # type: ignore[assignment]


def error_response(error: errors.SluiceError) -> Response:
    response = Response(error.to_json_bytes(), status=error.status, content_type="application/json")
    for name, value in error.headers.items():
        response.headers[name] = value
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

    @app.before_serving
    async def start_upstream() -> None:
        base_url = settings.upstream_base_url
        if base_url is None:
            state.simulator = Simulator()
            port = await app.nursery.start(_serve_simulator, state)
            base_url = f"http://127.0.0.1:{port}/v1"
            log.info("no upstream configured: serving from the embedded simulator at %s", base_url)
        state.upstream_base_url = base_url
        state.upstream = UpstreamClient(
            base_url,
            api_key=settings.upstream_api_key.get_secret_value() if settings.upstream_api_key else None,
            max_connections=settings.max_streams,
            connect_timeout=settings.connect_timeout,
            retry_policy=settings.retry_policy,
        )

    @app.after_serving
    async def stop_upstream() -> None:
        if state.upstream is not None:
            await state.upstream.aclose()
        if state.simulator_scope is not None:
            state.simulator_scope.cancel()

    api_keys = [key.get_secret_value().encode() for key in settings.api_keys]

    @app.before_request
    async def authenticate() -> None:
        """Gateway API keys, when configured: a Bearer key for everything under /v1/."""
        if not api_keys or not request.path.startswith("/v1/"):
            return
        header = request.headers.get("authorization", "")
        scheme, _, presented = header.partition(" ")
        # compare_digest against every key: the time taken says nothing about which matched.
        matched = [hmac.compare_digest(presented.strip().encode(), key) for key in api_keys]
        if scheme.lower() != "bearer" or not any(matched):
            raise errors.Unauthorized(
                "Missing or invalid API key: send 'Authorization: Bearer <key>'.",
                headers={"www-authenticate": "Bearer"},
            )

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
        return error_response(error)

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
        parsed = parse_chat_request(raw)  # type: ignore[arg-type]
        policy = choose_backpressure(
            request.headers.get(BACKPRESSURE_HEADER), parsed.model.backpressure_strategy, settings.backpressure
        )
        request_id = request.headers.get("x-request-id") or uuid.uuid4().hex
        metrics = state.metrics
        if state.draining:
            raise errors.ShuttingDown("The gateway is shutting down.", headers={"retry-after": "1"})
        if metrics.active_streams >= settings.max_streams:
            raise errors.Overloaded(
                f"The gateway is at its limit of {settings.max_streams} concurrent streams.",
                headers={"retry-after": "1"},
            )
        upstream = state.upstream
        assert upstream is not None
        stats = StreamStats(request_id=request_id, model=parsed.model.model, policy=policy.value, stream=parsed.stream)

        def count_attempt() -> None:
            stats.upstream_attempts += 1

        metrics.stream_started()
        if not parsed.stream:
            return await _complete(
                upstream, parsed.upstream_body, stats, metrics, count_attempt, settings.completion_timeout
            )

        async def open_upstream() -> Any:
            return await upstream.open_chat_stream(parsed.upstream_body, on_attempt=count_attempt)

        relay = StreamRelay(
            open_upstream=open_upstream,
            stats=stats,
            metrics=metrics,
            capacity=settings.buffer_size,
            policy=policy,
            max_wait=settings.max_wait_ms / 1000.0,
            first_token_timeout=settings.first_token_timeout,
            idle_timeout=settings.idle_timeout,
            ping_interval=settings.ping_interval,
            max_reopens=settings.retry_max_attempts - 1,
        )
        request.scope[_RELAY_SCOPE_KEY] = relay
        state.relays.add(relay)
        await relay.open()
        response = Response(relay, status=200, headers=SSE_HEADERS)
        response.headers["x-request-id"] = request_id
        response.timeout = None
        return response

    @app.get("/v1/models")
    async def models() -> Response:
        assert state.upstream is not None
        upstream_response = await state.upstream.list_models()
        return Response(upstream_response.content, status=200, content_type="application/json")

    @app.get("/health")
    async def health() -> Response:
        status = "draining" if state.draining else "ok"
        body = {"status": status, "active_streams": state.metrics.active_streams, "process": process_figures()}
        return Response(json.dumps(body), status=503 if state.draining else 200, content_type="application/json")

    @app.get("/metrics/backpressure")
    async def backpressure_metrics() -> dict[str, Any]:
        snapshot = state.metrics.snapshot()
        snapshot["buffer_size"] = settings.buffer_size
        snapshot["default_policy"] = settings.backpressure.value
        return snapshot

    return app


def process_figures() -> dict[str, int]:
    """Open fds, live trio tasks and RSS: what a leak would grow (chaos tests and the soak read them)."""
    tasks = 0
    pending = [trio.lowlevel.current_root_task()]
    while pending:
        task = pending.pop()
        tasks += 1
        for child_nursery in task.child_nurseries:
            pending.extend(child_nursery.child_tasks)
    with open("/proc/self/statm") as statm:
        rss_pages = int(statm.read().split()[1])
    return {"fds": len(os.listdir("/proc/self/fd")), "tasks": tasks, "rss_bytes": rss_pages * os.sysconf("SC_PAGE_SIZE")}


async def _complete(
    upstream: UpstreamClient,
    body: bytes,
    stats: StreamStats,
    metrics: GatewayMetrics,
    count_attempt: Any,
    timeout: float,
) -> Response:
    """A non-streaming completion: relay the upstream's JSON and status as they are."""
    try:
        with trio.move_on_after(timeout) as deadline:
            upstream_response = await upstream.chat_completion(body, on_attempt=count_attempt)
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
    finally:
        stats.ended_at = trio.current_time()
        metrics.stream_finished(stats)
        logging.getLogger("sluice.stream").info({"event": "completion", **stats.figures()})
    response = Response(upstream_response.content, status=upstream_response.status_code, content_type="application/json")
    response.headers["x-request-id"] = stats.request_id
    return response


async def _serve_simulator(state: GatewayState, *, task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
    """Run the embedded simulator until the app stops (its own scope: lifespan must not wait on it)."""
    assert state.simulator is not None
    with trio.CancelScope() as scope:
        state.simulator_scope = scope
        await state.simulator.serve("127.0.0.1", 0, task_status=task_status)
