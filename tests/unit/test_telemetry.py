from __future__ import annotations

import json
import math
from datetime import UTC, datetime, timedelta

import pytest
from hypothesis import given, settings, strategies as st

from iotflow.errors import InvalidPayload
from iotflow.telemetry import Limits, Telemetry, parse

NOW = datetime(2026, 11, 29, 12, 0, tzinfo=UTC)
NOW_MS = int(NOW.timestamp() * 1000)
LIMITS = Limits()


def payload(**overrides: object) -> bytes:
    body: dict[str, object] = {"device_id": "dev-1", "msg_id": "m-1", "seq": 7, "ts": NOW_MS,
                               "metrics": {"temp": 21.5, "hum": 40}}
    body.update(overrides)
    return json.dumps({k: v for k, v in body.items() if v is not ...}).encode()


def invalid(raw: bytes) -> InvalidPayload:
    with pytest.raises(InvalidPayload) as caught:
        parse(raw, LIMITS, now=NOW)
    return caught.value


def test_a_valid_payload_becomes_one_row_per_metric():
    telemetry = parse(payload(), LIMITS, now=NOW)
    assert telemetry == Telemetry("dev-1", "m-1", 7, NOW, (("hum", 40.0), ("temp", 21.5)))
    assert telemetry.rows() == [(NOW, "dev-1", "hum", 40.0, "m-1", 7), (NOW, "dev-1", "temp", 21.5, "m-1", 7)]


@pytest.mark.parametrize("ts", ["2026-11-29T12:00:00Z", "2026-11-29T13:00:00+01:00", "2026-11-29T12:00:00.000+00:00"])
def test_rfc3339_timestamps_are_read_in_utc(ts):
    assert parse(payload(ts=ts), LIMITS, now=NOW).time == NOW


@pytest.mark.parametrize(
    ("raw", "field", "reason"),
    [
        (b"not json", "payload", "not a JSON document"),
        (b"\xff\xfe\x00", "payload", "not a JSON document"),
        (b"[1, 2]", "payload", "Expected `object`"),
        (b"null", "payload", "Expected `object`"),
        (payload(device_id=...), "device_id", "missing required field"),
        (payload(metrics=...), "metrics", "missing required field"),
        (payload(device_id=7), "device_id", "Expected `str`"),
        (payload(device_id="dev 1"), "device_id", "letters, digits"),
        (payload(device_id="a/b"), "device_id", "letters, digits"),
        (payload(device_id="x" * 129), "device_id", "1-128 characters"),
        (payload(msg_id=""), "msg_id", "1-128 characters"),
        (payload(seq="7"), "seq", "Expected `int`"),
        (payload(seq=-1), "seq", "from 0 to"),
        (payload(seq=2**64), "seq", "from 0 to"),
        (payload(ts="yesterday"), "ts", "RFC 3339"),
        (payload(ts="2026-11-29T12:00:00"), "ts", "UTC offset"),
        (payload(ts=-5), "ts", "epoch milliseconds"),
        (payload(ts=NOW_MS + 3_600_000), "ts", "in the future"),
        (payload(ts=NOW_MS - 91 * 86_400_000), "ts", "older than the retention"),
        (payload(metrics={}), "metrics", "at least one metric"),
        (payload(metrics={"temp": "hot"}), "metrics", "Expected `float`"),
        (payload(metrics={"temp": True}), "metrics", "Expected `float`"),
        (payload(metrics={"temp": None}), "metrics", "Expected `float`"),
        (payload(metrics={"bad name": 1}), "metrics.bad name", "metric name"),
        (payload(metrics={f"m{i}": i for i in range(300)}), "metrics", "at most 256"),
        (payload(extra=1), "extra", "unknown field"),
        (payload(metrics={"temp": 1}).replace(b"1}", b"1e999}"), "metrics", "finite"),
        (payload(metrics={"temp": 1}).replace(b"1}", b"NaN}"), "payload", "not a JSON document"),
        (b'{"device_id": "' + b"x" * 70_000 + b'"}', "payload", "larger than"),
    ],
)
def test_an_invalid_payload_names_the_field_and_the_reason(raw, field, reason):
    error = invalid(raw)
    assert error.field == field
    assert reason in str(error)


