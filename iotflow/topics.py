"""Names and Kafka configuration of iotflow's topics (the contract in docs and design.md).

Every name carries ``IOTFLOW_TOPIC_PREFIX`` (empty by default), so several environments — or
test runs — can share one Kafka cluster without reading each other's data.
"""
from __future__ import annotations

import faust

from iotflow.settings import Settings

SENSOR_DATA = "sensor-data"
SENSOR_DATA_DLQ = "sensor-data-dlq"
DEVICE_EVENTS = "device-events"
FIRMWARE_STATUS = "firmware-status"
ROLLOUT_PROGRESS = "rollout-progress"

# The header naming what a record is: telemetry, heartbeat or firmware/status from the bridge,
# lifecycle from the outbox relay (device-events carries both lifecycle events and heartbeats).
KIND_HEADER = "iotflow-kind"

# Topics iotflow creates up front (Faust creates its own changelog topics).
ALL = (SENSOR_DATA, SENSOR_DATA_DLQ, DEVICE_EVENTS, FIRMWARE_STATUS, ROLLOUT_PROGRESS)


def name(settings: Settings, topic: str) -> str:
    return settings.topic_prefix + topic


def topic_config(settings: Settings, topic: str) -> dict[str, str]:
    """Broker-side configuration the iotflow topic ``topic`` (unprefixed) is created with."""
    config = {"min.insync.replicas": str(settings.min_insync_replicas)}
    if topic == ROLLOUT_PROGRESS:
        config["cleanup.policy"] = "compact"  # only each rollout's latest snapshot matters
    return config


def _raw_topic(app: faust.App, settings: Settings, topic: str) -> faust.TopicT:
    return app.topic(
        name(settings, topic),
        key_type=bytes,
        value_type=bytes,
        key_serializer="raw",
        value_serializer="raw",
        partitions=settings.topic_partitions,
        replicas=settings.replication_factor,
        config=topic_config(settings, topic),
    )


def sensor_data(app: faust.App, settings: Settings) -> faust.TopicT:
    """Raw telemetry from the bridge, keyed by device id; values are the devices' bytes."""
    return _raw_topic(app, settings, SENSOR_DATA)


def sensor_data_dlq(app: faust.App, settings: Settings) -> faust.TopicT:
    """Messages the ingest agent could not store: original key and bytes, the reason in headers."""
    return _raw_topic(app, settings, SENSOR_DATA_DLQ)


def firmware_status(app: faust.App, settings: Settings) -> faust.TopicT:
    """Devices' firmware status reports from the bridge, keyed by device id."""
    return _raw_topic(app, settings, FIRMWARE_STATUS)


def device_events(app: faust.App, settings: Settings) -> faust.TopicT:
    """Device lifecycle events (outbox relay) and heartbeats (bridge), keyed by device id; the
    ``iotflow-kind`` header tells them apart."""
    return _raw_topic(app, settings, DEVICE_EVENTS)


def rollout_progress(app: faust.App, settings: Settings) -> faust.TopicT:
    """Snapshots of rollouts' progress from the leader's orchestrator, keyed by rollout id (JSON)."""
    return _raw_topic(app, settings, ROLLOUT_PROGRESS)
