"""Scenarios: what load each one sends, and what it measures on each gateway.

Each scenario runs against a fresh gateway process (so its peak RSS is its
own) and a fresh upstream counter set (``/sim/reset``, which the fast
upstream and the simulator both answer), and returns one row per gateway
(several for ``capacity`` and ``memory``, one per step).
"""

from __future__ import annotations

import statistics
import subprocess
import sys
import json
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from .procs import LOAD_CORE, cpu_seconds, http_json, rss_mb, run_loadgen
from .targets import Target, target


@dataclass
class Scenario:
    name: str
    specs: list[tuple[str, dict[str, Any]]]  # (variant label, loadgen spec)
    tokens_per_stream: int | None  # None: not checked
    kind: str = "stream"  # stream | requests | cancel | memory | slow
    timeout: float = 120.0
    #: run on exactly these gateways (a comparison of Sluice variants), whatever --gateways says
    gateways: tuple[str, ...] | None = None
    #: rounds over all gateways, interleaved; each gateway's row is its median round by ``median_of``
    repeats: int = 1
    median_of: str = "cpu_per_token_us"
    #: the variant every other is compared with, on the same gateway in the same round (``x_<variant>`` columns)
    baseline_variant: str | None = None
    #: the upstream this scenario needs whatever the run's ``--upstream`` (the fast one answers chat only)
    upstream: str | None = None


