"""The cold tier: days of measurements past the hot window, archived to Parquet before they are dropped.

Layout in the object store (iotflow/objectstore.py)::

    sensor_measurements/day=2026-08-01/part-<id>.parquet   rows of that UTC day, sorted by
                                                           (device_id, time, metric, msg_id), zstd
    sensor_measurements/day=2026-08-01/manifest.json       rows, min/max time, and each part's
                                                           rows, size and SHA-256

The manifest is written last and is the only thing readers trust: a part it does not list is the
leftover of an interrupted run and is deleted by the next one. For each UTC day whose end is past
the hot window (``IOTFLOW_RETENTION_DAYS``) the job

1. reads the day's rows in one repeatable-read transaction (count and rows agree),
2. writes those not archived yet as a new part (normally: all of them, the day's only part),
3. reads the part back from the store: its SHA-256, size and Parquet row count must match,
4. writes the manifest, reads it back,
5. drops the day, in a transaction that locks the day against writers and checks it still holds
   exactly the rows counted in 1 (else it goes round again: late rows become another part).

A crash anywhere before 4 leaves no manifest for the new part, and the next run redoes it; a crash
between 4 and 5 leaves a manifest and the rows, and the next run finds nothing new to export and
drops the day. Days older than ``IOTFLOW_ARCHIVE_KEEP_DAYS`` are deleted from the archive (manifest
first). One run at a time: a PostgreSQL advisory lock, held for the run.
"""
from __future__ import annotations

import asyncio
import hashlib
import json
import tempfile
import time
import uuid
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field
from datetime import UTC, date, datetime, timedelta
from pathlib import Path
from typing import Any

import asyncpg
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import structlog

from iotflow import metrics
from iotflow.objectstore import ObjectStore
from iotflow.settings import Settings

log = structlog.get_logger(__name__)

TABLE = "sensor_measurements"
MANIFEST = "manifest.json"
FORMAT = 1
BATCH_ROWS = 65_536
MAX_ROUNDS = 3
_LOCK_KEY = 0x10F1_A4C1
_COMMAND_TIMEOUT_S = 600.0
SCHEMA = pa.schema([
    ("time", pa.timestamp("us", tz="UTC")),
    ("device_id", pa.string()),
    ("metric", pa.string()),
    ("value", pa.float64()),
    ("msg_id", pa.string()),
    ("seq", pa.int64()),
    ("received_at", pa.timestamp("us", tz="UTC")),
])
COLUMNS = tuple(SCHEMA.names)
_SELECT = (f"SELECT {', '.join(COLUMNS)} FROM sensor_measurements WHERE time >= $1 AND time < $2 "
           "ORDER BY device_id, time, metric, msg_id")


class ArchiveError(Exception):
    """A run of the archive job that stopped; ``stage`` says where (export, upload, verify, drop, expire)."""

    def __init__(self, stage: str, message: str) -> None:
        super().__init__(message)
        self.stage = stage


@dataclass(frozen=True)
class Part:
    file: str
    rows: int
    bytes: int
    sha256: str


@dataclass(frozen=True)
class Manifest:
    day: date
    rows: int
    min_time: datetime
    max_time: datetime
    parts: tuple[Part, ...]
    archived_at: datetime

    def encode(self) -> bytes:
        body = {"format": FORMAT, "table": TABLE, "day": self.day.isoformat(), "rows": self.rows,
                "min_time": self.min_time.isoformat(), "max_time": self.max_time.isoformat(),
                "parts": [asdict(p) for p in self.parts], "archived_at": self.archived_at.isoformat()}
        return json.dumps(body, indent=1, sort_keys=True).encode()

    @classmethod
    def decode(cls, raw: bytes) -> Manifest:
        body = json.loads(raw)
        if body.get("format") != FORMAT or body.get("table") != TABLE:
            raise ValueError(f"not an iotflow {TABLE} manifest of format {FORMAT}: {body.get('format')!r}")
        return cls(date.fromisoformat(body["day"]), int(body["rows"]), datetime.fromisoformat(body["min_time"]),
                   datetime.fromisoformat(body["max_time"]), tuple(Part(**p) for p in body["parts"]),
                   datetime.fromisoformat(body["archived_at"]))


