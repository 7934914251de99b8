"""``/api/v1/flags``: feature flags — list and read (viewer), set (admin). ``rollouts.kill_switch``
on stops every rollout's dispatch at the orchestrator's next tick (iotflow/flags.py)."""
from __future__ import annotations

import faust
from faust.web import Request, Response, View

from iotflow.flags import Flags, parse_flag
from iotflow.web.auth import Guard
from iotflow.web.problems import HEADER, answer, request_id

PREFIX = "/api/v1/flags"


def register(app: faust.App, flags: Flags, guard: Guard) -> None:
    @app.page(PREFIX)
    @guard.requires("viewer")
    async def all_flags(self: View, request: Request) -> Response:
        async def work() -> Response:
            return self.json({"items": [f.to_json() for f in await flags.list()]}, headers={HEADER: request_id(request)})
        return await answer(self, request, work)

    @app.page(PREFIX + "/{name}")
    class One(View):
        @guard.requires("viewer")
        async def get(self, request: Request, name: str) -> Response:
            async def work() -> Response:
                return self.json((await flags.get(name)).to_json(), headers={HEADER: request_id(request)})
            return await answer(self, request, work)

        @guard.requires("admin")
        async def put(self, request: Request, name: str) -> Response:
            async def work() -> Response:
                flag = await flags.set(parse_flag(name, await self.read_request_content(request)))
                return self.json(flag.to_json(), headers={HEADER: request_id(request)})
            return await answer(self, request, work)
