"""Migrations against the real PostgreSQL: up, status, down, up again; idempotent; partitions kept up."""
from __future__ import annotations

import asyncio
import dataclasses
from datetime import UTC, datetime, timedelta

import asyncpg
import pytest

from iotflow import audit
from iotflow.measurements import MeasurementReader
from iotflow.migrate import default_dir, discover, migrator
from iotflow.settings import Settings
from iotflow.devices import Registration
from iotflow.pg import LazyPool
from iotflow.registry import DeviceRegistry
from iotflow.sinks import timescale
from iotflow.sinks.timescale import MeasurementSink
from iotflow.testing import dlq_messages, http_get_json, produce_telemetry, register, stored_messages, wait_for


async def partitions(dsn: str) -> int:
    conn = await asyncpg.connect(dsn, timeout=10)
    try:
        return int(await conn.fetchval(
            "SELECT count(*) FROM pg_inherits WHERE inhparent = to_regclass('sensor_measurements')"))
    finally:
        await conn.close()


async def tables(dsn: str) -> set[str]:
    """iotflow's tables that exist (partitions aside)."""
    conn = await asyncpg.connect(dsn, timeout=10)
    try:
        rows = await conn.fetch("SELECT c.relname FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace "
                                "WHERE n.nspname = 'public' AND c.relkind IN ('r', 'p') AND NOT c.relispartition "
                                "AND c.relname <> 'iotflow_schema_migrations'")
        return {r["relname"] for r in rows}
    finally:
        await conn.close()


def test_up_down_up_and_a_second_up_changes_nothing(scratch_db: Settings):
    m = migrator(scratch_db)
    versions = [x.version for x in discover(default_dir())]
    assert versions[:2] == [1, 2]
    assert [s.applied for s in asyncio.run(m.status())] == [False] * len(versions)
    assert [x.version for x in asyncio.run(m.up())] == versions
    assert asyncio.run(m.up()) == []
    assert [s.applied for s in asyncio.run(m.status())] == [True] * len(versions)
    # Plain PostgreSQL here: daily partitions from the retention window back to a week ahead.
    assert asyncio.run(partitions(scratch_db.tsdb_dsn)) == 91 + 1 + 7
    assert asyncio.run(tables(scratch_db.tsdb_dsn)) == {"sensor_measurements", "devices", "device_outbox", "firmware", "rollouts", "rollout_devices", "feature_flags",
                                                         "sensor_measurements_restored", "audit_log",
                                                         "device_stored_messages"}
    assert [x.version for x in asyncio.run(m.down(0))] == versions[::-1]
    assert asyncio.run(tables(scratch_db.tsdb_dsn)) == set()
    assert [x.version for x in asyncio.run(m.up())] == versions
    assert asyncio.run(tables(scratch_db.tsdb_dsn)) == {"sensor_measurements", "devices", "device_outbox", "firmware", "rollouts", "rollout_devices", "feature_flags",
                                                         "sensor_measurements_restored", "audit_log",
                                                         "device_stored_messages"}


def test_down_to_a_version_keeps_what_came_before(scratch_db: Settings):
    m = migrator(scratch_db)
    asyncio.run(m.up())
    assert [x.version for x in asyncio.run(m.down(1))][-1] == 2
    assert asyncio.run(tables(scratch_db.tsdb_dsn)) == {"sensor_measurements"}


def test_concurrent_runs_apply_each_migration_once(scratch_db: Settings):
    async def both() -> list:
        return await asyncio.gather(migrator(scratch_db).up(), migrator(scratch_db).up())

    first, second = asyncio.run(both())
    assert sorted([len(first), len(second)]) == [0, len(discover(default_dir()))]


def test_upkeep_drops_days_past_retention_and_creates_days_ahead(scratch_db: Settings):
    asyncio.run(migrator(scratch_db).up())

    async def upkeep() -> tuple[int, int]:
        sink = MeasurementSink(scratch_db.tsdb_dsn, pool_size=1, connect_timeout_s=3, command_timeout_s=10)
        try:
            archived = await sink.upkeep(retention_days=30, drop=False)
            return archived, await sink.upkeep(retention_days=30, drop=True)
        finally:
            await sink.stop()

    # With the archive on, upkeep leaves the days past the window to the archive job.
    archived, (created, dropped) = asyncio.run(upkeep())
    assert archived == (0, 0)
    assert (created, dropped) == (0, 91 + 1 - 31)
    assert asyncio.run(partitions(scratch_db.tsdb_dsn)) == 31 + 7


