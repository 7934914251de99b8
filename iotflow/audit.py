"""The audit log: who changed what, when, under which request — in PostgreSQL, append-only.

Each store method that changes something writes its row with :func:`record`, in the same
transaction as the change: a call that changed nothing (a repeated registration, a retried
rollout creation with its Idempotency-Key, a pause of a paused rollout) writes none, so each
mutating call is recorded exactly once. Who is acting comes from the request: the token check
(iotflow/web/auth.py) sets it for the request's task with :func:`acting`; outside a request (the
CLI) it is ``system:<OS user>``. Readable by admins through ``GET /api/v1/audit``.
"""
from __future__ import annotations

import getpass
import json
from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import asyncpg

MAX_PAGE = 500


@dataclass(frozen=True)
class Actor:
    subject: str
    role: str
    request_id: str | None = None


_current: ContextVar[Actor | None] = ContextVar("iotflow_actor", default=None)


@contextmanager
def acting(actor: Actor) -> Iterator[None]:
    """Changes made within are recorded as ``actor``'s."""
    token = _current.set(actor)
    try:
        yield
    finally:
        _current.reset(token)


def _system() -> Actor:
    try:
        user = getpass.getuser()
    except (KeyError, OSError):  # no passwd entry (some containers)
        user = "unknown"
    return Actor(f"system:{user}", "system")


async def record(conn: asyncpg.Connection, action: str, target_type: str, target_id: str, **details: Any) -> None:
    """Append one row, in the caller's transaction."""
    actor = _current.get() or _system()
    await conn.execute(
        "INSERT INTO audit_log (actor, role, action, target_type, target_id, request_id, details) "
        "VALUES ($1, $2, $3, $4, $5, $6, $7::jsonb)",
        actor.subject, actor.role, action, target_type, target_id, actor.request_id,
        json.dumps(details, default=str, sort_keys=True))


@dataclass(frozen=True)
class AuditQuery:
    actor: str | None = None
    action: str | None = None
    target_type: str | None = None
    target_id: str | None = None
    before: int | None = None  # an id: entries older than it (the next page)
    limit: int = 100


async def entries(conn: asyncpg.Connection, query: AuditQuery) -> tuple[list[dict[str, Any]], int | None]:
    """Newest first; and the ``before`` of the next page (None at the end)."""
    where, args = [], []
    for column in ("actor", "action", "target_type", "target_id"):
        value = getattr(query, column)
        if value is not None:
            args.append(value)
            where.append(f"{column} = ${len(args)}")
    if query.before is not None:
        args.append(query.before)
        where.append(f"id < ${len(args)}")
    args.append(query.limit + 1)
    rows = await conn.fetch(
        "SELECT id, at, actor, role, action, target_type, target_id, request_id, details FROM audit_log "
        f"{'WHERE ' + ' AND '.join(where) if where else ''} ORDER BY id DESC LIMIT ${len(args)}", *args)
    found = [_entry(r) for r in rows[:query.limit]]
    return found, found[-1]["id"] if len(rows) > query.limit else None


def _entry(row: asyncpg.Record) -> dict[str, Any]:
    value = dict(row)
    at: datetime = value["at"]
    value["at"] = at.isoformat()
    value["details"] = json.loads(value["details"])
    return value
