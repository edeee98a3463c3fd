"""State shared through Redis: key limits and deployment cooldowns, across workers and instances.

:class:`RedisLimitStore` counts key limits; :class:`RedisCooldowns` shares
which deployments are resting.

I/O through coredis (anyio-based, so it runs under trio; redis-py's async
client is asyncio-only). A round trip costs about 0.4-0.8 ms here, so Redis
stays off the per-token path: one script call when a request is admitted,
one when it ends, and one background poll per second for cooldowns.

Invariants:

* Check-and-count is one Lua script (atomic in Redis): two instances can
  never both take the last slot of a limit.
* If Redis is unreachable or slow (``timeout``), the request is counted by
  the in-process :class:`~sluice.limits.LocalLimitStore` instead, the
  gateway logs it once and ``/health`` reports ``"redis": "unreachable"``;
  Redis is tried again after ``retry_after`` seconds. A request is always
  released to the store that admitted it.
* A concurrent-stream slot is a member of a sorted set scored by its start
  time; a slot whose gateway died without releasing it expires after
  ``lease_ttl`` seconds instead of holding the limit forever.
* ``/health`` reports what Redis says now, not what the last keyed request
  found: :meth:`RedisLimitStore.probe` PINGs (bounded by ``timeout``) at most
  once per ``probe_interval`` and at most one at a time, so a storm of health
  checks costs Redis one PING a second. A probe's verdict also steers
  ``admit``: a failed PING sends requests to the local store, a good one
  sends them back to Redis at once.
"""

from __future__ import annotations

import logging
import time
import uuid
from collections.abc import Callable
from typing import Any

import coredis
import trio

from .limits import WINDOW_SECONDS, LocalLimitStore, VirtualKey, refusal, window_now
from .router import Deployment

log = logging.getLogger("sluice.redis")

#: KEYS: streams (zset), requests (counter), tokens (counter)
#: ARGV: now_ms, lease id, max streams, rpm, tpm (0 = no limit), lease ttl ms, window ttl s
_ADMIT = """
local now = tonumber(ARGV[1])
local max_streams = tonumber(ARGV[3])
if max_streams > 0 then
  redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now - tonumber(ARGV[6]))
  if redis.call('ZCARD', KEYS[1]) >= max_streams then return 1 end
end
local rpm = tonumber(ARGV[4])
if rpm > 0 and tonumber(redis.call('GET', KEYS[2]) or '0') >= rpm then return 2 end
local tpm = tonumber(ARGV[5])
if tpm > 0 and tonumber(redis.call('GET', KEYS[3]) or '0') >= tpm then return 3 end
if max_streams > 0 then
  redis.call('ZADD', KEYS[1], now, ARGV[2])
  redis.call('PEXPIRE', KEYS[1], ARGV[6])
end
redis.call('INCR', KEYS[2])
redis.call('EXPIRE', KEYS[2], ARGV[7])
return 0
"""

#: KEYS: streams (zset), tokens (counter); ARGV: lease id, tokens, window ttl s
_RELEASE = """
redis.call('ZREM', KEYS[1], ARGV[1])
local tokens = tonumber(ARGV[2])
if tokens > 0 then
  redis.call('INCRBY', KEYS[2], tokens)
  redis.call('EXPIRE', KEYS[2], ARGV[3])
end
return 0
"""

_REFUSALS = {1: "streams", 2: "requests", 3: "tokens"}


#: how long /health's PING may take before Redis counts as unreachable (seconds)
_PROBE_TIMEOUT = 1.0

