"""``/api/v1/devices``: register, list, read, change and (softly) delete devices.

``GET /api/v1/devices/{id}/telemetry`` answers time-bucketed aggregates from the measurements
table; ``GET /api/v1/devices/{id}/state`` answers from the registry table (built from
``device-events``) on whichever worker owns the device's partition. Reading needs a bearer token
with role viewer, registering and changing operator, deleting admin (iotflow/auth.py). Reads of
one device go through the Redis cache (iotflow/cache.py) and never depend on it.

Registering a device makes its MQTT account (iotflow/mqtt_auth.py) and answers its password once,
under ``mqtt``; ``POST …/{id}/credentials`` gives it a new one (operator), ``DELETE
…/{id}/credentials`` revokes it (operator), ``GET …/{id}/credentials`` says whether it is active
(viewer); deleting the device deletes its account. Answers holding a password are ``no-store``.

Answers are JSON with ``X-Request-ID``; a device carries its version as ``ETag``, and a change or
a delete may name it in ``If-Match`` (a stale one gets 412). Errors are problem+json: 422 names
every bad field and value, 404 an unknown or deleted device, 409 a registration that contradicts
the device on record, 503 (with ``Retry-After``) a registry database that is not answering.
"""
from __future__ import annotations

from datetime import UTC, datetime

import faust
from faust.web import Request, Response, View

from iotflow.cache import DeviceCache
from iotflow.dedup import LatestValues
from iotflow.devices import (
    Device,
    RegistryEntry,
    parse_change,
    parse_if_match,
    parse_query,
    parse_registration,
    parse_telemetry_query,
)
from iotflow.errors import RegistryUnavailable
from iotflow.measurements import MeasurementReader
from iotflow.mqtt_auth import DeviceCredentials, broker_address, reserved
from iotflow.pg import is_transient
from iotflow.registry import DeviceRegistry
from iotflow.settings import Settings
from iotflow.tables.batched import stored
from iotflow.web.auth import Guard
from iotflow.web.problems import HEADER, answer, problem, request_id
from iotflow.web.routing import key_partition, table_route

PREFIX = "/api/v1/devices"


def _device_response(view: View, request: Request, device: Device, status: int = 200, **headers: str) -> Response:
    return view.json(device.to_json(), status=status,
                     headers={HEADER: request_id(request), "ETag": device.etag, **headers})


def _mqtt(settings: Settings, device_id: str, password: str) -> dict[str, object]:
    host, port = broker_address(settings)
    return {"url": settings.mqtt_url, "host": host, "port": port, "username": device_id, "client_id": device_id,
            "password": password}


