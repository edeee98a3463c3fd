"""The dashboard and the alerts against live traffic: a real Prometheus scraping a real gateway.

    python -m deploy.live_check --sluice .venv/bin/sluice --prometheus /usr/bin/prometheus

Starts on 127.0.0.1 and free ports: two ``sluice simulate`` standing in for
two providers, one ``sluice serve`` routing over them (a hedged model, a model
whose preferred deployment answers 503 and falls back, a key over its
request limit), and Prometheus scraping the gateway every second with
``deploy/prometheus/alerts.yml`` loaded. While clients stream (some leave
early), it asks Prometheus every dashboard query, until each returns a
series and ``SluiceDeploymentInCooldown`` fires for the failing deployment,
or a bound of ``--timeout`` seconds passes. It then stops every process it
started, by handle.

What it proves beyond deploy/dashboard_check.py: each query returns data
for a gateway under traffic, so the metric names, the labels grouped by and
the label values filtered on (``status="429"``) are the gateway's; and an
alert fires from a real scrape. Queries on series the gateway does not export
yet (:data:`deploy.dashboard_check.EXPECTED_SOON`) are reported, not required.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
import urllib.parse
import urllib.request
from pathlib import Path

from deploy.dashboard_check import EXPECTED_SOON
from deploy.fleet import free_ports

ROOT = Path(__file__).resolve().parent.parent
CONFIG = """
cooldown_failures = 1
cooldown_seconds = 5
hedge_min_samples = 20

[[models]]
name = "hedged"
strategy = "weighted"
hedge_after_ms = 100
  [[models.deployments]]
  name = "slow-a"
  base_url = "http://127.0.0.1:{a}/v1"
  model = "sim:tokens=10,itl_ms=10,ttft_ms=500"
  weight = 1000
  [[models.deployments]]
  name = "fast-b"
  base_url = "http://127.0.0.1:{b}/v1"
  model = "sim:tokens=10,itl_ms=10"
  weight = 1

[[models]]
name = "flaky"
strategy = "weighted"
  [[models.deployments]]
  name = "failing-a"
  base_url = "http://127.0.0.1:{a}/v1"
  model = "sim:fault=status,status_code=503"
  weight = 1000
  [[models.deployments]]
  name = "working-b"
  base_url = "http://127.0.0.1:{b}/v1"
  model = "sim:tokens=10,itl_ms=10"
  weight = 1

[[models]]
name = "long"
  [[models.deployments]]
  name = "long-b"
  base_url = "http://127.0.0.1:{b}/v1"
  model = "sim:tokens=200,itl_ms=20"

[[keys]]
name = "team"
key_env = "LIVE_CHECK_TEAM_KEY"

[[keys]]
name = "limited"
key_env = "LIVE_CHECK_LIMITED_KEY"
requests_per_minute = 2
"""
PROMETHEUS_CONFIG = """
global: {{scrape_interval: 1s, evaluation_interval: 1s}}
rule_files: [{alerts}]
scrape_configs:
  - job_name: sluice-gateway
    static_configs: [{{targets: ["127.0.0.1:{gateway}"]}}]
