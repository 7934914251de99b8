"""``/api/v1/ingest/counts/{device_id}``: a device's message count, from whichever worker owns it."""
from __future__ import annotations

import faust
from faust.web import Request, Response, View


def register(app: faust.App, message_counts: faust.Table) -> None:
    @app.page("/api/v1/ingest/counts/{device_id}")
    @app.table_route(table=message_counts, match_info="device_id")
    async def device_count(self: View, request: Request, device_id: str) -> Response:
        return self.json({"device_id": device_id, "count": message_counts[device_id.encode()]})
