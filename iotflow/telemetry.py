"""Decoding and validation of telemetry payloads (plain logic, no I/O).

The contract (design.md)::

    {"device_id": str, "msg_id": str, "seq": int, "ts": RFC 3339 or epoch ms, "metrics": {name: number}}

:func:`parse` turns the raw bytes of one message into a :class:`Telemetry` or raises
:class:`InvalidPayload` naming the field, the value and the reason; the ingest agent sends those to
the DLQ with the original bytes. Unknown fields are rejected: a producer that sends them is
misconfigured and should hear about it rather than lose data silently.
"""
from __future__ import annotations

import math
import re
import time as _time
from dataclasses import dataclass
from functools import cached_property
from datetime import UTC, datetime, timedelta
from typing import NamedTuple

import msgspec

from iotflow.errors import NOT_SHOWN, InvalidPayload

DEVICE_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.:-]{0,127}")
MSG_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.:-]{0,127}")
METRIC = re.compile(r"[A-Za-z_][A-Za-z0-9_.]{0,63}")
MAX_SEQ = 2**63 - 1
# What msgspec raises for bytes that are no acceptable JSON document, beyond ``DecodeError``:
# ``UnicodeDecodeError`` for invalid UTF-8 inside a string, ``RecursionError`` for nesting deeper
# than it decodes (a hostile ``[[[[…`` of a few thousand levels).
NOT_JSON = (msgspec.DecodeError, UnicodeDecodeError, RecursionError)
_MSGSPEC_PATH = re.compile(r" - at `\$\.?([^`]*)`$")
_UNKNOWN_FIELD = re.compile(r"unknown field `([^`]*)`")


@dataclass(frozen=True)
class Limits:
    """What :func:`parse` accepts beyond the types: sizes and the time window."""

    max_payload_bytes: int = 64 * 1024
    max_metrics: int = 256
    max_clock_skew: timedelta = timedelta(minutes=5)
    retention: timedelta = timedelta(days=90)

    @cached_property
    def _window_us(self) -> tuple[int, int]:
        """(skew, retention) in microseconds: ``ts`` is checked in integers."""
        return self.max_clock_skew // _US, self.retention // _US


class Telemetry(NamedTuple):
    """One valid message (a named tuple: one is made per message, and a frozen dataclass's
    ``__init__`` costs several times as much)."""

    device_id: str
    msg_id: str
    seq: int
    time: datetime
    metrics: tuple[tuple[str, float], ...]

    def rows(self) -> list[tuple[datetime, str, str, float, str, int]]:
        """``sensor_measurements`` rows: (time, device_id, metric, value, msg_id, seq)."""
        return [(self.time, self.device_id, name, value, self.msg_id, self.seq) for name, value in self.metrics]


class _Wire(msgspec.Struct, forbid_unknown_fields=True):
    device_id: str
    msg_id: str
    seq: int
    ts: int | str
    metrics: dict[str, float]


_decoder = msgspec.json.Decoder(_Wire)
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_US = timedelta(microseconds=1)
# Device ids and metric names that passed their patterns: a fleet sends the same ones again and
# again. Bounded: cleared when full (a sender of ever new names costs the check, never memory).
_DEVICES_PASSED: set[str] = set()
_METRICS_PASSED: set[str] = set()
_PASSED_MAX = 100_000


