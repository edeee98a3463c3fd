"""Check the Grafana dashboard's and the alert rules' PromQL against a real gateway.

    python3 -m deploy.dashboard_check DASHBOARD.json ALERTS.yml METRICS.txt RULES_OUT.yml

What it proves, and what it does not:

* the dashboard is a Grafana dashboard as provisioning loads it: JSON with a
  ``uid``, a ``title`` and panels with unique ids and grid positions, every
  query panel on the ``${datasource}`` variable;
* every panel's query, with Grafana's interval variables replaced by a
  duration, is written to ``RULES_OUT`` as a recording rule, so that
  ``promtool check rules RULES_OUT`` parses each with Prometheus's own PromQL
  parser (promtool 2.42 has no expression check of its own);
* every ``sluice_*`` metric name in a panel or an alert rule is a series the
  gateway exports: ``METRICS`` is the ``/metrics`` text of a started gateway,
  whose ``# TYPE`` lines list every family even before it has samples
  (histograms add ``_bucket``, ``_sum`` and ``_count``). Names in
  :data:`EXPECTED_SOON` are allowed and reported: series other work adds.

It does not prove a label a query groups by exists (a missing label groups
everything into one series, which Grafana shows without error), nor that a
query returns data.

Standard library only: CI runs it with the system python3; ``ALERTS.yml`` is
only searched for metric names (promtool checks the file itself).
"""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

#: series a dashboard or alert may use before the gateway exports them (none now: every one must exist)
EXPECTED_SOON: frozenset[str] = frozenset()
#: Grafana's built-in interval variables, and a duration PromQL accepts in their place
GRAFANA_INTERVALS = {"$__rate_interval": "1m", "$__interval": "15s", "$__range": "1h"}
_METRIC_NAME = re.compile(r"\bsluice_[a-zA-Z0-9_]*\b")
_TYPE_LINE = re.compile(r"^# TYPE (\S+) (\S+)$", re.MULTILINE)


def exported_series(metrics_text: str) -> set[str]:
    """The series names a ``/metrics`` text can have, from its ``# TYPE`` lines."""
    names: set[str] = set()
    for family, kind in _TYPE_LINE.findall(metrics_text):
        names.add(family)
        if kind == "histogram":
            names.update(family + suffix for suffix in ("_bucket", "_sum", "_count"))
        elif kind == "summary":
            names.update(family + suffix for suffix in ("_sum", "_count"))
    return names


def panel_queries(dashboard: dict) -> list[tuple[str, str]]:
    """``(where, expr)`` for every query of every panel, rows' nested panels included; checks the structure."""
    problems: list[str] = []
    for key in ("uid", "title", "panels"):
        if not dashboard.get(key):
            problems.append(f"no {key!r}")
    panels = list(dashboard.get("panels", []))
    for row in dashboard.get("panels", []):
        panels.extend(row.get("panels", []))
    seen_ids: set[int] = set()
    queries: list[tuple[str, str]] = []
    for panel in panels:
        where = f"panel {panel.get('id')} {panel.get('title')!r}"
        if panel.get("id") in seen_ids:
            problems.append(f"{where}: duplicate id")
        seen_ids.add(panel.get("id"))
        if not {"x", "y", "w", "h"} <= set(panel.get("gridPos", {})):
            problems.append(f"{where}: no gridPos")
        if panel.get("type") == "row":
            continue
        targets = panel.get("targets") or []
        if not targets:
            problems.append(f"{where}: no queries")
        if panel.get("datasource", {}).get("uid") != "${datasource}":
            problems.append(f"{where}: datasource is not the ${{datasource}} variable")
        for target in targets:
            expr = target.get("expr", "")
            if not expr.strip():
                problems.append(f"{where} {target.get('refId')}: empty expr")
            queries.append((f"{where} {target.get('refId')}", expr))
    if problems:
        raise SystemExit("dashboard: " + "; ".join(problems))
    return queries


def as_recording_rules(queries: list[tuple[str, str]]) -> str:
    """A rule file (JSON is YAML) with one recording rule per query, for ``promtool check rules``."""
    rules = []
    for index, (where, expr) in enumerate(queries):
        for variable, duration in GRAFANA_INTERVALS.items():
            expr = expr.replace(variable, duration)
        if "$" in expr:
            raise SystemExit(f"dashboard: {where}: unknown variable in {expr!r}")
        # promtool names the rule of an expression it cannot parse: say which panel it is
        record = "dashboard:" + re.sub(r"\W+", "_", where).strip("_")
        rules.append({"record": f"{record}_{index}", "expr": expr})
    return json.dumps({"groups": [{"name": "dashboard", "rules": rules}]}, indent=1)


def main(argv: list[str]) -> int:
    if len(argv) != 4:
        print(__doc__.split("\n\n")[1], file=sys.stderr)
        return 2
    dashboard_path, alerts_path, metrics_path, rules_out = map(Path, argv)
    queries = panel_queries(json.loads(dashboard_path.read_text()))
    Path(rules_out).write_text(as_recording_rules(queries))
    exported = exported_series(metrics_path.read_text())
    if not exported:
        raise SystemExit(f"{metrics_path}: no '# TYPE' lines: not a gateway's /metrics")
    used = {(name, str(dashboard_path)) for _, expr in queries for name in _METRIC_NAME.findall(expr)}
    used |= {(name, str(alerts_path)) for name in _METRIC_NAME.findall(alerts_path.read_text())}
    unknown = sorted(f"{name} ({source})" for name, source in used if name not in exported | EXPECTED_SOON)
    if unknown:
        raise SystemExit("series the gateway does not export: " + ", ".join(unknown))
    pending = sorted({name for name, _ in used if name in EXPECTED_SOON and name not in exported})
    print(
        f"{len(queries)} dashboard queries, {len({n for n, _ in used})} series names, all exported by the gateway"
        + (f" except the expected {', '.join(pending)}" if pending else "")
    )
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
