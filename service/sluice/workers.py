"""``sluice serve --workers N``: N worker processes serving one socket, and their supervisor.

The supervisor creates the gateway's one listening socket (no
``SO_REUSEPORT``) and hands it to every worker: each worker is a whole
gateway (its own trio loop, hypercorn, upstream pools) accepting from that
shared socket. So a second gateway on the same port is refused by the kernel
(``EADDRINUSE``), a bind failure is reported once, by the supervisor, before
any worker starts, and connections queued while a worker restarts wait for
the other workers instead of being reset with the dead worker's own queue.
The supervisor only starts, watches and stops workers:

* SIGTERM/SIGINT: the supervisor closes its copy of the socket and every
  worker gets one SIGTERM and drains as a single worker does (it stops
  accepting, so the port refuses new connections; ``drain_timeout``, then
  ``server_shutting_down`` events);
  a second signal is passed on as a second SIGTERM (end the drain now);
  the supervisor exits 0 when all have exited.
* A worker that dies on its own is logged and replaced; its streams ended
  with its process (their clients see a cut connection, not a clean end).
  Deaths soon after start are replaced with an exponential backoff
  (:class:`RestartPolicy`); after several in a row the supervisor stops
  everything and exits 1 with one line on stderr.
* The supervisor dying (SIGKILL, the OOM killer) takes the workers with it:
  each asks the kernel for a SIGTERM when its parent dies
  (:func:`exit_with_supervisor`) and drains as on any SIGTERM.
* Prometheus: workers write to one ``PROMETHEUS_MULTIPROC_DIR`` (a fresh
  temporary directory unless set), so any worker's ``/metrics`` covers all;
  a dead worker's live gauges are dropped (``mark_process_dead``).
"""

from __future__ import annotations

import ctypes
import logging
import multiprocessing
import os
import shutil
import signal
import sys
import tempfile
import time
from dataclasses import dataclass
from types import FrameType

from .config import Settings

log = logging.getLogger("sluice.workers")

#: how often the supervisor looks at its workers (seconds)
_POLL = 0.2

_PR_SET_PDEATHSIG = 1  # <linux/prctl.h>


@dataclass
class RestartPolicy:
    """When to replace a dead worker, and when to stop trying (sans-IO).

    A worker that dies within ``early`` seconds of its start died of
    something a restart will likely not fix (a broken upstream config, a
    missing resource, the OOM killer at start-up): each such death in a row
    doubles the wait before the next start, from ``first_delay`` up to
    ``max_delay``, and the ``give_up_after``-th in a row ends the gateway. A
    worker that lived longer is replaced at once and resets the count.
    """

    early: float = 10.0
    give_up_after: int = 5
    first_delay: float = 0.5
    max_delay: float = 10.0
    early_deaths_in_a_row: int = 0

    def after_death(self, lifetime: float) -> float | None:
        """Seconds to wait before starting a replacement, or None: give up."""
        if lifetime >= self.early:
            self.early_deaths_in_a_row = 0
            return 0.0
        self.early_deaths_in_a_row += 1
        if self.early_deaths_in_a_row >= self.give_up_after:
            return None
        return min(self.max_delay, self.first_delay * 2 ** (self.early_deaths_in_a_row - 1))


def exit_with_supervisor(supervisor_pid: int) -> None:
    """In a worker: get SIGTERM (and so drain and exit) when the supervisor dies.

    ``PR_SET_PDEATHSIG`` covers a supervisor that dies from now on; one that
    died before this call (the worker is then already re-parented) is caught
    by the parent check after it. (The kernel sends it when the *thread*
    that started the worker ends: the supervisor starts workers from its
    main thread only.)
    """
    if sys.platform.startswith("linux"):
        libc = ctypes.CDLL(None, use_errno=True)
        if libc.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0) != 0:
            log.warning("prctl(PR_SET_PDEATHSIG) failed: errno %d", ctypes.get_errno())
    if os.getppid() != supervisor_pid:
        sys.exit(0)


