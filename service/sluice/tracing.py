"""OpenTelemetry tracing: one SERVER span per ``/v1`` request, W3C context in and out.

:func:`build_tracing` turns the settings into a :class:`Tracing`, or ``None``
when tracing is off. It is on exactly when an OTLP endpoint is configured:
``otel_endpoint`` (``SLUICE_OTEL_ENDPOINT``, TOML), or the standard
``OTEL_EXPORTER_OTLP_TRACES_ENDPOINT`` / ``OTEL_EXPORTER_OTLP_ENDPOINT``
variables. Everything else the OpenTelemetry SDK reads from the
environment it reads as it always does: ``OTEL_SERVICE_NAME`` and
``OTEL_RESOURCE_ATTRIBUTES`` (``otel_service_name``, when set, wins;
``sluice`` when nothing names the service),
``OTEL_EXPORTER_OTLP_HEADERS``, ``OTEL_TRACES_SAMPLER(_ARG)``,
``OTEL_BSP_*``; ``OTEL_SDK_DISABLED=true`` turns tracing off. The OTLP/HTTP exporter appends ``/v1/traces`` to a base
endpoint; ``otel_endpoint`` is a base endpoint too.

Each request gets a :class:`RequestTrace`: the span (a child of the
client's ``traceparent`` when it sent one), the headers that carry the
span's context to the upstream, and the few calls the relay makes at rare
moments (a retry, a fallback, a hedge, the first token, a client leaving,
an error event). Its attributes are copied from the request's
:class:`~sluice.metrics.StreamStats` once, when the request is released:
the same figures the log line and the ``: sluice`` comment show.

Invariants:

* Off means free: no span object, no context work; the request path pays
  one ``is None`` check. The client's ``traceparent``/``tracestate`` still
  go to the upstream unchanged (:func:`client_trace_headers`), so a trace
  stays connected through a gateway that does not trace.
* Nothing runs per token: every :class:`RequestTrace` call happens once per
  request or once per rare occurrence (the first token once per stream).
* Export never blocks the trio loop: spans go to the SDK's
  ``BatchSpanProcessor``, whose own thread exports them. On shutdown
  :meth:`Tracing.aclose` flushes in a worker thread, bounded in time.
* No upstream attempt gets a span of its own (no CLIENT span): the
  upstream's ``traceparent`` names the gateway's SERVER span as its parent,
  so the provider's spans hang under it, and retries, fallbacks and hedges
  are events on that span. One span per request keeps tracing's cost one
  span start, one end and one header per request.
* A gateway key's *name* may be an attribute; a key never is.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import trio

from .metrics import Outcome
from .upstream import failure_code

if TYPE_CHECKING:
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.trace import Span
    from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

    from .config import Settings
    from .errors import SluiceError
    from .metrics import StreamStats
    from .router import Deployment

log = logging.getLogger("sluice.tracing")

#: the environment variables that configure an OTLP trace endpoint (the SDK's own names)
OTLP_ENDPOINT_VARIABLES = ("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", "OTEL_EXPORTER_OTLP_ENDPOINT")
#: ``service.name`` when neither ``otel_service_name`` nor the environment names one
DEFAULT_SERVICE_NAME = "sluice"

#: ``gen_ai.operation.name`` per route (GenAI semantic conventions; count_tokens has no standard name)
OPERATIONS = {
    "/v1/chat/completions": "chat",
    "/v1/completions": "text_completion",
    "/v1/responses": "chat",
    "/v1/messages": "chat",
    "/v1/embeddings": "embeddings",
    "/v1/messages/count_tokens": "count_tokens",
}
#: request fields copied to ``gen_ai.request.*`` when the client gave them
_REQUEST_FIELDS = (
    ("max_tokens", "gen_ai.request.max_tokens"),
    ("max_completion_tokens", "gen_ai.request.max_tokens"),
    ("max_output_tokens", "gen_ai.request.max_tokens"),
    ("temperature", "gen_ai.request.temperature"),
    ("top_p", "gen_ai.request.top_p"),
)

def otlp_endpoint(settings: Settings, environ: Mapping[str, str] = os.environ) -> str | None:
    """Where spans go, or ``None``: tracing is off. ``otel_endpoint`` first, then the SDK's variables.

    ``OTEL_SDK_DISABLED=true`` turns it off whatever is configured, as it turns off any SDK (and
    the client's own context still passes through, which a disabled SDK's no-op spans would drop).
    """
    if environ.get("OTEL_SDK_DISABLED", "").strip().lower() == "true":
        return None
    if settings.otel_endpoint:
        return settings.otel_endpoint
    for name in OTLP_ENDPOINT_VARIABLES:
        if environ.get(name, "").strip():
            return environ[name].strip()
    return None


def build_tracing(settings: Settings, provider: TracerProvider | None = None) -> Tracing | None:
    """The gateway's tracing from its settings; ``None`` when no endpoint is configured.

    ``provider``, when given, is used as it is and never shut down by the
    gateway (tests hand in one with an in-memory exporter).
    """
    if provider is not None:
        return Tracing(provider, owned=False, flush_timeout=settings.otel_flush_timeout)
    if otlp_endpoint(settings) is None:
        return None
    # Imported only when tracing is on (off costs no memory either: the SDK, the exporter,
    # requests and protobuf are ~9 MB of a worker's RSS).
    from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
    from opentelemetry.sdk.resources import SERVICE_NAME, Resource
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor

    resource = Resource.create()  # OTEL_SERVICE_NAME, OTEL_RESOURCE_ATTRIBUTES, as in every SDK
    if settings.otel_service_name is not None:
        resource = resource.merge(Resource({SERVICE_NAME: settings.otel_service_name}))
    elif str(resource.attributes.get(SERVICE_NAME, "")).startswith("unknown_service"):
        resource = resource.merge(Resource({SERVICE_NAME: DEFAULT_SERVICE_NAME}))
    # With only the variables set the exporter resolves the endpoint itself (adding /v1/traces to
    # OTEL_EXPORTER_OTLP_ENDPOINT); the setting is a base endpoint like that variable.
    endpoint = settings.otel_endpoint.rstrip("/") + "/v1/traces" if settings.otel_endpoint else None
    # The sampler comes from OTEL_TRACES_SAMPLER(_ARG) (parentbased_always_on by default). No atexit
    # hook: the gateway flushes on its own shutdown, bounded (an unbounded flush to a dead collector
    # at exit would hold the process past its drain).
    built = TracerProvider(resource=resource, shutdown_on_exit=False)
    built.add_span_processor(BatchSpanProcessor(OTLPSpanExporter(endpoint=endpoint)))
    return Tracing(built, owned=True, flush_timeout=settings.otel_flush_timeout)


def client_trace_headers(headers: Mapping[str, str]) -> list[tuple[bytes, bytes]]:
    """The client's own W3C trace headers, to pass on unchanged when the gateway does not trace."""
    traceparent = headers.get("traceparent")
    if not traceparent:
        return []  # a tracestate means nothing without it (W3C), and one lookup is the common case's cost
    found = [(b"traceparent", traceparent.encode("latin-1"))]
    tracestate = headers.get("tracestate")
    if tracestate:
        found.append((b"tracestate", tracestate.encode("latin-1")))
    return found


