"""Maintenance windows of a rollout: when its commands may go out (plain logic).

A window is a daily span of local time in an IANA time zone, on some days of the week:
``{"days": ["mon", "tue"], "start": "01:00", "end": "04:30", "timezone": "Europe/Berlin"}``.
``end`` before ``start`` spans midnight (``22:00``–``02:00`` opened on a Monday closes on Tuesday
02:00); ``days`` name the day a window opens (all seven when left out); the time zone defaults to
UTC. Local times follow the zone's daylight-saving rules (a local time that a change skips or
repeats is read with the offset in force before the change). A rollout with windows dispatches only while one of them
is open (devices already commanded go on reporting, timeouts and retries go on); without windows it
dispatches at any time.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, date, datetime, time, timedelta
from typing import Any
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from iotflow.devices import FieldErrors

DAYS = ("mon", "tue", "wed", "thu", "fri", "sat", "sun")
MAX_WINDOWS = 20


@dataclass(frozen=True)
class MaintenanceWindow:
    days: frozenset[int]  # 0 = Monday, as datetime.weekday()
    start: time
    end: time
    timezone: str

    @property
    def canonical(self) -> dict[str, Any]:
        return {"days": [DAYS[d] for d in sorted(self.days)], "start": self.start.isoformat(),
                "end": self.end.isoformat(), "timezone": self.timezone}

    def _spans(self, day: datetime) -> tuple[datetime, datetime]:
        """The window opened on the local date of ``day``: (opening, closing) in UTC."""
        zone = ZoneInfo(self.timezone)
        opening = _local(day.date(), self.start, zone)
        closing_date = day.date() + timedelta(days=1) if self.end <= self.start else day.date()
        return opening, _local(closing_date, self.end, zone)

    def contains(self, now: datetime) -> bool:
        now = now.astimezone(UTC)
        local = now.astimezone(ZoneInfo(self.timezone))
        for day in (local - timedelta(days=1), local):  # a window opened yesterday may still be open
            if day.weekday() in self.days:
                opening, closing = self._spans(day)
                if opening <= now < closing:
                    return True
        return False

    def next_opening(self, now: datetime) -> datetime:
        now = now.astimezone(UTC)
        local = now.astimezone(ZoneInfo(self.timezone))
        for offset in range(0, 8):
            day = local + timedelta(days=offset)
            if day.weekday() in self.days:
                opening, _ = self._spans(day)
                if opening > now:
                    return opening
        raise AssertionError("a window with at least one day opens within eight days")


def _local(day: date, at: time, zone: ZoneInfo) -> datetime:
    """``day`` at local time ``at`` in ``zone``, in UTC (a skipped or repeated local time resolves
    as PEP 495's fold=0 does: the offset in force before the change)."""
    return datetime.combine(day, at).replace(tzinfo=zone).astimezone(UTC)


def window_open(windows: Sequence[MaintenanceWindow], now: datetime) -> bool:
    """Whether commands may go out now: always without windows, else inside one of them."""
    return not windows or any(w.contains(now) for w in windows)


def next_opening(windows: Sequence[MaintenanceWindow], now: datetime) -> datetime | None:
    """When the next window opens (UTC), or None without windows."""
    return min((w.next_opening(now) for w in windows), default=None)


def parse_windows(errors: FieldErrors, value: Any, name: str = "maintenance_windows") -> tuple[MaintenanceWindow, ...]:
    """The windows of a request body; every bad field named (``maintenance_windows[1].start``)."""
    if value is None:
        return ()
    if not isinstance(value, list) or not 1 <= len(value) <= MAX_WINDOWS:
        errors.add(name, value, f"a list of 1 to {MAX_WINDOWS} windows: {{days, start, end, timezone}}")
        return ()
    found: list[MaintenanceWindow] = []
    for i, raw in enumerate(value):
        where = f"{name}[{i}]"
        if not isinstance(raw, dict) or set(raw) - {"days", "start", "end", "timezone"}:
            errors.add(where, raw, 'an object with "start" and "end" (HH:MM local time), optional "days" '
                                   '(mon … sun) and "timezone" (an IANA name, default UTC)')
            continue
        window = _parse_window(errors, where, raw)
        if window is not None:
            found.append(window)
    return tuple(found)


def windows_from_spec(spec: dict[str, Any]) -> tuple[MaintenanceWindow, ...]:
    """The windows of a stored rollout spec (its canonical form, validated when it was created)."""
    errors = FieldErrors()
    windows = parse_windows(errors, spec.get("maintenance_windows"))
    errors.raise_any("Invalid stored rollout spec")
    return windows


def _parse_window(errors: FieldErrors, where: str, raw: dict[str, Any]) -> MaintenanceWindow | None:
    bad = len(errors.found)
    start, end = (_clock(errors, f"{where}.{key}", raw.get(key)) for key in ("start", "end"))
    if start is not None and start == end:
        errors.add(f"{where}.end", raw.get("end"), "differs from start (a window of no time never opens)")
    days_raw = raw.get("days", list(DAYS))
    if (not isinstance(days_raw, list) or not days_raw
            or any(not isinstance(d, str) or d.lower() not in DAYS for d in days_raw)):
        errors.add(f"{where}.days", days_raw, "a non-empty list of mon, tue, wed, thu, fri, sat, sun")
        days: frozenset[int] = frozenset()
    else:
        days = frozenset(DAYS.index(d.lower()) for d in days_raw)
    zone_name = raw.get("timezone", "UTC")
    if not _zone_known(zone_name):
        errors.add(f"{where}.timezone", zone_name, "an IANA time zone name, e.g. Europe/Berlin or UTC")
    if len(errors.found) > bad or start is None or end is None:
        return None
    return MaintenanceWindow(days, start, end, zone_name)


def _zone_known(name: Any) -> bool:
    if not isinstance(name, str) or not name:
        return False
    try:
        ZoneInfo(name)
    except (ZoneInfoNotFoundError, ValueError, OSError):
        return False
    return True


def _clock(errors: FieldErrors, name: str, value: Any) -> time | None:
    try:
        parsed = time.fromisoformat(value) if isinstance(value, str) and len(value) in (5, 8) else None
    except ValueError:
        parsed = None
    if parsed is None or parsed.tzinfo is not None:
        errors.add(name, value, "a local time of day, HH:MM or HH:MM:SS (24-hour)")
        return None
    return parsed
