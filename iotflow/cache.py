"""Cache-aside for device reads in Redis, never a dependency (seed finding R-03).

Reads try Redis first and fall back to PostgreSQL; a miss is filled after the database answers.
Every Redis call is bounded (``redis_timeout_s``) and goes through a circuit breaker: while Redis is
down or slow the breaker opens and reads go straight to PostgreSQL — degraded (counted in
``iotflow_cache_requests_total{result="skipped"|"error"}`` and the breaker's state), never failed.

Stale entries are kept out by versions. A change of a device (written by this API, or seen on
``device-events`` from anywhere) replaces the entry with a *tombstone* carrying the new version for
a while; a fill is written only if its version is at least the tombstone's, or above the cached
record's (a Lua check-and-set in Redis), so a slow read that began before the change cannot put
the old record back. Entries
expire after ``cache_ttl_s`` in any case.
"""
from __future__ import annotations

import asyncio
import json
from urllib.parse import urlsplit

import redis.asyncio as redis
from redis.asyncio.sentinel import Sentinel
import structlog
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import RedisError

from iotflow import metrics
from iotflow.breaker import CircuitBreaker, State
from iotflow.errors import CircuitOpen

log = structlog.get_logger(__name__)

_PREFIX = "iotflow:device:"
_TOMBSTONE_TTL_S = 300
_UNAVAILABLE = object()  # what a Redis call gives when the breaker or Redis refused it
# Set KEYS[1] to ARGV[2] (a record or a tombstone of version ARGV[1], expiring in ARGV[3] s) unless
# the key holds something newer: a record of a version >= ARGV[1], or a tombstone of a version
# > ARGV[1] (a record of exactly the tombstone's version is what the tombstone waits for).
_SET_IF_NEWER = """
local held = redis.call('GET', KEYS[1])
if held then
  local value = cjson.decode(held)
  local version = tonumber(value['version'])
  local wanted = tonumber(ARGV[1])
  if version and (version > wanted or (version == wanted and not value['tombstone'])) then return 0 end
end
redis.call('SET', KEYS[1], ARGV[2], 'EX', ARGV[3])
return 1
"""


class DeviceCache:
    def __init__(self, client: redis.Redis, *, timeout_s: float, ttl_s: int, breaker: CircuitBreaker | None = None) -> None:
        self.client = client
        self.timeout_s = timeout_s
        self.ttl_s = ttl_s
        self.breaker = breaker or CircuitBreaker("redis", failure_threshold=3, reset_after_s=2.0)
        self._set_if_newer = client.register_script(_SET_IF_NEWER)
        metrics.CIRCUIT_OPEN.labels("redis").set_function(lambda: self.breaker.state is not State.CLOSED)

    @property
    def degraded(self) -> bool:
        return self.breaker.state is not State.CLOSED

    async def get(self, device_id: str) -> dict | None:
        """The cached device record, or None (a miss, a tombstone, or Redis unavailable)."""
        raw = await self._call("get", self.client.get(_PREFIX + device_id))
        if raw is _UNAVAILABLE:
            return None
        value = json.loads(raw) if raw is not None else None
        if value is None or value.get("tombstone"):
            metrics.CACHE.labels("miss").inc()
            return None
        metrics.CACHE.labels("hit").inc()
        return value

    async def fill(self, record: dict) -> None:
        """Cache a record read from the database, unless the key already holds its version or newer."""
        await self._call("fill", self._set_if_newer(keys=[_PREFIX + record["id"]],
                                                    args=[record["version"], json.dumps(record), self.ttl_s]))

    async def invalidate(self, device_id: str, version: int) -> None:
        """Mark ``device_id`` changed at ``version``: older fills are refused until the tombstone expires."""
        tombstone = json.dumps({"tombstone": True, "version": version})
        await self._call("invalidate", self._set_if_newer(keys=[_PREFIX + device_id],
                                                          args=[version, tombstone, _TOMBSTONE_TTL_S]))

    async def _call(self, what: str, command):  # noqa: ANN001 - a redis-py awaitable
        """The command's result, or :data:`_UNAVAILABLE` (counted) when the breaker or Redis refuses."""
        try:
            self.breaker.check()
        except CircuitOpen:
            command.close()  # the coroutine is not run: close it rather than leave it unawaited
            metrics.CACHE.labels("skipped").inc()
            return _UNAVAILABLE
        try:
            result = await asyncio.wait_for(command, self.timeout_s)
        except (RedisError, OSError, asyncio.TimeoutError) as exc:
            self.breaker.record_failure()
            metrics.CACHE.labels("error").inc()
            log.warning("cache_unavailable", op=what, error=f"{exc.__class__.__name__}: {exc}",
                        breaker=self.breaker.state.value)
            return _UNAVAILABLE
        self.breaker.record_success()
        return result

    async def flush(self, batch: int = 500) -> int:
        """Delete every cached device record and tombstone (SCAN + UNLINK, ``batch`` keys at a time;
        other keys of the database are left alone); returns how many. Reads refill the cache from
        PostgreSQL. Runs past the breaker: it is an operator's command, and fails loudly."""
        removed = 0
        keys: list[bytes] = []
        async for key in self.client.scan_iter(match=_PREFIX + "*", count=batch):
            keys.append(key)
            if len(keys) >= batch:
                removed += await self.client.unlink(*keys)
                keys = []
        if keys:
            removed += await self.client.unlink(*keys)
        return removed

    async def ping(self, timeout_s: float) -> None:
        """Raise unless Redis answers PING within ``timeout_s`` (past the breaker: what it is, now)."""
        await asyncio.wait_for(self.client.ping(), timeout_s)

    async def close(self) -> None:
        await self.client.aclose()


def client_for(url: str, *, timeout_s: float) -> redis.Redis:
    """A Redis client for ``url`` with connect and socket timeouts of ``timeout_s``.

    ``redis+sentinel://[:password@]host:port,host:port,…/<master name>[/db]`` (``rediss+sentinel``
    for TLS) asks the sentinels for the current master on every new connection: after a failover
    the first calls fail (the breaker opens, reads go to PostgreSQL) and the next connection goes
    to the promoted replica.
    """
    # No client-side retries: the breaker decides, and a read must not wait out several attempts.
    timeouts = {"socket_timeout": timeout_s, "socket_connect_timeout": timeout_s}
    parts = urlsplit(url)
    if not parts.scheme.endswith("+sentinel"):
        return redis.Redis.from_url(url, health_check_interval=10, retry=Retry(NoBackoff(), 0), **timeouts)
    service, db = _sentinel_path(url, parts.path)
    sentinels = []
    for host in parts.netloc.rpartition("@")[2].split(","):
        name, _, port = host.rpartition(":")
        sentinels.append((name, int(port)))
    sentinel = Sentinel(sentinels, sentinel_kwargs=timeouts, **timeouts)
    return sentinel.master_for(service, db=db, password=parts.password, ssl=parts.scheme == "rediss+sentinel",
                               health_check_interval=10, retry=Retry(NoBackoff(), 0))


def _sentinel_path(url: str, path: str) -> tuple[str, int]:
    segments = [segment for segment in path.split("/") if segment]
    if not 1 <= len(segments) <= 2 or (len(segments) == 2 and not segments[1].isdigit()):
        raise ValueError(f"{url!r}: a Sentinel URL names the master and optionally the db: …/<master name>[/<db>]")
    return segments[0], int(segments[1]) if len(segments) == 2 else 0
