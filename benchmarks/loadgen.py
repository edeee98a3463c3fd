"""A load generator for SSE streams: one epoll reactor over raw non-blocking sockets.

Why hand-written: a generic HTTP client (httpx, aiohttp) costs more CPU per
event than the gateway under test, so it would measure itself. Here a
stream is a small state machine: connect, write one request, parse the
response head, decode the chunked body, split SSE events at blank lines.

Run as a process (pinned to its own core by the harness)::

    python -m benchmarks.loadgen '{"url": "http://127.0.0.1:8000", "streams": 25, ...}'

and it prints one JSON object of results. Spec keys: ``url``, ``streams``,
``model`` (``{i}`` is replaced by the stream index), ``ramp_s`` (starts spread
evenly over this many seconds), ``stream`` (bool), ``abort_after`` (events,
then close), ``abort_rst`` (close by RST instead of FIN), ``read_bps`` (slow
reader: bytes per second per stream), ``rcvbuf``, ``timeout_s``,
``repeat_s`` (closed loop: each client sends its next request as soon as one
ends, for this long), ``api`` (which API to call, below).

``api`` picks the request's path and body and how the stream is read
(a token / the clean end / an error):

* ``chat`` (default): ``/v1/chat/completions``; a data event with non-empty
  ``content`` / ``data: [DONE]`` / ``data: {"error"...``.
* ``completions``: ``/v1/completions``; a data event with non-empty
  ``text`` / ``data: [DONE]`` / ``data: {"error"...``.
* ``responses``: ``/v1/responses``; ``event: response.output_text.delta`` /
  ``event: response.completed`` / ``event: error`` or ``response.failed``.
* ``messages``: ``/v1/messages``; ``event: content_block_delta`` /
  ``event: message_stop`` / ``event: error``.

Comment lines (``: ping``) are not events. ``events`` counts every event
but comments and ``[DONE]`` (``abort_after`` counts those). The data-only
parser (chat, completions) is the one chat always had, and costs the same.
"""

from __future__ import annotations

import json
import resource
import select
import socket
import struct
import sys
import time
from typing import Any
from urllib.parse import urlsplit

CONTENT = b'"content":"'
EMPTY_CONTENT = b'"content":""'
TEXT = b'"text":"'
EMPTY_TEXT = b'"text":""'

#: api -> its request path
PATHS = {
    "chat": "/v1/chat/completions",
    "completions": "/v1/completions",
    "responses": "/v1/responses",
    "messages": "/v1/messages",
}
#: named-event APIs: (the token event, the clean end, events that are errors)
NAMED_EVENTS = {
    "responses": (b"response.output_text.delta", b"response.completed", (b"error", b"response.failed")),
    "messages": (b"content_block_delta", b"message_stop", (b"error",)),
}
#: what the clean end is called, in the error of a stream that closed before it
END_NAMES = {"chat": "[DONE]", "completions": "[DONE]", "responses": "response.completed", "messages": "message_stop"}
#: a whole non-streamed answer holds this
ANSWER_MARKERS = {"chat": b'"choices"', "completions": b'"choices"', "responses": b'"output"', "messages": b'"content"'}


class Stream:
    __slots__ = (
        "index", "sock", "request", "state", "buf", "chunk_left", "sse", "status", "chunked",
        "started", "first_token", "ended", "events", "tokens", "done", "error", "aborted_at",
        "read_budget", "body_bytes", "content_length",
    )

    def __init__(self, index: int, sock: socket.socket, request: bytes) -> None:
        self.index = index
        self.sock = sock
        self.request = request
        self.state = "connect"
        self.buf = b""
        self.chunk_left = -1  # -1: expecting a chunk-size line
        self.sse = b""
        self.status = 0
        self.chunked = False
        self.started = time.monotonic()
        self.first_token: float | None = None
        self.ended: float | None = None
        self.events = 0
        self.tokens = 0
        self.done = False
        self.error: str | None = None
        self.aborted_at: float | None = None
        self.read_budget = 0.0
        self.body_bytes = 0
        self.content_length = -1


def request_body(api: str, model: str, streaming: bool, prompt: str) -> dict[str, Any]:
    """The smallest valid request of each API for ``model`` (no cap on the answer below the model's own)."""
    if api == "chat":
        return {"model": model, "stream": streaming, "messages": [{"role": "user", "content": prompt}]}
    if api == "completions":
        return {"model": model, "prompt": prompt, "stream": streaming}
    if api == "responses":
        return {"model": model, "input": prompt, "stream": streaming}
    if api == "messages":
        # max_tokens is required by the API; large, so the model string alone says how long the answer is
        return {"model": model, "max_tokens": 100_000, "messages": [{"role": "user", "content": prompt}], "stream": streaming}
    raise ValueError(f"unknown api {api!r}; one of {', '.join(PATHS)}")


