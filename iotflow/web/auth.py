"""Bearer-token checks for views: ``@guard.requires("operator")`` on a view method.

A request without a valid token gets 401 (with ``WWW-Authenticate: Bearer``), one whose role is
too low 403, both as problem+json. Health and metrics views are not guarded.
"""
from __future__ import annotations

from collections.abc import Awaitable, Callable
from functools import wraps
from typing import Any

from faust.web import Request, Response, View

from iotflow import auth
from iotflow.errors import Forbidden, Unauthorized
from iotflow.settings import Settings
from iotflow.web.problems import problem

Handler = Callable[..., Awaitable[Response]]


class Guard:
    def __init__(self, settings: Settings) -> None:
        self.keys = settings.jwt_keys
        self.issuer = settings.jwt_issuer
        self.audience = settings.jwt_audience

    def requires(self, role: str) -> Callable[[Handler], Handler]:
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
                return await handler(view, request, *args, **kwargs)
            return guarded
        return decorate
