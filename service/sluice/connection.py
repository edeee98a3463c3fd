"""One request's ASGI connection under quart-trio, made safe for HTTP/1.1 keep-alive.

quart-trio serves each request with two tasks in one nursery: a *receiver*
that takes the ASGI messages (body parts, then ``http.disconnect``) and a
*sender* that runs the app and sends the response; whichever ends first
cancels the other. Measured on quart-trio 0.12 with hypercorn 0.18, that pair
breaks the connection around the response in three ways, and
:class:`KeepAliveHTTPConnection` fixes each at this seam (see
``docs/architecture.md``, "The HTTP connection"):

1. **The final send is cancelled by the disconnect it causes.** Inside the
   send of a response's last body message, hypercorn hands the app
   ``http.disconnect`` (the exchange is over) and then either closes the
   connection (the response said ``connection: close``, or the request body
   was left unread) or restarts the keep-alive timer. The receiver cancels
   the nursery on that disconnect, and the cancellation lands in hypercorn's
   close or timer start at its next checkpoint. So ``connection: close``
   never closed, idle keep-alive connections were never timed out, and a
   connection whose request body was not read was left open and deaf: the
   next request on it never got an answer. Here, once the final send has
   begun, the receiver leaves the cancelling to the sender, which does it
   after the send returns.
2. **A response sent before the request body was read** (404, 401 and
   other refusals decided from the head) leaves the connection between two
   requests' bytes. Before the response head goes out, the sender waits for
   the rest of the body, bounded by the app's ``MAX_CONTENT_LENGTH`` bytes
   and ``BODY_TIMEOUT`` seconds: drained, the connection serves its next
   request; not drained, the response says ``connection: close`` and
   hypercorn closes after it. The bytes are counted as they arrive; Quart
   keeps at most ``MAX_CONTENT_LENGTH`` of them, as for any request.
3. **``Content-Length`` with ``Transfer-Encoding``** is refused with 400 and
   ``connection: close`` before the app sees it (RFC 9112 section 6.3: a
   proxy in front may have framed the body differently, which is how request
   smuggling starts).

One more duty, for latency: when the client goes away mid-response, a
response body that can act on it (:class:`LeavesUpstream`, the relay) is told
at once, so it ends its upstream connections without waiting for the sender
and the relay's producer to be rescheduled and unwound. Under Sluice's
server (:mod:`sluice.http_server`) the connection's reader tells it, the
moment its read finds the client gone (the body registers with the
connection's :class:`~sluice.http_server.ClientWatch`); elsewhere (or if
that did not happen) the receiver does, on ``http.disconnect``, before
cancelling the request.

Invariants: a response goes out only after the request body is complete, or
with ``connection: close``; hypercorn's post-response work (close, or the
keep-alive timer) always runs; the sender still cancels the receiver when it
is done, and a client that goes away mid-response still cancels the sender.
"""

from __future__ import annotations

import math
from typing import Any, Protocol, runtime_checkable

import trio
from hypercorn.typing import ASGIReceiveCallable, ASGISendCallable, HTTPScope
from quart.utils import encode_headers
from quart.wrappers import Request, Response
from quart_trio.asgi import TrioASGIHTTPConnection

from . import errors
from .http_server import BODY_WRITER, CLIENT_WATCH


@runtime_checkable
class LeavesUpstream(Protocol):
    """A response body with an upstream to end at once when its client goes away."""

    def client_gone(self) -> None:
        """The client left mid-response: end the upstream now; must not block or raise."""


