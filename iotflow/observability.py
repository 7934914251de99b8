"""The worker's metrics that are sampled rather than counted, and the HTTP metrics middleware.

Every few seconds a timer records, for the partitions this worker owns: consumer lag in records
(high watermark − committed offset) of iotflow's source topics, and for sensor-data the processing
lag in seconds (how old the newest durable message is, while records wait; 0 when caught up);
and the use of each PostgreSQL pool. Table recovery progress is read at scrape time. Labels are
bounded: topic, partition, pool and route *templates* — never a device id or a raw path.
"""
from __future__ import annotations

import time
from collections.abc import Awaitable, Callable
from typing import Any

import faust
import structlog
from aiohttp import web
from faust.types import TP

from iotflow import metrics, topics
from iotflow.agents.timers import survives
from iotflow.ingest import IngestPipeline
from iotflow.pg import LazyPool
from iotflow.settings import Settings
from iotflow.web.problems import request_id

SAMPLE_EVERY_S = 5.0

log = structlog.get_logger(__name__)


def register(app: faust.App, settings: Settings, pipeline: IngestPipeline, pools: dict[str, LazyPool]) -> None:
    sensor_data = topics.name(settings, topics.SENSOR_DATA)
    sources = {sensor_data, topics.name(settings, topics.DEVICE_EVENTS), topics.name(settings, topics.FIRMWARE_STATUS)}
    held = HeldPartitions()

    metrics.TABLE_RECOVERY_ACTIVE.set_function(lambda: bool(app.in_recovery))
    metrics.TABLE_RECOVERY_REMAINING.set_function(lambda: _recovery_remaining(app))
    metrics.TABLE_STANDBY_REMAINING.set_function(lambda: standby_remaining(getattr(app.tables, "recovery", None)))
    metrics.FETCH_HELD.set_function(lambda: len(_fetch_held(app, sources)))

    @app.timer(SAMPLE_EVERY_S, name="iotflow.metrics.sample")
    @survives("metrics_sample")
    async def sample() -> None:
        sample_lag(app, sources, sensor_data, pipeline.durable_until, time.time())
        if not app.in_recovery:
            held.report(_fetch_held(app, sources), time.monotonic())
        for name, pool in pools.items():
            in_use, idle, most = pool.usage()
            metrics.POOL_CONNECTIONS.labels(name, "in_use").set(in_use)
            metrics.POOL_CONNECTIONS.labels(name, "idle").set(idle)
            metrics.POOL_CONNECTIONS.labels(name, "max").set(most)

    app.web.web_app.middlewares.append(http_metrics)


def _fetch_held(app: faust.App, sources: set[str]) -> dict[TP, str]:
    """Assigned partitions of the source topics that the fetcher does not read, with why: paused
    by Faust, taken out while their stream's buffer is under pressure, or neither — while not
    restoring tables, more than a moment of this means a stuck worker."""
    consumer = getattr(app, "_consumer", None)
    if consumer is None or getattr(consumer, "_active_partitions", None) is None:
        return {}
    active = set(consumer._active_partitions)
    paused, buffered = set(consumer._paused_partitions), set(consumer._buffered_partitions)
    return {tp: "paused" if tp in paused else "buffer_full" if tp in buffered else "inactive"
            for tp in consumer.assignment() if tp.topic in sources and tp not in active}


class HeldPartitions:
    """Warns of source partitions left unread longer than ``after_s``, at most once per ``every_s``."""

    def __init__(self, after_s: float = 30.0, every_s: float = 60.0) -> None:
        self.after_s, self.every_s = after_s, every_s
        self._since: dict[TP, float] = {}
        self._warned_at = float("-inf")

    def report(self, held: dict[TP, str], now: float) -> None:
        self._since = {tp: self._since.get(tp, now) for tp in held}
        stuck = {f"{tp.topic}:{tp.partition}": why for tp, why in held.items() if now - self._since[tp] >= self.after_s}
        if stuck and now - self._warned_at >= self.every_s:
            self._warned_at = now
            log.warning("partitions_not_fetched", partitions=stuck, held_for_s=round(max(
                now - self._since[tp] for tp in held), 1))


def sample_lag(app: faust.App, sources: set[str], sensor_data: str, durable_until: dict[int, float],
               now: float) -> None:
    """Set the lag gauges for the source partitions this worker owns; drop those it gave up."""
    consumer = app.consumer
    committed_offsets = consumer._committed_offset  # Faust's record of what it committed (next offset)
    metrics.CONSUMER_LAG.clear()
    metrics.PROCESSING_LAG.clear()
    for tp in consumer.assignment():
        if tp.topic not in sources:
            continue
        highwater = consumer.highwater(tp)
        if highwater is None:
            continue  # nothing fetched from it yet
        behind = max(0, highwater - (committed_offsets.get(tp) or 0))
        metrics.CONSUMER_LAG.labels(tp.topic, str(tp.partition)).set(behind)
        if tp.topic == sensor_data:
            durable = durable_until.get(tp.partition)
            age = now - durable if behind and durable else 0.0
            metrics.PROCESSING_LAG.labels(str(tp.partition)).set(max(0.0, age))


def _recovery_remaining(app: faust.App) -> int:
    recovery = getattr(app.tables, "recovery", None)
    return int(recovery.active_remaining_total()) if recovery is not None and app.in_recovery else 0


def standby_remaining(recovery: Any) -> int:
    """Records the standby partitions' changelogs held, at the last rebalance, past what this worker
    has read of them. Faust's own ``standby_remaining_total`` leaves out a partition of which nothing
    was read yet (offset -1): exactly the standbys of a worker that starts on an empty folder."""
    if recovery is None:
        return 0
    offsets = recovery.standby_offsets
    return sum(max(0, highwater - offsets.get(tp, -1))
               for tp, highwater in recovery.standby_highwaters.items() if highwater >= 0)


@web.middleware
async def http_metrics(request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
                       ) -> web.StreamResponse:
    """Count and time every request by its route template (``/api/v1/devices/{device_id}``), with
    its correlation id bound to every log line written while it is handled."""
    started = time.perf_counter()
    route = _route(request)
    status = 500
    structlog.contextvars.bind_contextvars(request_id=request_id(request), route=route)
    try:
        response = await handler(request)
        status = response.status
        return response
    except web.HTTPException as exc:
        status = exc.status
        raise
    finally:
        structlog.contextvars.unbind_contextvars("request_id", "route")
        metrics.HTTP_DURATION.labels(route, request.method).observe(time.perf_counter() - started)
        metrics.HTTP_REQUESTS.labels(route, request.method, str(status)).inc()


def _route(request: web.Request) -> str:
    info = request.match_info
    resource = info.route.resource if info is not None and info.route is not None else None
    if resource is None or info.http_exception is not None:
        return "unmatched"  # 404/405: the raw path would be an unbounded label
    return resource.canonical
