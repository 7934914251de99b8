"""Heartbeats while PostgreSQL is down (C-02, R-04): `last_seen` is delayed, not lost — the presence
table has the times at once, and PostgreSQL gets the latest ones when it is back."""
from __future__ import annotations

import asyncio
import json
import time
from datetime import datetime

import asyncpg
import pytest
from aiokafka import AIOKafkaProducer

from iotflow import topics
from iotflow.testing import http_json, register, stack_service, wait_for


async def heartbeat(settings, devices: list[str]) -> dict[str, int]:
    """One heartbeat per device as the bridge forwards it; returns each one's Kafka timestamp (ms),
    set explicitly: the producer's acknowledgement reports its batch's timestamp, which can be a
    millisecond off a record's own."""
    producer = AIOKafkaProducer(bootstrap_servers=settings.kafka_bootstrap, acks="all")
    await producer.start()
    try:
        stamps = {d: int(time.time() * 1000) for d in devices}
        sent = [await producer.send(topics.name(settings, topics.DEVICE_EVENTS),
                                    json.dumps({"device_id": d, "ts": stamps[d]}).encode(), key=d.encode(),
                                    headers=[(topics.KIND_HEADER, b"heartbeat")], timestamp_ms=stamps[d])
                for d in devices]
        await asyncio.gather(*sent)
        return stamps
    finally:
        await producer.stop()


async def last_seen(settings, devices: list[str]) -> dict[str, datetime | None]:
    conn = await asyncpg.connect(settings.pg_dsn, timeout=5)
    try:
        rows = await conn.fetch("SELECT id, last_seen FROM devices WHERE id = ANY($1::text[])", devices)
    finally:
        await conn.close()
    return {r["id"]: r["last_seen"] for r in rows}


@pytest.mark.timeout(300)
def test_heartbeats_during_a_database_outage_reach_last_seen_after_it(settings, start_worker, run_id):
    devices = [f"seen-{run_id}-{i}" for i in range(10)]
    asyncio.run(register(settings, devices))
    worker = start_worker(IOTFLOW_LAST_SEEN_FLUSH_S="1")
    worker.wait_ready()
    worker.wait_registered(devices)
    asyncio.run(heartbeat(settings, devices))
    assert wait_for(lambda: all(asyncio.run(last_seen(settings, devices)).values()), timeout=30)

    stack_service("down", "postgres")
    try:
        sent_ms = asyncio.run(heartbeat(settings, devices))  # Kafka takes them; PostgreSQL cannot

        # The presence table has them at once: /state answers from it while PostgreSQL is away.
        def state_seen_ms() -> int | None:
            status, _, body = http_json("GET", f"{worker.url}/api/v1/devices/{devices[0]}/state",
                                        headers=worker.bearer())
            return int(datetime.fromisoformat(body["last_seen"]).timestamp() * 1000) if status == 200 else None

        assert wait_for(lambda: state_seen_ms() == sent_ms[devices[0]], timeout=30), (state_seen_ms(), sent_ms)
        assert wait_for(lambda: "last_seen_flush_failed" in worker.log_text(), timeout=30)
        worker.assert_running("while the database was down")
    finally:
        stack_service("up", "postgres")

    def caught_up() -> bool:
        values = asyncio.run(last_seen(settings, devices))
        return all(values[d] is not None and int(values[d].timestamp() * 1000) == ms for d, ms in sent_ms.items())

    def behind() -> dict[str, tuple[datetime | None, int]]:
        values = asyncio.run(last_seen(settings, devices))
        return {d: (values[d], ms) for d, ms in sent_ms.items()
                if values[d] is None or int(values[d].timestamp() * 1000) != ms}

    assert wait_for(caught_up, timeout=60), (behind(), worker.log_text()[-3000:])
