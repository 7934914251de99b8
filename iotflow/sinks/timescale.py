"""The measurement sink: batches of rows into ``sensor_measurements`` with asyncpg COPY, idempotently.

How one batch is written (the heart of invariants 1-3):

1. The rows are COPYed (binary protocol) into a per-connection temporary staging table.
2. ``INSERT INTO sensor_measurements SELECT … FROM staging ON CONFLICT DO NOTHING`` moves them over;
   a row whose measurement key (device_id, time, metric, msg_id) exists is skipped, so a batch
   replayed after a crash, or a duplicate the dedup table missed, stores nothing twice. The same
   statement adds the messages whose rows were new to ``device_stored_messages`` (the accounting's
   ``stored`` figure: exact, because it commits with the rows, and read in O(devices)).
3. COMMIT. Only when :meth:`MeasurementSink.write` has returned does the ingest agent acknowledge
   the batch's Kafka events, so Faust's offset commit never passes a row that is not durable.
   The dedup table's changelog may run ahead of the sink: its marks carry the offset of the
   message that made them, so a replayed original is recognised as itself and written again.

Retriable failures (connection lost, timeouts, shutdown, failover, serialisation) are retried with
exponential backoff and full jitter for as long as it takes; while they last the agent blocks and
Kafka holds the backlog (backpressure with bounded memory). A circuit breaker stops hammering a
database that is down. A table, column or function the statements need and the database lacks is
:class:`SchemaBehind` (a migration of this release not applied): retried the same way, since the
rows are not at fault — the worker's readiness names the missing migrations. Anything else is
:class:`SinkRejected`: the caller decides (the ingest agent splits the batch and sends the rows the
database refuses to the DLQ).
"""
from __future__ import annotations

import asyncio
import datetime as dt
from collections.abc import Sequence

import asyncpg
import structlog
from tenacity import AsyncRetrying, retry_if_exception, wait_random_exponential

from iotflow import metrics
from iotflow.breaker import CircuitBreaker, State
from iotflow.errors import CircuitOpen, SchemaBehind, SinkRejected, SinkUnavailable
from iotflow.pg import LazyPool, is_transient

log = structlog.get_logger(__name__)

COLUMNS = ("time", "device_id", "metric", "value", "msg_id", "seq")
Row = tuple[dt.datetime, str, str, float, str, int]

STAGE = "iotflow_stage"
CREATE_STAGE = (
    f"CREATE TEMP TABLE IF NOT EXISTS {STAGE} "
    "(time timestamptz, device_id text, metric text, value double precision, msg_id text, seq bigint) "
    "ON COMMIT DELETE ROWS"
)
# Moves the staged rows over, adds the messages whose rows were new to their devices' stored counts
# (in device order: two sinks never wait on each other's counts in opposite orders), and returns
# how many rows were new.
MOVE = (
    f"WITH moved AS (INSERT INTO sensor_measurements ({', '.join(COLUMNS)}) "
    f"SELECT {', '.join(COLUMNS)} FROM {STAGE} ON CONFLICT DO NOTHING RETURNING device_id, msg_id), "
    "counted AS (INSERT INTO device_stored_messages AS c (device_id, messages) "
    "SELECT device_id, count(DISTINCT msg_id) FROM moved GROUP BY device_id ORDER BY device_id "
    "ON CONFLICT (device_id) DO UPDATE SET messages = c.messages + EXCLUDED.messages) "
    "SELECT count(*) FROM moved"
)

_NO_PARTITION = "23514"  # check_violation: raised for a row with no partition to go to
# undefined_table, undefined_column, undefined_function: the schema is older than this release.
_SCHEMA_BEHIND = frozenset({"42P01", "42703", "42883"})


def is_retriable(exc: BaseException) -> bool:
    """Whether a failed write may succeed if tried again unchanged."""
    return isinstance(exc, SinkUnavailable) or is_transient(exc)


