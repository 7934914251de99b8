"""Foundation agent: counts sensor-data messages per device in a RocksDB-backed table.

The telemetry-ingestion issue replaces it with validate → dedup → sink. It iterates event by
event on purpose: a table written from inside ``stream.take()`` would send every changelog
record to the partition of the batch's last event.
"""
from __future__ import annotations

import faust
import structlog

from iotflow import topics
from iotflow.settings import Settings
from iotflow.telemetry import InvalidPayload, device_id_of

log = structlog.get_logger(__name__)


def register(app: faust.App, settings: Settings, message_counts: faust.Table) -> None:
    @app.agent(topics.sensor_data(app, settings), name="iotflow.count")
    async def count(stream: faust.StreamT) -> None:
        async for event in stream.events():
            try:
                device_id = device_id_of(event.value)
            except InvalidPayload as exc:
                log.warning(
                    "invalid_payload",
                    field=exc.field,
                    reason=exc.reason,
                    partition=event.message.partition,
                    offset=event.message.offset,
                )
                continue
            message_counts[device_id.encode()] += 1
