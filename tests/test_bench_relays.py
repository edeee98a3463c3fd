"""The benchmark's own upstream and reference relay, through real sockets.

``benchmarks/fast_upstream.py`` must answer as the simulator's chat grammar
does (a real client reads every token, the usage chunk and ``[DONE]``, or
the whole non-stream answer), keep connections alive, and record when a
client left while it waited for the next token (the ``cancel`` scenario's
figure). ``benchmarks/hypercorn_floor.py`` must relay those answers byte
for byte, pool its upstream connections, and close the upstream connection
when its client goes away.
"""

from __future__ import annotations

import json
import time
from typing import Any

import httpx2
import trio
from hypercorn.config import Config
from hypercorn.trio import serve

from benchmarks.fast_upstream import FastUpstream
from benchmarks.hypercorn_floor import ChunkDecoder, make_app
from sluice.simulator.behaviour import iter_tokens

from .rawclient import RawStream


def chat(model: str, *, stream: bool = True, **extra: Any) -> dict[str, Any]:
    return {"model": model, "stream": stream, "messages": [{"role": "user", "content": "hello"}], **extra}


def data_events(body: bytes) -> list[str]:
    events = [e for e in body.decode().split("\n\n") if e]
    assert all(e.startswith("data: ") for e in events), events
    return [e[6:] for e in events]


def contents(events: list[str]) -> list[str]:
    found = []
    for event in events:
        if event == "[DONE]":
            continue
        for choice in json.loads(event)["choices"]:
            if choice["delta"].get("content"):
                found.append(choice["delta"]["content"])
    return found


async def start_fast_upstream(nursery: trio.Nursery) -> tuple[FastUpstream, str]:
    upstream = FastUpstream()
    port = await nursery.start(upstream.serve, "127.0.0.1", 0)
    return upstream, f"http://127.0.0.1:{port}"


async def start_floor(nursery: trio.Nursery, upstream_port: int) -> str:
    config = Config()
    config.bind = ["127.0.0.1:0"]
    config.accesslog = None
    binds = await nursery.start(serve, make_app(upstream_port), config)
    return binds[0]


async def wait_for(condition: Any, seconds: float = 10.0) -> bool:
    """Poll ``condition()`` until true; False after ``seconds`` (a bound on waiting, not a timing check)."""
    with trio.move_on_after(seconds):
        while not condition():
            await trio.sleep(0.02)
        return True
    return False


async def test_fast_upstream_streams_every_token_with_usage_and_done_on_one_kept_alive_connection(nursery: trio.Nursery) -> None:
    upstream, url = await start_fast_upstream(nursery)
    async with httpx2.AsyncClient(base_url=url) as client:
        for _ in range(2):
            body = chat("sim:tokens=20,seed=7", stream_options={"include_usage": True})
            async with client.stream("POST", "/v1/chat/completions", json=body) as response:
                assert response.status_code == 200
                assert response.headers["content-type"] == "text/event-stream"
                raw = await response.aread()
            events = data_events(raw)
            assert events[-1] == "[DONE]"
            assert contents(events) == list(iter_tokens("", 20, "7"))
            assert json.loads(events[-2])["usage"]["completion_tokens"] == 20
            assert json.loads(events[-3])["choices"][0]["finish_reason"] == "stop"
        # a timed answer: each token at its own time, the same text
        async with client.stream("POST", "/v1/chat/completions", json=chat("sim:tokens=5,itl_ms=10")) as response:
            raw = await response.aread()
        assert contents(data_events(raw)) == list(iter_tokens("", 5))
    assert upstream.stats.connections_accepted == 1
    assert upstream.stats.requests_completed == 3
    assert [r["outcome"] for r in upstream.stats.records] == ["completed"] * 3


async def test_fast_upstream_answers_a_non_stream_request_with_the_whole_completion(nursery: trio.Nursery) -> None:
    _, url = await start_fast_upstream(nursery)
    async with httpx2.AsyncClient(base_url=url) as client:
        for model in ("sim:tokens=12", "sim:tokens=3,itl_ms=5"):
            response = await client.post("/v1/chat/completions", json=chat(model, stream=False))
            assert response.status_code == 200
            answer = response.json()
            count = 12 if model == "sim:tokens=12" else 3
            assert answer["choices"][0]["message"]["content"] == "".join(iter_tokens("", count))
            assert answer["usage"]["completion_tokens"] == count


