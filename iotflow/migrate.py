"""Versioned SQL migrations from ``schema/``: ``NNNN_name.up.sql`` with its ``NNNN_name.down.sql``.

Each migration runs in its own transaction together with its row in ``iotflow_schema_migrations``,
so a failed migration leaves nothing half-applied. A session-level advisory lock serialises
concurrent runs (two workers starting at once, an operator and a deploy job). Running ``up``
twice is a no-op; an applied file whose text changed since is reported, never re-run.
"""
from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass
from pathlib import Path

import asyncpg

from iotflow.errors import MigrationError
from iotflow.settings import Settings

_FILE = re.compile(r"^(\d{4})_([a-z0-9_]+)\.(up|down)\.sql$")
_LOCK_KEY = 0x10F1_0F70  # any constant shared by every iotflow process
_TABLE = """
CREATE TABLE IF NOT EXISTS iotflow_schema_migrations (
    version    integer PRIMARY KEY,
    name       text        NOT NULL,
    checksum   text        NOT NULL,
    applied_at timestamptz NOT NULL DEFAULT now()
)
"""


@dataclass(frozen=True)
class Migration:
    version: int
    name: str
    up: Path
    down: Path

    @property
    def checksum(self) -> str:
        return hashlib.sha256(self.up.read_bytes()).hexdigest()


@dataclass(frozen=True)
class MigrationState:
    migration: Migration
    applied: bool
    changed: bool  # applied, but the up file differs from what was applied

    def line(self) -> str:
        state = "applied" if self.applied else "pending"
        drift = "  (file changed since it was applied)" if self.changed else ""
        return f"{self.migration.version:04d} {self.migration.name:<32} {state}{drift}"


def default_dir() -> Path:
    """``schema/`` beside the package (a checkout), else in the working folder (the Docker image's
    /app, where its Dockerfile copies it)."""
    beside = Path(__file__).resolve().parents[1] / "schema"
    return beside if beside.is_dir() else Path("schema")


def discover(directory: Path) -> list[Migration]:
    """Every migration in ``directory`` in version order; each must have both steps."""
    found: dict[int, dict[str, Path]] = {}
    names: dict[int, str] = {}
    for path in sorted(directory.glob("*.sql")):
        match = _FILE.match(path.name)
        if not match:
            raise MigrationError(f"{path}: expected a name like 0001_create_things.up.sql")
        version = int(match.group(1))
        if names.setdefault(version, match.group(2)) != match.group(2):
            raise MigrationError(f"two migrations share version {version:04d} in {directory}")
        found.setdefault(version, {})[match.group(3)] = path
    migrations = []
    for version in sorted(found):
        steps = found[version]
        if set(steps) != {"up", "down"}:
            missing = ({"up", "down"} - set(steps)).pop()
            raise MigrationError(f"migration {version:04d}_{names[version]} has no {missing} step")
        migrations.append(Migration(version, names[version], steps["up"], steps["down"]))
    return migrations


class Migrator:
    """Applies and rolls back the migrations of ``directory`` on the database at ``dsn``."""

    def __init__(self, dsn: str, directory: Path, *, timeout_s: float) -> None:
        self.dsn = dsn
        self.migrations = discover(directory)
        self.timeout_s = timeout_s

    async def _connect(self) -> asyncpg.Connection:
        """A connection holding the migration lock, with the bookkeeping table in place."""
        conn = await asyncpg.connect(self.dsn, timeout=self.timeout_s)
        try:
            # Session-level: held until the connection closes. Taken before the CREATE TABLE
            # IF NOT EXISTS below, which is not safe to race either.
            await conn.execute("SELECT pg_advisory_lock($1)", _LOCK_KEY, timeout=self.timeout_s)
            await conn.execute(_TABLE)
        except BaseException:
            await conn.close()
            raise
        return conn

    async def _applied(self, conn: asyncpg.Connection) -> dict[int, str]:
        rows = await conn.fetch("SELECT version, checksum FROM iotflow_schema_migrations")
        return {r["version"]: r["checksum"] for r in rows}

    async def status(self) -> list[MigrationState]:
        conn = await self._connect()
        try:
            applied = await self._applied(conn)
        finally:
            await conn.close()
        return [
            MigrationState(m, m.version in applied, m.version in applied and applied[m.version] != m.checksum)
            for m in self.migrations
        ]

    async def up(self, target: int | None = None) -> list[Migration]:
        """Apply every pending migration up to ``target`` (all by default); return those applied."""
        conn = await self._connect()
        done: list[Migration] = []
        try:
            applied = await self._applied(conn)
            for migration in self.migrations:
                if migration.version in applied or (target is not None and migration.version > target):
                    continue
                async with conn.transaction():
                    await self._run(conn, migration.up)
                    await conn.execute(
                        "INSERT INTO iotflow_schema_migrations (version, name, checksum) VALUES ($1, $2, $3)",
                        migration.version, migration.name, migration.checksum,
                    )
                done.append(migration)
        finally:
            await conn.close()  # closing the session releases the advisory lock
        return done

    async def down(self, target: int) -> list[Migration]:
        """Roll back applied migrations newer than ``target`` (0 = all), newest first."""
        conn = await self._connect()
        done: list[Migration] = []
        try:
            applied = await self._applied(conn)
            for migration in reversed(self.migrations):
                if migration.version not in applied or migration.version <= target:
                    continue
                async with conn.transaction():
                    await self._run(conn, migration.down)
                    await conn.execute("DELETE FROM iotflow_schema_migrations WHERE version = $1", migration.version)
                done.append(migration)
        finally:
            await conn.close()
        return done

    async def _run(self, conn: asyncpg.Connection, path: Path) -> None:
        try:
            await conn.execute(path.read_text(), timeout=self.timeout_s)
        except asyncpg.PostgresError as exc:
            raise MigrationError(f"{path.name}: {exc.__class__.__name__}: {exc}") from exc


async def missing(conn: asyncpg.Connection, versions: list[int]) -> list[int]:
    """Which of ``versions`` the database behind ``conn`` has not applied (read-only, no lock: the
    worker's readiness asks it). All of them on a database no migration ever ran on."""
    if not await conn.fetchval("SELECT to_regclass('iotflow_schema_migrations') IS NOT NULL"):
        return list(versions)
    applied = {r["version"] for r in await conn.fetch("SELECT version FROM iotflow_schema_migrations")}
    return [v for v in versions if v not in applied]


def migrator(settings: Settings, directory: Path | None = None) -> Migrator:
    """The migrator for the time-series database (where ``sensor_measurements`` lives)."""
    # DDL may take longer than a statement of the hot path; a minute bounds it still.
    return Migrator(settings.tsdb_dsn, directory or default_dir(), timeout_s=max(60.0, settings.pg_command_timeout_s))
