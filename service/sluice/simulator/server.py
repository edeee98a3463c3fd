"""The simulator's I/O: a lean HTTP/1.1 server on raw non-blocking sockets, h11 for framing.

Why not Quart or hypercorn: the simulator is the upstream of every test and
benchmark and shares a core with the load generator; a framework's
per-request and per-chunk layers would make it the bottleneck. Here a token
costs one pre-encoded ``bytes`` concatenation and, when tokens are spaced in
time, one ``send``.

Why raw sockets and not ``trio.SocketStream``: the simulator must report
*how long its writes waited for the peer* (proof that a gateway's
backpressure reached its upstream). Trying ``send`` first and timing only
``wait_writable`` measures exactly that, with no scheduler noise.

Invariants:

* Every request is counted once in ``requests_started`` and ends in exactly
  one of ``requests_completed``, ``requests_closed_by_client``, ``requests_faulted``.
* A client that closes its connection is noticed within one scheduler tick,
  also while the simulator is sleeping between tokens or stalled: a watcher
  task waits on the socket for EOF during every streamed response.
* A request's memory does not grow with its token count: tokens are
  generated as they are written (at most one 64 KiB batch is held), and what
  a request may ask for is bounded by :class:`SimulatorLimits` (400 above).
"""

from __future__ import annotations

import itertools
import json
import logging
import socket
import struct
import time
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field, replace
from typing import Any, Literal

import h11
import trio

from .behaviour import (
    Behaviour,
    SimParamError,
    SimulatorLimits,
    check_limits,
    check_model_name,
    error_body,
    iter_tokens,
    parse_behaviour,
)
from .chat import ChatApi
from .completions import CompletionsApi
from .embeddings import EmbeddingsApi
from .grammar import Answer, Api, BadRequest, Exchange, StreamRenderer, error_json
from .messages import CountTokensApi, MessagesApi
from .responses import ResponsesApi

log = logging.getLogger("sluice.simulator")

_BATCH_BYTES = 65536

#: the model APIs by path: each renders its own grammar over the shared token loop
APIS: dict[str, Api] = {
    "/v1/chat/completions": ChatApi(),
    "/v1/completions": CompletionsApi(),
    "/v1/responses": ResponsesApi(),
    "/v1/messages": MessagesApi(),
    "/v1/messages/count_tokens": CountTokensApi(),
    "/v1/embeddings": EmbeddingsApi(),
}
_MAX_FAULT_KEYS = 100_000


@dataclass
class SimulatorStats:
    connections_accepted: int = 0
    requests_started: int = 0
    requests_completed: int = 0
    requests_closed_by_client: int = 0
    requests_faulted: int = 0
    active_requests: int = 0
    write_wait_seconds_total: float = 0.0
    authorization_seen: int = 0
    records: deque[dict[str, Any]] = field(default_factory=lambda: deque(maxlen=1000))

    def as_json(self) -> dict[str, Any]:
        data = asdict(self)
        data["records"] = list(self.records)
        return data


def listening_socket(host: str, port: int) -> socket.socket:
    """A non-blocking listening socket on ``host:port`` (port 0: any), backlog 4096."""
    listener = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM)
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    listener.bind((host, port))
    listener.listen(4096)
    listener.setblocking(False)
    return listener


async def accept_forever(listener: socket.socket, accepted: Callable[[socket.socket], None]) -> None:
    """Hand every connection to ``accepted`` as it arrives, draining the backlog at each wakeup; until cancelled."""
    while True:
        await trio.lowlevel.wait_readable(listener)
        while True:
            try:
                sock, _ = listener.accept()
            except BlockingIOError:
                break
            accepted(sock)


class ClientGone(Exception):
    """The peer closed or reset the connection."""


