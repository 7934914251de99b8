"""The devices agent, the outbox relay timer and the last_seen writer.

``device-events`` carries two kinds of record, told apart by the ``iotflow-kind`` header:

- lifecycle events from the outbox relay: the registry table applies each when its outbox
  ``seq`` is above the device's last applied one (a republished or replayed event takes effect
  once), and the Redis cache entry of the device is replaced by a tombstone of the new version;
- heartbeats from the bridge: the presence table records when each device was last seen (written
  to its changelog in batches: when the agent's buffer runs empty, every 1,000 heartbeats, and
  before any lifecycle event — so a heartbeat may be acknowledged before its batch is written, and
  a crash in between costs its time until the device's next heartbeat), and the
  times are written to PostgreSQL's ``devices.last_seen`` in batches every
  ``last_seen_flush_s``; while PostgreSQL is away they wait in memory (one entry per device) and
  go with the next flush — delayed, not lost (a crash meanwhile costs them until the device's
  next heartbeat, which carries a later time anyway).

The relay runs on the leader worker only, every ``outbox_interval_s``.
"""
from __future__ import annotations

from datetime import UTC, datetime

import asyncpg
import faust
import msgspec
import structlog
from aiokafka.errors import KafkaError

from iotflow import metrics, topics
from iotflow.cache import DeviceCache
from iotflow.devices import RegistryEntry, apply_event, heartbeat_seen_ms
from iotflow.errors import InvalidRequest, IotflowError
from iotflow.outbox import OutboxRelay
from iotflow.registry import DeviceRegistry
from iotflow.settings import Settings
from iotflow.agents.timers import Outage, survives
from iotflow.tables.batched import TableBatch, write_all

log = structlog.get_logger(__name__)

_HEARTBEATS_PER_WRITE = 1000
_TRANSIENT = (asyncpg.PostgresError, asyncpg.InterfaceError, KafkaError, OSError, TimeoutError, IotflowError)


def register(app: faust.App, settings: Settings, *, registry_table: faust.Table, presence: faust.Table,
             registry: DeviceRegistry, relay: OutboxRelay, cache: DeviceCache) -> None:
    unsaved: dict[str, datetime] = {}  # heartbeats not yet in PostgreSQL: device id → last seen
    relay_outage, last_seen_outage = Outage("outbox_relay_failed"), Outage("last_seen_flush_failed")
    # Written through TableBatch, like the ingest agent's tables: a lifecycle event's change is
    # durable before Faust acknowledges it; heartbeats are written in batches (module docstring).
    entries = TableBatch(app, registry_table, RegistryEntry)
    seen = TableBatch(app, presence, _Millis)

    def lifecycle(partition: int, key: bytes, value: bytes) -> tuple[str, int] | None:
        """Apply a lifecycle event to the batch; the cache entry to invalidate once it is durable."""
        entry = apply_event(entries.get(partition, key), msgspec.json.decode(value))
        if entry is None:
            metrics.DEVICE_EVENTS.labels("duplicate").inc()
            return None
        entries.set(partition, key, entry)
        metrics.DEVICE_EVENTS.labels("applied").inc()
        return key.decode(), int(entry.device["version"])

    def heartbeat(partition: int, key: bytes, value: bytes, timestamp_s: float) -> None:
        seen_ms = heartbeat_seen_ms(key, value, int(timestamp_s * 1000))
        held = seen.get(partition, key)
        if held is None or held < seen_ms:
            seen.set(partition, key, seen_ms)
            unsaved[key.decode()] = datetime.fromtimestamp(seen_ms / 1000, UTC)
        metrics.DEVICE_EVENTS.labels("heartbeat").inc()

    @app.agent(topics.device_events(app, settings), name="iotflow.devices")
    async def devices(stream: faust.StreamT) -> None:
        queue = getattr(stream.channel, "queue", None)  # the agent's buffer of delivered events
        async for event in stream.events():
            key: bytes = event.key or b""
            kind = dict(event.headers or {}).get(topics.KIND_HEADER, b"lifecycle")
            changed = None
            try:
                partition = event.message.partition
                if kind == b"heartbeat":
                    heartbeat(partition, key, event.value, event.message.timestamp)
                else:
                    changed = lifecycle(partition, key, event.value)
            except (InvalidRequest, msgspec.DecodeError, KeyError, TypeError, ValueError) as exc:
                log.error("device_event_unreadable", kind=kind.decode(errors="replace"), key=key[:80],
                          value=event.value[:200], partition=event.message.partition,
                          offset=event.message.offset, error=str(exc))
                metrics.DEVICE_EVENTS.labels("unreadable").inc()
            if changed is not None or seen.pending >= _HEARTBEATS_PER_WRITE or queue is None or queue.empty():
                await write_all((entries, entries.take()), (seen, seen.take()))
            if changed is not None:
                # Changes made through any worker (or any other writer of the outbox) reach the cache here.
                await cache.invalidate(*changed)

    @app.timer(settings.outbox_interval_s, name="iotflow.outbox.relay", on_leader=True)
    @survives("outbox_relay")
    async def relay_outbox() -> None:
        try:
            while await relay.relay_once() == relay.batch_size:
                pass  # a full batch: more may be waiting
        except _TRANSIENT as exc:
            relay_outage.failed(exc)  # next round retries
            return
        relay_outage.succeeded()

    @app.timer(settings.last_seen_flush_s, name="iotflow.devices.last_seen")
    @survives("last_seen")
    async def save_last_seen() -> None:
        if not unsaved:
            return
        batch = dict(unsaved)
        try:
            moved = await registry.record_last_seen(batch)
        except _TRANSIENT as exc:
            last_seen_outage.failed(exc, devices=len(batch))
            return  # kept: the next flush takes them (with any newer times)
        last_seen_outage.succeeded()
        for device_id, seen in batch.items():
            if unsaved.get(device_id) == seen:
                del unsaved[device_id]
        metrics.LAST_SEEN_SAVED.inc(moved)


class _Millis:
    """Codec of the presence table's values: milliseconds since the epoch as ASCII digits."""

    @staticmethod
    def encode(value: int) -> bytes:
        return str(value).encode()

    @staticmethod
    def decode(raw: bytes) -> int:
        return int(raw)