async def test_fast_upstream_refuses_what_it_does_not_simulate_with_a_400(nursery: trio.Nursery) -> None:
    _, url = await start_fast_upstream(nursery)
    async with httpx2.AsyncClient(base_url=url) as client:
        response = await client.post("/v1/chat/completions", json=chat("sim:fault=reset,after=2"))
        assert response.status_code == 400
        assert "simulator" in response.json()["error"]["message"]
        response = await client.post("/v1/responses", json={"model": "sim", "input": "x"})
        assert response.status_code == 404


async def test_fast_upstream_records_a_client_leaving_while_it_waits_for_the_next_token(nursery: trio.Nursery) -> None:
    upstream, url = await start_fast_upstream(nursery)
    # The second token is due in 60 s: only the watcher can notice the client leaving before then.
    raw = await RawStream.open(url, chat("sim:tokens=3,itl_ms=60000,seed=1"))
    await raw.read_until(b'"content":"')
    left_at = time.monotonic()
    await raw.close_rst()
    record = upstream.stats.records[-1]
    assert await wait_for(lambda: record["outcome"] != "running")
    assert record["outcome"] == "closed_by_client"
    assert record["closed_at"] >= left_at  # both CLOCK_MONOTONIC, as the cancel scenario reads them
    assert upstream.stats.active_requests == 0


async def test_hypercorn_floor_relays_streams_and_answers_byte_for_byte_over_pooled_connections(nursery: trio.Nursery) -> None:
    upstream, upstream_url = await start_fast_upstream(nursery)
    floor_url = await start_floor(nursery, upstream.port or 0)
    body = chat("sim:tokens=300,seed=3")
    async with httpx2.AsyncClient() as client:
        direct = await client.post(upstream_url + "/v1/chat/completions", json=body)
        relayed = []
        for _ in range(3):
            response = await client.post(floor_url + "/v1/chat/completions", json=body)
            assert response.status_code == 200
            assert response.headers["content-type"] == "text/event-stream"
            relayed.append(response.content)
        whole = await client.post(floor_url + "/v1/chat/completions", json=chat("sim:tokens=4", stream=False))
    assert relayed == [direct.content] * 3
    assert contents(data_events(relayed[0])) == list(iter_tokens("", 300, "3"))
    assert whole.json()["choices"][0]["message"]["content"] == "".join(iter_tokens("", 4))
    # one connection for the direct request, one the floor kept and reused for its four
    assert upstream.stats.connections_accepted == 2


async def test_hypercorn_floor_closes_the_upstream_connection_when_its_client_aborts(nursery: trio.Nursery) -> None:
    upstream, _ = await start_fast_upstream(nursery)
    floor_url = await start_floor(nursery, upstream.port or 0)
    # 1 000 tokens 20 ms apart: 20 s, far beyond the wait below, unless the floor closes its upstream.
    raw = await RawStream.open(floor_url, chat("sim:tokens=1000,itl_ms=20,seed=2"))
    await raw.read_until(b'"content":" ')  # a few tokens in
    await raw.close_rst()
    record = upstream.stats.records[-1]
    assert await wait_for(lambda: record["outcome"] != "running")
    assert record["outcome"] == "closed_by_client"
    assert record["closed_at"] is not None


def test_the_floor_chunk_decoder_gives_the_payload_whatever_the_split() -> None:
    payloads = [bytes([65 + i % 26]) * (1 + (i * 37) % 300) for i in range(100)]
    wire = b"".join(b"%x\r\n%s\r\n" % (len(p), p) for p in payloads) + b"0\r\n\r\n"
    for step in (1, 2, 3, 7, 64, 1000, len(wire)):
        decoder = ChunkDecoder()
        out = b"".join(decoder.feed(wire[i : i + step]) for i in range(0, len(wire), step))
        assert out == b"".join(payloads)
        assert decoder.finished and decoder.unused == b""
