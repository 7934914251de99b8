"""Health: ``/health/live`` checks the process only, ``/health/ready`` the dependencies (R-15).

Readiness, each check bounded by its own short timeout and timed:

- ``kafka``: this worker is in its consumer group with a settled assignment — not rebalancing, not
  restoring tables from their changelogs, and able to route every table's keys to their owners
  (else it cannot serve table views or make progress);
- ``postgres``: the registry database answers ``SELECT 1``;
- ``schema``: the time-series database has every migration of this release applied (``schema/``
  beside the code, or in the working folder). A worker deployed before ``iotflow migrate up`` holds
  its telemetry back (the sink's statements fail as :class:`~iotflow.errors.SchemaBehind` and are
  retried) and says so here, so a rolling deploy stops at it instead of taking the old workers out
  of rotation. A database that does not answer leaves it unchecked, not failing (the API serves
  without it; the sink blocks and the lag alerts tell), and a current schema is asked again every
  30 s only;
- ``redis``: answers ``PING``. Redis is a cache: when it does not answer the worker is still
  ready, ``"degraded"``, with the reason.

200 with ``status`` ``ready`` or ``degraded``; 503 with ``unready`` when Kafka, PostgreSQL or the schema fails,
and 503 ``draining`` from SIGTERM on (iotflow/worker.py), whatever the checks say.
"""
from __future__ import annotations

import asyncio
import functools
import time
from collections.abc import Awaitable, Callable

import asyncpg
import faust
from faust.exceptions import NotReady
from faust.web import Request, Response, View

from iotflow.cache import DeviceCache
from iotflow.migrate import default_dir, discover, missing
from iotflow.pg import LazyPool
from iotflow.web.routing import reload_changelog_metadata
from iotflow.worker import draining

CHECK_TIMEOUT_S = 1.0
SCHEMA_CHECK_TIMEOUT_S = 0.8  # inside CHECK_TIMEOUT_S: a database that does not answer is not a failing schema
SCHEMA_RECHECK_S = 30.0  # a current schema falls behind only by `iotflow migrate down`: asked twice a minute


def register(app: faust.App) -> None:
    started = time.monotonic()

    @app.page("/health/live")
    async def live(self: View, request: Request) -> Response:
        return self.json({"status": "ok", "uptime_s": round(time.monotonic() - started, 3)})


def register_readiness(app: faust.App, postgres: LazyPool, cache: DeviceCache, measurements: LazyPool) -> None:
    current_until = 0.0  # a schema seen current is asked again after SCHEMA_RECHECK_S

    async def kafka() -> str:
        # Faust counts a rebalance as going on until the tables are restored: the more telling reason first.
        if app.in_recovery:
            raise RuntimeError("restoring tables from their changelogs")
        if app.rebalancing:
            raise RuntimeError("rebalancing")
        unroutable = []
        for table in app.tables.values():
            try:  # table views route each key to its owner: that needs the owners and the metadata
                app.router.key_store(table.name, b"readiness-probe")
            except (KeyError, TypeError, NotReady) as exc:
                reload_changelog_metadata(app, table)
                unroutable.append(f"{table.name} ({exc.__class__.__name__})")
        if unroutable:
            raise RuntimeError(f"cannot route {', '.join(unroutable)} yet")
        return f"{len(app.consumer.assignment())} partitions assigned"

    async def database() -> str:
        await postgres.ping(CHECK_TIMEOUT_S)
        return "answers"

    async def schema() -> str:
        nonlocal current_until
        release = _release()
        if not release:
            raise RuntimeError(f"no migrations found in {default_dir().resolve()}: this release's schema/ is missing")
        if time.monotonic() < current_until:
            return f"{len(release)} migrations applied"
        try:
            behind = await asyncio.wait_for(_missing(measurements, release), SCHEMA_CHECK_TIMEOUT_S)
        except (OSError, asyncio.TimeoutError, asyncpg.PostgresError, asyncpg.InterfaceError) as exc:
            # The time-series database not answering is the sink's business (it blocks and
            # retries, the lag alerts tell): the API serves without it.
            return f"not checked: the time-series database did not answer ({exc.__class__.__name__})"
        if behind:
            names = ", ".join(f"{v:04d}" for v in behind)
            raise RuntimeError(f"behind this release: {names} not applied; run `iotflow migrate up`")
        current_until = time.monotonic() + SCHEMA_RECHECK_S
        return f"{len(release)} migrations applied"

    async def redis() -> str:
        await cache.ping(CHECK_TIMEOUT_S)
        return "answers"

    @app.page("/health/ready")
    async def ready(self: View, request: Request) -> Response:
        names = ("kafka", "postgres", "schema", "redis")
        results = await asyncio.gather(*(_timed(check) for check in (kafka, database, schema, redis)))
        checks = dict(zip(names, results))
        if draining(app).active:
            status, code = "draining", 503  # stopping: take this worker out of rotation
        elif any(checks[name]["status"] != "ok" for name in ("kafka", "postgres", "schema")):
            status, code = "unready", 503
        elif checks["redis"]["status"] != "ok":
            status, code = "degraded", 200
        else:
            status, code = "ready", 200
        # Whether this worker leads the group (runs the outbox relay and the rollout orchestrator).
        return self.json({"status": status, "checks": checks, "leader": app.is_leader()}, status=code)


@functools.cache
def _release() -> list[int]:
    """This release's migrations, read from ``schema/`` once (the probes come every few seconds)."""
    return [m.version for m in discover(default_dir())]


async def _missing(pool: LazyPool, release: list[int]) -> list[int]:
    async with pool.acquire(await pool.get()) as conn:
        return await missing(conn, release)


async def _timed(check: Callable[[], Awaitable[str]]) -> dict[str, object]:
    begun = time.perf_counter()
    try:
        detail = await asyncio.wait_for(check(), CHECK_TIMEOUT_S)
        status = "ok"
    except Exception as exc:  # noqa: BLE001 - any failure is this check's answer
        name = exc.__class__.__name__
        detail, status = (f"{name}: {exc}" if str(exc) else name), "failing"
    return {"status": status, "detail": detail, "time_ms": round((time.perf_counter() - begun) * 1000, 1)}
