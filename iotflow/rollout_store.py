"""Rollouts in PostgreSQL: created once per Idempotency-Key, their targets resolved and planned in
waves in the same transaction; read with counts per state and per wave.

Creating: the rollout row is inserted with ``ON CONFLICT (idempotency_key) DO NOTHING`` — of
concurrent requests with one key, one inserts and the others wait on the unique index, then find
its row: the same request (by the SHA-256 of its normal form) gets the original rollout, another
one an :class:`IdempotencyMismatch`. The targets (explicit ids, or a filter over live devices) are
resolved once, here, and written to ``rollout_devices`` (one row per device and rollout, with the
version it comes from) in the same transaction: a rollout exists with all its devices or not at all.
"""
from __future__ import annotations

import json
import uuid
from datetime import UTC, datetime
from typing import Any

import asyncpg

from iotflow import audit, metrics
from iotflow.errors import IdempotencyMismatch, InvalidRequest, RolloutConflict, RolloutNotFound
from iotflow.maintenance import next_opening, window_open, windows_from_spec
from iotflow.registry import DeviceRegistry, set_firmware_version
from iotflow.rollouts import DeviceState, RolloutRequest, StatusReport, apply_report, plan_waves

PAGE = 100
_ROLLOUT = ("id, firmware_version, status, spec, rollback_of, abort_reason, current_wave, created_at, updated_at, "
            "start_at, started_at, finished_at")


