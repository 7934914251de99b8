"""The web server's limits and headers, for every route.

* Request bodies are bounded by ``IOTFLOW_API_MAX_BODY_BYTES``: a declared ``Content-Length`` above
  it is refused with 413 before a byte is read, and a body without one (chunked) is read in pieces
  and refused as soon as it passes the bound — Faust's own reader would take any size into memory.
* Every answer carries ``X-Content-Type-Options: nosniff``, ``X-Frame-Options: DENY`` and
  ``Referrer-Policy: no-referrer``; the JSON API also ``Cache-Control: no-store``, the console a
  Content-Security-Policy that admits only this origin.

Per-token rate limits of mutating requests live with the token checks (iotflow/web/auth.py).
"""
from __future__ import annotations

from collections.abc import Awaitable, Callable

import faust
from aiohttp import web

from iotflow.web.problems import HEADER, request_id

_CHUNK = 64 * 1024
# The console's scripts, styles and API calls come from this origin only; no inline code, no frames.
CONSOLE_POLICY = ("default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
                  "connect-src 'self'; base-uri 'none'; form-action 'self'; frame-ancestors 'none'")
SECURITY_HEADERS = {"X-Content-Type-Options": "nosniff", "X-Frame-Options": "DENY", "Referrer-Policy": "no-referrer"}


class PayloadTooLarge(Exception):
    def __init__(self, limit: int) -> None:
        super().__init__(f"the request body is larger than {limit} bytes")
        self.limit = limit


def install(app: faust.App, max_body_bytes: int) -> None:
    """Bound request bodies and add the security headers on ``app``'s web server."""

    async def bounded_read(request: web.Request) -> bytes:
        body = bytearray()
        while chunk := await request.content.read(_CHUNK):
            body += chunk
            if len(body) > max_body_bytes:
                raise PayloadTooLarge(max_body_bytes)
        return bytes(body)

    @web.middleware
    async def limits_and_headers(request: web.Request,
                                 handler: Callable[[web.Request], Awaitable[web.StreamResponse]]) -> web.StreamResponse:
        if request.content_length is not None and request.content_length > max_body_bytes:
            response: web.StreamResponse = _too_large(request, max_body_bytes)
        else:
            try:
                response = await handler(request)
            except PayloadTooLarge as exc:
                response = _too_large(request, exc.limit)
        response.headers.update(SECURITY_HEADERS)
        if request.path.startswith("/api/"):
            response.headers.setdefault("Cache-Control", "no-store")
        elif request.path.startswith("/console"):
            response.headers["Content-Security-Policy"] = CONSOLE_POLICY
        return response

    app.web.read_request_content = bounded_read  # what every view's read_request_content calls
    app.web.web_app.middlewares.append(limits_and_headers)


def _too_large(request: web.Request, limit: int) -> web.Response:
    rid = request_id(request)
    body = {"type": "about:blank", "title": "Request body too large", "status": 413,
            "detail": f"at most {limit} bytes per request body (IOTFLOW_API_MAX_BODY_BYTES)",
            "instance": request.path, "request_id": rid, "limit_bytes": limit}
    # The body was not read: close the connection rather than drain what the client still sends.
    return web.json_response(body, status=413, content_type="application/problem+json",
                             headers={HEADER: rid, "Connection": "close"})
