"""The cold tier against the real PostgreSQL and real object stores (a folder, and an S3 API server:
moto in server mode, as no real S3 is reachable here): archive, verify, drop, restore, expire,
crashes, and the telemetry endpoint answering from the archive.

Each test has a database of its own (``archive_db``): the job drops days, and must not drop
another test's.
"""
from __future__ import annotations

import asyncio
import dataclasses
import os
import signal
import subprocess
import urllib.request
import sys
from collections.abc import Iterator
from datetime import UTC, date, datetime, timedelta
from pathlib import Path
from urllib.parse import quote

import asyncpg
import pyarrow.fs as pafs
import pytest

from iotflow.archive import MANIFEST, Archive, Archiver, ArchiveError, day_folder, restore
from iotflow.migrate import migrator
from iotflow.objectstore import ObjectStore
from iotflow.settings import Settings
from iotflow.stack.base import free_loopback_port
from iotflow.testing import http_json, wait_for

pytestmark = pytest.mark.timeout(300)

ROW = tuple  # (time, device_id, metric, value, msg_id, seq, received_at)


def _sql(dsn: str, query: str, *args):
    async def go():
        conn = await asyncpg.connect(dsn, timeout=10)
        try:
            return await conn.fetch(query, *args)
        finally:
            await conn.close()
    return asyncio.run(go())


def _fill(dsn: str, day: date, devices: list[str], per_device: int, *, metrics=("hum", "temp"), msg="m") -> list[ROW]:
    """Rows spread over the UTC ``day`` for each device (the partitions exist: the day is made first)."""
    first = datetime(day.year, day.month, day.day, tzinfo=UTC)
    step = timedelta(seconds=86_400 / per_device)
    rows = [(first + i * step, device, metric, float(i % 97) + 0.25 * len(metric), f"{msg}{i}", i, first)
            for device in devices for i in range(per_device) for metric in metrics]

    async def go():
        conn = await asyncpg.connect(dsn, timeout=10)
        try:
            days_back = (datetime.now(UTC).date() - day).days + 1
            await conn.execute(f"SELECT iotflow_ensure_measurement_partitions({days_back}, 0)")
            await conn.copy_records_to_table("sensor_measurements", records=rows, columns=(
                "time", "device_id", "metric", "value", "msg_id", "seq", "received_at"))
        finally:
            await conn.close()
    asyncio.run(go())
    return rows


def _day_rows(dsn: str, day: date, table: str = "sensor_measurements") -> list[ROW]:
    first = datetime(day.year, day.month, day.day, tzinfo=UTC)
    found = _sql(dsn, f"SELECT time, device_id, metric, value, msg_id, seq, received_at FROM {table} "
                      "WHERE time >= $1 AND time < $2 ORDER BY device_id, time, metric, msg_id",
                 first, first + timedelta(days=1))
    return [tuple(r) for r in found]


def _days_held(dsn: str) -> set[date]:
    return {r["day"] for r in _sql(dsn, "SELECT day FROM iotflow_measurement_days() AS day")}


def _archived_rows(store: ObjectStore, day: date) -> list[ROW]:
    archive = Archive(store)
    manifest = archive.manifest(day)
    assert manifest is not None, f"no manifest for {day}"
    table = archive.read(manifest, verify=True)
    rows = [tuple(r.values()) for r in table.to_pylist()]
    return sorted(rows, key=lambda r: (r[1], r[0], r[2], r[4]))


@pytest.fixture
def archive_db(scratch_db: Settings) -> Settings:
    """A database of this test's own with iotflow's schema."""
    asyncio.run(migrator(scratch_db).up())
    return scratch_db


@pytest.fixture
def store(tmp_path: Path) -> ObjectStore:
    return ObjectStore.from_settings(Settings(), f"file://{tmp_path / 'archive'}")


def _run(settings: Settings, store: ObjectStore, now: datetime | None = None):
    return asyncio.run(Archiver(settings, store).run(now))


