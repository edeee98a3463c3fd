"""The ``sluice`` command: ``sluice serve`` runs the gateway, ``sluice simulate`` the simulator.

Flags override ``SLUICE_*`` environment variables, which override defaults
(see :mod:`sluice.config`).
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import Any

from .logs import configure_logging
from .policies import Backpressure


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="sluice",
        description="Sluice: an OpenAI-compatible LLM streaming gateway built on trio.",
        epilog="Every serve flag can also be set as SLUICE_<NAME> (e.g. SLUICE_PORT=8000).",
    )
    commands = parser.add_subparsers(dest="command", required=True)

    serve = commands.add_parser(
        "serve",
        help="run the gateway",
        description="Run the gateway. With no upstream configured it serves from an embedded simulated model.",
    )
    serve.add_argument(
        "--config", help="TOML config file: models, deployments, keys and any setting below [SLUICE_CONFIG]; see sluice.example.toml"
    )
    serve.add_argument("--host", help="address to listen on [SLUICE_HOST, default 127.0.0.1]")
    serve.add_argument("--port", type=int, help="port to listen on [SLUICE_PORT, default 8000]")
    serve.add_argument("--workers", type=int, help="worker processes on the one port, one core each [SLUICE_WORKERS, default 1]")
    serve.add_argument(
        "--upstream-base-url",
        help="OpenAI-compatible base URL including /v1, e.g. https://api.openai.com/v1 "
        "[SLUICE_UPSTREAM_BASE_URL; default: the embedded simulator]",
    )
    serve.add_argument("--upstream-api-key", help="API key sent upstream as a bearer token [SLUICE_UPSTREAM_API_KEY]")
    serve.add_argument(
        "--buffer-size", type=int, help="per-stream channel capacity, in upstream reads [SLUICE_BUFFER_SIZE, default 16]"
    )
    serve.add_argument(
        "--backpressure",
        choices=[p.value for p in Backpressure],
        help="default policy when a client reads slower than the upstream writes [SLUICE_BACKPRESSURE, default block]",
    )
    serve.add_argument("--max-wait-ms", type=float, help="how long the 'error' policy waits for room [SLUICE_MAX_WAIT_MS, default 1000]")
    serve.add_argument("--max-streams", type=int, help="concurrent streams per worker before 503 [SLUICE_MAX_STREAMS, default 1024]")
    serve.add_argument("--first-token-timeout", type=float, help="seconds to wait for the first token [SLUICE_FIRST_TOKEN_TIMEOUT, default 60]")
    serve.add_argument("--idle-timeout", type=float, help="seconds allowed between upstream reads [SLUICE_IDLE_TIMEOUT, default 60]")
    serve.add_argument("--ping-interval", type=float, help="seconds between ': ping' keep-alives before the first token [SLUICE_PING_INTERVAL, default 15]")
    serve.add_argument("--max-body-bytes", type=int, help="request body limit; larger gets 413 [SLUICE_MAX_BODY_BYTES, default 8 MiB]")
    serve.add_argument("--stall-timeout", type=float, help="seconds a client may leave sent data unread before it is cut; 0 = never [SLUICE_STALL_TIMEOUT, default 30]")
    serve.add_argument("--drain-timeout", type=float, help="on SIGTERM, seconds streams may finish before they end with an error event [SLUICE_DRAIN_TIMEOUT, default 10]")
    serve.add_argument("--api-keys", help="comma-separated gateway keys clients must send as Bearer tokens [SLUICE_API_KEYS; default: open]")
    serve.add_argument("--admin-api-key", help="the key that opens /dashboard (needed with gateway keys) [SLUICE_ADMIN_API_KEY]")
    serve.add_argument("--cors-origins", help="comma-separated origins allowed by CORS [SLUICE_CORS_ORIGINS; default: CORS off]")
    serve.add_argument("--keep-alive-timeout", type=float, help="seconds an idle keep-alive connection is kept [SLUICE_KEEP_ALIVE_TIMEOUT, default 75]")
    serve.add_argument("--request-head-timeout", type=float, help="seconds a connection may take to send a request head [SLUICE_REQUEST_HEAD_TIMEOUT, default 10]")
    serve.add_argument("--client-sndbuf", type=int, help="SO_SNDBUF of client connections, bytes; 0 = kernel autotuning [SLUICE_CLIENT_SNDBUF, default 65536]")
    serve.add_argument("--upstream-rcvbuf", type=int, help="SO_RCVBUF of upstream connections, bytes; 0 = kernel autotuning [SLUICE_UPSTREAM_RCVBUF, default 65536]")
    serve.add_argument("--stream-buffer-bytes", type=int, help="bytes one stream's relay may hold before its backpressure policy acts [SLUICE_STREAM_BUFFER_BYTES, default 65536]")
    serve.add_argument("--memory-budget-bytes", type=int, help="bytes all streams' relays may hold before new streams get 503 [SLUICE_MEMORY_BUDGET_BYTES, default max_streams x stream_buffer_bytes]")
    serve.add_argument("--redis-url", help="Redis shared by workers and instances for key limits and cooldowns, e.g. redis://127.0.0.1:6379/0 [SLUICE_REDIS_URL; default: in-process]")
    serve.add_argument("--otel-endpoint", help="OTLP/HTTP collector base URL; turns tracing on (/v1/traces is appended) [SLUICE_OTEL_ENDPOINT, or OTEL_EXPORTER_OTLP_ENDPOINT; default: off]")
    serve.add_argument("--otel-service-name", help="service.name of the gateway's spans [SLUICE_OTEL_SERVICE_NAME; default: OTEL_SERVICE_NAME, else sluice]")
    serve.add_argument("--log-level", help="DEBUG, INFO, WARNING, ERROR [SLUICE_LOG_LEVEL, default INFO]")

    simulate = commands.add_parser(
        "simulate",
        help="run the simulated OpenAI-compatible upstream alone",
        description="Run the simulated upstream (see docs/simulator.md for the behaviour scheme).",
    )
    simulate.add_argument("--host", default="127.0.0.1")
    simulate.add_argument("--port", type=int, default=9000)
    simulate.add_argument(
        "--max-tokens", type=int, default=100_000, help="completion tokens (tokens x n) per request; more gets 400 [default 100000]"
    )
    simulate.add_argument(
        "--max-stream-seconds", type=float, default=600.0,
        help="longest scheduled answer (ttft + itl x tokens + stall); longer gets 400 [default 600]",
    )
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command == "simulate":
        from .simulator.behaviour import SimulatorLimits
        from .simulator.server import run_simulator

        configure_logging("INFO")
        run_simulator(args.host, args.port, SimulatorLimits(max_tokens=args.max_tokens, max_stream_seconds=args.max_stream_seconds))
        return 0
    from .config import ConfigError, load_settings

    overrides: dict[str, Any] = {
        name: value for name, value in vars(args).items() if name not in ("command", "config") and value is not None
    }
    try:
        settings = load_settings(args.config or os.environ.get("SLUICE_CONFIG"), **overrides)
    except ConfigError as exc:
        print(f"sluice: invalid settings:\n{exc}", file=sys.stderr)
        return 2
    configure_logging(settings.log_level)
    from .server import run

    return run(settings)


if __name__ == "__main__":
    sys.exit(main())
