"""``iotflow bench-api``: latency and throughput of the device reads, from a second process.

1. A fresh worker (its own app id and topics) on the local stack; N devices registered through
   ``POST /api/v1/devices``.
2. For ``GET /api/v1/devices/{id}`` (Redis cache-aside in front of PostgreSQL) and
   ``GET /api/v1/devices/{id}/state`` (the registry and presence tables): C concurrent aiohttp
   clients in this process send requests over loopback for D seconds after a warm-up; p50 / p95 /
   p99 and requests/s, with Redis up and then with Redis stopped (``iotflow stack down redis``;
   started again at the end).

Figures move with the machine's load: compare the two Redis cases from one run.
"""
from __future__ import annotations

import asyncio
import dataclasses
import statistics
import time
import uuid

import aiohttp

from iotflow.kafka_admin import ensure_topics
from iotflow.settings import Settings
from iotflow.stack import services
from iotflow.bench import bench_worker
from iotflow.testing import bearer


async def _load(url: str, paths: list[str], headers: dict[str, str], concurrency: int,
                duration_s: float) -> dict[str, float]:
    latencies: list[float] = []
    failures = 0
    connector = aiohttp.TCPConnector(limit=concurrency)
    async with aiohttp.ClientSession(connector=connector, headers=headers,
                                     timeout=aiohttp.ClientTimeout(total=10)) as session:
        async def client(offset: int, until: float, record: bool) -> None:
            nonlocal failures
            i = offset
            while time.monotonic() < until:
                started = time.perf_counter()
                async with session.get(url + paths[i % len(paths)]) as response:
                    await response.read()
                    ok = response.status == 200
                if record:
                    latencies.append(time.perf_counter() - started)
                    failures += not ok
                i += concurrency

        warm_until = time.monotonic() + min(3.0, duration_s / 3)
        await asyncio.gather(*(client(i, warm_until, False) for i in range(concurrency)))
        began = time.monotonic()
        await asyncio.gather(*(client(i, began + duration_s, True) for i in range(concurrency)))
        elapsed = time.monotonic() - began
    cuts = statistics.quantiles(latencies, n=100, method="inclusive")
    return {"requests": len(latencies), "failed": failures, "requests_per_s": round(len(latencies) / elapsed),
            "p50_ms": round(cuts[49] * 1000, 2), "p95_ms": round(cuts[94] * 1000, 2), "p99_ms": round(cuts[98] * 1000, 2)}


async def _register(url: str, headers: dict[str, str], ids: list[str]) -> None:
    async with aiohttp.ClientSession(headers=headers, timeout=aiohttp.ClientTimeout(total=30)) as session:
        for device_id in ids:
            async with session.post(f"{url}/api/v1/devices", json={"id": device_id, "name": device_id,
                                                                     "type": "bench"}) as response:
                if response.status not in (200, 201):
                    raise RuntimeError(f"registering {device_id}: {response.status} {await response.text()}")


def run(settings: Settings, *, devices: int, concurrency: int, duration_s: float) -> dict[str, object]:
    run_id = uuid.uuid4().hex[:6]
    bench = dataclasses.replace(settings, topic_prefix=f"bench-api-{run_id}-", app_id=f"iotflow-bench-api-{run_id}")
    asyncio.run(ensure_topics(bench))
    ids = [f"api{run_id}-{i}" for i in range(devices)]
    redis = services(settings)["redis"]
    results: dict[str, object] = {"devices": devices, "concurrency": concurrency, "duration_s": duration_s}
    with bench_worker(bench) as worker:
        asyncio.run(_register(worker.url, bearer(settings, "operator"), ids))
        worker.wait_registered(ids[-1:])
        viewer = bearer(settings, "viewer")
        routes = {"GET /api/v1/devices/{id}": [f"/api/v1/devices/{d}" for d in ids],
                  "GET /api/v1/devices/{id}/state": [f"/api/v1/devices/{d}/state" for d in ids]}
        for case in ("redis_up", "redis_down"):
            if case == "redis_down":
                redis.stop()
            try:
                results[case] = {route: asyncio.run(_load(worker.url, paths, viewer, concurrency, duration_s))
                                 for route, paths in routes.items()}
            finally:
                if case == "redis_down":
                    redis.start()
        worker.terminate()
    return results
