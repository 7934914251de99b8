"""The device registry in PostgreSQL: devices and, in the same transactions, their outbox events.

Each change of a device and its lifecycle event (registered, updated, deleted) are written in one
transaction, so the event exists if and only if the change does; the outbox relay publishes the
events to ``device-events`` afterwards (docs/devices.md has the consistency model).

Registration is idempotent: the same registration again returns the device as it is and writes
nothing; the same id with other attributes is a :class:`DeviceConflict`. Changes name the version
they were made against (``If-Match``); a stale one is a :class:`VersionMismatch`. Deleting sets
``deleted_at`` and keeps the row (R-05): the device's measurements and events keep their meaning.
"""
from __future__ import annotations

import contextlib
import dataclasses
import json
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from datetime import datetime
from typing import Any

import asyncpg

from iotflow import audit
from iotflow.devices import Change, Device, DeviceQuery, DeviceStatus, Registration, encode_cursor, parse_registration
from iotflow.errors import DeviceConflict, DeviceNotFound, IotflowError, RegistryUnavailable, VersionMismatch
from iotflow.mqtt_auth import reserved
from iotflow.pg import LazyPool, is_transient
from iotflow.settings import Settings

_COLUMNS = "id, name, type, tags, firmware_version, status, created_at, updated_at, last_seen, version, deleted_at"


def _device(record: asyncpg.Record) -> Device:
    return Device(**{**dict(record), "tags": tuple(record["tags"])})