class RolloutStore:
    def __init__(self, registry: DeviceRegistry) -> None:
        self.connection = registry.connection

    async def create(self, key: str, request: RolloutRequest) -> tuple[dict[str, Any], bool]:
        """The rollout and whether this call created it."""
        rollout_id = uuid.uuid4()
        async with self.connection(transaction=True) as conn:
            if await conn.fetchval("SELECT 1 FROM firmware WHERE version = $1", request.firmware) is None:
                raise InvalidRequest("Invalid rollout", [{"field": "firmware", "value": request.firmware,
                                                          "reason": "not in the firmware catalogue"}])
            created = await conn.fetchval(
                "INSERT INTO rollouts (id, firmware_version, spec, idempotency_key, request_sha256, start_at) "
                "VALUES ($1, $2, $3::jsonb, $4, $5, $6) ON CONFLICT (idempotency_key) DO NOTHING RETURNING id",
                rollout_id, request.firmware, json.dumps(request.canonical), key, request.sha256,
                datetime.fromisoformat(request.start_at) if request.start_at else None)
            if created is not None:
                targets = await _resolve(conn, request)
                plan = plan_waves(targets, request.waves, salt=str(rollout_id), percent=request.percent)
                rows = [(device_id, wave, targets[device_id]) for wave, ids in enumerate(plan) for device_id in ids]
                await conn.execute(
                    "INSERT INTO rollout_devices (device_id, rollout_id, wave, from_version) "
                    "SELECT d, $1, w, v FROM unnest($2::text[], $3::int[], $4::text[]) AS t(d, w, v)",
                    rollout_id, [r[0] for r in rows], [r[1] for r in rows], [r[2] for r in rows])
                await audit.record(conn, "rollout.create", "rollout", str(rollout_id), firmware=request.firmware,
                                   devices=len(rows), idempotency_key=key)
                return await _read(conn, rollout_id), True
            existing = await conn.fetchrow("SELECT id, request_sha256 FROM rollouts WHERE idempotency_key = $1", key)
        if existing["request_sha256"] != request.sha256:
            raise IdempotencyMismatch(key, str(existing["id"]))
        return await self.get(str(existing["id"])), False

    async def get(self, rollout_id: str) -> dict[str, Any]:
        async with self.connection() as conn:
            return await _read(conn, _rollout_uuid(rollout_id))

    async def apply_report(self, report: StatusReport) -> str:
        """Apply a device's status report: ``applied``, ``duplicate`` (changes nothing), ``stale``
        (for another command than the device's current one) or ``unknown`` (no such execution).
        Raises :class:`InvalidTransition` for what the device may not report now. A SUCCEEDED
        report also moves the device's ``firmware_version`` (with its outbox event), in the same
        transaction."""
        async with self.connection(transaction=True) as conn:
            row = await conn.fetchrow(
                "SELECT r.state, r.command_id, r.notified_at, coalesce(r.target_version, o.firmware_version) AS version, "
                "coalesce((o.spec->>'health_window_s')::int, 0) = 0 AS no_health_window, now() AS now "
                "FROM rollout_devices r JOIN rollouts o ON o.id = r.rollout_id "
                "WHERE r.device_id = $1 AND r.rollout_id = $2 FOR UPDATE OF r",
                report.device_id, uuid.UUID(report.rollout_id))
            if row is None:
                return "unknown"
            if row["command_id"] is None or str(row["command_id"]) != report.command_id:
                return "stale"
            current = DeviceState(row["state"])
            new = apply_report(current, report.state)
            if new is None:
                return "duplicate"
            await conn.execute(
                "UPDATE rollout_devices SET state = $3, state_changed_at = now(), error = $4, "
                "notified_at = coalesce(notified_at, now()), "
                "succeeded_at = CASE WHEN $3 = 'SUCCEEDED' THEN now() ELSE succeeded_at END, "
                "health = CASE WHEN $3 = 'SUCCEEDED' AND $5 THEN 'ok' ELSE health END "
                "WHERE device_id = $1 AND rollout_id = $2",
                report.device_id, uuid.UUID(report.rollout_id), new.value, report.error, row["no_health_window"])
            if new is DeviceState.SUCCEEDED:
                await set_firmware_version(conn, report.device_id, row["version"])
                if row["notified_at"] is not None:
                    metrics.FIRMWARE_UPDATE_SECONDS.observe(max(0.0, (row["now"] - row["notified_at"]).total_seconds()))
            elif new.terminal:
                metrics.FIRMWARE_FAILURES.labels(new.value).inc()
            return "applied"

    async def act(self, rollout_id: str, action: str) -> dict[str, Any]:
        """``pause`` (running or scheduled → paused: no more commands; devices already commanded go
        on and report), ``resume`` (paused → running), ``cancel`` (not ended → canceled; its QUEUED
        devices CANCELED). Repeating an action that already holds answers the rollout unchanged."""
        allowed = {"pause": ({"running", "scheduled"}, "paused"), "resume": ({"paused"}, "running"),
                   "cancel": ({"running", "scheduled", "paused"}, "canceled")}
        sources, target = allowed[action]
        parsed = _rollout_uuid(rollout_id)
        async with self.connection(transaction=True) as conn:
            status = await conn.fetchval("SELECT status FROM rollouts WHERE id = $1 FOR UPDATE", parsed)
            if status is None:
                raise RolloutNotFound(rollout_id)
            if status != target:
                if status not in sources:
                    raise RolloutConflict(rollout_id, status, action)
                await conn.execute(
                    "UPDATE rollouts SET status = $2, updated_at = now(), "
                    "finished_at = CASE WHEN $2 = 'canceled' THEN now() ELSE finished_at END, "
                    "started_at = CASE WHEN $2 = 'running' THEN coalesce(started_at, now()) ELSE started_at END "
                    "WHERE id = $1", parsed, target)
                if target == "canceled":
                    await conn.execute(
                        "UPDATE rollout_devices SET state = 'CANCELED', state_changed_at = now(), error = 'rollout canceled' "
                        "WHERE rollout_id = $1 AND state = 'QUEUED'", parsed)
                    metrics.ROLLOUTS_ENDED.labels("canceled").inc()
                await audit.record(conn, f"rollout.{action}", "rollout", str(parsed), status_before=status)
            return await _read(conn, parsed)

    async def rollback(self, rollout_id: str) -> tuple[dict[str, Any], bool]:
        """A rollout sending every device that SUCCEEDED in ``rollout_id`` the version it came
        from, in one wave, with the original's criteria; one per rollout (a repeat answers the same
        rollback). The original is canceled first if it is still going. Devices that came from no
        known version cannot go back (422 names them)."""
        parsed = _rollout_uuid(rollout_id)
        key = f"rollback:{parsed}"
        async with self.connection(transaction=True) as conn:
            original = await conn.fetchrow("SELECT status, spec FROM rollouts WHERE id = $1 FOR UPDATE", parsed)
            if original is None:
                raise RolloutNotFound(rollout_id)
            existing = await conn.fetchval("SELECT id FROM rollouts WHERE idempotency_key = $1", key)
            if existing is not None:
                return await _read(conn, existing), False
            rows = await conn.fetch(
                "SELECT r.device_id, r.from_version, f.version IS NOT NULL AS known FROM rollout_devices r "
                "LEFT JOIN firmware f ON f.version = r.from_version "
                "WHERE r.rollout_id = $1 AND r.state = 'SUCCEEDED' ORDER BY r.device_id", parsed)
            if not rows:
                raise RolloutConflict(rollout_id, original["status"], "be rolled back: no device succeeded in it")
            unknown = [r["device_id"] for r in rows if not r["known"]]
            if unknown:
                raise InvalidRequest("Cannot roll back", [{
                    "field": "from_version", "value": unknown[:20],
                    "reason": f"{len(unknown)} device(s) came from no version of the catalogue"}])
            if original["status"] in ("running", "scheduled", "paused"):
                await conn.execute("UPDATE rollouts SET status = 'canceled', finished_at = now(), updated_at = now() "
                                   "WHERE id = $1", parsed)
                await conn.execute(
                    "UPDATE rollout_devices SET state = 'CANCELED', state_changed_at = now(), error = 'rolled back' "
                    "WHERE rollout_id = $1 AND state = 'QUEUED'", parsed)
            versions = [r["from_version"] for r in rows]
            main = max(set(versions), key=lambda v: (versions.count(v), v))
            spec = {**json.loads(original["spec"]), "firmware": main, "targets": {"devices": [r["device_id"] for r in rows]},
                    "waves": {"sizes": [len(rows)]}, "success_pct": 0}
            rollback_id = uuid.uuid4()
            await conn.execute(
                "INSERT INTO rollouts (id, firmware_version, spec, idempotency_key, request_sha256, rollback_of) "
                "VALUES ($1, $2, $3::jsonb, $4, $5, $6)", rollback_id, main, json.dumps(spec), key, key, parsed)
            current = await conn.fetch(
                "SELECT id, firmware_version FROM devices WHERE id = ANY($1::text[])", [r["device_id"] for r in rows])
            now_at = {r["id"]: r["firmware_version"] for r in current}
            await conn.execute(
                "INSERT INTO rollout_devices (device_id, rollout_id, wave, from_version, target_version) "
                "SELECT d, $1, 0, v, t FROM unnest($2::text[], $3::text[], $4::text[]) AS x(d, v, t)",
                rollback_id, [r["device_id"] for r in rows], [now_at.get(r["device_id"]) for r in rows], versions)
            await audit.record(conn, "rollout.rollback", "rollout", str(parsed), rollback_id=str(rollback_id),
                               firmware=main, devices=len(rows))
            return await _read(conn, rollback_id), True

    async def list(self, status: str | None) -> list[dict[str, Any]]:
        """The newest rollouts (of one status, if given), without per-device counts."""
        async with self.connection() as conn:
            records = await conn.fetch(
                f"SELECT {_ROLLOUT} FROM rollouts WHERE $1::text IS NULL OR status = $1 "
                "ORDER BY created_at DESC, id LIMIT $2", status, PAGE)
        return [_rollout_json(r) for r in records]


