"""The registry agent and the outbox relay timer.

The agent builds the registry table from ``device-events``: each event is applied when its outbox
``seq`` is above the device's last applied one (so a republished or replayed event takes effect
once). The relay runs on the leader worker only, every ``outbox_interval_s``.
"""
from __future__ import annotations

import asyncpg
import faust
import msgspec
import structlog
from aiokafka.errors import KafkaError

from iotflow import metrics, topics
from iotflow.cache import DeviceCache
from iotflow.devices import RegistryEntry, apply_event
from iotflow.outbox import OutboxRelay
from iotflow.settings import Settings

log = structlog.get_logger(__name__)


def register(app: faust.App, settings: Settings, registry: faust.Table, relay: OutboxRelay, cache: DeviceCache) -> None:
    @app.agent(topics.device_events(app, settings), name="iotflow.devices")
    async def devices(stream: faust.StreamT) -> None:
        async for event in stream.events():
            key: bytes = event.key or b""
            stored = registry.get(key)
            try:
                entry = apply_event(RegistryEntry.decode(stored) if stored else None, msgspec.json.decode(event.value))
            except (msgspec.DecodeError, KeyError, TypeError, ValueError) as exc:
                log.error("device_event_unreadable", partition=event.message.partition,
                          offset=event.message.offset, error=str(exc))
                metrics.DEVICE_EVENTS.labels("unreadable").inc()
                continue
            if entry is None:
                metrics.DEVICE_EVENTS.labels("duplicate").inc()
                continue
            registry[key] = entry.encode()
            metrics.DEVICE_EVENTS.labels("applied").inc()
            # Changes made through any worker (or any other writer of the outbox) reach the cache here.
            await cache.invalidate(key.decode(), int(entry.device["version"]))

    @app.timer(settings.outbox_interval_s, name="iotflow.outbox.relay", on_leader=True)
    async def relay_outbox() -> None:
        try:
            while await relay.relay_once() == relay.batch_size:
                pass  # a full batch: more may be waiting
        except (asyncpg.PostgresError, asyncpg.InterfaceError, KafkaError, OSError, TimeoutError) as exc:
            log.warning("outbox_relay_failed", error=f"{exc.__class__.__name__}: {exc}")  # next round retries
