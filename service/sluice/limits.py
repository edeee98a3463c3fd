"""Virtual keys and their limits: requests/minute, tokens/minute, concurrent streams.

A *virtual key* is a gateway key from the config file (its value comes from
an environment variable). A request that presents it is *admitted* before
its upstream request opens and *released* when it ends, with the tokens it
used.

The counting is one algorithm with two stores:

* :class:`LocalLimitStore`: in this process (one worker's view).
* :class:`sluice.redis_limits.RedisLimitStore`: in Redis, shared by every
  worker and instance, as Lua scripts so check-and-count is atomic.

Both use fixed one-minute windows on the wall clock (``int(time // 60)``)
and count tokens when a stream ends (the gateway cannot know them before).
They are hand-written rather than taken from a limiter library because the
same algorithm must run inside Redis as a script and in-process as its
twin, so that losing Redis changes where limits are counted, not how.

Invariants:

* Admission either raises :class:`~sluice.errors.RateLimited` (429, with
  ``Retry-After``) and counts nothing, or counts the request and one
  concurrent stream, which exactly one :meth:`LimitStore.release` returns.
* Keys are compared in constant time against every configured key.
"""

from __future__ import annotations

import hmac
import math
import os
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

from .config import Settings, VirtualKeyConfig
from .errors import RateLimited

WINDOW_SECONDS = 60


@dataclass(frozen=True)
class VirtualKey:
    name: str
    secret: bytes
    requests_per_minute: int | None = None
    tokens_per_minute: int | None = None
    max_concurrent_streams: int | None = None

    @property
    def limited(self) -> bool:
        return any((self.requests_per_minute, self.tokens_per_minute, self.max_concurrent_streams))

    @classmethod
    def from_config(cls, config: VirtualKeyConfig) -> VirtualKey:
        return cls(
            name=config.name,
            secret=os.environ[config.key_env].encode(),
            requests_per_minute=config.requests_per_minute,
            tokens_per_minute=config.tokens_per_minute,
            max_concurrent_streams=config.max_concurrent_streams,
        )


class KeyTable:
    """Every key a client may present: virtual keys (named, limited) and plain ``api_keys``."""

    def __init__(self, settings: Settings) -> None:
        self.keys = [VirtualKey.from_config(config) for config in settings.keys]
        for index, secret in enumerate(settings.api_keys):
            self.keys.append(VirtualKey(name=f"api_keys[{index}]", secret=secret.get_secret_value().encode()))

    @property
    def enabled(self) -> bool:
        return bool(self.keys)

    def lookup(self, presented: str) -> VirtualKey | None:
        presented_bytes = presented.encode()
        found = None
        # Compare against every key: the time taken says nothing about which matched.
        for key in self.keys:
            if hmac.compare_digest(presented_bytes, key.secret):
                found = key
        return found


def window_now(now: float | None = None) -> tuple[int, int]:
    """(current window number, whole seconds until it ends, at least 1)."""
    now = time.time() if now is None else now
    window = int(now // WINDOW_SECONDS)
    return window, max(1, math.ceil((window + 1) * WINDOW_SECONDS - now))


def refusal(key: VirtualKey, limit: str, retry_after: int) -> RateLimited:
    """The 429 for a key over ``limit`` (``requests``, ``tokens`` or ``streams``)."""
    what = {
        "requests": f"{key.requests_per_minute} requests per minute",
        "tokens": f"{key.tokens_per_minute} tokens per minute",
        "streams": f"{key.max_concurrent_streams} concurrent streams",
    }[limit]
    return RateLimited(
        f"Rate limit reached for key '{key.name}': {what}. Retry after {retry_after} s.",
        limit=limit,
        headers={"retry-after": str(retry_after)},
    )


class LimitStore(Protocol):
    async def admit(self, key: VirtualKey) -> Any:
        """Count a request and a stream for ``key`` and return its lease, or raise :class:`RateLimited`."""

    async def release(self, key: VirtualKey, lease: Any, tokens: int) -> None:
        """Return the stream ``admit`` counted (by its lease), and count the tokens it used."""


class LocalLimitStore:
    """The limits counted in this process."""

    def __init__(self, clock: Callable[[], float] = time.time) -> None:
        self._clock = clock
        self._streams: Counter[str] = Counter()
        self._requests: dict[str, tuple[int, int]] = {}  # name -> (window, count)
        self._tokens: dict[str, tuple[int, int]] = {}

    @staticmethod
    def _count(table: dict[str, tuple[int, int]], name: str, window: int) -> int:
        held = table.get(name)
        return held[1] if held is not None and held[0] == window else 0

    async def admit(self, key: VirtualKey) -> Any:
        self.admit_now(key)
        return None

    def admit_now(self, key: VirtualKey) -> None:
        window, retry_after = window_now(self._clock())
        if key.max_concurrent_streams is not None and self._streams[key.name] >= key.max_concurrent_streams:
            raise refusal(key, "streams", 1)
        if key.requests_per_minute is not None and self._count(self._requests, key.name, window) >= key.requests_per_minute:
            raise refusal(key, "requests", retry_after)
        if key.tokens_per_minute is not None and self._count(self._tokens, key.name, window) >= key.tokens_per_minute:
            raise refusal(key, "tokens", retry_after)
        self._requests[key.name] = (window, self._count(self._requests, key.name, window) + 1)
        self._streams[key.name] += 1

    async def release(self, key: VirtualKey, lease: Any, tokens: int) -> None:
        self.release_now(key, tokens)

    def release_now(self, key: VirtualKey, tokens: int) -> None:
        self._streams[key.name] -= 1
        if tokens:
            window, _ = window_now(self._clock())
            self._tokens[key.name] = (window, self._count(self._tokens, key.name, window) + tokens)
