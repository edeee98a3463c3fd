"""OpenTelemetry tracing (issue 16): one SERVER span per /v1 request, W3C context in and out, OTLP export.

Gateways run in the test's trio loop and are handed an SDK ``TracerProvider``
with an in-memory exporter, so the spans are read as the SDK recorded them;
the last test runs a real gateway process configured only by the standard
``OTEL_*`` variables and reads what it exports over OTLP/HTTP.
"""

from __future__ import annotations

import http.server
import signal
import subprocess
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx2
import pytest
import trio
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind, StatusCode

from deploy.fleet import free_port
from sluice.config import DeploymentConfig, ModelConfig, Settings, VirtualKeyConfig
from sluice.tracing import build_tracing, finish_reasons, otlp_endpoint

from .rawclient import RawStream
from .support import GatewayFactory, RunningSimulator, SimulatorFactory, chat_body, stream_chat, wait_until
from .test_serve_process import _ENV, serve_command

#: the client's W3C context: trace 0af7651916cd43dd8448eb211c80319c, its span b7ad6b7169203331
CLIENT_TRACE_ID = 0x0AF7651916CD43DD8448EB211C80319C
CLIENT_SPAN_ID = 0xB7AD6B7169203331
CLIENT_TRACEPARENT = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"
CLIENT_TRACESTATE = "vendor=opaque"


@pytest.fixture
def exporter() -> InMemorySpanExporter:
    return InMemorySpanExporter()


@pytest.fixture
def provider(exporter: InMemorySpanExporter) -> TracerProvider:
    traced = TracerProvider()
    traced.add_span_processor(SimpleSpanProcessor(exporter))
    return traced


def only_span(exporter: InMemorySpanExporter) -> ReadableSpan:
    [span] = exporter.get_finished_spans()
    return span


async def ended_span(exporter: InMemorySpanExporter) -> ReadableSpan:
    """The request's span once the gateway released the request (a client may read its end first)."""
    await wait_until(lambda: len(exporter.get_finished_spans()) == 1)
    return only_span(exporter)


def event_names(span: ReadableSpan) -> list[str]:
    return [event.name for event in span.events]


def event(span: ReadableSpan, name: str) -> dict[str, Any]:
    [found] = [dict(e.attributes or {}) for e in span.events if e.name == name]
    return found


def upstream_traceparent(sim: RunningSimulator) -> tuple[int, int, str | None]:
    """(trace id, parent span id, tracestate) of what the simulator received in its last request."""
    record = sim.stats.records[-1]
    _, trace_id, parent_id, _ = record["traceparent"].split("-")
    return int(trace_id, 16), int(parent_id, 16), record["tracestate"]


def deployment(sim: RunningSimulator, model: str = "sim:tokens=5", **extra: Any) -> DeploymentConfig:
    return DeploymentConfig(base_url=sim.base_url, model=model, **extra)


# --- one span per request, its attributes ------------------------------------------------


