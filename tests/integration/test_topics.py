"""Topics on the real broker: created from the settings, and drift from them reported."""
from __future__ import annotations

import asyncio
import dataclasses

from iotflow import topics
from iotflow.kafka_admin import drift, ensure_topics


def test_created_topics_match_the_settings_and_a_second_run_creates_nothing(settings):
    assert asyncio.run(ensure_topics(settings)) == []  # the fixture created them already
    assert asyncio.run(drift(settings)) == []


def test_differences_from_the_settings_are_reported_per_topic_and_property(settings):
    wanted = dataclasses.replace(settings, topic_partitions=12, replication_factor=3, min_insync_replicas=2)
    found = {(d.topic, d.what, d.actual, d.expected) for d in asyncio.run(drift(wanted))}
    name = topics.name(settings, topics.SENSOR_DATA)
    assert (name, "partitions", "8", "12") in found
    assert (name, "replication factor", "1", "3") in found
    assert (name, "min.insync.replicas", "1", "2") in found


def test_a_missing_topic_is_reported(settings):
    other = dataclasses.replace(settings, topic_prefix=settings.topic_prefix + "absent-")
    found = asyncio.run(drift(other, names=(topics.SENSOR_DATA,)))
    assert [(d.what, d.actual) for d in found] == [("existence", "missing")]