def _rollout_uuid(rollout_id: str) -> uuid.UUID:
    try:
        return uuid.UUID(rollout_id)
    except ValueError:
        raise RolloutNotFound(rollout_id) from None


async def _resolve(conn: asyncpg.Connection, request: RolloutRequest) -> dict[str, str | None]:
    """Target device id → the firmware version it has now; live devices only."""
    if request.device_ids is not None:
        records = await conn.fetch(
            "SELECT id, firmware_version FROM devices WHERE id = ANY($1::text[]) AND deleted_at IS NULL",
            list(request.device_ids))
        found = {r["id"]: r["firmware_version"] for r in records}
        missing = [d for d in request.device_ids if d not in found]
        if missing:
            raise InvalidRequest("Invalid rollout", [{"field": "targets.devices", "value": missing[:20],
                                                      "reason": f"{len(missing)} unknown or deleted device(s)"}])
        return found
    wanted = request.filter
    records = await conn.fetch(
        "SELECT id, firmware_version FROM devices WHERE deleted_at IS NULL "
        "AND ($1::text IS NULL OR type = $1) AND ($2::text[] IS NULL OR tags @> $2) "
        "AND ($3::text IS NULL OR firmware_version = $3)",
        wanted.get("type"), wanted.get("tags"), wanted.get("firmware_version"))
    if not records:
        raise InvalidRequest("Invalid rollout", [{"field": "targets.filter", "value": wanted,
                                                  "reason": "matches no live device"}])
    return {r["id"]: r["firmware_version"] for r in records}


