"""The rollout orchestrator: one tick at a time on the leader worker (a Faust leader timer).

Each tick, for every rollout not yet ended, under a PostgreSQL advisory lock (a worker that still
believes it leads after the group moved on cannot tick at the same time as the new leader):

1. ``scheduled`` → ``running`` once its ``start_at`` passed;
2. devices in progress longer than ``device_timeout_s`` since their command → TIMED_OUT; FAILED
   and TIMED_OUT devices with attempts left → QUEUED again after a backoff (a new command id);
3. the health gate: a SUCCEEDED device that heartbeats after its success is ``ok``; one that has
   not within ``health_window_s`` is ``failed`` and counts as FAILED from then on;
4. the abort criteria over the whole rollout (health failures count as FAILED): met → ``aborted``,
   its QUEUED devices CANCELED — no device of a later wave gets a command;
5. the open wave complete (every device ended, health decided, the success share met) → the next
   wave opens, or after the last the rollout is ``completed``; ended below the share → ``aborted``;
6. dispatch, unless the kill switch is on, the rollout's own flag is off, it is paused or outside
   its maintenance windows (iotflow/maintenance.py; none: any time): up to
   ``dispatch_per_s`` × the tick of its QUEUED devices in open waves get a command id written
   *before* the command is published (QoS 1); those the broker acknowledged become NOTIFIED. A
   leader that dies in between leaves command ids behind that the next leader publishes again,
   unchanged: a device applies a command id once.
"""
from __future__ import annotations

import json
import uuid
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

import asyncpg
import structlog

from iotflow import flags as feature_flags
from iotflow import metrics
from iotflow.backoff import full_jitter
from iotflow.commands import Command, CommandPublisher
from iotflow.maintenance import window_open, windows_from_spec
from iotflow.rollouts import AbortCriteria, DeviceState

log = structlog.get_logger(__name__)

_LOCK = 0x10_7F_10_01  # pg advisory lock key of the orchestrator
_ACTIVE = ("scheduled", "running", "paused")
_IN_PROGRESS = ["NOTIFIED", "DOWNLOADING", "DOWNLOADED", "VERIFIED", "UPDATING"]
UNHEALTHY = "SUCCEEDED_UNHEALTHY"  # a progress series: succeeded, then failed the health gate
_RETRY_BASE_S, _RETRY_CAP_S = 5.0, 300.0
_METRICS_KEEP = timedelta(hours=1)


@dataclass
class TickReport:
    rollouts: int = 0
    dispatched: int = 0
    timed_out: int = 0
    retried: int = 0
    ended: dict[str, str] = field(default_factory=dict)  # rollout id → status it ended in
    held: str | None = None  # why dispatch was held (kill switch), if it was
    # Rollouts active or ended within the hour: rollout id → progress snapshot (progress_snapshot()).
    progress: dict[str, dict[str, Any]] = field(default_factory=dict)


@dataclass(frozen=True)
class _Rollout:
    id: uuid.UUID
    status: str
    spec: dict[str, Any]
    current_wave: int
    start_at: datetime | None

    @property
    def abort(self) -> AbortCriteria:
        raw = self.spec["abort"]
        return AbortCriteria(frozenset(DeviceState(s) for s in raw["failure_states"]), float(raw["threshold_pct"]),
                             int(raw["min_executed"]))


