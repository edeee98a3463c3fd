"""The upstream client: an httpx2 shell that opens requests, with retries before the first byte.

Why httpx2 and not httpx 0.28.1: httpx2 is the maintained fork with the same
API; its pool is single-pass (httpcore 1.0.9 rescans its pool per request,
O(connections^2)) and a cancelled request does not leave a dead connection
in the pool (httpcore issue 1093). ``tests/test_upstream_pool.py`` cancels
many requests mid-body and checks the pool still serves.

Invariants:

* Every response this module returns is open and 2xx; the caller owns it and
  must ``aclose()`` it. Every response it does not return is closed before
  this module lets go of it, also when the calling task is cancelled.
* Retries run only here, only before any byte of a body was handed out, and
  only for connect errors/timeouts and 429/500/502/503/504.
* The API key goes only into the ``Authorization`` header (``x-api-key`` for
  a deployment of Anthropic's API); it is never logged
  and never part of an error message the gateway writes. Upstream text that
  is relayed (error bodies, messages quoting them) is scrubbed by the app on
  the way out (:mod:`sluice.redaction`).
* An upstream 401/403 means the gateway's own credentials were refused: it
  becomes :class:`~sluice.errors.UpstreamAuthFailed` (502), never a 401 that
  would tell the client its own key is wrong.
* Every upstream socket's kernel receive buffer is capped (``SO_RCVBUF``,
  ``receive_buffer`` bytes, set through httpx2's ``socket_options`` right
  after connect) unless ``receive_buffer`` is 0: with autotuning, a stream
  whose client stopped reading lets the upstream park megabytes in this
  host's kernel. The cap only stops autotuning from growing the buffer; it
  never shrinks it below the size the connection started with
  (:func:`upstream_receive_buffer`): the window was advertised at connect,
  and a smaller buffer afterwards makes the kernel prune data the upstream
  was allowed to send (measured here: 8 KiB after connect turned 0.7 s
  streams into 5 s ones, with ``RcvPruned`` counting; 64 KiB, the host's
  starting size, did not).
"""

from __future__ import annotations

import json
import socket
import time
from collections.abc import Callable
from typing import Any

import httpx2
import trio
from httpx2._client import BoundAsyncStream

from .errors import (
    SluiceError,
    UpstreamAuthFailed,
    UpstreamError,
    UpstreamStatusError,
    UpstreamTimeout,
    UpstreamUnavailable,
)
from .policies import RETRIABLE_STATUSES, RetriableUpstreamError, RetryPolicy, parse_retry_after
from .upstream_pool import UpstreamTransport

#: error bodies larger than this are cut; an error message is never megabytes
_MAX_ERROR_BODY = 64 * 1024
#: told before a retry: the failed attempt's code (``http_503``...) and the new attempt's number (2, 3...)
OnRetry = Callable[[str, int], None]


