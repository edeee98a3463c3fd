"""Routing, fallbacks, cooldowns and hedging across several real simulators (issue 6).

Each deployment is a separate simulator, so its own stats show, from the
upstream's side, which requests the gateway sent where and which it closed.
"""

from __future__ import annotations

from typing import Any

import httpx2
import pytest

from sluice.config import DeploymentConfig, ModelConfig
from sluice.router import ModelRoute

from .rawclient import RawStream
from .support import GatewayFactory, RunningSimulator, SimulatorFactory, chat_body, stream_chat, wait_until

def deployment(sim: RunningSimulator, model: str = "sim:tokens=5", **extra: Any) -> DeploymentConfig:
    return DeploymentConfig(base_url=sim.base_url, model=model, **extra)


async def test_models_lists_the_public_names_and_unknown_models_are_404(
    start_gateway: GatewayFactory, start_simulator: SimulatorFactory
) -> None:
    sim = await start_simulator()
    gateway = await start_gateway(
        models=[ModelConfig(name="alpha", deployments=[deployment(sim)]), ModelConfig(name="beta", deployments=[deployment(sim)])]
    )
    async with httpx2.AsyncClient(base_url=gateway.url) as http:
        listed = (await http.get("/v1/models")).json()
        unknown = await http.post("/v1/chat/completions", json=chat_body("gamma"))
    assert [m["id"] for m in listed["data"]] == ["alpha", "beta"] and listed["object"] == "list"
    assert unknown.status_code == 404
    assert unknown.json()["error"] == {
        "message": "The model 'gamma' does not exist or you do not have access to it.",
        "type": "invalid_request_error",
        "param": "model",
        "code": "model_not_found",
    }
    assert sim.stats.requests_started == 0


async def test_the_deployment_gets_its_own_model_name(
    start_gateway: GatewayFactory, start_simulator: SimulatorFactory
) -> None:
    sim = await start_simulator()
    gateway = await start_gateway(models=[ModelConfig(name="public", deployments=[deployment(sim, "sim:tokens=3")])])
    async with httpx2.AsyncClient(base_url=gateway.url) as http:
        _, sse = await stream_chat(http, chat_body("public"))
        plain = await http.post("/v1/chat/completions", json=chat_body("public", stream=False))
    assert sse.ended_with_done and sse.figures["tokens"] == 3  # the simulator read "sim:tokens=3"
    assert plain.status_code == 200 and plain.json()["usage"]["completion_tokens"] == 3


async def test_least_busy_spreads_streams_evenly(start_gateway: GatewayFactory, start_simulator: SimulatorFactory) -> None:
    sims = [await start_simulator(), await start_simulator()]
    gateway = await start_gateway(
        models=[ModelConfig(name="m", deployments=[deployment(s, "sim:tokens=1000,itl_ms=20") for s in sims])]
    )
    streams = []
    for _ in range(6):
        raw = await RawStream.open(gateway.url, chat_body("m"))
        await raw.read_head()
        streams.append(raw)
    assert [s.stats.active_requests for s in sims] == [3, 3]
    for raw in streams:
        await raw.close_rst()
    await wait_until(lambda: all(s.stats.active_requests == 0 for s in sims))


async def test_weighted_routing_follows_the_weights(start_gateway: GatewayFactory, start_simulator: SimulatorFactory) -> None:
    heavy, light = await start_simulator(), await start_simulator()
    gateway = await start_gateway(
        models=[
            ModelConfig(
                name="m",
                strategy="weighted",
                deployments=[deployment(heavy, weight=3), deployment(light, weight=1)],
            )
        ]
    )
    async with httpx2.AsyncClient(base_url=gateway.url) as http:
        for _ in range(200):
            assert (await http.post("/v1/chat/completions", json=chat_body("m", stream=False))).status_code == 200
    # 200 draws at p=0.75: mean 150, sd ~6; the bounds are ~6 sd wide.
    assert 110 < heavy.stats.requests_started < 190
    assert heavy.stats.requests_started + light.stats.requests_started == 200


@pytest.mark.parametrize("stream", [True, False])
async def test_a_failing_deployment_falls_over_to_the_next(
    start_gateway: GatewayFactory, start_simulator: SimulatorFactory, stream: bool
) -> None:
    failing, healthy = await start_simulator(), await start_simulator()
    gateway = await start_gateway(
        retry_max_attempts=1,
        models=[
            ModelConfig(
                name="m",
                strategy="weighted",  # failing first, by a margin that makes any other order negligible
                deployments=[
                    deployment(failing, "sim:fault=status,status_code=503", weight=1e6, name="failing"),
                    deployment(healthy, weight=1e-6, name="healthy"),
                ],
            )
        ],
    )
    async with httpx2.AsyncClient(base_url=gateway.url) as http:
        if stream:
            response, sse = await stream_chat(http, chat_body("m"))
            assert sse.ended_with_done and sse.figures["deployment"] == "healthy"
        else:
            response = await http.post("/v1/chat/completions", json=chat_body("m", stream=False))
            assert response.status_code == 200
        metrics = (await http.get("/metrics")).text
    assert response.headers["x-sluice-deployment"] == "healthy"
    assert failing.stats.requests_started == 1 and healthy.stats.requests_completed == 1
    assert 'sluice_fallbacks_total{deployment="healthy"} 1.0' in metrics
    assert 'sluice_upstream_errors_total{code="http_503"} 1.0' in metrics
    assert 'sluice_deployment_failures_total{code="http_503",deployment="failing"} 1.0' in metrics


