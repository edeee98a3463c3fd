"""Stalled readers: what clients that stop reading cost the gateway's host in memory.

    python -m benchmarks.stalled_readers [--counts 100,1000] [--source DIR] [--env KEY=VALUE ...]

For each count N: starts the simulator (``sluice simulate``) and a gateway
(``sluice serve``) as their own processes on 127.0.0.1 (gateway on core 0,
simulator and clients on core 1, like the benchmark suite), opens N raw
sockets (each with a 4 KiB receive buffer, set before connect, unless
``--client-rcvbuf`` says otherwise) that each send
one streaming request for a long, fast stream (megabytes, no delay between
tokens), read the response head, and then never read again. It waits until
the gateway is steady (RSS and the host's TCP memory unchanged for a few
seconds, bounded), then reports:

* the gateway's RSS (``VmRSS``) before, at steady state, and after the
  clients went away (RST) and the gateway settled;
* the host's TCP memory (``/proc/net/sockstat``, ``TCP ... mem`` pages x
  4096) before and at steady state: every socket on the host, so also the
  simulator's send buffers and the clients' receive buffers;
* the kernel memory of the gateway's own sockets (``ss -tm``: receive queue,
  forward allocation and send queue, split into its client side and its upstream
  side), which is what the gateway's socket options decide;
* how many requests were admitted (200) and refused (503).

The stall timeout is off for the run (``SLUICE_STALL_TIMEOUT=0``): the point
is what a stalled stream holds while it is held, not when it is cut.

``--source DIR`` runs another checkout's ``service/`` (e.g. the code before a
change: ``git archive <commit> | tar -x -C DIR``) with this venv. Everything
it starts it stops by PID; file-descriptor limits are raised for itself and
the processes it starts (inherited), up to the hard limit.
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import re
import resource
import socket
import subprocess
import sys
import time
from typing import Any

from deploy.fleet import free_ports

from .procs import GATEWAY_CORE, LOAD_CORE, http_json, rss_mb, start, stop, wait_port

#: ~8 MB of events per stream (16 choices x 3 000 tokens), sent as fast as the sockets take them
MODEL = "sim:tokens=3000,seed=stall-{i}"
CHOICES = 16
STEADY_FOR_S = 4.0
STEADY_MAX_S = 90.0


def sockstat_tcp_bytes() -> int:
    with open("/proc/net/sockstat") as sockstat:
        for line in sockstat:
            if line.startswith("TCP:"):
                fields = line.split()
                return int(fields[fields.index("mem") + 1]) * 4096
    raise RuntimeError("no TCP line in /proc/net/sockstat")


def gateway_socket_bytes(gateway_port: int, upstream_port: int) -> dict[str, int]:
    """Kernel memory (``skmem`` r + f + w) of the gateway's sockets, by side, from ``ss -tmn``."""
    out = subprocess.run(["ss", "-tmnH"], capture_output=True, text=True, timeout=30).stdout
    sides = {"client_side": 0, "upstream_side": 0}
    current: str | None = None
    for line in out.splitlines():
        if not line.startswith((" ", "\t")) and line.strip():
            fields = line.split()
            local, peer = fields[3], fields[4]
            current = None
            if local.endswith(f":{gateway_port}"):
                current = "client_side"
            elif peer.endswith(f":{upstream_port}"):
                current = "upstream_side"  # the gateway's end of an upstream connection
        match = re.search(r"skmem:\(r(\d+),rb\d+,t\d+,tb\d+,f(\d+),w(\d+),", line)
        if match and current is not None:
            # received-unread + forward-allocated + queued-unsent: what TCP memory charges the socket
            sides[current] += sum(int(group) for group in match.groups())
    return sides


def open_stalled(gateway_port: int, count: int, model: str, rcvbuf: int) -> tuple[list[socket.socket], dict[int, int]]:
    """Open ``count`` streams that read their head and nothing more; return the sockets and statuses seen."""
    sockets: list[socket.socket] = []
    statuses: dict[int, int] = {}
    for i in range(count):
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        if rcvbuf:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
        sock.settimeout(30)
        sock.connect(("127.0.0.1", gateway_port))
        body = json.dumps(
            {"model": model.format(i=i), "messages": [{"role": "user", "content": "flood"}], "stream": True, "n": CHOICES}
        ).encode()
        sock.sendall(
            b"POST /v1/chat/completions HTTP/1.1\r\nhost: 127.0.0.1\r\ncontent-type: application/json\r\n"
            + f"content-length: {len(body)}\r\n\r\n".encode()
            + body
        )
        head = b""
        while b"\r\n" not in head:
            data = sock.recv(64)
            if not data:
                break
            head += data
        status = int(head.split(b" ", 2)[1]) if head.startswith(b"HTTP/1.1 ") else 0
        statuses[status] = statuses.get(status, 0) + 1
        sockets.append(sock)
    return sockets, statuses