async def test_a_chat_stream_is_one_server_span_continuing_the_clients_trace_and_passed_to_the_upstream(
    start_gateway: GatewayFactory, simulator: RunningSimulator, provider: TracerProvider, exporter: InMemorySpanExporter
) -> None:
    gateway = await start_gateway(tracer_provider=provider)
    body = chat_body("sim:tokens=5", max_tokens=50, temperature=0.5, top_p=0.9)
    async with httpx2.AsyncClient(base_url=gateway.url) as http:
        _, sse = await stream_chat(http, body, headers={"traceparent": CLIENT_TRACEPARENT, "tracestate": CLIENT_TRACESTATE})
    assert sse.ended_with_done
    span = await ended_span(exporter)
    assert span.kind is SpanKind.SERVER
    assert span.name == "chat sim:tokens=5"
    # The client's trace continues: same trace, the client's span is the parent.
    assert span.context.trace_id == CLIENT_TRACE_ID
    assert span.parent is not None and span.parent.span_id == CLIENT_SPAN_ID and span.parent.is_remote
    # The upstream's parent is the gateway's span, in the client's trace, with the client's tracestate.
    assert upstream_traceparent(simulator) == (CLIENT_TRACE_ID, span.context.span_id, CLIENT_TRACESTATE)
    attributes = dict(span.attributes or {})
    assert {k: v for k, v in attributes.items() if not k.startswith("sluice.t")} == {
        "http.request.method": "POST",
        "http.route": "/v1/chat/completions",
        "http.response.status_code": 200,
        "gen_ai.operation.name": "chat",
        "gen_ai.provider.name": "openai",
        "gen_ai.request.model": "sim:tokens=5",
        "gen_ai.response.model": "sim:tokens=5",
        "gen_ai.request.max_tokens": 50,
        "gen_ai.request.temperature": 0.5,
        "gen_ai.request.top_p": 0.9,
        "gen_ai.usage.input_tokens": sse.figures["input_tokens"],
        "gen_ai.usage.output_tokens": 5,
        "sluice.api": "chat",
        "sluice.stream": True,
        "sluice.outcome": "done",
        "sluice.backpressure": "block",
        "sluice.upstream_attempts": 1,
        "sluice.deployment": "default",
        "sluice.content_deltas": 5,
    }
    assert attributes["sluice.ttft"] == pytest.approx(sse.figures["ttft_ms"] / 1000.0, abs=1e-6)
    assert attributes["sluice.tokens_per_second"] > 0
    assert span.status.status_code is StatusCode.UNSET
    assert event_names(span) == ["sluice.first_token"]


@pytest.mark.parametrize(
    ("path", "body", "api", "output_tokens"),
    [
        ("/v1/responses", {"model": "sim:tokens=4", "input": "hello", "stream": True, "max_output_tokens": 20}, "responses", 4),
        (
            "/v1/messages",
            {"model": "sim:tokens=4", "max_tokens": 20, "stream": True, "messages": [{"role": "user", "content": "hi"}]},
            "messages",
            4,
        ),
    ],
)
async def test_responses_and_messages_streams_get_the_same_span(
    start_gateway: GatewayFactory,
    simulator: RunningSimulator,
    provider: TracerProvider,
    exporter: InMemorySpanExporter,
    path: str,
    body: dict[str, Any],
    api: str,
    output_tokens: int,
) -> None:
    gateway = await start_gateway(tracer_provider=provider)
    async with httpx2.AsyncClient(base_url=gateway.url) as http:
        response = await http.post(path, json=body, headers={"traceparent": CLIENT_TRACEPARENT})
    assert response.status_code == 200
    span = await ended_span(exporter)
    attributes = dict(span.attributes or {})
    assert span.name == "chat sim:tokens=4" and span.context.trace_id == CLIENT_TRACE_ID
    assert attributes["http.route"] == path and attributes["sluice.api"] == api
    assert attributes["gen_ai.operation.name"] == "chat" and attributes["gen_ai.request.max_tokens"] == 20
    assert attributes["gen_ai.usage.output_tokens"] == output_tokens
    assert attributes["gen_ai.usage.input_tokens"] > 0
    assert attributes["sluice.outcome"] == "done" and attributes["sluice.stream"] is True
    assert "sluice.first_token" in event_names(span)
    assert upstream_traceparent(simulator)[:2] == (CLIENT_TRACE_ID, span.context.span_id)


async def test_a_request_without_traceparent_starts_a_trace_that_the_upstream_continues(
    start_gateway: GatewayFactory, simulator: RunningSimulator, provider: TracerProvider, exporter: InMemorySpanExporter
) -> None:
    gateway = await start_gateway(tracer_provider=provider)
    async with httpx2.AsyncClient(base_url=gateway.url) as http:
        response = await http.post("/v1/chat/completions", json=chat_body("sim:tokens=3", stream=False))
    assert response.status_code == 200
    span = await ended_span(exporter)
    assert span.parent is None
    assert upstream_traceparent(simulator) == (span.context.trace_id, span.context.span_id, None)
    attributes = dict(span.attributes or {})
    assert attributes["sluice.stream"] is False and attributes["sluice.outcome"] == "done"
    assert attributes["gen_ai.usage.output_tokens"] == 3 and attributes["http.response.status_code"] == 200
    assert attributes["gen_ai.response.finish_reasons"] == (response.json()["choices"][0]["finish_reason"],)
    assert "sluice.ttft" not in attributes and event_names(span) == []