@dataclass
class RunReport:
    archived: list[str] = field(default_factory=list)   # days exported, verified and dropped
    empty: list[str] = field(default_factory=list)      # days dropped with no rows to export
    expired: list[str] = field(default_factory=list)    # days deleted from the archive
    rows: int = 0
    bytes: int = 0
    busy: bool = False                                  # another run held the lock
    seconds: float = 0.0                                # the run's duration

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def day_folder(day: date) -> str:
    return f"{TABLE}/day={day.isoformat()}"


def day_bounds(day: date) -> tuple[datetime, datetime]:
    first = datetime(day.year, day.month, day.day, tzinfo=UTC)
    return first, first + timedelta(days=1)


def due_days(days: Iterable[date], now: datetime, retention_days: int) -> list[date]:
    """The days whose every instant is older than the hot window (oldest first)."""
    horizon = now - timedelta(days=retention_days)
    return sorted(d for d in days if day_bounds(d)[1] <= horizon)


def expired_days(days: Iterable[date], now: datetime, keep_days: int) -> list[date]:
    """Archived days past the archive's keep time."""
    horizon = now - timedelta(days=keep_days)
    return sorted(d for d in days if day_bounds(d)[1] <= horizon)


def _to_table(records: Sequence[asyncpg.Record]) -> pa.Table:
    columns = list(zip(*records, strict=True)) if records else [() for _ in COLUMNS]
    return pa.Table.from_arrays([pa.array(col, type=f.type) for col, f in zip(columns, SCHEMA, strict=True)],
                                schema=SCHEMA)


def _keys(table: pa.Table) -> pa.Array:
    """One string per measurement key (device_id, time, metric, msg_id), for set membership."""
    micros = pc.cast(pc.cast(table["time"], pa.int64()), pa.string())
    return pc.binary_join_element_wise(table["device_id"], micros, table["metric"], table["msg_id"], "\x1f")


class Archive:
    """Reads of the archive: manifests and their parts (the telemetry endpoint, restore, the job)."""

    def __init__(self, store: ObjectStore) -> None:
        self.store = store

    def days(self) -> list[date]:
        """Days with a folder in the archive (with or without a manifest), oldest first."""
        found = []
        for obj in self.store.list(TABLE):
            name = obj.key.rsplit("/", 1)[-1]
            if name.startswith("day="):
                try:
                    found.append(date.fromisoformat(name[4:]))
                except ValueError:
                    continue
        return sorted(found)

    def manifest(self, day: date) -> Manifest | None:
        raw = self.store.get_bytes(f"{day_folder(day)}/{MANIFEST}")
        return Manifest.decode(raw) if raw is not None else None

    def manifests(self, first: date, last: date) -> list[Manifest]:
        """Manifests of the archived days from ``first`` to ``last`` (inclusive), oldest first."""
        found = []
        for day in self.days():
            if first <= day <= last:
                manifest = self.manifest(day)
                if manifest is not None:
                    found.append(manifest)
        return found

    def read(self, manifest: Manifest, *, devices: Sequence[str] | None = None, start: datetime | None = None,
             end: datetime | None = None, metric: str | None = None, columns: Sequence[str] | None = None,
             verify: bool = False) -> pa.Table:
        """The day's archived rows matching the filters (row groups are skipped by their statistics)."""
        filters = []
        if devices is not None:
            filters.append(("device_id", "in", list(devices)))
        if start is not None:
            filters.append(("time", ">=", pa.scalar(start, type=SCHEMA.field("time").type)))
        if end is not None:
            filters.append(("time", "<", pa.scalar(end, type=SCHEMA.field("time").type)))
        if metric is not None:
            filters.append(("metric", "=", metric))
        tables = []
        for part in manifest.parts:
            key = f"{day_folder(manifest.day)}/{part.file}"
            if verify:
                self.check(key, part)
            with self.store.open(key) as src:
                tables.append(pq.read_table(src, columns=list(columns) if columns else None,
                                            filters=filters or None, schema=SCHEMA))
        if not tables:
            return SCHEMA.empty_table() if not columns else SCHEMA.empty_table().select(list(columns))
        return pa.concat_tables(tables)

    def check(self, key: str, part: Part) -> None:
        """The stored object is the part the manifest describes (checksum, size, row count)."""
        sha, size = self.store.sha256(key)
        if sha != part.sha256 or size != part.bytes:
            raise ArchiveError("verify", f"{self.store.url}/{key}: sha256 {sha} ({size} bytes), "
                                         f"expected {part.sha256} ({part.bytes} bytes)")
        with self.store.open(key) as src:
            rows = pq.read_metadata(src).num_rows
        if rows != part.rows:
            raise ArchiveError("verify", f"{self.store.url}/{key}: {rows} rows, expected {part.rows}")


