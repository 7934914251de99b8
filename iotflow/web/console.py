"""The operator console: one page at ``/console`` and its assets under ``/console/assets/``, shipped
in the package (iotflow/console/) and served by the worker — no build step, nothing from a CDN.
The page itself needs no token; everything it shows comes from ``/api/v1`` with the token the
operator pastes in. Its Content-Security-Policy allows only this origin (iotflow/web/hardening.py)."""
from __future__ import annotations

from pathlib import Path

import faust
from faust.web import Request, Response, View

ASSETS = Path(__file__).resolve().parents[1] / "console"


def register(app: faust.App) -> None:
    page = (ASSETS / "index.html").read_text()

    @app.page("/console")
    async def console(self: View, request: Request) -> Response:
        return self.html(page)

    app.web.add_static("/console/assets/", ASSETS)
