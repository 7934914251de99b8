"""The cold tier's plain logic: which days are due, manifests, and the archived-range aggregation."""
from __future__ import annotations

import math
import random
from datetime import UTC, date, datetime, timedelta

import pyarrow as pa
import pytest

from iotflow.archive import SCHEMA, Manifest, Part, due_days, expired_days
from iotflow.errors import SettingsError
from iotflow.measurements import _ORIGIN, _aggregate, _merge
from iotflow.settings import Settings


def test_a_day_is_due_once_its_last_instant_is_past_the_hot_window():
    now = datetime(2026, 11, 30, 7, 0, tzinfo=UTC)
    days = [date(2026, 9, 1) + timedelta(days=i) for i in range(3)]  # Sep 1, 2, 3
    # Hot window of 90 days: everything after 2026-09-01 07:00 is hot.
    assert due_days(list(reversed(days)) + [date(2026, 8, 31)], now, 90) == [date(2026, 8, 31)]
    assert due_days(days, now, 90) == []  # Sep 1 ends at Sep 2 00:00, after the horizon
    assert due_days(days, now + timedelta(hours=17), 90) == [days[0]]  # horizon Sep 2 00:00 exactly
    assert due_days(days, now + timedelta(days=2, hours=17), 90) == days
    sep_2 = datetime(2026, 9, 2, tzinfo=UTC)  # the end of Sep 1
    assert expired_days(days, sep_2 + timedelta(days=730), 730) == [days[0]]
    assert expired_days(days, sep_2 + timedelta(days=730, seconds=-1), 730) == []


def test_a_manifest_reads_back_as_written_and_refuses_what_is_not_one():
    manifest = Manifest(date(2026, 8, 1), 3, datetime(2026, 8, 1, 0, 0, 1, tzinfo=UTC),
                        datetime(2026, 8, 1, 23, 0, tzinfo=UTC), (Part("part-1.parquet", 3, 1234, "ab" * 32),),
                        datetime(2026, 11, 30, tzinfo=UTC))
    assert Manifest.decode(manifest.encode()) == manifest
    with pytest.raises(ValueError, match="format"):
        Manifest.decode(b'{"format": 2, "table": "sensor_measurements"}')


def _rows(n: int, seed: int) -> list[tuple[datetime, str, float]]:
    rng = random.Random(seed)
    start = datetime(2026, 8, 1, tzinfo=UTC)
    return [(start + timedelta(seconds=rng.randrange(0, 3 * 86400), microseconds=rng.randrange(10**6)),
             rng.choice(["temp", "hum"]), rng.uniform(-50, 50)) for _ in range(n)]


def _by_hand(rows, bucket_s: int) -> dict:
    """What date_bin + count/min/max/avg give, computed one row at a time."""
    found: dict = {}
    for t, metric, value in rows:
        index = math.floor((t - _ORIGIN).total_seconds() / bucket_s)
        key = (_ORIGIN + timedelta(seconds=index * bucket_s), metric)
        found.setdefault(key, []).append(value)
    return {k: (len(v), min(v), max(v), sum(v) / len(v)) for k, v in found.items()}


@pytest.mark.parametrize("bucket_s", [1, 60, 3600, 7 * 86400, 86400 * 10])
def test_archived_rows_are_bucketed_as_the_database_buckets_them(bucket_s: int):
    rows = _rows(2000, bucket_s)
    table = pa.table({"time": pa.array([r[0] for r in rows], SCHEMA.field("time").type),
                      "metric": [r[1] for r in rows], "value": [r[2] for r in rows]})
    got = {(b["bucket"], b["metric"]): (b["count"], b["min"], b["max"], b["avg"]) for b in _aggregate(table, bucket_s)}
    want = _by_hand(rows, bucket_s)
    assert got.keys() == want.keys()
    for key, (count, low, high, avg) in want.items():
        assert got[key][:3] == (count, low, high) and got[key][3] == pytest.approx(avg, rel=1e-12)


def test_times_before_the_origin_fall_in_the_bucket_that_starts_before_them():
    before = _ORIGIN - timedelta(seconds=1)
    table = pa.table({"time": pa.array([before], SCHEMA.field("time").type), "metric": ["x"], "value": [1.0]})
    assert _aggregate(table, 60)[0]["bucket"] == _ORIGIN - timedelta(seconds=60)


def test_a_bucket_split_between_archive_and_database_adds_up():
    at = datetime(2026, 8, 2, tzinfo=UTC)
    cold = [{"bucket": at, "metric": "t", "count": 3, "min": 1.0, "max": 3.0, "avg": 2.0, "archived": True}]
    hot = [{"bucket": at, "metric": "t", "count": 1, "min": 10.0, "max": 10.0, "avg": 10.0, "archived": False},
           {"bucket": at + timedelta(hours=1), "metric": "t", "count": 1, "min": 5.0, "max": 5.0, "avg": 5.0,
            "archived": False}]
    assert _merge(cold, hot) == [
        {"bucket": at.isoformat(), "metric": "t", "count": 4, "min": 1.0, "max": 10.0, "avg": 4.0, "archived": True},
        {"bucket": (at + timedelta(hours=1)).isoformat(), "metric": "t", "count": 1, "min": 5.0, "max": 5.0,
         "avg": 5.0, "archived": False}]


@pytest.mark.parametrize("url", ["file://relative/path", "file:///", "s3://", "s3://UPPER", "gs://bucket", "s3://b?x=1"])
def test_an_archive_url_that_cannot_work_is_refused_naming_the_variable(url: str):
    with pytest.raises(SettingsError, match="IOTFLOW_ARCHIVE_URL"):
        Settings.from_env({"IOTFLOW_ARCHIVE_URL": url})


def test_the_archive_defaults_to_a_folder_and_can_be_switched_off():
    assert Settings().archive_location.startswith("file:///") and Settings().archive_location.endswith("/.iotflow/archive")
    assert Settings.from_env({"IOTFLOW_ARCHIVE_URL": "none"}).archive_location is None
    assert Settings.from_env({"IOTFLOW_ARCHIVE_URL": "s3://cold-tier/iot/"}).archive_location == "s3://cold-tier/iot"