def test_a_past_day_is_archived_verified_and_only_then_dropped(archive_db: Settings, store: ObjectStore):
    today = datetime.now(UTC).date()
    old, older, hot = today - timedelta(days=100), today - timedelta(days=101), today - timedelta(days=10)
    rows = _fill(archive_db.tsdb_dsn, old, ["dev-a", "dev-b", "dev-c"], 700)
    _fill(archive_db.tsdb_dsn, older, ["dev-a"], 50)
    kept = _fill(archive_db.tsdb_dsn, hot, ["dev-a"], 30)
    assert _day_rows(archive_db.tsdb_dsn, old) == sorted(rows, key=lambda r: (r[1], r[0], r[2], r[4]))

    report = _run(archive_db, store)

    assert {older.isoformat(), old.isoformat()} <= set(report.archived)
    assert report.rows == len(rows) + 50 * 2
    # Exactly the day's rows, every column, in the archive; the day is gone from the database.
    assert _archived_rows(store, old) == sorted(rows, key=lambda r: (r[1], r[0], r[2], r[4]))
    manifest = Archive(store).manifest(old)
    assert manifest.rows == len(rows) and len(manifest.parts) == 1
    assert (manifest.min_time, manifest.max_time) == (min(r[0] for r in rows), max(r[0] for r in rows))
    assert old not in _days_held(archive_db.tsdb_dsn) and _day_rows(archive_db.tsdb_dsn, old) == []
    # Days inside the hot window stay where they are, unarchived.
    assert len(_day_rows(archive_db.tsdb_dsn, hot)) == len(kept) and Archive(store).manifest(hot) is None

    # Again: nothing to do, nothing changes.
    before = {o.key: store.sha256(o.key) for o in store.list(day_folder(old))}
    again = _run(archive_db, store)
    assert (again.archived, again.rows) == ([], 0)
    assert {o.key: store.sha256(o.key) for o in store.list(day_folder(old))} == before