async def test_client_errors_do_not_fall_over(start_gateway: GatewayFactory, start_simulator: SimulatorFactory) -> None:
    first, second = await start_simulator(), await start_simulator()
    gateway = await start_gateway(
        models=[
            ModelConfig(
                name="m",
                deployments=[deployment(first, "sim:fault=status,status_code=400"), deployment(second, "sim:fault=status,status_code=400")],
            )
        ]
    )
    async with httpx2.AsyncClient(base_url=gateway.url) as http:
        response = await http.post("/v1/chat/completions", json=chat_body("m"))
    assert response.status_code == 400 and "error" in response.json()
    assert first.stats.requests_started + second.stats.requests_started == 1


async def test_when_every_deployment_fails_the_fallback_model_serves(
    start_gateway: GatewayFactory, start_simulator: SimulatorFactory
) -> None:
    failing, backup = await start_simulator(), await start_simulator()
    gateway = await start_gateway(
        retry_max_attempts=1,
        models=[
            ModelConfig(name="main", fallbacks=["backup"], deployments=[deployment(failing, "sim:fault=disconnect_before_headers")]),
            ModelConfig(name="backup", deployments=[deployment(backup, "sim:tokens=4", name="backup#0")]),
        ],
    )
    async with httpx2.AsyncClient(base_url=gateway.url) as http:
        response, sse = await stream_chat(http, chat_body("main"))
    assert response.status_code == 200 and sse.ended_with_done
    assert sse.figures["deployment"] == "backup#0" and sse.figures["tokens"] == 4
    assert failing.stats.requests_started == 1


async def test_when_everything_fails_the_client_gets_the_last_error(
    start_gateway: GatewayFactory, start_simulator: SimulatorFactory
) -> None:
    a, b = await start_simulator(), await start_simulator()
    gateway = await start_gateway(
        retry_max_attempts=1,
        models=[ModelConfig(name="m", deployments=[deployment(a, "sim:fault=status,status_code=500"), deployment(b, "sim:fault=status,status_code=500")])],
    )
    async with httpx2.AsyncClient(base_url=gateway.url) as http:
        response = await http.post("/v1/chat/completions", json=chat_body("m"))
    assert response.status_code == 502 and response.json()["error"]["type"] == "upstream_error"
    assert a.stats.requests_started == 1 and b.stats.requests_started == 1


async def test_a_deployment_that_keeps_failing_is_put_in_cooldown(
    start_gateway: GatewayFactory, start_simulator: SimulatorFactory
) -> None:
    failing, healthy = await start_simulator(), await start_simulator()
    gateway = await start_gateway(
        retry_max_attempts=1,
        cooldown_failures=2,
        cooldown_seconds=600,
        models=[
            ModelConfig(
                name="m",
                deployments=[
                    deployment(failing, "sim:fault=status,status_code=503", name="failing"),
                    deployment(healthy, name="healthy"),
                ],
            )
        ],
    )
    async with httpx2.AsyncClient(base_url=gateway.url) as http:
        # Ties are broken at random: send until the failing one has failed twice.
        for _ in range(100):
            assert (await http.post("/v1/chat/completions", json=chat_body("m", stream=False))).status_code == 200
            if failing.stats.requests_started == 2:
                break
        assert failing.stats.requests_started == 2
        for _ in range(20):
            assert (await http.post("/v1/chat/completions", json=chat_body("m", stream=False))).status_code == 200
        metrics = (await http.get("/metrics")).text
    assert failing.stats.requests_started == 2  # resting: not tried again
    assert 'sluice_deployment_cooldowns_total{deployment="failing"} 1.0' in metrics


def hedged_model(slow: RunningSimulator, fast: RunningSimulator, slow_model: str, fast_model: str) -> ModelConfig:
    return ModelConfig(
        name="m",
        strategy="weighted",  # the slow deployment first
        hedge_after_ms=100,
        deployments=[
            deployment(slow, slow_model, weight=1e6, name="slow"),
            deployment(fast, fast_model, weight=1e-6, name="fast"),
        ],
    )


