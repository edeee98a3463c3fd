"""Where a gateway's CPU goes: py-spy on a pinned gateway under one load shape, folded into layers.

``python -m benchmarks.profile [--shape sustained|throughput|requests] [--gateway sluice] [--seconds 10]``

Starts the simulator and the gateway as the benchmarks do (gateway on core 0,
upstream and load generator on core 1), warms it with one request, records
it with ``py-spy record -f raw`` while the load runs, and prints each layer's
share of the gateway's busy samples (samples in epoll are idle, left out),
then the top functions by self time. The raw profile is kept for a flame
graph (``results/profile-<shape>.txt``, not committed).

The layers are matched on frame names, first match wins, so each sample
counts once; they are the ones ``benchmarks/README.md`` reports.
"""

from __future__ import annotations

import argparse
import collections
import os
import re
import shutil
import subprocess
import sys

from .procs import run_loadgen
from .report import RESULTS
from .targets import UPSTREAMS, target, upstream

SHAPES = {
    # the sustained scenario's stream shape, longer
    "sustained": {"streams": 50, "model": "sim:tokens=600,itl_ms=20", "ramp_s": 1.0},
    # the throughput scenario's shape, repeated for as long as the recording runs
    "throughput": {"streams": 64, "model": "sim:tokens=512", "repeat_s": None},
    # the requests scenario: one-token streams back to back
    "requests": {"streams": 32, "model": "sim:tokens=1", "repeat_s": None},
}

#: (layer, frame pattern); a sample goes to the first layer with a frame matching
LAYERS = [
    ("upstream request: routing, retries, httpx2/httpcore2 send and response head", r"StreamRelay\.open"),
    ("upstream body: UpstreamBody and the recv syscalls", r"UpstreamBody\.read"),
    ("relay per batch: EventFramer, the channel and policy (_offer)", r"StreamRelay\._produce"),
    ("client send: the head through hypercorn, body chunks through write_body and _send_now -> send syscall", r"HTTPStream\.app_send|GatewayTCPServer\.write_body|GatewayTCPServer\._send_now"),
    ("consumer: StreamRelay.__anext__ and the channel", r"StreamRelay\.__anext__"),
    ("relay start and end: nursery, release, pool return, figures, log line", r"StreamRelay\.__aexit__|StreamRelay\.__aenter__|StreamRelay\.release"),
    ("Quart: dispatch, before/after request, the route's own code", r"QuartTrio\.handle_request|ASGIHTTPConnection\._send_response"),
    # hypercorn-floor's own parts (its frames match none of Sluice's above but hypercorn's)
    ("floor upstream request: pool, request send, response head",
     r"read_head \(benchmarks|Pool\.take|app \(benchmarks/hypercorn_floor\.py:\d+\);SocketStream\.send_all"),
    ("floor upstream body: produce (recv, chunk decoding, channel send)", r"relay\.<locals>\.produce"),
    ("floor relay: consumer, channel, nursery, start and end", r"relay \(benchmarks/hypercorn_floor"),
    ("hypercorn: accepting, reading and parsing connections", r"_run_handler|_serve_one_listener|TCPServer\.|H11Protocol\.handle"),
]
IDLE = re.compile(r"get_events|epoll")


def fold(raw_path: str) -> tuple[int, collections.Counter[str], collections.Counter[str]]:
    busy = 0
    layers: collections.Counter[str] = collections.Counter()
    leaves: collections.Counter[str] = collections.Counter()
    with open(raw_path) as raw:
        for line in raw:
            stack, _, count_text = line.rstrip().rpartition(" ")
            if not stack:
                continue
            count = int(count_text)
            frames = stack.split(";")
            if IDLE.search(frames[-1]):
                continue
            busy += count
            leaves[frames[-1]] += count
            for name, pattern in LAYERS:
                if re.search(pattern, stack):
                    layers[name] += count
                    break
            else:
                layers["other: trio's scheduler and everything else"] += count
    return busy, layers, leaves


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="benchmarks.profile", description=__doc__)
    parser.add_argument("--shape", choices=sorted(SHAPES), default="sustained")
    parser.add_argument("--gateway", default="sluice")
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--rate", type=int, default=250, help="py-spy samples per second")
    parser.add_argument("--upstream", choices=UPSTREAMS, default="fast", help="the upstream (default: the fast one)")
    args = parser.parse_args(argv)
    py_spy = shutil.which("py-spy") or os.path.join(os.path.dirname(sys.executable), "py-spy")
    if not os.path.exists(py_spy):
        print("py-spy is not installed: ./dev.sh bench installs the bench extras, or pip install py-spy", file=sys.stderr)
        return 2
    raw_path = os.path.join(RESULTS, f"profile-{args.shape}.txt")
    with upstream(args.upstream) as upstream_port, target(args.gateway, upstream_port) as system:
        if system.pid is None:
            print("nothing to profile: that gateway has no process", file=sys.stderr)
            return 2
        run_loadgen({"url": system.url, "streams": 1, "model": "sim:tokens=1"}, 30)
        spec = dict(SHAPES[args.shape], url=system.url)
        if "repeat_s" in spec:
            spec["repeat_s"] = args.seconds
        recorder = subprocess.Popen(
            [py_spy, "record", "-p", str(system.pid), "-r", str(args.rate), "-f", "raw", "-o", raw_path,
             "-d", str(int(args.seconds))],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )
        result = run_loadgen(spec, args.seconds + 120)
        recorder.wait(timeout=args.seconds + 60)
    busy, layers, leaves = fold(raw_path)
    print(f"{args.gateway}, {args.shape}: {result['completed']} streams, {result['failed']} failed, "
          f"{result['tokens']} tokens; {busy} busy samples ({raw_path})")
    for name, count in layers.most_common():
        print(f"{count / busy * 100:5.1f} %  {name}")
    print("\ntop functions by self time:")
    for frame, count in leaves.most_common(15):
        print(f"{count / busy * 100:5.1f} %  {frame}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
