"""RFC 7807 problem responses and the correlation id every response carries."""
from __future__ import annotations

import re
import uuid
from typing import Any

from faust.web import Request, Response, View

HEADER = "X-Request-ID"
_SAFE_ID = re.compile(r"[A-Za-z0-9._:-]{1,128}")


_REQUEST_KEY = "iotflow_request_id"


def request_id(request: Request) -> str:
    """The caller's correlation id when it is a sane token, else a fresh one — the same for the
    whole request (kept on it: its log lines and its answer carry one id)."""
    known = request.get(_REQUEST_KEY)
    if known is None:
        given = request.headers.get(HEADER, "")
        known = request[_REQUEST_KEY] = given if _SAFE_ID.fullmatch(given) else uuid.uuid4().hex
    return known


def problem(view: View, request: Request, status: int, title: str, detail: str, **extra: Any) -> Response:
    rid = request_id(request)
    body = {"type": "about:blank", "title": title, "status": status, "detail": detail,
            "instance": str(request.url.path), "request_id": rid, **extra}
    return view.json(body, status=status, content_type="application/problem+json", headers={HEADER: rid})
