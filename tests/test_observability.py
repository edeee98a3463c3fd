"""/metrics in Prometheus format, request ids and one JSON log line per request (issue 6)."""

from __future__ import annotations

import json
import logging
import threading

import httpx2
import pytest
import trio
from prometheus_client.parser import text_string_to_metric_families

from sluice.config import DeploymentConfig, ModelConfig
from sluice.logs import JsonFormatter

from .rawclient import RawStream
from .support import Gateway, GatewayFactory, RunningSimulator, chat_body, stream_chat, wait_until


def samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    out = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            out[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return out


async def test_metrics_count_requests_tokens_latency_disconnects_and_drops(gateway: Gateway) -> None:
    async with httpx2.AsyncClient(base_url=gateway.url) as http:
        for _ in range(3):
            _, sse = await stream_chat(http, chat_body("sim:tokens=7"))
            assert sse.ended_with_done
        assert (await http.post("/v1/chat/completions", json={"model": "x"})).status_code == 400
        _, retried = await stream_chat(http, chat_body("sim:fault=status,status_code=503,fail_times=1,fault_key=m1,tokens=2"))
        assert retried.ended_with_done
        # A client that stops reading: its relay fills its byte budget, then it leaves.
        raw = await RawStream.open(gateway.url, chat_body("sim:tokens=100000"), rcvbuf=4096)
        await raw.read_head()
        await wait_until(lambda: any(relay.budget.waiting for relay in gateway.state.relays))
        assert samples((await http.get("/metrics")).text)[("sluice_relay_buffered_bytes", ())] > 0
        await raw.close_rst()
        await wait_until(lambda: gateway.state.metrics.active_streams == 0)
        _, dropped = await stream_chat(
            http, chat_body("sim:tokens=3"), headers={"x-sluice-backpressure": "drop_newest"}
        )
        response = await http.get("/metrics")
    assert response.headers["content-type"].startswith("text/plain; version=0.0.4")
    got = samples(response.text)
    assert got[("sluice_requests_total", (("api", "chat"), ("model", "sim:tokens=7"), ("status", "200")))] == 3
    # refused before its model was known (the body failed validation): model "-"
    assert got[("sluice_requests_total", (("api", "chat"), ("model", "-"), ("status", "400")))] == 1
    assert got[("sluice_tokens_total", (("api", "chat"), ("model", "sim:tokens=7"),))] == 21
    assert got[("sluice_streams_active", ())] == 0
    assert got[("sluice_time_to_first_token_seconds_count", (("api", "chat"),))] >= 5
    assert got[("sluice_stream_duration_seconds_count", (("api", "chat"),))] == 6
    assert got[("sluice_upstream_retries_total", ())] == 1
    assert got[("sluice_upstream_errors_total", (("code", "http_503"),))] == 1
    assert got[("sluice_client_disconnects_total", ())] == 1
    assert got[("sluice_backpressure_dropped_total", ())] == 0  # a fast reader: nothing dropped
    assert got[("sluice_channel_peak_depth", ())] == gateway.state.metrics.peak_queue_max >= 1
    assert got[("sluice_relay_buffered_bytes", ())] == 0  # given back when the stream ended
    assert got[("sluice_memory_budget_bytes", ())] == gateway.settings.memory_budget
    assert got[("sluice_memory_budget_refusals_total", ())] == 0
    assert got[("sluice_max_streams", ())] == gateway.settings.max_streams
    # the stalled client held its producer back until it left
    assert got[("sluice_producer_blocked_seconds_total", ())] > 0
    for name in ("sluice_hedges", "sluice_fallbacks", "sluice_rate_limited", "sluice_deployment_cooldowns", "sluice_deployment_failures"):
        assert f"# TYPE {name}_total counter" in response.text  # declared, even at zero


async def test_a_stream_that_breaks_mid_way_is_counted_by_its_error_code(gateway: Gateway) -> None:
    """The figures say ``error:<code>``; /metrics counts the code itself, and the outcome once."""
    async with httpx2.AsyncClient(base_url=gateway.url) as http:
        _, broken = await stream_chat(http, chat_body("sim:tokens=50,fault=reset,after=5"))
        _, relayed = await stream_chat(http, chat_body("sim:tokens=10,fault=error_event,after=4"))
        _, done = await stream_chat(http, chat_body("sim:tokens=3"))
        got = samples((await http.get("/metrics")).text)
    assert broken.figures["outcome"] == "error:stream_interrupted" and broken.figures["hedge"] == "none"
    assert relayed.figures["outcome"] == "error:upstream_error_event"
    assert done.figures["outcome"] == "done"
    assert got[("sluice_upstream_errors_total", (("code", "stream_interrupted"),))] == 1
    assert got[("sluice_upstream_errors_total", (("code", "upstream_error_event"),))] == 1
    assert gateway.state.metrics.snapshot()["outcomes"] == {
        "error:stream_interrupted": 1,
        "error:upstream_error_event": 1,
        "done": 1,
    }


async def test_every_response_carries_a_request_id_and_the_client_s_is_kept(gateway: Gateway) -> None:
    async with httpx2.AsyncClient(base_url=gateway.url) as http:
        mine = await http.post("/v1/chat/completions", json=chat_body(stream=False), headers={"x-request-id": "req-42"})
        error = await http.post("/v1/chat/completions", content=b"{", headers={"x-request-id": "req-43"})
        fresh = await http.get("/v1/models")
        stream, _ = await stream_chat(http, chat_body(), headers={"x-request-id": "req-44"})
        missing = await http.get("/nope")
    assert mine.headers["x-request-id"] == "req-42"
    assert error.headers["x-request-id"] == "req-43" and error.status_code == 400
    assert stream.headers["x-request-id"] == "req-44"
    assert len(fresh.headers["x-request-id"]) == 32 and len(missing.headers["x-request-id"]) == 32


async def test_one_json_log_line_per_request_with_its_id(gateway: Gateway, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO)
    async with httpx2.AsyncClient(base_url=gateway.url) as http:
        await stream_chat(http, chat_body("sim:tokens=4"), headers={"x-request-id": "s-1"})
        await http.post("/v1/chat/completions", json=chat_body(stream=False), headers={"x-request-id": "c-1"})
        await http.post("/v1/chat/completions", json={"model": "m"}, headers={"x-request-id": "e-1"})
    formatter = JsonFormatter()
    lines = [json.loads(formatter.format(r)) for r in caplog.records if r.name in ("sluice.stream", "sluice.request")]
    by_id = {line["request_id"]: line for line in lines}
    assert sorted(by_id) == ["c-1", "e-1", "s-1"] and len(lines) == 3
    assert by_id["s-1"]["event"] == "stream" and by_id["s-1"]["tokens"] == 4 and by_id["s-1"]["outcome"] == "done"
    assert by_id["c-1"]["event"] == "completion" and by_id["c-1"]["status"] == 200
    assert by_id["e-1"]["event"] == "request" and by_id["e-1"]["status"] == 400


def test_registered_secrets_never_reach_a_log_line() -> None:
    from sluice.logs import redact

    redact("sk-super-secret-provider-key", "short")
    record = logging.LogRecord("sluice", logging.WARNING, __file__, 1, "upstream said: bad key sk-super-secret-provider-key", None, None)
    line = JsonFormatter().format(record)
    assert "sk-super-secret-provider-key" not in line and "[redacted]" in line


async def test_client_chosen_labels_are_bounded_and_configured_models_always_shown(
    start_gateway: GatewayFactory, simulator: RunningSimulator
) -> None:
    gateway = await start_gateway(
        metrics_max_label_values=5,
        models=[
            ModelConfig(name="gpt-public", deployments=[DeploymentConfig(base_url=simulator.base_url, model="sim:tokens=2")]),
            ModelConfig(name="*", deployments=[DeploymentConfig(base_url=simulator.base_url)]),
        ],
    )
    names = [f"sim:tokens=1,seed={i}" + "x" * 200 for i in range(40)]
    async with httpx2.AsyncClient(base_url=gateway.url) as http:
        for name in names:  # through the "*" route: each one a new client-chosen name
            assert (await http.post("/v1/chat/completions", json=chat_body(name, stream=False))).status_code == 200
        for status in (429, 500, 501, 502, 503, 504, 505, 418, 409, 410):  # upstream-chosen statuses and error codes
            await http.post("/v1/chat/completions", json=chat_body(f"sim:fault=status,status_code={status}", stream=False))
        # the configured model, asked for only after the budget is spent, still has its own series
        assert (await http.post("/v1/chat/completions", json=chat_body("gpt-public", stream=False))).status_code == 200
        text = (await http.get("/metrics")).text
    got = samples(text)
    models = {dict(labels)["model"] for name, labels in got if name == "sluice_requests_total"}
    statuses = {dict(labels)["status"] for name, labels in got if name == "sluice_requests_total"}
    codes = {dict(labels)["code"] for name, labels in got if name == "sluice_upstream_errors_total"}
    assert "gpt-public" in models and "other" in models
    assert len(models - {"gpt-public"}) <= 5 + 1  # the budget, plus "other"
    assert len(statuses) <= 5 + 1 and "other" in statuses
    assert len(codes) <= 5 + 1 and "other" in codes
    # every request is still counted, folded or not
    assert sum(v for (name, _), v in got.items() if name == "sluice_requests_total") == len(names) + 10 + 1
    assert len(text) < 20_000  # the 200-character names would make the body grow with every new one


async def test_metrics_render_in_a_thread_while_the_loop_keeps_serving(gateway: Gateway, monkeypatch: pytest.MonkeyPatch) -> None:
    entered, release = threading.Event(), threading.Event()
    released_by_test: list[bool] = []
    prometheus = gateway.state.prometheus
    real_render = prometheus.render

    def blocking_render() -> bytes:
        entered.set()
        # On the event loop this would block the whole process (the test too) until the timeout.
        released_by_test.append(release.wait(timeout=10))
        return real_render()

    monkeypatch.setattr(prometheus, "render", blocking_render)
    async with httpx2.AsyncClient(base_url=gateway.url, timeout=30) as http:
        async with trio.open_nursery() as nursery:
            scraped: list[httpx2.Response] = []

            async def scrape() -> None:
                scraped.append(await http.get("/metrics"))

            nursery.start_soon(scrape)
            await wait_until(entered.is_set, timeout=20)
            # the render is in progress: the same gateway still answers, and a stream still completes
            assert (await http.get("/health")).status_code == 200
            _, sse = await stream_chat(http, chat_body("sim:tokens=5"))
            assert sse.ended_with_done
            release.set()
    assert released_by_test == [True]
    assert scraped[0].status_code == 200 and "sluice_requests_total" in scraped[0].text


async def test_a_stream_s_log_line_is_built_only_when_its_level_is_on(
    caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    from sluice.metrics import GatewayMetrics, Outcome, StreamStats
    from sluice.outcome import settle

    built = 0
    figures = StreamStats.figures

    def counting(self: StreamStats) -> dict[str, object]:
        nonlocal built
        built += 1
        return figures(self)

    monkeypatch.setattr(StreamStats, "figures", counting)
    metrics = GatewayMetrics()
    for level, lines, figures_built in ((logging.WARNING, 0, 0), (logging.INFO, 1, 1)):
        caplog.clear()
        caplog.set_level(level, logger="sluice.stream")
        stats = StreamStats("r-1", "m", "block")
        stats.outcome = Outcome.DONE
        metrics.stream_started()
        built = 0
        settle(stats, metrics)
        assert built == figures_built
        assert len([r for r in caplog.records if r.name == "sluice.stream"]) == lines
    assert metrics.outcomes["done"] == 2  # counted either way
