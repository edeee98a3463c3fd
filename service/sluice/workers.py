"""``sluice serve --workers N``: N worker processes serving one port, and their supervisor.

Each worker is a whole gateway (its own trio loop, hypercorn, upstream pools)
on a socket of its own bound with ``SO_REUSEPORT``, so the kernel spreads
connections across workers without a shared accept queue. The supervisor
only starts, watches and stops them:

* SIGTERM/SIGINT: every worker gets one SIGTERM and drains as a single
  worker does (``drain_timeout``, then ``server_shutting_down`` events);
  the supervisor exits 0 when all have exited.
* A worker that dies on its own is logged and replaced; its streams ended
  with its process (their clients see a cut connection, not a clean end).
* Prometheus: workers write to one ``PROMETHEUS_MULTIPROC_DIR`` (a fresh
  temporary directory unless set), so any worker's ``/metrics`` covers all;
  a dead worker's live gauges are dropped (``mark_process_dead``).
* Port 0 is resolved once, here, so every worker binds the same port.
"""

from __future__ import annotations

import logging
import multiprocessing
import os
import shutil
import signal
import socket
import tempfile
import time
from types import FrameType

from .config import Settings

log = logging.getLogger("sluice.workers")

#: how often the supervisor looks at its workers (seconds)
_POLL = 0.2


def supervise(settings: Settings) -> None:
    own_metrics_dir = None
    if not os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        own_metrics_dir = tempfile.mkdtemp(prefix="sluice-metrics-")
        os.environ["PROMETHEUS_MULTIPROC_DIR"] = own_metrics_dir  # inherited by the spawned workers
    placeholder = None
    if settings.port == 0:
        # Hold the chosen port (bound, not listening) until the workers have it.
        placeholder = socket.socket(socket.AF_INET6 if ":" in settings.host else socket.AF_INET)
        placeholder.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        placeholder.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        placeholder.bind((settings.host, 0))
        settings = settings.model_copy(update={"port": placeholder.getsockname()[1]})
    context = multiprocessing.get_context("spawn")  # no inherited trio state, locks or sockets
    stopping = False

    def stop(signum: int, frame: FrameType | None) -> None:
        nonlocal stopping
        if not stopping:
            log.info("%s: stopping %d workers", signal.Signals(signum).name, len(workers))
        stopping = True

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)

    def start_worker() -> multiprocessing.process.BaseProcess:
        from .server import run_worker

        process = context.Process(target=run_worker, args=(settings,), name="sluice-worker", daemon=False)
        process.start()
        return process

    workers = [start_worker() for _ in range(settings.workers)]
    log.info({"event": "workers_started", "workers": settings.workers, "port": settings.port,
              "pids": [w.pid for w in workers]})
    try:
        while not stopping:
            time.sleep(_POLL)
            for index, worker in enumerate(workers):
                if worker.exitcode is not None and not stopping:
                    log.warning({"event": "worker_died", "pid": worker.pid, "exitcode": worker.exitcode})
                    _forget(worker.pid)
                    workers[index] = start_worker()
        for worker in workers:
            if worker.exitcode is None and worker.pid is not None:
                os.kill(worker.pid, signal.SIGTERM)
        deadline = time.monotonic() + settings.drain_timeout + 15.0
        for worker in workers:
            worker.join(max(0.1, deadline - time.monotonic()))
            if worker.exitcode is None:
                worker.kill()
                worker.join()
    finally:
        if placeholder is not None:
            placeholder.close()
        if own_metrics_dir is not None:
            shutil.rmtree(own_metrics_dir, ignore_errors=True)


def _forget(pid: int | None) -> None:
    if pid is None:
        return
    from prometheus_client import multiprocess

    multiprocess.mark_process_dead(pid)
