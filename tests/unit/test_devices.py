"""Device registration, change and query parsing: every mistake named with its field and value."""
from __future__ import annotations

import json
from datetime import UTC, datetime

import pytest
from multidict import MultiDict

from iotflow.devices import (
    MAX_PAGE,
    Device,
    Registration,
    encode_cursor,
    parse_change,
    parse_if_match,
    parse_query,
    parse_registration,
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


@pytest.mark.parametrize("body", [b"", b"[1]", b"nope", b'"s"'])
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
