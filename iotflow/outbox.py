"""The outbox relay: device events from PostgreSQL's ``device_outbox`` to the ``device-events`` topic.

One round (:meth:`OutboxRelay.relay_once`), in one PostgreSQL transaction:

1. take the relay lock (``pg_try_advisory_xact_lock``): one relay at a time, even while two
   workers both believe they lead during a rebalance, so events leave in ``seq`` order;
2. read the oldest unpublished rows (at most ``batch_size``), in ``seq`` order;
3. produce each to ``device-events`` keyed by device id (so one device's events stay in one
   partition, in order), with an idempotent producer and acks=all, and wait for every ack;
4. mark the rows published and commit.

A crash after 3 and before 4 leaves the rows unpublished, so the next round publishes them again:
the topic may hold an event twice, never lose one. Every event carries its ``event_id`` and its
outbox ``seq`` (increasing per device, since changes of a device are serialised by its row lock),
and consumers apply an event only when its ``seq`` is above the last they applied for that device
(iotflow/agents/devices.py), so each event takes effect once.
"""
from __future__ import annotations

import asyncio
import json

import asyncpg
import structlog
from aiokafka import AIOKafkaProducer

from iotflow import metrics, topics
from iotflow.pg import LazyPool

log = structlog.get_logger(__name__)

# pg_advisory lock key of the relay: "iotflow outbox" folded into a bigint.
RELAY_LOCK = 0x696F74666C6F7701


class OutboxRelay:
    def __init__(self, pool: LazyPool, *, bootstrap: str, topic: str, batch_size: int, request_timeout_s: float) -> None:
        self.pool = pool
        self.bootstrap = bootstrap
        self.topic = topic
        self.batch_size = batch_size
        self.request_timeout_s = request_timeout_s
        self._producer: AIOKafkaProducer | None = None

    async def _get_producer(self) -> AIOKafkaProducer:
        if self._producer is None:
            producer = AIOKafkaProducer(bootstrap_servers=self.bootstrap, acks="all", enable_idempotence=True,
                                        linger_ms=5, request_timeout_ms=int(self.request_timeout_s * 1000))
            await producer.start()
            self._producer = producer
        return self._producer

    async def relay_once(self) -> int:
        """Publish the next batch of unpublished events; return how many were published."""
        pool = await self.pool.get()
        async with self.pool.acquire(pool) as conn, conn.transaction():
            if not await conn.fetchval("SELECT pg_try_advisory_xact_lock($1)", RELAY_LOCK):
                return 0  # another relay holds it
            rows = await conn.fetch(
                "SELECT seq, event_id, device_id, payload FROM device_outbox WHERE published_at IS NULL "
                "ORDER BY seq LIMIT $1", self.batch_size)
            if not rows:
                return 0
            await self._publish(rows)
            await conn.execute("UPDATE device_outbox SET published_at = now() WHERE seq = ANY($1::bigint[])",
                               [r["seq"] for r in rows])
        metrics.OUTBOX_PUBLISHED.inc(len(rows))
        log.info("outbox_published", events=len(rows), last_seq=rows[-1]["seq"])
        return len(rows)

    async def _publish(self, rows: list[asyncpg.Record]) -> None:
        producer = await self._get_producer()
        try:
            deliveries = []
            for row in rows:
                event = {**json.loads(row["payload"]), "seq": row["seq"]}
                deliveries.append(await producer.send(
                    self.topic, key=row["device_id"].encode(), value=json.dumps(event).encode(),
                    headers=[("iotflow-event-id", str(row["event_id"]).encode()), (topics.KIND_HEADER, b"lifecycle")]))
            await asyncio.wait_for(asyncio.gather(*deliveries), self.request_timeout_s)
        except BaseException:
            # The round is rolled back and retried; it gets a fresh producer, since an idempotent
            # one can stay stuck after failed sends (aiokafka #1017, KAFKA-15591).
            await self.stop()
            raise

    async def stop(self) -> None:
        if self._producer is not None:
            producer, self._producer = self._producer, None
            await producer.stop()