@pytest.mark.parametrize(
    ("method", "path", "body", "name", "operation"),
    [
        ("POST", "/v1/embeddings", {"model": "sim", "input": "hi"}, "embeddings sim", "embeddings"),
        (
            "POST",
            "/v1/messages/count_tokens",
            {"model": "sim", "messages": [{"role": "user", "content": "hi"}]},
            "count_tokens sim",
            "count_tokens",
        ),
        ("GET", "/v1/models", None, "GET /v1/models", None),
    ],
)
async def test_every_v1_route_gets_a_span(
    start_gateway: GatewayFactory,
    provider: TracerProvider,
    exporter: InMemorySpanExporter,
    method: str,
    path: str,
    body: dict[str, Any] | None,
    name: str,
    operation: str | None,
) -> None:
    gateway = await start_gateway(tracer_provider=provider)
    async with httpx2.AsyncClient(base_url=gateway.url) as http:
        response = await http.request(method, path, json=body)
    assert response.status_code == 200
    span = await ended_span(exporter)
    attributes = dict(span.attributes or {})
    assert span.name == name and attributes["http.response.status_code"] == 200
    assert attributes.get("gen_ai.operation.name") == operation


async def test_a_refused_request_has_an_error_type_and_a_key_name_but_never_the_key(
    start_gateway: GatewayFactory,
    start_simulator: SimulatorFactory,
    provider: TracerProvider,
    exporter: InMemorySpanExporter,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("TEAM_KEY", "sk-team-secret-0123456789")
    sim = await start_simulator()
    gateway = await start_gateway(
        tracer_provider=provider,
        keys=[VirtualKeyConfig(name="team-a", key_env="TEAM_KEY")],
        models=[ModelConfig(name="m", deployments=[deployment(sim)])],
    )
    async with httpx2.AsyncClient(base_url=gateway.url, headers={"authorization": "Bearer sk-team-secret-0123456789"}) as http:
        response = await http.post("/v1/chat/completions", json=chat_body("unknown"))
    assert response.status_code == 404
    span = await ended_span(exporter)
    attributes = dict(span.attributes or {})
    assert attributes["http.response.status_code"] == 404 and attributes["error.type"] == "model_not_found"
    assert attributes["sluice.key"] == "team-a"
    assert span.status.status_code is StatusCode.UNSET  # a client's error is not the server's failure
    assert "sk-team-secret" not in repr(span.to_json())


# --- events: retries, fallbacks, hedges, disconnects, error events -----------------------


async def test_a_retry_is_an_event_with_the_failed_attempts_code(
    start_gateway: GatewayFactory, provider: TracerProvider, exporter: InMemorySpanExporter
) -> None:
    gateway = await start_gateway(tracer_provider=provider, retry_backoff_initial=0, retry_backoff_max=0)
    model = "sim:tokens=3,fault=status,status_code=503,fail_times=1,fault_key=tracing-retry"
    async with httpx2.AsyncClient(base_url=gateway.url) as http:
        _, sse = await stream_chat(http, chat_body(model))
    assert sse.ended_with_done
    span = await ended_span(exporter)
    assert event(span, "sluice.retry") == {"sluice.deployment": "default", "sluice.attempt": 2, "error.type": "http_503"}
    assert dict(span.attributes or {})["sluice.upstream_attempts"] == 2


async def test_a_fallback_is_an_event_naming_both_deployments_and_why(
    start_gateway: GatewayFactory, start_simulator: SimulatorFactory, provider: TracerProvider, exporter: InMemorySpanExporter
) -> None:
    failing, healthy = await start_simulator(), await start_simulator()
    gateway = await start_gateway(
        tracer_provider=provider,
        retry_max_attempts=1,
        models=[
            ModelConfig(
                name="m",
                strategy="weighted",
                deployments=[
                    deployment(failing, "sim:fault=status,status_code=503", weight=1e6, name="failing"),
                    deployment(healthy, "sim:tokens=3", weight=1e-6, name="healthy"),
                ],
            )
        ],
    )
    async with httpx2.AsyncClient(base_url=gateway.url) as http:
        _, sse = await stream_chat(http, chat_body("m"))
    assert sse.ended_with_done
    span = await ended_span(exporter)
    assert event(span, "sluice.fallback") == {
        "sluice.from_deployment": "failing",
        "sluice.deployment": "healthy",
        "error.type": "http_503",
    }
    attributes = dict(span.attributes or {})
    assert attributes["sluice.deployment"] == "healthy" and attributes["gen_ai.response.model"] == "sim:tokens=3"


async def test_an_error_event_before_content_is_reopened_elsewhere_as_a_fallback_event(
    start_gateway: GatewayFactory, start_simulator: SimulatorFactory, provider: TracerProvider, exporter: InMemorySpanExporter
) -> None:
    failing, healthy = await start_simulator(), await start_simulator()
    gateway = await start_gateway(
        tracer_provider=provider,
        models=[
            ModelConfig(
                name="m",
                strategy="weighted",
                deployments=[
                    deployment(failing, "sim:tokens=3,fault=error_event,after=0", weight=1e6, name="failing"),
                    deployment(healthy, "sim:tokens=3", weight=1e-6, name="healthy"),
                ],
            )
        ],
    )
    async with httpx2.AsyncClient(base_url=gateway.url) as http:
        _, sse = await stream_chat(http, chat_body("m"))
    assert sse.ended_with_done
    span = await ended_span(exporter)
    assert event(span, "sluice.fallback") == {
        "sluice.from_deployment": "failing",
        "sluice.deployment": "healthy",
        "error.type": "upstream_error_event",
    }
    assert event_names(span) == ["sluice.fallback", "sluice.first_token"]


async def test_a_hedge_start_and_win_are_events_and_the_winner_is_the_deployment(
    start_gateway: GatewayFactory, start_simulator: SimulatorFactory, provider: TracerProvider, exporter: InMemorySpanExporter
) -> None:
    slow, fast = await start_simulator(), await start_simulator()
    gateway = await start_gateway(
        tracer_provider=provider,
        models=[
            ModelConfig(
                name="m",
                strategy="weighted",
                hedge_after_ms=100,
                deployments=[
                    deployment(slow, "sim:tokens=5,ttft_ms=30000", weight=1e6, name="slow"),
                    deployment(fast, "sim:tokens=5", weight=1e-6, name="fast"),
                ],
            )
        ],
    )
    async with httpx2.AsyncClient(base_url=gateway.url) as http:
        _, sse = await stream_chat(http, chat_body("m"))
    assert sse.figures["hedge"] == "won"
    span = await ended_span(exporter)
    assert event_names(span) == ["sluice.hedge.start", "sluice.first_token", "sluice.hedge.win"]
    assert event(span, "sluice.hedge.start") == {"sluice.deployment": "fast"}
    assert event(span, "sluice.hedge.win") == {"sluice.hedge.leg": "hedge", "sluice.deployment": "fast"}
    assert dict(span.attributes or {})["sluice.deployment"] == "fast"
    # Both upstream requests carry the gateway's span as their parent.
    assert slow.stats.records[-1]["traceparent"] == fast.stats.records[-1]["traceparent"]


async def test_a_client_that_leaves_mid_stream_is_an_event_and_the_outcome(
    start_gateway: GatewayFactory, provider: TracerProvider, exporter: InMemorySpanExporter
) -> None:
    gateway = await start_gateway(tracer_provider=provider)
    raw = await RawStream.open(gateway.url, chat_body("sim:tokens=1000,itl_ms=20"))
    await raw.read_until(b"data: ")
    await raw.close_rst()
    span = await ended_span(exporter)
    attributes = dict(span.attributes or {})
    assert attributes["sluice.outcome"] == "client_disconnect"
    assert event_names(span) == ["sluice.first_token", "sluice.client_disconnect"]
    assert span.status.status_code is StatusCode.UNSET


async def test_a_stream_that_breaks_is_an_error_span_with_its_error_event(
    start_gateway: GatewayFactory, provider: TracerProvider, exporter: InMemorySpanExporter
) -> None:
    gateway = await start_gateway(tracer_provider=provider)
    async with httpx2.AsyncClient(base_url=gateway.url) as http:
        _, sse = await stream_chat(http, chat_body("sim:tokens=10,fault=reset,after=3"))
    assert not sse.ended_with_done
    span = await ended_span(exporter)
    code = sse.figures["outcome"].removeprefix("error:")
    assert span.status.status_code is StatusCode.ERROR
    assert dict(span.attributes or {})["error.type"] == code
    assert event(span, "sluice.error_event") == {"error.type": code}


# --- off --------------------------------------------------------------------------------


async def test_without_an_endpoint_nothing_is_traced_and_the_clients_context_passes_unchanged(
    start_gateway: GatewayFactory, simulator: RunningSimulator, monkeypatch: pytest.MonkeyPatch
) -> None:
    for name in ("OTEL_EXPORTER_OTLP_ENDPOINT", "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT"):
        monkeypatch.delenv(name, raising=False)
    gateway = await start_gateway()
    assert gateway.state.tracing is None
    async with httpx2.AsyncClient(base_url=gateway.url) as http:
        _, sse = await stream_chat(
            http, chat_body("sim:tokens=2"), headers={"traceparent": CLIENT_TRACEPARENT, "tracestate": CLIENT_TRACESTATE}
        )
        assert sse.ended_with_done
        assert simulator.stats.records[-1]["traceparent"] == CLIENT_TRACEPARENT
        assert simulator.stats.records[-1]["tracestate"] == CLIENT_TRACESTATE
        response = await http.post("/v1/chat/completions", json=chat_body("sim:tokens=2", stream=False))
        assert response.status_code == 200
    assert "traceparent" not in simulator.stats.records[-1]  # none invented


def test_tracing_is_on_exactly_when_an_endpoint_is_configured(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("OTEL_EXPORTER_OTLP_ENDPOINT", "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT"):
        monkeypatch.delenv(name, raising=False)
    assert otlp_endpoint(Settings()) is None and build_tracing(Settings()) is None
    assert otlp_endpoint(Settings(otel_endpoint="http://collector:4318")) == "http://collector:4318"
    assert otlp_endpoint(Settings(), {"OTEL_EXPORTER_OTLP_ENDPOINT": "http://c:4318"}) == "http://c:4318"
    assert otlp_endpoint(Settings(), {"OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": "http://c:4318/v1/traces"}) is not None
    assert otlp_endpoint(Settings(otel_endpoint="http://c:4318"), {"OTEL_SDK_DISABLED": "true"}) is None
    monkeypatch.setenv("SLUICE_OTEL_ENDPOINT", "http://127.0.0.1:4318")
    assert Settings().otel_endpoint == "http://127.0.0.1:4318"
    with pytest.raises(ValueError):
        Settings(otel_endpoint="collector:4318")


@pytest.mark.parametrize(
    ("setting", "variable", "expected"),
    [(None, None, "sluice"), (None, "from-env", "from-env"), ("from-setting", "from-env", "from-setting")],
)
def test_the_service_name_is_the_setting_then_otel_service_name_then_sluice(
    monkeypatch: pytest.MonkeyPatch, setting: str | None, variable: str | None, expected: str
) -> None:
    monkeypatch.delenv("OTEL_RESOURCE_ATTRIBUTES", raising=False)
    if variable is None:
        monkeypatch.delenv("OTEL_SERVICE_NAME", raising=False)
    else:
        monkeypatch.setenv("OTEL_SERVICE_NAME", variable)
    tracing = build_tracing(Settings(otel_endpoint="http://127.0.0.1:9", otel_service_name=setting))
    assert tracing is not None
    try:
        assert tracing.provider.resource.attributes["service.name"] == expected
    finally:
        tracing.provider.shutdown()


# --- a real process, a real OTLP/HTTP export -------------------------------------------------


class _OTLPReceiver(http.server.ThreadingHTTPServer):
    """Accepts ``POST /v1/traces`` (protobuf) and keeps what it decoded."""

    def __init__(self) -> None:
        super().__init__(("127.0.0.1", 0), _OTLPHandler)
        self.requests: list[ExportTraceServiceRequest] = []
        self.paths: list[str] = []

    def spans(self) -> list[tuple[str, Any]]:
        """(service.name, span) of every span received."""
        found = []
        for export in self.requests:
            for resource_spans in export.resource_spans:
                attributes = {a.key: a.value.string_value for a in resource_spans.resource.attributes}
                for scope_spans in resource_spans.scope_spans:
                    found.extend((attributes.get("service.name"), span) for span in scope_spans.spans)
        return found


class _OTLPHandler(http.server.BaseHTTPRequestHandler):
    server: _OTLPReceiver

    def do_POST(self) -> None:  # noqa: N802 (the stdlib's name)
        body = self.rfile.read(int(self.headers["content-length"]))
        self.server.paths.append(self.path)
        if self.path == "/v1/traces" and self.headers["content-type"] == "application/x-protobuf":
            export = ExportTraceServiceRequest()
            export.ParseFromString(body)
            self.server.requests.append(export)
        self.send_response(200)
        self.send_header("content-type", "application/x-protobuf")
        self.send_header("content-length", "0")
        self.end_headers()

    def log_message(self, format: str, *args: Any) -> None:
        pass


@pytest.fixture
def otlp_receiver() -> Iterator[_OTLPReceiver]:
    receiver = _OTLPReceiver()
    thread = threading.Thread(target=receiver.serve_forever, daemon=True)
    thread.start()
    try:
        yield receiver
    finally:
        receiver.shutdown()
        receiver.server_close()


async def test_a_gateway_process_exports_its_spans_over_otlp_http_configured_by_the_standard_variables(
    otlp_receiver: _OTLPReceiver, tmp_path: Path
) -> None:
    port = free_port()
    env = {
        **_ENV,
        "OTEL_EXPORTER_OTLP_ENDPOINT": f"http://127.0.0.1:{otlp_receiver.server_address[1]}",
        "OTEL_SERVICE_NAME": "sluice-under-test",
        # Nothing leaves before shutdown on its own: the span must come from the drain's flush.
        "OTEL_BSP_SCHEDULE_DELAY": "600000",
    }
    stderr = tmp_path / "stderr"
    with stderr.open("wb") as err:
        process = subprocess.Popen(serve_command(port), env=env, stdout=subprocess.DEVNULL, stderr=err)
    try:
        await _wait_healthy(process, f"http://127.0.0.1:{port}", stderr)
        async with httpx2.AsyncClient(base_url=f"http://127.0.0.1:{port}") as http:
            _, sse = await stream_chat(http, chat_body("sim:tokens=3"), headers={"traceparent": CLIENT_TRACEPARENT})
        assert sse.ended_with_done
        assert otlp_receiver.spans() == []  # still batched
        process.send_signal(signal.SIGTERM)
        code = await trio.to_thread.run_sync(lambda: process.wait(timeout=60))
        assert code == 0, stderr.read_text()
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    assert set(otlp_receiver.paths) == {"/v1/traces"}
    [(service, span)] = otlp_receiver.spans()
    assert service == "sluice-under-test"
    assert span.name == "chat sim:tokens=3" and span.trace_id == CLIENT_TRACE_ID.to_bytes(16, "big")
    assert span.kind == span.SPAN_KIND_SERVER
    attributes = {a.key: a.value for a in span.attributes}
    assert attributes["gen_ai.operation.name"].string_value == "chat"
    assert attributes["gen_ai.usage.output_tokens"].int_value == 3
    assert attributes["sluice.outcome"].string_value == "done"



async def _wait_healthy(process: subprocess.Popen[bytes], url: str, stderr: Path) -> None:
    with trio.fail_after(90):  # a bound, not a timing: start-up is slow on a loaded machine
        while True:
            assert process.poll() is None, stderr.read_text()
            try:
                async with httpx2.AsyncClient() as http:
                    if (await http.get(url + "/health")).status_code == 200:
                        return
            except httpx2.TransportError:
                pass
            await trio.sleep(0.2)


async def test_a_request_that_fails_before_its_head_is_an_error_span_with_its_retries(
    start_gateway: GatewayFactory, provider: TracerProvider, exporter: InMemorySpanExporter
) -> None:
    gateway = await start_gateway(tracer_provider=provider, retry_max_attempts=2, retry_backoff_initial=0, retry_backoff_max=0)
    async with httpx2.AsyncClient(base_url=gateway.url) as http:
        response = await http.post("/v1/chat/completions", json=chat_body("sim:fault=status,status_code=500"))
    assert response.status_code == 502
    span = await ended_span(exporter)
    attributes = dict(span.attributes or {})
    assert span.status.status_code is StatusCode.ERROR
    assert attributes["error.type"] == response.json()["error"]["code"]
    assert attributes["http.response.status_code"] == 502 and attributes["sluice.outcome"].startswith("error:")
    assert [e["sluice.attempt"] for e in (dict(e.attributes or {}) for e in span.events)] == [2]


def test_finish_reasons_are_read_as_each_api_writes_them() -> None:
    assert finish_reasons({"choices": [{"finish_reason": "stop"}, {"finish_reason": "length"}]}) == ["stop", "length"]
    assert finish_reasons({"type": "message", "stop_reason": "end_turn"}) == ["end_turn"]
    assert finish_reasons({"object": "response", "status": "incomplete"}) == ["incomplete"]
    assert finish_reasons({"object": "list", "data": []}) == []


async def test_a_client_that_sampled_its_trace_out_is_followed_and_its_trace_still_reaches_the_upstream(
    start_gateway: GatewayFactory, simulator: RunningSimulator, provider: TracerProvider, exporter: InMemorySpanExporter
) -> None:
    gateway = await start_gateway(tracer_provider=provider)
    not_sampled = CLIENT_TRACEPARENT[:-2] + "00"
    async with httpx2.AsyncClient(base_url=gateway.url) as http:
        _, sse = await stream_chat(http, chat_body("sim:tokens=2"), headers={"traceparent": not_sampled})
    assert sse.ended_with_done
    await wait_until(lambda: gateway.state.metrics.active_streams == 0 and not gateway.state.relays)
    version, trace_id, parent_id, flags = simulator.stats.records[-1]["traceparent"].split("-")
    assert int(trace_id, 16) == CLIENT_TRACE_ID and int(parent_id, 16) != CLIENT_SPAN_ID and flags == "00"
    # A sampled request after it: its span is the only one (parent-based sampling kept the client's "no").
    sampled = "00-11111111111111111111111111111111-2222222222222222-01"
    async with httpx2.AsyncClient(base_url=gateway.url) as http:
        await stream_chat(http, chat_body("sim:tokens=2"), headers={"traceparent": sampled})
    span = await ended_span(exporter)
    assert span.context.trace_id == 0x11111111111111111111111111111111
