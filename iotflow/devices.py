"""Device records: what a registration, a change and a list query may say (plain logic, no I/O).

Every check names the field, the value and what was expected, and a request is checked whole: a
body with three mistakes gets three errors in one answer, never one at a time.
"""
from __future__ import annotations

import base64
import binascii
import re
from collections.abc import Collection
from dataclasses import dataclass, field
from enum import Enum
from datetime import datetime, timedelta
from typing import Any

import msgspec

from iotflow.errors import InvalidRequest
from iotflow.telemetry import DEVICE_ID, METRIC, NOT_JSON

TYPE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.:-]{0,63}")
TAG = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.:=/-]{0,63}")
FIRMWARE_VERSION = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.+-]{0,63}")
STATUSES = ("provisioned", "active", "inactive", "maintenance")
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")  # PostgreSQL text cannot hold NUL; none belongs in a name
MAX_NAME = 200
MAX_TAGS = 32
MAX_PAGE = 500
DEFAULT_PAGE = 100

_REGISTRATION_FIELDS = ("id", "name", "type", "tags", "firmware_version", "status")
_CHANGEABLE_FIELDS = ("name", "type", "tags", "firmware_version", "status")


@dataclass(frozen=True)
class Registration:
    id: str
    name: str
    type: str
    tags: tuple[str, ...] = ()
    firmware_version: str | None = None
    status: str = "active"


@dataclass(frozen=True)
class Change:
    """The fields a PATCH sets; absent fields keep their value (``firmware_version`` may be set to null)."""

    values: dict[str, Any]


@dataclass(frozen=True)
class DeviceQuery:
    type: str | None = None
    status: str | None = None
    firmware_version: str | None = None
    tags: tuple[str, ...] = ()
    limit: int = DEFAULT_PAGE
    after: str | None = None  # the last id of the previous page (keyset pagination by id)
    q: str | None = None  # a piece of the id or the name, any case


@dataclass(frozen=True)
class Device:
    id: str
    name: str
    type: str
    tags: tuple[str, ...]
    firmware_version: str | None
    status: str
    created_at: datetime
    updated_at: datetime
    last_seen: datetime | None
    version: int
    deleted_at: datetime | None = None

    @property
    def etag(self) -> str:
        return f'"{self.version}"'

    def to_json(self) -> dict[str, Any]:
        return {
            "id": self.id, "name": self.name, "type": self.type, "tags": list(self.tags),
            "firmware_version": self.firmware_version, "status": self.status,
            "created_at": self.created_at.isoformat(), "updated_at": self.updated_at.isoformat(),
            "last_seen": self.last_seen.isoformat() if self.last_seen else None,
            "version": self.version,
            "deleted_at": self.deleted_at.isoformat() if self.deleted_at else None,
        }

    @classmethod
    def from_json(cls, value: dict[str, Any]) -> Device:
        """The inverse of :meth:`to_json` (a cached record back into a device)."""
        def instant(raw: str | None) -> datetime | None:
            return datetime.fromisoformat(raw) if raw else None

        return cls(value["id"], value["name"], value["type"], tuple(value["tags"]), value["firmware_version"],
                   value["status"], datetime.fromisoformat(value["created_at"]),
                   datetime.fromisoformat(value["updated_at"]), instant(value["last_seen"]), value["version"],
                   instant(value["deleted_at"]))

    def differs_from(self, registration: Registration) -> list[str]:
        """The registration's fields whose values this device does not have."""
        return [name for name in _REGISTRATION_FIELDS[1:] if getattr(self, name) != getattr(registration, name)]


@dataclass
class FieldErrors:
    found: list[dict[str, Any]] = field(default_factory=list)

    def add(self, field_name: str, value: Any, reason: str) -> None:
        self.found.append({"field": field_name, "value": value, "reason": reason})

    def raise_any(self, title: str) -> None:
        if self.found:
            raise InvalidRequest(title, self.found)


def json_object(body: bytes) -> dict[str, Any]:
    try:
        value = msgspec.json.decode(body)
    except NOT_JSON as exc:
        raise InvalidRequest("Body is not JSON", [{"field": "body", "value": None, "reason": str(exc)}]) from None
    if not isinstance(value, dict):
        raise InvalidRequest("Body is not a JSON object",
                             [{"field": "body", "value": type(value).__name__, "reason": "expected an object"}])
    return value


def check_text(errors: FieldErrors, name: str, value: Any, pattern: re.Pattern[str], expected: str) -> str | None:
    if not isinstance(value, str) or not pattern.fullmatch(value):
        errors.add(name, value, f"expected {expected}")
        return None
    return value