def parse(raw: bytes, limits: Limits, *, now: datetime | None = None) -> Telemetry:
    """Decode and validate one telemetry message, or raise :class:`InvalidPayload`."""
    if len(raw) > limits.max_payload_bytes:
        raise InvalidPayload("payload", f"{len(raw)} bytes", f"larger than {limits.max_payload_bytes} bytes")
    try:
        wire = _decoder.decode(raw)
    except msgspec.ValidationError as exc:
        raise _from_msgspec(str(exc)) from None
    except UnicodeDecodeError as exc:
        raise InvalidPayload("payload", raw[max(0, exc.start - 20):exc.end + 20], f"not UTF-8 ({exc.reason})") from None
    except NOT_JSON:
        raise InvalidPayload("payload", raw[:80], "not a JSON document (or nested too deeply)") from None
    if wire.device_id not in _DEVICES_PASSED:
        _check(DEVICE_ID, "device_id", wire.device_id, "letters, digits and _.:- only, 1-128 characters")
        _passed(_DEVICES_PASSED, wire.device_id)
    _check(MSG_ID, "msg_id", wire.msg_id, "letters, digits and _.:- only, 1-128 characters")
    if not 0 <= wire.seq <= MAX_SEQ:
        raise InvalidPayload("seq", wire.seq, f"expected an integer from 0 to {MAX_SEQ}")
    time, ts_us = _timestamp(wire.ts)
    now_us = _time.time_ns() // 1000 if now is None else (now - _EPOCH) // _US
    skew_us, retention_us = limits._window_us
    if ts_us > now_us + skew_us:
        raise InvalidPayload("ts", wire.ts, f"more than {limits.max_clock_skew} in the future")
    if ts_us < now_us - retention_us:
        raise InvalidPayload("ts", wire.ts, f"older than the retention of {limits.retention}")
    if not wire.metrics:
        raise InvalidPayload("metrics", wire.metrics, "expected at least one metric")
    if len(wire.metrics) > limits.max_metrics:
        raise InvalidPayload("metrics", f"{len(wire.metrics)} metrics", f"at most {limits.max_metrics} metrics")
    for name, value in wire.metrics.items():
        if name not in _METRICS_PASSED:
            _check(METRIC, f"metrics.{name}", name, "a metric name: a letter or _, then letters, digits, _ or .")
            _passed(_METRICS_PASSED, name)
        if not math.isfinite(value):
            raise InvalidPayload(f"metrics.{name}", value, "expected a finite number")
    metrics = tuple(sorted(wire.metrics.items()))
    return Telemetry(wire.device_id, wire.msg_id, wire.seq, time, metrics)


def _passed(passed: set[str], value: str) -> None:
    if len(passed) >= _PASSED_MAX:
        passed.clear()
    passed.add(value)


def _check(pattern: re.Pattern[str], field: str, value: str, expected: str) -> None:
    if not pattern.fullmatch(value):
        raise InvalidPayload(field, value, f"expected {expected}")


def _timestamp(ts: int | str) -> tuple[datetime, int]:
    """The time ``ts`` names, and in microseconds since the epoch."""
    if isinstance(ts, int):
        if not 0 < ts < 253402300800000:  # year 10000 in ms
            raise InvalidPayload("ts", ts, "expected epoch milliseconds")
        return datetime.fromtimestamp(ts / 1000, UTC), ts * 1000
    try:
        time = datetime.fromisoformat(ts)
    except ValueError:
        raise InvalidPayload("ts", ts, "expected an RFC 3339 timestamp or epoch milliseconds") from None
    if time.tzinfo is None:
        raise InvalidPayload("ts", ts, "expected a timestamp with a UTC offset")
    return time.astimezone(UTC), (time - _EPOCH) // _US


def _from_msgspec(message: str) -> InvalidPayload:
    unknown = _UNKNOWN_FIELD.search(message)
    if unknown:
        return InvalidPayload(unknown.group(1), NOT_SHOWN, "unknown field")
    path = _MSGSPEC_PATH.search(message)
    field = (path.group(1) if path else "") or "payload"
    reason = _MSGSPEC_PATH.sub("", message)
    if reason == "Number out of range":
        reason = "expected a finite number"
    if reason.startswith("Object missing required field"):
        field = reason.rsplit("`", 2)[-2]
        reason = "missing required field"
    return InvalidPayload(field.replace("[", ".").replace("]", "").strip('."'), NOT_SHOWN, reason)