class MeasurementSink:
    """Owns a bounded asyncpg pool and writes batches of measurement rows idempotently."""

    def __init__(
        self,
        dsn: str,
        *,
        pool_size: int,
        connect_timeout_s: float,
        command_timeout_s: float,
        breaker: CircuitBreaker | None = None,
        max_backoff_s: float = 10.0,
    ) -> None:
        self.pool = LazyPool(dsn, size=pool_size, connect_timeout_s=connect_timeout_s,
                             command_timeout_s=command_timeout_s, application_name="iotflow-sink",
                             init=_init_connection)
        self.breaker = breaker or CircuitBreaker("timescale")
        self.max_backoff_s = max_backoff_s
        metrics.CIRCUIT_OPEN.labels(self.breaker.name).set_function(lambda: self.breaker.state is not State.CLOSED)

    async def start(self) -> None:
        """Open the pool now if the database answers; otherwise the first write opens it."""
        try:
            await self._get_pool()
        except SinkUnavailable as exc:
            log.warning("sink_unavailable_at_start", error=str(exc))

    async def stop(self) -> None:
        await self.pool.close()

    async def _get_pool(self) -> asyncpg.Pool:
        try:
            return await self.pool.get()
        except Exception as exc:
            if is_retriable(exc):
                raise SinkUnavailable(f"cannot open a pool to the time-series database: {exc}") from exc
            raise

    async def write(self, rows: Sequence[Row]) -> int:
        """Write ``rows`` (retrying retriable failures until they succeed); return how many were new."""
        if not rows:
            return 0
        retrying = AsyncRetrying(
            retry=retry_if_exception(is_retriable),
            wait=wait_random_exponential(multiplier=0.1, max=self.max_backoff_s),
            reraise=True,
        )
        async for attempt in retrying:
            with attempt:
                return await self._write_once(rows)
        raise AssertionError("unreachable: tenacity retries until success or a non-retriable error")

    async def _write_once(self, rows: Sequence[Row]) -> int:
        try:
            self.breaker.check()
        except CircuitOpen as exc:
            await asyncio.sleep(exc.retry_after)
            raise
        try:
            pool = await self._get_pool()
            async with self.pool.acquire(pool) as conn:
                async with conn.transaction():
                    await conn.copy_records_to_table(STAGE, records=rows, columns=COLUMNS)
                    stored = await conn.fetchval(MOVE)
        except Exception as exc:
            if is_retriable(exc):
                self.breaker.record_failure()
                metrics.SINK_ERRORS.labels("retriable").inc()
                log.warning("sink_write_failed", retriable=True, error=str(exc), breaker=self.breaker.state.value)
                raise
            if isinstance(exc, asyncpg.PostgresError) and exc.sqlstate == _NO_PARTITION:
                # A day without a partition (upkeep has not run yet): make it and try again.
                await self.ensure_partitions()
                raise SinkUnavailable(str(exc)) from exc
            if isinstance(exc, asyncpg.PostgresError) and exc.sqlstate in _SCHEMA_BEHIND:
                # Not the breaker's business: the database answers, it is the schema that is old.
                metrics.SINK_ERRORS.labels("schema").inc()
                log.error("sink_schema_behind", error=str(exc), detail="run `iotflow migrate up`; the batch waits")
                raise SchemaBehind(f"{exc.__class__.__name__}: {exc} (run `iotflow migrate up`)") from exc
            metrics.SINK_ERRORS.labels("rejected").inc()
            raise SinkRejected(f"{exc.__class__.__name__}: {exc}") from exc
        self.breaker.record_success()
        return int(stored)

    async def upkeep(self, *, retention_days: int, drop: bool) -> tuple[int, int]:
        """Daily partitions for the hot window and a week ahead (plain PostgreSQL); with ``drop``, the days
        past the hot window dropped too (only without the archive, which drops them once archived).
        Returns (created, dropped)."""
        created = await self.ensure_partitions(days_back=retention_days)
        if not drop:
            return created, 0
        pool = await self._get_pool()
        async with self.pool.acquire(pool) as conn:
            dropped = await conn.fetchval(
                "SELECT iotflow_drop_measurement_partitions(make_interval(days => $1))", retention_days
            )
        return created, int(dropped)

    async def ensure_partitions(self, days_back: int = 91, days_ahead: int = 7) -> int:
        """Create the missing daily partitions (plain PostgreSQL; a no-op on a hypertable)."""
        pool = await self._get_pool()
        async with self.pool.acquire(pool) as conn:
            return int(await conn.fetchval("SELECT iotflow_ensure_measurement_partitions($1, $2)", days_back, days_ahead))


async def _init_connection(conn: asyncpg.Connection) -> None:
    await conn.execute(CREATE_STAGE)