class Orchestrator:
    def __init__(self, connection: Any, publisher: CommandPublisher, *, tick_s: float) -> None:
        self.connection = connection  # DeviceRegistry.connection
        self.publisher = publisher
        self.tick_s = tick_s
        self._shown: dict[str, set[str]] = {}  # rollout id → progress series set last time

    async def tick(self) -> TickReport:
        report = TickReport()
        commands: list[Command] = []
        async with self.connection(transaction=True) as conn:
            if not await conn.fetchval("SELECT pg_try_advisory_xact_lock($1)", _LOCK):
                return report  # another orchestrator is in its tick
            rollouts = [_Rollout(r["id"], r["status"], json.loads(r["spec"]), r["current_wave"], r["start_at"])
                        for r in await conn.fetch(
                            "SELECT id, status, spec, current_wave, start_at FROM rollouts "
                            "WHERE status = ANY($1::text[]) ORDER BY created_at", list(_ACTIVE))]
            report.rollouts = len(rollouts)
            names = [feature_flags.KILL_SWITCH, feature_flags.DELTA_UPDATES,
                     *(feature_flags.rollout_flag(str(r.id)) for r in rollouts)]
            flags = await feature_flags.read(conn, names)
            kill = flags.get(feature_flags.KILL_SWITCH)
            if kill is not None and kill.enabled:
                report.held = "kill switch on"
            for rollout in rollouts:
                commands += await self._advance(conn, rollout, flags, report)
        acked = await self.publisher.publish_all(commands)
        if acked:
            async with self.connection() as conn:
                await conn.execute(
                    "UPDATE rollout_devices r SET state = 'NOTIFIED', notified_at = now(), state_changed_at = now() "
                    "FROM unnest($1::text[], $2::uuid[], $3::uuid[]) AS a(device_id, rollout_id, command_id) "
                    "WHERE r.device_id = a.device_id AND r.rollout_id = a.rollout_id "
                    "AND r.command_id = a.command_id AND r.state = 'QUEUED'",
                    [c.device_id for c in acked], [uuid.UUID(c.payload["rollout_id"]) for c in acked],
                    [uuid.UUID(c.command_id) for c in acked])
        report.dispatched = len(acked)
        report.progress = await self._show_progress()
        return report

    async def _advance(self, conn: asyncpg.Connection, rollout: _Rollout, flags: dict[str, feature_flags.Flag],
                       report: TickReport) -> list[Command]:
        spec, rid = rollout.spec, rollout.id
        if rollout.status == "scheduled":
            if rollout.start_at is not None and rollout.start_at > datetime.now(UTC):
                return []
            await conn.execute("UPDATE rollouts SET status = 'running', started_at = now(), updated_at = now() "
                               "WHERE id = $1", rid)
            rollout = _Rollout(rid, "running", spec, rollout.current_wave, rollout.start_at)
        timed_out = await conn.fetch(
            "UPDATE rollout_devices SET state = 'TIMED_OUT', state_changed_at = now(), error = $4 "
            "WHERE rollout_id = $1 AND state = ANY($3::text[]) AND notified_at < now() - make_interval(secs => $2) "
            "RETURNING device_id", rid, float(spec["device_timeout_s"]), _IN_PROGRESS,
            f"no report within {spec['device_timeout_s']} s of the command")
        report.timed_out += len(timed_out)
        if timed_out:
            metrics.FIRMWARE_FAILURES.labels("TIMED_OUT").inc(len(timed_out))
        report.retried += await self._retry(conn, rid, int(spec["retries"]))
        unhealthy = await conn.fetchval(
            "WITH decided AS (UPDATE rollout_devices r "
            "SET health = CASE WHEN d.last_seen > r.succeeded_at THEN 'ok' ELSE 'failed' END "
            "FROM devices d WHERE r.rollout_id = $1 AND r.state = 'SUCCEEDED' AND r.health IS NULL AND d.id = r.device_id "
            "AND (d.last_seen > r.succeeded_at OR r.succeeded_at < now() - make_interval(secs => $2)) RETURNING r.health) "
            "SELECT count(*) FILTER (WHERE health = 'failed') FROM decided",
            rid, float(spec.get("health_window_s", 0)))
        if unhealthy:
            metrics.FIRMWARE_FAILURES.labels("UNHEALTHY").inc(unhealthy)
        counts = await conn.fetch(
            "SELECT wave, state, health, count(*) AS n FROM rollout_devices WHERE rollout_id = $1 "
            "GROUP BY wave, state, health", rid)
        total: dict[DeviceState, int] = {}
        for row in counts:
            state = DeviceState(row["state"])
            if state is DeviceState.SUCCEEDED and row["health"] == "failed":
                state = DeviceState.FAILED  # the health gate: it did not come back
            total[state] = total.get(state, 0) + row["n"]
        reason = rollout.abort.reason(total)
        if reason is not None:
            await self._end(conn, rid, "aborted", reason, report)
            return []
        if rollout.status == "paused":
            return []
        wave = rollout.current_wave
        in_wave = [r for r in counts if r["wave"] == wave]
        size = sum(r["n"] for r in in_wave)
        decided = sum(r["n"] for r in in_wave if DeviceState(r["state"]).terminal
                      and (r["state"] != "SUCCEEDED" or r["health"] is not None))
        if size and decided >= size:
            healthy = sum(r["n"] for r in in_wave if r["state"] == "SUCCEEDED" and r["health"] == "ok")
            share = 100.0 * healthy / size
            if share < float(spec["success_pct"]):
                await self._end(conn, rid, "aborted",
                                f"wave {wave}: {healthy} of {size} devices succeeded ({share:.1f}% < {spec['success_pct']:g}%)",
                                report)
                return []
            last = max(r["wave"] for r in counts)
            if wave >= last:
                await self._end(conn, rid, "completed", None, report)
                return []
            wave += 1
            await conn.execute("UPDATE rollouts SET current_wave = $2, updated_at = now() WHERE id = $1", rid, wave)
            log.info("rollout_wave_opened", rollout_id=str(rid), wave=wave)
        own = flags.get(feature_flags.rollout_flag(str(rid)))
        if report.held is not None or (own is not None and not own.enabled):
            return []
        if not window_open(windows_from_spec(spec), datetime.now(UTC)):
            return []  # outside its maintenance windows: commanded devices go on, nothing new goes out
        return await self._commands(conn, rollout, wave, flags.get(feature_flags.DELTA_UPDATES))

    async def _retry(self, conn: asyncpg.Connection, rid: uuid.UUID, retries: int) -> int:
        rows = await conn.fetch(
            "SELECT device_id, attempts FROM rollout_devices WHERE rollout_id = $1 "
            "AND state IN ('FAILED', 'TIMED_OUT') AND attempts <= $2 FOR UPDATE", rid, retries)
        if not rows:
            return 0
        now = datetime.now(UTC)
        await conn.execute(
            "UPDATE rollout_devices r SET state = 'QUEUED', command_id = NULL, notified_at = NULL, "
            "state_changed_at = now(), next_attempt_at = t.at "
            "FROM unnest($2::text[], $3::timestamptz[]) AS t(device_id, at) "
            "WHERE r.rollout_id = $1 AND r.device_id = t.device_id",
            rid, [r["device_id"] for r in rows],
            [now + timedelta(seconds=full_jitter(r["attempts"], base_s=_RETRY_BASE_S, cap_s=_RETRY_CAP_S)) for r in rows])
        return len(rows)

    async def _commands(self, conn: asyncpg.Connection, rollout: _Rollout, wave: int,
                        delta: feature_flags.Flag | None) -> list[Command]:
        budget = max(1, int(float(rollout.spec["dispatch_per_s"]) * self.tick_s))
        rows = await conn.fetch(
            "SELECT r.device_id, r.command_id, f.version, f.url, f.sha256, f.size_bytes "
            "FROM rollout_devices r JOIN firmware f ON f.version = coalesce(r.target_version, $3) "
            "WHERE r.rollout_id = $1 AND r.state = 'QUEUED' AND r.wave <= $2 "
            "AND (r.next_attempt_at IS NULL OR r.next_attempt_at <= now()) "
            "ORDER BY r.wave, r.device_id LIMIT $4 FOR UPDATE OF r SKIP LOCKED",
            rollout.id, wave, rollout.spec["firmware"], budget)
        fresh = {r["device_id"]: uuid.uuid4() for r in rows if r["command_id"] is None}
        if fresh:
            # The intent is durable before anything is published (see the module's docstring).
            await conn.execute(
                "UPDATE rollout_devices r SET command_id = t.command_id, attempts = attempts + 1 "
                "FROM unnest($2::text[], $3::uuid[]) AS t(device_id, command_id) "
                "WHERE r.rollout_id = $1 AND r.device_id = t.device_id",
                rollout.id, list(fresh), list(fresh.values()))
        issued = datetime.now(UTC).isoformat()
        return [Command(r["device_id"], str(r["command_id"] or fresh[r["device_id"]]), {
            "type": "firmware_update", "rollout_id": str(rollout.id), "version": r["version"], "url": r["url"],
            "sha256": r["sha256"], "size_bytes": r["size_bytes"], "issued_at": issued,
            "delivery": "delta" if delta is not None and delta.applies_to(r["device_id"]) else "full",
        }) for r in rows]

    async def _end(self, conn: asyncpg.Connection, rid: uuid.UUID, status: str, reason: str | None,
                   report: TickReport) -> None:
        await conn.execute(
            "UPDATE rollout_devices SET state = 'CANCELED', state_changed_at = now(), "
            "error = coalesce($2, error) WHERE rollout_id = $1 AND state = 'QUEUED'", rid,
            f"rollout {status}" if status != "completed" else None)
        await conn.execute("UPDATE rollouts SET status = $2, abort_reason = $3, finished_at = now(), updated_at = now() "
                           "WHERE id = $1", rid, status, reason)
        report.ended[str(rid)] = status
        metrics.ROLLOUTS_ENDED.labels(status).inc()
        (log.warning if status == "aborted" else log.info)("rollout_ended", rollout_id=str(rid), status=status,
                                                          reason=reason)

    async def _show_progress(self) -> dict[str, dict[str, Any]]:
        """``iotflow_firmware_update_progress`` of rollouts active or ended within the hour, and
        their progress snapshots."""
        async with self.connection() as conn:
            rows = await conn.fetch(
                "SELECT o.id AS rollout_id, o.status, o.current_wave, r.wave, r.state, r.health, count(r.*) AS n, "
                "now() AS as_of FROM rollouts o LEFT JOIN rollout_devices r ON r.rollout_id = o.id "
                "WHERE o.status = ANY($1::text[]) OR o.finished_at > now() - $2::interval "
                "GROUP BY o.id, o.status, o.current_wave, r.wave, r.state, r.health", list(_ACTIVE), _METRICS_KEEP)
        shown: dict[str, dict[str, int]] = {}
        for row in rows:
            series = shown.setdefault(str(row["rollout_id"]), {})
            if row["state"] is None:
                continue  # a rollout without devices
            status = UNHEALTHY if row["state"] == "SUCCEEDED" and row["health"] == "failed" else row["state"]
            series[status] = series.get(status, 0) + row["n"]
        for rid, series in shown.items():
            for status in {s.value for s in DeviceState} | {UNHEALTHY}:
                metrics.FIRMWARE_PROGRESS.labels(rid, status).set(series.get(status, 0))
        for rid in set(self._shown) - set(shown):
            for status in self._shown[rid]:
                metrics.FIRMWARE_PROGRESS.remove(rid, status)
        self._shown = {rid: {s.value for s in DeviceState} | {UNHEALTHY} for rid in shown}
        return progress_snapshots(rows)