class DeviceRegistry:
    def __init__(self, pool: LazyPool) -> None:
        self.pool = pool

    @contextlib.asynccontextmanager
    async def connection(self, *, transaction: bool = False) -> AsyncIterator[asyncpg.Connection]:
        """A pooled connection (in a transaction if asked); transient driver errors become
        :class:`RegistryUnavailable` at this boundary."""
        try:
            async with self.pool.acquire(await self.pool.get()) as conn:
                if transaction:
                    async with conn.transaction():
                        yield conn
                else:
                    yield conn
        except IotflowError:
            raise
        except Exception as exc:
            if is_transient(exc):
                raise RegistryUnavailable(
                    f"the device registry's database is not answering: {exc.__class__.__name__}: {exc}") from exc
            raise

    async def confirm(self, keys: list[bytes]) -> dict[bytes, DeviceStatus]:
        """The status PostgreSQL — the registry's source of truth — gives the devices of ``keys``
        (telemetry message keys) that it has, in one query; the others are left out (still unknown)."""
        by_id = {key.decode(errors="replace"): key for key in keys}
        async with self.connection() as conn:
            rows = await conn.fetch("SELECT id, deleted_at IS NOT NULL AS deleted FROM devices "
                                    "WHERE id = ANY($1::text[])", list(by_id))
        return {by_id[row["id"]]: DeviceStatus.DELETED if row["deleted"] else DeviceStatus.REGISTERED for row in rows}

    async def register(self, registration: Registration,
                       issue: Callable[[str], Awaitable[str]] | None = None) -> tuple[Device, bool, str | None]:
        """The device, whether this call created it, and — when it did and ``issue`` is given — the
        MQTT password ``issue`` gave its new account. The account is made inside the transaction:
        if the broker refuses, nothing is registered; if the commit fails after it, an account no
        one knows the password of is left (a later registration gives it a new one)."""
        async with self.connection(transaction=True) as conn:
            created = await conn.fetchrow(
                f"INSERT INTO devices (id, name, type, tags, firmware_version, status) "
                f"VALUES ($1, $2, $3, $4, $5, $6) ON CONFLICT (id) DO NOTHING RETURNING {_COLUMNS}",
                registration.id, registration.name, registration.type, list(registration.tags),
                registration.firmware_version, registration.status,
            )
            if created is not None:
                device = _device(created)
                await _event(conn, device, "registered")
                secret = await issue(device.id) if issue is not None else None
                await audit.record(conn, "device.register", "device", device.id, mqtt_credentials=secret is not None)
                return device, True, secret
            existing = _device(await conn.fetchrow(f"SELECT {_COLUMNS} FROM devices WHERE id = $1",
                                                   registration.id))
        if existing.deleted_at is not None:
            raise DeviceConflict(registration.id, ["deleted_at"])
        differs = existing.differs_from(registration)
        if differs:
            raise DeviceConflict(registration.id, differs)
        return existing, False, None

    async def register_many(self, registrations: list[Registration]) -> int:
        """Provision a fleet in one transaction: devices not registered yet are created with their
        ``registered`` events; ids that exist (live or deleted) are left as they are. Returns how
        many were created."""
        async with self.connection(transaction=True) as conn:
            created = await conn.fetch(
                f"INSERT INTO devices (id, name, type, tags, firmware_version, status) "
                f"SELECT r.id, r.name, r.type, ARRAY(SELECT jsonb_array_elements_text(r.tags)), r.firmware_version, r.status "
                f"FROM jsonb_to_recordset($1::jsonb) AS r(id text, name text, type text, tags jsonb, "
                f"firmware_version text, status text) ORDER BY r.id "
                f"ON CONFLICT (id) DO NOTHING RETURNING {_COLUMNS}",
                json.dumps([{**dataclasses.asdict(r), "tags": list(r.tags)} for r in registrations]),
            )
            for record in created:
                await _event(conn, _device(record), "registered")
            if created:
                ids = sorted(r["id"] for r in created)
                await audit.record(conn, "device.provision", "device", f"{ids[0]}..{ids[-1]}", count=len(ids),
                                   ids=ids[:100])
        return len(created)

    async def get(self, device_id: str) -> Device:
        async with self.connection() as conn:
            record = await conn.fetchrow(f"SELECT {_COLUMNS} FROM devices WHERE id = $1 AND deleted_at IS NULL",
                                         device_id)
        if record is None:
            raise DeviceNotFound(device_id)
        return _device(record)

    async def list(self, query: DeviceQuery) -> tuple[list[Device], str | None]:
        """One page of live devices in id order, and the cursor of the next page (None at the end)."""
        where, args = ["deleted_at IS NULL"], []
        for column in ("type", "status", "firmware_version"):
            value = getattr(query, column)
            if value is not None:
                args.append(value)
                where.append(f"{column} = ${len(args)}")
        if query.tags:
            args.append(list(query.tags))
            where.append(f"tags @> ${len(args)}")
        if query.after is not None:
            args.append(query.after)
            where.append(f"id > ${len(args)}")
        if query.q is not None:
            args.append("%" + query.q.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_") + "%")
            where.append(f"(id ILIKE ${len(args)} OR name ILIKE ${len(args)})")
        args.append(query.limit + 1)
        sql = f"SELECT {_COLUMNS} FROM devices WHERE {' AND '.join(where)} ORDER BY id LIMIT ${len(args)}"
        async with self.connection() as conn:
            records = await conn.fetch(sql, *args)
        devices = [_device(r) for r in records[: query.limit]]
        more = len(records) > query.limit
        return devices, encode_cursor(devices[-1].id) if more else None

    async def update(self, device_id: str, change: Change, expected_version: int | None) -> Device:
        """Apply ``change`` if the device is at ``expected_version`` (None: whatever version it is at)."""
        assignments = [f"{name} = ${i}" for i, name in enumerate(change.values, start=3)]
        values = [list(v) if name == "tags" else v for name, v in change.values.items()]
        async with self.connection(transaction=True) as conn:
            current = await _locked(conn, device_id, expected_version)
            record = await conn.fetchrow(
                f"UPDATE devices SET {', '.join(assignments)}, version = version + 1, updated_at = now() "
                f"WHERE id = $1 AND version = $2 RETURNING {_COLUMNS}",
                device_id, current.version, *values,
            )
            device = _device(record)
            await _event(conn, device, "updated", changed=sorted(change.values))
            await audit.record(conn, "device.update", "device", device_id, changed=sorted(change.values),
                               version=device.version)
            return device

    async def summary(self, offline_after_s: float) -> dict[str, int]:
        """Devices live, online (a heartbeat within ``offline_after_s``, as PostgreSQL's last_seen
        has it — written every few seconds), offline, and deleted."""
        async with self.connection() as conn:
            row = await conn.fetchrow(
                "SELECT count(*) FILTER (WHERE deleted_at IS NULL) AS live, "
                "count(*) FILTER (WHERE deleted_at IS NULL AND last_seen > now() - make_interval(secs => $1)) AS online, "
                "count(*) FILTER (WHERE deleted_at IS NOT NULL) AS deleted FROM devices", offline_after_s)
        return {"live": row["live"], "online": row["online"], "offline": row["live"] - row["online"],
                "deleted": row["deleted"]}

    async def firmware_history(self, device_id: str) -> list[dict[str, Any]]:
        """The device's rollout executions, newest first: what it was sent, from which version, how it ended."""
        async with self.connection() as conn:
            rows = await conn.fetch(
                "SELECT r.rollout_id, coalesce(r.target_version, o.firmware_version) AS firmware_version, "
                "r.from_version, r.state, r.health, r.attempts, r.state_changed_at, o.status AS rollout_status "
                "FROM rollout_devices r JOIN rollouts o ON o.id = r.rollout_id WHERE r.device_id = $1 "
                "ORDER BY o.created_at DESC LIMIT 100", device_id)
        return [{**dict(r), "rollout_id": str(r["rollout_id"]), "state_changed_at": r["state_changed_at"].isoformat()}
                for r in rows]

    async def record_last_seen(self, seen: dict[str, datetime]) -> int:
        """Move ``last_seen`` forward for these devices in one statement (never backward, never a
        new version: presence is not a change of the device); returns the rows moved."""
        if not seen:
            return 0
        async with self.connection() as conn:
            status = await conn.execute(
                "UPDATE devices d SET last_seen = v.seen FROM unnest($1::text[], $2::timestamptz[]) AS v(id, seen) "
                "WHERE d.id = v.id AND (d.last_seen IS NULL OR d.last_seen < v.seen)",
                list(seen), list(seen.values()))
        return int(status.rsplit(" ", 1)[-1])

    async def delete(self, device_id: str, expected_version: int | None,
                     revoke: Callable[[str], Awaitable[object]] | None = None) -> Device:
        """Soft delete: the row stays with ``deleted_at`` set; its id cannot be registered again.
        ``revoke`` (deleting the device's MQTT account, which disconnects it) runs before the
        commit: a broker that refuses leaves the device as it was."""
        async with self.connection(transaction=True) as conn:
            await _locked(conn, device_id, expected_version)
            if revoke is not None:
                await revoke(device_id)
            record = await conn.fetchrow(
                f"UPDATE devices SET deleted_at = now(), updated_at = now(), version = version + 1 "
                f"WHERE id = $1 RETURNING {_COLUMNS}",
                device_id,
            )
            device = _device(record)
            await _event(conn, device, "deleted")
            await audit.record(conn, "device.delete", "device", device_id, version=device.version)
            return device

    async def rotate_credentials(self, device_id: str, issue: Callable[[str], Awaitable[str]]) -> str:
        """A new MQTT password for the live device (its account re-enabled, its connections closed)."""
        async with self.connection(transaction=True) as conn:
            await _locked(conn, device_id, None)
            secret = await issue(device_id)
            await audit.record(conn, "device.credentials.rotate", "device", device_id)
            return secret

    async def revoke_credentials(self, device_id: str, revoke: Callable[[str], Awaitable[bool]]) -> bool:
        """Disable the live device's MQTT account (connections closed); False when it had none."""
        async with self.connection(transaction=True) as conn:
            await _locked(conn, device_id, None)
            had = await revoke(device_id)
            await audit.record(conn, "device.credentials.revoke", "device", device_id, had_account=had)
            return had


async def set_firmware_version(conn: asyncpg.Connection, device_id: str, firmware_version: str) -> Device | None:
    """Record, in the caller's transaction, that a device now runs ``firmware_version`` (a rollout
    succeeded on it): a new version of the device with its outbox event, like any update. None when
    the device is gone (deleted) or already at that version."""
    record = await conn.fetchrow(
        f"UPDATE devices SET firmware_version = $2, version = version + 1, updated_at = now() "
        f"WHERE id = $1 AND deleted_at IS NULL AND firmware_version IS DISTINCT FROM $2 RETURNING {_COLUMNS}",
        device_id, firmware_version)
    if record is None:
        return None
    device = _device(record)
    await _event(conn, device, "updated", changed=["firmware_version"])
    return device


async def _locked(conn: asyncpg.Connection, device_id: str, expected_version: int | None) -> Device:
    """The live device, locked for this transaction, at ``expected_version`` if one is named."""
    record = await conn.fetchrow(
        f"SELECT {_COLUMNS} FROM devices WHERE id = $1 AND deleted_at IS NULL FOR UPDATE", device_id)
    if record is None:
        raise DeviceNotFound(device_id)
    current = _device(record)
    if expected_version is not None and current.version != expected_version:
        raise VersionMismatch(device_id, expected_version, current.version)
    return current


async def _event(conn: asyncpg.Connection, device: Device, kind: str, **extra: Any) -> None:
    event_id = uuid.uuid4()
    payload = {"event_id": str(event_id), "kind": kind, "device": device.to_json(), **extra}
    await conn.execute(
        "INSERT INTO device_outbox (event_id, device_id, kind, payload) VALUES ($1, $2, $3, $4::jsonb)",
        event_id, device.id, kind, json.dumps(payload),
    )



async def provision(settings: Settings, device_ids: list[str], *, device_type: str, tags: tuple[str, ...] = (),
                    firmware_version: str | None = None) -> int:
    """Register ``device_ids`` (name = id) through the registry, as an operator's bulk provisioning
    would: returns how many were new. Used by ``iotflow devices register``, the simulator and bench."""
    pool = LazyPool(settings.pg_dsn, size=1, connect_timeout_s=settings.pg_connect_timeout_s,
                    command_timeout_s=max(settings.pg_command_timeout_s, 60.0), application_name="iotflow-provision")
    try:
        registry = DeviceRegistry(pool)
        created = 0
        for start in range(0, len(device_ids), _PROVISION_CHUNK):
            chunk = device_ids[start:start + _PROVISION_CHUNK]
            created += await registry.register_many([
                # Checked as the API checks a registration: a bad id, type or tag names itself.
                parse_registration(json.dumps({"id": d, "name": d, "type": device_type, "tags": list(tags),
                                               "firmware_version": firmware_version}).encode(), reserved(settings))
                for d in chunk])
        return created
    finally:
        await pool.close()


_PROVISION_CHUNK = 5000
