"""Firmware rollouts: the per-device state machine, wave planning and abort criteria (plain logic).

A device in a rollout moves forward along

    QUEUED → NOTIFIED → DOWNLOADING → DOWNLOADED → VERIFIED → UPDATING → SUCCEEDED

or ends in FAILED, TIMED_OUT, REJECTED or CANCELED. Devices report their states over MQTT, at
least once and not always in order, and may skip some (a report lost, a fast install):
:func:`apply_report` takes a report forward only — a duplicate or a late report of an earlier
state changes nothing — and refuses what no device may report (the orchestrator's TIMED_OUT and
CANCELED, or going back to QUEUED). Terminal states are final.

Waves split a rollout's targets in a fixed order (by a hash of the device id, so a retry of the
plan gives the same waves): sizes are cumulative percentages (``[1, 10, 50, 100]``) or explicit
counts. Abort criteria follow AWS IoT Jobs: once at least ``min_executed`` devices finished, abort
when the share of those that ended in one of ``failure_states`` passes ``threshold_pct``.
"""
from __future__ import annotations

import hashlib
import json
import math
import re
import uuid
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from enum import Enum
from typing import Any

from iotflow.devices import FIRMWARE_VERSION, MAX_TAGS, TAG, TYPE, FieldErrors, check_text, json_object
from iotflow.errors import InvalidRequest
from iotflow.maintenance import MaintenanceWindow, parse_windows
from iotflow.telemetry import DEVICE_ID



class DeviceState(Enum):
    QUEUED = "QUEUED"
    NOTIFIED = "NOTIFIED"
    DOWNLOADING = "DOWNLOADING"
    DOWNLOADED = "DOWNLOADED"
    VERIFIED = "VERIFIED"
    UPDATING = "UPDATING"
    SUCCEEDED = "SUCCEEDED"
    FAILED = "FAILED"
    TIMED_OUT = "TIMED_OUT"
    REJECTED = "REJECTED"
    CANCELED = "CANCELED"

    @property
    def terminal(self) -> bool:
        return self in TERMINAL


PROGRESS = (DeviceState.QUEUED, DeviceState.NOTIFIED, DeviceState.DOWNLOADING, DeviceState.DOWNLOADED,
            DeviceState.VERIFIED, DeviceState.UPDATING, DeviceState.SUCCEEDED)
TERMINAL = frozenset({DeviceState.SUCCEEDED, DeviceState.FAILED, DeviceState.TIMED_OUT, DeviceState.REJECTED,
                      DeviceState.CANCELED})
# What a device may report (the orchestrator alone times out and cancels).
REPORTABLE = frozenset({*PROGRESS[1:], DeviceState.FAILED, DeviceState.REJECTED})
# A device may refuse an update only before it starts installing it.
_REJECTABLE_FROM = frozenset({DeviceState.QUEUED, DeviceState.NOTIFIED})


class InvalidTransition(ValueError):
    def __init__(self, current: DeviceState, reported: DeviceState, reason: str) -> None:
        super().__init__(f"{current.value} → {reported.value}: {reason}")
        self.current, self.reported = current, reported


def apply_report(current: DeviceState, reported: DeviceState) -> DeviceState | None:
    """The state after a device's report, or None when the report changes nothing (a duplicate, a
    late report of an earlier state, anything after a terminal state). Raises
    :class:`InvalidTransition` for what a device may not report."""
    if reported not in REPORTABLE:
        raise InvalidTransition(current, reported, "not a state a device reports")
    if current.terminal or reported is current:
        return None
    if reported is DeviceState.FAILED:
        return reported
    if reported is DeviceState.REJECTED:
        if current not in _REJECTABLE_FROM:
            raise InvalidTransition(current, reported, "an update already under way cannot be rejected")
        return reported
    if PROGRESS.index(reported) < PROGRESS.index(current):
        return None  # out of order: the device is already further
    return reported


def orchestrate(current: DeviceState, target: DeviceState) -> DeviceState | None:
    """The orchestrator's own transitions: NOTIFIED on dispatch (from QUEUED), TIMED_OUT and
    CANCELED (from any state not yet terminal). None when nothing changes."""
    if current.terminal:
        return None
    if target is DeviceState.NOTIFIED:
        return target if current is DeviceState.QUEUED else None
    if target in (DeviceState.TIMED_OUT, DeviceState.CANCELED):
        return target
    raise InvalidTransition(current, target, "not an orchestrator transition")


RETRYABLE = frozenset({DeviceState.FAILED, DeviceState.TIMED_OUT})


