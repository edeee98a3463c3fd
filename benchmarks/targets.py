"""The systems under test, each started as its own process on the gateway core.

* ``direct``: no gateway; the load generator talks to the upstream.
* ``trio-floor``: benchmarks/floor.py, the cost of trio for Sluice's shape.
* ``nginx``: a pass-through proxy (``proxy_buffering off``), one worker.
* ``sluice``: ``sluice serve`` pointed at the same upstream.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass

from .procs import GATEWAY_CORE, LOAD_CORE, free_port, start, stop, wait_port

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
GATEWAYS = ("direct", "trio-floor", "nginx", "sluice")

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
def upstream() -> Iterator[int]:
    port = free_port()
    process = start([sys.executable, "-m", "sluice.cli", "simulate", "--port", str(port)], LOAD_CORE)
    try:
        wait_port(port)
        yield port
    finally:
        stop(process)


@contextlib.contextmanager
def target(name: str, upstream_port: int, sluice_args: list[str] | None = None) -> Iterator[Target]:
    if name == "direct":
        yield Target(name, f"http://127.0.0.1:{upstream_port}", None)
        return
    port = free_port()
    workdir = None
    if name == "trio-floor":
        cmd = [sys.executable, "-m", "benchmarks.floor", str(port), str(upstream_port)]
    elif name == "sluice":
        cmd = [
            os.path.join(os.path.dirname(sys.executable), "sluice"), "serve", "--port", str(port),
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
    process = start(cmd, GATEWAY_CORE, env={"PYTHONPATH": ROOT})
    try:
        wait_port(port)
        yield Target(name, f"http://127.0.0.1:{port}", process.pid)
    finally:
        stop(process)
        if workdir:
            shutil.rmtree(workdir, ignore_errors=True)
