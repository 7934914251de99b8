"""``/api/v1/firmware``: the firmware catalogue — publish a version (operator), list and read
(viewer) — and ``/api/v1/firmware/rollouts``: create a rollout (operator, ``Idempotency-Key``
required), list and read one with its counts per state and per wave (viewer); pause, resume,
cancel and roll back a rollout (operator).

Publishing the same version with the same values again answers 200 with it; other values for a
published version are refused (409). The same Idempotency-Key with the same request answers the
original rollout (200); with another request, 422. Errors are problem+json naming every bad field
and value.
"""
from __future__ import annotations

import json

import faust
from faust.web import Request, Response, View

from iotflow.devices import FIRMWARE_VERSION
from iotflow.errors import InvalidRequest
from iotflow.firmware import Firmware, FirmwareCatalogue, parse_firmware
from iotflow.rollout_store import RolloutStore
from iotflow.rollouts import ROLLOUT_STATUSES, parse_idempotency_key, parse_rollout_request
from iotflow.web.auth import Guard
from iotflow.tables.batched import stored
from iotflow.web.problems import HEADER, answer, problem, request_id
from iotflow.web.routing import key_partition, table_route

PREFIX = "/api/v1/firmware"


def _respond(view: View, request: Request, firmware: Firmware, status: int = 200, **headers: str) -> Response:
    return view.json(firmware.to_json(), status=status, headers={HEADER: request_id(request), **headers})


def register(app: faust.App, catalogue: FirmwareCatalogue, guard: Guard) -> None:
    @app.page(PREFIX)
    class Catalogue(View):
        @guard.requires("operator")
        async def post(self, request: Request) -> Response:
            async def work() -> Response:
                firmware, created = await catalogue.add(parse_firmware(await self.read_request_content(request)))
                if created:
                    return _respond(self, request, firmware, 201, Location=f"{PREFIX}/{firmware.version}")
                return _respond(self, request, firmware)
            return await answer(self, request, work)

        @guard.requires("viewer")
        async def get(self, request: Request) -> Response:
            async def work() -> Response:
                after = request.query.get("after")
                if after is not None and not FIRMWARE_VERSION.fullmatch(after):
                    raise InvalidRequest("Invalid query", [{"field": "after", "value": after,
                                                            "reason": "a firmware version (the last of the previous page)"}])
                page, cursor = await catalogue.list(after)
                body = {"items": [f.to_json() for f in page], "next_cursor": cursor}
                return self.json(body, headers={HEADER: request_id(request)})
            return await answer(self, request, work)

    @app.page(PREFIX + "/{version}")
    @guard.requires("viewer")
    async def one(self: View, request: Request, version: str) -> Response:
        async def work() -> Response:
            return _respond(self, request, await catalogue.get(version))
        return await answer(self, request, work)


ROLLOUTS = PREFIX + "/rollouts"


def register_rollouts(app: faust.App, store: RolloutStore, guard: Guard, progress: faust.Table) -> None:
    """``/api/v1/firmware/rollouts`` (registered before ``/api/v1/firmware/{version}``, which would
    otherwise take the path for a version named "rollouts")."""

    @app.page(ROLLOUTS)
    class Rollouts(View):
        @guard.requires("operator")
        async def post(self, request: Request) -> Response:
            async def work() -> Response:
                key = parse_idempotency_key(request.headers.get("Idempotency-Key"))
                rollout, created = await store.create(key, parse_rollout_request(await self.read_request_content(request)))
                headers = {HEADER: request_id(request)}
                if created:
                    headers["Location"] = f"{ROLLOUTS}/{rollout['id']}"
                return self.json(rollout, status=201 if created else 200, headers=headers)
            return await answer(self, request, work)

        @guard.requires("viewer")
        async def get(self, request: Request) -> Response:
            async def work() -> Response:
                status = request.query.get("status")
                if status is not None and status not in ROLLOUT_STATUSES:
                    raise InvalidRequest("Invalid query", [{"field": "status", "value": status,
                                                            "reason": f"one of {', '.join(ROLLOUT_STATUSES)}"}])
                return self.json({"items": await store.list(status)}, headers={HEADER: request_id(request)})
            return await answer(self, request, work)

    @app.page(ROLLOUTS + "/{rollout_id}")
    @guard.requires("viewer")
    async def one_rollout(self: View, request: Request, rollout_id: str) -> Response:
        async def work() -> Response:
            return self.json(await store.get(rollout_id), headers={HEADER: request_id(request)})
        return await answer(self, request, work)

    @app.page(ROLLOUTS + "/{rollout_id}/progress")
    @guard.requires("viewer")
    @table_route(app, progress, "rollout_id")
    async def rollout_progress(self: View, request: Request, rollout_id: str) -> Response:
        """The rollout's latest progress snapshot as the rollout-progress table holds it (answered by
        the worker owning the key; eventually what ``GET /rollouts/{id}`` counts, within a tick)."""
        key = rollout_id.encode()
        raw = stored(progress, key_partition(app, progress, key), key)
        if raw is None:
            return problem(self, request, 404, "No progress for this rollout",
                           f"no snapshot of {rollout_id!r} in the rollout-progress table (unknown, or ended "
                           "over an hour before the table was built)", rollout_id=rollout_id)
        return self.json(json.loads(raw), headers={HEADER: request_id(request)})

    for action in ACTIONS:
        _register_action(app, store, guard, action)

    @app.page(ROLLOUTS + "/{rollout_id}/rollback")
    class Rollback(View):
        @guard.requires("operator")
        async def post(self, request: Request, rollout_id: str) -> Response:
            async def work() -> Response:
                rollout, created = await store.rollback(rollout_id)
                headers = {HEADER: request_id(request)}
                if created:
                    headers["Location"] = f"{ROLLOUTS}/{rollout['id']}"
                return self.json(rollout, status=201 if created else 200, headers=headers)
            return await answer(self, request, work)


ACTIONS = ("pause", "resume", "cancel")


def _register_action(app: faust.App, store: RolloutStore, guard: Guard, action: str) -> None:
    """``POST /api/v1/firmware/rollouts/{id}/{action}`` (operator): the rollout after the action."""

    class Action(View):
        @guard.requires("operator")
        async def post(self, request: Request, rollout_id: str) -> Response:
            async def work() -> Response:
                return self.json(await store.act(rollout_id, action), headers={HEADER: request_id(request)})
            return await answer(self, request, work)

    Action.__name__ = f"Rollout{action.title()}"
    app.page(f"{ROLLOUTS}/{{rollout_id}}/{action}")(Action)
