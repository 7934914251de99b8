"""``message-counts``: messages seen per device, kept in RocksDB with a changelog topic."""
from __future__ import annotations

import faust

from iotflow.settings import Settings

NAME = "message-counts"


def define(app: faust.App, settings: Settings) -> faust.Table:
    return app.Table(
        NAME,
        key_type=str,
        value_type=int,
        default=int,
        partitions=settings.topic_partitions,
        help="Messages seen on sensor-data per device id.",
    )