class Archiver:
    """The archive job: export, verify, drop, expire (see the module's docstring)."""

    def __init__(self, settings: Settings, store: ObjectStore, *, spool: Path | None = None) -> None:
        self.settings = settings
        self.store = store
        self.archive = Archive(store)
        self.spool = spool

    async def run(self, now: datetime | None = None) -> RunReport:
        now = now or datetime.now(UTC)
        report = RunReport()
        started = time.monotonic()
        conn = await asyncpg.connect(
            self.settings.tsdb_dsn, timeout=self.settings.pg_connect_timeout_s, command_timeout=_COMMAND_TIMEOUT_S,
            server_settings={"application_name": "iotflow-archive"})
        try:
            # Held by the session: closing the connection (or losing it) releases it.
            if not await conn.fetchval("SELECT pg_try_advisory_lock($1)", _LOCK_KEY):
                report.busy = True
                return report
            await self._run_locked(conn, now, report)
        except ArchiveError as exc:
            metrics.ARCHIVE_FAILURES.labels(exc.stage).inc()
            log.error("archive_run_failed", stage=exc.stage, error=str(exc))
            raise
        finally:
            await conn.close()
        metrics.ARCHIVE_LAST_SUCCESS.set(time.time())
        report.seconds = round(time.monotonic() - started, 3)
        return report

    async def _run_locked(self, conn: asyncpg.Connection, now: datetime, report: RunReport) -> None:
        days = [r["day"] for r in await conn.fetch("SELECT day FROM iotflow_measurement_days() AS day")]
        due = due_days(days, now, self.settings.retention_days)
        retention = timedelta(days=self.settings.retention_days)
        for day in due:
            try:
                await self._archive_day(conn, day, report)
            except ArchiveError:
                metrics.ARCHIVE_LAG.set((now - (day_bounds(day)[1] + retention)).total_seconds())
                raise
            except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError, pa.ArrowException) as exc:
                metrics.ARCHIVE_LAG.set((now - (day_bounds(day)[1] + retention)).total_seconds())
                raise ArchiveError("export", f"day {day}: {exc.__class__.__name__}: {exc}") from exc
        metrics.ARCHIVE_LAG.set(0)
        await self._expire(now, report)

    async def _archive_day(self, conn: asyncpg.Connection, day: date, report: RunReport) -> None:
        manifest = await asyncio.to_thread(self.archive.manifest, day)
        for _ in range(MAX_ROUNDS):
            exclude = await asyncio.to_thread(self._archived_keys, manifest) if manifest else None
            counted, part, local = await self._export(conn, day, exclude)
            try:
                if part is not None:
                    try:
                        manifest = await asyncio.to_thread(self._commit_part, day, manifest, part, local)
                    except (OSError, pa.ArrowException) as exc:
                        raise ArchiveError("upload", f"day {day}: {exc.__class__.__name__}: {exc}") from exc
                    report.rows += part.rows
                    report.bytes += part.bytes
            finally:
                if local is not None:
                    local.unlink(missing_ok=True)
            try:
                dropped = await conn.fetchval("SELECT iotflow_drop_measurement_day($1, $2)", day, counted)
            except asyncpg.PostgresError as exc:
                raise ArchiveError("drop", f"day {day}: {exc}") from exc
            if dropped:
                if manifest is not None:
                    await asyncio.to_thread(self._remove_leftovers, manifest)
                (report.archived if manifest is not None else report.empty).append(day.isoformat())
                metrics.ARCHIVE_DAYS.labels("archived" if manifest is not None else "empty").inc()
                log.info("archive_day_done", day=day.isoformat(), rows=counted,
                         parts=len(manifest.parts) if manifest else 0)
                return
            log.warning("archive_day_changed", day=day.isoformat(), counted=counted,
                        detail="rows arrived after the export; exporting them too")
        raise ArchiveError("drop", f"day {day}: its rows kept changing over {MAX_ROUNDS} rounds; it stays in the database")

    def _archived_keys(self, manifest: Manifest) -> pa.Array:
        table = self.archive.read(manifest, columns=("time", "device_id", "metric", "msg_id"), verify=True)
        keys = _keys(table)
        return keys.combine_chunks() if isinstance(keys, pa.ChunkedArray) else keys

    async def _export(self, conn: asyncpg.Connection, day: date,
                      exclude: pa.Array | None) -> tuple[int, Part | None, Path | None]:
        """(rows the day holds, the part written locally with the rows not yet archived or None, its file)."""
        first, last = day_bounds(day)
        handle = tempfile.NamedTemporaryFile(prefix=f"iotflow-archive-{day}-", suffix=".parquet",
                                             dir=self.spool, delete=False)
        handle.close()
        local = Path(handle.name)
        writer: pq.ParquetWriter | None = None
        rows = 0
        try:
            async with conn.transaction(isolation="repeatable_read", readonly=True):
                counted = int(await conn.fetchval(
                    "SELECT count(*) FROM sensor_measurements WHERE time >= $1 AND time < $2", first, last))
                cursor = await conn.cursor(_SELECT, first, last)
                while batch := await cursor.fetch(BATCH_ROWS):
                    table = await asyncio.to_thread(_to_table, batch)
                    if exclude is not None:
                        table = table.filter(pc.invert(pc.is_in(_keys(table), value_set=exclude)))
                    if table.num_rows == 0:
                        continue
                    if writer is None:
                        writer = pq.ParquetWriter(str(local), SCHEMA, compression="zstd",
                                                  use_dictionary=["device_id", "metric"], write_statistics=True)
                    await asyncio.to_thread(writer.write_table, table)
                    rows += table.num_rows
        except BaseException:
            if writer is not None:
                writer.close()
            local.unlink(missing_ok=True)
            raise
        if writer is None:
            local.unlink(missing_ok=True)
            return counted, None, None
        writer.close()
        digest = hashlib.sha256()
        with open(local, "rb") as src:
            while chunk := src.read(1 << 20):
                digest.update(chunk)
        part = Part(f"part-{uuid.uuid4().hex[:12]}.parquet", rows, local.stat().st_size, digest.hexdigest())
        return counted, part, local

    def _commit_part(self, day: date, manifest: Manifest | None, part: Part, local: Path) -> Manifest:
        """Upload the part, read it back, then write and read back the manifest that lists it."""
        folder = day_folder(day)
        key = f"{folder}/{part.file}"
        self.store.put_file(key, local)
        metrics.ARCHIVE_BYTES.inc(part.bytes)
        self.archive.check(key, part)
        with self.store.open(key) as src:
            stats = pq.read_table(src, columns=["time"])["time"]
        low, high = (v.as_py() for v in pc.min_max(stats).values())
        parts = (manifest.parts if manifest else ()) + (part,)
        updated = Manifest(
            day, (manifest.rows if manifest else 0) + part.rows,
            min(low, manifest.min_time) if manifest else low, max(high, manifest.max_time) if manifest else high,
            parts, datetime.now(UTC))
        encoded = updated.encode()
        self.store.put_bytes(f"{folder}/{MANIFEST}", encoded)
        if self.store.get_bytes(f"{folder}/{MANIFEST}") != encoded:
            raise ArchiveError("verify", f"{self.store.url}/{folder}/{MANIFEST} does not read back as written")
        metrics.ARCHIVE_ROWS.inc(part.rows)
        return updated

    def _remove_leftovers(self, manifest: Manifest) -> None:
        """Files of interrupted runs in the day's folder (no manifest lists them)."""
        listed = {p.file for p in manifest.parts} | {MANIFEST}
        for obj in self.store.list(day_folder(manifest.day)):
            if obj.key.rsplit("/", 1)[-1] not in listed:
                self.store.delete(obj.key)

    async def _expire(self, now: datetime, report: RunReport) -> None:
        try:
            days = await asyncio.to_thread(self.archive.days)
            for day in expired_days(days, now, self.settings.archive_keep_days):
                folder = day_folder(day)
                # The manifest first: a crash in between leaves unlisted files, never a manifest
                # that names missing ones.
                await asyncio.to_thread(self.store.delete, f"{folder}/{MANIFEST}")
                await asyncio.to_thread(self.store.delete_folder, folder)
                report.expired.append(day.isoformat())
                metrics.ARCHIVE_DAYS.labels("expired").inc()
        except (OSError, pa.ArrowException) as exc:
            raise ArchiveError("expire", f"{exc.__class__.__name__}: {exc}") from exc


