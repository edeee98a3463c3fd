"""The upstream pool survives cancelled requests (why httpx2, not httpx 0.28.1).

httpcore 1.0.9 could leave a dead connection in the pool when a request was
cancelled mid-body (httpcore issue 1093). This cancels many streams
mid-body, then checks that the same client still serves every request.
"""

from __future__ import annotations

import trio

from sluice.policies import RetryPolicy
from sluice.upstream import UpstreamClient

from .support import RunningSimulator, wait_until


async def test_pool_still_serves_after_many_cancelled_streams(simulator: RunningSimulator) -> None:
    upstream = UpstreamClient(
        simulator.base_url, api_key=None, max_connections=16, connect_timeout=5, retry_policy=RetryPolicy(max_attempts=1)
    )
    body = b'{"model":"sim:tokens=1000,itl_ms=5","stream":true,"messages":[{"role":"user","content":"x"}]}'

    async def cancelled_mid_body() -> None:
        with trio.CancelScope() as scope:
            response = await upstream.open_chat_stream(body)
            try:
                async for _ in response.aiter_raw():
                    scope.cancel()  # mid-body: the first bytes are in, the rest never read
            finally:
                with trio.CancelScope(shield=True):
                    await response.aclose()

    async with trio.open_nursery() as nursery:
        for _ in range(64):
            nursery.start_soon(cancelled_mid_body)
    await wait_until(lambda: simulator.stats.requests_closed_by_client == 64)

    quick = b'{"model":"sim:tokens=3","messages":[{"role":"user","content":"x"}]}'
    with trio.fail_after(10):
        for _ in range(32):
            response = await upstream.chat_completion(quick)
            assert response.status_code == 200
    await upstream.aclose()


async def test_a_chat_request_is_the_one_build_request_would_make() -> None:
    # UpstreamClient builds chat requests from parts prepared once (for speed);
    # they must not differ from httpx2's own build_request in anything sent.
    upstream = UpstreamClient(
        "https://api.example.com/v1", api_key="sk-test", max_connections=4, connect_timeout=3,
        retry_policy=RetryPolicy(max_attempts=1),
    )
    body = b'{"model":"m","stream":true,"messages":[]}'
    ours = upstream.chat_request(body)
    theirs = upstream._client.build_request(
        "POST", "chat/completions", content=body, headers={"content-type": "application/json"}
    )
    assert (ours.method, ours.url, ours.headers.raw, ours.extensions) == (
        theirs.method, theirs.url, theirs.headers.raw, theirs.extensions
    )
    assert ours.url == "https://api.example.com/v1/chat/completions"
    assert ours.headers["authorization"] == "Bearer sk-test"
    assert ours.content == body
    await upstream.aclose()