def pct(values: list[float], q: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def sustained_model(tokens: int = 50, itl: int = 20) -> str:
    return f"sim:tokens={tokens},itl_ms={itl}"


def build(quick: bool, smoke: bool) -> dict[str, Scenario]:
    tokens = 20 if smoke else 50
    # This machine's speed drifts by tens of percent between runs seconds apart
    # (a shared VM): ratios come from interleaved rounds, each gateway's median.
    rounds = 1 if (smoke or quick) else 3
    # Finer between 50 and 100: where a gateway on one of these cores saturates at 20 ms a token.
    capacity_steps = [25, 50, 100] if (smoke or quick) else [25, 50, 60, 70, 80, 90, 100, 150, 200, 300, 400]
    return {
        "sustained": Scenario(
            "sustained", [("25", {"streams": 25, "model": sustained_model(tokens), "ramp_s": 1.0})], tokens, repeats=rounds
        ),
        # The sustained shape on each streaming API, to compare their CPU per token and TTFT with chat's.
        # The floors relay chat only, so: direct (the upstream's own figures) and sluice.
        "apis": Scenario(
            "apis",
            [(api, {"streams": 25, "model": sustained_model(tokens), "ramp_s": 1.0, "api": api})
             for api in ("chat", "responses", "messages")],
            tokens, gateways=("direct", "sluice"), repeats=rounds, baseline_variant="chat", upstream="simulator",
        ),
        "ttft": Scenario("ttft", [("10", {"streams": 10, "model": "sim:tokens=5", "ramp_s": 0.5})], 5),
        "requests": Scenario(
            "requests",
            [
                ("stream", {"streams": 32, "model": "sim:tokens=1", "repeat_s": 1.0 if smoke else 5.0}),
                ("non-stream", {"streams": 32, "model": "sim:tokens=1", "stream": False, "repeat_s": 1.0 if smoke else 5.0}),
            ],
            1,
            kind="requests",
            repeats=rounds,
            median_of="cpu_per_request_ms",
        ),
        "throughput": Scenario(
            "throughput", [("64x512", {"streams": 64, "model": "sim:tokens=512"})], 512, repeats=rounds, median_of="tokens_per_s"
        ),
        "overload": Scenario(
            "overload", [("100" if smoke else "500", {"streams": 100 if smoke else 500, "model": sustained_model(tokens), "ramp_s": 1.0})], tokens
        ),
        "capacity": Scenario(
            "capacity", [(str(n), {"streams": n, "model": sustained_model(), "ramp_s": 1.0}) for n in capacity_steps], 50
        ),
        "cancel": Scenario(
            "cancel",
            [("25", {"streams": 25, "model": "sim:tokens=500,itl_ms=20,seed={i}", "ramp_s": 1.0, "abort_after": 10})],
            None,
            kind="cancel",
            # the p99 of 25 aborts is nearly their maximum: one round is one unlucky scheduling away from another
            repeats=rounds,
            median_of="cancel_p99_ms",
        ),
        "memory": Scenario(
            "memory",
            [(str(n), {"streams": n, "model": "sim:tokens=5,ttft_ms=60000", "timeout_s": 4.0}) for n in ([0, 100] if smoke else [0, 100, 500, 1000])],
            None,
            kind="memory",
        ),
        # Sluice against itself: what issue 6's features cost, and what a second worker buys.
        "features": Scenario(
            "features", [("25", {"streams": 25, "model": sustained_model(tokens), "ramp_s": 1.0})], tokens,
            gateways=("sluice", "sluice-features"), repeats=rounds,
        ),
        "features-requests": Scenario(
            "features-requests",
            [("stream", {"streams": 32, "model": "sim:tokens=1", "repeat_s": 1.0 if smoke else 5.0})],
            1, kind="requests", gateways=("sluice", "sluice-features"), repeats=rounds, median_of="cpu_per_request_ms",
        ),
        # Tracing on (every span exported over OTLP/HTTP to a sink) against off: its cost per token and per request.
        "tracing": Scenario(
            "tracing", [("25", {"streams": 25, "model": sustained_model(tokens), "ramp_s": 1.0})], tokens,
            gateways=("sluice", "sluice-otel"), repeats=rounds,
        ),
        "tracing-requests": Scenario(
            "tracing-requests",
            [("stream", {"streams": 32, "model": "sim:tokens=1", "repeat_s": 1.0 if smoke else 5.0})],
            1, kind="requests", gateways=("sluice", "sluice-otel"), repeats=rounds, median_of="cpu_per_request_ms",
        ),
        "workers-throughput": Scenario(
            "workers-throughput", [("64x512", {"streams": 64, "model": "sim:tokens=512"})], 512,
            gateways=("sluice", "sluice-2w"), repeats=rounds, median_of="tokens_per_s",
        ),
        "workers-streams": Scenario(
            "workers-streams",
            [(str(n), {"streams": n, "model": sustained_model(), "ramp_s": 1.0}) for n in ([100] if smoke else [100, 200, 300])],
            50, gateways=("sluice", "sluice-2w"),
        ),
        "slow-readers": Scenario(
            "slow-readers",
            [("100x2KB/s", {"streams": 100, "model": "sim:tokens=3000,itl_ms=2", "read_bps": 2048, "rcvbuf": 4096, "timeout_s": 8.0})],
            None,
            kind="slow",
        ),
    }


def baseline_ratios(scenario: Scenario, measured: list[dict[str, Any]]) -> None:
    """Each row's CPU per token and TTFT p99 over the baseline variant's: ``cpu_x_base``, ``ttft_p99_x_base``.

    The variants of one round run back to back on one gateway, so their ratio
    is less exposed to the machine's drift than a ratio of two medians taken
    minutes apart: each round's ratio is taken on its own gateway and round,
    and every row of a (gateway, variant) gets the median of its rounds'
    ratios, with each round's in ``<name>_rounds``.
    """
    if scenario.baseline_variant is None:
        return
    base = {(r["gateway"], r.get("round", 0)): r for r in measured if r["variant"] == scenario.baseline_variant}
    runs: dict[tuple[str, str], list[dict[str, Any]]] = {}
    for row in measured:
        runs.setdefault((row["gateway"], row["variant"]), []).append(row)
    for (gateway, _), rows in runs.items():
        for metric, name in (("cpu_per_token_us", "cpu_x_base"), ("ttft_p99_ms", "ttft_p99_x_base")):
            ratios = []
            for row in rows:
                other = base.get((gateway, row.get("round", 0)))
                ok = other is not None and row.get(metric) is not None and other.get(metric)
                ratios.append(round(row[metric] / other[metric], 3) if ok else None)
            known = [r for r in ratios if r is not None]
            for row in rows:
                row[name] = round(statistics.median(known), 2) if known else None
                row[name + "_rounds"] = ratios if len(rows) > 1 and known else None


def median_rows(scenario: Scenario, measured: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Each (gateway, load) row of its median round by ``scenario.median_of``; every round's value kept."""
    baseline_ratios(scenario, measured)
    if scenario.repeats == 1:
        return measured
    by_key: dict[tuple[str, str], list[dict[str, Any]]] = {}
    for row in measured:
        by_key.setdefault((row["gateway"], row["variant"]), []).append(row)
    chosen = []
    for runs in by_key.values():
        measured = sorted((r for r in runs if r.get(scenario.median_of) is not None), key=lambda r: r[scenario.median_of])
        row = dict(measured[len(measured) // 2] if measured else runs[0])
        rounds = [r.get(scenario.median_of) for r in runs]
        row["rounds"] = rounds if any(v is not None for v in rounds) else None  # direct has no CPU of its own
        chosen.append(row)
    return chosen


def run_scenario(scenario: Scenario, gateway: str, upstream_port: int) -> list[dict[str, Any]]:
    rows = []
    for variant, spec in scenario.specs:
        with target(gateway, upstream_port) as system:
            rows.append(_measure(scenario, variant, dict(spec), system, upstream_port))
    return rows


def _measure(scenario: Scenario, variant: str, spec: dict[str, Any], system: Target, upstream_port: int) -> dict[str, Any]:
    sim = f"http://127.0.0.1:{upstream_port}"
    http_json(sim + "/sim/reset", "POST")
    spec["url"] = system.url
    if system.headers:
        spec["headers"] = system.headers
    # One request first, for every gateway: its upstream connection, lazy
    # imports and first-call caches are start-up, not the scenario's load.
    warm = {"url": system.url, "streams": 1, "model": "sim:tokens=1", "api": spec.get("api", "chat"),
            **({"headers": system.headers} if system.headers else {})}
    run_loadgen(warm, 30)
    http_json(sim + "/sim/reset", "POST")
    cpu_before = cpu_seconds(system.pid) if system.pid else 0.0
    rss_open = None
    if scenario.kind == "memory" and spec["streams"] == 0:
        time.sleep(1.0)
        result = {"streams": 0, "completed": 0, "failed": 0, "aborted": 0, "errors": [], "tokens": 0, "events": 0,
                  "wall_s": 1.0, "ttft_ms": [], "aborts": {}, "loadgen_cpu_s": 0.0}
        rss_open = rss_mb(system.pid) if system.pid else None
    elif scenario.kind == "memory":
        # Sample RSS while every stream is open and waiting on a slow first token.
        process = subprocess.Popen(
            ["taskset", "-c", str(LOAD_CORE), sys.executable, "-m", "benchmarks.loadgen", json.dumps(spec)],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE,
            cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
        )
        deadline = time.monotonic() + spec["timeout_s"] - 0.5
        while time.monotonic() < deadline:
            time.sleep(0.2)
            if http_json(sim + "/sim/stats")["active_requests"] >= spec["streams"]:
                break
        time.sleep(0.3)
        rss_open = rss_mb(system.pid) if system.pid else None
        out, _ = process.communicate(timeout=60)
        result = json.loads(out)
    else:
        result = run_loadgen(spec, scenario.timeout)
    cpu = (cpu_seconds(system.pid) - cpu_before) if system.pid else None
    peak_rss = rss_mb(system.pid, "VmHWM") if system.pid else None
    row: dict[str, Any] = {
        "scenario": scenario.name,
        "variant": variant,
        "api": spec.get("api", "chat"),
        "gateway": system.name,
        "streams": result["streams"],
        "completed": result["completed"],
        "failed": result["failed"],
        "errors": result["errors"],
        "tokens": result["tokens"],
        "tokens_expected": (spec["streams"] * scenario.tokens_per_stream) if scenario.tokens_per_stream and scenario.kind == "stream" else None,
        "events_per_s": round(result["events"] / result["wall_s"], 1) if result["wall_s"] else None,
        "tokens_per_s": round(result["tokens"] / result["wall_s"], 1) if result["wall_s"] else None,
        "ttft_p50_ms": _round(pct(result["ttft_ms"], 0.5)),
        "ttft_p99_ms": _round(pct(result["ttft_ms"], 0.99)),
        "gateway_cpu_s": _round(cpu),
        "cpu_per_token_us": _round(cpu / result["tokens"] * 1e6) if cpu is not None and result["tokens"] else None,
        "cpu_per_request_ms": _round(cpu / result["streams"] * 1e3) if cpu is not None and result["streams"] else None,
        "peak_rss_mb": _round(peak_rss),
        "rss_open_mb": _round(rss_open),
        "loadgen_cpu_s": _round(result["loadgen_cpu_s"]),
    }
    if scenario.kind == "cancel":
        row.update(_cancel_figures(sim, result))
    return row


def _cancel_figures(sim: str, result: dict[str, Any]) -> dict[str, Any]:
    aborts = {int(k): v for k, v in result["aborts"].items()}
    deadline = time.monotonic() + 5.0
    while True:
        stats = http_json(sim + "/sim/stats")
        closed = {}
        for record in stats["records"]:
            seed = record["model"].rsplit("seed=", 1)[-1]
            if seed.isdigit() and record["closed_at"] is not None:
                closed[int(seed)] = record["closed_at"]
        if len(closed) >= len(aborts) or time.monotonic() > deadline:
            break
        time.sleep(0.1)
    delays = [(closed[i] - at) * 1000 for i, at in aborts.items() if i in closed]
    return {
        "aborted": len(aborts),
        "upstream_closed": sum(1 for i in aborts if i in closed),
        "upstream_closed_pct": round(100.0 * sum(1 for i in aborts if i in closed) / len(aborts), 1) if aborts else None,
        "cancel_p50_ms": _round(pct(delays, 0.5)),
        "cancel_p99_ms": _round(pct(delays, 0.99)),
    }


def _round(value: float | None, digits: int = 3) -> float | None:
    return None if value is None else round(value, digits)


def correctness_problems(row: dict[str, Any]) -> list[str]:
    """What the smoke run fails on: lost tokens, failed streams, leaked upstream requests."""
    problems = []
    where = f"{row['scenario']}/{row['variant']} on {row['gateway']}"
    if row["scenario"] in ("sustained", "apis", "ttft", "throughput", "overload", "requests", "features", "features-requests") and row["failed"]:
        problems.append(f"{where}: {row['failed']} failed streams ({row['errors']})")
    if row["tokens_expected"] is not None and row["tokens"] != row["tokens_expected"] and row["scenario"] not in ("capacity", "workers-streams"):
        problems.append(f"{where}: {row['tokens']} tokens delivered, {row['tokens_expected']} sent")
    if row["scenario"] in ("requests", "features-requests") and row["completed"] != row["streams"]:
        problems.append(f"{where}: {row['streams'] - row['completed']} requests incomplete")
    if row["scenario"] == "cancel" and row.get("upstream_closed_pct") != 100.0:
        problems.append(f"{where}: only {row.get('upstream_closed')}/{row.get('aborted')} upstream requests closed after client aborts")
    return problems
