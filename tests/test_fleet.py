"""The scaled-out topology, for real: nginx in front of two gateway processes (deploy/fleet.py).

One fleet (redis-server, the simulator, two ``sluice serve`` processes,
nginx with least_conn) is started for the whole module. Nothing here is
skipped: if nginx or redis-server cannot be installed, the fixture fails
and so do the tests, because CI must prove the topology works.

Which gateway served a stream is read from the fleet's ``X-Sluice-Upstream``
response header (nginx's ``$upstream_addr``). The gateways share Redis and a
config file with two virtual keys: an unlimited one every test sends, and a
limited one that shows the limit is counted fleet-wide.
"""

from __future__ import annotations

import json
import signal
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import httpx2
import pytest
import trio

from deploy.fleet import Fleet

# The first test's setup may apt-get install nginx and redis-server on a fresh
# machine; each test body has its own trio.fail_after against hangs.
pytestmark = pytest.mark.timeout(600)

SHORT = "sim:tokens=30,itl_ms=20"  # ~0.6 s
LONG = "sim:tokens=250,itl_ms=20"  # ~5 s: still running when a gateway is killed
TEST_DEADLINE = 90  # seconds; only to turn a hang into a failure

OPEN_KEY = "sk-fleet-open-0123456789"
LIMITED_KEY = "sk-fleet-limited-0123456789"
LIMITED_RPM = 6
KEYS_TOML = f"""
[[keys]]
name = "fleet-open"
key_env = "FLEET_OPEN_KEY"

[[keys]]
name = "fleet-limited"
key_env = "FLEET_LIMITED_KEY"
requests_per_minute = {LIMITED_RPM}
"""


@pytest.fixture(scope="module")
def fleet(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Fleet]:
    config = tmp_path_factory.mktemp("fleet") / "keys.toml"
    config.write_text(KEYS_TOML)
    with Fleet(
        gateways=2,
        drain_timeout=0.5,
        gateway_args=["--config", str(config)],
        gateway_env={"FLEET_OPEN_KEY": OPEN_KEY, "FLEET_LIMITED_KEY": LIMITED_KEY},
    ) as running:
        yield running


@pytest.fixture
def live_fleet(fleet: Fleet) -> Fleet:
    """The module's fleet with every gateway running (a test before may have killed one)."""
    for i in range(len(fleet.gateway_procs)):
        fleet.restart_gateway(i)
    return fleet


@dataclass
class Stream:
    """One streamed completion as the client saw it."""

    status: int | None = None
    upstream: str | None = None  # the gateway nginx chose, 127.0.0.1:PORT
    data: list[str] = field(default_factory=list)  # each `data:` payload, in order
    transport_error: Exception | None = None  # the body ended without its end (truncated)
    first_data: trio.Event = field(default_factory=trio.Event)

    @property
    def done(self) -> bool:
        return bool(self.data) and self.data[-1] == "[DONE]" and self.transport_error is None

    @property
    def error(self) -> dict[str, Any] | None:
        if self.data and self.data[-1].startswith('{"error"'):
            return json.loads(self.data[-1])["error"]
        return None

    @property
    def tokens(self) -> int:
        count = 0
        for payload in self.data:
            if payload != "[DONE]" and not payload.startswith('{"error"'):
                for choice in json.loads(payload).get("choices", []):
                    count += bool(choice.get("delta", {}).get("content"))
        return count

    def describe(self) -> str:
        return (
            f"status={self.status} upstream={self.upstream} events={len(self.data)} "
            f"last={self.data[-1][:200] if self.data else None!r} transport_error={self.transport_error!r}"
        )


async def stream(client: httpx2.AsyncClient, url: str, model: str, out: Stream | None = None) -> Stream:
    out = out if out is not None else Stream()
    body = {"model": model, "stream": True, "messages": [{"role": "user", "content": "hello"}]}
    try:
        async with client.stream("POST", url + "/v1/chat/completions", json=body) as response:
            out.status = response.status_code
            out.upstream = response.headers.get("x-sluice-upstream")
            async for line in response.aiter_lines():
                if line.startswith("data: "):
                    out.data.append(line[len("data: ") :])
                    out.first_data.set()
    except (httpx2.RemoteProtocolError, httpx2.ReadError) as exc:
        out.transport_error = exc  # e.g. "incomplete chunked read": the body was cut
    finally:
        out.first_data.set()
    return out


async def run_streams(client: httpx2.AsyncClient, url: str, model: str, count: int) -> list[Stream]:
    streams = [Stream() for _ in range(count)]
    async with trio.open_nursery() as nursery:
        for s in streams:
            nursery.start_soon(stream, client, url, model, s)
    return streams


async def requests_served(client: httpx2.AsyncClient, gateway_url: str) -> int:
    response = await client.get(gateway_url + "/metrics/backpressure")
    response.raise_for_status()
    return int(response.json()["requests"])


def new_client(key: str = OPEN_KEY) -> httpx2.AsyncClient:
    # Generous read timeout: only to stop a hang, never to decide an outcome.
    return httpx2.AsyncClient(
        timeout=httpx2.Timeout(60.0, connect=10.0),
        limits=httpx2.Limits(max_connections=100),
        headers={"authorization": f"Bearer {key}"},
    )


