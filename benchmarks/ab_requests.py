"""Sluice against itself: CPU per 1-token streaming request of source trees, interleaved in rounds.

``python -m benchmarks.ab_requests ROUNDS NAME=SERVICE_DIR [NAME=SERVICE_DIR ...]``

Each ``SERVICE_DIR`` holds a ``sluice`` package (a ``service/`` directory), for
example the one before a change::

    mkdir -p /tmp/before && git archive HEAD~1 service | tar -x -C /tmp/before
    python -m benchmarks.ab_requests 10 before=/tmp/before/service after=service

Every round runs each variant once, in the order given, as the ``requests``
scenario's stream load does (``sluice serve`` on the gateway core, the fast
upstream and the load generator on the other; the variant first on
``PYTHONPATH``), and prints its CPU per request; then each variant's median
and every round. On a shared machine the rounds of one variant spread
widely; a change shows as a paired difference of the same sign in most
rounds, which is why the variants alternate.
"""

from __future__ import annotations

import os
import statistics
import sys

from .scenarios import _measure, build
from .targets import ROOT, target, upstream


def main(argv: list[str]) -> int:
    if len(argv) < 2 or not argv[0].isdigit() or not all("=" in arg for arg in argv[1:]):
        print(__doc__, file=sys.stderr)
        return 2
    rounds = int(argv[0])
    variants = [(name, os.path.abspath(path)) for name, path in (arg.split("=", 1) for arg in argv[1:])]
    scenario = build(False, False)["requests"]
    spec = dict(scenario.specs[0][1])  # the stream load
    measured: dict[str, list[float]] = {name: [] for name, _ in variants}
    with upstream("fast") as port:
        for number in range(1, rounds + 1):
            for name, service in variants:
                with target("sluice", port, None, {"PYTHONPATH": f"{service}:{ROOT}"}) as system:
                    row = _measure(scenario, "stream", dict(spec), system, port)
                if row["failed"] or row["completed"] != row["streams"]:
                    print(f"round {number} {name}: {row['failed']} failed, {row['errors'][:3]}", file=sys.stderr)
                    return 1
                measured[name].append(row["cpu_per_request_ms"])
                print(f"round {number} {name}: {row['cpu_per_request_ms']} ms ({row['streams']} requests)", flush=True)
    for name, values in measured.items():
        print(f"{name}: median {statistics.median(values):.3f} ms, rounds {values}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
