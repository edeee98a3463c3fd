"""Key limits shared through a real redis-server, across gateways and processes (issue 7).

redis-server comes from Debian's package, installed by the project's own
helper (deploy/fleet.py) when missing, and runs on a loopback port of its own.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx2
import pytest
import trio

from deploy.fleet import ensure_binary, free_port, redis_ready
from sluice.config import DeploymentConfig, ModelConfig, VirtualKeyConfig

from .rawclient import RawStream
from .support import GatewayFactory, RunningSimulator, SimulatorFactory, chat_body, stream_chat, wait_until

KEY = "sk-shared-team-key"


@pytest.fixture
def team_key(monkeypatch: pytest.MonkeyPatch) -> str:
    monkeypatch.setenv("SLUICE_TEST_SHARED_KEY", KEY)
    return KEY


@pytest.fixture
def redis_url(tmp_path: Path) -> Iterator[str]:
    binary = ensure_binary("redis-server", ["redis-server"])
    port = free_port()
    process = subprocess.Popen(
        [binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no", "--dir", str(tmp_path)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 20
        while not redis_ready(port):
            assert time.monotonic() < deadline, "redis-server did not start"
            time.sleep(0.05)
        yield f"redis://127.0.0.1:{port}/0"
    finally:
        process.terminate()
        process.wait(timeout=10)


def limited(**limits: int) -> list[VirtualKeyConfig]:
    return [VirtualKeyConfig(name="team", key_env="SLUICE_TEST_SHARED_KEY", **limits)]


async def test_a_concurrent_stream_limit_holds_across_two_gateways(
    start_gateway: GatewayFactory, redis_url: str, team_key: str
) -> None:
    first = await start_gateway(redis_url=redis_url, keys=limited(max_concurrent_streams=2))
    second = await start_gateway(redis_url=redis_url, keys=limited(max_concurrent_streams=2))
    auth = {"authorization": f"Bearer {team_key}"}
    streams = []
    for gateway in (first, second):
        raw = await RawStream.open(gateway.url, chat_body("sim:tokens=1000,itl_ms=20"), headers=auth)
        await raw.read_head()
        streams.append(raw)
    async with httpx2.AsyncClient(headers=auth) as http:
        for gateway in (first, second):
            refused = await http.post(gateway.url + "/v1/chat/completions", json=chat_body("sim:tokens=1"))
            assert refused.status_code == 429 and "2 concurrent streams" in refused.json()["error"]["message"]
        await streams[0].close_fin()  # one ends on the first gateway: the second may start one
        await wait_until(lambda: first.state.metrics.active_streams == 0)
    async with httpx2.AsyncClient(base_url=second.url, headers=auth) as http:
        _, sse = await stream_chat(http, chat_body("sim:tokens=2"))
    assert sse.ended_with_done
    await streams[1].close_fin()


async def test_when_redis_is_unreachable_limits_are_kept_locally_and_health_says_so(
    start_gateway: GatewayFactory, team_key: str
) -> None:
    dead = f"redis://127.0.0.1:{free_port()}/0"
    gateway = await start_gateway(redis_url=dead, keys=limited(requests_per_minute=2))
    async with httpx2.AsyncClient(base_url=gateway.url, headers={"authorization": f"Bearer {team_key}"}) as http:
        statuses = [(await http.post("/v1/chat/completions", json=chat_body(stream=False))).status_code for _ in range(3)]
        health = (await http.get("/health")).json()
    assert statuses[:2] == [200, 200] and statuses[2] == 429  # still limited, by this worker's own count
    assert health["status"] == "ok" and health["redis"] == "unreachable"


async def test_a_requests_per_minute_limit_holds_across_two_gateway_processes(
    simulator: RunningSimulator, redis_url: str, tmp_path: Path, team_key: str
) -> None:
    config = tmp_path / "sluice.toml"
    config.write_text(
        '[[keys]]\nname = "team"\nkey_env = "SLUICE_TEST_SHARED_KEY"\nrequests_per_minute = 4\n'
    )
    ports = [free_port(), free_port()]
    env = {**os.environ, "SLUICE_TEST_SHARED_KEY": team_key}
    processes = [
        subprocess.Popen(
            [sys.executable, "-m", "sluice.cli", "serve", "--port", str(port), "--config", str(config),
             "--redis-url", redis_url, "--upstream-base-url", simulator.base_url],
            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )
        for port in ports
    ]
    try:
        urls = [f"http://127.0.0.1:{port}" for port in ports]
        async with httpx2.AsyncClient(headers={"authorization": f"Bearer {team_key}"}, timeout=30) as http:
            for url, process in zip(urls, processes):
                with trio.fail_after(60):
                    while True:
                        assert process.poll() is None, "the gateway exited"
                        try:
                            if (await http.get(url + "/health")).status_code == 200:
                                break
                        except httpx2.TransportError:
                            await trio.sleep(0.1)
            # The eight requests take well under a second; keep them inside one minute window.
            if time.time() % 60 > 50:
                await trio.sleep(61 - time.time() % 60)
            statuses = []
            for index in range(8):
                response = await http.post(urls[index % 2] + "/v1/chat/completions", json=chat_body("sim:tokens=1", stream=False))
                statuses.append(response.status_code)
            healths = [(await http.get(url + "/health")).json() for url in urls]
        assert all(h["redis"] == "ok" for h in healths)
        # Four admitted in all (two by each process), then refused whichever process is asked.
        assert statuses == [200] * 4 + [429] * 4
    finally:
        for process in processes:
            process.send_signal(signal.SIGTERM)
        for process in processes:
            process.wait(timeout=30)


async def test_a_cooldown_decided_by_one_gateway_rests_the_deployment_for_the_other(
    start_gateway: GatewayFactory, start_simulator: SimulatorFactory, redis_url: str
) -> None:
    failing, healthy = await start_simulator(), await start_simulator()
    models = [
        ModelConfig(
            name="m",
            strategy="weighted",  # the failing deployment first
            deployments=[
                DeploymentConfig(base_url=failing.base_url, model="sim:fault=status,status_code=503", weight=1e6, name="failing"),
                DeploymentConfig(base_url=healthy.base_url, model="sim:tokens=2", weight=1e-6, name="healthy"),
            ],
        )
    ]
    settings = dict(redis_url=redis_url, models=models, retry_max_attempts=1, cooldown_failures=1, cooldown_seconds=600)
    first = await start_gateway(**settings)
    second = await start_gateway(**settings)
    async with httpx2.AsyncClient() as http:
        assert (await http.post(first.url + "/v1/chat/completions", json=chat_body("m", stream=False))).status_code == 200
        assert failing.stats.requests_started == 1  # failed once on the first gateway: cooldown
        assert second.state.router is not None
        [resting] = [d for d in second.state.router.deployments if d.name == "failing"]
        await wait_until(lambda: resting.cooling(trio.current_time()))  # adopted from Redis
        for _ in range(5):
            assert (await http.post(second.url + "/v1/chat/completions", json=chat_body("m", stream=False))).status_code == 200
    assert failing.stats.requests_started == 1  # the second gateway never tried it