def progress_snapshots(rows: list[Any]) -> dict[str, dict[str, Any]]:
    """Per rollout, what ``GET /rollouts/{id}`` counts (devices, by state, unhealthy, by wave),
    its status and the database's time of the count, from rows of (rollout_id, status, current_wave,
    wave, state, health, n, as_of)."""
    found: dict[str, dict[str, Any]] = {}
    waves: dict[str, dict[int, dict[str, int]]] = {}
    for row in rows:
        rid = str(row["rollout_id"])
        snapshot = found.setdefault(rid, {
            "rollout_id": rid, "status": row["status"], "current_wave": row["current_wave"], "devices": 0,
            "by_state": {}, "unhealthy": 0, "as_of": row["as_of"].isoformat(),
            "as_of_ms": int(row["as_of"].timestamp() * 1000)})
        if row["state"] is None:
            continue
        snapshot["devices"] += row["n"]
        snapshot["by_state"][row["state"]] = snapshot["by_state"].get(row["state"], 0) + row["n"]
        if row["state"] == "SUCCEEDED" and row["health"] == "failed":
            snapshot["unhealthy"] += row["n"]
        wave = waves.setdefault(rid, {}).setdefault(row["wave"], {})
        wave[row["state"]] = wave.get(row["state"], 0) + row["n"]
    for rid, snapshot in found.items():
        snapshot["waves"] = [{"wave": w, "size": sum(states.values()), "by_state": dict(sorted(states.items()))}
                             for w, states in sorted(waves.get(rid, {}).items())]
        snapshot["by_state"] = dict(sorted(snapshot["by_state"].items()))
    return found
