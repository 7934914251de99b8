"""``/health/live``: the process answers; it never checks a dependency (design R-15)."""
from __future__ import annotations

import time

import faust
from faust.web import Request, Response, View


def register(app: faust.App) -> None:
    started = time.monotonic()

    @app.page("/health/live")
    async def live(self: View, request: Request) -> Response:
        return self.json({"status": "ok", "uptime_s": round(time.monotonic() - started, 3)})