def finish_reasons(answer: Mapping[str, Any]) -> list[str]:
    """Why a non-streamed answer ended, as each API says it: ``choices[].finish_reason``, ``stop_reason``, ``status``."""
    choices = answer.get("choices")
    if isinstance(choices, list):
        return [c["finish_reason"] for c in choices if isinstance(c, dict) and isinstance(c.get("finish_reason"), str)]
    for name in ("stop_reason", "status"):  # Anthropic Messages; OpenAI Responses
        value = answer.get(name)
        if isinstance(value, str):
            return [value]
    return []


class Tracing:
    """One worker's tracer, and how a request's span starts."""

    def __init__(self, provider: TracerProvider, *, owned: bool, flush_timeout: float = 5.0) -> None:
        from opentelemetry.trace import SpanKind
        from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

        self.provider = provider
        self._owned = owned
        self._flush_timeout = flush_timeout
        self._tracer = provider.get_tracer("sluice")
        self._propagator = TraceContextTextMapPropagator()
        self._server = SpanKind.SERVER

    def start(self, headers: Mapping[str, str], method: str, route: str) -> RequestTrace:
        """The span of one request, a child of the client's ``traceparent`` when it sent one."""
        parent = self._propagator.extract(headers) if "traceparent" in headers else None
        span = self._tracer.start_span(
            f"{method} {route}",
            context=parent,
            kind=self._server,
            attributes={"http.request.method": method, "http.route": route},
        )
        return RequestTrace(span, route, self._propagator)

    async def aclose(self) -> None:
        """Export what is still queued (bounded by ``otel_flush_timeout``) and stop the exporter's thread."""
        if not self._owned:
            return
        provider = self.provider
        timeout = self._flush_timeout

        def flush_and_stop() -> None:
            provider.force_flush(int(timeout * 1000))
            provider.shutdown()

        # The exporter may wait on a slow collector: never on the loop, and never longer than the bound.
        with trio.move_on_after(timeout + 1.0) as bound:
            await trio.to_thread.run_sync(flush_and_stop, abandon_on_cancel=True)
        if bound.cancelled_caught:
            log.warning({"event": "tracing_flush_timeout", "seconds": timeout})


