"""Redis under Sentinel (R-08): one master, one replica, three sentinels on loopback. The master is
killed under API load; the sentinels promote the replica and the worker follows it by its
``redis+sentinel://`` URL — no request fails meanwhile (reads fall back to PostgreSQL), and the
cache serves again from the new master."""
from __future__ import annotations

import time

import pytest

from iotflow.stack.sentinel import SentinelGroup
from iotflow.testing import ReadLoad, cache_results, http_json, wait_for
from tests.reliability.test_redis_outage import register_devices


@pytest.mark.timeout(300)
def test_the_worker_follows_a_promoted_replica_without_a_failed_request(settings, start_worker, run_id, tmp_path,
                                                                        chaos):
    group = SentinelGroup(tmp_path / "sentinel").start()
    try:
        worker = start_worker(IOTFLOW_REDIS_URL=group.url)
        worker.wait_ready()
        paths = register_devices(worker, f"sentinel-{run_id}-")
        # Ready (table routing included: the changelog metadata loads in the first seconds), Redis ok.
        ready = wait_for(lambda: (r := http_json("GET", f"{worker.url}/health/ready"))[0] == 200 and r[2], timeout=30)
        assert ready and ready["checks"]["redis"]["status"] == "ok", http_json("GET", f"{worker.url}/health/ready")
        with ReadLoad(worker, paths) as load:
            assert wait_for(lambda: cache_results(worker)["hit"] > 50, timeout=30), cache_results(worker)
            killed, old = time.monotonic(), group.kill_master()
            assert wait_for(lambda: group.master_port() not in (None, old), timeout=60), "no replica was promoted"
            promoted_after = time.monotonic() - killed
            promoted = cache_results(worker)["hit"]
            # The cache is used again, now on the promoted replica, and readiness is back to ok.
            assert wait_for(lambda: cache_results(worker)["hit"] > promoted + 50, timeout=60), cache_results(worker)
            assert wait_for(lambda: http_json("GET", f"{worker.url}/health/ready")[2]["checks"]["redis"]["status"] == "ok",
                            timeout=30)
        requests = sum(load.statuses.values())
        chaos(fault="Redis master kill -9 under Sentinel", requests=requests,
              failed_requests=requests - load.statuses[200], recovery_s=round(promoted_after, 1))
        assert set(load.statuses) == {200}, load.statuses
        assert sum(load.statuses.values()) > 200
    finally:
        group.stop()
