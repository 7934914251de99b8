"""Reading measurements back from ``sensor_measurements``: time-bucketed aggregates of one device,
and how many distinct messages of some devices are stored (the accounting's ``stored``).

With the TimescaleDB extension the buckets come from ``time_bucket``; on plain PostgreSQL from
``date_bin`` (PostgreSQL 14+). Both align buckets to the same origin (2000-01-03, a Monday, the
TimescaleDB default), so the answer is the same either way. The query reads the primary key's
(device_id, time) prefix, so it touches only the device's rows in the range.

A range that reaches back past the hot window is answered from the cold tier (iotflow/archive.py)
for the days archived there, and from the database for the rest; a bucket spanning both adds them
up. Archived days are always the oldest (the job archives in order), so the range splits at the
end of the newest archived day in it. Queries wholly inside the hot window never touch the archive.
"""
from __future__ import annotations

import asyncio
from datetime import UTC, datetime, timedelta
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc

from iotflow.archive import Archive, day_bounds
from iotflow.devices import TelemetryQuery
from iotflow.pg import LazyPool

_ORIGIN = datetime(2000, 1, 3, tzinfo=UTC)
_BUCKET = {
    True: "time_bucket(make_interval(secs => $4), time, $5::timestamptz)",
    False: "date_bin(make_interval(secs => $4), time, $5::timestamptz)",
}


Bucket = dict[str, Any]


class MeasurementReader:
    def __init__(self, pool: LazyPool, archive: Archive | None = None, retention_days: int = 90) -> None:
        self.pool = pool
        self.archive = archive
        self.retention_days = retention_days
        self._timescale: bool | None = None

    async def buckets(self, device_id: str, query: TelemetryQuery,
                      now: datetime | None = None) -> tuple[list[Bucket], datetime | None]:
        """(the buckets, oldest first; the end of the archived part of the range, or None if none)."""
        now = now or datetime.now(UTC)
        cold: list[Bucket] = []
        archived_until = None
        if self.archive is not None and query.start < now - timedelta(days=self.retention_days):
            cold, archived_until = await asyncio.to_thread(self._archived_buckets, device_id, query)
        hot_start = max(query.start, archived_until) if archived_until else query.start
        hot = await self._hot_buckets(device_id, query, hot_start) if hot_start < query.end else []
        return _merge(cold, hot), archived_until

    def _archived_buckets(self, device_id: str, query: TelemetryQuery) -> tuple[list[Bucket], datetime | None]:
        assert self.archive is not None
        manifests = self.archive.manifests(query.start.astimezone(UTC).date(), query.end.astimezone(UTC).date())
        if not manifests:
            return [], None
        until = min(day_bounds(manifests[-1].day)[1], query.end)
        tables = [self.archive.read(m, devices=[device_id], start=query.start, end=until, metric=query.metric,
                                    columns=("time", "metric", "value")) for m in manifests]
        return _aggregate(pa.concat_tables(tables), query.bucket_s), until

    async def _hot_buckets(self, device_id: str, query: TelemetryQuery, start: datetime) -> list[Bucket]:
        pool = await self.pool.get()
        async with self.pool.acquire(pool) as conn:
            if self._timescale is None:
                self._timescale = await conn.fetchval(
                    "SELECT EXISTS (SELECT 1 FROM pg_extension WHERE extname = 'timescaledb')")
            metric_filter = " AND metric = $6" if query.metric else ""
            args: list[Any] = [device_id, start, query.end, query.bucket_s, _ORIGIN]
            if query.metric:
                args.append(query.metric)
            rows = await conn.fetch(
                f"SELECT {_BUCKET[bool(self._timescale)]} AS bucket, metric, count(*) AS n, min(value) AS min, "
                f"max(value) AS max, avg(value) AS avg FROM sensor_measurements "
                f"WHERE device_id = $1 AND time >= $2 AND time < $3{metric_filter} "
                f"GROUP BY bucket, metric ORDER BY bucket, metric", *args)
        return [{"bucket": r["bucket"], "metric": r["metric"], "count": r["n"], "min": r["min"],
                 "max": r["max"], "avg": r["avg"], "archived": False} for r in rows]

    async def stored_messages(self, device_ids: list[str]) -> int:
        """Messages of these devices the sink ever stored (their counts, kept with the rows: one
        primary-key row per device, whatever the size of the hot window)."""
        if not device_ids:
            return 0
        pool = await self.pool.get()
        async with self.pool.acquire(pool) as conn:
            return int(await conn.fetchval(
                "SELECT coalesce(sum(messages), 0) FROM device_stored_messages WHERE device_id = ANY($1::text[])",
                device_ids))


def _aggregate(table: pa.Table, bucket_s: int) -> list[Bucket]:
    """What the SQL of ``_hot_buckets`` computes, over archived rows (time, metric, value)."""
    if table.num_rows == 0:
        return []
    origin_us = int(_ORIGIN.timestamp()) * 1_000_000
    width = bucket_s * 1_000_000
    micros = pc.subtract(pc.cast(table["time"], pa.int64()), origin_us)
    # Floor division (a time before the origin belongs to the bucket that starts before it).
    index = pc.floor(pc.divide(pc.cast(micros, pa.float64()), float(width)))
    start = pc.add(pc.multiply(pc.cast(index, pa.int64()), width), origin_us)
    grouped = pa.table({"bucket": start, "metric": table["metric"], "value": table["value"]}).group_by(
        ["bucket", "metric"]).aggregate([("value", "count"), ("value", "min"), ("value", "max"), ("value", "mean")])
    found = []
    for row in grouped.to_pylist():
        found.append({"bucket": datetime.fromtimestamp(row["bucket"] / 1_000_000, UTC), "metric": row["metric"],
                      "count": row["value_count"], "min": row["value_min"], "max": row["value_max"],
                      "avg": row["value_mean"], "archived": True})
    return found


def _merge(cold: list[Bucket], hot: list[Bucket]) -> list[Bucket]:
    """Both sides' buckets, oldest first; a bucket on both sides of the split added up."""
    merged: dict[tuple[datetime, str], Bucket] = {}
    for bucket in cold + hot:
        key = (bucket["bucket"], bucket["metric"])
        seen = merged.get(key)
        if seen is None:
            merged[key] = dict(bucket)
            continue
        count = seen["count"] + bucket["count"]
        seen["avg"] = (seen["avg"] * seen["count"] + bucket["avg"] * bucket["count"]) / count
        seen["count"] = count
        seen["min"] = min(seen["min"], bucket["min"])
        seen["max"] = max(seen["max"], bucket["max"])
        seen["archived"] = True
    return [dict(b, bucket=b["bucket"].isoformat()) for _, b in sorted(merged.items(), key=lambda kv: kv[0])]
