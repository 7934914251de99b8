"""Bearer-token checks for views: ``@guard.requires("operator")`` on a view method.

A request without a valid token gets 401 (with ``WWW-Authenticate: Bearer``), one whose role is
too low 403, both as problem+json. Health and metrics views are not guarded.

Mutating requests (POST, PUT, PATCH, DELETE) are rate limited per token subject on each worker
(``IOTFLOW_API_WRITE_RATE_PER_S`` with bursts of ``IOTFLOW_API_WRITE_BURST``): beyond it, 429 with
``Retry-After``. Telemetry ingest is not (``rate_limited=False``): devices are bounded there by
the item limit and Kafka's confirmation, as the bridge bounds them on MQTT.
"""
from __future__ import annotations

import math
import time
from collections.abc import Awaitable, Callable
from functools import wraps
from typing import Any

from faust.web import Request, Response, View

from iotflow import audit, auth
from iotflow.backoff import TokenBuckets
from iotflow.errors import Forbidden, Unauthorized
from iotflow.settings import Settings
from iotflow.web.problems import problem, request_id

Handler = Callable[..., Awaitable[Response]]
_MUTATING = frozenset({"POST", "PUT", "PATCH", "DELETE"})


class Guard:
    def __init__(self, settings: Settings) -> None:
        self.keys = settings.jwt_keys
        self.issuer = settings.jwt_issuer
        self.audience = settings.jwt_audience
        self.writes = TokenBuckets(settings.api_write_rate_per_s, settings.api_write_burst)
        self._admitted = 0

    def _retry_after(self, subject: str) -> float:
        """0 when ``subject`` may make a mutating request now, else the seconds to wait."""
        now = time.monotonic()
        self._admitted += 1
        if self._admitted % 1000 == 0:
            self.writes.forget_idle(now)  # bounded memory with many subjects
        return self.writes.admit(subject, now)

    def requires(self, role: str, *, rate_limited: bool = True) -> Callable[[Handler], Handler]:
        assert role in auth.ROLES, role

        def decorate(handler: Handler) -> Handler:
            @wraps(handler)
            async def guarded(view: View, request: Request, *args: Any, **kwargs: Any) -> Response:
                try:
                    principal = auth.verify(self.keys, request.headers.get("Authorization"),
                                            issuer=self.issuer, audience=self.audience)
                    principal.require(role)
                except Unauthorized as exc:
                    response = problem(view, request, 401, "Unauthorized", exc.reason)
                    response.headers["WWW-Authenticate"] = 'Bearer realm="iotflow"'
                    return response
                except Forbidden as exc:
                    return problem(view, request, 403, "Forbidden", str(exc), role=exc.role, needed=exc.needed)
                if rate_limited and request.method in _MUTATING:
                    wait = self._retry_after(principal.subject)
                    if wait:
                        response = problem(view, request, 429, "Too many requests",
                                           f"{principal.subject!r} is over its rate of mutating requests; "
                                           f"retry in {math.ceil(wait)} s", retry_after_s=math.ceil(wait))
                        response.headers["Retry-After"] = str(math.ceil(wait))
                        return response
                # What the handler changes is recorded as this principal's (iotflow/audit.py).
                with audit.acting(audit.Actor(principal.subject, principal.role, request_id(request))):
                    return await handler(view, request, *args, **kwargs)
            return guarded
        return decorate