_AUDIT_LOG = 6  # the migration that made the registry write audit rows
_STORED_COUNTS = 7  # the migration that made the sink count stored messages per device
# What the sink ran to move its staged rows before it counted them (the releases before 0007).
_UNCOUNTED_MOVE = (
    f"INSERT INTO sensor_measurements ({', '.join(timescale.COLUMNS)}) "
    f"SELECT {', '.join(timescale.COLUMNS)} FROM {timescale.STAGE} ON CONFLICT DO NOTHING RETURNING 1"
)


def _expand_only(version: int) -> bool:
    """Whether migration ``version`` claims to leave what came before it unchanged (its header says so)."""
    path = next(m.up for m in discover(default_dir()) if m.version == version)
    return "Expand-only" in path.read_text()


@pytest.mark.parametrize("version", [m.version for m in discover(default_dir()) if _expand_only(m.version)])
def test_an_expand_only_migration_keeps_the_previous_release_working(scratch_db: Settings, version: int,
                                                                     monkeypatch: pytest.MonkeyPatch):
    # The release before ``version`` wrote and read with these very statements (the sink's COPY →
    # INSERT … ON CONFLICT and the readers' counts; from 0002 on, the registry's register and get
    # with their outbox rows). The migration claims expand-only, so they must work unchanged — and
    # see the same rows — once it is applied under them.
    m = migrator(scratch_db)
    asyncio.run(m.up(target=version - 1))
    if version <= _AUDIT_LOG:
        async def no_audit_row(*args: object, **kwargs: object) -> None:
            return None  # the releases before the audit log wrote none
        monkeypatch.setattr(audit, "record", no_audit_row)
    if version <= _STORED_COUNTS:
        monkeypatch.setattr(timescale, "MOVE", f"WITH moved AS ({_UNCOUNTED_MOVE}) SELECT count(*) FROM moved")
    sink = MeasurementSink(scratch_db.tsdb_dsn, pool_size=1, connect_timeout_s=5, command_timeout_s=30)
    pool = LazyPool(scratch_db.pg_dsn, size=1, connect_timeout_s=5, command_timeout_s=30, application_name="compat")
    registry = DeviceRegistry(pool)
    now = datetime.now(UTC)

    async def previous_release(seqs: range) -> tuple[int, int, int]:
        stored = 0
        for seq in seqs:
            stored += await sink.write([(now - timedelta(seconds=seq), "compat-1", "temp", float(seq), f"compat-1-{seq}", seq)])
        devices = 0
        if version - 1 >= 2:
            for seq in seqs:
                await registry.register(Registration(id=f"compat-{seq}", name="n", type="t"))
            devices = len([await registry.get(f"compat-{seq}") for seq in seqs])
        conn = await asyncpg.connect(scratch_db.tsdb_dsn, timeout=10)
        try:
            total = await conn.fetchval("SELECT count(DISTINCT msg_id) FROM sensor_measurements WHERE device_id = $1",
                                        "compat-1")
        finally:
            await conn.close()
        return stored, int(total), devices

    async def scenario() -> list[tuple[int, int, int]]:
        try:
            before = await previous_release(range(0, 5))
            await m.up(target=version)  # applied under the running release
            after = await previous_release(range(0, 10))  # 5 replays (ignored) and 5 new
            return [before, after]
        finally:
            await sink.stop()
            await pool.close()

    with_registry = version - 1 >= 2
    assert asyncio.run(scenario()) == [(5, 5, 5 if with_registry else 0), (5, 10, 10 if with_registry else 0)]


