"""Headless Chromium driven over the DevTools protocol on a pipe, from trio (tests only).

``--remote-debugging-pipe`` makes Chromium read commands on fd 3 and write
replies on fd 4, each a JSON message ending in a NUL byte: no websocket, no
port, no extra dependency. The browser runs in a temporary profile and is
closed (then killed, if it lingers) when the context ends.

:func:`ensure_chromium` installs Debian's ``chromium`` when it is missing
and the tests run as root with apt-get (deploy/fleet.py's
:func:`~deploy.fleet.ensure_binary`, as for nginx and redis-server), so
``./dev.sh test`` on a fresh CI machine runs the browser tests instead of skipping them; elsewhere they skip with a reason.
"""

from __future__ import annotations

import base64
import json
import shutil
import subprocess
import tempfile
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import trio

from deploy.fleet import ensure_binary


def ensure_chromium() -> str:
    """Chromium's path, apt-get installing Debian's ``chromium`` first when missing (as root).

    Raises ``RuntimeError`` saying why when it cannot be had.
    """
    for name in ("chromium", "chromium-browser", "google-chrome"):
        found = shutil.which(name)
        if found:
            return found
    return ensure_binary("chromium", ["chromium"])


class Page:
    """One tab, attached with a flat session: :meth:`evaluate` runs JS in it."""

    def __init__(self, browser: Browser, session_id: str) -> None:
        self._browser = browser
        self.session_id = session_id

    async def call(self, method: str, **params: Any) -> dict[str, Any]:
        return await self._browser.call(method, session_id=self.session_id, **params)

    async def evaluate(self, expression: str) -> Any:
        reply = await self.call("Runtime.evaluate", expression=expression, returnByValue=True)
        result = reply["result"]
        if "exceptionDetails" in reply:
            raise RuntimeError(f"the page raised: {reply['exceptionDetails']}")
        return result.get("value")

    async def screenshot(self) -> bytes:
        reply = await self.call("Page.captureScreenshot", format="png")
        return base64.b64decode(reply["data"])


class Browser:
    def __init__(self, process: trio.Process) -> None:
        self._process = process
        self._next_id = 0
        self._buffer = b""

    async def call(self, method: str, *, session_id: str | None = None, **params: Any) -> dict[str, Any]:
        """Send one command and wait for its reply (events in between are skipped: nothing here needs them)."""
        assert self._process.stdin is not None and self._process.stdout is not None
        self._next_id += 1
        message: dict[str, Any] = {"id": self._next_id, "method": method, "params": params}
        if session_id is not None:
            message["sessionId"] = session_id
        await self._process.stdin.send_all(json.dumps(message).encode() + b"\0")
        while True:
            while b"\0" in self._buffer:
                raw, self._buffer = self._buffer.split(b"\0", 1)
                reply = json.loads(raw)
                if reply.get("id") == self._next_id:
                    if "error" in reply:
                        raise RuntimeError(f"{method}: {reply['error']}")
                    return reply["result"]  # type: ignore[no-any-return]
            data = await self._process.stdout.receive_some(65536)
            if not data:
                raise RuntimeError("chromium closed its DevTools pipe")
            self._buffer += data

    async def open(self, url: str, *, width: int = 1280, height: int = 800) -> Page:
        target = await self.call("Target.createTarget", url="about:blank")
        attached = await self.call("Target.attachToTarget", targetId=target["targetId"], flatten=True)
        page = Page(self, attached["sessionId"])
        await page.call("Emulation.setDeviceMetricsOverride", width=width, height=height, deviceScaleFactor=1, mobile=False)
        await page.call("Page.navigate", url=url)
        return page


@asynccontextmanager
async def open_browser(executable: str) -> AsyncIterator[Browser]:
    """A headless Chromium with a fresh profile; closed when the context ends."""
    with tempfile.TemporaryDirectory(prefix="sluice-chromium-") as profile:
        # fds 3 and 4 are the DevTools pipe: our stdin/stdout pipes, moved there by the shell.
        command = [
            "sh", "-c", 'exec "$@" 3<&0 4>&1 0</dev/null 1>/dev/null', "sh",
            executable, "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run",
            "--remote-debugging-pipe", f"--user-data-dir={profile}", "about:blank",
        ]  # fmt: skip
        process = await trio.lowlevel.open_process(
            command, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL
        )
        browser = Browser(process)
        try:
            yield browser
        finally:
            with trio.CancelScope(shield=True):
                with trio.move_on_after(10):
                    try:
                        await browser.call("Browser.close")
                    except (RuntimeError, trio.BrokenResourceError, trio.ClosedResourceError):
                        pass
                    await process.wait()
                if process.returncode is None:
                    process.kill()
                    await process.wait()
