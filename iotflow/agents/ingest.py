"""Ingest: every sensor-data message through validation, dedup and the sink.

sensor-data is not read through a Faust agent's stream: the fetcher hands each fetch of its records
to :func:`decide_fetched` in one call (:func:`iotflow.transport.consume_in_batches`), past Faust's
per-record conductor, ``Event`` and stream iteration (docs/performance.md), and it gives them to
the handler of :meth:`IngestPipeline.deciding` one at a time. The topic is
still subscribed through Faust's conductor, so its partitions are assigned with the tables that are
co-partitioned with it, and every record is tracked and acknowledged through Faust's consumer: the
pipeline acknowledges a message after its rows are durable, and Faust commits what is acknowledged.
Records of a fetch are decided in order, one at a time; a rebalance that starts meanwhile (flow
suspended, or a new consumer generation) ends the fetch's hand-off there — the rest was neither
decided nor tracked, and the new assignment's seek to the committed offsets reads it again.
"""
from __future__ import annotations

import asyncio
from time import monotonic
from typing import cast

import asyncpg
import faust
import mode
import structlog
from faust.types import Message

from iotflow import metrics
from iotflow.agents.timers import survives
from iotflow.archive import ArchiveError, Archiver
from iotflow.ingest import IngestPipeline
from iotflow.sinks.timescale import MeasurementSink
from iotflow.settings import Settings
from iotflow import topics
from iotflow.errors import SinkUnavailable
from iotflow.transport import Consumer, consume_in_batches
from iotflow.worker import draining

log = structlog.get_logger(__name__)

_STOP_FLUSH_TIMEOUT_S = 10.0


async def decide_fetched(app: faust.App, pipeline: IngestPipeline, messages: list[Message]) -> int:
    """Track and decide ``messages`` (one fetch of sensor-data) in order; stop at the first one
    fetched before the current assignment, or once a rebalance has suspended the flow — the rest is
    neither tracked nor decided, and the new assignment's seek reads it again. A message the
    pipeline leaves undecided (a rebalance overtook it while it waited) ends the hand-off too.
    Returns how many were decided."""
    consumer, flow = cast(Consumer, app.consumer), app.flow_control
    # What a stream's events tell Faust's monitor: without it, Faust's check of slow streams logs
    # "Stream has not started processing" at ERROR for every partition while a backlog is older
    # than stream_processing_timeout (seen in a 10M-message catch-up).
    inbound, now = app.monitor.stream_inbound_time, monotonic()

    def current(message: Message) -> bool:
        return message.generation_id == app.consumer_generation_id and flow.is_active()

    async with pipeline.deciding(current) as handle:
        for done, message in enumerate(messages):
            if not current(message):
                return done
            consumer.track_handed_over(message)
            inbound[message.tp] = now
            # Tracked and left undecided is harmless: Faust commits acknowledged offsets only, and
            # the new assignment's copy of the record is tracked and acknowledged in its place.
            if not await handle(message):
                return done
    return len(messages)


def register(app: faust.App, settings: Settings, pipeline: IngestPipeline, sink: MeasurementSink,
             archiver: Archiver | None) -> None:
    async def take(messages: list[Message]) -> None:
        await decide_fetched(app, pipeline, messages)

    consume_in_batches(app, topics.sensor_data(app, settings), take)

    @app.task
    async def open_sink() -> None:
        await sink.start()

    @app.service
    class CloseIngest(mode.Service):
        async def on_stop(self) -> None:
            # Make what is queued durable and acknowledged, as far as the producer and the database
            # still allow (a SIGTERM's drain did it already, before Faust stopped anything).
            try:
                await asyncio.wait_for(asyncio.shield(pipeline.flush()), _STOP_FLUSH_TIMEOUT_S)
            except Exception as exc:  # noqa: BLE001 - stopping anyway: what is unacknowledged is replayed
                log.warning("ingest_final_flush_failed", error=f"{exc.__class__.__name__}: {exc}")
            finally:
                await sink.stop()

    # Not @survives: a batch it failed to flush is neither stored nor acknowledged (iotflow.agents.timers).
    @app.timer(settings.sink_flush_interval_s, name="iotflow.ingest.flush")
    async def flush_on_time() -> None:
        await pipeline.tick(app.flow_control.is_active)

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
