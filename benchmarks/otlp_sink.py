"""An OTLP/HTTP sink for the ``sluice-otel`` gateway: answers 200 to ``POST /v1/traces`` and discards it.

``python -m benchmarks.otlp_sink PORT``. Keep-alive HTTP/1.1, so the
gateway's exporter reuses one connection as it would with a collector.
``GET /stats`` says how many exports and bytes arrived (a check that spans
were exported, not dropped). It runs on the load core: the gateway's CPU
counts the export (serialising and sending, in the SDK's own thread), not
what a collector does with it.
"""

from __future__ import annotations

import http.server
import json
import sys


class _Sink(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    exports = 0
    received = 0

    def do_POST(self) -> None:  # noqa: N802 (the stdlib's name)
        length = int(self.headers.get("content-length") or 0)
        self.rfile.read(length)
        type(self).exports += 1
        type(self).received += length
        self.send_response(200)
        self.send_header("content-type", "application/x-protobuf")
        self.send_header("content-length", "0")
        self.end_headers()

    def do_GET(self) -> None:  # noqa: N802
        body = json.dumps({"exports": type(self).exports, "bytes": type(self).received}).encode()
        self.send_response(200)
        self.send_header("content-type", "application/json")
        self.send_header("content-length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: object) -> None:
        pass


def main() -> None:
    server = http.server.ThreadingHTTPServer(("127.0.0.1", int(sys.argv[1])), _Sink)
    server.serve_forever()


if __name__ == "__main__":
    main()