def retry(current: DeviceState) -> DeviceState | None:
    """The orchestrator's retry of a failed or timed-out device: back to QUEUED (with a new command
    id — the device must install again). None for any other state."""
    return DeviceState.QUEUED if current in RETRYABLE else None


def _order(device_id: str, salt: str) -> bytes:
    return hashlib.sha256(f"{salt}:{device_id}".encode()).digest()


def plan_waves(device_ids: Iterable[str], waves: Sequence[float | int], *, salt: str, percent: bool) -> list[list[str]]:
    """Split the targets into waves, in a fixed pseudo-random order (``salt``: the rollout id).

    ``percent``: each entry is the cumulative share of targets reached by the end of that wave
    (increasing, the last 100); otherwise each entry is the size of its wave (the last wave takes
    what remains). Every wave has at least one device while devices remain; every device is in
    exactly one wave.
    """
    ordered = sorted(set(device_ids), key=lambda d: _order(d, salt))
    total, plan, start = len(ordered), [], 0
    for index, size in enumerate(waves):
        last = index == len(waves) - 1
        if percent:
            end = total if last else max(start + 1, math.ceil(total * float(size) / 100))
        else:
            end = total if last else start + int(size)
        end = min(end, total)
        if start >= end:
            break
        plan.append(ordered[start:end])
        start = end
    return plan


@dataclass(frozen=True)
class AbortCriteria:
    failure_states: frozenset[DeviceState]
    threshold_pct: float
    min_executed: int

    def reason(self, counts: Mapping[DeviceState, int]) -> str | None:
        """Why the rollout must abort now, or None. ``counts``: devices per state so far."""
        executed = sum(n for state, n in counts.items() if state.terminal and state is not DeviceState.CANCELED)
        if executed < self.min_executed or executed == 0:
            return None
        failed = sum(counts.get(state, 0) for state in self.failure_states)
        share = 100.0 * failed / executed
        if share > self.threshold_pct:
            names = "/".join(sorted(s.value for s in self.failure_states))
            return (f"{failed} of {executed} executed devices ended {names} ({share:.1f}% > "
                    f"{self.threshold_pct:g}%)")
        return None


def wave_complete(counts: Mapping[DeviceState, int], size: int, success_pct: float) -> bool:
    """Whether a wave may hand over to the next: every device finished, and at least
    ``success_pct`` of the wave succeeded."""
    finished = sum(n for state, n in counts.items() if state.terminal)
    succeeded = counts.get(DeviceState.SUCCEEDED, 0)
    return finished >= size and 100.0 * succeeded >= success_pct * size



ROLLOUT_STATUSES = ("scheduled", "running", "paused", "completed", "aborted", "canceled")
MAX_TARGET_IDS = 100_000
MAX_WAVES = 20
_IDEMPOTENCY_KEY = re.compile(r"[\x21-\x7e]{1,200}")
_FAILURE_STATES = frozenset({DeviceState.FAILED, DeviceState.TIMED_OUT, DeviceState.REJECTED})


