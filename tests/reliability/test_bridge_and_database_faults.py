"""Faults outside the worker: the bridge killed mid-stream, the database stopped under load."""
from __future__ import annotations

import asyncio
import time

import pytest

from iotflow.simulator import FleetConfig
from iotflow.testing import (
    http_get_json, http_json, produce, register, rss_kib, stack_service, stored_messages, telemetry, wait_for,
)
from tests.integration.test_mqtt_path import FleetThroughBridge


@pytest.mark.timeout(600)
def test_a_bridge_killed_mid_stream_loses_nothing(settings, start_worker, run_id, tmp_path, chaos):
    run = FleetThroughBridge(settings, start_worker, run_id, tmp_path,
                             FleetConfig(devices=20, messages_per_device=600, rate_per_device=40.0, seed=3,
                                         prefix=f"bk{run_id}"))
    try:
        assert wait_for(lambda: run.stored() > 2000, timeout=60)
        run.bridge.kill()  # SIGKILL: unacknowledged messages stay with the broker, in the bridge's session
        run.bridge.wait(timeout=10)
        time.sleep(2)
        restarted = time.monotonic()
        run.bridge = run.start_bridge()
        run.sender.join(timeout=120)
        sent = run.result["totals"]["sent"]
        assert sent == 12_000
        assert wait_for(lambda: run.stored() == sent, timeout=300), f"stored {run.stored()} of {sent}"
        rows, messages = asyncio.run(stored_messages(settings, run.prefix))
        chaos(fault="bridge kill -9 (restarted after 2 s)", sent=sent, stored=messages, lost=sent - messages,
              duplicated=rows // 2 - messages, recovery_s=round(time.monotonic() - restarted, 1))
        assert (rows, messages) == (2 * sent, sent)
    finally:
        run.stop()


@pytest.mark.timeout(600)
def test_the_database_stopped_for_30_seconds_costs_nothing_and_memory_stays_bounded(settings, start_worker, run_id,
                                                                                  chaos):
    worker = start_worker()
    worker.wait_ready()
    devices = [f"db-{run_id}-{i}" for i in range(20)]
    prefix = f"db-{run_id}-"
    asyncio.run(register(settings, devices))
    worker.wait_registered(devices)  # the outage below would hold registrations back in the outbox
    first = [(d.encode(), telemetry(d, seq)) for seq in range(250) for d in devices]
    asyncio.run(produce(settings, first))
    assert wait_for(lambda: asyncio.run(stored_messages(settings, prefix))[1] > 1000, timeout=120)
    baseline_rss = rss_kib(worker.proc.pid)

    stack_service("down", "postgres")
    try:
        # Load keeps arriving while the database is away: Kafka holds it, the worker waits.
        second = [(d.encode(), telemetry(d, seq)) for seq in range(250, 1250) for d in devices]
        asyncio.run(produce(settings, second))
        peak = baseline_rss
        status, _, ready = http_json("GET", f"{worker.url}/health/ready")
        assert (status, ready["status"], ready["checks"]["postgres"]["status"]) == (503, "unready", "failing"), ready
        assert worker_alive(worker)  # unready, not dead: liveness never checks a dependency
        outage_end = time.monotonic() + 30
        while time.monotonic() < outage_end:
            worker.assert_running("while the database was down")
            peak = max(peak, rss_kib(worker.proc.pid))
            time.sleep(1)
    finally:
        stack_service("up", "postgres")
    total = len(first) + len(second)
    back = time.monotonic()
    assert wait_for(lambda: asyncio.run(stored_messages(settings, prefix))[1] == total, timeout=300), (
        f"stored {asyncio.run(stored_messages(settings, prefix))[1]} of {total}")
    rows, messages = asyncio.run(stored_messages(settings, prefix))
    chaos(fault="PostgreSQL stopped 30 s under load", sent=total, stored=messages, lost=total - messages,
          duplicated=rows // 2 - messages, recovery_s=round(time.monotonic() - back, 1),
          rss_growth_mib=round((peak - baseline_rss) / 1024, 1))
    assert (rows, messages) == (2 * total, total)
    # Bounded: the backlog (20,000 messages) stayed in Kafka, not in the worker.
    assert peak < baseline_rss + 100 * 1024, f"RSS grew from {baseline_rss} KiB to {peak} KiB during the outage"


def worker_alive(worker) -> bool:
    return http_get_json(f"{worker.url}/health/live")[0] == 200
