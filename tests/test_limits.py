"""Virtual keys and their limits, through real sockets (issue 6).

The limit store's clock is pinned so a test never straddles a minute window.
"""

from __future__ import annotations

import httpx2
import pytest

from sluice.config import VirtualKeyConfig
from sluice.limits import LocalLimitStore

from .rawclient import RawStream
from .support import Gateway, GatewayFactory, chat_body, stream_chat, wait_until

PINNED_NOW = 1_000_000_040.0  # 20 s into a window: 40 s before it ends


@pytest.fixture
def team_key(monkeypatch: pytest.MonkeyPatch) -> str:
    monkeypatch.setenv("SLUICE_TEST_TEAM_KEY", "sk-team-1234")
    return "sk-team-1234"


async def limited_gateway(start_gateway: GatewayFactory, **limits: int) -> Gateway:
    gateway = await start_gateway(keys=[VirtualKeyConfig(name="team", key_env="SLUICE_TEST_TEAM_KEY", **limits)])
    gateway.state.limits = LocalLimitStore(clock=lambda: PINNED_NOW)
    return gateway


def auth(key: str) -> dict[str, str]:
    return {"authorization": f"Bearer {key}"}


async def test_requests_per_minute_over_the_limit_get_429_with_retry_after(
    start_gateway: GatewayFactory, team_key: str
) -> None:
    gateway = await limited_gateway(start_gateway, requests_per_minute=2)
    async with httpx2.AsyncClient(base_url=gateway.url, headers=auth(team_key)) as http:
        statuses = [(await http.post("/v1/chat/completions", json=chat_body("sim:tokens=1", stream=False))).status_code for _ in range(2)]
        refused = await http.post("/v1/chat/completions", json=chat_body("sim:tokens=1", stream=False))
        metrics = (await http.get("/metrics")).text
    assert statuses == [200, 200]
    assert refused.status_code == 429
    assert refused.headers["retry-after"] == "40"
    assert refused.json()["error"] == {
        "message": "Rate limit reached for key 'team': 2 requests per minute. Retry after 40 s.",
        "type": "rate_limit_error",
        "param": None,
        "code": "rate_limit_exceeded",
    }
    assert 'sluice_rate_limited_total{key="team",limit="requests"} 1.0' in metrics
    assert 'sluice_requests_total{api="chat",model="sim:tokens=1",status="429"} 1.0' in metrics


async def test_concurrent_streams_over_the_limit_get_429_until_one_ends(
    start_gateway: GatewayFactory, team_key: str
) -> None:
    gateway = await limited_gateway(start_gateway, max_concurrent_streams=1)
    raw = await RawStream.open(gateway.url, chat_body("sim:tokens=1000,itl_ms=20"), headers=auth(team_key))
    await raw.read_head()
    async with httpx2.AsyncClient(base_url=gateway.url, headers=auth(team_key)) as http:
        refused = await http.post("/v1/chat/completions", json=chat_body("sim:tokens=1"))
        assert refused.status_code == 429 and refused.headers["retry-after"] == "1"
        await raw.close_fin()  # the stream ends: its slot comes back
        await wait_until(lambda: gateway.state.metrics.active_streams == 0)
        _, sse = await stream_chat(http, chat_body("sim:tokens=2"))
        metrics = (await http.get("/metrics")).text
    assert sse.ended_with_done
    assert 'sluice_rate_limited_total{key="team",limit="streams"} 1.0' in metrics  # the limit that refused and the key, by name


async def test_tokens_per_minute_count_what_streams_used(start_gateway: GatewayFactory, team_key: str) -> None:
    gateway = await limited_gateway(start_gateway, tokens_per_minute=10)
    async with httpx2.AsyncClient(base_url=gateway.url, headers=auth(team_key)) as http:
        _, first = await stream_chat(http, chat_body("sim:tokens=6"))
        second = await http.post("/v1/chat/completions", json=chat_body("sim:tokens=6", stream=False))
        refused = await http.post("/v1/chat/completions", json=chat_body("sim:tokens=1"))
        metrics = (await http.get("/metrics")).text
    assert first.ended_with_done and second.status_code == 200  # 6, then 12 >= 10
    assert refused.status_code == 429 and "10 tokens per minute" in refused.json()["error"]["message"]
    assert 'sluice_rate_limited_total{key="team",limit="tokens"} 1.0' in metrics


async def test_an_unknown_key_is_401_when_keys_are_configured(start_gateway: GatewayFactory, team_key: str) -> None:
    gateway = await limited_gateway(start_gateway, requests_per_minute=100)
    async with httpx2.AsyncClient(base_url=gateway.url) as http:
        wrong = await http.post("/v1/chat/completions", json=chat_body(), headers=auth("sk-other"))
        right = await http.post("/v1/chat/completions", json=chat_body(stream=False), headers=auth(team_key))
    assert wrong.status_code == 401 and wrong.json()["error"]["code"] == "invalid_api_key"
    assert right.status_code == 200


async def test_a_refused_or_failed_request_gives_its_stream_slot_back(
    start_gateway: GatewayFactory, team_key: str
) -> None:
    gateway = await limited_gateway(start_gateway, max_concurrent_streams=1)
    async with httpx2.AsyncClient(base_url=gateway.url, headers=auth(team_key)) as http:
        for _ in range(3):  # each fails upstream; none may keep the one slot
            failed = await http.post("/v1/chat/completions", json=chat_body("sim:fault=status,status_code=400"))
            assert failed.status_code == 400
        _, sse = await stream_chat(http, chat_body("sim:tokens=2"))
    assert sse.ended_with_done
