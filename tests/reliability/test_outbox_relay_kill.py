"""The outbox relay killed between publish and mark: every event reaches device-events, and the
registry agent applies each event once (republished events are recognised by their seq)."""
from __future__ import annotations

import asyncio
import time

import asyncpg
import pytest
from aiokafka import AIOKafkaConsumer

from iotflow import topics
from iotflow.devices import Change, Registration
from iotflow.pg import LazyPool
from iotflow.registry import DeviceRegistry
from iotflow.testing import http_get_json, unconsumed, wait_for

DEVICES = 1000
EVENTS_PER_DEVICE = 3  # registered, updated, updated
ATTEMPTS = 3


async def _make_events(settings, prefix: str) -> None:
    pool = LazyPool(settings.pg_dsn, size=4, connect_timeout_s=5, command_timeout_s=30, application_name="test")
    registry = DeviceRegistry(pool)
    try:
        async def one(i: int) -> None:
            device_id = f"{prefix}{i}"
            await registry.register(Registration(device_id, "relay test", "meter"))
            for n in range(EVENTS_PER_DEVICE - 1):
                await registry.update(device_id, Change({"name": f"renamed {n}"}), None)
        for start in range(0, DEVICES, 50):
            await asyncio.gather(*(one(i) for i in range(start, min(start + 50, DEVICES))))
    finally:
        await pool.close()


async def _unpublished(settings, prefix: str) -> int:
    conn = await asyncpg.connect(settings.pg_dsn, timeout=10)
    try:
        return int(await conn.fetchval("SELECT count(*) FROM device_outbox WHERE device_id LIKE $1 "
                                       "AND published_at IS NULL", prefix + "%"))
    finally:
        await conn.close()


async def _watch_and_kill(settings, prefix: str, worker, restart, expected: int) -> tuple[list[str], object]:
    """Read device-events; SIGKILL the worker at the first event of ours (mid-batch), restart it,
    and read until every event of ours has arrived. Returns the event ids read (with repeats)."""
    consumer = AIOKafkaConsumer(topics.name(settings, topics.DEVICE_EVENTS), bootstrap_servers=settings.kafka_bootstrap,
                                auto_offset_reset="earliest", enable_auto_commit=False, fetch_max_wait_ms=10)
    await consumer.start()
    seen: list[str] = []
    killed = False
    deadline = time.monotonic() + 300
    try:
        while time.monotonic() < deadline:
            batch = await consumer.getmany(timeout_ms=200)
            ours = [m for records in batch.values() for m in records if m.key.decode().startswith(prefix)]
            if ours and not killed:
                assert worker.kill() == -9
                killed = True
                worker = restart()
            seen += [dict(m.headers)["iotflow-event-id"].decode() for m in ours]
            if len(set(seen)) >= expected and await _unpublished(settings, prefix) == 0:
                return seen, worker
        raise AssertionError(f"only {len(set(seen))} of {expected} events reached device-events")
    finally:
        await consumer.stop()


@pytest.mark.timeout(900)
def test_a_relay_killed_between_publish_and_mark_loses_no_event_and_applies_each_once(settings, start_worker, run_id):
    republished = 0
    port = None
    for attempt in range(ATTEMPTS):
        prefix = f"relay-{run_id}-{attempt}-"
        asyncio.run(_make_events(settings, prefix))
        expected = DEVICES * EVENTS_PER_DEVICE
        # One round publishes them all, so the kill at the first event lands before the mark.
        worker = start_worker(IOTFLOW_OUTBOX_BATCH_SIZE=str(expected), **({"IOTFLOW_WEB_PORT": port} if port else {}))
        port = str(worker.web_port)
        seen, worker = asyncio.run(_watch_and_kill(
            settings, prefix, worker, lambda: start_worker(IOTFLOW_WEB_PORT=port), expected))
        republished += len(seen) - len(set(seen))
        assert len(set(seen)) == expected  # every event reached the topic
        if republished:
            break
        worker.terminate()  # the kill came after the mark: try again with fresh events
    assert republished > 0, f"none of {ATTEMPTS} kills landed between publish and mark"

    # The registry agent applied each event once: every device of the last attempt went through
    # its three events exactly, republished copies and replays notwithstanding.
    final = worker
    final.wait_ready()

    def applied(device_id: str) -> int:
        status, body = http_get_json(f"{final.url}/api/v1/devices/{device_id}/state", timeout=10,
                                     headers=final.bearer())
        return body["events_applied"] if status == 200 else 0

    # The agent reads device-events' partitions in an order of its own: wait until it committed every
    # one to its end (all events processed, republished copies included) before reading the states.
    def behind() -> dict[int, int]:
        return asyncio.run(unconsumed(settings, topics.DEVICE_EVENTS))
    assert wait_for(lambda: not behind(), timeout=120), f"device-events not processed, by partition: {behind()}"
    last = [f"{prefix}{i}" for i in range(DEVICES)]
    counts = {device_id: applied(device_id) for device_id in last}
    assert set(counts.values()) == {EVENTS_PER_DEVICE}, {d: n for d, n in counts.items() if n != EVENTS_PER_DEVICE}
