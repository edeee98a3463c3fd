"""The ``/v1`` routes: data (:data:`STREAMING_APIS`) and module-level handlers, as one Quart blueprint.

Data path of a streaming API (``/v1/chat/completions``, ``/v1/completions``,
``/v1/responses``, ``/v1/messages``)::

    grammar.parse_request -> route (router, per API) -> admit (drain,
    max_streams, memory budget, key limits) -> policy -> StreamRelay.open()
    (deployment, retries, fallbacks) -> Response(StreamRelay) -> Quart's send
    loop iterates it -> release (GatewayHTTPConnection's finally)

One handler serves every streaming API; what differs between them is the
grammar (``wire/``). Adding an API is a grammar module and a line in
:data:`STREAMING_APIS`. The non-streaming rest of ``/v1`` (embeddings,
count_tokens, anything else a client calls through the same base URL) is
relayed as it is: bounded body, the upstream's status and body (scrubbed).

Invariants:

* A request is admitted (and counted as a stream) only after it parsed and
  routed; every admitted request is released exactly once, by
  :class:`~sluice.app.GatewayHTTPConnection`, whatever the client does.
* Errors take the shape of the route's API (:func:`grammar_for_path`):
  Anthropic's on ``/v1/messages*``, OpenAI's everywhere else.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import trio
from quart import Blueprint, Response, current_app, g, request

from . import errors
from .metrics import GatewayMetrics, Outcome, StreamStats
from .policies import BACKPRESSURE_HEADER, choose_backpressure
from .redaction import Scrubber
from .relay import StreamRelay
from .router import Deployment, ModelRoute, Router, UpstreamCall
from .wire.anthropic import COUNT_TOKENS_PATH, MESSAGES, parse_count_tokens_request
from .wire.chat import CHAT, COMPLETIONS
from .wire.grammar import Grammar, ParsedRequest
from .wire.openai import check_model_name_length, load_json_object
from .wire.request import ForwardedRequest
from .wire.responses import RESPONSES
from .tracing import client_trace_headers

if TYPE_CHECKING:
    from .app import GatewayState
    from .tracing import RequestTrace

api = Blueprint("api", __name__)
stream_log = logging.getLogger("sluice.stream")

SSE_HEADERS = {
    "content-type": "text/event-stream; charset=utf-8",
    "cache-control": "no-cache",
    "x-accel-buffering": "no",  # nginx in front must not buffer the stream
}
#: the Messages API version sent upstream when the client names none
ANTHROPIC_VERSION = b"2023-06-01"


@dataclass(frozen=True, slots=True)
class StreamingAPI:
    path: str
    grammar: Grammar


#: every streaming client API: its path and its grammar
STREAMING_APIS = (
    StreamingAPI("/v1/chat/completions", CHAT),
    StreamingAPI("/v1/completions", COMPLETIONS),
    StreamingAPI("/v1/responses", RESPONSES),
    StreamingAPI("/v1/messages", MESSAGES),
)
_KNOWN_POST_PATHS = {a.path for a in STREAMING_APIS} | {"/v1/embeddings", "/v1/messages/count_tokens"}


@dataclass(slots=True)
class Exchange:
    """What one request holds that must be given back when it ends, whatever the client does."""

    stats: StreamStats | None = None
    relay: StreamRelay | None = None
    #: (key, lease) of a limited virtual key, released with the stream's tokens
    admitted: tuple[Any, Any] | None = None
    #: the request's span (tracing on only), ended when the request is released
    trace: RequestTrace | None = None


EXCHANGE_SCOPE_KEY = "sluice.exchange"


def exchange() -> Exchange:
    """This request's :class:`Exchange` (created on first use; read back by the connection's ``finally``)."""
    found = request.scope.get(EXCHANGE_SCOPE_KEY)
    if found is None:
        found = request.scope[EXCHANGE_SCOPE_KEY] = Exchange()  # type: ignore[typeddict-unknown-key]
    return found  # type: ignore[no-any-return]


def grammar_for_path(path: str) -> Grammar:
    """The API whose error shape a path's errors take."""
    return MESSAGES if path.startswith("/v1/messages") else CHAT


