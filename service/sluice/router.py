"""Routing: which deployment serves a request, and what happens when one fails.

A public model name (what clients send) maps to a :class:`ModelRoute`: one
or more :class:`Deployment` s (a base URL, a key, the provider's model
name, a weight) and, optionally, fallback models. With no models
configured the router has one *passthrough* route: every model name goes to
the one upstream (``upstream_base_url`` or the embedded simulator) as it is.
A configured model named ``"*"`` catches every name not configured
otherwise, and sends it upstream as the client wrote it.

Invariants:

* Selection is local and cheap (no I/O): ``least_busy`` picks the fewest
  active streams per unit of weight, ``weighted`` picks at random by
  weight; deployments in cooldown are tried only when nothing else is left.
* A request fails over to the next deployment, then to each fallback model,
  only on failures a different provider might not have (unreachable,
  timeout, 429, 5xx, 401/403/404 from a misconfigured deployment), and only
  before the first byte of a body: :meth:`Router.open_stream` returns an
  open 2xx stream or raises the last failure.
* Every :class:`OpenedStream` counts as active on its deployment until its
  :meth:`OpenedStream.aclose`, which closes the upstream response; it is
  idempotent and shielded, so the cancellation of a client disconnect still
  closes the provider's socket. :meth:`OpenedStream.shut_down` ends an
  HTTP/1.1 upstream connection at once, without awaiting (the client is gone).
"""

from __future__ import annotations

import json
import os
import random
import socket
from collections import deque
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass, field
import functools
from typing import Protocol, TypeVar

import httpx2
import trio

from . import errors
from .config import ModelConfig, Settings
from .upstream import UpstreamClient
from .wire.grammar import ParsedRequest

#: percentile names allowed for ``hedge_after``
_PERCENTILES = {"p50": 0.50, "p90": 0.90, "p95": 0.95, "p99": 0.99}
_T = TypeVar("_T")

#: a model named this serves every model name not configured otherwise, as the client named it
WILDCARD = "*"
#: the first-token window each model keeps for percentile hedging
_TTFT_WINDOW = 512


class ModelNotFound(errors.NotFound):
    code = "model_not_found"


class ModelNotOnThisAPI(errors.InvalidRequest):
    """The model exists, but none of its deployments serves the API the client called."""

    code = "model_not_supported"


#: how each API is named in messages to clients
API_TITLES = {
    "chat": "Chat Completions", "completions": "Completions", "responses": "Responses",
    "messages": "Messages", "embeddings": "Embeddings",
}


@dataclass(eq=False)
class Deployment:
    """One provider endpoint serving a public model."""

    name: str
    client: UpstreamClient
    #: the provider's model name; ``None`` = the name the client sent
    upstream_model: str | None
    weight: float = 1.0
    #: the client APIs it serves (``chat``, ``responses``, ``messages``...)
    apis: frozenset[str] = frozenset({"chat", "completions", "responses", "messages", "embeddings"})
    #: whose API it speaks (``gen_ai.provider.name`` in traces)
    provider: str = "openai"
    active: int = 0
    consecutive_failures: int = 0
    cooldown_until: float = float("-inf")

    def cooling(self, now: float) -> bool:
        return now < self.cooldown_until


@dataclass(eq=False)
class ModelRoute:
    name: str
    deployments: list[Deployment]
    strategy: str = "least_busy"
    fallbacks: tuple[str, ...] = ()
    hedge_after_ms: float | None = None
    hedge_after_percentile: float | None = None
    ttft_seconds: deque[float] = field(default_factory=lambda: deque(maxlen=_TTFT_WINDOW))

    def hedge_delay(self, min_samples: int) -> float | None:
        """Seconds after the request's start to start a hedge; ``None``: no hedging."""
        if len(self.deployments) < 2:
            return None
        if self.hedge_after_percentile is not None and len(self.ttft_seconds) >= min_samples:
            ordered = sorted(self.ttft_seconds)
            return ordered[min(len(ordered) - 1, int(self.hedge_after_percentile * len(ordered)))]
        if self.hedge_after_ms is not None:
            return self.hedge_after_ms / 1000.0
        return None