class KeepAliveHTTPConnection(TrioASGIHTTPConnection):
    """quart-trio's per-request connection handler with the three fixes above."""

    def __init__(self, app: Any, scope: HTTPScope) -> None:
        super().__init__(app, scope)
        # HTTP/2 streams end on their own (an unread body is reset with the stream)
        # and h2 forbids a connection header: only HTTP/1.x needs the wait.
        self._body_complete = not scope["http_version"].startswith("1")
        self._body_bytes = 0
        #: set when the body is complete or has passed the size limit: waiting longer is pointless
        self._body_settled = trio.Event()
        self._final_send_begun = False
        #: the request is refused from its head alone: answer at once and close
        self._refused_from_head = _has_conflicting_framing(scope)
        #: the response body being sent, when it has an upstream to end on a disconnect
        self._leaves_upstream: LeavesUpstream | None = None

    async def handle_messages(  # type: ignore[override]
        self, nursery: trio.Nursery, request: Request, receive: ASGIReceiveCallable
    ) -> None:
        limit: int | None = self.app.config["MAX_CONTENT_LENGTH"]
        while True:
            message = await receive()
            if message["type"] == "http.request":
                body = message.get("body", b"")
                self._body_bytes += len(body)
                request.body.append(body)
                if not message.get("more_body", False):
                    request.body.set_complete()
                    self._body_complete = True
                    self._body_settled.set()
                elif limit is not None and self._body_bytes > limit:
                    self._body_settled.set()
            elif message["type"] == "http.disconnect":
                break
        if not self._final_send_begun:
            if self._leaves_upstream is not None:
                self._leaves_upstream.client_gone()
            nursery.cancel_scope.cancel()

    async def handle_request(  # type: ignore[override]
        self, nursery: trio.Nursery, request: Request, send: ASGISendCallable
    ) -> None:
        async def send_in_order(message: Any) -> None:
            if message["type"] == "http.response.start":
                if not self._body_complete:
                    message = await self._after_request_body(message)
            elif message["type"] == "http.response.body" and not message.get("more_body", False):
                self._final_send_begun = True
            await send(message)

        if self._refused_from_head:
            await _send_error(send_in_order, errors.ConflictingFraming(
                "The request has both Content-Length and Transfer-Encoding; send one of them."
            ))
            nursery.cancel_scope.cancel()
            return
        await super().handle_request(nursery, request, send_in_order)

    async def _send_response(self, send: ASGISendCallable, response: Any) -> None:
        # Not isinstance(..., LeavesUpstream): a runtime-checkable Protocol's
        # check costs ~9 us a request here, an attribute lookup ~0.2 us.
        if not (isinstance(response, Response) and callable(getattr(response.response, "client_gone", None))):
            await super()._send_response(send, response)
            return
        body = self._leaves_upstream = response.response
        state = self.scope.get("state") or {}
        watch = state.get(CLIENT_WATCH)
        write_body = state.get(BODY_WRITER) if self.scope["http_version"] in ("1.0", "1.1") else None
        if watch is not None:
            watch.add(body.client_gone)
        try:
            if write_body is None:
                await super()._send_response(send, response)
            else:
                await _send_streamed(send, response, write_body)
        finally:
            if watch is not None:
                watch.discard(body.client_gone)

    async def _after_request_body(self, start: Any) -> Any:
        """Wait (bounded) for the unread rest of the request body; if it does not come, close after the response."""
        limit: int | None = self.app.config["MAX_CONTENT_LENGTH"]
        announced = _content_length(self.scope)
        could_be_served = announced is None or limit is None or announced <= limit
        if could_be_served and not self._refused_from_head:
            timeout: float | None = self.app.config["BODY_TIMEOUT"]
            with trio.move_on_after(math.inf if timeout is None else timeout):
                await self._body_settled.wait()
        if self._body_complete:
            return start
        headers = [(name, value) for name, value in start.get("headers", ()) if name.lower() != b"connection"]
        return {**start, "headers": [*headers, (b"connection", b"close")]}


async def _send_streamed(send: ASGISendCallable, response: Response, write_body: Any) -> None:
    """Quart's ``_send_response`` for a streamed body, its chunks written by the server's ``write_body``.

    The head and the end go through ASGI as in Quart (the end is what
    :meth:`KeepAliveHTTPConnection.handle_request` watches for); each chunk
    in between skips the per-message layers (see :mod:`sluice.http_server`).
    """
    await send({"type": "http.response.start", "status": response.status_code, "headers": encode_headers(response.headers)})
    async with response.response as chunks:
        async for data in chunks:
            if data:
                await write_body(data)
    await send({"type": "http.response.body", "body": b"", "more_body": False})


def _has_conflicting_framing(scope: HTTPScope) -> bool:
    if not scope["http_version"].startswith("1"):
        return False  # HTTP/2 and 3 frame bodies themselves; h2 refuses transfer-encoding
    names = {name.lower() for name, _ in scope["headers"]}
    return b"transfer-encoding" in names and b"content-length" in names


def _content_length(scope: HTTPScope) -> int | None:
    for name, value in scope["headers"]:
        if name.lower() == b"content-length":
            try:
                return int(value)
            except ValueError:
                return None
    return None


async def _send_error(send: Any, error: errors.SluiceError) -> None:
    body = error.to_json_bytes()
    await send({
        "type": "http.response.start",
        "status": error.status,
        "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())],
    })
    await send({"type": "http.response.body", "body": body, "more_body": False})
