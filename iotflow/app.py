"""The :class:`faust.App` of iotflow, wired to its agents, tables and views by explicit calls."""
from __future__ import annotations

import socket
from typing import cast

import faust
import mode
import structlog

from datetime import timedelta

from iotflow import logs, observability, topics
from iotflow.agents import devices as device_agents, firmware as firmware_agents, ingest
from iotflow.archive import Archive, Archiver
from iotflow.cache import DeviceCache, client_for
from iotflow.commands import CommandPublisher
from iotflow.mqtt_auth import DeviceCredentials
from iotflow.dedup import DeviceAccount, LatestValues, Mark
from iotflow.devices import registry_status
from iotflow.errors import SettingsError
from iotflow.firmware import FirmwareCatalogue
from iotflow.flags import Flags
from iotflow.ingest import IngestPipeline
from iotflow.measurements import MeasurementReader
from iotflow.objectstore import ObjectStore
from iotflow.orchestrator import Orchestrator
from iotflow.outbox import OutboxRelay
from iotflow.parking import ParkingLot
from iotflow.pg import LazyPool
from iotflow.registry import DeviceRegistry
from iotflow.rollout_store import RolloutStore
from iotflow.settings import DEV_JWT_SECRET, DEV_MQTT_PASSWORDS, Settings
from iotflow.sinks.timescale import MeasurementSink
from iotflow.tables import devices as device_tables, ingest as ingest_tables, rollouts as rollout_tables
from iotflow.tables.batched import TableBatch, stored, warm_changelog_metadata
from iotflow.telemetry import Limits
from iotflow.transport import Consumer, FlowControl, Transport
from iotflow.worker import Worker as DrainingWorker
from iotflow.web import audit as audit_views, console as console_views, devices, firmware as firmware_views, flags as flag_views, hardening, health, ingest as ingest_views, openapi, pipeline
from iotflow.web.auth import Guard

log = structlog.get_logger(__name__)


