"""Soak: abort thousands of streams mid-stream and check the gateway leaks nothing.

    python -m benchmarks.soak [--streams 10000] [--concurrency 100,500] [--quick]

Starts the simulator (``sluice simulate``) and a gateway (``sluice serve``)
as their own processes on 127.0.0.1 (pinned like the benchmark suite: the
gateway on core 0, simulator and load on core 1), reads the gateway's
``/health`` process figures (open fds, trio tasks, RSS), then aborts
``--streams`` streams in rounds at each concurrency: every round is four
load-generator processes (benchmarks/loadgen.py in its "abort after K
events" mode), two closing by RST and two by FIN, each at its own random K.
After each round it waits for the simulator to have no request left open,
and checks from the simulator's records (``GET /sim/stats``) that every
upstream request of the round was closed by the gateway, and how long after
the client's abort (both sides read CLOCK_MONOTONIC). At the end, after a
settle, it reads ``/health`` again.

Writes benchmarks/results/soak.json and soak.md. Exits non-zero when a result
is wrong (an upstream request left open, streams not aborted, fds or tasks
not back to their baseline); timing never fails it.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import json
import os
import random
import sys
import time
from typing import Any

from deploy.fleet import free_port

from .procs import GATEWAY_CORE, LOAD_CORE, http_json, run_loadgen, start, stop, wait_port
from .scenarios import pct

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RESULTS = os.path.join(ROOT, "benchmarks", "results")
#: long enough that every abort is mid-stream; spaced so hundreds of streams stay cheap
MODEL = "sim:tokens=5000,itl_ms=20,seed={tag}-{i}"
SETTLE_S = 30.0


def health(gateway: str) -> dict[str, Any]:
    return http_json(gateway + "/health")


def settled_figures(gateway: str, baseline: dict[str, int], timeout: float = SETTLE_S) -> tuple[dict[str, int], float]:
    """Poll /health until fds and tasks are back to (or under) the baseline, or the timeout; return them and the wait."""
    began = time.monotonic()
    figures = health(gateway)["process"]
    while time.monotonic() - began < timeout:
        if figures["fds"] <= baseline["fds"] and figures["tasks"] <= baseline["tasks"]:
            break
        time.sleep(0.2)
        figures = health(gateway)["process"]
    return figures, time.monotonic() - began


def wait_upstream_idle(sim: str, timeout: float = 60.0) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    stats = http_json(sim + "/sim/stats")
    while stats["active_requests"] and time.monotonic() < deadline:
        time.sleep(0.1)
        stats = http_json(sim + "/sim/stats")
    return stats


def one_round(gateway: str, sim: str, tag: str, streams: int, rng: random.Random) -> dict[str, Any]:
    """``streams`` aborted streams at once: four loadgen processes, RST/FIN, each at a random event count."""
    http_json(sim + "/sim/reset", "POST")  # the records hold 1000 requests: one round at a time
    parts = [streams // 4 + (1 if k < streams % 4 else 0) for k in range(4)]
    specs = []
    for k, count in enumerate(parts):
        if not count:
            continue
        specs.append(
            {
                "url": gateway,
                "streams": count,
                "model": MODEL.replace("{tag}", f"{tag}p{k}"),
                "abort_after": rng.randint(1, 15),
                "abort_rst": k % 2 == 0,
                "ramp_s": 0.2,
                "timeout_s": 120.0,
            }
        )
    with concurrent.futures.ThreadPoolExecutor(len(specs)) as pool:
        results = list(pool.map(lambda spec: run_loadgen(spec, 180.0), specs))
    stats = wait_upstream_idle(sim)
    closed_at: dict[str, float] = {}
    for record in stats["records"]:
        if record["closed_at"] is not None:
            closed_at[record["model"]] = record["closed_at"]
    delays_rst: list[float] = []
    delays_fin: list[float] = []
    aborted = 0
    closed = 0
    for spec, result in zip(specs, results, strict=True):
        for index, at in result["aborts"].items():
            aborted += 1
            model = spec["model"].replace("{i}", str(index))
            if model in closed_at:
                closed += 1
                (delays_rst if spec["abort_rst"] else delays_fin).append((closed_at[model] - at) * 1000)
    return {
        "streams": streams,
        "aborted": aborted,
        "not_aborted": sum(r["streams"] - len(r["aborts"]) for r in results),
        "errors": sorted({e for r in results for e in r["errors"]})[:5],
        "upstream_started": stats["requests_started"],
        "upstream_closed": closed,
        "upstream_closed_by_client": stats["requests_closed_by_client"],
        "upstream_still_open": stats["active_requests"],
        "upstream_completed": stats["requests_completed"],
        "delays_rst_ms": delays_rst,
        "delays_fin_ms": delays_fin,
    }


def run(total: int, concurrencies: list[int], seed: int) -> dict[str, Any]:
    rng = random.Random(seed)
    sim_port, gw_port = free_port(), free_port()
    sim = f"http://127.0.0.1:{sim_port}"
    gateway = f"http://127.0.0.1:{gw_port}"
    bindir = os.path.dirname(sys.executable)
    # The caller's PYTHONPATH first (to soak another checkout of the service), then this one.
    env = {"PYTHONPATH": os.pathsep.join(p for p in (os.environ.get("PYTHONPATH"), ROOT) if p)}
    simulator = start([os.path.join(bindir, "sluice"), "simulate", "--port", str(sim_port)], LOAD_CORE, env=env)
    server = None
    try:
        wait_port(sim_port)
        server = start(
            [
                os.path.join(bindir, "sluice"), "serve", "--port", str(gw_port), "--upstream-base-url", f"{sim}/v1",
                "--max-streams", "8192", "--log-level", "WARNING",
            ],
            GATEWAY_CORE,
            env=env,
        )
        wait_port(gw_port)
        # Warm up: one whole stream, so the upstream pool holds its idle connection in both readings.
        warm = run_loadgen({"url": gateway, "streams": 1, "model": "sim:tokens=5"}, 60)
        assert warm["completed"] == 1, warm
        time.sleep(0.5)
        before = health(gateway)["process"]
        began = time.monotonic()
        per_level = [total // len(concurrencies) + (1 if k < total % len(concurrencies) else 0) for k in range(len(concurrencies))]
        levels = []
        for concurrency, streams in zip(concurrencies, per_level, strict=True):
            rounds = []
            left = streams
            number = 0
            while left > 0:
                size = min(concurrency, left)
                rounds.append(one_round(gateway, sim, f"c{concurrency}r{number}", size, rng))
                left -= size
                number += 1
                print(
                    f"soak: concurrency {concurrency}: round {number}, {streams - left}/{streams} streams, "
                    f"closed {rounds[-1]['upstream_closed']}/{rounds[-1]['aborted']}",
                    file=sys.stderr,
                    flush=True,
                )
            rst = [d for r in rounds for d in r["delays_rst_ms"]]
            fin = [d for r in rounds for d in r["delays_fin_ms"]]
            both = rst + fin
            aborted = sum(r["aborted"] for r in rounds)
            closed = sum(r["upstream_closed"] for r in rounds)
            levels.append(
                {
                    "concurrency": concurrency,
                    "rounds": len(rounds),
                    "streams": streams,
                    "aborted": aborted,
                    "not_aborted": sum(r["not_aborted"] for r in rounds),
                    "errors": sorted({e for r in rounds for e in r["errors"]})[:5],
                    "upstream_started": sum(r["upstream_started"] for r in rounds),
                    "upstream_closed": closed,
                    "upstream_closed_pct": round(100.0 * closed / aborted, 2) if aborted else None,
                    "upstream_still_open": sum(r["upstream_still_open"] for r in rounds),
                    "upstream_completed": sum(r["upstream_completed"] for r in rounds),
                    "abort_to_close_p50_ms": _round(pct(both, 0.5)),
                    "abort_to_close_p99_ms": _round(pct(both, 0.99)),
                    "abort_to_close_max_ms": _round(max(both) if both else None),
                    "rst_p50_ms": _round(pct(rst, 0.5)),
                    "rst_p99_ms": _round(pct(rst, 0.99)),
                    "fin_p50_ms": _round(pct(fin, 0.5)),
                    "fin_p99_ms": _round(pct(fin, 0.99)),
                }
            )
        seconds = time.monotonic() - began
        # One more whole stream: the pool is back to one idle connection, like before.
        after_stream = run_loadgen({"url": gateway, "streams": 1, "model": "sim:tokens=5"}, 60)
        after, settle_s = settled_figures(gateway, before)
        active_streams = health(gateway)["active_streams"]
    finally:
        if server is not None:
            stop(server)
        stop(simulator)
    return {
        "when": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "streams": total,
        "concurrency": concurrencies,
        "seed": seed,
        "seconds": round(seconds, 1),
        "levels": levels,
        "before": before,
        "after": after,
        "settle_s": round(settle_s, 2),
        "active_streams_after": active_streams,
        "next_stream_served": after_stream["completed"] == 1,
    }


def _round(value: float | None, digits: int = 2) -> float | None:
    return None if value is None else round(value, digits)


def problems(result: dict[str, Any]) -> list[str]:
    found = []
    for level in result["levels"]:
        where = f"concurrency {level['concurrency']}"
        if level["upstream_closed"] != level["aborted"] or level["upstream_still_open"]:
            found.append(f"{where}: {level['upstream_closed']}/{level['aborted']} upstream requests closed, {level['upstream_still_open']} still open")
        if level["not_aborted"]:
            found.append(f"{where}: {level['not_aborted']} streams ended before their abort ({level['errors']})")
        if level["upstream_started"] != level["streams"]:
            found.append(f"{where}: {level['upstream_started']} upstream requests for {level['streams']} streams")
    for key in ("fds", "tasks"):
        # More after than before is a leak. Fewer is not: the "before" reading can
        # still count the warm-up client's connection, which hypercorn keeps open
        # until that client closes it (see tests/test_chaos.py, Connection: close).
        if result["after"][key] > result["before"][key]:
            found.append(f"{key}: {result['before'][key]} before, {result['after'][key]} after")
    if result["active_streams_after"]:
        found.append(f"{result['active_streams_after']} streams still active")
    if not result["next_stream_served"]:
        found.append("the stream after the soak was not served whole")
    return found


def markdown(result: dict[str, Any], found: list[str]) -> str:
    mb = 1024 * 1024
    before, after = result["before"], result["after"]
    lines = [
        f"# Soak: {result['streams']} streams aborted mid-stream ({result['when']})",
        "",
        f"Concurrency {', '.join(map(str, result['concurrency']))}; half of each round closed by RST, half by FIN, "
        f"each loadgen process at a random event count (1-15); {result['seconds']} s of aborts; seed {result['seed']}.",
        "",
        "| concurrency | rounds | aborted | upstream closed | still open | abort→close p50 | p99 | max | RST p50/p99 | FIN p50/p99 |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for level in result["levels"]:
        lines.append(
            f"| {level['concurrency']} | {level['rounds']} | {level['aborted']} | {level['upstream_closed']} "
            f"({level['upstream_closed_pct']} %) | {level['upstream_still_open']} | {level['abort_to_close_p50_ms']} ms "
            f"| {level['abort_to_close_p99_ms']} ms | {level['abort_to_close_max_ms']} ms "
            f"| {level['rst_p50_ms']}/{level['rst_p99_ms']} ms | {level['fin_p50_ms']}/{level['fin_p99_ms']} ms |"
        )
    lines += [
        "",
        "| gateway process | before | after |",
        "|---|---|---|",
        f"| open fds | {before['fds']} | {after['fds']} |",
        f"| trio tasks | {before['tasks']} | {after['tasks']} |",
        f"| RSS | {before['rss_bytes'] / mb:.1f} MB | {after['rss_bytes'] / mb:.1f} MB |",
        "",
        f"Settled after {result['settle_s']} s; active streams after: {result['active_streams_after']}; "
        f"the next stream served whole: {result['next_stream_served']}.",
        "",
        "Result: " + ("OK" if not found else "WRONG: " + "; ".join(found)),
        "",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="benchmarks.soak", description=__doc__.split("\n\n")[0])
    parser.add_argument("--streams", type=int, default=None, help="streams aborted in total (default 10000; --quick 1000)")
    parser.add_argument("--concurrency", default="100,500", help="comma-separated streams per round (default 100,500)")
    parser.add_argument("--quick", action="store_true", help="1000 streams (< 60 s)")
    parser.add_argument("--seed", type=int, default=9)
    parser.add_argument("--name", default=None, help="results file name (default soak, or soak-quick)")
    args = parser.parse_args(argv)
    total = args.streams if args.streams is not None else (1000 if args.quick else 10000)
    concurrencies = [int(c) for c in args.concurrency.split(",") if c]
    result = run(total, concurrencies, args.seed)
    found = problems(result)
    os.makedirs(RESULTS, exist_ok=True)
    name = args.name or ("soak-quick" if args.quick and args.streams is None else "soak")
    with open(os.path.join(RESULTS, f"{name}.json"), "w") as out:
        json.dump({**result, "problems": found}, out, indent=2)
    text = markdown(result, found)
    with open(os.path.join(RESULTS, f"{name}.md"), "w") as out:
        out.write(text)
    print(text)
    return 1 if found else 0


if __name__ == "__main__":
    sys.exit(main())
