"""Processes of a benchmark run: start pinned, measure CPU and memory, stop by PID."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from typing import Any

CLOCK_TICKS = os.sysconf("SC_CLK_TCK")
GATEWAY_CORE = 0
LOAD_CORE = 1 if (os.cpu_count() or 1) > 1 else 0


def start(cmd: list[str], core: int | str, *, env: dict[str, str] | None = None) -> subprocess.Popen[bytes]:
    """Start a process pinned to one core; its output goes to a log file, not a pipe that could fill."""
    results = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")
    os.makedirs(results, exist_ok=True)
    log = open(os.path.join(results, f"{os.path.basename(cmd[0])}-{time.time_ns()}.log.tmp"), "wb")
    return subprocess.Popen(
        ["taskset", "-c", str(core), *cmd],
        stdout=log,
        stderr=subprocess.STDOUT,
        env={**os.environ, **(env or {})},
        start_new_session=True,
    )


def stop(process: subprocess.Popen[bytes]) -> None:
    if process.poll() is None:
        try:
            os.killpg(process.pid, signal.SIGTERM)
            process.wait(timeout=10)
        except (ProcessLookupError, subprocess.TimeoutExpired):
            try:
                os.killpg(process.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            process.wait(timeout=10)


def wait_port(port: int, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.05)
    raise TimeoutError(f"nothing listening on port {port} after {timeout} s")


def _tree(pid: int) -> list[int]:
    """``pid`` and its live descendants (``--workers N`` runs the gateway as child processes)."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as stat:
                    parent = int(stat.read().rsplit(")", 1)[1].split()[1])
            except OSError:
                continue
            children.setdefault(parent, []).append(int(entry))
    found, pending = [], [pid]
    while pending:
        current = pending.pop()
        found.append(current)
        pending.extend(children.get(current, []))
    return found


def cpu_seconds(pid: int) -> float:
    """CPU time of the process and its descendants (live ones, plus what reaped ones left)."""
    total = 0.0
    for member in _tree(pid):
        try:
            with open(f"/proc/{member}/stat") as stat:
                fields = stat.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        total += (int(fields[11]) + int(fields[12])) / CLOCK_TICKS
    return total


def rss_mb(pid: int, field: str = "VmRSS") -> float:
    """Resident memory (or its peak, ``VmHWM``) summed over the process and its descendants."""
    total = 0.0
    for member in _tree(pid):
        try:
            with open(f"/proc/{member}/status") as status:
                for line in status:
                    if line.startswith(field + ":"):
                        total += int(line.split()[1]) / 1024.0
                        break
        except OSError:
            continue
    return total


def http_json(url: str, method: str = "GET") -> Any:
    request = urllib.request.Request(url, method=method, data=b"" if method == "POST" else None)
    with urllib.request.urlopen(request, timeout=10) as response:
        return json.loads(response.read())


def run_loadgen(spec: dict[str, Any], timeout: float) -> dict[str, Any]:
    """Run the load generator as its own process on the load core; return its results."""
    completed = subprocess.run(
        ["taskset", "-c", str(LOAD_CORE), sys.executable, "-m", "benchmarks.loadgen", json.dumps(spec)],
        capture_output=True,
        timeout=timeout,
        cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
    )
    if completed.returncode != 0:
        raise RuntimeError(f"loadgen failed: {completed.stderr.decode()[-2000:]}")
    return json.loads(completed.stdout)
