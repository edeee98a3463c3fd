"""CPU per chunk of reading a chunked body through ``UpstreamBody``: this version against another.

``python -m benchmarks.upstream_body_feed [--revs 5fd4eaf,59cc022] [--with-head BYTES] [--rounds 5] [--responses 100]``

A raw-socket upstream in a child process (pinned to core 1) answers every
request with the same bytes: a head, then ``CHUNKS`` chunks of one chat
token each (the shape of an upstream that sends a chunk per token), all
written at once so the reader's reads carry many chunks and end inside
one. With ``with_head`` bytes of the body written together with the head
(then a short pause), those bytes come in the read that carries the head,
and so sit in h11's buffer when ``UpstreamBody`` starts.

The reader (this process, pinned to core 0) reads each body with
``UpstreamBody`` of several versions, interleaved in rounds: each of
``--revs`` (``sluice/upstream_body.py`` at that revision, loaded from git:
5fd4eaf fed h11 in lockstep until a read ended between chunks, 59cc022 fed
h11 the head's read and then up to the end of the chunk it left open) and
the working tree. Reported: this process's CPU (user + system) per chunk,
and how many ``h11.Data`` events h11 produced per response.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from typing import Any

import h11
import httpx2
import trio

import sluice.upstream_body as after_module

CHUNKS = 512
EVENT = b'data: {"id":"chatcmpl-1","object":"chat.completion.chunk","created":1,"model":"m","choices":[{"index":0,"delta":{"content":"tok%d"},"finish_reason":null}]}\n\n'
HEAD = b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ntransfer-encoding: chunked\r\n\r\n"


def body_wire() -> bytes:
    events = [EVENT % n for n in range(CHUNKS)]
    return b"".join(b"%x\r\n%s\r\n" % (len(event), event) for event in events) + b"0\r\n\r\n"


def read_request(connection: socket.socket, buffer: bytes) -> bytes | None:
    """Read one request (head and content-length body); what follows it, or ``None`` at the end."""
    while b"\r\n\r\n" not in buffer:
        data = connection.recv(65536)
        if not data:
            return None
        buffer += data
    head, _, buffer = buffer.partition(b"\r\n\r\n")
    length = next((int(line.split(b":")[1]) for line in head.split(b"\r\n") if line.lower().startswith(b"content-length")), 0)
    while len(buffer) < length:
        buffer += connection.recv(65536)
    return buffer[length:]


def serve(port_file: str, with_head: int) -> None:
    """The upstream: answers every request on every connection with the same bytes."""
    wire = body_wire()
    listener = socket.create_server(("127.0.0.1", 0))
    with open(port_file + ".tmp", "w") as f:
        f.write(str(listener.getsockname()[1]))
    os.rename(port_file + ".tmp", port_file)
    while True:
        connection, _ = listener.accept()
        connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        rest = b""
        while (after := read_request(connection, rest)) is not None:
            rest = after
            connection.sendall(HEAD + wire[:with_head])
            time.sleep(0.002)  # so the rest comes in a later read than the head
            connection.sendall(wire[with_head:])
        connection.close()


def load_revision(rev: str) -> Any:
    """``sluice/upstream_body.py`` as it was at ``rev``, with that revision's chunked decoder."""
    directory = tempfile.mkdtemp()

    def load(path: str, name: str, replace: tuple[bytes, bytes] | None = None) -> Any:
        source = subprocess.run(["git", "show", f"{rev}:service/sluice/{path}"], check=True, capture_output=True).stdout
        if replace:
            source = source.replace(*replace)
        file = os.path.join(directory, os.path.basename(path))
        with open(file, "wb") as f:
            f.write(source)
        spec = importlib.util.spec_from_file_location(name, file)
        assert spec is not None and spec.loader is not None
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        spec.loader.exec_module(module)
        return module

    chunked = f"sluice._chunked_{rev}"
    load("wire/chunked.py", chunked)
    return load("upstream_body.py", f"sluice._upstream_body_{rev}", (b"from .wire.chunked import", f"from {chunked} import".encode()))


def cpu() -> float:
    return time.process_time()


async def measure(url: str, readers: dict[str, Any], rounds: int, responses: int) -> dict[str, list[tuple[float, float]]]:
    results: dict[str, list[tuple[float, float]]] = {name: [] for name in readers}
    data_events = 0
    original = h11.Connection.next_event

    def counting(self: h11.Connection) -> Any:
        nonlocal data_events
        event = original(self)
        data_events += isinstance(event, h11.Data)
        return event

    h11.Connection.next_event = counting  # type: ignore[method-assign]
    expected = b"".join(EVENT % n for n in range(CHUNKS))
    async with httpx2.AsyncClient() as client:
        for _ in range(rounds):
            for name, reader in readers.items():
                data_events = 0
                start = cpu()
                for _ in range(responses):
                    async with client.stream("POST", url, content=b"{}") as response:
                        body = reader(response)
                        assert body.direct
                        parts = []
                        while part := await body.read():
                            parts.append(part)
                        await body.aclose()
                    assert b"".join(parts) == expected
                spent = cpu() - start
                results[name].append((spent / (responses * CHUNKS) * 1e6, data_events / responses))
    h11.Connection.next_event = original  # type: ignore[method-assign]
    return results


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--revs", default="5fd4eaf,59cc022", help="git revisions to compare with the working tree")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--responses", type=int, default=40)
    parser.add_argument("--with-head", type=int, default=0, help="body bytes written with the head")
    parser.add_argument("--serve", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve:
        serve(args.serve, args.with_head)
        return
    port_file = os.path.join(tempfile.mkdtemp(), "port")
    server = subprocess.Popen(
        ["taskset", "-c", "1", sys.executable, "-m", "benchmarks.upstream_body_feed", "--serve", port_file, "--with-head", str(args.with_head)]
    )
    try:
        while not os.path.exists(port_file):
            time.sleep(0.05)
        url = f"http://127.0.0.1:{open(port_file).read()}/v1/chat/completions"
        os.sched_setaffinity(0, {0})
        readers = {rev: load_revision(rev).UpstreamBody for rev in args.revs.split(",") if rev}
        readers["working tree"] = after_module.UpstreamBody
        results = trio.run(measure, url, readers, args.rounds, args.responses)
    finally:
        server.kill()
        server.wait()
    print(f"{CHUNKS} chunks per body, {len(body_wire())} bytes, {args.with_head} written with the head; {args.responses} responses per round")
    for name, rounds in results.items():
        per_chunk = [round(us, 2) for us, _ in rounds]
        print(f"{name:12} us/chunk median {statistics.median(per_chunk):6.2f}  rounds {per_chunk}  h11 Data events/response {rounds[-1][1]:.0f}")


if __name__ == "__main__":
    main()