class UpstreamClient:
    """One pooled connection to an OpenAI-compatible upstream (``base_url`` ends in ``/v1``)."""

    def __init__(
        self,
        base_url: str,
        *,
        api_key: str | None,
        max_connections: int,
        connect_timeout: float,
        retry_policy: RetryPolicy,
        key_header: str = "authorization",
        receive_buffer: int = 0,
        on_failure: Callable[[str], None] | None = None,
    ) -> None:
        #: told the code of every failed attempt, retried or not (``http_503``, ``upstream_unavailable``...)
        self.on_failure = on_failure
        headers = {"accept-encoding": "identity"}  # we relay bytes; never pay to decompress
        if api_key and key_header == "x-api-key":
            headers["x-api-key"] = api_key  # Anthropic's own API
        elif api_key:
            headers["authorization"] = f"Bearer {api_key}"
        self.base_url = base_url
        self.retry_policy = retry_policy
        self._transport = UpstreamTransport(
            # Size the pool to the gateway's stream cap: stream N+1 must not
            # queue behind a pool limit the gateway itself does not have.
            limits=httpx2.Limits(max_connections=max_connections, max_keepalive_connections=max_connections),
            socket_options=(
                [(socket.SOL_SOCKET, socket.SO_RCVBUF, upstream_receive_buffer(receive_buffer))]
                if receive_buffer
                else None
            ),
        )
        # The client builds requests (base URL, default headers, timeouts) and
        # owns the transport's lifetime; requests are sent on the transport
        # itself (:func:`_send`).
        self._client = httpx2.AsyncClient(
            base_url=base_url + "/",
            headers=headers,
            # The read deadline is the relay's (first token, then idle between
            # reads), managed with one moving cancel scope per stream.
            timeout=httpx2.Timeout(connect=connect_timeout, read=None, write=connect_timeout, pool=connect_timeout),
            transport=self._transport,
        )

        # Requests to one API path differ only in their body: build each path's
        # URL, headers and timeouts once (``build_request`` merges and parses
        # them anew each time: ~160 us a request, against ~25 us for a Request
        # from parts).
        self._templates: dict[str, tuple[httpx2.URL, list[tuple[bytes, bytes]], dict[str, Any]]] = {}

    def post_request(self, path: str, body: bytes, headers: list[tuple[bytes, bytes]] | None = None) -> httpx2.Request:
        """The POST of ``body`` to ``path`` (relative to the base URL), as ``build_request`` would make it."""
        template = self._templates.get(path)
        if template is None:
            built = self._client.build_request(
                "POST", path.lstrip("/"), content=b"", headers={"content-type": "application/json"}
            )
            template = (built.url, [(n, v) for n, v in built.headers.raw if n.lower() != b"content-length"], built.extensions)
            self._templates[path] = template
        url, template_headers, extensions = template
        return httpx2.Request(
            "POST", url, content=body, headers=template_headers + headers if headers else template_headers,
            extensions=dict(extensions),
        )

    def chat_request(self, body: bytes) -> httpx2.Request:
        """The POST for one chat completion."""
        return self.post_request("/chat/completions", body)

    async def aclose(self) -> None:
        await self._client.aclose()

    async def open_stream(
        self,
        path: str,
        body: bytes,
        *,
        headers: list[tuple[bytes, bytes]] | None = None,
        on_attempt: Any = None,
        on_retry: OnRetry | None = None,
    ) -> httpx2.Response:
        """POST a streaming request; return the open 2xx response, retrying what qualifies."""
        return await self._with_retries(self._open_stream_once, (path, body, headers), on_attempt, on_retry)

    async def complete(
        self,
        path: str,
        body: bytes,
        *,
        headers: list[tuple[bytes, bytes]] | None = None,
        on_attempt: Any = None,
        on_retry: OnRetry | None = None,
    ) -> httpx2.Response:
        """POST a non-streaming request; return the 2xx response with its body read."""
        return await self._with_retries(self._complete_once, (path, body, headers), on_attempt, on_retry)

    async def open_chat_stream(self, body: bytes, *, on_attempt: Any = None) -> httpx2.Response:
        return await self.open_stream("/chat/completions", body, on_attempt=on_attempt)

    async def chat_completion(self, body: bytes, *, on_attempt: Any = None) -> httpx2.Response:
        return await self.complete("/chat/completions", body, on_attempt=on_attempt)

    async def forward(
        self,
        method: str,
        path: str,
        body: bytes,
        headers: list[tuple[bytes, bytes]],
        *,
        on_attempt: Any = None,
        on_retry: OnRetry | None = None,
    ) -> httpx2.Response:
        """Relay one request as it is (any method, any ``/v1`` path); the upstream's answer, whatever its status.

        Connect failures and retriable statuses are retried like any request;
        when retries are spent, the last answer is returned as it is.
        """
        try:
            return await self._with_retries(self._forward_once, (method, path, body, headers), on_attempt, on_retry)
        except _Relayed as relayed:
            return relayed.response

    async def _forward_once(self, args: tuple[str, str, bytes, list[tuple[bytes, bytes]]]) -> httpx2.Response:
        method, path, body, headers = args
        request = self._client.build_request(method, path.lstrip("/"), content=body or None, headers=headers)
        response = await _send(self._transport, request, stream=False)
        if response.status_code in RETRIABLE_STATUSES:
            raise RetriableUpstreamError(_Relayed(response), retry_after=parse_retry_after(response.headers))
        return response

    async def list_models(self) -> httpx2.Response:
        return await self._with_retries(self._get_once, "models", None)

    async def _with_retries(
        self, attempt_once: Any, arg: Any, on_attempt: Any, on_retry: OnRetry | None = None
    ) -> httpx2.Response:
        # The first attempt runs without tenacity (most succeed, and its
        # machinery costs ~60 us a request); tenacity takes over from its
        # failure, counting it as its own first attempt.
        started = time.monotonic()
        try:
            return await self._attempt(attempt_once, arg, on_attempt)
        except RetriableUpstreamError as exc:
            first_failure = exc
        failed = failure_code(first_failure)  # the last failed attempt's code, for ``on_retry``
        try:
            async for attempt in self.retry_policy.retrying(after=first_failure, started=started):
                with attempt:
                    if on_retry is not None:
                        on_retry(failed, attempt.retry_state.attempt_number)
                    try:
                        return await self._attempt(attempt_once, arg, on_attempt)
                    except (RetriableUpstreamError, SluiceError) as exc:
                        failed = failure_code(exc)
                        raise
        except RetriableUpstreamError as exc:
            raise exc.cause from None
        raise AssertionError("unreachable: tenacity either returns or raises")  # pragma: no cover

    async def _attempt(self, attempt_once: Any, arg: Any, on_attempt: Any) -> httpx2.Response:
        if on_attempt is not None:
            on_attempt()
        try:
            return await attempt_once(arg)
        except (RetriableUpstreamError, SluiceError) as exc:
            if self.on_failure is not None:
                self.on_failure(failure_code(exc))
            raise

    async def _open_stream_once(self, args: tuple[str, bytes, Any]) -> httpx2.Response:
        request = self.post_request(*args)
        response = await _send(self._transport, request, stream=True)
        if response.is_success:
            return response
        try:
            if _small(response):
                await response.aread()
        except httpx2.HTTPError:
            pass  # the status alone still tells the client what happened
        finally:
            with trio.CancelScope(shield=True):
                await response.aclose()
        raise _status_failure(response)

    async def _complete_once(self, args: tuple[str, bytes, Any]) -> httpx2.Response:
        request = self.post_request(*args)
        response = await _send(self._transport, request, stream=False)
        if response.is_success:
            return response
        raise _status_failure(response)

    async def _get_once(self, path: str) -> httpx2.Response:
        response = await _send(self._transport, self._client.build_request("GET", path), stream=False)
        if response.is_success:
            return response
        raise _status_failure(response)


