"""Feature flags in PostgreSQL: on/off switches with percentage targeting (seed finding R-19).

``rollouts.kill_switch`` on stops every rollout's dispatch at the orchestrator's next tick;
``rollout:<id>`` off holds one rollout's dispatch (both are checked before every dispatch). A flag
with a percentage applies to that share of subjects (devices), chosen by a stable hash of flag
name and subject: the same devices stay in as the percentage grows, and two flags do not pick
the same devices. ``rollouts.delta_updates`` is the first such flag: the devices it covers are sent
delta updates (``"delivery": "delta"`` in the command), the others full images.
"""
from __future__ import annotations

import hashlib
import re
from collections.abc import Callable
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import asyncpg

from iotflow import audit
from iotflow.devices import FieldErrors, json_object
from iotflow.errors import FlagNotFound

KILL_SWITCH = "rollouts.kill_switch"
DELTA_UPDATES = "rollouts.delta_updates"
NAME = re.compile(r"[a-z0-9][a-z0-9_.:-]{0,127}")


def rollout_flag(rollout_id: str) -> str:
    """The flag that holds one rollout's dispatch when it is off."""
    return f"rollout:{rollout_id}"


def bucket(name: str, subject: str) -> int:
    """A stable 0–99 bucket of ``subject`` for flag ``name``."""
    return int.from_bytes(hashlib.sha256(f"{name}\x00{subject}".encode()).digest()[:4], "big") % 100


@dataclass(frozen=True)
class Flag:
    name: str
    enabled: bool
    percentage: int = 100
    updated_at: datetime | None = None

    def applies_to(self, subject: str) -> bool:
        """Whether the flag is on for ``subject``."""
        return self.enabled and bucket(self.name, subject) < self.percentage

    def to_json(self) -> dict[str, Any]:
        return {"name": self.name, "enabled": self.enabled, "percentage": self.percentage,
                "updated_at": self.updated_at.isoformat() if self.updated_at else None}


def parse_flag(name: str, body: bytes) -> Flag:
    """A ``PUT /api/v1/flags/{name}`` body: ``{"enabled": bool, "percentage"?: 0-100}``."""
    errors = FieldErrors()
    if not NAME.fullmatch(name):
        errors.add("name", name, "lower-case letters, digits and _.:- (1-128 characters)")
    raw = json_object(body)
    for unknown in sorted(set(raw) - {"enabled", "percentage"}):
        errors.add(unknown, raw[unknown], "unknown field")
    enabled = raw.get("enabled")
    if not isinstance(enabled, bool):
        errors.add("enabled", enabled, "true or false")
    percentage = raw.get("percentage", 100)
    if isinstance(percentage, bool) or not isinstance(percentage, int) or not 0 <= percentage <= 100:
        errors.add("percentage", percentage, "an integer from 0 to 100")
    errors.raise_any("Invalid flag")
    return Flag(name, bool(enabled), int(percentage))


_COLUMNS = "name, enabled, percentage, updated_at"


def _flag(record: asyncpg.Record) -> Flag:
    return Flag(record["name"], record["enabled"], record["percentage"], record["updated_at"])


class Flags:
    def __init__(self, connection: Callable[..., AbstractAsyncContextManager[asyncpg.Connection]]) -> None:
        self.connection = connection

    async def set(self, flag: Flag) -> Flag:
        async with self.connection(transaction=True) as conn:
            record = await conn.fetchrow(
                "INSERT INTO feature_flags (name, enabled, percentage) VALUES ($1, $2, $3) "
                "ON CONFLICT (name) DO UPDATE SET enabled = $2, percentage = $3, updated_at = now() "
                f"RETURNING {_COLUMNS}", flag.name, flag.enabled, flag.percentage)
            await audit.record(conn, "flag.set", "flag", flag.name, enabled=flag.enabled, percentage=flag.percentage)
        return _flag(record)

    async def get(self, name: str) -> Flag:
        async with self.connection() as conn:
            record = await conn.fetchrow(
                f"SELECT {_COLUMNS} FROM feature_flags WHERE name = $1", name)
        if record is None:
            raise FlagNotFound(name)
        return _flag(record)

    async def list(self) -> list[Flag]:
        async with self.connection() as conn:
            records = await conn.fetch(f"SELECT {_COLUMNS} FROM feature_flags ORDER BY name")
        return [_flag(r) for r in records]


async def read(conn: asyncpg.Connection, names: list[str]) -> dict[str, Flag]:
    """The flags among ``names`` that exist (one query: the orchestrator reads them every tick)."""
    records = await conn.fetch(
        f"SELECT {_COLUMNS} FROM feature_flags WHERE name = ANY($1::text[])", names)
    return {r["name"]: _flag(r) for r in records}
