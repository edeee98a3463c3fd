"""Results: JSON, a Markdown table with ratios and target checks, PNG plots."""

from __future__ import annotations

import json
import os
from typing import Any

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")

COLUMNS = [
    ("variant", "load"), ("gateway", "gateway"), ("completed", "ok"), ("failed", "failed"),
    ("tokens", "tokens"), ("tokens_expected", "sent"), ("events_per_s", "events/s"),
    ("ttft_p50_ms", "TTFT p50 ms"), ("ttft_p99_ms", "TTFT p99 ms"), ("ttft_p99_vs_direct", "p99 - direct"),
    ("cpu_per_token_us", "CPU/token us"), ("cpu_per_request_ms", "CPU/req ms"),
    ("cpu_x_base", "CPU/token x chat"), ("ttft_p99_x_base", "TTFT p99 x chat"),
    ("x_floor", "x floor"), ("x_stack", "x stack"), ("x_quart", "x quart"), ("x_nginx", "x nginx"), ("peak_rss_mb", "peak RSS MB"), ("rss_open_mb", "RSS open MB"),
    ("upstream_closed_pct", "upstream closed %"), ("cancel_p50_ms", "cancel p50 ms"), ("cancel_p99_ms", "cancel p99 ms"),
    ("rounds", "rounds (median shown)"), ("cpu_x_base_rounds", "CPU x chat, rounds"),
    ("ttft_p99_x_base_rounds", "TTFT p99 x chat, rounds"),
]


def add_ratios(rows: list[dict[str, Any]]) -> None:
    """Ratios to trio-floor and nginx of the same scenario and load, from the same run."""
    index = {(r["scenario"], r["variant"], r["gateway"]): r for r in rows}
    for row in rows:
        direct = index.get((row["scenario"], row["variant"], "direct"))
        if direct and row["ttft_p99_ms"] is not None and direct["ttft_p99_ms"] is not None:
            row["ttft_p99_vs_direct"] = round(row["ttft_p99_ms"] - direct["ttft_p99_ms"], 3)
        metric = "cpu_per_request_ms" if row["scenario"] == "requests" else "cpu_per_token_us"
        for base, key in (("trio-floor", "x_floor"), ("stack-floor", "x_stack"), ("quart-floor", "x_quart"), ("nginx", "x_nginx")):
            other = index.get((row["scenario"], row["variant"], base))
            if other and other.get(metric) and row.get(metric):
                row[key] = round(row[metric] / other[metric], 2)


