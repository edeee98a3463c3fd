"""The systems under test, each started as its own process on the gateway core, and the upstream.

* ``direct``: no gateway; the load generator talks to the upstream.
* ``hypercorn-floor``: benchmarks/hypercorn_floor.py, Sluice's shape as a raw
  ASGI callable on hypercorn with a raw trio socket upstream (no framework,
  no HTTP client library): the reference of issue 17's targets.
* ``stack-floor``: benchmarks/stack_floor.py, the same with httpx2 (and
  ``sluice.upstream_body``) for the upstream: what httpx2 adds.
* ``quart-floor``: benchmarks/quart_floor.py, the same with quart-trio as the
  application: what Quart adds; Sluice above it is Sluice's own work.
* ``trio-floor`` (only when named): benchmarks/floor.py, the shape on raw
  trio sockets with no HTTP server at all: what hypercorn itself costs.
* ``nginx``: a pass-through proxy (``proxy_buffering off``), one worker.
* ``sluice``: ``sluice serve`` pointed at the same upstream.
* ``sluice-features``: the same with what issue 6 adds switched on: a
  config file routing every model over two deployments (least busy), a
  hedge armed on every stream (it never fires: tokens come in time, so the
  race's bookkeeping is what is measured), a virtual key with limits on
  every request, and Prometheus metrics (always on).
* ``sluice-otel``: ``sluice`` with OpenTelemetry tracing on, configured as
  users do (``OTEL_EXPORTER_OTLP_ENDPOINT``), exporting every span over
  OTLP/HTTP to benchmarks/otlp_sink.py on the load core.
* ``sluice-2w``: ``sluice serve --workers 2`` (both cores: the gateway is
  then not alone on its core, so compare its throughput, not its CPU).

The upstream (on the load core) is ``fast`` (benchmarks/fast_upstream.py:
pre-rendered chat answers, far cheaper than any gateway) or ``simulator``
(``sluice simulate``: every API and fault, but itself the bottleneck of a
throughput run).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass

from deploy.fleet import free_port

from .procs import GATEWAY_CORE, LOAD_CORE, http_json, start, stop, wait_port

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
GATEWAYS = ("direct", "hypercorn-floor", "stack-floor", "quart-floor", "nginx", "sluice")
#: measured only when asked for (--gateways), or by the scenarios that compare them
EXTRA_GATEWAYS = ("trio-floor", "sluice-features", "sluice-2w", "sluice-otel")
#: the reference of issue 17's targets: every ratio in the report is to it
REFERENCE = "hypercorn-floor"
UPSTREAMS = ("fast", "simulator")
BENCH_KEY = "sk-bench-virtual-key"

FEATURES_CONFIG = """
[[models]]
name = "*"
hedge_after_ms = 10000
  [[models.deployments]]
  name = "a"
  base_url = "http://127.0.0.1:{upstream}/v1"
  [[models.deployments]]
  name = "b"
  base_url = "http://127.0.0.1:{upstream}/v1"

[[keys]]
name = "bench"
key_env = "SLUICE_BENCH_KEY"
requests_per_minute = 100000000
tokens_per_minute = 1000000000
max_concurrent_streams = 100000
"""

NGINX_CONF = """
daemon off;
master_process off;
worker_processes 1;
error_log {dir}/error.log warn;
pid {dir}/nginx.pid;
events {{ worker_connections 8192; }}
http {{
    access_log off;
    client_body_temp_path {dir}/body;
    proxy_temp_path {dir}/proxy;
    fastcgi_temp_path {dir}/fastcgi;
    uwsgi_temp_path {dir}/uwsgi;
    scgi_temp_path {dir}/scgi;
    upstream model {{ server 127.0.0.1:{upstream}; keepalive 512; }}
    server {{
        listen 127.0.0.1:{port} backlog=4096;
        location / {{
            proxy_pass http://model;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            proxy_buffering off;
            proxy_read_timeout 3600s;
        }}
    }}
}}
"""


@dataclass
class Target:
    name: str
    url: str
    pid: int | None  # None for direct: nothing between client and upstream
    headers: dict[str, str] | None = None  # sent with every request


def nginx_binary() -> str | None:
    for candidate in (shutil.which("nginx"), "/usr/sbin/nginx"):
        if candidate and os.path.exists(candidate):
            return candidate
    return None


def ensure_nginx(install: bool) -> str | None:
    """nginx from Debian's package, installed by the suite itself when allowed."""
    binary = nginx_binary()
    if binary or not install or os.geteuid() != 0:
        return binary
    subprocess.run(["apt-get", "update", "-qq"], capture_output=True, timeout=300)
    subprocess.run(["apt-get", "install", "-y", "-qq", "nginx-light"], capture_output=True, timeout=600)
    binary = nginx_binary()
    if binary is None:
        subprocess.run(["apt-get", "install", "-y", "-qq", "nginx"], capture_output=True, timeout=600)
    return nginx_binary()