class CorruptingStore(ObjectStore):
    """Stores a damaged copy of every Parquet part (as a failing disk or a broken upload would)."""

    def put_file(self, key: str, source: Path) -> None:
        damaged = source.with_suffix(".damaged")
        data = bytearray(source.read_bytes())
        data[len(data) // 2] ^= 0xFF
        damaged.write_bytes(bytes(data))
        super().put_file(key, damaged)


class CrashBeforeManifest(ObjectStore):
    """The process dies after the export, before the manifest is written."""

    def put_bytes(self, key: str, data: bytes) -> None:
        if key.endswith(MANIFEST):
            raise OSError("simulated crash before the manifest")
        super().put_bytes(key, data)


def _like(cls, store: ObjectStore) -> ObjectStore:
    return cls(store.url, store.fs, store.root)


def test_a_part_that_does_not_read_back_as_written_is_never_dropped(archive_db: Settings, store: ObjectStore):
    old = datetime.now(UTC).date() - timedelta(days=95)
    rows = _fill(archive_db.tsdb_dsn, old, ["dev-a", "dev-b"], 400)

    with pytest.raises(ArchiveError) as failed:
        _run(archive_db, _like(CorruptingStore, store))
    assert failed.value.stage == "verify"
    assert Archive(store).manifest(old) is None
    assert len(_day_rows(archive_db.tsdb_dsn, old)) == len(rows)

    report = _run(archive_db, store)
    assert old.isoformat() in report.archived
    assert len(_archived_rows(store, old)) == len(rows)
    # The damaged part of the failed run is gone: only what the manifest lists is left.
    listed = {p.file for p in Archive(store).manifest(old).parts} | {MANIFEST}
    assert {o.key.rsplit("/", 1)[-1] for o in store.list(day_folder(old))} == listed


def test_a_crash_between_export_and_manifest_is_redone_and_restores_without_duplicates(
        archive_db: Settings, store: ObjectStore):
    old = datetime.now(UTC).date() - timedelta(days=93)
    rows = _fill(archive_db.tsdb_dsn, old, ["dev-a", "dev-b", "dev-c"], 500)

    with pytest.raises(ArchiveError):
        _run(archive_db, _like(CrashBeforeManifest, store))
    leftovers = store.list(day_folder(old))
    assert leftovers and all(o.key.endswith(".parquet") for o in leftovers)  # the exported part, unlisted
    assert Archive(store).manifest(old) is None and len(_day_rows(archive_db.tsdb_dsn, old)) == len(rows)

    assert old.isoformat() in _run(archive_db, store).archived
    assert len(Archive(store).manifest(old).parts) == 1

    first = asyncio.run(restore(archive_db, store, old, old))
    second = asyncio.run(restore(archive_db, store, old, old))
    assert (first.rows_read, first.rows_inserted) == (len(rows), len(rows))
    assert (second.rows_read, second.rows_inserted) == (len(rows), 0)
    restored = [r[:7] for r in _sql(archive_db.tsdb_dsn, "SELECT time, device_id, metric, value, msg_id, seq, "
                                    "received_at FROM sensor_measurements_restored ORDER BY device_id, time, metric, msg_id")]
    assert [tuple(r) for r in restored] == sorted(rows, key=lambda r: (r[1], r[0], r[2], r[4]))
    only_b = asyncio.run(restore(archive_db, store, old, old, devices=["dev-b"]))
    assert (only_b.rows_read, only_b.rows_inserted) == (len(rows) // 3, 0)


def test_rows_that_arrive_after_the_drop_become_another_part_without_doubling(archive_db: Settings, store: ObjectStore):
    old = datetime.now(UTC).date() - timedelta(days=92)
    rows = _fill(archive_db.tsdb_dsn, old, ["dev-a"], 300)
    assert old.isoformat() in _run(archive_db, store).archived

    # A replay writes an already archived row again, and a late message brings a new one.
    late = _fill(archive_db.tsdb_dsn, old, ["dev-a"], 1, metrics=("temp",), msg="m")   # same key as rows[1]
    new = _fill(archive_db.tsdb_dsn, old, ["dev-z"], 2, msg="late")
    assert late[0] in rows
    report = _run(archive_db, store)
    assert old.isoformat() in report.archived and report.rows == len(new)
    manifest = Archive(store).manifest(old)
    assert len(manifest.parts) == 2 and manifest.rows == len(rows) + len(new)
    assert _archived_rows(store, old) == sorted(rows + new, key=lambda r: (r[1], r[0], r[2], r[4]))
    assert _day_rows(archive_db.tsdb_dsn, old) == []


def test_archived_days_past_the_keep_time_are_deleted_manifest_first(archive_db: Settings, store: ObjectStore):
    old = datetime.now(UTC).date() - timedelta(days=91)
    _fill(archive_db.tsdb_dsn, old, ["dev-a"], 20)
    assert old.isoformat() in _run(archive_db, store).archived
    short = dataclasses.replace(archive_db, archive_keep_days=30, retention_days=1)
    report = _run(short, store, now=datetime.now(UTC) + timedelta(days=60))
    assert old.isoformat() in report.expired
    assert store.list(day_folder(old)) == [] and old not in Archive(store).days()


def test_a_killed_export_leaves_no_manifest_and_the_next_run_redoes_it(archive_db: Settings, tmp_path: Path):
    """kill -9 of ``iotflow archive run`` while it writes the day's Parquet."""
    old = datetime.now(UTC).date() - timedelta(days=97)
    rows = _fill(archive_db.tsdb_dsn, old, [f"dev-{i:02d}" for i in range(40)], 2500)
    spool = tmp_path / "spool"
    spool.mkdir()
    url = f"file://{tmp_path / 'archive'}"
    env = {**os.environ, "IOTFLOW_TSDB_DSN": archive_db.tsdb_dsn, "IOTFLOW_PG_DSN": archive_db.pg_dsn,
           "IOTFLOW_ARCHIVE_URL": url, "IOTFLOW_ARCHIVE_SPOOL_DIR": str(spool)}
    cli = [str(Path(sys.executable).with_name("iotflow")), "archive", "run"]
    with open(tmp_path / "killed-run.log", "wb") as log:
        run = subprocess.Popen(cli, env=env, stdout=log, stderr=subprocess.STDOUT)
    try:
        # The spool file grows row group by row group; kill once the first has landed.
        writing = wait_for(lambda: any(p.stat().st_size > 0 for p in spool.iterdir()) or run.poll() is not None,
                           timeout=60, interval=0.01)
        assert writing and run.poll() is None, "the export finished before it could be killed"
        run.send_signal(signal.SIGKILL)
        run.wait(timeout=10)
    finally:
        if run.poll() is None:
            run.kill()
    store = ObjectStore.from_settings(archive_db, url)
    assert Archive(store).manifest(old) is None and len(_day_rows(archive_db.tsdb_dsn, old)) == len(rows)

    done = subprocess.run(cli, env=env, capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stdout + done.stderr
    assert len(_archived_rows(store, old)) == len(rows) and _day_rows(archive_db.tsdb_dsn, old) == []


@pytest.fixture
def s3(tmp_path: Path) -> Iterator[str]:
    """An S3 API server (moto) on loopback; yields its endpoint URL."""
    port = free_loopback_port()
    with open(tmp_path / "moto.log", "wb") as log:
        server = subprocess.Popen([str(Path(sys.executable).with_name("moto_server")), "-H", "127.0.0.1",
                                   "-p", str(port)], stdout=log, stderr=subprocess.STDOUT)
    endpoint = f"http://127.0.0.1:{port}"

    def answers() -> bool:
        try:
            return server.poll() is not None or http_json("GET", endpoint + "/")[0] == 200
        except OSError:  # not listening yet
            return False
    try:
        up = wait_for(answers, timeout=30, interval=0.2)
        assert up and server.poll() is None, (tmp_path / "moto.log").read_text()
        yield endpoint
    finally:
        server.terminate()
        server.wait(timeout=10)


def test_the_s3_archive_holds_the_day_and_restores_it(archive_db: Settings, s3: str):
    settings = dataclasses.replace(archive_db, archive_s3_endpoint=s3, archive_s3_access_key_id="testing",
                                   archive_s3_secret_access_key="testing", archive_url="s3://iotflow-archive/cold")
    pafs.S3FileSystem(access_key="testing", secret_key="testing", endpoint_override=s3.split("//")[1],
                      scheme="http", region="us-east-1", allow_bucket_creation=True).create_dir("iotflow-archive")
    old = datetime.now(UTC).date() - timedelta(days=96)
    rows = _fill(archive_db.tsdb_dsn, old, ["dev-a", "dev-b"], 600)
    store = ObjectStore.from_settings(settings)

    report = asyncio.run(Archiver(settings, store).run())
    assert old.isoformat() in report.archived and report.bytes > 0
    assert _archived_rows(store, old) == sorted(rows, key=lambda r: (r[1], r[0], r[2], r[4]))
    names = sorted(o.key.rsplit("/", 1)[-1] for o in store.list(day_folder(old)))
    assert names[0] == MANIFEST and len(names) == 2 and names[1].endswith(".parquet")
    assert _day_rows(archive_db.tsdb_dsn, old) == []
    restored = asyncio.run(restore(settings, store, old, old))
    assert restored.rows_inserted == len(rows)


def test_the_telemetry_endpoint_answers_an_archived_range_as_it_did_while_hot(archive_db: Settings, start_worker,
                                                                               tmp_path: Path, run_id: str):
    url = f"file://{tmp_path / 'archive'}"
    worker = start_worker(IOTFLOW_PG_DSN=archive_db.pg_dsn, IOTFLOW_TSDB_DSN=archive_db.tsdb_dsn,
                          IOTFLOW_ARCHIVE_URL=url)
    worker.wait_ready()
    admin = worker.bearer("admin")
    device = f"cold-{run_id}"
    status, _, body = http_json("POST", f"{worker.url}/api/v1/devices", {"id": device, "name": "n", "type": "t"},
                                headers=admin)
    assert status == 201, body
    old = datetime.now(UTC).date() - timedelta(days=100)
    _fill(archive_db.tsdb_dsn, old, [device, "someone-else"], 480)
    _fill(archive_db.tsdb_dsn, old + timedelta(days=1), [device], 48)
    first = datetime(old.year, old.month, old.day, tzinfo=UTC) + timedelta(hours=20)
    queries = [f"from={quote(first.isoformat())}&to={quote((first + timedelta(hours=8)).isoformat())}&bucket=1h",
               f"from={quote(first.isoformat())}&to={quote((first + timedelta(days=2)).isoformat())}&bucket=1d&metric=temp",
               f"from={quote((first - timedelta(days=3)).isoformat())}&to={quote(datetime.now(UTC).isoformat())}&bucket=7d"]

    def ask(query: str) -> dict:
        status, _, body = http_json("GET", f"{worker.url}/api/v1/devices/{device}/telemetry?{query}", headers=admin)
        assert status == 200, body
        return body

    hot = [ask(q) for q in queries]
    assert all(b["archived_until"] is None and b["buckets"] for b in hot)
    # 20:00 to 04:00: four hours of 20 readings per metric, then four of 2 (the next day is sparser).
    assert sum(b["count"] for b in hot[0]["buckets"]) == (4 * 20 + 4 * 2) * 2

    report = _run(archive_db, ObjectStore.from_settings(archive_db, url))
    assert {old.isoformat(), (old + timedelta(days=1)).isoformat()} <= set(report.archived)
    cold = [ask(q) for q in queries]
    for before, after in zip(hot, cold, strict=True):
        assert after["archived_until"] is not None
        assert [(b["bucket"], b["metric"], b["count"], b["min"], b["max"]) for b in after["buckets"]] == \
               [(b["bucket"], b["metric"], b["count"], b["min"], b["max"]) for b in before["buckets"]]
        assert [b["avg"] for b in after["buckets"]] == pytest.approx([b["avg"] for b in before["buckets"]], rel=1e-12)
        assert all(b["archived"] for b in after["buckets"])
    assert cold[0]["archived_until"] == (first + timedelta(hours=8)).isoformat()


def test_the_leader_worker_archives_on_its_schedule(archive_db: Settings, start_worker, tmp_path: Path):
    old = datetime.now(UTC).date() - timedelta(days=98)
    rows = _fill(archive_db.tsdb_dsn, old, ["dev-a", "dev-b"], 100)
    url = f"file://{tmp_path / 'archive'}"
    worker = start_worker(IOTFLOW_PG_DSN=archive_db.pg_dsn, IOTFLOW_TSDB_DSN=archive_db.tsdb_dsn,
                          IOTFLOW_ARCHIVE_URL=url, IOTFLOW_ARCHIVE_INTERVAL_S="1")
    worker.wait_ready()
    store = ObjectStore.from_settings(archive_db, url)
    assert wait_for(lambda: old not in _days_held(archive_db.tsdb_dsn), timeout=60), worker.log_text()[-3000:]
    assert len(_archived_rows(store, old)) == len(rows)

    def archived_days() -> float:
        with urllib.request.urlopen(worker.url + "/metrics", timeout=10) as answer:
            text = answer.read().decode()
        found = [line for line in text.splitlines() if line.startswith('iotflow_archive_days_total{outcome="archived"}')]
        return float(found[0].split()[-1]) if found else 0.0
    assert wait_for(lambda: archived_days() >= 1, timeout=30)
