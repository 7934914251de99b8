"""Decoding of telemetry payloads (plain logic, no I/O)."""
from __future__ import annotations

import json

from iotflow.errors import IotflowError


class InvalidPayload(IotflowError):
    """A message that cannot be processed: names the field and the value."""

    def __init__(self, field: str, value: object, reason: str) -> None:
        self.field = field
        self.value = value
        self.reason = reason
        super().__init__(f"{field}: {reason} (got {value!r})")


def device_id_of(raw: bytes) -> str:
    """Return the ``device_id`` of a JSON telemetry payload, or raise :class:`InvalidPayload`."""
    try:
        payload = json.loads(raw)
    except (UnicodeDecodeError, ValueError):
        raise InvalidPayload("payload", raw[:64], "not a JSON document") from None
    if not isinstance(payload, dict):
        raise InvalidPayload("payload", type(payload).__name__, "expected a JSON object")
    device_id = payload.get("device_id")
    if not isinstance(device_id, str) or not device_id:
        raise InvalidPayload("device_id", device_id, "expected a non-empty string")
    return device_id