@dataclass(frozen=True)
class RolloutRequest:
    """A validated ``POST /api/v1/firmware/rollouts`` body. ``canonical`` is its normal form (what
    the Idempotency-Key is bound to: the same request however its JSON is spelled)."""

    firmware: str
    device_ids: tuple[str, ...] | None  # explicit targets, or None for the filter
    filter: dict[str, Any]
    waves: tuple[float, ...]
    percent: bool
    success_pct: float
    abort: AbortCriteria
    device_timeout_s: int
    retries: int
    dispatch_per_s: float
    health_window_s: int = 0
    start_at: str | None = None  # ISO 8601 with a time zone; None: at once
    maintenance_windows: tuple[MaintenanceWindow, ...] = ()  # none: dispatch at any time

    @property
    def canonical(self) -> dict[str, Any]:
        found = {
            "firmware": self.firmware,
            "targets": {"devices": sorted(self.device_ids)} if self.device_ids is not None else {"filter": self.filter},
            "waves": {"percent" if self.percent else "sizes": list(self.waves)},
            "success_pct": self.success_pct,
            "abort": {"failure_states": sorted(s.value for s in self.abort.failure_states),
                      "threshold_pct": self.abort.threshold_pct, "min_executed": self.abort.min_executed},
            "device_timeout_s": self.device_timeout_s, "retries": self.retries, "dispatch_per_s": self.dispatch_per_s,
            "health_window_s": self.health_window_s, "start_at": self.start_at,
        }
        if self.maintenance_windows:  # only then: the hash of a request without windows stays as it was
            found["maintenance_windows"] = [w.canonical for w in self.maintenance_windows]
        return found

    @property
    def sha256(self) -> str:
        return hashlib.sha256(json.dumps(self.canonical, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def parse_idempotency_key(value: str | None) -> str:
    if value is None or not _IDEMPOTENCY_KEY.fullmatch(value):
        raise InvalidRequest("Invalid Idempotency-Key", [{
            "field": "Idempotency-Key", "value": value,
            "reason": "required: 1-200 visible ASCII characters, the same for every retry of this request"}])
    return value


def _number(errors: FieldErrors, name: str, value: Any, low: float, high: float, *, integer: bool = False) -> Any:
    kind = int if integer else (int, float)
    if isinstance(value, bool) or not isinstance(value, kind) or not low <= value <= high:
        errors.add(name, value, f"{'an integer' if integer else 'a number'} from {low:g} to {high:g}")
        return None
    return value


def parse_rollout_request(body: bytes) -> RolloutRequest:
    """Every bad field of a rollout request is named with its value (one 422 lists them all)."""
    raw = json_object(body)
    errors = FieldErrors()
    known = {"firmware", "targets", "waves", "success_pct", "abort", "device_timeout_s", "retries", "dispatch_per_s",
             "health_window_s", "start_at", "maintenance_windows"}
    for name in sorted(set(raw) - known):
        errors.add(name, raw[name], "unknown field")
    firmware = check_text(errors, "firmware", raw.get("firmware"), FIRMWARE_VERSION, "a firmware version of the catalogue")

    targets = raw.get("targets")
    device_ids: tuple[str, ...] | None = None
    target_filter: dict[str, Any] = {}
    if not isinstance(targets, dict) or len(targets) != 1 or next(iter(targets)) not in ("devices", "filter"):
        errors.add("targets", targets, 'an object with "devices" (a list of ids) or "filter" (type, tags, firmware_version)')
    elif "devices" in targets:
        ids = targets["devices"]
        if not isinstance(ids, list) or not 1 <= len(ids) <= MAX_TARGET_IDS:
            errors.add("targets.devices", ids, f"a list of 1 to {MAX_TARGET_IDS} device ids")
        else:
            bad = [i for i in ids if not isinstance(i, str) or not DEVICE_ID.fullmatch(i)]
            if bad:
                errors.add("targets.devices", bad[:10], "device ids: letters, digits and _.:- only")
            device_ids = tuple(sorted(set(i for i in ids if isinstance(i, str))))
    else:
        target_filter = _parse_filter(errors, targets["filter"])

    waves_raw, waves, percent = raw.get("waves", {"percent": [1, 10, 50, 100]}), (), True
    if not isinstance(waves_raw, dict) or len(waves_raw) != 1 or next(iter(waves_raw)) not in ("percent", "sizes"):
        errors.add("waves", waves_raw, 'an object with "percent" (cumulative, ending at 100) or "sizes" (devices per wave)')
    else:
        percent = "percent" in waves_raw
        steps = waves_raw["percent" if percent else "sizes"]
        if not isinstance(steps, list) or not 1 <= len(steps) <= MAX_WAVES or any(
                isinstance(x, bool) or not isinstance(x, (int, float)) or x <= 0 for x in steps):
            errors.add("waves", steps, f"a list of 1 to {MAX_WAVES} positive numbers")
        elif percent and (steps[-1] != 100 or any(b <= a for a, b in zip(steps, steps[1:])) or steps[-1] > 100):
            errors.add("waves.percent", steps, "increasing cumulative percentages ending at 100")
        elif not percent and any(not isinstance(x, int) for x in steps):
            errors.add("waves.sizes", steps, "whole numbers of devices")
        else:
            waves = tuple(steps)

    success_pct = _number(errors, "success_pct", raw.get("success_pct", 95), 0, 100)
    abort_raw = raw.get("abort", {})
    if not isinstance(abort_raw, dict) or set(abort_raw) - {"failure_states", "threshold_pct", "min_executed"}:
        errors.add("abort", abort_raw, "an object with failure_states, threshold_pct, min_executed")
        abort_raw = {}
    states_raw = abort_raw.get("failure_states", ["FAILED", "TIMED_OUT"])
    states: set[DeviceState] = set()
    allowed = {x.value for x in _FAILURE_STATES}
    if not isinstance(states_raw, list) or not states_raw or any(not isinstance(s, str) or s not in allowed
                                                                 for s in states_raw):
        errors.add("abort.failure_states", states_raw, "a non-empty list of FAILED, TIMED_OUT, REJECTED")
    else:
        states = {DeviceState(s) for s in states_raw}
    threshold = _number(errors, "abort.threshold_pct", abort_raw.get("threshold_pct", 5), 0, 100)
    min_executed = _number(errors, "abort.min_executed", abort_raw.get("min_executed", 100), 1, MAX_TARGET_IDS, integer=True)
    timeout = _number(errors, "device_timeout_s", raw.get("device_timeout_s", 3600), 10, 7 * 86400, integer=True)
    retries = _number(errors, "retries", raw.get("retries", 2), 0, 10, integer=True)
    rate = _number(errors, "dispatch_per_s", raw.get("dispatch_per_s", 50), 0.1, 10_000)
    health_window = _number(errors, "health_window_s", raw.get("health_window_s", 300), 0, 86_400, integer=True)
    start_at = _instant(errors, "start_at", raw.get("start_at"))
    windows = parse_windows(errors, raw.get("maintenance_windows"))
    errors.raise_any("Invalid rollout")
    return RolloutRequest(firmware, device_ids, target_filter, waves, percent, float(success_pct),  # type: ignore[arg-type]
                          AbortCriteria(frozenset(states), float(threshold), min_executed), timeout, retries, float(rate),
                          health_window, start_at, windows)


def _instant(errors: FieldErrors, name: str, value: Any) -> str | None:
    if value is None:
        return None
    try:
        parsed = datetime.fromisoformat(value) if isinstance(value, str) else None
    except ValueError:
        parsed = None
    if parsed is None or parsed.tzinfo is None:
        errors.add(name, value, "an ISO 8601 date and time with a time zone, e.g. 2026-12-01T02:00:00+00:00")
        return None
    return parsed.astimezone(UTC).isoformat()


def _parse_filter(errors: FieldErrors, value: Any) -> dict[str, Any]:
    if not isinstance(value, dict) or not value or set(value) - {"type", "tags", "firmware_version"}:
        errors.add("targets.filter", value, "an object with at least one of type, tags, firmware_version")
        return {}
    found: dict[str, Any] = {}
    if "type" in value:
        found["type"] = check_text(errors, "targets.filter.type", value["type"], TYPE, "a device type")
    if "firmware_version" in value:
        found["firmware_version"] = check_text(errors, "targets.filter.firmware_version", value["firmware_version"],
                                               FIRMWARE_VERSION, "a firmware version")
    if "tags" in value:
        tags = value["tags"]
        if not isinstance(tags, list) or not 1 <= len(tags) <= MAX_TAGS or any(
                not isinstance(t, str) or not TAG.fullmatch(t) for t in tags):
            errors.add("targets.filter.tags", tags, f"a list of 1 to {MAX_TAGS} tags")
        else:
            found["tags"] = sorted(set(tags))
    return found


@dataclass(frozen=True)
class StatusReport:
    """A device's ``devices/{id}/firmware/status`` message (the device id is the Kafka key)."""

    device_id: str
    rollout_id: str
    command_id: str
    state: DeviceState
    error: str | None


def parse_status_report(key: bytes | None, value: bytes) -> StatusReport:
    """``{"command_id", "rollout_id", "state", "error"?}`` from device ``key``; every bad field is
    named with its value (:class:`InvalidRequest`)."""
    raw = json_object(value)
    errors = FieldErrors()
    device_id = (key or b"").decode("utf-8", errors="replace")
    if not DEVICE_ID.fullmatch(device_id):
        errors.add("device_id", device_id, "the report's key: a device id")
    ids: dict[str, str] = {}
    for name in ("rollout_id", "command_id"):
        try:
            ids[name] = str(uuid.UUID(raw.get(name)))
        except (TypeError, ValueError, AttributeError):
            errors.add(name, raw.get(name), "a UUID")
    state_raw = raw.get("state")
    state = None
    try:
        state = DeviceState(state_raw)
        if state not in REPORTABLE:
            errors.add("state", state_raw, f"one of {', '.join(sorted(s.value for s in REPORTABLE))}")
    except ValueError:
        errors.add("state", state_raw, f"one of {', '.join(sorted(s.value for s in REPORTABLE))}")
    error = raw.get("error")
    if error is not None and (not isinstance(error, str) or len(error) > 500):
        errors.add("error", error, "a text of at most 500 characters")
    errors.raise_any("Invalid firmware status report")
    return StatusReport(device_id, ids["rollout_id"], ids["command_id"], state, error)  # type: ignore[arg-type]
