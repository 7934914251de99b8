from __future__ import annotations

import pytest

from iotflow.bridge import Route, route, subscriptions


@pytest.mark.parametrize(
    ("topic", "expected"),
    [
        ("devices/d1/telemetry", Route("d1", "telemetry", "sensor-data")),
        ("devices/d1/heartbeat", Route("d1", "heartbeat", "device-events")),
        ("devices/d1/firmware/status", Route("d1", "firmware/status", "firmware-status")),
    ],
)
def test_device_topics_map_to_kafka_topics_keyed_by_the_device(topic, expected):
    assert route(topic) == expected


@pytest.mark.parametrize("topic", ["devices//telemetry", "devices/d1/commands", "other/d1/telemetry", "devices/d1"])
def test_anything_else_is_not_served(topic):
    assert route(topic) is None


def test_bridges_share_one_subscription_per_device_topic():
    assert subscriptions("g") == ["$share/g/devices/+/telemetry", "$share/g/devices/+/heartbeat",
                                  "$share/g/devices/+/firmware/status"]


def test_an_exclusive_subscription_has_no_share_prefix():
    assert subscriptions("g", "exclusive") == ["devices/+/telemetry", "devices/+/heartbeat", "devices/+/firmware/status"]


def test_devices_may_publish_exactly_the_topics_the_bridge_serves():
    from iotflow.bridge import ROUTES
    from iotflow.mqtt_auth import DEVICE_PUBLISHES, acl_file_text

    assert set(DEVICE_PUBLISHES) == set(ROUTES)
    assert {line.split()[-1] for line in acl_file_text().splitlines() if line.startswith("pattern write")} == {
        f"devices/%u/{suffix}" for suffix in ROUTES}