def register(app: faust.App, settings: Settings, registry: DeviceRegistry, cache: DeviceCache, table: faust.Table,
             presence: faust.Table, latest: faust.Table, reader: MeasurementReader, guard: Guard,
             credentials: DeviceCredentials) -> None:
    platform_accounts = reserved(settings)

    async def read(device_id: str) -> Device:
        """Cache-aside: Redis first, PostgreSQL on a miss (or when Redis is away), then fill."""
        cached = await cache.get(device_id)
        if cached is not None:
            return Device.from_json(cached)
        device = await registry.get(device_id)
        await cache.fill(device.to_json())
        return device

    async def changed(device: Device) -> Device:
        await cache.invalidate(device.id, device.version)
        return device

    @app.page(PREFIX)
    class Devices(View):
        @guard.requires("operator")
        async def post(self, request: Request) -> Response:
            async def work() -> Response:
                registration = parse_registration(await self.read_request_content(request), platform_accounts)
                device, created, secret = await registry.register(registration, credentials.issue)
                if created and secret is not None:
                    body = {**device.to_json(), "mqtt": _mqtt(settings, device.id, secret)}
                    return self.json(body, status=201, headers={
                        HEADER: request_id(request), "ETag": device.etag, "Location": f"{PREFIX}/{device.id}",
                        "Cache-Control": "no-store"})
                return _device_response(self, request, device)
            return await answer(self, request, work)

        @guard.requires("viewer")
        async def get(self, request: Request) -> Response:
            async def work() -> Response:
                devices, cursor = await registry.list(parse_query(request.query))
                body = {"items": [d.to_json() for d in devices], "next_cursor": cursor}
                return self.json(body, headers={HEADER: request_id(request)})
            return await answer(self, request, work)

    @app.page(PREFIX + "/{device_id}")
    class OneDevice(View):
        @guard.requires("viewer")
        async def get(self, request: Request, device_id: str) -> Response:
            async def work() -> Response:
                return _device_response(self, request, await read(device_id))
            return await answer(self, request, work)

        @guard.requires("operator")
        async def patch(self, request: Request, device_id: str) -> Response:
            async def work() -> Response:
                change = parse_change(await self.read_request_content(request))
                version = parse_if_match(request.headers.get("If-Match"))
                return _device_response(self, request, await changed(await registry.update(device_id, change, version)))
            return await answer(self, request, work)

        @guard.requires("admin")
        async def delete(self, request: Request, device_id: str) -> Response:
            async def work() -> Response:
                version = parse_if_match(request.headers.get("If-Match"))
                return _device_response(self, request, await changed(
                    await registry.delete(device_id, version, credentials.delete)))
            return await answer(self, request, work)

    @app.page(PREFIX + "/{device_id}/credentials")
    class Credentials(View):
        @guard.requires("viewer")
        async def get(self, request: Request, device_id: str) -> Response:
            async def work() -> Response:
                await read(device_id)  # 404 for an unknown or deleted device
                return self.json({"device_id": device_id, "status": await credentials.status(device_id)},
                                 headers={HEADER: request_id(request)})
            return await answer(self, request, work)

        @guard.requires("operator")
        async def post(self, request: Request, device_id: str) -> Response:
            """A new password (the old one stops working; connections made with it are closed)."""
            async def work() -> Response:
                secret = await registry.rotate_credentials(device_id, credentials.issue)
                return self.json({"device_id": device_id, "mqtt": _mqtt(settings, device_id, secret)},
                                 headers={HEADER: request_id(request), "Cache-Control": "no-store"})
            return await answer(self, request, work)

        @guard.requires("operator")
        async def delete(self, request: Request, device_id: str) -> Response:
            """Revoke: the account is disabled and its connection closed (POST gives a new password)."""
            async def work() -> Response:
                had = await registry.revoke_credentials(device_id, credentials.revoke)
                return self.json({"device_id": device_id, "status": "revoked" if had else "none"},
                                 headers={HEADER: request_id(request)})
            return await answer(self, request, work)

    @app.page(PREFIX + "/{device_id}/telemetry")
    @guard.requires("viewer")
    async def telemetry(self: View, request: Request, device_id: str) -> Response:
        """Time-bucketed count/min/max/avg per metric of a registered device's measurements."""
        async def work() -> Response:
            query = parse_telemetry_query(request.query, datetime.now(UTC))
            await read(device_id)  # 404 for an unknown or deleted device
            try:
                buckets, archived_until = await reader.buckets(device_id, query)
            except Exception as exc:
                if is_transient(exc):
                    raise RegistryUnavailable(f"the measurements database is not answering: {exc}") from exc
                raise
            body = {"device_id": device_id, "from": query.start.isoformat(), "to": query.end.isoformat(),
                    "bucket_s": query.bucket_s, "metric": query.metric, "buckets": buckets,
                    "archived_until": archived_until.isoformat() if archived_until else None}
            return self.json(body, headers={HEADER: request_id(request)})
        return await answer(self, request, work)

    @app.page(PREFIX + "/{device_id}/firmware")
    @guard.requires("viewer")
    async def firmware_history(self: View, request: Request, device_id: str) -> Response:
        """The device's rollout executions, newest first (the console's firmware history)."""
        async def work() -> Response:
            await read(device_id)  # 404 for an unknown or deleted device
            return self.json({"device_id": device_id, "items": await registry.firmware_history(device_id)},
                             headers={HEADER: request_id(request)})
        return await answer(self, request, work)

    @app.page("/api/v1/fleet/summary")
    @guard.requires("viewer")
    async def fleet_summary(self: View, request: Request) -> Response:
        """Devices live, online, offline and deleted (online: a heartbeat within IOTFLOW_OFFLINE_AFTER_S)."""
        async def work() -> Response:
            return self.json(await registry.summary(settings.offline_after_s), headers={HEADER: request_id(request)})
        return await answer(self, request, work)

    @app.page(PREFIX + "/{device_id}/state")
    @guard.requires("viewer")
    @table_route(app, table, "device_id")
    async def state(self: View, request: Request, device_id: str) -> Response:
        """The device as this worker's registry table holds it (answered by the partition's owner)."""
        # Read from the key's own partition: Faust's table.get looks only in the partition stores
        # it opened, and a rebalance can leave owned ones unopened (iotflow/tables/batched.py).
        key = device_id.encode()
        partition = key_partition(app, table, key)
        raw = stored(table, partition, key)
        if raw is None:
            return problem(self, request, 404, "No such device in the registry",
                           f"no device-events applied for {device_id!r} (yet)", device_id=device_id)
        entry = RegistryEntry.decode(raw)
        seen = stored(presence, partition, key)
        last_seen = datetime.fromtimestamp(int(seen) / 1000, UTC) if seen else None
        online = last_seen is not None and (datetime.now(UTC) - last_seen).total_seconds() <= settings.offline_after_s
        body = {"device_id": device_id, "deleted": entry.deleted, "version": entry.device.get("version"),
                "status": entry.device.get("status"), "firmware_version": entry.device.get("firmware_version"),
                "last_seen": last_seen.isoformat() if last_seen else None, "online": online,
                "metrics": _latest_metrics(stored(latest, partition, key)),
                "events_applied": entry.events, "last_event_seq": entry.seq}
        return self.json(body, headers={HEADER: request_id(request)})


def _latest_metrics(raw: bytes | None) -> dict[str, dict[str, object]]:
    values = LatestValues.decode(raw) if raw else LatestValues()
    return {name: {"value": value, "time": datetime.fromtimestamp(ms / 1000, UTC).isoformat()}
            for name, (value, ms) in sorted(values.values.items())}