def test_a_name_that_passed_as_a_device_id_is_still_checked_as_a_metric_name():
    # Names that passed are remembered (a fleet sends the same ones again), each kind apart:
    # "7-up" is a device id, not a metric name.
    parse(payload(device_id="7-up"), LIMITS, now=NOW)
    assert invalid(payload(metrics={"7-up": 1})).field == "metrics.7-up"
    parse(payload(metrics={"temp_c": 1}), LIMITS, now=NOW)
    assert invalid(payload(device_id="temp c", metrics={"temp_c": 1})).field == "device_id"


def test_errors_show_the_bad_value():
    assert "(got 'dev 1')" in str(invalid(payload(device_id="dev 1")))


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=20),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=10), children, max_size=4),
    max_leaves=20,
)


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=300))
def test_arbitrary_bytes_are_either_telemetry_or_an_invalid_payload(raw):
    try:
        parse(raw, LIMITS, now=NOW)
    except InvalidPayload as exc:
        assert exc.field and exc.reason


@settings(max_examples=300, deadline=None)
@given(st.dictionaries(st.sampled_from(["device_id", "msg_id", "seq", "ts", "metrics", "other"]), json_values))
def test_arbitrary_json_objects_are_either_valid_telemetry_or_an_invalid_payload(body):
    try:
        telemetry = parse(json.dumps(body).encode(), LIMITS, now=NOW)
    except InvalidPayload as exc:
        assert exc.field and exc.reason
    else:
        assert set(body) == {"device_id", "msg_id", "seq", "ts", "metrics"}
        assert all(math.isfinite(v) for _, v in telemetry.metrics)
        assert NOW - LIMITS.retention <= telemetry.time <= NOW + LIMITS.max_clock_skew


@settings(max_examples=200, deadline=None)
@given(
    device_id=st.from_regex(r"[A-Za-z0-9][A-Za-z0-9_.:-]{0,40}", fullmatch=True),
    seq=st.integers(min_value=0, max_value=2**63 - 1),
    age_s=st.integers(min_value=-250, max_value=80 * 86_400),
    metrics=st.dictionaries(st.from_regex(r"[A-Za-z_][A-Za-z0-9_.]{0,20}", fullmatch=True),
                            st.floats(allow_nan=False, allow_infinity=False), min_size=1, max_size=10),
)
def test_every_well_formed_payload_is_accepted_as_sent(device_id, seq, age_s, metrics):
    ts = NOW - timedelta(seconds=age_s)
    raw = payload(device_id=device_id, msg_id=f"{device_id}-{seq}", seq=seq, ts=int(ts.timestamp() * 1000), metrics=metrics)
    telemetry = parse(raw, LIMITS, now=NOW)
    assert (telemetry.device_id, telemetry.seq) == (device_id, seq)
    assert dict(telemetry.metrics) == {k: float(v) for k, v in metrics.items()}


@pytest.mark.parametrize("bad", [b"\xff", b"\xc3\x28", b"\xed\xa0\x80"])
def test_invalid_utf8_in_a_string_is_an_invalid_payload_naming_the_bytes(bad):
    raw = payload(msg_id="m-1").replace(b'"m-1"', b'"m-' + bad + b'"')
    with pytest.raises(InvalidPayload) as caught:
        parse(raw, LIMITS, now=NOW)
    assert caught.value.field == "payload" and "not UTF-8" in caught.value.reason


def test_nesting_deeper_than_the_decoder_goes_is_an_invalid_payload_not_a_recursion_error():
    for raw in (b"[" * 5000 + b"]" * 5000, b'{"x": ' + b"[" * 5000 + b"]" * 5000 + b"}"):
        with pytest.raises(InvalidPayload) as caught:
            parse(raw, LIMITS, now=NOW)
        assert caught.value.field
