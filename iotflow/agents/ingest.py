"""The ingest agent: every sensor-data message through validation, dedup and the sink.

Events are not acknowledged by the stream (``noack``): the pipeline acknowledges them after their
rows are durable. Concurrency stays 1: with more, Faust can commit past an unfinished message
(faust issue #606).
"""
from __future__ import annotations

import asyncio

import asyncpg
import faust
import structlog

from iotflow import metrics
from iotflow.agents.timers import survives
from iotflow.archive import ArchiveError, Archiver
from iotflow.ingest import IngestPipeline
from iotflow.sinks.timescale import MeasurementSink
from iotflow.settings import Settings
from iotflow import topics
from iotflow.errors import SinkUnavailable
from iotflow.worker import draining

log = structlog.get_logger(__name__)

_STOP_FLUSH_TIMEOUT_S = 10.0


def register(app: faust.App, settings: Settings, pipeline: IngestPipeline, sink: MeasurementSink,
             archiver: Archiver | None) -> None:
    @app.agent(topics.sensor_data(app, settings), name="iotflow.ingest", concurrency=1)
    async def ingest(stream: faust.StreamT) -> None:
        await sink.start()
        try:
            async for event in stream.noack().events():
                await pipeline.handle(event)
        finally:
            # Make what is queued durable and acknowledged before the final offset commit.
            try:
                await asyncio.wait_for(asyncio.shield(pipeline.flush()), _STOP_FLUSH_TIMEOUT_S)
            finally:
                await sink.stop()

    # Not @survives: a batch it failed to flush is neither stored nor acknowledged (iotflow.agents.timers).
    @app.timer(settings.sink_flush_interval_s, name="iotflow.ingest.flush")
    async def flush_on_time() -> None:
        await pipeline.tick()

    @app.timer(3600.0, name="iotflow.partitions", on_leader=True)
    @survives("partition_upkeep")
    async def partition_upkeep() -> None:
        try:
            await sink.upkeep(retention_days=settings.retention_days, drop=archiver is None)
        except (SinkUnavailable, asyncpg.PostgresError, asyncpg.InterfaceError, OSError, TimeoutError) as exc:
            log.warning("partition_upkeep_failed", error=str(exc))  # next hour, or the sink on demand

    if archiver is not None:
        @app.timer(settings.archive_interval_s, name="iotflow.archive", on_leader=True)
        async def archive_old_days() -> None:
            try:
                report = await archiver.run()
            except ArchiveError:
                return  # logged and counted by the job; the days wait for the next run
            except (asyncpg.PostgresError, OSError) as exc:
                metrics.ARCHIVE_FAILURES.labels("connect").inc()
                log.warning("archive_run_failed", stage="connect", error=str(exc))
                return
            except Exception:  # noqa: BLE001 - the archive must never take the worker (and ingest) down
                metrics.ARCHIVE_FAILURES.labels("unexpected").inc()
                log.exception("archive_run_failed", stage="unexpected")
                return
            if report.archived or report.empty or report.expired:
                log.info("archive_run_done", **report.as_dict())

    source = topics.name(settings, topics.SENSOR_DATA)

    async def close_and_commit() -> None:
        # After the drain, before Faust stops anything: what was stored is exactly what is
        # committed (messages that arrive later stay unacknowledged: the next owner reads them).
        await pipeline.close()
        await app.consumer.commit()

    draining(app).before_stop.append(close_and_commit)

    @app.on_partitions_revoked.connect
    async def on_revoked(app: faust.App, revoked: set, **kwargs: object) -> None:
        await pipeline.flush()
        pipeline.forget_partitions({tp.partition for tp in revoked if tp.topic == source})

    @app.on_partitions_assigned.connect
    async def on_assigned(app: faust.App, assigned: set, **kwargs: object) -> None:
        pipeline.on_partitions_assigned({tp.partition for tp in assigned if tp.topic == source})
