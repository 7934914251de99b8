"""The device cache against the real Redis: versions keep stale records out; a dead Redis is skipped."""
from __future__ import annotations

import asyncio
import uuid

from iotflow.breaker import CircuitBreaker
from iotflow.cache import DeviceCache, client_for
from iotflow.stack.base import free_loopback_port


def _record(device_id: str, version: int) -> dict:
    return {"id": device_id, "version": version, "name": f"v{version}"}


def test_a_fill_older_than_a_change_is_refused(stack):
    cache = DeviceCache(client_for(stack.redis_url, timeout_s=0.5), timeout_s=0.5, ttl_s=60)
    device_id = f"cache-{uuid.uuid4().hex[:8]}"

    async def scenario() -> list:
        seen = []
        await cache.fill(_record(device_id, 1))
        seen.append(await cache.get(device_id))
        await cache.invalidate(device_id, 2)           # changed to version 2
        seen.append(await cache.get(device_id))
        await cache.fill(_record(device_id, 1))        # a slow read of version 1 arrives late
        seen.append(await cache.get(device_id))
        await cache.fill(_record(device_id, 2))        # the read after the change
        seen.append(await cache.get(device_id))
        await cache.fill(_record(device_id, 1))
        seen.append(await cache.get(device_id))
        await cache.close()
        return seen

    seen = asyncio.run(scenario())
    assert [s and s["version"] for s in seen] == [1, None, None, 2, 2]


def test_a_redis_that_does_not_answer_is_a_miss_and_then_skipped(stack):
    breaker = CircuitBreaker("redis-test", failure_threshold=3, reset_after_s=60)
    dead = DeviceCache(client_for(f"redis://127.0.0.1:{free_loopback_port()}/0", timeout_s=0.2), timeout_s=0.2,
                       ttl_s=60, breaker=breaker)

    async def scenario() -> list:
        results = [await dead.get("d") for _ in range(5)]
        await dead.fill(_record("d", 1))
        await dead.close()
        return results

    assert asyncio.run(scenario()) == [None] * 5
    assert dead.degraded


def test_flush_removes_every_device_record_and_nothing_else(stack):
    import os
    import subprocess
    import sys
    from pathlib import Path

    import redis

    cache = DeviceCache(client_for(stack.redis_url, timeout_s=0.5), timeout_s=0.5, ttl_s=60)
    ids = [f"flush-{uuid.uuid4().hex[:8]}-{i}" for i in range(1200)]  # more than one SCAN batch
    other = f"not-iotflow-{uuid.uuid4().hex[:8]}"
    plain = redis.Redis.from_url(stack.redis_url)
    plain.set(other, "kept")

    async def fill() -> None:
        for device_id in ids:
            await cache.fill(_record(device_id, 1))
        await cache.close()

    asyncio.run(fill())
    done = subprocess.run([str(Path(sys.executable).with_name("iotflow")), "cache", "flush"],
                          capture_output=True, text=True, timeout=60, env=dict(os.environ))
    assert done.returncode == 0, done.stderr
    assert int(done.stdout.split()[1]) >= len(ids)
    assert not any(plain.exists(f"iotflow:device:{d}") for d in ids[::100])
    assert plain.get(other) == b"kept"
    plain.delete(other)
    plain.close()
