"""Helpers shared by the tests: the running services and an SSE reader."""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import httpx2
import trio

from sluice.app import GatewayState
from sluice.config import Settings
from sluice.simulator import Simulator


@dataclass
class Gateway:
    url: str  # http://127.0.0.1:PORT
    state: GatewayState
    settings: Settings

    @property
    def base_url(self) -> str:
        return self.url + "/v1"


@dataclass
class RunningSimulator:
    simulator: Simulator
    base_url: str  # http://127.0.0.1:PORT/v1

    @property
    def stats(self) -> Any:
        return self.simulator.stats


GatewayFactory = Callable[..., Awaitable[Gateway]]
SimulatorFactory = Callable[[], Awaitable[RunningSimulator]]



def chat_body(model: str = "sim", *, stream: bool = True, content: str = "hello", **extra: Any) -> dict[str, Any]:
    return {"model": model, "messages": [{"role": "user", "content": content}], "stream": stream, **extra}


@dataclass
class SSEResult:
    """A stream as a client read it."""

    raw: bytes
    events: list[bytes]  # each event's text without the trailing blank line

    @property
    def data(self) -> list[str]:
        return [e[len(b"data: ") :].decode() for e in self.events if e.startswith(b"data: ")]

    @property
    def chunks(self) -> list[dict[str, Any]]:
        return [json.loads(d) for d in self.data if d != "[DONE]" and not d.startswith('{"error"')]

    @property
    def text(self) -> str:
        out = []
        for chunk in self.chunks:
            for choice in chunk.get("choices", []):
                out.append(choice.get("delta", {}).get("content") or "")
        return "".join(out)

    @property
    def comments(self) -> list[str]:
        return [e.decode() for e in self.events if e.startswith(b":")]

    @property
    def figures(self) -> dict[str, Any]:
        [line] = [c for c in self.comments if c.startswith(": sluice ")]
        return json.loads(line[len(": sluice ") :])

    @property
    def error(self) -> dict[str, Any] | None:
        for d in self.data:
            if d.startswith('{"error"'):
                return json.loads(d)["error"]
        return None

    @property
    def ended_with_done(self) -> bool:
        return bool(self.events) and self.events[-1] == b"data: [DONE]"


def parse_sse(raw: bytes) -> SSEResult:
    events = [e for e in raw.replace(b"\r\n", b"\n").split(b"\n\n") if e]
    return SSEResult(raw, events)


async def stream_chat(
    http: httpx2.AsyncClient, body: dict[str, Any], headers: dict[str, str] | None = None
) -> tuple[httpx2.Response, SSEResult]:
    with trio.fail_after(30):
        async with http.stream("POST", "/v1/chat/completions", json=body, headers=headers) as response:
            raw = b"".join([chunk async for chunk in response.aiter_raw()])
    return response, parse_sse(raw)


async def wait_until(predicate: Callable[[], bool], *, timeout: float = 10.0) -> None:
    """Poll a condition (a behaviour, not a timing: the timeout only stops a hang)."""
    with trio.fail_after(timeout):
        while not predicate():
            await trio.sleep(0.005)


# --- chaos and fuzz helpers (appended) -------------------------------------------------


async def health_figures(url: str) -> dict[str, int]:
    """The gateway's own process figures (open fds, trio tasks, RSS) from ``GET /health``.

    A fresh connection each time, closed again, so no keep-alive connection of
    the caller's is left counted in the next reading.
    """
    async with httpx2.AsyncClient(base_url=url, timeout=30) as http:
        response = await http.get("/health")
    figures: dict[str, int] = response.json()["process"]
    return figures


async def wait_until_async(predicate: Callable[[], Awaitable[bool]], *, timeout: float = 10.0, interval: float = 0.05) -> None:
    """Like :func:`wait_until`, for a condition that must be awaited (an HTTP call)."""
    with trio.fail_after(timeout):
        while not await predicate():
            await trio.sleep(interval)


def percentile(values: list[float], q: float) -> float | None:
    """The ``q`` quantile (0..1) by nearest rank; None without values."""
    if not values:
        return None
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]