@dataclass
class RestoreReport:
    days: list[str] = field(default_factory=list)
    rows_read: int = 0
    rows_inserted: int = 0

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


async def restore(settings: Settings, store: ObjectStore, first: date, last: date,
                  devices: Sequence[str] | None = None) -> RestoreReport:
    """Load archived days (``first`` to ``last``, inclusive) into ``sensor_measurements_restored``;
    each part's checksum is verified first. Rows already there are left as they are (idempotent)."""
    archive = Archive(store)
    report = RestoreReport()
    conn = await asyncpg.connect(settings.tsdb_dsn, timeout=settings.pg_connect_timeout_s,
                                 command_timeout=_COMMAND_TIMEOUT_S,
                                 server_settings={"application_name": "iotflow-archive-restore"})
    try:
        for manifest in await asyncio.to_thread(archive.manifests, first, last):
            table = await asyncio.to_thread(archive.read, manifest, devices=devices, verify=True)
            report.days.append(manifest.day.isoformat())
            report.rows_read += table.num_rows
            for batch in table.to_batches(BATCH_ROWS):
                records = list(zip(*(batch.column(name).to_pylist() for name in COLUMNS), strict=True))
                async with conn.transaction():
                    await conn.execute("CREATE TEMP TABLE IF NOT EXISTS restore_stage "
                                       "(LIKE sensor_measurements_restored INCLUDING DEFAULTS) ON COMMIT DELETE ROWS")
                    await conn.copy_records_to_table("restore_stage", records=records, columns=COLUMNS)
                    status = await conn.execute(
                        f"INSERT INTO sensor_measurements_restored ({', '.join(COLUMNS)}) "
                        f"SELECT {', '.join(COLUMNS)} FROM restore_stage ON CONFLICT DO NOTHING")
                report.rows_inserted += int(status.rsplit(" ", 1)[-1])
    finally:
        await conn.close()
    return report