def targets(rows: list[dict[str, Any]]) -> list[tuple[str, str, str]]:
    """(target, measured, PASS/MISS) for Sluice against the issue's targets."""
    def get(scenario: str, gateway: str, variant: str | None = None) -> dict[str, Any] | None:
        for row in rows:
            if row["scenario"] == scenario and row["gateway"] == gateway and (variant is None or row["variant"] == variant):
                return row
        return None

    out: list[tuple[str, str, str]] = []

    def check(name: str, value: Any, ok: bool | None) -> None:
        out.append((name, str(value), "n/a" if ok is None else ("PASS" if ok else "MISS")))

    s, f = get("sustained", "sluice"), get("sustained", "trio-floor")
    if s and f:
        ratio = s["cpu_per_token_us"] / f["cpu_per_token_us"] if s["cpu_per_token_us"] and f["cpu_per_token_us"] else None
        check("sustained: every token", f"{s['tokens']}/{s['tokens_expected']}", s["tokens"] == s["tokens_expected"])
        check("sustained: CPU/token <= 1.7x trio-floor", None if ratio is None else f"{ratio:.2f}x", None if ratio is None else ratio <= 1.7)
        if s["ttft_p99_ms"] is not None and f["ttft_p99_ms"] is not None:
            diff = s["ttft_p99_ms"] - f["ttft_p99_ms"]
            check("sustained: TTFT p99 within 5 ms of trio-floor", f"{diff:+.1f} ms", diff <= 5)
    for floor_name in ("stack-floor", "quart-floor"):
        # Context for the two above: what the fixed stack costs before Sluice adds anything.
        k = get("sustained", floor_name)
        if s and f and k and k["cpu_per_token_us"] and f["cpu_per_token_us"] and s["cpu_per_token_us"]:
            check(f"sustained: {floor_name}'s CPU/token vs trio-floor (no target)",
                  f"{k['cpu_per_token_us'] / f['cpu_per_token_us']:.2f}x", None)
            check(f"sustained: Sluice's CPU/token vs {floor_name} (no target)",
                  f"{s['cpu_per_token_us'] / k['cpu_per_token_us']:.2f}x", None)
            if k["ttft_p99_ms"] is not None and f["ttft_p99_ms"] is not None:
                check(f"sustained: {floor_name}'s TTFT p99 vs trio-floor (no target)",
                      f"{k['ttft_p99_ms'] - f['ttft_p99_ms']:+.1f} ms", None)
    capacity = {}
    for gateway in ("sluice", "stack-floor", "quart-floor", "trio-floor", "direct"):
        capacity[gateway] = [r for r in rows if r["scenario"] == "capacity" and r["gateway"] == gateway]
    if capacity["sluice"] and capacity["trio-floor"] and capacity["direct"]:
        def carried(gateway: str) -> int:
            best = 0
            for row in capacity[gateway]:
                direct = next((d for d in capacity["direct"] if d["variant"] == row["variant"]), None)
                if direct and row["ttft_p99_ms"] is not None and direct["ttft_p99_ms"] is not None \
                        and row["ttft_p99_ms"] <= direct["ttft_p99_ms"] + 50 and row["tokens"] == row["tokens_expected"]:
                    best = max(best, int(row["variant"]))
            return best
        ours, floor = carried("sluice"), carried("trio-floor")
        check("capacity >= 0.5x trio-floor's streams", f"{ours} vs {floor}", floor > 0 and ours >= 0.5 * floor)
        for floor_name in ("stack-floor", "quart-floor"):
            if capacity[floor_name]:
                check(f"capacity: {floor_name}'s streams (no target)", carried(floor_name), None)
    r, rf = get("requests", "sluice", "stream"), get("requests", "trio-floor", "stream")
    if r and rf and r["cpu_per_request_ms"] and rf["cpu_per_request_ms"]:
        ratio = r["cpu_per_request_ms"] / rf["cpu_per_request_ms"]
        check("requests: CPU/request <= 7x trio-floor", f"{ratio:.2f}x", ratio <= 7)
    t = get("throughput", "sluice")
    if t:
        check("throughput >= 100 000 tokens/s", t["tokens_per_s"], t["tokens_per_s"] is not None and t["tokens_per_s"] >= 100_000)
    for floor_name in ("stack-floor", "quart-floor"):
        tk = get("throughput", floor_name)
        if tk:
            check(f"throughput: {floor_name}'s tokens/s (no target)", tk["tokens_per_s"], None)
    o = get("overload", "sluice")
    if o:
        check("overload: 0 failed, every token", f"{o['failed']} failed, {o['tokens']}/{o['tokens_expected']}", o["failed"] == 0 and o["tokens"] == o["tokens_expected"])
        check("overload: peak RSS <= 150 MB", o["peak_rss_mb"], o["peak_rss_mb"] is not None and o["peak_rss_mb"] <= 150)
    m = get("memory", "sluice", "500")
    if m:
        check("memory: <= 100 MB RSS with 500 open streams", m["rss_open_mb"], m["rss_open_mb"] is not None and m["rss_open_mb"] <= 100)
    plain, featured = get("features", "sluice"), get("features", "sluice-features")
    if plain and featured and plain["cpu_per_token_us"] and featured["cpu_per_token_us"]:
        ratio = featured["cpu_per_token_us"] / plain["cpu_per_token_us"]
        check("features: CPU/token within 10% of the plain relay", f"{ratio:.2f}x", ratio <= 1.10)
    plain, featured = get("features-requests", "sluice"), get("features-requests", "sluice-features")
    if plain and featured and plain["cpu_per_request_ms"] and featured["cpu_per_request_ms"]:
        ratio = featured["cpu_per_request_ms"] / plain["cpu_per_request_ms"]
        check("features: CPU/request (reported, no target)", f"{ratio:.2f}x", None)
    one, two = get("workers-throughput", "sluice"), get("workers-throughput", "sluice-2w")
    if one and two and one["tokens_per_s"] and two["tokens_per_s"]:
        ratio = two["tokens_per_s"] / one["tokens_per_s"]
        check("workers: 2 workers' tokens/s >= 1.7x one", f"{ratio:.2f}x ({two['tokens_per_s']:.0f} vs {one['tokens_per_s']:.0f})", ratio >= 1.7)
    chat = get("apis", "sluice", "chat")
    for api in ("responses", "messages"):
        # Issue 15: each streaming API's cost beside chat's, same gateway, same rounds (no target).
        row = get("apis", "sluice", api)
        if chat and row and row.get("cpu_x_base") is not None:
            rounds = row.get("cpu_x_base_rounds")
            check(f"apis: {api} CPU/token vs chat (no target)",
                  f"{row['cpu_x_base']:.2f}x" + (f" (rounds {', '.join(f'{v:.2f}' for v in rounds if v is not None)})" if rounds else "")
                  + f"; median rounds {row['cpu_per_token_us']:.0f} vs {chat['cpu_per_token_us']:.0f} us", None)
        if chat and row and row.get("ttft_p99_x_base") is not None:
            rounds = row.get("ttft_p99_x_base_rounds")
            check(f"apis: {api} TTFT p99 vs chat (no target)",
                  f"{row['ttft_p99_x_base']:.2f}x" + (f" (rounds {', '.join(f'{v:.2f}' for v in rounds if v is not None)})" if rounds else ""), None)
    c = get("cancel", "sluice")
    if c:
        check("cancel: 100% upstreams closed", c.get("upstream_closed_pct"), c.get("upstream_closed_pct") == 100.0)
        check("cancel: p99 <= 5 ms", c.get("cancel_p99_ms"), c.get("cancel_p99_ms") is not None and c["cancel_p99_ms"] <= 5)
    return out


