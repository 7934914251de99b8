"""The firmware-status agent and the rollout orchestrator's timer.

``firmware-status`` carries the devices' reports (bridge ← ``devices/{id}/firmware/status``). Each is
applied to its execution in PostgreSQL in its own transaction before the next is read, so Faust
acknowledges it only once applied; reports are at least once and out of order, and applying
one again changes nothing (:func:`iotflow.rollouts.apply_report`). A report that cannot be read,
or that no device may send in its state, goes to ``sensor-data-dlq`` as ``invalid_status`` with
the original bytes and the field and reason in headers; the agent goes on.

The orchestrator (iotflow/orchestrator.py) ticks on the leader worker only. After each tick it
publishes a progress snapshot of every rollout active or ended within the hour to
``rollout-progress`` (keyed by rollout id) — when it changed, and every ``_PROGRESS_RESEND_S``
regardless, so a new leader or a lost record is repaired — and the progress agent keeps each
rollout's newest snapshot (by the database time it was counted at) in the ``rollout-progress``
table, which ``GET /rollouts/{id}/progress`` serves from the worker owning the key.
"""
from __future__ import annotations

import asyncio
import json
import time

import asyncpg
import faust
import structlog
from aiokafka.errors import KafkaError

from iotflow import metrics, topics
from iotflow.agents.timers import Outage, survives
from iotflow.errors import InvalidRequest, IotflowError
from iotflow.orchestrator import Orchestrator
from iotflow.rollout_store import RolloutStore
from iotflow.rollouts import InvalidTransition, parse_status_report
from iotflow.settings import Settings
from iotflow.tables.batched import TableBatch, write_all

log = structlog.get_logger(__name__)

_TRANSIENT = (asyncpg.PostgresError, asyncpg.InterfaceError, OSError, TimeoutError, IotflowError)
_RETRY_S = 1.0
_PROGRESS_RESEND_S = 15.0


class _Raw:
    """Codec of the progress table: the snapshot's JSON bytes as they came."""

    @staticmethod
    def encode(value: bytes) -> bytes:
        return value

    @staticmethod
    def decode(raw: bytes) -> bytes:
        return raw


def _as_of_ms(raw: bytes) -> int:
    return int(json.loads(raw)["as_of_ms"])


def register(app: faust.App, settings: Settings, store: RolloutStore, orchestrator: Orchestrator,
             progress: faust.Table) -> None:
    dlq = topics.sensor_data_dlq(app, settings)
    progress_topic = topics.rollout_progress(app, settings)
    snapshots = TableBatch(app, progress, _Raw)
    sent: dict[str, tuple[str, float]] = {}  # rollout id → (snapshot without its time, when published)

    async def to_dlq(event: faust.EventT, field: str, reason: str) -> None:
        message = event.message
        metrics.FIRMWARE_REPORTS.labels("invalid").inc()
        metrics.DLQ.labels("invalid_status").inc()
        log.warning("firmware_report_invalid", field=field, reason=reason[:200], partition=message.partition,
                    offset=message.offset)
        await dlq.send(key=message.key, value=message.value, headers=[
            ("iotflow-error", b"invalid_status"), ("iotflow-field", field.encode()),
            ("iotflow-reason", reason.encode()), ("iotflow-source-topic", message.topic.encode()),
            ("iotflow-source-partition", str(message.partition).encode()),
            ("iotflow-source-offset", str(message.offset).encode())])

    @app.agent(topics.firmware_status(app, settings), name="iotflow.firmware.status")
    async def firmware_status(stream: faust.StreamT) -> None:
        async for event in stream.events():
            try:
                report = parse_status_report(event.key, event.value)
            except InvalidRequest as exc:
                first = exc.errors[0] if exc.errors else {"field": "value", "reason": str(exc)}
                await to_dlq(event, str(first["field"]), str(exc))
                continue
            while True:  # PostgreSQL away: the report waits (and so does the partition), never dropped
                try:
                    outcome = await store.apply_report(report)
                    break
                except InvalidTransition as exc:
                    await to_dlq(event, "state", str(exc))
                    outcome = None
                    break
                except _TRANSIENT as exc:
                    log.warning("firmware_report_retry", error=f"{exc.__class__.__name__}: {exc}")
                    await asyncio.sleep(_RETRY_S)
            if outcome is not None:
                metrics.FIRMWARE_REPORTS.labels(outcome).inc()
                if outcome in ("stale", "unknown"):  # rare: a late report of a retried command, a deleted rollout
                    log.info("firmware_report_ignored", outcome=outcome, device_id=report.device_id,
                             rollout_id=report.rollout_id, state=report.state.value,
                             partition=event.message.partition, offset=event.message.offset)

    @app.agent(progress_topic, name="iotflow.rollouts.progress")
    async def rollout_progress(stream: faust.StreamT) -> None:
        async for event in stream.events():
            partition, key = event.message.partition, event.key or b""
            try:
                newer = _as_of_ms(event.value)
                held = snapshots.get(partition, key)
                if held is not None and _as_of_ms(held) > newer:
                    continue  # an older count (a former leader's, delivered late)
            except (ValueError, KeyError, TypeError) as exc:
                log.error("rollout_progress_unreadable", key=key[:80], value=event.value[:200],
                          partition=partition, offset=event.message.offset, error=str(exc))
                continue
            snapshots.set(partition, key, event.value)
            await write_all((snapshots, snapshots.take()))

    async def publish_progress(progress_now: dict[str, dict]) -> None:
        now = time.monotonic()
        for rid, snapshot in progress_now.items():
            content = json.dumps({k: v for k, v in snapshot.items() if k not in ("as_of", "as_of_ms")}, sort_keys=True)
            last = sent.get(rid)
            if last is not None and last[0] == content and now - last[1] < _PROGRESS_RESEND_S:
                continue
            await progress_topic.send(key=rid.encode(), value=json.dumps(snapshot).encode())
            sent[rid] = (content, now)
        for rid in set(sent) - set(progress_now):
            del sent[rid]

    tick_outage, progress_outage = Outage("orchestrator_tick_failed"), Outage("rollout_progress_publish_failed")

    @app.timer(settings.rollout_tick_s, name="iotflow.rollouts.orchestrator", on_leader=True)
    @survives("orchestrator")
    async def orchestrate() -> None:
        try:
            report = await orchestrator.tick()
        except _TRANSIENT as exc:
            tick_outage.failed(exc)  # the next tick retries
            return
        tick_outage.succeeded()
        try:
            await publish_progress(report.progress)
        except (KafkaError, OSError, TimeoutError) as exc:
            progress_outage.failed(exc)  # resent next tick
        else:
            progress_outage.succeeded()
        if report.dispatched or report.timed_out or report.retried or report.ended:
            log.info("orchestrator_tick", dispatched=report.dispatched, timed_out=report.timed_out,
                     retried=report.retried, ended=report.ended, held=report.held)
