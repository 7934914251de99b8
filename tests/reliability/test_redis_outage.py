"""Redis stopped under API load (R-03): no request fails — reads fall back to PostgreSQL — and once
Redis is back the cache serves again."""
from __future__ import annotations

import time

import pytest

from iotflow.testing import cache_results, http_json, ReadLoad, stack_service, wait_for

DEVICES = 20


def register_devices(worker, prefix: str) -> list[str]:
    """DEVICES devices registered through the API; their read paths."""
    admin = worker.bearer("admin")
    ids = [f"{prefix}{i}" for i in range(DEVICES)]
    for device_id in ids:
        assert http_json("POST", f"{worker.url}/api/v1/devices", {"id": device_id, "name": "n", "type": "t"},
                         headers=admin)[0] == 201
    return [f"/api/v1/devices/{device_id}" for device_id in ids]


@pytest.mark.timeout(300)
def test_reads_survive_a_redis_outage_and_use_the_cache_again_after(settings, start_worker, run_id, chaos):
    worker = start_worker()
    worker.wait_ready()
    paths = register_devices(worker, f"redis-{run_id}-")
    with ReadLoad(worker, paths) as load:
        assert wait_for(lambda: cache_results(worker)["hit"] > 50, timeout=30), cache_results(worker)
        assert wait_for(lambda: http_json("GET", f"{worker.url}/health/ready")[0] == 200, timeout=30)
        stack_service("down", "redis")
        try:
            status, _, ready = http_json("GET", f"{worker.url}/health/ready")
            assert (status, ready["status"], ready["checks"]["redis"]["status"]) == (200, "degraded", "failing"), ready
            during = cache_results(worker)
            time.sleep(10)  # reads go on against PostgreSQL
            after_outage = cache_results(worker)
            assert after_outage["error"] + after_outage["skipped"] > during["error"] + during["skipped"]
        finally:
            stack_service("up", "redis")
        up, back = time.monotonic(), cache_results(worker)["hit"]
        assert wait_for(lambda: http_json("GET", f"{worker.url}/health/ready")[2]["status"] == "ready", timeout=30)
        assert wait_for(lambda: cache_results(worker)["hit"] > back + 50, timeout=60), cache_results(worker)
        recovery_s = time.monotonic() - up
    # Every read answered 200 within the client's 5 s: degraded while Redis was away, never failed.
    requests = sum(load.statuses.values())
    chaos(fault="Redis stopped 10 s under API load", requests=requests, failed_requests=requests - load.statuses[200],
          recovery_s=round(recovery_s, 1))
    assert set(load.statuses) == {200}, load.statuses
    assert sum(load.statuses.values()) > 200