"""
KEYS = {"LIVE_CHECK_TEAM_KEY": "sk-live-team", "LIVE_CHECK_LIMITED_KEY": "sk-live-limited"}


def get_json(url: str) -> dict:
    with urllib.request.urlopen(url, timeout=5) as response:
        return json.load(response)


def wait_until_up(url: str, process: subprocess.Popen, deadline: float) -> None:
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise SystemExit(f"{process.args[0]} exited with {process.returncode} before {url} answered")
        try:
            urllib.request.urlopen(url, timeout=2).close()
            return
        except OSError:
            time.sleep(0.2)
    raise SystemExit(f"{url} did not answer in time")


def chat(gateway: int, key: str, model: str, read_bytes: int | None = None) -> None:
    """One streamed request; reads it to the end, or only ``read_bytes`` and then hangs up."""
    body = {"model": model, "stream": True, "messages": [{"role": "user", "content": "hi"}]}
    request = urllib.request.Request(
        f"http://127.0.0.1:{gateway}/v1/chat/completions",
        json.dumps(body).encode(),
        {"content-type": "application/json", "authorization": f"Bearer {key}"},
    )
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            response.read(read_bytes) if read_bytes else response.read()
    except OSError:  # 429s are part of the traffic; anything else shows in the queries
        pass


def traffic(gateway: int, stop: threading.Event) -> None:
    while not stop.is_set():
        clients = [
            threading.Thread(target=chat, args=(gateway, KEYS["LIVE_CHECK_TEAM_KEY"], "hedged")),
            threading.Thread(target=chat, args=(gateway, KEYS["LIVE_CHECK_TEAM_KEY"], "flaky")),
            threading.Thread(target=chat, args=(gateway, KEYS["LIVE_CHECK_LIMITED_KEY"], "hedged")),
            threading.Thread(target=chat, args=(gateway, KEYS["LIVE_CHECK_TEAM_KEY"], "long", 200)),
        ]
        for client in clients:
            client.start()
        for client in clients:
            client.join()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sluice", default=str(ROOT / ".venv/bin/sluice"))
    parser.add_argument("--prometheus", default="prometheus")
    parser.add_argument("--dashboard", default=str(ROOT / "deploy/grafana/dashboards/sluice.json"))
    parser.add_argument("--alerts", default=str(ROOT / "deploy/prometheus/alerts.yml"))
    parser.add_argument("--timeout", type=float, default=120.0, help="stop waiting after this many seconds")
    args = parser.parse_args()
    # the processes run in a temporary directory: absolute paths
    args.sluice, args.prometheus = (os.path.abspath(shutil.which(p) or p) for p in (args.sluice, args.prometheus))

    dashboard = json.loads(Path(args.dashboard).read_text())
    queries = [
        (f"{panel['title']} {target['refId']}", target["expr"].replace("$__rate_interval", "15s"))
        for panel in dashboard["panels"]
        for target in panel.get("targets", [])
    ]
    sim_a, sim_b, gateway, prometheus = free_ports(4)
    processes: list[subprocess.Popen] = []
    stop = threading.Event()
    with tempfile.TemporaryDirectory(prefix="sluice-live-check-") as work:
        workdir = Path(work)
        (workdir / "sluice.toml").write_text(CONFIG.format(a=sim_a, b=sim_b))
        (workdir / "prometheus.yml").write_text(
            PROMETHEUS_CONFIG.format(alerts=json.dumps(str(Path(args.alerts).resolve())), gateway=gateway)
        )
        logs = {name: open(workdir / f"{name}.log", "wb") for name in ("sim-a", "sim-b", "gateway", "prometheus")}

        def start(name: str, *command: str, env: dict[str, str] | None = None) -> subprocess.Popen:
            process = subprocess.Popen(command, stdout=logs[name], stderr=subprocess.STDOUT, env=env, cwd=work)
            processes.append(process)
            return process

        try:
            deadline = time.monotonic() + args.timeout
            for name, port in (("sim-a", sim_a), ("sim-b", sim_b)):
                process = start(name, args.sluice, "simulate", "--host", "127.0.0.1", "--port", str(port))
                wait_until_up(f"http://127.0.0.1:{port}/health", process, deadline)
            process = start(
                "gateway", args.sluice, "serve", "--host", "127.0.0.1", "--port", str(gateway),
                "--config", str(workdir / "sluice.toml"), env={**os.environ, **KEYS},
            )  # fmt: skip
            wait_until_up(f"http://127.0.0.1:{gateway}/health", process, deadline)
            process = start(
                "prometheus", args.prometheus, f"--config.file={workdir / 'prometheus.yml'}",
                f"--storage.tsdb.path={workdir / 'data'}", f"--web.listen-address=127.0.0.1:{prometheus}",
            )  # fmt: skip
            wait_until_up(f"http://127.0.0.1:{prometheus}/-/ready", process, deadline)
            threading.Thread(target=traffic, args=(gateway, stop), daemon=True).start()

            api = f"http://127.0.0.1:{prometheus}/api/v1"
            empty: list[str] = []
            firing: set[tuple[str, str]] = set()
            while time.monotonic() < deadline:
                time.sleep(2)
                empty = []
                for where, expr in queries:
                    result = get_json(f"{api}/query?" + urllib.parse.urlencode({"query": expr}))["data"]["result"]
                    if not result and not any(name in expr for name in EXPECTED_SOON):
                        empty.append(where)
                alerts = get_json(f"{api}/alerts")["data"]["alerts"]
                firing = {(a["labels"]["alertname"], a["labels"].get("deployment", "")) for a in alerts if a["state"] == "firing"}
                if not empty and ("SluiceDeploymentInCooldown", "failing-a") in firing:
                    break
            else:
                raise SystemExit(
                    f"after {args.timeout:.0f} s of traffic: queries with no series: {empty or 'none'}; "
                    f"alerts firing: {sorted(firing) or 'none'} (SluiceDeploymentInCooldown for failing-a expected); "
                    "the gateway's log ends: " + (workdir / "gateway.log").read_text()[-600:]
                )
            unexpected = sorted(name for name, _ in firing if name != "SluiceDeploymentInCooldown")
            if unexpected:
                raise SystemExit(f"alerts firing that this traffic must not fire: {unexpected}")
            pending = [where for where, expr in queries if any(name in expr for name in EXPECTED_SOON)]
            print(
                f"{len(queries) - len(pending)} dashboard queries returned series from live traffic"
                + (f" ({len(pending)} on series not exported yet: {', '.join(pending)})" if pending else "")
                + "; SluiceDeploymentInCooldown fired for failing-a, no other alert"
            )
            return 0
        finally:
            stop.set()
            for process in reversed(processes):
                process.terminate()
            for process in processes:
                try:
                    process.wait(timeout=15)
                except subprocess.TimeoutExpired:
                    process.kill()
                    process.wait()
            for log in logs.values():
                log.close()


if __name__ == "__main__":
    sys.exit(main())