def _check_field(errors: FieldErrors, name: str, value: Any) -> Any:
    """One field of a registration or a change, checked; returns the value to store."""
    if name == "id":
        return check_text(errors, name, value, DEVICE_ID, "letters, digits and _.:- only, 1-128 characters")
    if name == "name":
        if not isinstance(value, str) or not value.strip() or len(value) > MAX_NAME or _CONTROL.search(value):
            errors.add(name, value, f"expected a non-blank string of at most {MAX_NAME} characters, "
                                    "without control characters")
        return value
    if name == "type":
        return check_text(errors, name, value, TYPE, "letters, digits and _.:- only, 1-64 characters")
    if name == "tags":
        if not isinstance(value, list) or len(value) > MAX_TAGS:
            errors.add(name, value, f"expected a list of at most {MAX_TAGS} tags")
            return ()
        for i, tag in enumerate(value):
            check_text(errors, f"tags[{i}]", tag, TAG, "letters, digits and _.:=/- only, 1-64 characters")
        return tuple(sorted({t for t in value if isinstance(t, str)}))
    if name == "firmware_version":
        if value is None:
            return None
        return check_text(errors, name, value, FIRMWARE_VERSION, "null or letters, digits and _.+- only, 1-64 characters")
    if name == "status":
        if value not in STATUSES:
            errors.add(name, value, f"expected one of {', '.join(STATUSES)}")
        return value
    raise AssertionError(name)


def parse_registration(body: bytes, reserved: Collection[str] = ()) -> Registration:
    """A registration; ``reserved`` ids (the MQTT platform accounts' names) are refused."""
    raw = json_object(body)
    errors = FieldErrors()
    for name in sorted(set(raw) - set(_REGISTRATION_FIELDS)):
        errors.add(name, raw[name], "unknown field")
    for name in ("id", "name", "type"):
        if name not in raw:
            errors.add(name, None, "required")
    values = {name: _check_field(errors, name, raw[name]) for name in _REGISTRATION_FIELDS if name in raw}
    if values.get("id") in reserved:
        errors.add("id", values["id"], "reserved: the name of one of the platform's MQTT accounts")
    errors.raise_any("Invalid device registration")
    return Registration(**values)


def parse_change(body: bytes) -> Change:
    raw = json_object(body)
    errors = FieldErrors()
    for name in sorted(set(raw) - set(_CHANGEABLE_FIELDS)):
        reason = "cannot be changed" if name in ("id", "version", "created_at", "updated_at", "deleted_at",
                                                 "last_seen") else "unknown field"
        errors.add(name, raw[name], reason)
    if not raw:
        errors.add("body", {}, f"expected at least one of {', '.join(_CHANGEABLE_FIELDS)}")
    values = {name: _check_field(errors, name, raw[name]) for name in _CHANGEABLE_FIELDS if name in raw}
    errors.raise_any("Invalid device change")
    return Change(values)


def parse_if_match(header: str | None) -> int | None:
    """The version an ``If-Match`` header names (``"3"``, ``W/"3"`` or ``3``); None when absent."""
    if header is None:
        return None
    text = header.strip()
    if text.startswith("W/"):
        text = text[2:]
    text = text.strip('"')
    if not text.isdigit() or int(text) < 1:
        raise InvalidRequest("Invalid If-Match", [{"field": "If-Match", "value": header,
                                                   "reason": 'expected a device version as an entity tag, e.g. "3"'}])
    return int(text)


def encode_cursor(last_id: str) -> str:
    return base64.urlsafe_b64encode(last_id.encode()).decode().rstrip("=")


def _decode_cursor(errors: FieldErrors, cursor: str) -> str | None:
    try:
        last_id = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4)).decode()
    except (binascii.Error, UnicodeDecodeError, ValueError):
        last_id = ""
    if not DEVICE_ID.fullmatch(last_id):
        errors.add("cursor", cursor, "not a cursor this API gave out")
        return None
    return last_id


def parse_query(params: Any) -> DeviceQuery:
    """``GET /devices`` query parameters (a multidict: ``tag`` may repeat)."""
    errors = FieldErrors()
    known = {"type", "status", "firmware_version", "tag", "limit", "cursor", "q"}
    for name in sorted(set(params.keys()) - known):
        errors.add(name, params.get(name), "unknown query parameter")
    values: dict[str, Any] = {}
    for name in ("type", "status", "firmware_version"):
        if name in params:
            values[name] = _check_field(errors, name, params.get(name))
    values["tags"] = tuple(sorted({check_text(errors, "tag", t, TAG, "a tag") or "" for t in params.getall("tag", [])}))
    if "limit" in params:
        raw = params.get("limit")
        if not raw.isdigit() or not 1 <= int(raw) <= MAX_PAGE:
            errors.add("limit", raw, f"expected an integer from 1 to {MAX_PAGE}")
        else:
            values["limit"] = int(raw)
    if "cursor" in params:
        values["after"] = _decode_cursor(errors, params.get("cursor"))
    if "q" in params:
        q = params.get("q")
        if not 1 <= len(q) <= MAX_NAME or _CONTROL.search(q):
            errors.add("q", q, f"1 to {MAX_NAME} characters without control characters")
        else:
            values["q"] = q
    errors.raise_any("Invalid device query")
    return DeviceQuery(**values)


