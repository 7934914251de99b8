"""Faust table definitions and their small helpers."""
from __future__ import annotations

import faust

from iotflow.settings import Settings


def bytes_table(app: faust.App, settings: Settings, name: str, help: str) -> faust.Table:
    """A table with bytes keys and values (stored raw), partitioned like iotflow's topics.

    Keys are device-keyed like ``sensor-data`` (or start with the device id), so a table's
    partition is the partition of the messages of the devices it holds.
    """
    return app.Table(name, key_type=bytes, value_type=bytes, partitions=settings.topic_partitions, help=help)