class RedisLimitStore:
    """Key limits counted in Redis, with the in-process store as the fallback."""

    def __init__(
        self,
        url: str,
        *,
        timeout: float = 0.25,
        retry_after: float = 5.0,
        lease_ttl: float = 3600.0,
        probe_interval: float = 1.0,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.url = url
        self.local = LocalLimitStore(clock=clock)
        self._client: Any = coredis.Redis.from_url(url)
        self._admit = self._client.register_script(_ADMIT)
        self._release = self._client.register_script(_RELEASE)
        self._timeout = timeout
        self._retry_after = retry_after
        self._lease_ttl_ms = int(lease_ttl * 1000)
        self._clock = clock
        self._down_until = float("-inf")
        #: ``ok`` or ``unreachable``, for /health
        self.status = "ok"
        self._probe_interval = probe_interval
        self._probed_at = float("-inf")
        self._probing = False

    async def run(self, *, task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
        """Hold the client's connection pool open until cancelled (run in the app's nursery)."""
        async with self._client:
            task_status.started()
            await trio.sleep_forever()

    @property
    def client(self) -> Any:
        return self._client

    def _available(self) -> bool:
        return trio.current_time() >= self._down_until

    def _failed(self, exc: BaseException) -> None:
        if self.status == "ok":
            log.warning({"event": "redis_unreachable", "url": _without_password(self.url), "error": type(exc).__name__,
                         "fallback": "in-process limits"})
        self.status = "unreachable"
        self._down_until = trio.current_time() + self._retry_after

    def _recovered(self) -> None:
        if self.status != "ok":
            log.warning({"event": "redis_recovered", "url": _without_password(self.url)})
        self.status = "ok"

    async def probe(self) -> str:
        """Redis's status for ``/health``: a fresh PING's verdict, at most ``probe_interval`` old."""
        if self._probing or trio.current_time() - self._probed_at < self._probe_interval:
            return self.status
        self._probing = True
        try:
            # Longer than a limit check's bound: /health should report a Redis that does
            # not answer, not one a loaded event loop read a little late (k8s probes wait 1 s too).
            with trio.fail_after(max(self._timeout, _PROBE_TIMEOUT)):
                await self._client.ping()
        except Exception as exc:  # ConnectionError, TooSlowError, ExceptionGroup...
            self._failed(exc)
        else:
            self._recovered()
            self._down_until = float("-inf")  # admit through Redis again without waiting out retry_after
        finally:
            self._probed_at = trio.current_time()
            self._probing = False
        return self.status

    async def admit(self, key: VirtualKey) -> Any:
        if self._available():
            window, retry_after = window_now(self._clock())
            lease = uuid.uuid4().hex
            names = _key_names(key, window)
            try:
                with trio.fail_after(self._timeout):
                    verdict = await self._admit(
                        keys=[names["streams"], names["requests"], names["tokens"]],
                        args=[
                            int(self._clock() * 1000),
                            lease,
                            key.max_concurrent_streams or 0,
                            key.requests_per_minute or 0,
                            key.tokens_per_minute or 0,
                            self._lease_ttl_ms,
                            WINDOW_SECONDS * 2,
                        ],
                    )
            except Exception as exc:  # ConnectionError, TooSlow, ExceptionGroup...: fall back
                self._failed(exc)
            else:
                self._recovered()
                if verdict:
                    limit = _REFUSALS[int(verdict)]
                    raise refusal(key, limit, 1 if limit == "streams" else retry_after)
                return ("redis", lease)
        await self.local.admit(key)
        return ("local", None)

    async def release(self, key: VirtualKey, lease: Any, tokens: int) -> None:
        where, lease_id = lease
        if where == "local":
            await self.local.release(key, lease, tokens)
            return
        window, _ = window_now(self._clock())
        names = _key_names(key, window)
        try:
            with trio.fail_after(self._timeout):
                await self._release(keys=[names["streams"], names["tokens"]], args=[lease_id, tokens, WINDOW_SECONDS * 2])
        except Exception as exc:
            # The slot expires with its lease; the tokens of this one request go uncounted.
            self._failed(exc)


def _key_names(key: VirtualKey, window: int) -> dict[str, str]:
    # {name} is a hash tag: on Redis Cluster, one key's counters share a slot (Lua needs that).
    tag = "{" + key.name + "}"
    return {
        "streams": f"sluice:{tag}:streams",
        "requests": f"sluice:{tag}:requests:{window}",
        "tokens": f"sluice:{tag}:tokens:{window}",
    }


def _without_password(url: str) -> str:
    scheme, sep, rest = url.partition("://")
    if "@" in rest:
        rest = "***@" + rest.split("@", 1)[1]
    return scheme + sep + rest


class RedisCooldowns:
    """Deployment cooldowns shared through Redis: one worker's verdict rests a deployment for all.

    A worker that puts a deployment in cooldown writes
    ``sluice:cooldown:{name}`` (value: the end, epoch ms; expires with it).
    Every worker reads all its deployments' keys once per ``interval`` and
    adopts any later end it finds, so selection itself never waits on Redis.
    """

    def __init__(self, client: Any, deployments: list[Deployment], *, interval: float = 1.0, timeout: float = 0.25) -> None:
        self._client = client
        self._deployments = {deployment.name: deployment for deployment in deployments}
        self._interval = interval
        self._timeout = timeout

    @staticmethod
    def _key(name: str) -> str:
        return f"sluice:cooldown:{{{name}}}"

    async def publish(self, deployment: Deployment) -> None:
        remaining = deployment.cooldown_until - trio.current_time()
        if remaining <= 0:
            return
        until_ms = int((time.time() + remaining) * 1000)
        try:
            with trio.fail_after(self._timeout):
                await self._client.set(self._key(deployment.name), str(until_ms), px=max(1, int(remaining * 1000)))
        except Exception as exc:
            log.warning({"event": "redis_cooldown_publish_failed", "deployment": deployment.name, "error": type(exc).__name__})

    async def run(self) -> None:
        """Adopt cooldowns other workers published, every ``interval`` seconds, until cancelled."""
        names = list(self._deployments)
        if not names:
            return
        while True:
            try:
                with trio.fail_after(self._timeout):
                    values = await self._client.mget([self._key(name) for name in names])
            except Exception:
                values = []  # Redis is down: local cooldowns still apply
            now_wall, now_trio = time.time(), trio.current_time()
            for name, value in zip(names, values):
                if value is None:
                    continue
                until = now_trio + (int(value) / 1000.0 - now_wall)
                deployment = self._deployments[name]
                if until > deployment.cooldown_until:
                    deployment.cooldown_until = until
            await trio.sleep(self._interval)
