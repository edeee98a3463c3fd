"""``sluice serve`` as a process: a port it cannot have, and signals during the drain (issue 14).

Real processes, started as a user starts them (``python -m sluice.cli``).
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import httpx2
import pytest
import trio

from deploy.fleet import free_port

from .rawclient import RawStream
from .support import RunningSimulator, chat_body, wait_until, wait_until_async

_ENV = {k: v for k, v in os.environ.items() if k != "PROMETHEUS_MULTIPROC_DIR"}


def serve_command(port: int, *flags: str) -> list[str]:
    return [sys.executable, "-m", "sluice.cli", "serve", "--port", str(port), *flags]


@pytest.fixture
def busy_port() -> Iterator[int]:
    """A port another program listens on."""
    with socket.socket() as other:
        other.bind(("127.0.0.1", 0))
        other.listen()
        yield other.getsockname()[1]


@pytest.mark.parametrize("workers", [1, 2])
async def test_a_busy_port_is_reported_in_one_line_with_exit_code_2(busy_port: int, workers: int) -> None:
    done = await trio.to_thread.run_sync(
        lambda: subprocess.run(
            serve_command(busy_port, "--workers", str(workers)), env=_ENV, capture_output=True, text=True, timeout=90
        )
    )
    assert done.returncode == 2
    assert done.stderr == f"sluice: cannot listen on 127.0.0.1:{busy_port}: Address already in use\n"


async def _start_and_wait_ready(command: list[str], stderr: Path, workers: int = 1) -> subprocess.Popen[bytes]:
    """Start the gateway; return once ``workers`` distinct workers have answered ``/health``.

    Every worker must be serving (its signal handling installed) before a test
    signals the supervisor: a worker still starting dies of SIGTERM's default
    action and never drains.
    """
    url = f"http://127.0.0.1:{command[command.index('--port') + 1]}"
    with stderr.open("wb") as err:
        process = subprocess.Popen(command, env=_ENV, stdout=subprocess.DEVNULL, stderr=err)
    ready: set[int] = set()
    with trio.fail_after(90):
        while len(ready) < workers:
            assert process.poll() is None, stderr.read_text()
            try:
                async with httpx2.AsyncClient() as http:  # a new connection each time: the kernel spreads them
                    response = await http.get(url + "/health")
                if response.status_code == 200:
                    ready.add(response.json()["process"]["pid"])
                    continue
            except httpx2.TransportError:
                pass
            await trio.sleep(0.2)
    return process


@pytest.mark.parametrize("workers", [1, 2])
async def test_a_second_signal_ends_the_drain_now_with_a_final_event_and_no_traceback(
    simulator: RunningSimulator, tmp_path: Path, workers: int
) -> None:
    port = free_port()
    stderr = tmp_path / "stderr"
    # A drain far longer than the test's bounds: only the second signal can end it.
    process = await _start_and_wait_ready(
        serve_command(port, "--workers", str(workers), "--upstream-base-url", simulator.base_url, "--drain-timeout", "600"),
        stderr,
        workers,
    )
    try:
        streams = [
            await RawStream.open(f"http://127.0.0.1:{port}", chat_body("sim:tokens=25000,itl_ms=20")) for _ in range(3)
        ]
        for stream in streams:
            await stream.read_until(b"data: ")
        process.send_signal(signal.SIGINT)
        # The second signal must arrive after the first was taken (two pending
        # signals of one kind are one): wait for the drain to have started.
        draining_lines = workers  # one "draining" line per worker
        with trio.move_on_after(60) as waited:
            while stderr.read_text().count("draining for up to") < draining_lines:
                await trio.sleep(0.005)
        assert not waited.cancelled_caught, stderr.read_text()[-4000:]
        process.send_signal(signal.SIGINT)
        with trio.move_on_after(60) as waited:
            bodies = [await stream.read_all() for stream in streams]
        assert not waited.cancelled_caught, stderr.read_text()[-4000:]
        code = await trio.to_thread.run_sync(process.wait, 60)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    for body in bodies:
        assert b'"code":"server_shutting_down"' in body
        assert body.rstrip().endswith(b"}")  # the error event is the last thing the client read
    assert code == 0
    text = stderr.read_text()
    assert "Traceback" not in text and "ExceptionGroup" not in text and "KeyboardInterrupt" not in text


@pytest.mark.parametrize("workers", [1, 2])
async def test_a_draining_gateway_refuses_new_connections(simulator: RunningSimulator, tmp_path: Path, workers: int) -> None:
    """While streams drain, the port is closed: a load balancer's new connections fail at once, not hang."""
    port = free_port()
    stderr = tmp_path / "stderr"
    process = await _start_and_wait_ready(
        serve_command(port, "--workers", str(workers), "--upstream-base-url", simulator.base_url, "--drain-timeout", "600"),
        stderr,
        workers,
    )
    try:
        stream = await RawStream.open(f"http://127.0.0.1:{port}", chat_body("sim:tokens=25000,itl_ms=20"))
        await stream.read_until(b"data: ")
        process.send_signal(signal.SIGTERM)

        async def refused() -> bool:
            try:
                connection = await trio.open_tcp_stream("127.0.0.1", port)
            except OSError:
                return True
            await connection.aclose()
            return False

        await wait_until_async(refused, timeout=30)
        assert process.poll() is None  # still draining the stream
        process.send_signal(signal.SIGTERM)
        with trio.fail_after(60):
            body = await stream.read_all()
        assert b'"code":"server_shutting_down"' in body
        assert await trio.to_thread.run_sync(process.wait, 60) == 0
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
