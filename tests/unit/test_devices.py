"""Device registration, change and query parsing: every mistake named with its field and value."""
from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta

import pytest
from multidict import MultiDict

from iotflow.devices import (
    MAX_PAGE,
    Device,
    Registration,
    RegistryEntry,
    apply_event,
    encode_cursor,
    heartbeat_seen_ms,
    parse_change,
    parse_if_match,
    parse_query,
    parse_registration,
    parse_telemetry_query,
)
from iotflow.errors import InvalidRequest


def _errors(call, *args) -> dict[str, str]:
    with pytest.raises(InvalidRequest) as caught:
        call(*args)
    return {e["field"]: e["reason"] for e in caught.value.errors}


def test_a_registration_gets_defaults_and_sorted_unique_tags():
    reg = parse_registration(json.dumps({"id": "d-1", "name": "n", "type": "t", "tags": ["b", "a", "b"]}).encode())
    assert reg == Registration("d-1", "n", "t", ("a", "b"), None, "active")


def test_every_mistake_of_a_registration_is_reported_at_once():
    body = {"id": "bad id", "type": "", "tags": "x", "status": "broken", "firmware_version": " 1", "owner": "me"}
    errors = _errors(parse_registration, json.dumps(body).encode())
    assert set(errors) == {"id", "name", "type", "tags", "status", "firmware_version", "owner"}
    assert errors["name"] == "required" and errors["owner"] == "unknown field"
    assert "one of provisioned, active" in errors["status"]


@pytest.mark.parametrize("body", [b"", b"[1]", b"nope", b'"s"', b'{"name": "\xff"}', b'{"\xc3\x28": 1}',
                                  b"[" * 5000 + b"]" * 5000, b'{"name": ' + b"[" * 5000 + b"]" * 5000 + b"}"])
def test_a_body_that_is_not_an_object_is_refused(body):
    assert set(_errors(parse_registration, body)) == {"body"}


def test_a_change_may_not_touch_identity_or_bookkeeping_and_may_clear_the_firmware():
    assert parse_change(b'{"firmware_version": null}').values == {"firmware_version": None}
    errors = _errors(parse_change, b'{"id": "x", "version": 3, "colour": 1}')
    assert errors == {"id": "cannot be changed", "version": "cannot be changed", "colour": "unknown field"}
    assert set(_errors(parse_change, b"{}")) == {"body"}


@pytest.mark.parametrize(("header", "version"), [(None, None), ('"3"', 3), ('W/"12"', 12), ("7", 7)])
def test_if_match_names_a_version(header, version):
    assert parse_if_match(header) == version


@pytest.mark.parametrize("header", ['"0"', '"abc"', "*", '"-1"'])
def test_an_if_match_that_is_not_a_version_is_refused(header):
    assert set(_errors(parse_if_match, header)) == {"If-Match"}


def test_a_query_reads_repeated_tags_a_limit_and_a_cursor():
    query = parse_query(MultiDict([("tag", "b"), ("tag", "a"), ("limit", "10"), ("type", "t"),
                                   ("cursor", encode_cursor("dev-9"))]))
    assert (query.tags, query.limit, query.type, query.after) == (("a", "b"), 10, "t", "dev-9")


def test_a_bad_query_names_each_parameter():
    errors = _errors(parse_query, MultiDict([("limit", str(MAX_PAGE + 1)), ("cursor", "%%"), ("sort", "id")]))
    assert set(errors) == {"limit", "cursor", "sort"}


def test_a_device_says_which_fields_a_registration_contradicts():
    now = datetime(2026, 1, 1, tzinfo=UTC)
    device = Device("d", "n", "t", ("a",), "1.0", "active", now, now, None, 4)
    assert device.differs_from(Registration("d", "n", "t", ("a",), "1.0")) == []
    assert device.differs_from(Registration("d", "other", "t", (), "1.0")) == ["name", "tags"]
    assert device.etag == '"4"' and device.to_json()["created_at"] == "2026-01-01T00:00:00+00:00"


def test_registry_entries_apply_each_event_once_in_seq_order():
    registered = {"seq": 5, "device": {"id": "d", "version": 1, "deleted_at": None}}
    updated = {"seq": 9, "device": {"id": "d", "version": 2, "deleted_at": None}}
    entry = apply_event(None, registered)
    assert (entry.seq, entry.events, entry.device["version"]) == (5, 1, 1)
    entry = apply_event(entry, updated)
    assert (entry.seq, entry.events, entry.device["version"]) == (9, 2, 2)
    assert apply_event(entry, updated) is None  # republished by the relay, or replayed
    assert apply_event(entry, registered) is None  # older than what the entry holds
    assert RegistryEntry.decode(entry.encode()) == entry and not entry.deleted
    deleted = apply_event(entry, {"seq": 12, "device": {"id": "d", "version": 3, "deleted_at": "2026-01-01T00:00:00"}})
    assert deleted.deleted and deleted.events == 3


NOW = datetime(2026, 11, 29, 8, 0, tzinfo=UTC)


def test_a_telemetry_query_defaults_to_the_last_hour_by_minute():
    query = parse_telemetry_query(MultiDict(), NOW)
    assert (query.start, query.end, query.bucket_s, query.metric) == (NOW - timedelta(hours=1), NOW, 60, None)
    query = parse_telemetry_query(MultiDict([("from", "2026-11-28T00:00:00Z"), ("to", "2026-11-29T00:00:00+00:00"),
                                             ("bucket", "1h"), ("metric", "temp")]), NOW)
    assert (query.bucket_s, query.metric, (query.end - query.start).days) == (3600, "temp", 1)


def test_a_bad_telemetry_query_names_each_parameter():
    errors = _errors(parse_telemetry_query, MultiDict([("from", "yesterday"), ("to", "2026-11-29T00:00:00"),
                                                       ("bucket", "5w"), ("metric", "no spaces"), ("x", "1")]), NOW)
    assert set(errors) == {"from", "to", "bucket", "metric", "x"}
    assert "UTC offset" in errors["to"]


def test_a_telemetry_query_is_bounded_in_buckets_and_ordered():
    errors = _errors(parse_telemetry_query, MultiDict([("from", "2026-01-01T00:00:00Z"), ("bucket", "1s")]), NOW)
    assert "at most 10000 buckets" in errors["bucket"]
    errors = _errors(parse_telemetry_query, MultiDict([("from", "2026-11-29T09:00:00Z")]), NOW)
    assert errors["from"] == "must be before `to`"


@pytest.mark.parametrize("name", ["nul\x00inside", "bell\x07", "tab\tname", "   "])
def test_a_name_with_control_characters_or_only_blanks_is_refused(name):
    # Found by schemathesis: PostgreSQL text cannot hold NUL, and none of these belongs in a name.
    body = json.dumps({"id": "d", "name": name, "type": "t"}).encode()
    assert set(_errors(parse_registration, body)) == {"name"}
    assert set(_errors(parse_change, json.dumps({"name": name}).encode())) == {"name"}


@pytest.mark.parametrize("value", [b"{nope", b'{"device_id": "d-\xff"}', b'{"device_id": 7}', b'{"device_id": null}',
                                   b"[]", b'{"device_id": "other"}', b"[" * 5000])
def test_a_heartbeat_that_does_not_name_its_device_in_json_is_refused_not_raised(value):
    with pytest.raises(InvalidRequest):
        heartbeat_seen_ms(b"d-1", value, 1_700_000_000_000)
