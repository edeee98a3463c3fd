"""Key limits shared through a real redis-server, across gateways and processes (issue 7).

redis-server comes from Debian's package, installed by the project's own
helper (deploy/fleet.py) when missing, and runs on a loopback port of its own.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx2
import pytest
import trio

from deploy.fleet import ensure_binary, free_port, free_ports, redis_ready
from sluice.config import DeploymentConfig, ModelConfig, VirtualKeyConfig

from .rawclient import RawStream
from .support import (
    GatewayFactory,
    RunningSimulator,
    SimulatorFactory,
    chat_body,
    stream_chat,
    wait_until,
    wait_until_async,
)

KEY = "sk-shared-team-key"


@pytest.fixture
def team_key(monkeypatch: pytest.MonkeyPatch) -> str:
    monkeypatch.setenv("SLUICE_TEST_SHARED_KEY", KEY)
    return KEY


class RedisServer:
    """A redis-server on a loopback port of its own, which a test can stop and start again."""

    def __init__(self, directory: Path) -> None:
        self.binary = ensure_binary("redis-server", ["redis-server"])
        self.port = free_port()
        self.directory = directory
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        self.process = subprocess.Popen(
            [self.binary, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
             "--dir", str(self.directory)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + 20
        while not redis_ready(self.port):
            assert self.process.poll() is None, "redis-server exited"
            assert time.monotonic() < deadline, "redis-server did not start"
            time.sleep(0.05)

    def stop(self) -> None:
        if self.process is not None:
            self.process.terminate()  # by its own PID
            self.process.wait(timeout=10)
            self.process = None

    def info(self, section: str) -> str:
        """``INFO <section>`` on a fresh connection (a bulk reply: ``$<length>\\r\\n<text>\\r\\n``)."""
        with socket.create_connection(("127.0.0.1", self.port), timeout=5) as sock:
            sock.sendall(f"INFO {section}\r\n".encode())
            reply = b""
            while b"\r\n" not in reply:
                reply += sock.recv(65536)
            head, _, text = reply.partition(b"\r\n")
            length = int(head[1:])
            while len(text) < length:
                text += sock.recv(65536)
            return text[:length].decode()


@pytest.fixture
def redis_server(tmp_path: Path) -> Iterator[RedisServer]:
    server = RedisServer(tmp_path)
    server.start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def redis_url(redis_server: RedisServer) -> str:
    return redis_server.url


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
    ports = free_ports(2)
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


async def _redis_health(url: str) -> str:
    async with httpx2.AsyncClient(timeout=30) as http:
        health: str = (await http.get(url + "/health")).json()["redis"]
    return health


async def test_health_reports_redis_down_and_back_without_any_keyed_request(
    start_gateway: GatewayFactory, redis_server: RedisServer
) -> None:
    gateway = await start_gateway(redis_url=redis_server.url)  # no keys: nothing else ever talks to Redis
    assert await _redis_health(gateway.url) == "ok"
    redis_server.stop()

    async def says(status: str) -> bool:
        return await _redis_health(gateway.url) == status

    await wait_until_async(lambda: says("unreachable"), timeout=30)
    redis_server.start()
    await wait_until_async(lambda: says("ok"), timeout=30)


def _pings(redis_server: RedisServer) -> int:
    for line in redis_server.info("commandstats").splitlines():
        if line.startswith("cmdstat_ping:"):
            return int(line.split("calls=")[1].split(",")[0])
    return 0


async def test_a_storm_of_health_checks_pings_redis_about_once_a_second(
    start_gateway: GatewayFactory, redis_server: RedisServer
) -> None:
    gateway = await start_gateway(redis_url=redis_server.url)
    before = _pings(redis_server)
    started = trio.current_time()
    async with httpx2.AsyncClient(base_url=gateway.url, timeout=30) as http:

        async def check_health() -> None:
            for _ in range(20):
                assert (await http.get("/health")).json()["redis"] == "ok"

        async with trio.open_nursery() as nursery:
            for _ in range(10):
                nursery.start_soon(check_health)
    elapsed = trio.current_time() - started
    pings = _pings(redis_server) - before
    # 200 health checks; one PING per second of them (plus the one at either end).
    assert 1 <= pings <= int(elapsed) + 2, (pings, elapsed)
