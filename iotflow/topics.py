"""Names and Kafka configuration of iotflow's topics (the contract in docs and design.md)."""
from __future__ import annotations

import faust

from iotflow.settings import Settings

SENSOR_DATA = "sensor-data"

# Topics iotflow creates up front (Faust creates its own changelog topics).
ALL = (SENSOR_DATA,)


def topic_config(settings: Settings) -> dict[str, str]:
    """Broker-side configuration every iotflow topic is created with."""
    return {"min.insync.replicas": str(settings.min_insync_replicas)}


def sensor_data(app: faust.App, settings: Settings) -> faust.TopicT:
    """Raw telemetry from the bridge, keyed by device id; values are the devices' bytes."""
    return app.topic(
        SENSOR_DATA,
        key_type=bytes,
        value_type=bytes,
        key_serializer="raw",
        value_serializer="raw",
        partitions=settings.topic_partitions,
        replicas=settings.replication_factor,
        config=topic_config(settings),
    )