class RawSocket:
    """A non-blocking socket with just the operations the simulator (and the benchmark's fast upstream) need."""

    __slots__ = ("sock", "closed")

    def __init__(self, sock: socket.socket, send_buffer: int | None = None) -> None:
        sock.setblocking(False)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        if send_buffer is not None:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, send_buffer)
        self.sock = sock
        self.closed = False

    async def recv(self) -> bytes:
        while True:
            try:
                return self.sock.recv(65536)
            except BlockingIOError:
                await trio.lowlevel.wait_readable(self.sock)
            except OSError:
                return b""

    async def send_all(self, data: bytes) -> float:
        """Send everything; return the seconds spent waiting for the peer to make room."""
        waited = 0.0
        view = memoryview(data)
        while view:
            try:
                sent = self.sock.send(view)
            except BlockingIOError:
                began = trio.current_time()
                await trio.lowlevel.wait_writable(self.sock)
                waited += trio.current_time() - began
                continue
            except OSError as exc:
                raise ClientGone(str(exc)) from None
            view = view[sent:]
        return waited

    def close(self, *, reset: bool = False) -> None:
        if self.closed:
            return
        self.closed = True
        if reset:
            # SO_LINGER with a zero timeout: close() sends RST, not FIN.
            self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        trio.lowlevel.notify_closing(self.sock)
        self.sock.close()


