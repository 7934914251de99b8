"""Tables of the ingest agent: dedup marks and per-device accounts (RocksDB + changelog topics).

Values are encoded by iotflow.dedup; the ingest pipeline writes them in batches through
:class:`iotflow.tables.batched.TableBatch`.
"""
from __future__ import annotations

import faust

from iotflow.settings import Settings
from iotflow.tables import bytes_table

MARKS = "dedup-marks"
ACCOUNTS = "device-accounts"
LATEST = "device-latest"


def marks(app: faust.App, settings: Settings) -> faust.Table:
    """``device_id/msg_id`` → ``[partition, offset, seen_at_ms]`` of the message that carried it first."""
    return bytes_table(app, settings, MARKS, "Dedup marks: which message first carried each (device_id, msg_id).")


def accounts(app: faust.App, settings: Settings) -> faust.Table:
    """``device_id`` (raw bytes, hashed like the sensor-data key) → the device's account."""
    return bytes_table(app, settings, ACCOUNTS, "Per-device accounting: received, accepted, duplicates, invalid, seq range.")


def latest(app: faust.App, settings: Settings) -> faust.Table:
    """``device_id`` → the last value of each of its metrics (:class:`iotflow.dedup.LatestValues`)."""
    return bytes_table(app, settings, LATEST, "Per-device last value of each metric, by measurement time.")
