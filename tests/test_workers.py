"""``sluice serve --workers N``: one port, N processes, one view of the metrics (issue 7);
one gateway per port, workers that live and die with their supervisor (issue 14).

Real processes: the supervisor is started as a user would start it.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from collections.abc import AsyncIterator

import httpx2
import pytest
import trio
from prometheus_client.parser import text_string_to_metric_families

from deploy.fleet import free_port

from sluice.workers import RestartPolicy

from .support import RunningSimulator, chat_body, stream_chat, wait_until


class Supervisor:
    def __init__(self, process: subprocess.Popen[bytes], url: str, simulator: RunningSimulator) -> None:
        self.process = process
        self.url = url
        self.simulator = simulator


async def worker_pids(http: httpx2.AsyncClient, url: str, *, want: int, tries: int = 200) -> set[int]:
    """Fresh connections until ``want`` distinct workers answered (the kernel spreads connections)."""
    seen: set[int] = set()
    for _ in range(tries):
        async with httpx2.AsyncClient() as fresh:  # a new connection each time
            seen.add((await fresh.get(url + "/health")).json()["process"]["pid"])
        if len(seen) >= want:
            break
    return seen


@pytest.fixture
async def supervisor(simulator: RunningSimulator) -> AsyncIterator[Supervisor]:
    port = free_port()
    process = subprocess.Popen(
        [sys.executable, "-m", "sluice.cli", "serve", "--workers", "2", "--port", str(port),
         "--upstream-base-url", simulator.base_url, "--drain-timeout", "0.5"],
        env={k: v for k, v in os.environ.items() if k != "PROMETHEUS_MULTIPROC_DIR"},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    url = f"http://127.0.0.1:{port}"
    async with httpx2.AsyncClient() as http:
        with trio.fail_after(90):
            while len(await _reachable_pids(http, url)) < 2:
                assert process.poll() is None, "the supervisor exited"
                await trio.sleep(0.2)
    try:
        yield Supervisor(process, url, simulator)
    finally:
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
            await trio.to_thread.run_sync(process.wait, 60)


async def _reachable_pids(http: httpx2.AsyncClient, url: str) -> set[int]:
    try:
        return await worker_pids(http, url, want=2, tries=20)
    except httpx2.TransportError:
        return set()


async def test_two_workers_share_the_port_and_the_metrics(supervisor: Supervisor) -> None:
    async with httpx2.AsyncClient() as http:
        pids = await worker_pids(http, supervisor.url, want=2)
        assert len(pids) == 2 and supervisor.process.pid not in pids
        for _ in range(12):
            async with httpx2.AsyncClient(base_url=supervisor.url) as fresh:
                _, sse = await stream_chat(fresh, chat_body("sim:tokens=3"))
                assert sse.ended_with_done
        metrics = (await http.get(supervisor.url + "/metrics")).text
    values = {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(metrics)
        for s in family.samples
    }
    # Whichever worker answers /metrics counts every worker's requests.
    assert values[("sluice_requests_total", (("api", "chat"), ("model", "sim:tokens=3"), ("status", "200")))] == 12
    assert values[("sluice_tokens_total", (("api", "chat"), ("model", "sim:tokens=3"),))] == 36
    assert values[("sluice_streams_active", ())] == 0


async def test_a_worker_that_dies_is_replaced(supervisor: Supervisor) -> None:
    async with httpx2.AsyncClient() as http:
        before = await worker_pids(http, supervisor.url, want=2)
        victim = min(before)
        os.kill(victim, signal.SIGKILL)
        with trio.fail_after(90):
            while True:
                now = await worker_pids(http, supervisor.url, want=2, tries=20)
                if len(now) == 2 and victim not in now:
                    break
                await trio.sleep(0.2)
        async with httpx2.AsyncClient(base_url=supervisor.url) as fresh:
            _, sse = await stream_chat(fresh, chat_body("sim:tokens=2"))
    assert sse.ended_with_done


async def test_sigterm_drains_every_worker_and_exits_zero(supervisor: Supervisor) -> None:
    results = []
    async with httpx2.AsyncClient(base_url=supervisor.url, timeout=60) as http:
        async with trio.open_nursery() as nursery:

            async def long_stream() -> None:
                results.append(await stream_chat(http, chat_body("sim:tokens=50000,itl_ms=10")))

            for _ in range(4):
                nursery.start_soon(long_stream)
            await wait_until(lambda: supervisor.simulator.stats.active_requests == 4, timeout=60)
            supervisor.process.send_signal(signal.SIGTERM)
    code = await trio.to_thread.run_sync(supervisor.process.wait, 60)
    assert code == 0
    assert len(results) == 4
    for _, sse in results:
        assert sse.error is not None and sse.error["code"] == "server_shutting_down"


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().rsplit(")", 1)[1].split()[0] != "Z"  # a zombie has exited
    except FileNotFoundError:
        return False


def _worker_children(supervisor_pid: int) -> set[int]:
    """The supervisor's worker processes (not multiprocessing's resource tracker)."""
    try:
        with open(f"/proc/{supervisor_pid}/task/{supervisor_pid}/children") as children:
            pids = [int(pid) for pid in children.read().split()]
    except FileNotFoundError:
        return set()
    found = set()
    for pid in pids:
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as cmdline:
                if b"spawn_main" in cmdline.read():
                    found.add(pid)
        except FileNotFoundError:
            pass
    return found


async def test_a_second_gateway_on_a_served_port_is_refused(supervisor: Supervisor) -> None:
    port = supervisor.url.rsplit(":", 1)[1]
    second = await trio.to_thread.run_sync(
        lambda: subprocess.run(
            [sys.executable, "-m", "sluice.cli", "serve", "--workers", "2", "--port", port,
             "--upstream-base-url", supervisor.simulator.base_url],
            env={k: v for k, v in os.environ.items() if k != "PROMETHEUS_MULTIPROC_DIR"},
            capture_output=True, text=True, timeout=90,
        )
    )
    assert second.returncode == 2
    assert second.stderr == f"sluice: cannot listen on 127.0.0.1:{port}: Address already in use\n"
    # Every connection still reaches the first gateway's workers.
    supervised = _worker_children(supervisor.process.pid)
    async with httpx2.AsyncClient() as http:
        assert await worker_pids(http, supervisor.url, want=3, tries=40) <= supervised


async def test_workers_exit_when_the_supervisor_is_killed(supervisor: Supervisor) -> None:
    async with httpx2.AsyncClient() as http:
        pids = await worker_pids(http, supervisor.url, want=2)
    assert all(_alive(pid) for pid in pids)
    supervisor.process.kill()
    await trio.to_thread.run_sync(supervisor.process.wait, 60)
    await wait_until(lambda: not any(_alive(pid) for pid in pids), timeout=60)
    async with httpx2.AsyncClient() as http:
        with pytest.raises(httpx2.ConnectError):
            await http.get(supervisor.url + "/health")


async def test_a_supervisor_whose_workers_keep_dying_at_start_gives_up(simulator: RunningSimulator) -> None:
    port = free_port()
    process = subprocess.Popen(
        [sys.executable, "-m", "sluice.cli", "serve", "--workers", "2", "--port", str(port),
         "--upstream-base-url", simulator.base_url],
        env={k: v for k, v in os.environ.items() if k != "PROMETHEUS_MULTIPROC_DIR"},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    killed: set[int] = set()
    try:
        # Like an OOM killer that strikes each worker as it starts.
        with trio.fail_after(120):
            while process.poll() is None:
                for pid in _worker_children(process.pid) - killed:
                    os.kill(pid, signal.SIGKILL)
                    killed.add(pid)
                await trio.sleep(0.05)
    finally:
        if process.poll() is None:
            process.kill()
        _, stderr = process.communicate(timeout=60)
    assert process.returncode == 1
    # Replaced with a backoff, then given up: not restarted forever.
    assert RestartPolicy().give_up_after <= len(killed) <= RestartPolicy().give_up_after + 1
    assert "sluice: workers keep dying soon after start (5 in a row, last exit code -9); giving up\n" in stderr
    assert "Traceback" not in stderr


def test_restarts_back_off_after_early_deaths_and_give_up_after_five() -> None:
    policy = RestartPolicy(early=10.0, give_up_after=5, first_delay=0.5, max_delay=10.0)
    assert [policy.after_death(1.0) for _ in range(4)] == [0.5, 1.0, 2.0, 4.0]
    assert policy.after_death(1.0) is None


def test_a_worker_that_lived_long_is_replaced_at_once_and_resets_the_backoff() -> None:
    policy = RestartPolicy(early=10.0, give_up_after=3, first_delay=0.5)
    assert policy.after_death(1.0) == 0.5
    assert policy.after_death(1.0) == 1.0
    assert policy.after_death(60.0) == 0.0
    assert policy.after_death(1.0) == 0.5
