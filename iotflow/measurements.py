"""Reading measurements back from ``sensor_measurements``: time-bucketed aggregates of one device,
and how many distinct messages of some devices are stored (the accounting's ``stored``).

With the TimescaleDB extension the buckets come from ``time_bucket``; on plain PostgreSQL from
``date_bin`` (PostgreSQL 14+). Both align buckets to the same origin (2000-01-03, a Monday, the
TimescaleDB default), so the answer is the same either way. The query reads the primary key's
(device_id, time) prefix, so it touches only the device's rows in the range.
"""
from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from iotflow.devices import TelemetryQuery
from iotflow.pg import LazyPool

_ORIGIN = datetime(2000, 1, 3, tzinfo=UTC)
_BUCKET = {
    True: "time_bucket(make_interval(secs => $4), time, $5::timestamptz)",
    False: "date_bin(make_interval(secs => $4), time, $5::timestamptz)",
}


class MeasurementReader:
    def __init__(self, pool: LazyPool) -> None:
        self.pool = pool
        self._timescale: bool | None = None

    async def buckets(self, device_id: str, query: TelemetryQuery) -> list[dict[str, Any]]:
        pool = await self.pool.get()
        async with self.pool.acquire(pool) as conn:
            if self._timescale is None:
                self._timescale = await conn.fetchval(
                    "SELECT EXISTS (SELECT 1 FROM pg_extension WHERE extname = 'timescaledb')")
            metric_filter = " AND metric = $6" if query.metric else ""
            args: list[Any] = [device_id, query.start, query.end, query.bucket_s, _ORIGIN]
            if query.metric:
                args.append(query.metric)
            rows = await conn.fetch(
                f"SELECT {_BUCKET[bool(self._timescale)]} AS bucket, metric, count(*) AS n, min(value) AS min, "
                f"max(value) AS max, avg(value) AS avg FROM sensor_measurements "
                f"WHERE device_id = $1 AND time >= $2 AND time < $3{metric_filter} "
                f"GROUP BY bucket, metric ORDER BY bucket, metric", *args)
        return [{"bucket": r["bucket"].isoformat(), "metric": r["metric"], "count": r["n"], "min": r["min"],
                 "max": r["max"], "avg": r["avg"]} for r in rows]

    async def stored_messages(self, device_ids: list[str]) -> int:
        """Distinct messages of these devices in the database (each device's primary-key range only)."""
        if not device_ids:
            return 0
        pool = await self.pool.get()
        async with self.pool.acquire(pool) as conn:
            return int(await conn.fetchval(
                "SELECT count(*) FROM (SELECT DISTINCT device_id, msg_id FROM sensor_measurements "
                "WHERE device_id = ANY($1::text[])) s", device_ids))