def _rollout_json(record: asyncpg.Record) -> dict[str, Any]:
    value = dict(record)
    value["id"] = str(value["id"])
    value["rollback_of"] = str(value["rollback_of"]) if value["rollback_of"] else None
    value["spec"] = json.loads(value["spec"])
    for name in ("created_at", "updated_at", "start_at", "started_at", "finished_at"):
        value[name] = value[name].isoformat() if value[name] else None
    return value


async def _read(conn: asyncpg.Connection, rollout_id: uuid.UUID) -> dict[str, Any]:
    record = await conn.fetchrow(f"SELECT {_ROLLOUT} FROM rollouts WHERE id = $1", rollout_id)
    if record is None:
        raise RolloutNotFound(str(rollout_id))
    counts = await conn.fetch(
        "SELECT wave, state, count(*) AS n FROM rollout_devices WHERE rollout_id = $1 GROUP BY wave, state "
        "ORDER BY wave, state", rollout_id)
    by_state: dict[str, int] = {}
    waves: dict[int, dict[str, int]] = {}
    for row in counts:
        by_state[row["state"]] = by_state.get(row["state"], 0) + row["n"]
        waves.setdefault(row["wave"], {})[row["state"]] = row["n"]
    pace = await conn.fetchrow(
        "SELECT count(*) FILTER (WHERE state IN ('SUCCEEDED', 'FAILED', 'TIMED_OUT', 'REJECTED') "
        "AND state_changed_at > now() - interval '5 minutes') AS recent, "
        "count(*) FILTER (WHERE state = 'SUCCEEDED' AND health = 'failed') AS unhealthy "
        "FROM rollout_devices WHERE rollout_id = $1", rollout_id)
    remaining = sum(n for state, n in by_state.items() if not DeviceState(state).terminal)
    per_min = pace["recent"] / 5.0
    eta_s = round(60.0 * remaining / per_min) if per_min and record["status"] == "running" else None
    value = _rollout_json(record)
    windows, now = windows_from_spec(value["spec"]), datetime.now(UTC)
    opened = window_open(windows, now)
    upcoming = None if opened else next_opening(windows, now)
    return {**value, "devices": sum(by_state.values()), "by_state": by_state,
            "unhealthy": pace["unhealthy"], "rate_per_min": per_min, "eta_s": eta_s,
            "window_open": opened, "next_window_at": upcoming.isoformat() if upcoming else None,
            "waves": [{"wave": w, "size": sum(states.values()), "by_state": states} for w, states in sorted(waves.items())]}