def _state() -> GatewayState:
    return current_app.extensions["sluice"]  # type: ignore[no-any-return]


def _trace(state: GatewayState) -> RequestTrace | None:
    """This request's span, when tracing is on (started by the app's ``identify``)."""
    if state.tracing is None:
        return None
    return exchange().trace


def trace_headers(trace: RequestTrace | None) -> list[tuple[bytes, bytes]]:
    """W3C context for the upstream: the gateway's span when tracing, else the client's own headers as they came."""
    return trace.upstream_headers() if trace is not None else client_trace_headers(request.headers)


def _call(grammar: Grammar, trace: RequestTrace | None, path: str | None = None) -> UpstreamCall:
    headers = trace_headers(trace)
    if grammar is MESSAGES:
        version = request.headers.get("anthropic-version")
        headers.append((b"anthropic-version", version.encode() if version else ANTHROPIC_VERSION))
        beta = request.headers.get("anthropic-beta")
        if beta:
            headers.append((b"anthropic-beta", beta.encode()))
    return UpstreamCall(grammar.name, path or grammar.upstream_path, headers or None)


# --- streaming APIs ---------------------------------------------------------------------


async def relay_api(grammar: Grammar) -> Response:
    """Every streaming API's handler: parse, route, admit, then stream (or complete) through the relay."""
    state = _state()
    settings = state.settings
    req = request._get_current_object()  # type: ignore[attr-defined]  # one context lookup, not one per read
    raw = await req.get_data(cache=False)
    parsed = grammar.parse_request(raw, max_model_name_length=settings.max_model_name_length)  # type: ignore[arg-type]
    g.model = parsed.model_name
    trace = _trace(state)
    if trace is not None:
        trace.request(parsed.model_name, parsed.body)
    policy = choose_backpressure(req.headers.get(BACKPRESSURE_HEADER), parsed.backpressure_strategy, settings.backpressure)
    router = state.router
    assert router is not None
    route = router.route(parsed.model_name, grammar.name)
    stats = await _admit(state, parsed, policy.value, grammar.name)
    call = _call(grammar, trace)

    def count_attempt() -> None:
        stats.upstream_attempts += 1

    if not parsed.stream:
        return await _complete(state, router, route, parsed, stats, call, count_attempt)

    async def open_upstream() -> Any:
        return await router.open_stream(route, parsed, call=call, on_attempt=count_attempt, observer=trace)

    async def open_retry(failed: Deployment) -> Any:
        # Elsewhere when the route has an elsewhere (an error event before any
        # content is often one deployment's trouble); else the same one again.
        if any(d is not failed for d in router.candidates(route, api=grammar.name)):
            return await router.open_stream(
                route, parsed, call=call, on_attempt=count_attempt, exclude=(failed,), observer=trace
            )
        return await open_upstream()

    async def open_hedge(primary: Deployment) -> Any:
        return await router.open_stream(
            route, parsed, call=call, on_attempt=count_attempt, exclude=(primary,), with_fallbacks=False,
            observer=trace,
        )

    relay = StreamRelay(
        grammar=grammar,
        new_framer=parsed.new_framer,
        open_upstream=open_upstream,
        open_retry=open_retry,
        stats=stats,
        metrics=state.metrics,
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
    exchange().relay = relay
    state.relays.add(relay)
    await relay.open()
    response = Response(relay, status=200, headers=SSE_HEADERS)
    response.headers["x-sluice-deployment"] = relay.first_deployment
    response.timeout = None
    return response


def _register_streaming_apis() -> None:
    for entry in STREAMING_APIS:

        async def handler(grammar: Grammar = entry.grammar) -> Response:
            return await relay_api(grammar)

        api.add_url_rule(entry.path, f"relay_{entry.grammar.name}", handler, methods=["POST"])


_register_streaming_apis()


async def _admit(state: GatewayState, parsed: ParsedRequest, policy: str, api_name: str) -> StreamStats:
    """Refuse what the gateway cannot take now; count the rest as a stream of this worker."""
    settings = state.settings
    if state.draining:
        raise errors.ShuttingDown("The gateway is shutting down.", headers={"retry-after": "1"})
    if state.metrics.active_streams >= settings.max_streams:
        raise errors.Overloaded(
            f"The gateway is at its limit of {settings.max_streams} concurrent streams.", headers={"retry-after": "1"}
        )
    memory = state.memory
    if memory.full:
        memory.refused += 1
        state.prometheus.memory_budget_refusals.inc()
        raise errors.Overloaded(
            f"The gateway's stream buffers are full ({memory.used} of {memory.limit} bytes held); retry shortly.",
            headers={"retry-after": "1"},
        )
    here = g._get_current_object()  # type: ignore[attr-defined]
    held = exchange()
    key = here.key
    if key is not None and key.limited:
        try:
            lease = await state.limits.admit(key)
        except errors.RateLimited as refused:
            state.prometheus.rate_limited.labels(refused.limit, key.name).inc()
            raise
        held.admitted = (key, lease)
    stats = StreamStats(request_id=here.request_id, model=parsed.model_name, policy=policy, stream=parsed.stream, api=api_name)
    held.stats = stats
    stats.trace = held.trace
    state.metrics.stream_started()
    return stats


async def _complete(
    state: GatewayState,
    router: Router,
    route: ModelRoute,
    parsed: ParsedRequest,
    stats: StreamStats,
    call: UpstreamCall,
    count_attempt: Any,
) -> Response:
    """A non-streaming request: relay the upstream's JSON and status as they are (scrubbed)."""
    metrics: GatewayMetrics = state.metrics
    timeout = state.settings.completion_timeout
    try:
        with trio.move_on_after(timeout) as deadline:
            upstream_response, deployment = await router.complete(
                route, parsed, call=call, on_attempt=count_attempt, observer=stats.trace
            )
        if deadline.cancelled_caught:
            raise errors.UpstreamTimeout(f"The upstream did not complete within {timeout:g} s.")
    except errors.SluiceError as exc:
        stats.status = exc.status
        stats.end_with_error(exc.code)
        raise
    except BaseException:
        stats.outcome = Outcome.CLIENT_DISCONNECT
        if stats.trace is not None:
            stats.trace.client_disconnected()
        raise
    else:
        stats.outcome = Outcome.DONE
        stats.first_token_at = trio.current_time()
        stats.deployment = deployment.name
        if stats.trace is not None:
            stats.trace.served_by(deployment)
        answer = _json_object(upstream_response.content)
        stats.usage_completion_tokens, stats.usage_input_tokens = _usage(answer)
        if stats.trace is not None:
            stats.trace.answered(answer)
    finally:
        stats.ended_at = trio.current_time()
        metrics.stream_finished(stats)
        if stream_log.isEnabledFor(logging.INFO):  # the figures only for a line that is written
            stream_log.info({"event": "completion", **stats.figures()})
    # A provider may echo what it was sent (a key among it).
    body = _scrub(state.scrubber, upstream_response.content)
    response = Response(body, status=upstream_response.status_code, content_type="application/json")
    response.headers["x-sluice-deployment"] = deployment.name
    return response


def _json_object(content: bytes) -> dict[str, Any]:
    """A non-streamed answer's JSON object (``{}`` when it is none)."""
    try:
        document = json.loads(content)
    except ValueError:
        return {}
    return document if isinstance(document, dict) else {}


def _usage(answer: dict[str, Any]) -> tuple[int | None, int | None]:
    """(output, input) tokens of a non-streamed answer, whatever the API calls them."""
    usage = answer.get("usage") or {}
    if not isinstance(usage, dict):
        return None, None
    output = usage.get("completion_tokens", usage.get("output_tokens"))
    given = usage.get("prompt_tokens", usage.get("input_tokens"))
    return (output if isinstance(output, int) else None), (given if isinstance(given, int) else None)


def _scrub(scrubber: Scrubber | None, body: bytes) -> bytes:
    return scrubber.scrub(body) if scrubber is not None else body


# --- non-streaming APIs -------------------------------------------------------------------


def _parse_model_request(raw: bytes, max_model_name_length: int | None) -> ForwardedRequest:
    """Any JSON request routed by its ``model`` (embeddings): validated that far, forwarded as it is."""
    body = load_json_object(raw)
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise errors.InvalidRequest("'model' is required and must be a string.", param="model")
    check_model_name_length(model, max_model_name_length)
    return ForwardedRequest(
        raw=raw, body=body, validated=None, model_name=model, stream=False, backpressure_strategy=None,
        new_framer=CHAT.new_framer,
    )


async def _relay_one(grammar: Grammar, api_name: str, path: str, parse: Any) -> Response:
    state = _state()
    settings = state.settings
    g.api = api_name
    raw = await request.get_data(cache=False)
    parsed = parse(raw, max_model_name_length=settings.max_model_name_length)
    g.model = parsed.model_name
    trace = _trace(state)
    if trace is not None:
        trace.request(parsed.model_name, parsed.body)
    router = state.router
    assert router is not None
    route = router.route(parsed.model_name, api_name)
    stats = await _admit(state, parsed, settings.backpressure.value, api_name)
    call = UpstreamCall(api_name, path, _call(grammar, trace).headers)

    def count_attempt() -> None:
        stats.upstream_attempts += 1

    return await _complete(state, router, route, parsed, stats, call, count_attempt)


@api.post("/v1/embeddings")
async def embeddings() -> Response:
    return await _relay_one(CHAT, "embeddings", "/embeddings", _parse_model_request)


@api.post("/v1/messages/count_tokens")
async def count_tokens() -> Response:
    return await _relay_one(MESSAGES, "messages", COUNT_TOKENS_PATH, parse_count_tokens_request)


@api.get("/v1/models")
async def models() -> Response:
    state = _state()
    router = state.router
    assert router is not None
    if router.passthrough is None:
        return Response(router.models_document(), status=200, content_type="application/json")
    upstream_response = await router.default_client.list_models()
    return Response(_scrub(state.scrubber, upstream_response.content), status=200, content_type="application/json")


@api.route("/v1/<path:rest>", methods=["GET", "POST", "PUT", "PATCH", "DELETE"])
async def passthrough(rest: str) -> Response:
    """Any other ``/v1`` route, relayed as it is to the one upstream (with no models configured)."""
    state = _state()
    router = state.router
    assert router is not None
    path = f"/v1/{rest}"
    if path in _KNOWN_POST_PATHS or request.method == "HEAD":
        # (HEAD: werkzeug adds it to every GET rule; an upstream API has no use for it.)
        raise errors.MethodNotAllowed(f"Method {request.method} is not allowed for {path}.", headers={"allow": "POST"})
    if router.passthrough is None:
        raise errors.NotFound(f"Unknown request URL: {request.method} {path}.")
    body = await request.get_data(cache=False)
    headers = [
        (name.lower().encode(), value.encode())
        for name, value in request.headers.items()
        if name.lower() in ("content-type", "accept", "openai-beta")
    ]
    headers += trace_headers(_trace(state))
    target = f"/{rest}" + (f"?{request.query_string.decode()}" if request.query_string else "")
    upstream = await router.default_client.forward(request.method, target, body, headers)  # type: ignore[arg-type]
    response = Response(
        _scrub(state.scrubber, upstream.content),
        status=upstream.status_code,
        content_type=upstream.headers.get("content-type", "application/json"),
    )
    return response
