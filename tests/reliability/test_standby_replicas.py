"""Standby replicas (issue 8): a worker that joins the group keeps a copy of the other worker's
table partitions, read from their changelogs, so taking them over after a kill -9 restores next to
nothing — and the dedup marks it took over still catch every retry.

The standbys must read their changelogs to the end: records the fetcher passed over while it
moved the source partitions to their committed offsets after a rebalance were never read again
(changelogs are not committed, so that seek leaves them where they are), and standbys stopped
thousands of records short until the next rebalance (``iotflow bench-recovery``: 20,231 left of
~520,000)."""
from __future__ import annotations

import asyncio

import pytest

from iotflow.testing import http_get_json, produce, produce_telemetry, register, stored_messages, telemetry, wait_for

DEVICES = 20
PER_DEVICE = 1500  # 30,000 dedup marks in the changelogs
STANDBY_LEFT = "iotflow_table_standby_remaining_records"


@pytest.mark.timeout(600)
def test_a_joining_worker_s_standbys_read_to_the_end_and_its_take_over_keeps_dedup(settings, start_worker, run_id):
    ids = [f"standby-{run_id}-{i}" for i in range(DEVICES)]
    prefix = f"standby-{run_id}-"
    asyncio.run(register(settings, ids))
    first = start_worker()
    first.wait_ready()
    assert wait_for(lambda: first.metric('iotflow_device_events_total{outcome="applied"') >= len(ids), timeout=90)
    asyncio.run(produce_telemetry(settings, ids, PER_DEVICE))
    stored = lambda: asyncio.run(stored_messages(settings, prefix))  # noqa: E731
    assert wait_for(lambda: stored()[1] == DEVICES * PER_DEVICE, timeout=300), f"stored {stored()}"

    second = start_worker(fresh_state=True)  # an empty folder: everything it holds comes from the changelogs
    second.wait_ready()
    for worker in (first, second):
        worker.wait_recovered()
    left = lambda: [w.metric(STANDBY_LEFT) for w in (first, second)]  # noqa: E731
    assert wait_for(lambda: left() == [0, 0], timeout=120), f"standby records left (first, second): {left()}"

    held = _partitions(second)
    first.kill()
    # The survivor takes the dead worker's partitions once the group has dropped it (session timeout).
    assert wait_for(lambda: _partitions(second) > held, timeout=180), f"the survivor still holds {held} partitions"
    # A retry of one message per device, of partitions the survivor held only as standbys until now.
    asyncio.run(produce(settings, [(d.encode(), telemetry(d, 7)) for d in ids]))
    assert wait_for(lambda: second.metric('iotflow_ingest_messages_total{outcome="duplicate"') >= DEVICES, timeout=120), \
        "the retries were not all recognised as duplicates"
    assert stored() == (2 * DEVICES * PER_DEVICE, DEVICES * PER_DEVICE)  # two metrics a message, none twice


def _partitions(worker) -> int:
    """The partitions (of every topic it reads) the worker holds while ready; 0 while it is not."""
    status, body = http_get_json(f"{worker.url}/health/ready", timeout=5)
    detail = str(body["checks"]["kafka"]["detail"]) if status == 200 else ""
    return int(detail.split()[0]) if detail[:1].isdigit() else 0
