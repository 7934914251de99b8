"""``POST /api/v1/ingest``: the HTTP fallback for devices that cannot reach MQTT (R-12).

The body is a JSON array of telemetry payloads. Every item is validated exactly as the ingest
agent validates it; if any item is invalid, nothing is accepted and the answer (422) lists each
bad item by index with its field and reason — nothing is ever half-accepted silently. Otherwise
every item is produced to sensor-data, keyed by its device id, and the answer (202) comes only
after Kafka confirmed all of them (acks=all).
"""
from __future__ import annotations

import asyncio
from datetime import timedelta

import faust
import msgspec
from faust.web import Request, Response, View

from iotflow import topics
from iotflow.errors import InvalidPayload
from iotflow.settings import Settings
from iotflow.telemetry import NOT_JSON, Limits, parse
from iotflow.web.auth import Guard
from iotflow.web.problems import HEADER, problem, request_id

MAX_ITEMS = 1000


def register(app: faust.App, settings: Settings, guard: Guard) -> None:
    sensor_data = topics.sensor_data(app, settings)
    limits = Limits(max_clock_skew=timedelta(seconds=settings.max_clock_skew_s),
                    retention=timedelta(days=settings.retention_days))

    @app.page("/api/v1/ingest")
    class Ingest(View):
        @guard.requires("operator", rate_limited=False)
        async def post(self, request: Request) -> Response:
            body = await self.read_request_content(request)
            try:
                items = msgspec.json.decode(body, type=list[msgspec.Raw])
            except (*NOT_JSON, msgspec.ValidationError) as exc:
                return problem(self, request, 400, "Body is not a JSON array", str(exc) or exc.__class__.__name__)
            if not items:
                return problem(self, request, 422, "Nothing to ingest", "the array is empty")
            if len(items) > MAX_ITEMS:
                return problem(self, request, 413, "Too many items",
                               f"at most {MAX_ITEMS} items per request (got {len(items)})")
            accepted, errors = [], []
            for index, raw in enumerate(items):
                try:
                    accepted.append((parse(bytes(raw), limits), bytes(raw)))
                except InvalidPayload as exc:
                    errors.append({"index": index, "field": exc.field, "reason": str(exc)})
            if errors:
                return problem(self, request, 422, "Invalid telemetry",
                               f"{len(errors)} of {len(items)} items are invalid; none was accepted",
                               errors=errors)
            deliveries = [
                await sensor_data.send(key=telemetry.device_id.encode(), value=raw)
                for telemetry, raw in accepted
            ]
            try:
                await asyncio.wait_for(asyncio.gather(*deliveries), settings.kafka_request_timeout_s)
            except (asyncio.TimeoutError, Exception) as exc:  # noqa: BLE001 - any failure is a 503 here
                return problem(self, request, 503, "Kafka did not confirm the messages",
                               f"{exc.__class__.__name__}: {exc}; retry the request (duplicates are removed)")
            return self.json({"accepted": len(accepted)}, status=202, headers={HEADER: request_id(request)})
