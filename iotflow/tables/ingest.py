"""Tables of the ingest agent: dedup marks and per-device accounts (RocksDB + changelog topics).

Keys and values are bytes, so Faust stores them raw (values encoded by iotflow.dedup); the ingest pipeline writes them
in batches through :class:`iotflow.tables.batched.TableBatch`.
"""
from __future__ import annotations

import faust

from iotflow.settings import Settings

MARKS = "dedup-marks"
ACCOUNTS = "device-accounts"


def marks(app: faust.App, settings: Settings) -> faust.Table:
    """``device_id/msg_id`` → ``[partition, offset, seen_at_ms]`` of the message that carried it first."""
    return app.Table(
        MARKS,
        key_type=bytes,
        value_type=bytes,
        partitions=settings.topic_partitions,
        help="Dedup marks: which message first carried each (device_id, msg_id).",
    )


def accounts(app: faust.App, settings: Settings) -> faust.Table:
    """``device_id`` (raw bytes, hashed like the sensor-data key) → the device's account."""
    return app.Table(
        ACCOUNTS,
        key_type=bytes,
        value_type=bytes,
        partitions=settings.topic_partitions,
        help="Per-device accounting: received, accepted, duplicates, invalid, seq range.",
    )
