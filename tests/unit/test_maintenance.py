from __future__ import annotations

from datetime import UTC, datetime

import pytest

from iotflow.devices import FieldErrors
from iotflow.errors import InvalidRequest
from iotflow.maintenance import next_opening, parse_windows, window_open, windows_from_spec


def windows(*raw: dict) -> tuple:
    errors = FieldErrors()
    found = parse_windows(errors, list(raw))
    assert errors.found == []
    return found


def at(text: str) -> datetime:
    return datetime.fromisoformat(text).astimezone(UTC)


def test_without_windows_commands_may_go_out_at_any_time():
    assert window_open((), at("2026-12-01T13:37:00+00:00"))
    assert next_opening((), at("2026-12-01T13:37:00+00:00")) is None


def test_a_window_is_open_from_its_start_up_to_but_not_at_its_end():
    night = windows({"start": "01:00", "end": "04:30"})
    assert not window_open(night, at("2026-12-01T00:59:59+00:00"))
    assert window_open(night, at("2026-12-01T01:00:00+00:00"))
    assert window_open(night, at("2026-12-01T04:29:59+00:00"))
    assert not window_open(night, at("2026-12-01T04:30:00+00:00"))
    assert next_opening(night, at("2026-12-01T04:30:00+00:00")) == at("2026-12-02T01:00:00+00:00")


def test_a_window_ending_before_it_starts_spans_midnight_and_belongs_to_the_day_it_opens():
    monday_night = windows({"days": ["mon"], "start": "22:00", "end": "02:00"})  # 2026-11-30 is a Monday
    assert window_open(monday_night, at("2026-11-30T23:00:00+00:00"))
    assert window_open(monday_night, at("2026-12-01T01:59:00+00:00"))  # Tuesday, still Monday's window
    assert not window_open(monday_night, at("2026-12-01T22:30:00+00:00"))  # Tuesday's night: no window
    assert not window_open(monday_night, at("2026-11-30T01:00:00+00:00"))  # Sunday's night: no window
    assert next_opening(monday_night, at("2026-12-01T03:00:00+00:00")) == at("2026-12-07T22:00:00+00:00")


def test_local_time_follows_the_zone_and_its_daylight_saving_rules():
    berlin = windows({"start": "02:00", "end": "05:00", "timezone": "Europe/Berlin"})
    assert window_open(berlin, at("2026-12-01T01:30:00+00:00"))  # 02:30 CET (UTC+1)
    assert not window_open(berlin, at("2026-12-01T04:30:00+00:00"))  # 05:30 CET
    assert window_open(berlin, at("2026-07-01T00:30:00+00:00"))  # 02:30 CEST (UTC+2)
    assert not window_open(berlin, at("2026-07-01T03:30:00+00:00"))  # 05:30 CEST
    # 2026-03-29 02:00-03:00 does not exist in Berlin: the window opens at 02:00 read as CET.
    assert next_opening(berlin, at("2026-03-28T12:00:00+00:00")) == at("2026-03-29T01:00:00+00:00")


def test_several_windows_any_of_them_open_lets_commands_out():
    two = windows({"days": ["sat", "sun"], "start": "00:00", "end": "23:59:59"},
                  {"days": ["wed"], "start": "12:00", "end": "13:00", "timezone": "America/New_York"})
    assert window_open(two, at("2026-12-05T10:00:00+00:00"))  # Saturday
    assert window_open(two, at("2026-12-02T17:30:00+00:00"))  # Wednesday 12:30 EST
    assert not window_open(two, at("2026-12-02T12:30:00+00:00"))
    assert next_opening(two, at("2026-12-01T00:00:00+00:00")) == at("2026-12-02T17:00:00+00:00")


def test_every_bad_field_is_named_with_its_value():
    errors = FieldErrors()
    assert parse_windows(errors, [{"start": "25:00", "end": "1am", "days": ["monday"], "timezone": "Mars/Olympus"},
                                  {"start": "03:00", "end": "03:00"}, {"start": "01:00", "end": "02:00", "x": 1},
                                  "nightly"]) == ()
    named = {(e["field"], repr(e["value"])) for e in errors.found}
    assert named == {
        ("maintenance_windows[0].start", "'25:00'"), ("maintenance_windows[0].end", "'1am'"),
        ("maintenance_windows[0].days", "['monday']"), ("maintenance_windows[0].timezone", "'Mars/Olympus'"),
        ("maintenance_windows[1].end", "'03:00'"), ("maintenance_windows[2]", "{'start': '01:00', 'end': '02:00', 'x': 1}"),
        ("maintenance_windows[3]", "'nightly'"),
    }
    for bad in ([], {"start": "01:00"}, [{}] * 21):
        errors = FieldErrors()
        parse_windows(errors, bad)
        assert errors.found and errors.found[0]["field"].startswith("maintenance_windows"), bad


@pytest.mark.parametrize("zone", ["", "../../etc/passwd", "UTC\x00", 5, "a" * 5000])
def test_hostile_time_zone_names_are_refused_not_raised(zone):
    errors = FieldErrors()
    parse_windows(errors, [{"start": "01:00", "end": "02:00", "timezone": zone}])
    assert [e["field"] for e in errors.found] == ["maintenance_windows[0].timezone"]


def test_the_canonical_form_round_trips_through_a_stored_spec():
    found = windows({"days": ["FRI", "mon"], "start": "22:00", "end": "02:00", "timezone": "Asia/Tokyo"})
    stored = {"maintenance_windows": [w.canonical for w in found]}
    assert stored == {"maintenance_windows": [
        {"days": ["mon", "fri"], "start": "22:00:00", "end": "02:00:00", "timezone": "Asia/Tokyo"}]}
    assert windows_from_spec(stored) == found
    assert windows_from_spec({}) == ()
    with pytest.raises(InvalidRequest):
        windows_from_spec({"maintenance_windows": [{"start": "nope", "end": "02:00"}]})