@contextlib.contextmanager
def upstream(kind: str = "fast") -> Iterator[int]:
    """The upstream on the load core: its port while it runs."""
    port = free_port()
    if kind == "fast":
        cmd = [sys.executable, "-m", "benchmarks.fast_upstream", str(port)]
    elif kind == "simulator":
        cmd = [sys.executable, "-m", "sluice.cli", "simulate", "--port", str(port)]
    else:
        raise ValueError(f"unknown upstream {kind!r}; one of {', '.join(UPSTREAMS)}")
    process = start(cmd, LOAD_CORE, env={"PYTHONPATH": ROOT})
    try:
        wait_port(port)
        yield port
    finally:
        stop(process)


@contextlib.contextmanager
def otlp_sink() -> Iterator[str]:
    """benchmarks/otlp_sink.py on the load core; its base URL (OTEL_EXPORTER_OTLP_ENDPOINT)."""
    port = free_port()
    process = start([sys.executable, "-m", "benchmarks.otlp_sink", str(port)], LOAD_CORE, env={"PYTHONPATH": ROOT})
    try:
        wait_port(port)
        yield f"http://127.0.0.1:{port}"
    finally:
        stop(process)


@contextlib.contextmanager
def target(
    name: str, upstream_port: int, sluice_args: list[str] | None = None, extra_env: dict[str, str] | None = None
) -> Iterator[Target]:
    if name == "direct":
        yield Target(name, f"http://127.0.0.1:{upstream_port}", None)
        return
    port = free_port()
    workdir = None
    env = {"PYTHONPATH": ROOT, "SLUICE_BENCH_KEY": BENCH_KEY}
    if name == "sluice-otel":
        with otlp_sink() as sink_url, target("sluice", upstream_port, sluice_args, {"OTEL_EXPORTER_OTLP_ENDPOINT": sink_url}) as traced:
            yield Target(name, traced.url, traced.pid)
        return
    env.update(extra_env or {})
    if name == "hypercorn-floor":
        cmd = [sys.executable, "-m", "benchmarks.hypercorn_floor", str(port), str(upstream_port)]
    elif name == "trio-floor":
        cmd = [sys.executable, "-m", "benchmarks.floor", str(port), str(upstream_port)]
    elif name == "quart-floor":
        cmd = [sys.executable, "-m", "benchmarks.quart_floor", str(port), str(upstream_port)]
    elif name == "stack-floor":
        cmd = [sys.executable, "-m", "benchmarks.stack_floor", str(port), str(upstream_port)]
    elif name == "sluice":
        cmd = [
            os.path.join(os.path.dirname(sys.executable), "sluice"), "serve", "--port", str(port),
            "--upstream-base-url", f"http://127.0.0.1:{upstream_port}/v1", "--max-streams", "8192",
            "--log-level", "WARNING", *(sluice_args or []),
        ]
    elif name == "sluice-features":
        workdir = tempfile.mkdtemp(prefix="sluice-features-")
        config = os.path.join(workdir, "sluice.toml")
        with open(config, "w") as handle:
            handle.write(FEATURES_CONFIG.format(upstream=upstream_port))
        cmd = [
            os.path.join(os.path.dirname(sys.executable), "sluice"), "serve", "--port", str(port),
            "--config", config, "--max-streams", "8192", "--log-level", "WARNING", *(sluice_args or []),
        ]
    elif name == "sluice-2w":
        cmd = [
            os.path.join(os.path.dirname(sys.executable), "sluice"), "serve", "--port", str(port), "--workers", "2",
            "--upstream-base-url", f"http://127.0.0.1:{upstream_port}/v1", "--max-streams", "8192",
            "--log-level", "WARNING", *(sluice_args or []),
        ]
    elif name == "nginx":
        binary = nginx_binary()
        if binary is None:
            raise RuntimeError("nginx is not installed")
        workdir = tempfile.mkdtemp(prefix="sluice-nginx-")
        with open(os.path.join(workdir, "nginx.conf"), "w") as conf:
            conf.write(NGINX_CONF.format(dir=workdir, upstream=upstream_port, port=port))
        cmd = [binary, "-p", workdir, "-c", os.path.join(workdir, "nginx.conf")]
    else:
        raise ValueError(name)
    cores = f"{GATEWAY_CORE},{LOAD_CORE}" if name == "sluice-2w" else GATEWAY_CORE
    process = start(cmd, cores, env=env)
    try:
        wait_port(port)
        if name == "sluice-2w":
            wait_workers(port, 2)
        headers = {"authorization": f"Bearer {BENCH_KEY}"} if name == "sluice-features" else None
        yield Target(name, f"http://127.0.0.1:{port}", process.pid, headers)
    finally:
        stop(process)
        if workdir:
            shutil.rmtree(workdir, ignore_errors=True)


def wait_workers(port: int, count: int, timeout: float = 60.0) -> None:
    """Until ``count`` distinct workers have answered on the port (each binds it when ready)."""
    seen: set[int] = set()
    deadline = time.monotonic() + timeout
    while len(seen) < count and time.monotonic() < deadline:
        try:
            seen.add(http_json(f"http://127.0.0.1:{port}/health")["process"]["pid"])
        except OSError:
            time.sleep(0.1)