async def test_a_hedge_wins_when_the_first_deployment_is_slow_and_the_loser_is_closed(
    start_gateway: GatewayFactory, start_simulator: SimulatorFactory
) -> None:
    slow, fast = await start_simulator(), await start_simulator()
    gateway = await start_gateway(models=[hedged_model(slow, fast, "sim:tokens=5,ttft_ms=30000", "sim:tokens=5")])
    async with httpx2.AsyncClient(base_url=gateway.url) as http:
        response, sse = await stream_chat(http, chat_body("m"))
        metrics = (await http.get("/metrics")).text
    assert response.headers["x-sluice-deployment"] == "slow"  # where it opened
    assert sse.ended_with_done and sse.figures["tokens"] == 5
    assert sse.figures["hedge"] == "won" and sse.figures["deployment"] == "fast"
    await wait_until(lambda: slow.stats.requests_closed_by_client == 1)  # the loser's upstream saw the close
    assert slow.stats.active_requests == 0
    assert 'sluice_hedges_total{outcome="won"} 1.0' in metrics


async def test_the_first_deployment_wins_when_its_token_comes_first(
    start_gateway: GatewayFactory, start_simulator: SimulatorFactory
) -> None:
    slow, fast = await start_simulator(), await start_simulator()
    gateway = await start_gateway(
        models=[hedged_model(slow, fast, "sim:tokens=5,ttft_ms=400", "sim:tokens=5,ttft_ms=30000")]
    )
    async with httpx2.AsyncClient(base_url=gateway.url) as http:
        _, sse = await stream_chat(http, chat_body("m"))
    assert sse.ended_with_done and sse.figures["hedge"] == "lost" and sse.figures["deployment"] == "slow"
    await wait_until(lambda: fast.stats.requests_closed_by_client == 1)
    assert gateway.state.metrics.hedges["lost"] == 1


async def test_no_hedge_starts_when_the_first_token_comes_in_time(
    start_gateway: GatewayFactory, start_simulator: SimulatorFactory
) -> None:
    slow, fast = await start_simulator(), await start_simulator()
    gateway = await start_gateway(models=[hedged_model(slow, fast, "sim:tokens=5", "sim:tokens=5")])
    async with httpx2.AsyncClient(base_url=gateway.url) as http:
        _, sse = await stream_chat(http, chat_body("m"))
    assert sse.ended_with_done and sse.figures["hedge"] == "none"
    assert fast.stats.requests_started == 0


async def test_a_client_that_leaves_during_a_hedge_closes_both_upstreams(
    start_gateway: GatewayFactory, start_simulator: SimulatorFactory
) -> None:
    slow, fast = await start_simulator(), await start_simulator()
    gateway = await start_gateway(
        models=[hedged_model(slow, fast, "sim:tokens=5,ttft_ms=30000", "sim:tokens=5,ttft_ms=30000")]
    )
    raw = await RawStream.open(gateway.url, chat_body("m"))
    await raw.read_head()
    await wait_until(lambda: fast.stats.active_requests == 1)  # the hedge is running
    await raw.close_rst()
    await wait_until(lambda: slow.stats.requests_closed_by_client == 1 and fast.stats.requests_closed_by_client == 1)
    await wait_until(lambda: gateway.state.metrics.active_streams == 0)


def test_percentile_hedging_waits_for_samples_then_uses_the_percentile() -> None:
    route = ModelRoute("m", deployments=[object(), object()], hedge_after_ms=250, hedge_after_percentile=0.95)  # type: ignore[list-item]
    assert route.hedge_delay(min_samples=20) == 0.25
    route.ttft_seconds.extend([0.010] * 95 + [0.500] * 5)
    assert route.hedge_delay(min_samples=20) == 0.5
    route.ttft_seconds.clear()
    route.ttft_seconds.extend([0.010] * 100)
    assert route.hedge_delay(min_samples=20) == 0.010
    single = ModelRoute("m", deployments=[object()], hedge_after_ms=250)  # type: ignore[list-item]
    assert single.hedge_delay(min_samples=1) is None  # nowhere else to hedge to


async def test_a_wildcard_model_catches_other_names_and_keeps_them(
    start_gateway: GatewayFactory, start_simulator: SimulatorFactory
) -> None:
    named, catch_all = await start_simulator(), await start_simulator()
    gateway = await start_gateway(
        models=[
            ModelConfig(name="named", deployments=[deployment(named, "sim:tokens=2")]),
            ModelConfig(name="*", deployments=[DeploymentConfig(base_url=catch_all.base_url)]),
        ]
    )
    async with httpx2.AsyncClient(base_url=gateway.url) as http:
        _, other = await stream_chat(http, chat_body("sim:tokens=6"))
        _, configured = await stream_chat(http, chat_body("named"))
        listed = (await http.get("/v1/models")).json()
    assert other.figures["tokens"] == 6 and catch_all.stats.requests_completed == 1  # its own name reached upstream
    assert configured.figures["tokens"] == 2 and named.stats.requests_completed == 1
    assert [m["id"] for m in listed["data"]] == ["named"]