class Simulator:
    """A fake OpenAI-compatible model server (see docs/simulator.md)."""

    def __init__(self, *, send_buffer: int | None = None, limits: SimulatorLimits | None = None) -> None:
        #: SO_SNDBUF for responses; small values make a reader's backpressure
        #: reach the simulator's writes sooner (kernel autotuning otherwise)
        self.send_buffer = send_buffer
        self.limits = limits or SimulatorLimits()
        self.stats = SimulatorStats()
        self.port: int | None = None
        self._fault_counts: dict[str, int] = {}
        self._ids = itertools.count(1)

    def reset(self) -> None:
        self.stats = SimulatorStats()
        self._fault_counts.clear()

    async def serve(
        self, host: str = "127.0.0.1", port: int = 0, *, task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED
    ) -> None:
        """Listen and serve until cancelled; ``task_status.started(port)`` once listening."""
        listener = listening_socket(host, port)
        self.port = listener.getsockname()[1]
        try:
            async with trio.open_nursery() as nursery:
                task_status.started(self.port)

                def accepted(sock: socket.socket) -> None:
                    self.stats.connections_accepted += 1
                    nursery.start_soon(self._serve_connection, RawSocket(sock, self.send_buffer))

                await accept_forever(listener, accepted)
        finally:
            listener.close()

    # --- HTTP/1.1 ----------------------------------------------------------------------

    async def _serve_connection(self, conn: RawSocket) -> None:
        http = h11.Connection(h11.SERVER)
        try:
            while True:
                request, body = await self._read_request(conn, http)
                if request is None:
                    return
                await self._dispatch(conn, http, request, body)
                if conn.closed or http.our_state is not h11.DONE or http.their_state is not h11.DONE:
                    return
                http.start_next_cycle()
        except* (ClientGone, h11.ProtocolError, trio.ClosedResourceError, OSError):
            pass  # the peer went away or spoke nonsense: nothing left to answer
        finally:
            conn.close()

    async def _read_request(self, conn: RawSocket, http: h11.Connection) -> tuple[h11.Request | None, bytes]:
        request: h11.Request | None = None
        body = bytearray()
        while True:
            event = http.next_event()
            if event is h11.NEED_DATA:
                data = await conn.recv()
                http.receive_data(data)
                continue
            if isinstance(event, h11.Request):
                request = event
            elif isinstance(event, h11.Data):
                body += event.data
            elif isinstance(event, h11.EndOfMessage):
                return request, bytes(body)
            elif isinstance(event, h11.ConnectionClosed) or event is h11.PAUSED:
                return None, b""

    async def _send_simple(
        self, conn: RawSocket, http: h11.Connection, status: int, body: bytes, extra: list[tuple[str, str]] | None = None
    ) -> None:
        headers = [("content-type", "application/json"), ("content-length", str(len(body))), *(extra or [])]
        data = http.send(h11.Response(status_code=status, headers=headers))
        data += http.send(h11.Data(data=body)) + http.send(h11.EndOfMessage())
        await conn.send_all(data)

    async def _dispatch(self, conn: RawSocket, http: h11.Connection, request: h11.Request, body: bytes) -> None:
        path = request.target.decode("latin-1").split("?", 1)[0]
        method = request.method.decode("latin-1")
        api = APIS.get(path)
        if api is not None:
            if method == "POST":
                await self._api(conn, http, request, body, api)
            else:
                refusal = error_json(api.errors, 405, f"Method {method} not allowed", code="method_not_allowed")
                await self._send_simple(conn, http, 405, refusal, [("allow", "POST")])
            return
        routes = {
            "/v1/models": ("GET", self._models),
            "/sim/stats": ("GET", self._stats_route),
            "/sim/reset": ("POST", self._reset_route),
            "/health": ("GET", self._health_route),
        }
        route = routes.get(path)
        if route is None:
            await self._send_simple(conn, http, 404, error_body(f"Unknown URL {path}", code="not_found"))
        elif route[0] != method:
            await self._send_simple(
                conn, http, 405, error_body(f"Method {method} not allowed", code="method_not_allowed"), [("allow", route[0])]
            )
        else:
            await route[1](conn, http, request, body)

    async def _models(self, conn: RawSocket, http: h11.Connection, request: h11.Request, body: bytes) -> None:
        models = {"object": "list", "data": [{"id": "sim", "object": "model", "created": 0, "owned_by": "sluice-simulator"}]}
        await self._send_simple(conn, http, 200, json.dumps(models).encode())

    async def _stats_route(self, conn: RawSocket, http: h11.Connection, request: h11.Request, body: bytes) -> None:
        await self._send_simple(conn, http, 200, json.dumps(self.stats.as_json()).encode())

    async def _health_route(self, conn: RawSocket, http: h11.Connection, request: h11.Request, body: bytes) -> None:
        await self._send_simple(conn, http, 200, json.dumps({"status": "ok", "active_requests": self.stats.active_requests}).encode())

    async def _reset_route(self, conn: RawSocket, http: h11.Connection, request: h11.Request, body: bytes) -> None:
        self.reset()
        await self._send_simple(conn, http, 200, b'{"reset":true}')

    # --- the model APIs ------------------------------------------------------------------

    async def _api(self, conn: RawSocket, http: h11.Connection, request: h11.Request, raw: bytes, api: Api) -> None:
        headers = {k.decode("latin-1"): v.decode("latin-1") for k, v in request.headers}

        async def refuse(message: str, param: str | None, code: str | None) -> None:
            await self._send_simple(conn, http, 400, error_json(api.errors, 400, message, param=param, code=code))

        try:
            payload = json.loads(raw)
        except ValueError:
            await refuse("The body is not valid JSON.", None, "invalid_json")
            return
        try:
            exchange = api.parse(payload)
            check_model_name(exchange.model, self.limits)
            behaviour = parse_behaviour(exchange.model, headers)
            plan = _plan(exchange, behaviour)
            check_limits(behaviour, plan.tokens, exchange.n, self.limits)
        except BadRequest as exc:
            await refuse(str(exc), exc.param, exc.code)
            return
        except SimParamError as exc:
            await refuse(str(exc), exc.param, exc.code)
            return
        behaviour = self._apply_fail_times(behaviour)
        stats = self.stats
        stats.requests_started += 1
        stats.active_requests += 1
        if "authorization" in headers or "x-api-key" in headers:
            stats.authorization_seen += 1
        record: dict[str, Any] = {
            "id": next(self._ids),
            "api": api.name,
            "model": exchange.model,
            "stream": exchange.stream,
            "outcome": "running",
            "chunks_sent": 0,
            "started_at": time.monotonic(),
            "ended_at": None,
            "closed_at": None,
            "write_wait_seconds": 0.0,
        }
        if api.errors == "anthropic":
            record["anthropic_version"] = headers.get("anthropic-version")
        if "traceparent" in headers:
            # What a tracing upstream would continue (tests check the gateway's W3C context).
            record["traceparent"] = headers["traceparent"]
            record["tracestate"] = headers.get("tracestate")
        stats.records.append(record)
        try:
            await self._answer(conn, http, api, exchange, behaviour, plan, record)
        except ClientGone:
            record["outcome"] = "closed_by_client"
            record["closed_at"] = record["closed_at"] or time.monotonic()
        finally:
            record["ended_at"] = time.monotonic()
            stats.active_requests -= 1
            if record["outcome"] == "running":
                # Cancelled from outside (the simulator is stopping): count it as closed.
                record["outcome"] = "closed_by_client"
            if record["outcome"] == "completed":
                stats.requests_completed += 1
            elif record["outcome"] == "closed_by_client":
                stats.requests_closed_by_client += 1
            else:
                stats.requests_faulted += 1

    def _apply_fail_times(self, behaviour: Behaviour) -> Behaviour:
        if behaviour.fault is None or behaviour.fail_times is None:
            return behaviour
        key = behaviour.fault_key or ""
        count = self._fault_counts.get(key, 0)
        if count >= behaviour.fail_times:
            return replace(behaviour, fault=None)
        if len(self._fault_counts) >= _MAX_FAULT_KEYS:
            self._fault_counts.clear()
        self._fault_counts[key] = count + 1
        return behaviour

    async def _answer(
        self,
        conn: RawSocket,
        http: h11.Connection,
        api: Api,
        exchange: Exchange,
        behaviour: Behaviour,
        plan: _Plan,
        record: dict[str, Any],
    ) -> None:
        if behaviour.fault == "disconnect_before_headers":
            record["outcome"] = "fault"
            conn.close()
            return
        if behaviour.fault == "status":
            record["outcome"] = "fault"
            extra: list[tuple[str, str]] = []
            if behaviour.status_code == 429 or behaviour.retry_after is not None:
                retry_after = behaviour.retry_after if behaviour.retry_after is not None else 1
                extra.append(("retry-after", f"{retry_after:g}"))
            if behaviour.retry_after_ms is not None:
                extra.append(("retry-after-ms", f"{behaviour.retry_after_ms:g}"))
            status = behaviour.status_code
            body = error_json(api.errors, status, f"simulated {status}", code=f"simulated_{status}")
            await self._send_simple(conn, http, status, body, extra)
            return
        count = plan.tokens
        prompt, seed = exchange.prompt, behaviour.seed
        answer = Answer(
            number=record["id"],
            created=int(time.time()),
            tokens=count,
            finish=plan.finish_reason,
            text=lambda: "".join(iter_tokens(prompt, count, seed)),  # bounded: count x n <= limits.max_tokens
        )
        if exchange.stream:
            renderer = api.stream(exchange, answer)
            await self._stream(conn, http, behaviour, renderer, iter_tokens(prompt, count, seed), count, record)
            return
        delay = (behaviour.ttft_ms + behaviour.itl_ms * max(0, count - 1)) / 1000.0
        if delay:
            await self._watching(conn, http, record, trio.sleep, delay)
        await self._send_simple(conn, http, 200, api.body(exchange, answer))
        record["outcome"] = "completed"

    async def _watching(self, conn: RawSocket, http: h11.Connection, record: dict[str, Any], fn: Any, *args: Any) -> None:
        """Run ``fn`` while watching the socket; a client that goes away cancels it at once."""
        gone = False
        async with trio.open_nursery() as nursery:

            async def watch() -> None:
                nonlocal gone
                try:
                    while True:
                        data = await conn.recv()
                        if not data:
                            break
                        http.receive_data(data)  # a pipelined next request: keep it for later
                except (trio.ClosedResourceError, h11.ProtocolError):
                    return  # we closed it ourselves (a fault)
                if conn.closed:
                    # We closed it ourselves before this task first ran (a reset
                    # fault with no delay): a fault, not the client leaving.
                    return
                gone = True
                record["closed_at"] = time.monotonic()
                nursery.cancel_scope.cancel()

            nursery.start_soon(watch)
            try:
                await fn(*args)
            except ClientGone:
                # A write failed first (reset by the peer): same outcome, raised
                # below, outside the nursery, so callers never see a group.
                gone = True
                record["closed_at"] = record["closed_at"] or time.monotonic()
            finally:
                nursery.cancel_scope.cancel()
        if gone:
            raise ClientGone("the client closed the connection")

    async def _stream(
        self,
        conn: RawSocket,
        http: h11.Connection,
        behaviour: Behaviour,
        renderer: StreamRenderer,
        tokens: Iterator[str],
        count: int,
        record: dict[str, Any],
    ) -> None:
        stats = self.stats

        async def flush(buffer: bytearray) -> None:
            if buffer:
                waited = await conn.send_all(http.send(h11.Data(data=bytes(buffer))))
                buffer.clear()
                if waited:
                    stats.write_wait_seconds_total += waited
                    record["write_wait_seconds"] += waited

        async def write() -> None:
            head = [("content-type", "text/event-stream"), ("cache-control", "no-cache")]
            await conn.send_all(http.send(h11.Response(status_code=200, headers=head)))
            fault, after = behaviour.fault, behaviour.after
            first_at = trio.current_time() + behaviour.ttft_ms / 1000.0
            itl = behaviour.itl_ms / 1000.0
            buffer = bytearray(renderer.opening())
            for i in range(count + 1):
                if fault is not None and i == after:
                    if await self._strike(conn, http, behaviour, renderer, buffer, flush, record):
                        return
                if i == count:
                    break
                token = next(tokens)
                due = first_at + i * itl
                if due > trio.current_time():
                    await flush(buffer)
                    await trio.sleep_until(due)
                if i == 0:
                    buffer += renderer.first()
                buffer += renderer.token(token)
                record["chunks_sent"] += 1
                if len(buffer) >= _BATCH_BYTES:
                    await flush(buffer)
                    await trio.lowlevel.checkpoint()
            if count == 0:
                buffer += renderer.first()
            buffer += renderer.closing(terminal=fault != "no_done")
            await flush(buffer)
            await conn.send_all(http.send(h11.EndOfMessage()))
            record["outcome"] = "fault" if fault == "no_done" else "completed"

        await self._watching(conn, http, record, write)

    async def _strike(
        self,
        conn: RawSocket,
        http: h11.Connection,
        behaviour: Behaviour,
        renderer: StreamRenderer,
        buffer: bytearray,
        flush: Any,
        record: dict[str, Any],
    ) -> bool:
        """Apply a mid-stream fault; True when the response ends here."""
        fault = behaviour.fault
        if fault == "malformed":
            buffer += renderer.malformed()
            return False
        await flush(buffer)
        if fault == "reset":
            record["outcome"] = "fault"
            conn.close(reset=True)
            return True
        if fault == "stall":
            if behaviour.stall_ms is None:
                await trio.sleep_forever()
            await trio.sleep(behaviour.stall_ms / 1000.0)
            return False
        if fault == "error_event":
            await conn.send_all(http.send(h11.Data(data=renderer.error_event())) + http.send(h11.EndOfMessage()))
            record["outcome"] = "fault"
            return True
        return False  # no_done strikes at the end, not here


@dataclass(frozen=True, slots=True)
class _Plan:
    """What one answer will be: tokens per choice and why it ends."""

    tokens: int
    finish_reason: Literal["stop", "length"]


def _plan(exchange: Exchange, behaviour: Behaviour) -> _Plan:
    if not exchange.generates:
        return _Plan(0, "stop")
    limit, count = exchange.max_tokens, behaviour.tokens
    if limit is not None and limit < count:
        return _Plan(limit, "length")
    return _Plan(count, "stop")


async def serve_simulator(
    host: str = "127.0.0.1",
    port: int = 0,
    *,
    limits: SimulatorLimits | None = None,
    task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED,
) -> None:
    await Simulator(limits=limits).serve(host, port, task_status=task_status)


def run_simulator(host: str, port: int, limits: SimulatorLimits | None = None) -> None:
    """Run the simulator in the foreground (``sluice simulate``)."""

    async def main() -> None:
        simulator = Simulator(limits=limits)
        async with trio.open_nursery() as nursery:
            bound = await nursery.start(simulator.serve, host, port)
            log.info("simulator listening on http://%s:%d/v1", host, bound)

    try:
        trio.run(main)
    except KeyboardInterrupt:
        pass