class _Relayed(UpstreamError):
    """A forwarded request's retriable answer, returned as it is once retries are spent."""

    def __init__(self, response: httpx2.Response) -> None:
        super().__init__(f"The upstream answered {response.status_code}.", upstream_status=response.status_code)
        self.response = response


def upstream_receive_buffer(requested: int, tcp_rmem: str = "/proc/sys/net/ipv4/tcp_rmem") -> int:
    """The ``SO_RCVBUF`` to set after connect: ``requested``, but not below the starting size.

    A new socket starts with ``tcp_rmem``'s default (the middle value; the
    kernel reports twice what is set, so half of it is what setting it
    again asks for).
    """
    try:
        with open(tcp_rmem) as sysctl:
            starting = int(sysctl.read().split()[1])
    except (OSError, ValueError, IndexError):
        return requested
    return max(requested, starting // 2)


async def _send(transport: httpx2.AsyncBaseTransport, request: httpx2.Request, *, stream: bool) -> httpx2.Response:
    """One attempt, sent on the transport; map transport failures to retriable gateway errors.

    ``AsyncClient.send`` would add, per request, an auth flow (an async
    generator; the gateway's credentials are default headers), a redirect
    check (never followed), cookie extraction into the client's jar (never
    sent: requests are built without the jar, and a jar shared by every
    client of the gateway must not hold one client's upstream cookies) and a
    log call: ~85 us of a 1-token request's ~5.9 ms (issue 17). What the
    gateway reads of a response is left as the client leaves it: the
    ``request``, and the stream wrapped in httpx2's ``BoundAsyncStream``,
    through which :mod:`sluice.upstream_body` finds the connection
    (``tests/test_upstream_pool.py`` pins both).
    """
    started = time.perf_counter()
    try:
        response = await transport.handle_async_request(request)
        response.request = request
        response.stream = BoundAsyncStream(response.stream, start=started)  # type: ignore[arg-type]
        if not stream:
            try:
                await response.aread()
            except BaseException:
                await response.aclose()  # as AsyncClient.send does
                raise
        return response
    except httpx2.TimeoutException as exc:
        raise RetriableUpstreamError(UpstreamTimeout(f"The upstream did not answer in time ({type(exc).__name__}).")) from None
    except (httpx2.ConnectError, httpx2.RemoteProtocolError, httpx2.ReadError, httpx2.WriteError) as exc:
        raise RetriableUpstreamError(UpstreamUnavailable(f"Could not reach the upstream ({type(exc).__name__}).")) from None
    except httpx2.HTTPError as exc:
        raise UpstreamUnavailable(f"Upstream request failed ({type(exc).__name__}).") from None


def failure_code(exc: BaseException) -> str:
    """A short label for a failed attempt: ``http_<upstream status>`` or the error's code."""
    cause = exc.cause if isinstance(exc, RetriableUpstreamError) else exc
    if isinstance(cause, UpstreamError) and cause.upstream_status is not None:
        return f"http_{cause.upstream_status}"
    if isinstance(cause, SluiceError) and cause.code:
        return cause.code
    return type(cause).__name__


def _small(response: httpx2.Response) -> bool:
    length = response.headers.get("content-length")
    return length is None or (length.isdigit() and int(length) <= _MAX_ERROR_BODY)


def _status_failure(response: httpx2.Response) -> Exception:
    """The client-visible error for an upstream non-2xx; retriable ones wrapped for tenacity."""
    status = response.status_code
    body: dict[str, Any] | None = None
    try:
        parsed = json.loads(response.content[:_MAX_ERROR_BODY]) if response.content else None
    except (ValueError, httpx2.ResponseNotRead):
        parsed = None
    if isinstance(parsed, dict) and isinstance(parsed.get("error"), dict):
        body = {"error": parsed["error"]}
    headers: dict[str, str] = {}
    retry_after = parse_retry_after(response.headers)
    for name in ("retry-after", "retry-after-ms"):
        if name in response.headers:
            headers[name] = response.headers[name]
    error: UpstreamError
    if status in (401, 403):
        # The operator's key, not the client's: say so without the provider's
        # body (it may quote the key, and it names "your API key").
        error = UpstreamAuthFailed(
            f"The gateway's credentials for the upstream were refused (upstream status {status}).",
            upstream_status=status,
            headers=headers,
        )
    elif status < 500:
        # The client's problem as the provider described it: relayed as it is.
        error = UpstreamStatusError(
            status, f"The upstream answered {status}.", body=body, upstream_status=status, headers=headers
        )
    else:
        # The provider failed: the gateway answers 502 (504 for a gateway timeout
        # upstream) in its own words, naming what the provider said.
        said = body["error"].get("message") if body else None
        message = f"The upstream failed with {status} {response.reason_phrase}".rstrip()
        error = UpstreamStatusError(
            504 if status == 504 else 502,
            f"{message}: {said}" if said else f"{message}.",
            upstream_status=status,  # for metrics: what the provider said
            headers=headers,
        )
    if status in RETRIABLE_STATUSES:
        return RetriableUpstreamError(error, retry_after=retry_after)
    return error