def create_app(settings: Settings) -> faust.App:
    """Build the app for ``settings``: nothing connects until the worker starts it."""
    logs.configure(settings.log_level)
    logs.quiet_repeats("aiokafka")
    logs.quiet_repeats("asyncpg")  # its pool logs a traceback per failed reconnect while a database is away
    # Faust creates the datadir itself but not its parents.
    settings.worker_dir.parent.mkdir(parents=True, exist_ok=True)
    app = faust.App(
        settings.app_id,
        broker=[f"kafka://{server}" for server in settings.kafka_bootstrap.split(",")],
        store=f"{settings.store}://",
        datadir=str(settings.worker_dir),
        autodiscover=False,
        web_host=settings.web_host,
        web_bind=settings.web_host,
        web_port=settings.web_port,
        canonical_url=f"http://{settings.web_host}:{settings.web_port}",
        topic_partitions=settings.topic_partitions,
        topic_replication_factor=settings.replication_factor,
        broker_request_timeout=settings.kafka_request_timeout_s,
        broker_session_timeout=settings.kafka_session_timeout_s,
        consumer_auto_offset_reset="earliest",
        producer_acks=-1,
        # Every table write is a changelog record: without a linger each one becomes its own
        # produce request, and with acks=all one in flight per partition that caps a worker at a
        # few hundred events/s. 5 ms of batching costs little latency and lifts that cap.
        producer_linger=0.005,
        producer_max_batch_size=256 * 1024,
        # The ingest agent acknowledges events only once their rows are durable; Faust's
        # wait-for-empty on rebalance/stop would wait for acks that a paused pipeline cannot
        # give. Unacknowledged events are replayed by the next owner, harmlessly (invariant 2-3).
        stream_wait_empty=False,
        processing_guarantee=settings.processing_guarantee,
        table_standby_replicas=settings.table_standby_replicas,
        # Faust's worker with a drain on SIGTERM (iotflow/worker.py).
        Worker=type("Worker", (DrainingWorker,), {"drain_s": settings.shutdown_drain_s,
                                                  "gc_gen0_threshold": settings.gc_gen0_threshold}),
    )
    app.transport = Transport(app.conf.broker_consumer, app)
    app.flow_control = FlowControl(loop=app.loop)  # before any stream's queue registers with it
    marks = ingest_tables.marks(app, settings)
    accounts = ingest_tables.accounts(app, settings)
    latest = ingest_tables.latest(app, settings)
    registry_table = device_tables.registry(app, settings)
    sink = MeasurementSink(
        settings.tsdb_dsn,
        pool_size=settings.pg_pool_size,
        connect_timeout_s=settings.pg_connect_timeout_s,
        command_timeout_s=settings.pg_command_timeout_s,
    )
    registry_pool = _api_pool(settings, settings.pg_dsn)
    registry = DeviceRegistry(registry_pool)
    ingest_pipeline = IngestPipeline(
        sink=sink,
        dlq=topics.sensor_data_dlq(app, settings),
        # The classes are their own codecs: ``Mark.encode(mark)``, ``Mark.decode(raw)``.
        marks=TableBatch(app, marks, Mark),
        accounts=TableBatch(app, accounts, DeviceAccount),
        latest=TableBatch(app, latest, LatestValues),
        # Co-partitioned with sensor-data: a device's entry is in its telemetry's partition.
        device_status=lambda partition, key: registry_status(stored(registry_table, partition, key)),
        parked=ParkingLot(wait_s=settings.unknown_device_wait_s, max_messages=settings.unknown_device_max_parked),
        ack=lambda messages: cast(Consumer, app.consumer).ack_all(messages),
        confirm=registry.confirm,  # devices the table does not know yet, asked of PostgreSQL
        limits=Limits(
            max_clock_skew=timedelta(seconds=settings.max_clock_skew_s),
            retention=timedelta(days=settings.retention_days),
        ),
        batch_size=settings.sink_batch_size,
        dedup_window_s=settings.dedup_window_s,
    )
    archive_store = ObjectStore.from_settings(settings) if settings.archive_location else None
    ingest.register(app, settings, ingest_pipeline, sink,
                    Archiver(settings, archive_store, spool=settings.archive_spool_dir) if archive_store else None)
    guard = Guard(settings)
    if settings.jwt_secret == DEV_JWT_SECRET:
        log.warning("jwt_development_secret", detail="IOTFLOW_JWT_SECRET is the development default: "
                    "anyone can mint tokens; set a secret of your own outside development")
    defaults = [f"IOTFLOW_MQTT_{which.upper()}_PASSWORD" for which, password in DEV_MQTT_PASSWORDS.items()
                if getattr(settings, f"mqtt_{which}_password") == password]
    if defaults:
        log.warning("mqtt_development_passwords", settings=defaults,
                    detail="the MQTT platform accounts have the development passwords; set your own outside development")
    measurements_pool = _api_pool(settings, settings.tsdb_dsn)
    reader = MeasurementReader(measurements_pool, Archive(archive_store) if archive_store else None,
                               settings.retention_days)
    health.register(app)
    pipeline.register(app, settings, accounts, reader, guard)
    ingest_views.register(app, settings, guard)
    relay = OutboxRelay(registry_pool, bootstrap=settings.kafka_bootstrap,
                        topic=topics.name(settings, topics.DEVICE_EVENTS), batch_size=settings.outbox_batch_size,
                        request_timeout_s=settings.kafka_request_timeout_s)
    cache = DeviceCache(client_for(settings.redis_url, timeout_s=settings.redis_timeout_s),
                        timeout_s=settings.redis_timeout_s, ttl_s=settings.cache_ttl_s)
    presence_table = device_tables.presence(app, settings)
    device_agents.register(app, settings, registry_table=registry_table, presence=presence_table,
                           registry=registry, relay=relay, cache=cache)
    credentials = DeviceCredentials(settings)
    devices.register(app, settings, registry, cache, registry_table, presence_table, latest, reader, guard, credentials)
    rollout_store = RolloutStore(registry)
    publisher = CommandPublisher(settings, f"iotflow-orchestrator-{settings.app_id}-{socket.gethostname()}-{settings.web_port}")
    progress_table = rollout_tables.progress(app, settings)
    firmware_agents.register(app, settings, rollout_store,
                             Orchestrator(registry.connection, publisher, tick_s=settings.rollout_tick_s),
                             progress_table)
    firmware_views.register_rollouts(app, rollout_store, guard, progress_table)
    firmware_views.register(app, FirmwareCatalogue(registry), guard)
    flag_views.register(app, Flags(registry.connection), guard)
    audit_views.register(app, registry, guard)
    health.register_readiness(app, registry_pool, cache, measurements_pool)
    observability.register(app, settings, ingest_pipeline,
                           {"sink": sink.pool, "registry": registry_pool, "measurements": measurements_pool})

    @app.task
    async def warm_metadata() -> None:
        try:
            await warm_changelog_metadata(app)
        except Exception:  # noqa: BLE001 - a warm-up that fails must not take the worker (and ingest) down
            log.exception("changelog_metadata_warm_up_failed")

    openapi.register(app)
    console_views.register(app)
    hardening.install(app, settings.api_max_body_bytes)
    _close_on_stop(app, relay, cache, publisher, credentials, registry_pool, measurements_pool)
    return app


def _api_pool(settings: Settings, dsn: str) -> LazyPool:
    """A pool of the API's (and its timers') own, apart from the sink's."""
    return LazyPool(dsn, size=settings.pg_pool_size, connect_timeout_s=settings.pg_connect_timeout_s,
                    command_timeout_s=settings.pg_command_timeout_s, application_name="iotflow-api")


def _close_on_stop(app: faust.App, relay: OutboxRelay, cache: DeviceCache, publisher: CommandPublisher,
                   credentials: DeviceCredentials, *pools: LazyPool) -> None:
    @app.service
    class CloseClients(mode.Service):
        async def on_stop(self) -> None:
            await relay.stop()
            await cache.close()
            publisher.close()
            credentials.close()
            for pool in pools:
                await pool.close()


def _load_settings() -> Settings:
    try:
        return Settings.from_env()
    except SettingsError as exc:
        # One line naming the variable, not a traceback: this is what an operator sees.
        raise SystemExit(f"iotflow: {exc}") from None


app = create_app(_load_settings())
