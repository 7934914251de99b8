"""The :class:`faust.App` of iotflow, wired to its agents, tables and views by explicit calls."""
from __future__ import annotations

import faust

from iotflow import logs
from iotflow.agents import counting
from iotflow.errors import SettingsError
from iotflow.settings import Settings
from iotflow.tables import counts
from iotflow.web import health, ingest


def create_app(settings: Settings) -> faust.App:
    """Build the app for ``settings``: nothing connects until the worker starts it."""
    logs.configure(settings.log_level)
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
        processing_guarantee=settings.processing_guarantee,
    )
    app.iotflow_settings = settings  # read by views; faust.App has no slot for our settings
    message_counts = counts.define(app, settings)
    counting.register(app, settings, message_counts)
    health.register(app)
    ingest.register(app, message_counts)
    return app


def _load_settings() -> Settings:
    try:
        return Settings.from_env()
    except SettingsError as exc:
        # One line naming the variable, not a traceback: this is what an operator sees.
        raise SystemExit(f"iotflow: {exc}") from None


app = create_app(_load_settings())