class RequestTrace:
    """One request's SERVER span and what the relay tells it. Every call is per request or rarer."""

    __slots__ = (
        "span", "route", "status_code", "error_type", "model", "key_name",
        "_propagator", "_request_fields", "_deployment", "_ended",
    )

    def __init__(self, span: Span, route: str, propagator: TraceContextTextMapPropagator) -> None:
        self.span = span
        self.route = route
        self._propagator = propagator
        #: the response status the client was sent (set when the response head is made)
        self.status_code: int | None = None
        #: the code of the gateway error the client was answered with, if any (``model_not_found``...)
        self.error_type: str | None = None
        #: the model the client asked for, once the request parsed
        self.model: str | None = None
        #: the gateway key's name (never the key)
        self.key_name: str | None = None
        self._request_fields: dict[str, Any] | None = None
        self._deployment: Deployment | None = None
        self._ended = False

    def upstream_headers(self) -> list[tuple[bytes, bytes]]:
        """``traceparent`` (and ``tracestate``) naming this span as the upstream request's parent."""
        from opentelemetry.context import Context
        from opentelemetry.trace import set_span_in_context

        carrier: dict[str, str] = {}
        self._propagator.inject(carrier, context=set_span_in_context(self.span, Context()))
        return [(name.encode(), value.encode("latin-1")) for name, value in carrier.items()]

    def request(self, model: str, body: Mapping[str, Any]) -> None:
        """The parsed request: its model and the sampling fields the client set, read once."""
        self.model = model
        if not self.span.is_recording():
            return
        fields: dict[str, Any] = {}
        for name, attribute in _REQUEST_FIELDS:
            value = body.get(name)
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                fields[attribute] = value
        self._request_fields = fields

    # --- rare moments (the relay, the router, the upstream client) ---------------------

    def retrying(self, deployment: Deployment, code: str, attempt: int) -> None:
        """The same deployment is tried again after a failed attempt."""
        self.span.add_event(
            "sluice.retry", {"sluice.deployment": deployment.name, "sluice.attempt": attempt, "error.type": code}
        )

    def falling_back(self, failed: Deployment, error: SluiceError, to: Deployment) -> None:
        """The request moves on from a deployment that gave up on it."""
        self.span.add_event(
            "sluice.fallback",
            {"sluice.from_deployment": failed.name, "sluice.deployment": to.name, "error.type": failure_code(error)},
        )

    def reopened(self, failed: Deployment | None, reason: str, to: Deployment | None) -> None:
        """A stream that broke before any content was opened again (elsewhere when there is an elsewhere)."""
        same = failed is not None and failed is to
        attributes: dict[str, Any] = {"error.type": reason}
        if failed is not None:
            attributes["sluice.from_deployment"] = failed.name
        if to is not None:
            attributes["sluice.deployment"] = to.name
        self.span.add_event("sluice.retry" if same else "sluice.fallback", attributes)

    def hedge_started(self, deployment: Deployment) -> None:
        self.span.add_event("sluice.hedge.start", {"sluice.deployment": deployment.name})

    def hedge_claimed(self, won: bool, deployment: Deployment | None) -> None:
        """The race is decided: ``won`` means the hedge serves the stream."""
        attributes: dict[str, Any] = {"sluice.hedge.leg": "hedge" if won else "first"}
        if deployment is not None:
            attributes["sluice.deployment"] = deployment.name
        self.span.add_event("sluice.hedge.win", attributes)

    def first_token(self, deployment: Deployment | None) -> None:
        """The stream's first content (once per stream); the deployment serving it."""
        self._deployment = deployment
        self.span.add_event("sluice.first_token")

    def served_by(self, deployment: Deployment) -> None:
        self._deployment = deployment

    def answered(self, answer: Mapping[str, Any]) -> None:
        """A non-streamed answer: its finish reasons (chat/completions per choice; Messages' stop_reason)."""
        if not self.span.is_recording():
            return
        reasons = finish_reasons(answer)
        if reasons:
            self.span.set_attribute("gen_ai.response.finish_reasons", reasons)

    def client_disconnected(self) -> None:
        self.span.add_event("sluice.client_disconnect")

    def error_event(self, code: str) -> None:
        """The stream ended with an error event (the gateway's, or the upstream's relayed)."""
        self.span.add_event("sluice.error_event", {"error.type": code})

    # --- the end ---------------------------------------------------------------------------

    def end(self, stats: StreamStats | None) -> None:
        """Copy the request's figures onto the span and end it (once)."""
        if self._ended:
            return
        self._ended = True
        span = self.span
        if not span.is_recording():
            span.end()
            return
        attributes: dict[str, Any] = {}
        model = self.model
        key_name = self.key_name
        operation = OPERATIONS.get(self.route)
        if operation is not None:
            attributes["gen_ai.operation.name"] = operation
            if model:
                attributes["gen_ai.request.model"] = model
                span.update_name(f"{operation} {model}")
        if self.status_code is not None:
            attributes["http.response.status_code"] = self.status_code
        if key_name is not None:
            attributes["sluice.key"] = key_name
        if self._request_fields:
            attributes.update(self._request_fields)
        deployment = self._deployment
        if deployment is not None:
            attributes["gen_ai.provider.name"] = deployment.provider
            attributes["gen_ai.response.model"] = deployment.upstream_model or model or ""
        error_type: str | None = None
        if stats is not None:
            attributes["sluice.api"] = stats.api
            attributes["sluice.stream"] = stats.stream
            attributes["sluice.outcome"] = stats.outcome_label
            attributes["sluice.backpressure"] = stats.policy
            attributes["sluice.upstream_attempts"] = stats.upstream_attempts
            if stats.deployment is not None:
                attributes["sluice.deployment"] = stats.deployment
            if stats.usage_input_tokens is not None:
                attributes["gen_ai.usage.input_tokens"] = stats.usage_input_tokens
            if stats.usage_completion_tokens is not None:
                attributes["gen_ai.usage.output_tokens"] = stats.usage_completion_tokens
            if stats.stream:
                attributes["sluice.content_deltas"] = stats.tokens
            ttft = stats.ttft_ms
            if ttft is not None and stats.stream:
                attributes["sluice.ttft"] = ttft / 1000.0
            tps = stats.tokens_per_second
            if tps is not None and stats.stream:
                attributes["sluice.tokens_per_second"] = tps
            if stats.outcome is Outcome.ERROR:
                error_type = stats.error_code or "error"
        status = self.status_code
        if error_type is None and status is not None and status >= 500:
            error_type = self.error_type or str(status)
        if error_type is not None:
            from opentelemetry.trace import Status, StatusCode

            attributes["error.type"] = error_type
            span.set_status(Status(StatusCode.ERROR, error_type))
        elif status is not None and status >= 400:
            # The client's error: named, but not the server span's failure (HTTP semconv).
            attributes["error.type"] = self.error_type or str(status)
        span.set_attributes(attributes)
        span.end()