def markdown(rows: list[dict[str, Any]], meta: dict[str, Any]) -> str:
    lines = [f"# Benchmark results ({meta['when']}, {meta['mode']})", "",
             "Gateway pinned to core 0; upstream (simulator) and load generator on core 1. "
             "CPU is the gateway process's user+system time over the scenario.", ""]
    for scenario in dict.fromkeys(r["scenario"] for r in rows):
        group = [r for r in rows if r["scenario"] == scenario]
        used = [(k, h) for k, h in COLUMNS if any(r.get(k) is not None for r in group)]
        lines += [f"## {scenario}", "", "| " + " | ".join(h for _, h in used) + " |", "|" + "---|" * len(used)]
        for row in group:
            lines.append("| " + " | ".join("" if row.get(k) is None else str(row.get(k)) for k, _ in used) + " |")
        lines.append("")
    checks = targets(rows)
    if checks:
        lines += ["## Targets (Sluice)", "", "| target | measured | result |", "|---|---|---|"]
        lines += [f"| {a} | {b} | {c} |" for a, b, c in checks]
        lines.append("")
    if meta.get("scenario_seconds"):
        lines += [f"Run time: {meta['seconds']} s (" + ", ".join(f"{k} {v} s" for k, v in meta["scenario_seconds"].items()) + ").", ""]
    if meta.get("notes"):
        lines += ["## Notes", ""] + [f"- {n}" for n in meta["notes"]] + [""]
    return "\n".join(lines)


def write(rows: list[dict[str, Any]], meta: dict[str, Any], stem: str) -> str:
    os.makedirs(RESULTS, exist_ok=True)
    add_ratios(rows)
    with open(os.path.join(RESULTS, f"{stem}.json"), "w") as out:
        json.dump({"meta": meta, "rows": rows}, out, indent=1)
    text = markdown(rows, meta)
    with open(os.path.join(RESULTS, f"{stem}.md"), "w") as out:
        out.write(text)
    plot(rows, stem)
    return text


def plot(rows: list[dict[str, Any]], stem: str) -> None:
    capacity = [r for r in rows if r["scenario"] == "capacity"]
    if not capacity:
        return
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    for number, gateway in enumerate(dict.fromkeys(r["gateway"] for r in capacity)):
        points = sorted((int(r["variant"]), r) for r in capacity if r["gateway"] == gateway)
        xs = [x for x, _ in points]
        style = {"marker": "o", "label": gateway, "color": f"C{number}"}  # one colour per gateway in both plots
        if gateway != "direct":
            left.plot(xs, [r["cpu_per_token_us"] for _, r in points], **style)
        right.plot(xs, [r["ttft_p99_ms"] for _, r in points], **style)
    left.set(title="CPU per token vs concurrency", xlabel="concurrent streams", ylabel="us of gateway CPU per token")
    right.set(title="TTFT p99 vs concurrency", xlabel="concurrent streams", ylabel="ms")
    for axis in (left, right):
        axis.grid(alpha=0.3)
        axis.legend()
    fig.tight_layout()
    fig.savefig(os.path.join(RESULTS, f"{stem}-capacity.png"), dpi=100)
    plt.close(fig)