@dataclass
class RegistryEntry:
    """A device as the registry table holds it: its record from the latest event applied.

    ``seq`` is that event's outbox sequence number; an event at or below it was applied before
    (a republished or replayed event) and changes nothing. ``events`` counts the events applied.
    """

    device: dict[str, Any]
    seq: int
    events: int

    @property
    def deleted(self) -> bool:
        return self.device.get("deleted_at") is not None

    def encode(self) -> bytes:
        return msgspec.json.encode({"device": self.device, "seq": self.seq, "events": self.events})

    @classmethod
    def decode(cls, raw: bytes) -> RegistryEntry:
        value = msgspec.json.decode(raw)
        return cls(value["device"], int(value["seq"]), int(value["events"]))


class DeviceStatus(Enum):
    """What the registry table says of a device, for its telemetry (values name DLQ kinds)."""

    REGISTERED = "registered"
    DELETED = "deleted_device"
    UNKNOWN = "unknown"  # not (yet) in the registry: its telemetry waits for the registration
    UNKNOWN_DEVICE = "unknown_device"  # waited as long as it may: its telemetry goes to the DLQ


def registry_status(raw: bytes | None) -> DeviceStatus:
    """The status of a device from its registry table value (None: no entry)."""
    if raw is None:
        return DeviceStatus.UNKNOWN
    return DeviceStatus.DELETED if RegistryEntry.decode(raw).deleted else DeviceStatus.REGISTERED


def apply_event(entry: RegistryEntry | None, event: dict[str, Any]) -> RegistryEntry | None:
    """The entry after ``event`` (a device-events record), or None when the event was applied before."""
    seq = int(event["seq"])
    if entry is not None and seq <= entry.seq:
        return None
    return RegistryEntry(event["device"], seq, (entry.events if entry else 0) + 1)


MAX_BUCKETS = 10_000
_DURATION = re.compile(r"([1-9][0-9]{0,5})(s|m|h|d)")
_UNIT_S = {"s": 1, "m": 60, "h": 3600, "d": 86400}


@dataclass(frozen=True)
class TelemetryQuery:
    start: datetime
    end: datetime
    bucket_s: int
    metric: str | None = None


def _instant(errors: FieldErrors, name: str, raw: str) -> datetime | None:
    try:
        value = datetime.fromisoformat(raw)
    except ValueError:
        errors.add(name, raw, "expected an ISO 8601 time with a UTC offset, e.g. 2026-11-29T08:00:00Z")
        return None
    if value.tzinfo is None:
        errors.add(name, raw, "expected a UTC offset (e.g. Z or +01:00): a time without one is ambiguous")
        return None
    return value


def parse_telemetry_query(params: Any, now: datetime) -> TelemetryQuery:
    """``GET /devices/{id}/telemetry`` parameters: ``from``/``to`` (default: the last hour),
    ``bucket`` as ``<n>s|m|h|d`` (default 1m), ``metric`` (default: every metric)."""
    errors = FieldErrors()
    for name in sorted(set(params.keys()) - {"from", "to", "bucket", "metric"}):
        errors.add(name, params.get(name), "unknown query parameter")
    end = _instant(errors, "to", params.get("to")) if "to" in params else now
    start = _instant(errors, "from", params.get("from")) if "from" in params else None
    bucket_s = 60
    if "bucket" in params:
        match = _DURATION.fullmatch(params.get("bucket"))
        if match is None:
            errors.add("bucket", params.get("bucket"), "expected a duration like 10s, 5m, 1h or 1d")
        else:
            bucket_s = int(match.group(1)) * _UNIT_S[match.group(2)]
    metric = params.get("metric")
    if metric is not None and not METRIC.fullmatch(metric):
        errors.add("metric", metric, "expected a metric name (letters, digits, _ and .)")
    if end is not None and start is None and "from" not in params:
        start = end - timedelta(hours=1)
    if start is not None and end is not None:
        if start >= end:
            errors.add("from", params.get("from"), "must be before `to`")
        elif (end - start).total_seconds() / bucket_s > MAX_BUCKETS:
            errors.add("bucket", params.get("bucket", "1m"),
                       f"too fine for this range: at most {MAX_BUCKETS} buckets per query")
    errors.raise_any("Invalid telemetry query")
    assert start is not None and end is not None
    return TelemetryQuery(start, end, bucket_s, metric)


def heartbeat_seen_ms(key: bytes, value: bytes, kafka_timestamp_ms: int) -> int:
    """When a heartbeat says the device was seen: the time Kafka took it (the bridge's clock, not the
    device's, which may be wrong); the payload must name the key's device."""
    try:
        body = msgspec.json.decode(value)
    except NOT_JSON as exc:
        raise InvalidRequest("Invalid heartbeat", [{"field": "body", "value": value[:80], "reason": str(exc)}]) from None
    device_id = body.get("device_id") if isinstance(body, dict) else None
    if not isinstance(device_id, str) or device_id.encode() != key:
        raise InvalidRequest("Invalid heartbeat", [{"field": "device_id", "value": device_id,
                                                    "reason": f"does not match the message key {key!r}"}])
    return kafka_timestamp_ms