async def test_streams_through_nginx_are_spread_over_both_gateways(live_fleet: Fleet) -> None:
    fleet = live_fleet
    with trio.fail_after(TEST_DEADLINE):
        async with new_client() as client:
            before = [await requests_served(client, url) for url in fleet.gateway_urls]
            streams = await run_streams(client, fleet.nginx_url, SHORT, 20)
            after = [await requests_served(client, url) for url in fleet.gateway_urls]

    for s in streams:
        assert s.status == 200 and s.done, s.describe()
        assert s.tokens == 30, s.describe()  # nothing lost on the way through nginx
    by_gateway = Counter(s.upstream for s in streams)
    assert set(by_gateway) == set(fleet.gateway_addrs), by_gateway
    # least_conn over 20 concurrent streams: neither gateway is left idle
    assert min(by_gateway.values()) >= 5, by_gateway
    # and the gateways themselves counted exactly the streams nginx sent them
    served = [b - a for a, b in zip(before, after)]
    assert served == [by_gateway[addr] for addr in fleet.gateway_addrs], (served, by_gateway)


async def _long_streams_then(
    fleet: Fleet, client: httpx2.AsyncClient, nursery: trio.Nursery, count: int = 10
) -> list[Stream]:
    """Start ``count`` long streams through nginx; return once each has its first event on both gateways."""
    streams = [Stream() for _ in range(count)]
    for s in streams:
        nursery.start_soon(stream, client, fleet.nginx_url, LONG, s)
    for s in streams:
        await s.first_data.wait()
    for s in streams:
        assert s.status == 200 and s.data and s.transport_error is None, s.describe()
    on = Counter(s.upstream for s in streams)
    assert set(on) == set(fleet.gateway_addrs), on  # least_conn put streams on both
    return streams


async def test_sigterm_drains_one_gateway_and_the_other_carries_on(live_fleet: Fleet) -> None:
    fleet = live_fleet
    victim, survivor = fleet.gateway_addrs
    with trio.fail_after(TEST_DEADLINE):
        async with new_client() as client:
            async with trio.open_nursery() as nursery:
                streams = await _long_streams_then(fleet, client, nursery)
                fleet.kill_gateway(0, signal.SIGTERM)
                # New requests, at once and while gateway 0 drains: all go to the survivor.
                after_kill = await run_streams(client, fleet.nginx_url, SHORT, 10)
            later = await run_streams(client, fleet.nginx_url, SHORT, 10)
            exit_code = await trio.to_thread.run_sync(fleet.wait_gateway_exit, 0, 30.0)

    for s in streams:
        if s.upstream == victim:
            # drained after --drain-timeout 0.5: a visible error event, never [DONE]
            assert s.error is not None and s.error["code"] == "server_shutting_down", s.describe()
            assert "[DONE]" not in s.data, s.describe()
        else:
            assert s.upstream == survivor and s.done and s.tokens == 250, s.describe()
    for s in after_kill + later:
        assert s.status == 200 and s.done and s.tokens == 30, s.describe()
        assert s.upstream is not None and s.upstream.split(", ")[-1] == survivor, s.describe()
    assert exit_code == 0, fleet.log_tail(fleet.gateway_procs[0])


async def test_sigkill_of_one_gateway_never_looks_like_success(live_fleet: Fleet) -> None:
    fleet = live_fleet
    victim, survivor = fleet.gateway_addrs
    with trio.fail_after(TEST_DEADLINE):
        async with new_client() as client, trio.open_nursery() as nursery:
            streams = await _long_streams_then(fleet, client, nursery)
            fleet.kill_gateway(0, signal.SIGKILL)
            exit_code = await trio.to_thread.run_sync(fleet.wait_gateway_exit, 0, 30.0)
            after_kill = await run_streams(client, fleet.nginx_url, SHORT, 10)

    assert exit_code == -signal.SIGKILL
    for s in streams:
        if s.upstream == victim:
            # cut mid-stream: the client sees an error event or a truncated body, not [DONE]
            assert not s.done and "[DONE]" not in s.data, s.describe()
            assert s.error is not None or s.transport_error is not None, s.describe()
        else:
            assert s.upstream == survivor and s.done and s.tokens == 250, s.describe()
    for s in after_kill:
        assert s.status == 200 and s.done and s.tokens == 30, s.describe()
        assert s.upstream is not None and s.upstream.split(", ")[-1] == survivor, s.describe()


async def test_a_key_limit_is_counted_once_for_the_whole_fleet(live_fleet: Fleet) -> None:
    """requests_per_minute is shared through Redis: per-gateway counting would let 2x through."""
    fleet = live_fleet
    assert fleet.gateways_use_redis, "sluice serve has no --redis-url"
    with trio.fail_after(TEST_DEADLINE):
        async with new_client(LIMITED_KEY) as client:
            for url in fleet.gateway_urls:
                health = (await client.get(url + "/health")).json()
                assert health.get("redis") == "ok", health
            # Limits count in fixed wall-clock minutes: start well inside one.
            if time.time() % 60 > 45:
                await trio.sleep(60 - time.time() % 60 + 0.1)
            # One at a time: least_conn with no stream open alternates the gateways.
            results = [await stream(client, fleet.nginx_url, "sim:tokens=3,itl_ms=1") for _ in range(2 * LIMITED_RPM)]

    admitted = [s for s in results if s.status == 200]
    refused = [s for s in results if s.status == 429]
    assert len(admitted) == LIMITED_RPM and len(refused) == LIMITED_RPM, [s.describe() for s in results]
    assert all(s.done for s in admitted), [s.describe() for s in admitted]
    assert {s.upstream for s in admitted} == set(fleet.gateway_addrs), [s.upstream for s in admitted]
    assert {s.upstream for s in refused} == set(fleet.gateway_addrs), [s.upstream for s in refused]