def wait_steady(pid: int) -> tuple[float, int, float]:
    """Poll until RSS and TCP memory stop moving (within 1 %) for a few seconds; bounded."""
    began = time.monotonic()
    last = (rss_mb(pid), sockstat_tcp_bytes())
    steady_since = time.monotonic()
    while time.monotonic() - began < STEADY_MAX_S:
        time.sleep(1.0)
        now = (rss_mb(pid), sockstat_tcp_bytes())
        if abs(now[0] - last[0]) > 0.01 * last[0] or abs(now[1] - last[1]) > 0.01 * max(last[1], 1):
            steady_since = time.monotonic()
        last = now
        if time.monotonic() - steady_since >= STEADY_FOR_S:
            break
    return last[0], last[1], time.monotonic() - began


def close_rst(sockets: list[socket.socket]) -> None:
    for sock in sockets:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
        sock.close()


def run_one(
    count: int, source: str | None, extra_env: dict[str, str], model: str = MODEL, rcvbuf: int = 4096
) -> dict[str, Any]:
    env = {"SLUICE_STALL_TIMEOUT": "0", "SLUICE_LOG_LEVEL": "WARNING", **extra_env}
    if source:
        env["PYTHONPATH"] = os.path.join(os.path.abspath(source), "service")
    sim_port, gw_port = free_ports(2)
    cli = [sys.executable, "-m", "sluice.cli"]
    simulator = start([*cli, "simulate", "--port", str(sim_port)], LOAD_CORE, env=env)
    gateway = None
    sockets: list[socket.socket] = []
    try:
        wait_port(sim_port)
        gateway = start(
            [*cli, "serve", "--port", str(gw_port), "--upstream-base-url", f"http://127.0.0.1:{sim_port}/v1"],
            GATEWAY_CORE,
            env=env,
        )
        wait_port(gw_port)
        gw = f"http://127.0.0.1:{gw_port}"
        http_json(gw + "/health")
        time.sleep(1.0)
        rss_before, tcp_before = rss_mb(gateway.pid), sockstat_tcp_bytes()
        sockets, statuses = open_stalled(gw_port, count, model, rcvbuf)
        rss_steady, tcp_steady, waited = wait_steady(gateway.pid)
        own_sockets = gateway_socket_bytes(gw_port, sim_port)
        health = http_json(gw + "/health")
        close_rst(sockets)
        sockets = []
        time.sleep(5.0)
        rss_after = rss_mb(gateway.pid)
        health_after = http_json(gw + "/health")
        return {
            "stalled_readers": count,
            "statuses": statuses,
            "active_streams": health["active_streams"],
            "rss_mb_before": round(rss_before, 1),
            "rss_mb_steady": round(rss_steady, 1),
            "rss_mb_after_close": round(rss_after, 1),
            "tcp_mem_mb_before": round(tcp_before / 2**20, 1),
            "tcp_mem_mb_steady": round(tcp_steady / 2**20, 1),
            "gateway_sockets_mb": {side: round(value / 2**20, 1) for side, value in own_sockets.items()},
            "active_streams_after_close": health_after["active_streams"],
            "seconds_to_steady": round(waited, 1),
        }
    finally:
        close_rst(sockets)
        if gateway is not None:
            stop(gateway)
        stop(simulator)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--counts", default="100,1000")
    parser.add_argument(
        "--model", default=MODEL, help="the simulated model ({i}: the stream's number); e.g. ttft_ms=600000 for streams that hold nothing"
    )
    parser.add_argument(
        "--client-rcvbuf", type=int, default=4096, help="the clients' SO_RCVBUF, bytes; 0 = kernel autotuning (a client host with room)"
    )
    parser.add_argument("--source", help="another checkout whose service/ to run (default: this one)")
    parser.add_argument("--env", action="append", default=[], help="KEY=VALUE for the gateway (e.g. SLUICE_CLIENT_SNDBUF=65536)")
    args = parser.parse_args()
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))  # inherited by the processes started below
    extra_env = dict(item.split("=", 1) for item in args.env)
    results = [run_one(int(n), args.source, extra_env, args.model, args.client_rcvbuf) for n in args.counts.split(",")]
    print(json.dumps(results, indent=2))
    # The started processes' logs (procs.start writes them beside the results), as run.py does.
    for leftover in glob.glob(os.path.join(os.path.dirname(os.path.abspath(__file__)), "results", "*.log.tmp")):
        os.remove(leftover)
    return 0


if __name__ == "__main__":
    sys.exit(main())
