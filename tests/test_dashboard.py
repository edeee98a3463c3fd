"""The live view: ``GET /dashboard`` and its SSE feed, through real sockets and in a real (headless) browser."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import httpx2
import pytest
import trio

from deploy.fleet import free_port
from sluice.config import DeploymentConfig, ModelConfig
from sluice import dashboard
from sluice.dashboard import RateWindow, Totals

from .browser import ensure_chromium, open_browser
from .support import Gateway, GatewayFactory, SimulatorFactory, chat_body, health_figures, stream_chat, wait_until_async

SLOW = "sim:tokens=50,itl_ms=50"  # ~2.5 s: long enough to be seen on the feed
DEADLINE = 30  # seconds; only to turn a hang into a failure
ADMIN = "sk-admin-0123456789"
GATEWAY_KEY = "sk-gateway-0123456789"


class Feed:
    """A reader of ``/dashboard/events``: one snapshot per ``data:`` event."""

    def __init__(self, response: httpx2.Response) -> None:
        self.response = response
        self._lines = response.aiter_lines()
        self.events: list[str] = []  # every event name seen (``message`` for data-only events)

    async def next(self) -> dict[str, Any] | None:
        """The next snapshot; ``None`` when the feed ended."""
        event, data = "message", None
        async for line in self._lines:
            if line.startswith("event:"):
                event = line[6:].strip()
            elif line.startswith("data:"):
                data = line[5:].strip()
            elif line == "" and data is not None:
                self.events.append(event)
                if event == "message":
                    return json.loads(data)  # type: ignore[no-any-return]
                event, data = "message", None
        return None

    async def until(self, predicate: Any) -> dict[str, Any]:
        while True:
            snapshot = await self.next()
            assert snapshot is not None, f"the feed ended before the condition held (events: {self.events})"
            if predicate(snapshot):
                return snapshot


@asynccontextmanager
async def open_feed(http: httpx2.AsyncClient, headers: dict[str, str] | None = None) -> AsyncIterator[Feed]:
    async with http.stream("GET", "/dashboard/events", headers=headers) as response:
        assert response.status_code == 200, await response.aread()
        assert response.headers["content-type"].startswith("text/event-stream")
        yield Feed(response)


def ids(snapshot: dict[str, Any]) -> set[str]:
    return {stream["request_id"] for stream in snapshot["streams"]}


async def test_the_feed_shows_a_stream_while_it_runs_and_not_after_it_ended(gateway: Gateway) -> None:
    finished = trio.Event()

    async def slow_stream(http: httpx2.AsyncClient) -> None:
        _, result = await stream_chat(http, chat_body(SLOW), headers={"x-request-id": "watched-stream"})
        assert result.ended_with_done
        finished.set()

    with trio.fail_after(DEADLINE):
        async with httpx2.AsyncClient(base_url=gateway.url, timeout=DEADLINE) as http, trio.open_nursery() as nursery:
            async with open_feed(http) as feed:
                first = await feed.next()
                assert first is not None and first["streams"] == [] and first["active_streams"] == 0
                assert [d["name"] for d in first["deployments"]] == ["default"]
                nursery.start_soon(slow_stream, http)
                seen = await feed.until(lambda s: "watched-stream" in ids(s))
                row = next(s for s in seen["streams"] if s["request_id"] == "watched-stream")
                assert row["model"] == SLOW and row["api"] == "chat" and row["policy"] == "block"
                assert row["deployment"] == "default" and row["age_s"] >= 0
                later = await feed.until(lambda s: any(t["request_id"] == "watched-stream" and t["tokens"] > 0 for t in s["streams"]))
                running = next(s for s in later["streams"] if s["request_id"] == "watched-stream")
                assert running["ttft_ms"] is not None and running["tokens_per_s"] is not None
                assert later["rates"]["requests_per_min"] > 0
                gone = await feed.until(lambda s: "watched-stream" not in ids(s))
                assert finished.is_set() or gone["active_streams"] == 0
                assert gone["rates"]["tokens_per_s"] > 0


async def test_past_the_row_limit_the_oldest_streams_are_listed_and_the_rest_counted(
    gateway: Gateway, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(dashboard, "MAX_ROWS", 1)

    async def slow_stream(http: httpx2.AsyncClient, request_id: str) -> None:
        await stream_chat(http, chat_body(SLOW), headers={"x-request-id": request_id})

    with trio.fail_after(DEADLINE):
        async with httpx2.AsyncClient(base_url=gateway.url, timeout=DEADLINE) as http, trio.open_nursery() as nursery:
            async with open_feed(http) as feed:
                nursery.start_soon(slow_stream, http, "older")
                await feed.until(lambda s: ids(s) == {"older"})
                nursery.start_soon(slow_stream, http, "younger")
                both = await feed.until(lambda s: len(s["streams"]) + s["streams_not_shown"] == 2)
                assert ids(both) == {"older"} and both["streams_not_shown"] == 1


async def test_the_feed_shows_a_deployment_cooling_down_and_the_error_that_put_it_there(
    start_gateway: GatewayFactory, start_simulator: SimulatorFactory
) -> None:
    failing, healthy = await start_simulator(), await start_simulator()
    gateway = await start_gateway(
        retry_max_attempts=1,
        cooldown_failures=1,
        cooldown_seconds=600,
        models=[
            ModelConfig(name="broken", deployments=[DeploymentConfig(base_url=failing.base_url, model="sim:fault=status,status_code=503", name="failing")]),
            ModelConfig(name="fine", deployments=[DeploymentConfig(base_url=healthy.base_url, model="sim:tokens=3", name="healthy")]),
        ],
    )
    with trio.fail_after(DEADLINE):
        async with httpx2.AsyncClient(base_url=gateway.url, timeout=DEADLINE) as http:
            refused = await http.post("/v1/chat/completions", json=chat_body("broken"))
            assert refused.status_code >= 500
            async with open_feed(http) as feed:
                snapshot = await feed.until(lambda s: s["rates"]["errors_per_min"] >= 1)
    by_name = {d["name"]: d for d in snapshot["deployments"]}
    assert by_name["failing"]["cooling"] is True and 0 < by_name["failing"]["cooldown_left_s"] <= 600
    assert by_name["healthy"] == {"name": "healthy", "active": 0, "consecutive_failures": 0, "cooling": False, "cooldown_left_s": 0.0}
    assert snapshot["rates"]["requests_per_min"] >= 1


async def test_the_feed_ends_when_the_gateway_drains_and_a_new_one_is_refused(gateway: Gateway) -> None:
    with trio.fail_after(DEADLINE):
        async with httpx2.AsyncClient(base_url=gateway.url, timeout=DEADLINE) as http:
            async with open_feed(http) as feed:
                assert await feed.next() is not None
                await gateway.state.drain(timeout=0)  # no relays: returns at once, only the feed is left
                last = await feed.until(lambda s: s["draining"])
                assert last["draining"] is True
                assert await feed.next() is None  # the feed ended by itself
                assert feed.events[-1] == "end"
            refused = await http.get("/dashboard/events")
            assert refused.status_code == 503
            assert refused.json()["error"]["code"] == "server_shutting_down"


async def test_on_sigterm_the_feed_ends_and_does_not_hold_the_process(tmp_path: Path) -> None:
    """A real ``sluice serve``: the feed is not a stream the drain waits for, and it ends by itself."""
    port = free_port()
    stderr = tmp_path / "stderr"
    # A drain (and hypercorn's graceful wait) far longer than the test's bounds: only the feed ending lets the process go.
    command = [sys.executable, "-m", "sluice.cli", "serve", "--port", str(port), "--drain-timeout", "600"]
    env = {k: v for k, v in os.environ.items() if k != "PROMETHEUS_MULTIPROC_DIR"}
    with stderr.open("wb") as err:
        process = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=err)
    try:
        async with httpx2.AsyncClient(base_url=f"http://127.0.0.1:{port}", timeout=DEADLINE) as http:

            async def ready() -> bool:
                assert process.poll() is None, stderr.read_text()
                try:
                    return (await http.get("/health")).status_code == 200
                except httpx2.TransportError:
                    return False

            await wait_until_async(ready, timeout=90, interval=0.2)
            with trio.fail_after(60):
                async with open_feed(http) as feed:
                    assert await feed.next() is not None
                    process.send_signal(signal.SIGTERM)
                    await feed.until(lambda s: s["draining"])
                    assert await feed.next() is None and feed.events[-1] == "end"
                code = await trio.to_thread.run_sync(process.wait, 60)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    assert code == 0
    assert "Traceback" not in stderr.read_text()


async def test_a_feed_whose_viewer_leaves_ends_and_leaves_no_task_behind(gateway: Gateway) -> None:
    with trio.fail_after(DEADLINE):
        baseline = (await health_figures(gateway.url))["tasks"]
        viewers = [httpx2.AsyncClient(base_url=gateway.url, timeout=DEADLINE) for _ in range(5)]
        for http in viewers:
            async with http:
                async with open_feed(http) as feed:
                    assert await feed.next() is not None
                    during = (await health_figures(gateway.url))["tasks"]
                    assert during > baseline  # the feed's connection is there while it is read

        async def back_to_baseline() -> bool:
            return (await health_figures(gateway.url))["tasks"] <= baseline

        await wait_until_async(back_to_baseline, timeout=DEADLINE)


async def test_without_keys_the_dashboard_is_open_and_the_page_loads_nothing_from_elsewhere(gateway: Gateway) -> None:
    async with httpx2.AsyncClient(base_url=gateway.url, timeout=DEADLINE) as http:
        response = await http.get("/dashboard")
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/html")
    page = response.text
    assert "EventSource(" in page
    # Every src/href/url()/import is relative: no scheme, no protocol-relative //host.
    references = re.findall(r"""(?:src|href)\s*=\s*["']([^"']*)["']|url\(\s*["']?([^"')]*)|@import\s+["']([^"']*)""", page)
    for reference in (r for group in references for r in group if r):
        assert not re.match(r"^(?:[a-z][a-z0-9+.-]*:|//)", reference, re.I), reference
    assert "http://" not in page and "https://" not in page
    assert "<link" not in page and "<script src" not in page
    assert "default-src 'none'" in response.headers["content-security-policy"]


async def test_with_gateway_keys_only_the_admin_key_opens_the_dashboard(start_gateway: GatewayFactory) -> None:
    gateway = await start_gateway(api_keys=[GATEWAY_KEY], admin_api_key=ADMIN)
    with trio.fail_after(DEADLINE):
        async with httpx2.AsyncClient(base_url=gateway.url, timeout=DEADLINE) as http:
            for path in ("/dashboard", "/dashboard/events"):
                for headers in ({}, {"authorization": f"Bearer {GATEWAY_KEY}"}, {"authorization": "Bearer wrong"}):
                    refused = await http.get(path, headers=headers)
                    assert refused.status_code == 401, (path, headers)
                    assert refused.json()["error"]["code"] == "invalid_api_key"
            assert (await http.get("/dashboard?key=wrong")).status_code == 401
            assert "set-cookie" not in (await http.get("/dashboard?key=wrong")).headers

            page = await http.get("/dashboard", headers={"authorization": f"Bearer {ADMIN}"})
            assert page.status_code == 200 and "EventSource(" in page.text
            async with open_feed(http, {"authorization": f"Bearer {ADMIN}"}) as feed:
                assert (await feed.next()) is not None

        # The browser's way: ?key= once, then the HttpOnly cookie (EventSource cannot send headers).
        async with httpx2.AsyncClient(base_url=gateway.url, timeout=DEADLINE) as browser:
            exchanged = await browser.get(f"/dashboard?key={ADMIN}")
            assert exchanged.status_code == 303 and exchanged.headers["location"] == "/dashboard"
            cookie = exchanged.headers["set-cookie"]
            assert "HttpOnly" in cookie and "SameSite=Strict" in cookie and "Path=/dashboard" in cookie
            assert (await browser.get("/dashboard")).status_code == 200
            async with open_feed(browser) as feed:
                assert (await feed.next()) is not None
            # The admin key is not a gateway key.
            assert (await browser.get("/v1/models", headers={"authorization": f"Bearer {ADMIN}"})).status_code == 401


async def test_with_gateway_keys_and_no_admin_key_the_dashboard_is_closed(start_gateway: GatewayFactory) -> None:
    gateway = await start_gateway(api_keys=[GATEWAY_KEY])
    async with httpx2.AsyncClient(base_url=gateway.url, timeout=DEADLINE) as http:
        for path in ("/dashboard", "/dashboard/events", f"/dashboard?key={GATEWAY_KEY}"):
            refused = await http.get(path, headers={"authorization": f"Bearer {GATEWAY_KEY}"})
            assert refused.status_code == 401
            assert "admin_api_key" in refused.json()["error"]["message"]


def test_the_rates_cover_the_last_minute_of_samples() -> None:
    window = RateWindow(60.0)
    assert window.rates(0.0, Totals(0, 0, 0, 0))["requests_per_min"] == 0.0
    for second in range(0, 121):
        # one request, 10 tokens per second; one error every 10 s; nothing before t=60 counts at t=120
        window.record(float(second), Totals(second, 10 * second, second // 10, 0))
    rates = window.rates(120.0, Totals(120, 1200, 12, 0))
    assert rates["window_s"] == 60.0
    assert rates["requests_per_min"] == 60.0
    assert rates["tokens_per_s"] == 10.0
    assert rates["errors_per_min"] == 6.0
    assert rates["disconnects_per_min"] == 0.0
    # A final count below the live one (the upstream's usage) never makes a negative rate.
    assert window.rates(120.0, Totals(120, 0, 12, 0))["tokens_per_s"] == 0.0


def test_a_young_window_counts_what_happened_rather_than_extrapolating() -> None:
    window = RateWindow(60.0)
    window.record(0.0, Totals(0, 0, 0, 0))
    rates = window.rates(2.0, Totals(2, 40, 1, 1))
    assert rates == {"window_s": 2.0, "requests_per_min": 2, "tokens_per_s": 20.0, "errors_per_min": 1, "disconnects_per_min": 1}


# --- in a real browser ------------------------------------------------------------------------------

ROWS_JS = "JSON.stringify([...document.querySelectorAll('#streams tr.stream')].map(r => r.dataset.requestId))"
DEPLOYMENTS_JS = "JSON.stringify([...document.querySelectorAll('#deployments tr.deployment')].map(r => r.dataset.deployment))"


@pytest.fixture
def chromium() -> str:
    try:
        return ensure_chromium()
    except RuntimeError as cannot:
        pytest.skip(f"no headless browser: {cannot}")


@pytest.mark.timeout(1200)  # a fresh machine apt-installs chromium first
async def test_in_a_browser_rows_appear_and_leave_as_streams_start_and_end(
    start_gateway: GatewayFactory, chromium: str
) -> None:
    gateway = await start_gateway(api_keys=[GATEWAY_KEY], admin_api_key=ADMIN)
    headers = {"authorization": f"Bearer {GATEWAY_KEY}"}
    release = trio.Event()

    async def rows(page: Any) -> list[str]:
        return json.loads(await page.evaluate(ROWS_JS))  # type: ignore[no-any-return]

    async def held_stream(http: httpx2.AsyncClient, request_id: str, done: trio.Event) -> None:
        # Read the first event, then hold the stream open until told to read the rest.
        async with http.stream("POST", "/v1/chat/completions", json=chat_body(SLOW), headers={**headers, "x-request-id": request_id}) as response:
            assert response.status_code == 200
            chunks = response.aiter_raw()
            await chunks.__anext__()
            await release.wait()
            async for _ in chunks:
                pass
        done.set()

    with trio.fail_after(120):
        async with open_browser(chromium) as browser, httpx2.AsyncClient(base_url=gateway.url, timeout=60) as http:
            # The browser's way in: ?key= sets the cookie, the redirect loads the page, EventSource sends the cookie.
            page = await browser.open(f"{gateway.url}/dashboard?key={ADMIN}")

            async def loaded() -> bool:
                return await page.evaluate(DEPLOYMENTS_JS) == '["default"]'

            await wait_until_async(loaded, timeout=60, interval=0.1)
            assert await page.evaluate("location.pathname + location.search") == "/dashboard"  # the key left the URL
            assert await rows(page) == []

            async with trio.open_nursery() as nursery:
                done = [trio.Event(), trio.Event()]
                nursery.start_soon(held_stream, http, "browser-one", done[0])
                nursery.start_soon(held_stream, http, "browser-two", done[1])

                async def both_shown() -> bool:
                    return sorted(await rows(page)) == ["browser-one", "browser-two"]

                await wait_until_async(both_shown, timeout=60, interval=0.1)
                cells = await page.evaluate(
                    "JSON.stringify([...document.querySelector('tr[data-request-id=\"browser-one\"]').cells].map(c => c.textContent))"
                )
                assert json.loads(cells)[1:4] == ["chat", SLOW, "default"]
                if (shot := _screenshot_path()) is not None:
                    shot.write_bytes(await page.screenshot())
                release.set()
                for event in done:
                    await event.wait()

            async def none_shown() -> bool:
                return await rows(page) == []

            await wait_until_async(none_shown, timeout=60, interval=0.1)
            assert "no streams in flight" in await page.evaluate("document.getElementById('streams').textContent")


def _screenshot_path() -> Path | None:
    """``SLUICE_DASHBOARD_SCREENSHOT=docs/dashboard.png`` keeps a picture of the populated page (how docs/ got its one)."""
    target = os.environ.get("SLUICE_DASHBOARD_SCREENSHOT")
    return Path(target) if target else None
