"""The registry table: device id (raw bytes, partitioned like sensor-data) → the device's latest record."""
from __future__ import annotations

import faust

from iotflow.settings import Settings
from iotflow.tables import bytes_table

REGISTRY = "device-registry"
PRESENCE = "device-presence"


def registry(app: faust.App, settings: Settings) -> faust.Table:
    """Built from device-events: each device's :class:`iotflow.devices.RegistryEntry`."""
    return bytes_table(app, settings, REGISTRY, "Device registry: the latest record of each device, from device-events.")


def presence(app: faust.App, settings: Settings) -> faust.Table:
    """Device id → when a heartbeat last came (milliseconds since the epoch, as ASCII digits)."""
    return bytes_table(app, settings, PRESENCE, "Device presence: when each device's last heartbeat came.")