def build_request(url: str, body: dict[str, Any], headers: dict[str, str] | None = None,
                  path: str = "/v1/chat/completions") -> bytes:
    parts = urlsplit(url)
    payload = json.dumps(body).encode()
    extra = "".join(f"{name}: {value}\r\n" for name, value in (headers or {}).items())
    return (
        f"POST {path} HTTP/1.1\r\nhost: {parts.hostname}:{parts.port}\r\n{extra}"
        f"content-type: application/json\r\ncontent-length: {len(payload)}\r\nconnection: close\r\n\r\n"
    ).encode() + payload


def run(spec: dict[str, Any]) -> dict[str, Any]:
    parts = urlsplit(spec["url"])
    address = (parts.hostname, parts.port)
    count = int(spec["streams"])
    ramp = float(spec.get("ramp_s", 0.0))
    abort_after = spec.get("abort_after")
    abort_rst = bool(spec.get("abort_rst", False))
    read_bps = spec.get("read_bps")
    rcvbuf = spec.get("rcvbuf")
    timeout = float(spec.get("timeout_s", 60.0))
    repeat_s = spec.get("repeat_s")
    streaming = bool(spec.get("stream", True))
    model = spec.get("model", "sim:tokens=50,itl_ms=20")
    api = spec.get("api", "chat")
    request_body(api, model, streaming, "")  # an unknown api fails here, before any connection
    path = PATHS[api]
    end_name = END_NAMES[api]
    answer_marker = ANSWER_MARKERS[api]

    epoll = select.epoll()
    by_fd: dict[int, Stream] = {}
    finished: list[Stream] = []
    begin = time.monotonic()
    deadline = begin + timeout
    repeat_until = begin + float(repeat_s) if repeat_s else None
    next_index = 0
    usage0 = resource.getrusage(resource.RUSAGE_SELF)

    def open_stream(index: int) -> None:
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setblocking(False)
        if rcvbuf:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, int(rcvbuf))
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        body = request_body(api, model.replace("{i}", str(index)), streaming, f"benchmark {index}")
        stream = Stream(index, sock, build_request(spec["url"], body, spec.get("headers"), path))
        try:
            sock.connect(address)
        except BlockingIOError:
            pass
        by_fd[sock.fileno()] = stream
        epoll.register(sock.fileno(), select.EPOLLOUT)

    def close(stream: Stream, *, rst: bool = False) -> None:
        fd = stream.sock.fileno()
        try:
            epoll.unregister(fd)
        except (OSError, ValueError):
            pass
        by_fd.pop(fd, None)
        if rst:
            stream.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        stream.sock.close()
        stream.ended = stream.ended or time.monotonic()
        finished.append(stream)
        if repeat_until is not None and time.monotonic() < repeat_until:
            nonlocal next_index
            open_stream(next_index)
            next_index += 1

    def on_data_events(stream: Stream) -> None:
        """Counts over every complete event of the read at once (C-speed ``count``/``find``, no per-event Python).

        Per event as before: a ``data:`` block is an event unless it is
        ``[DONE]``; it is a token when it holds a non-empty content/text
        (exactly one per chunk in these grammars); the first error event's
        text is kept. With the fast upstream this parser was most of core 1's
        CPU per token; now the load generator stays far below any gateway.
        """
        data = stream.sse
        end = data.rfind(b"\n\n")
        if end < 0:
            return
        stream.sse = data[end + 2:]
        region = b"\n\n" + data[:end]
        done = region.count(b"\n\ndata: [DONE]")
        if done:
            stream.done = True
        stream.events += region.count(b"\n\ndata:") - done
        error_at = region.find(b'\n\ndata: {"error"')
        if error_at >= 0:
            stream.error = region[error_at + 8:error_at + 202].decode(errors="replace")
        tokens = region.count(token_marker) - region.count(empty_marker)
        if tokens > 0:
            stream.tokens += tokens
            if stream.first_token is None:
                stream.first_token = time.monotonic()
        if abort_after is not None and stream.events >= abort_after and stream.aborted_at is None:
            stream.aborted_at = time.monotonic()
            close(stream, rst=abort_rst)

    token_marker, empty_marker = (TEXT, EMPTY_TEXT) if api == "completions" else (CONTENT, EMPTY_CONTENT)
    token_event, end_event, error_events = NAMED_EVENTS.get(api, (b"", b"", ()))

    def on_named_events(stream: Stream) -> None:
        """Blocks of ``event: <name>`` + ``data: ...`` lines; ``:`` comment lines are skipped."""
        data = stream.sse
        end = data.rfind(b"\n\n")
        if end < 0:
            return
        stream.sse = data[end + 2:]
        for event in data[:end].split(b"\n\n"):
            while event.startswith(b":"):  # comment lines before the event (or all of it)
                newline = event.find(b"\n")
                event = b"" if newline < 0 else event[newline + 1:]
            if not event.startswith(b"event:"):
                continue
            newline = event.find(b"\n")
            name = (event[6:] if newline < 0 else event[6:newline]).strip()
            stream.events += 1
            if name == token_event:
                stream.tokens += 1
                if stream.first_token is None:
                    stream.first_token = time.monotonic()
            elif name == end_event:
                stream.done = True
            elif name in error_events:
                stream.error = event[:200].decode(errors="replace")
        if abort_after is not None and stream.events >= abort_after and stream.aborted_at is None:
            stream.aborted_at = time.monotonic()
            close(stream, rst=abort_rst)

    on_sse = on_named_events if api in NAMED_EVENTS else on_data_events


    def on_body(stream: Stream, data: bytes) -> None:
        stream.body_bytes += len(data)
        if not streaming:
            stream.sse += data
            return
        stream.sse += data
        on_sse(stream)

    def on_readable(stream: Stream) -> None:
        limit = 65536
        if read_bps:
            if stream.read_budget < 1:
                return
            limit = max(1, min(limit, int(stream.read_budget)))
        try:
            data = stream.sock.recv(limit)
        except BlockingIOError:
            return
        except OSError as exc:
            stream.error = stream.error or f"recv: {exc}"
            close(stream)
            return
        if read_bps:
            stream.read_budget -= len(data)
        if not data:
            if not stream.done and streaming:
                stream.error = stream.error or f"closed before {end_name}"
            close(stream)
            return
        buf = stream.buf + data
        if stream.state == "head":
            end = buf.find(b"\r\n\r\n")
            if end < 0:
                stream.buf = buf
                return
            head = buf[:end].decode("latin-1").lower()
            stream.status = int(head.split(" ", 2)[1])
            stream.chunked = "transfer-encoding: chunked" in head
            for line in head.split("\r\n"):
                if line.startswith("content-length:"):
                    stream.content_length = int(line.split(":", 1)[1])
            if stream.status != 200:
                stream.error = f"status {stream.status}"
            stream.state = "body"
            buf = buf[end + 4:]
        if not stream.chunked:
            stream.buf = b""
            on_body(stream, buf)
            if not streaming and 0 <= stream.content_length <= stream.body_bytes:
                stream.done = answer_marker in stream.sse
                if stream.done and stream.first_token is None:
                    stream.first_token = time.monotonic()
                    stream.tokens = 1
                close(stream)
            return
        # chunked transfer decoding
        while stream.state == "body":
            if stream.chunk_left < 0:
                line_end = buf.find(b"\r\n")
                if line_end < 0:
                    break
                size = int(buf[:line_end].split(b";")[0], 16)
                buf = buf[line_end + 2:]
                if size == 0:
                    stream.state = "end"
                    if streaming and not stream.done:
                        stream.error = stream.error or f"body ended before {end_name}"
                    if not streaming:
                        stream.done = answer_marker in stream.sse
                        if stream.done:
                            stream.first_token = stream.first_token or time.monotonic()
                            stream.tokens = 1
                    close(stream)
                    return
                stream.chunk_left = size
            take = buf[: stream.chunk_left]
            buf = buf[len(take):]
            stream.chunk_left -= len(take)
            if take:
                on_body(stream, take)
                if stream.ended is not None:  # aborted inside on_body
                    return
            if stream.chunk_left == 0:
                if len(buf) < 2:
                    stream.chunk_left = 0
                    break
                buf = buf[2:]
                stream.chunk_left = -1
            elif not buf:
                break
        stream.buf = buf

    last_tick = time.monotonic()
    while (next_index < count or by_fd) and time.monotonic() < deadline:
        now = time.monotonic()
        while next_index < count and (ramp <= 0 or now >= begin + ramp * next_index / count):
            open_stream(next_index)
            next_index += 1
        if read_bps:
            elapsed = now - last_tick
            last_tick = now
            for stream in by_fd.values():
                stream.read_budget = min(stream.read_budget + read_bps * elapsed, read_bps)
        for fd, mask in epoll.poll(0.005 if (read_bps or next_index < count) else 0.05):
            stream = by_fd.get(fd)
            if stream is None:
                continue
            if stream.state == "connect":
                err = stream.sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
                if err:
                    stream.error = f"connect: {err}"
                    close(stream)
                    continue
                stream.sock.send(stream.request)
                stream.state = "head"
                epoll.modify(fd, select.EPOLLIN)
                continue
            on_readable(stream)
    for stream in list(by_fd.values()):
        stream.error = stream.error or "timeout"
        close(stream)
    usage1 = resource.getrusage(resource.RUSAGE_SELF)
    wall = time.monotonic() - begin
    completed = [s for s in finished if s.done and s.error is None]
    ttfts = sorted((s.first_token - s.started) * 1000 for s in finished if s.first_token is not None)
    return {
        "streams": len(finished),
        "completed": len(completed),
        "failed": sum(1 for s in finished if s.aborted_at is None and not (s.done and s.error is None)),
        "aborted": sum(1 for s in finished if s.aborted_at is not None),
        "errors": sorted({s.error for s in finished if s.error})[:5],
        "tokens": sum(s.tokens for s in finished),
        "events": sum(s.events for s in finished),
        "wall_s": wall,
        "ttft_ms": ttfts,
        "aborts": {s.index: s.aborted_at for s in finished if s.aborted_at is not None},
        "loadgen_cpu_s": (usage1.ru_utime - usage0.ru_utime) + (usage1.ru_stime - usage0.ru_stime),
    }


def main() -> None:
    print(json.dumps(run(json.loads(sys.argv[1]))))


if __name__ == "__main__":
    main()