def supervise(settings: Settings) -> int:
    """Run ``settings.workers`` workers until signalled; the exit code."""
    from .server import CannotListen, listening_socket

    try:
        sock = listening_socket(settings)
    except CannotListen as exc:
        print(f"sluice: {exc}", file=sys.stderr)
        return 2
    # Port 0: the kernel chose one; say which.
    settings = settings.model_copy(update={"port": sock.getsockname()[1]})
    own_metrics_dir = None
    if not os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        own_metrics_dir = tempfile.mkdtemp(prefix="sluice-metrics-")
        os.environ["PROMETHEUS_MULTIPROC_DIR"] = own_metrics_dir  # inherited by the spawned workers
    context = multiprocessing.get_context("spawn")  # no inherited trio state or locks; the socket is passed on purpose
    stopping = False
    workers: list[multiprocessing.process.BaseProcess | None] = []

    def signal_workers() -> None:
        for worker in workers:
            if worker is not None and worker.exitcode is None and worker.pid is not None:
                os.kill(worker.pid, signal.SIGTERM)

    def stop(signum: int, frame: FrameType | None) -> None:
        nonlocal stopping
        if not stopping:
            log.info("%s: stopping %d workers", signal.Signals(signum).name, len(workers))
            stopping = True
        else:
            log.info("%s again: workers end their drain now", signal.Signals(signum).name)
            signal_workers()

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)

    def start_worker() -> multiprocessing.process.BaseProcess:
        from .server import run_worker

        # The socket is pickled into the child's arguments: multiprocessing
        # passes its descriptor to the spawned process (spawnv_passfds).
        process = context.Process(
            target=run_worker, args=(settings, sock, os.getpid()), name="sluice-worker", daemon=False
        )
        process.start()
        return process

    policy = RestartPolicy()
    exit_code = 0
    try:
        started_at = [time.monotonic()] * settings.workers
        restart_at = [0.0] * settings.workers
        workers.extend(start_worker() for _ in range(settings.workers))
        log.info({"event": "workers_started", "workers": settings.workers, "port": settings.port,
                  "pids": [w.pid for w in workers if w is not None]})
        while not stopping:
            time.sleep(_POLL)
            now = time.monotonic()
            for index, worker in enumerate(workers):
                if stopping:
                    break
                if worker is None:
                    if now >= restart_at[index]:
                        workers[index] = start_worker()
                        started_at[index] = time.monotonic()
                    continue
                if worker.exitcode is None:
                    continue
                lifetime = now - started_at[index]
                _forget(worker.pid)
                delay = policy.after_death(lifetime)
                log.warning({"event": "worker_died", "pid": worker.pid, "exitcode": worker.exitcode,
                             "lifetime_s": round(lifetime, 3), "restart_in_s": delay})
                if delay is None:
                    print(
                        f"sluice: workers keep dying soon after start ({policy.early_deaths_in_a_row} in a row, "
                        f"last exit code {worker.exitcode}); giving up",
                        file=sys.stderr,
                    )
                    exit_code = 1
                    stopping = True
                    break
                workers[index] = None
                restart_at[index] = now + delay
        # Our copy of the socket goes first: once the workers close theirs as
        # their drain starts, the port refuses new connections (a load
        # balancer moves on at once) instead of queueing them unanswered
        # until the drain ends.
        sock.close()
        signal_workers()
        deadline = time.monotonic() + settings.drain_timeout + 15.0
        for worker in workers:
            if worker is None:
                continue
            worker.join(max(0.1, deadline - time.monotonic()))
            if worker.exitcode is None:
                worker.kill()
                worker.join()
    finally:
        sock.close()
        if own_metrics_dir is not None:
            shutil.rmtree(own_metrics_dir, ignore_errors=True)
    return exit_code


def _forget(pid: int | None) -> None:
    if pid is None:
        return
    from prometheus_client import multiprocess

    multiprocess.mark_process_dead(pid)
