"""Telemetry waiting for its device's registration is never acknowledged, so a crash meanwhile loses
nothing: the next worker reads it again from Kafka. This needs iotflow's commit guard
(iotflow/transport.py): Faust alone commits past a single unacknowledged offset."""
from __future__ import annotations

import asyncio
import time

import pytest
from aiokafka.partitioner import murmur2

from iotflow.testing import committed_offsets, produce, register, stored_messages, telemetry, wait_for

COMMIT_INTERVAL_S = 2.8  # Faust's broker_commit_interval (the default iotflow keeps)


def partition_of(device_id: str, partitions: int) -> int:
    return (murmur2(device_id.encode()) & 0x7FFFFFFF) % partitions  # Kafka's default partitioner


def committed(settings, partition: int) -> int | None:
    return asyncio.run(committed_offsets(settings)).get(partition)


@pytest.mark.timeout(600)
def test_a_crash_while_telemetry_waits_for_its_registration_loses_nothing(settings, start_worker, run_id):
    busy = f"busy-{run_id}"
    partition = partition_of(busy, settings.topic_partitions)
    late = next(d for d in (f"late-{run_id}-{i}" for i in range(1000))
                if partition_of(d, settings.topic_partitions) == partition)
    asyncio.run(register(settings, [busy]))
    env = {"IOTFLOW_UNKNOWN_DEVICE_WAIT_S": "600"}
    worker = start_worker(**env)
    worker.wait_ready()
    worker.wait_registered([busy])

    # One partition, in this order: 100 of busy (offsets 0-99), 1 of late (100), 100 of busy.
    first = [(busy.encode(), telemetry(busy, seq)) for seq in range(100)]
    then = [(busy.encode(), telemetry(busy, seq)) for seq in range(100, 200)]
    asyncio.run(produce(settings, first))
    asyncio.run(produce(settings, [(late.encode(), telemetry(late, 0))]))
    asyncio.run(produce(settings, then))
    assert wait_for(lambda: asyncio.run(stored_messages(settings, busy))[1] == 200, timeout=120)
    assert wait_for(lambda: committed(settings, partition) == 100, timeout=60), (
        f"committed {committed(settings, partition)}")
    # Every message after late's is acknowledged; give commits time to pass it — they must not.
    time.sleep(3 * COMMIT_INTERVAL_S)
    assert committed(settings, partition) == 100
    assert worker.kill() == -9

    again = start_worker(IOTFLOW_WEB_PORT=str(worker.web_port), **env)
    again.wait_ready()
    asyncio.run(register(settings, [late]))
    assert wait_for(lambda: asyncio.run(stored_messages(settings, late)) == (2, 1), timeout=120), (
        "the message that waited through the crash was lost")
    assert asyncio.run(stored_messages(settings, busy)) == (400, 200)  # the replayed ones stored once
    assert wait_for(lambda: committed(settings, partition) == 201, timeout=60)