def test_the_sink_counts_the_messages_it_stores_per_device_and_0007_counts_those_before_it(scratch_db: Settings):
    m = migrator(scratch_db)
    now = datetime.now(UTC)

    def message(device: str, msg: str, metrics: tuple[str, ...], age_s: int = 0) -> list:
        return [(now - timedelta(seconds=age_s), device, metric, 1.0, msg, 0) for metric in metrics]

    async def scenario() -> tuple[dict[str, int], int, dict[str, int], int, int]:
        await m.up(target=_STORED_COUNTS - 1)
        conn = await asyncpg.connect(scratch_db.tsdb_dsn, timeout=10)
        sink = MeasurementSink(scratch_db.tsdb_dsn, pool_size=1, connect_timeout_s=5, command_timeout_s=30)
        pool = LazyPool(scratch_db.tsdb_dsn, size=1, connect_timeout_s=5, command_timeout_s=30, application_name="t")
        try:
            # Before 0007: rows of two devices (one message of two metrics), stored without counts.
            await conn.copy_records_to_table("sensor_measurements", columns=timescale.COLUMNS, records=[
                *message("old-a", "m1", ("hum", "temp")), *message("old-a", "m2", ("temp",)),
                *message("old-b", "m1", ("temp",))])
            await m.up()
            backfilled = dict(await conn.fetch("SELECT device_id, messages FROM device_stored_messages"))

            batch = [*message("new-a", "m1", ("hum", "temp")), *message("new-a", "m2", ("temp",), 5),
                     *message("new-b", "m1", ("temp",)), *message("old-a", "m3", ("temp",))]
            first = await sink.write(batch)
            again = await sink.write(batch)  # a replayed batch: nothing new, nothing counted
            counted = dict(await conn.fetch("SELECT device_id, messages FROM device_stored_messages"))
            stored = await MeasurementReader(pool).stored_messages(["new-a", "old-a", "never-seen"])
            return backfilled, first, counted, again, stored
        finally:
            await conn.close()
            await sink.stop()
            await pool.close()

    backfilled, first, counted, again, stored = asyncio.run(scenario())
    assert backfilled == {"old-a": 2, "old-b": 1}
    assert (first, again) == (5, 0)
    assert counted == {"old-a": 3, "old-b": 1, "new-a": 2, "new-b": 1}
    assert stored == 2 + 3


def test_a_worker_on_a_schema_behind_its_release_holds_telemetry_back_until_migrate_up(
        settings: Settings, scratch_db: Settings, start_worker, run_id: str):
    # Deployed before `iotflow migrate up` (or after `migrate down`): the sink's statement names a
    # table 0007 makes. The rows are not at fault, so none may go to the DLQ as rejected; the
    # worker says why it is unready and stores everything once the migration is applied.
    m = migrator(scratch_db)
    asyncio.run(m.up(target=_STORED_COUNTS - 1))
    own = dataclasses.replace(settings, tsdb_dsn=scratch_db.tsdb_dsn, pg_dsn=scratch_db.pg_dsn)
    devices = [f"behind-{run_id}-{i}" for i in range(3)]
    asyncio.run(register(own, devices))
    worker = start_worker(IOTFLOW_TSDB_DSN=own.tsdb_dsn, IOTFLOW_PG_DSN=own.pg_dsn)
    worker.wait_ready()

    def schema_check() -> dict | None:
        status, body = http_get_json(f"{worker.url}/health/ready", timeout=5)
        return body["checks"]["schema"] if body and body["checks"]["kafka"]["status"] == "ok" else None

    check = wait_for(schema_check, timeout=60)
    assert check and check["status"] == "failing" and "0007 not applied" in check["detail"], check
    assert http_get_json(f"{worker.url}/health/ready", timeout=5)[0] == 503

    sent = asyncio.run(produce_telemetry(own, devices, 20))
    tried = wait_for(lambda: worker.metric('iotflow_sink_errors_total{kind="schema"') >= 2, timeout=60)
    assert tried, worker.log_text()[-3000:]
    assert "sink_schema_behind" in worker.log_text()
    assert worker.metric('iotflow_sink_errors_total{kind="rejected"') == 0
    assert asyncio.run(stored_messages(own, f"behind-{run_id}-")) == (0, 0)

    assert [x.version for x in asyncio.run(m.up())] == [_STORED_COUNTS]
    stored = wait_for(lambda: asyncio.run(stored_messages(own, f"behind-{run_id}-"))[1] == sent, timeout=90)
    assert stored, asyncio.run(stored_messages(own, f"behind-{run_id}-"))
    worker.wait_recovered(timeout=30)
    assert http_get_json(f"{worker.url}/health/ready", timeout=5)[1]["checks"]["schema"]["status"] == "ok"
    assert asyncio.run(dlq_messages(own)) == []
    worker.assert_running("after its schema caught up")
