"""``GET /api/v1/audit`` (admin): the audit log, newest first, filtered by actor, action or target,
in pages (``before`` = the ``next_before`` of the previous page)."""
from __future__ import annotations

import re

import faust
from faust.web import Request, Response, View

from iotflow import audit
from iotflow.devices import FieldErrors
from iotflow.registry import DeviceRegistry
from iotflow.web.auth import Guard
from iotflow.web.problems import HEADER, answer, request_id

_TEXT = re.compile(r"[\x21-\x7e]{1,200}")
_FILTERS = ("actor", "action", "target_type", "target_id")


def parse_audit_query(params) -> audit.AuditQuery:
    errors = FieldErrors()
    for name in sorted(set(params.keys()) - {*_FILTERS, "before", "limit"}):
        errors.add(name, params.get(name), "unknown query parameter")
    values: dict = {}
    for name in _FILTERS:
        if name in params:
            if _TEXT.fullmatch(params.get(name)):
                values[name] = params.get(name)
            else:
                errors.add(name, params.get(name), "1-200 printable characters")
    for name, low, high in (("before", 1, 2**63 - 1), ("limit", 1, audit.MAX_PAGE)):
        if name in params:
            raw = params.get(name)
            if raw.isdigit() and low <= int(raw) <= high:
                values[name] = int(raw)
            else:
                errors.add(name, raw, f"an integer from {low} to {high}")
    errors.raise_any("Invalid audit query")
    return audit.AuditQuery(**values)


def register(app: faust.App, registry: DeviceRegistry, guard: Guard) -> None:
    @app.page("/api/v1/audit")
    class AuditLog(View):
        @guard.requires("admin")
        async def get(self, request: Request) -> Response:
            async def work() -> Response:
                query = parse_audit_query(request.query)
                async with registry.connection() as conn:
                    found, before = await audit.entries(conn, query)
                return self.json({"items": found, "next_before": before}, headers={HEADER: request_id(request)})
            return await answer(self, request, work)