class OpenedStream:
    """An open 2xx upstream stream and the deployment it counts against."""

    __slots__ = ("response", "deployment", "_closed")

    def __init__(self, response: httpx2.Response, deployment: Deployment) -> None:
        self.response = response
        self.deployment = deployment
        self._closed = False
        deployment.active += 1

    def shut_down(self) -> None:
        """The client is gone: end the upstream connection now, synchronously (HTTP/1.1 only).

        ``shutdown(SHUT_RDWR)`` sends the provider its FIN at once, from
        whichever task learns of the disconnect first, rather than when the
        producer has been scheduled, unwound and has taken httpcore2's
        connection lock. The descriptor stays open (a task blocked on it is
        not disturbed) until :meth:`aclose` closes the response as always; a
        connection shut down this way can never be reused: httpcore2 finds it
        readable (at EOF) and discards it. An HTTP/2 connection carries other
        streams: it is left to :meth:`aclose`, which resets only this one.
        """
        response = self.response
        if self._closed or response.extensions.get("http_version") != b"HTTP/1.1":
            return
        network_stream = response.extensions.get("network_stream")
        if network_stream is None:
            return
        try:
            network_stream.get_extra_info("socket").shutdown(socket.SHUT_RDWR)
        except (OSError, AttributeError, AssertionError):
            pass  # already gone, or a transport without a socket of its own: aclose() handles it

    async def aclose(self) -> None:
        if self._closed:
            return
        self._closed = True
        self.deployment.active -= 1
        # One scope, shielded from the caller's cancellation and bounded by its own
        # deadline (which a shield does not block): a close never hangs the release.
        with trio.CancelScope(shield=True, deadline=trio.current_time() + 1.0):
            await self.response.aclose()


@dataclass(frozen=True, slots=True)
class UpstreamCall:
    """Which client API a request is, where it goes under a deployment's base URL, and its extra headers."""

    api: str
    path: str
    headers: list[tuple[bytes, bytes]] | None = None


CHAT_CALL = UpstreamCall("chat", "/chat/completions")


class AttemptObserver(Protocol):
    """What one request hears of its own upstream attempts (its trace); called only on a retry or fallback."""

    def retrying(self, deployment: Deployment, code: str, attempt: int) -> None: ...

    def falling_back(self, failed: Deployment, error: errors.SluiceError, to: Deployment) -> None: ...


@dataclass
class RouterEvents:
    """What the router reports (wired to the Prometheus metrics by the app)."""

    #: every failed upstream attempt, retried or not, by code (``http_503``, ``upstream_unavailable``...)
    attempt_failed: Callable[[str], None] = lambda code: None
    #: a deployment gave up on a request (after its retries) and the router moves on
    deployment_failed: Callable[[Deployment, errors.SluiceError], None] = lambda deployment, error: None
    fell_back: Callable[[Deployment], None] = lambda deployment: None
    cooled_down: Callable[[Deployment], None] = lambda deployment: None


def fails_over(error: errors.SluiceError) -> bool:
    """Would another deployment plausibly succeed where this one failed?

    Yes for any failure of the upstream's making (unreachable, late, its
    own key refused: another deployment has another key), except a status
    that says the client's request itself is wrong.
    """
    if isinstance(error, errors.UpstreamStatusError):
        return error.status in (404, 408, 429) or error.status >= 500
    return isinstance(error, errors.UpstreamError)


