"""``message-counts``: messages seen per device, kept in RocksDB with a changelog topic."""
from __future__ import annotations

import faust

from iotflow.settings import Settings

NAME = "message-counts"


def define(app: faust.App, settings: Settings) -> faust.Table:
    return app.Table(
        NAME,
        # Keys are the raw device-id bytes, hashed exactly as the bridge keys sensor-data, so a
        # device's count lives in the partition of its messages and @app.table_route finds the
        # worker that owns it. (A str key would be JSON-encoded and hash elsewhere.)
        key_type=bytes,
        value_type=int,
        default=int,
        partitions=settings.topic_partitions,
        help="Messages seen on sensor-data per device id.",
    )
