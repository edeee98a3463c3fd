"""Run the benchmark suite: ``python -m benchmarks.run [--smoke | --quick] [--scenarios ...] [--gateways ...]``.

``--smoke`` (what CI runs) uses small counts and exits non-zero only on wrong
results: lost tokens, failed streams, upstream requests left open after
client aborts. Timing never fails it.
"""

from __future__ import annotations

import argparse
import contextlib
import glob
import os
import sys
import time

from . import report
from .scenarios import build, correctness_problems, median_rows, run_scenario
from .targets import EXTRA_GATEWAYS, GATEWAYS, UPSTREAMS, ensure_nginx, upstream

SMOKE_SCENARIOS = ["sustained", "apis", "requests", "overload", "cancel", "features"]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="benchmarks.run", description=__doc__)
    parser.add_argument("--smoke", action="store_true", help="small, correctness-only run for CI")
    parser.add_argument("--quick", action="store_true", help="fewer capacity steps")
    parser.add_argument("--scenarios", help="comma-separated subset (default: all; smoke: " + ",".join(SMOKE_SCENARIOS) + ")")
    parser.add_argument("--gateways", default=",".join(GATEWAYS), help="comma-separated subset of " + ",".join(GATEWAYS + EXTRA_GATEWAYS))
    parser.add_argument("--upstream", choices=UPSTREAMS, default="fast",
                        help="the upstream of every scenario that does not name its own (apis: the simulator); default: fast")
    parser.add_argument("--no-install", action="store_true", help="do not apt-get install nginx when missing")
    args = parser.parse_args(argv)

    scenarios = build(quick=args.quick, smoke=args.smoke)
    chosen = args.scenarios.split(",") if args.scenarios else (SMOKE_SCENARIOS if args.smoke else list(scenarios))
    gateways = args.gateways.split(",")
    notes = []
    if "nginx" in gateways and ensure_nginx(install=not args.no_install and not args.smoke) is None:
        gateways.remove("nginx")
        notes.append("nginx skipped: not installed" + (" (smoke runs never install it)" if args.smoke else ""))
    rows = []
    everything = []  # every round's rows: a wrong result in any round is a wrong result
    started = time.monotonic()
    seconds = {}  # wall-clock time per scenario: what each one adds to a run (the smoke run's budget)
    with contextlib.ExitStack() as stack:
        ports: dict[str, int] = {}  # each upstream kind started once, when a scenario first needs it
        for name in chosen:
            scenario_started = time.monotonic()
            scenario = scenarios[name]
            kind = scenario.upstream or args.upstream
            if kind not in ports:
                ports[kind] = stack.enter_context(upstream(kind))
            upstream_port = ports[kind]
            measured = []
            for round_ in range(scenario.repeats):
                for gateway in scenario.gateways or gateways:
                    print(f"-- {name} on {gateway} (round {round_ + 1}/{scenario.repeats})", file=sys.stderr, flush=True)
                    measured.extend({**row, "round": round_} for row in run_scenario(scenario, gateway, upstream_port))
            everything.extend(measured)
            rows.extend(median_rows(scenario, measured))
            seconds[name] = round(time.monotonic() - scenario_started, 1)
    meta = {"when": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "mode": "smoke" if args.smoke else ("quick" if args.quick else "full"),
            "upstream": args.upstream, "load": _load_average(),
            "seconds": round(time.monotonic() - started, 1), "scenario_seconds": seconds, "notes": notes}
    # Only a full run replaces the committed results; a subset goes beside them.
    stem = "smoke" if args.smoke else ("latest" if not args.scenarios and not args.quick else "partial")
    print(report.write(rows, meta, stem))
    for leftover in glob.glob(os.path.join(report.RESULTS, "*.log.tmp")):
        os.remove(leftover)
    problems = list(dict.fromkeys(p for row in everything for p in correctness_problems(row)))
    for problem in problems:
        print("WRONG RESULT:", problem, file=sys.stderr)
    wrong = {(p.split(":")[0]) for p in problems}
    print(f"benchmarks: {len(everything) - len(wrong)} passed, {len(wrong)} failed")
    return 1 if problems else 0


def _load_average() -> str:
    """The machine's load when the run ended (``uptime``'s three figures): the runs share the machine."""
    try:
        with open("/proc/loadavg") as loadavg:
            return " ".join(loadavg.read().split()[:3])
    except OSError:
        return "unknown"


if __name__ == "__main__":
    sys.exit(main())