class Router:
    """The model table of one worker, with the health of its deployments."""

    def __init__(self, settings: Settings, default_base_url: str, events: RouterEvents | None = None) -> None:
        self._settings = settings
        self.events = events or RouterEvents()
        self._clients: dict[tuple[str, str | None, str], UpstreamClient] = {}
        self.routes: dict[str, ModelRoute] = {}
        self.passthrough: ModelRoute | None = None
        if settings.models:
            for model in settings.models:
                self.routes[model.name] = self._build_route(model)
        else:
            key = settings.upstream_api_key.get_secret_value() if settings.upstream_api_key else None
            client = self._client(default_base_url, key)
            self.passthrough = ModelRoute("*", [Deployment("default", client, None)])

    @property
    def deployments(self) -> list[Deployment]:
        routes = list(self.routes.values()) + ([self.passthrough] if self.passthrough else [])
        return [deployment for route in routes for deployment in route.deployments]

    def _client(self, base_url: str, api_key: str | None, provider: str = "openai") -> UpstreamClient:
        # Deployments on the same endpoint with the same key share one pool.
        cache_key = (base_url, api_key, provider)
        client = self._clients.get(cache_key)
        if client is None:
            client = UpstreamClient(
                base_url,
                api_key=api_key,
                max_connections=self._settings.max_streams,
                connect_timeout=self._settings.connect_timeout,
                retry_policy=self._settings.retry_policy,
                key_header="x-api-key" if provider == "anthropic" else "authorization",
                receive_buffer=self._settings.upstream_rcvbuf,
                on_failure=self.events.attempt_failed,
            )
            self._clients[cache_key] = client
        return client

    def _build_route(self, model: ModelConfig) -> ModelRoute:
        deployments = []
        for index, config in enumerate(model.deployments):
            key = os.environ.get(config.api_key_env) if config.api_key_env else None
            deployments.append(
                Deployment(
                    name=config.name or f"{model.name}#{index}",
                    client=self._client(config.base_url, key, config.provider),
                    upstream_model=config.model or (None if model.name == WILDCARD else model.name),
                    weight=config.weight,
                    apis=config.served_apis,
                    provider=config.provider,
                )
            )
        return ModelRoute(
            name=model.name,
            deployments=deployments,
            strategy=model.strategy,
            fallbacks=tuple(model.fallbacks),
            hedge_after_ms=model.hedge_after_ms,
            hedge_after_percentile=_PERCENTILES[model.hedge_after] if model.hedge_after else None,
        )

    async def aclose(self) -> None:
        for client in self._clients.values():
            await client.aclose()

    # --- lookup ---------------------------------------------------------------------

    def route(self, model: str, api: str = "chat") -> ModelRoute:
        """The route serving ``model`` over ``api``; a 404 for an unknown model, a 400 for one served over other APIs only."""
        if self.passthrough is not None:
            return self.passthrough
        route = self.routes.get(model) or self.routes.get(WILDCARD)
        if route is None:
            raise ModelNotFound(
                f"The model '{model}' does not exist or you do not have access to it.", param="model"
            )
        if not self._serves(route, api):
            served = sorted({a for d in route.deployments for a in d.apis})
            raise ModelNotOnThisAPI(
                f"The model '{model}' is not served over the {API_TITLES.get(api, api)} API; "
                f"it is served over: {', '.join(API_TITLES.get(a, a) for a in served)}.",
                param="model",
            )
        return route

    def _serves(self, route: ModelRoute, api: str) -> bool:
        routes = [route, *(self.routes[name] for name in route.fallbacks)]
        return any(api in d.apis for r in routes for d in r.deployments)

    def models_document(self) -> bytes:
        """``GET /v1/models`` for configured models (passthrough relays the upstream's list)."""
        data = [
            {"id": name, "object": "model", "created": 0, "owned_by": "sluice"}
            for name in self.routes
            if name != WILDCARD
        ]
        return json.dumps({"object": "list", "data": data}, separators=(",", ":")).encode()

    @property
    def default_client(self) -> UpstreamClient:
        assert self.passthrough is not None
        return self.passthrough.deployments[0].client

    # --- selection ------------------------------------------------------------------

    def candidates(self, route: ModelRoute, exclude: Iterable[Deployment] = (), api: str = "chat") -> list[Deployment]:
        """The route's deployments serving ``api``, in the order to try them: healthy by strategy, then cooling."""
        now = trio.current_time()
        excluded = set(map(id, exclude))
        pool = [d for d in route.deployments if id(d) not in excluded and api in d.apis]
        healthy = [d for d in pool if not d.cooling(now)]
        cooling = sorted((d for d in pool if d.cooling(now)), key=lambda d: d.cooldown_until)
        return _ordered(healthy, route.strategy) + cooling

    def _attempt_order(
        self, route: ModelRoute, exclude: Iterable[Deployment], with_fallbacks: bool, api: str
    ) -> list[Deployment]:
        order = self.candidates(route, exclude, api)
        if with_fallbacks:
            for name in route.fallbacks:
                order += self.candidates(self.routes[name], (), api)
        return order

    # --- health ---------------------------------------------------------------------

    def _failed(self, deployment: Deployment, error: errors.SluiceError) -> None:
        self.events.deployment_failed(deployment, error)
        deployment.consecutive_failures += 1
        if deployment.consecutive_failures >= self._settings.cooldown_failures and self._settings.cooldown_seconds > 0:
            deployment.cooldown_until = trio.current_time() + self._settings.cooldown_seconds
            deployment.consecutive_failures = 0
            self.events.cooled_down(deployment)

    @staticmethod
    def _succeeded(deployment: Deployment) -> None:
        deployment.consecutive_failures = 0

    def observe_first_token(self, route: ModelRoute, seconds: float) -> None:
        route.ttft_seconds.append(seconds)

    # --- requests -------------------------------------------------------------------

    async def open_stream(
        self,
        route: ModelRoute,
        request: ParsedRequest,
        *,
        call: UpstreamCall | None = None,
        on_attempt: Callable[[], None] | None = None,
        exclude: Iterable[Deployment] = (),
        with_fallbacks: bool = True,
        observer: AttemptObserver | None = None,
    ) -> OpenedStream:
        """Open a streaming request on the first deployment that answers 2xx."""
        call = call or CHAT_CALL

        async def attempt(deployment: Deployment) -> OpenedStream:
            body = request.body_for_model(deployment.upstream_model)
            response = await deployment.client.open_stream(
                call.path, body, headers=call.headers, on_attempt=on_attempt,
                on_retry=functools.partial(observer.retrying, deployment) if observer is not None else None,
            )
            return OpenedStream(response, deployment)

        return await self._first_success(
            self._attempt_order(route, exclude, with_fallbacks, call.api), attempt, observer
        )

    async def complete(
        self,
        route: ModelRoute,
        request: ParsedRequest,
        *,
        call: UpstreamCall | None = None,
        on_attempt: Callable[[], None] | None = None,
        observer: AttemptObserver | None = None,
    ) -> tuple[httpx2.Response, Deployment]:
        """A non-streaming request on the first deployment that answers 2xx."""
        call = call or CHAT_CALL

        async def attempt(deployment: Deployment) -> tuple[httpx2.Response, Deployment]:
            body = request.body_for_model(deployment.upstream_model)
            deployment.active += 1  # busy while it runs, for least_busy
            try:
                response = await deployment.client.complete(
                    call.path, body, headers=call.headers, on_attempt=on_attempt,
                    on_retry=functools.partial(observer.retrying, deployment) if observer is not None else None,
                )
                return response, deployment
            finally:
                deployment.active -= 1

        return await self._first_success(self._attempt_order(route, (), True, call.api), attempt, observer)

    async def _first_success(
        self,
        order: list[Deployment],
        attempt: Callable[[Deployment], Awaitable[_T]],
        observer: AttemptObserver | None = None,
    ) -> _T:
        """Try ``attempt`` on each deployment in order until one succeeds or fails for the client's own reason."""
        last_error: errors.SluiceError | None = None
        last_failed: Deployment | None = None
        for index, deployment in enumerate(order):
            if index:
                self.events.fell_back(deployment)
                if observer is not None and last_failed is not None and last_error is not None:
                    observer.falling_back(last_failed, last_error, deployment)
            try:
                result = await attempt(deployment)
            except errors.SluiceError as exc:
                if not fails_over(exc):
                    raise
                self._failed(deployment, exc)
                last_error = exc
                last_failed = deployment
                continue
            self._succeeded(deployment)
            return result
        if last_error is None:
            raise errors.UpstreamUnavailable("No deployment is left to try for this model.")
        raise last_error


def _ordered(deployments: list[Deployment], strategy: str) -> list[Deployment]:
    if len(deployments) < 2:
        return deployments
    if strategy == "weighted":
        # Weighted random order without replacement (Efraimidis-Spirakis keys).
        return sorted(deployments, key=lambda d: -(random.random() ** (1.0 / d.weight)))
    # least_busy: fewest active streams per unit of weight; ties broken at random
    # so equal deployments share the load.
    return sorted(deployments, key=lambda d: (d.active / d.weight, random.random()))
