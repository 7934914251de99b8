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
from typing import Any

import asyncpg

from iotflow.errors import IdempotencyMismatch, InvalidRequest, RolloutNotFound
from iotflow.registry import DeviceRegistry
from iotflow.rollouts import RolloutRequest, plan_waves

PAGE = 100
_ROLLOUT = ("id, firmware_version, status, spec, rollback_of, abort_reason, created_at, updated_at, "
            "started_at, finished_at")


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
                "INSERT INTO rollouts (id, firmware_version, spec, idempotency_key, request_sha256) "
                "VALUES ($1, $2, $3::jsonb, $4, $5) ON CONFLICT (idempotency_key) DO NOTHING RETURNING id",
                rollout_id, request.firmware, json.dumps(request.canonical), key, request.sha256)
            if created is not None:
                targets = await _resolve(conn, request)
                plan = plan_waves(targets, request.waves, salt=str(rollout_id), percent=request.percent)
                rows = [(device_id, wave, targets[device_id]) for wave, ids in enumerate(plan) for device_id in ids]
                await conn.execute(
                    "INSERT INTO rollout_devices (device_id, rollout_id, wave, from_version) "
                    "SELECT d, $1, w, v FROM unnest($2::text[], $3::int[], $4::text[]) AS t(d, w, v)",
                    rollout_id, [r[0] for r in rows], [r[1] for r in rows], [r[2] for r in rows])
                return await _read(conn, rollout_id), True
            existing = await conn.fetchrow("SELECT id, request_sha256 FROM rollouts WHERE idempotency_key = $1", key)
        if existing["request_sha256"] != request.sha256:
            raise IdempotencyMismatch(key, str(existing["id"]))
        return await self.get(str(existing["id"])), False

    async def get(self, rollout_id: str) -> dict[str, Any]:
        try:
            parsed = uuid.UUID(rollout_id)
        except ValueError:
            raise RolloutNotFound(rollout_id) from None
        async with self.connection() as conn:
            return await _read(conn, parsed)

    async def list(self, status: str | None) -> list[dict[str, Any]]:
        """The newest rollouts (of one status, if given), without per-device counts."""
        async with self.connection() as conn:
            records = await conn.fetch(
                f"SELECT {_ROLLOUT} FROM rollouts WHERE $1::text IS NULL OR status = $1 "
                "ORDER BY created_at DESC, id LIMIT $2", status, PAGE)
        return [_rollout_json(r) for r in records]


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
    for name in ("created_at", "updated_at", "started_at", "finished_at"):
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
    return {**_rollout_json(record), "devices": sum(by_state.values()), "by_state": by_state,
            "waves": [{"wave": w, "size": sum(states.values()), "by_state": states} for w, states in sorted(waves.items())]}
