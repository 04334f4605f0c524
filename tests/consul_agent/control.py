"""The control API, on a port of its own that faults never touch: ``GET /state``,
``PUT /fault/<mode>``, ``PUT /tokens`` and ``GET /health/<name>``, for tests that run the agent
as a separate process (``python -m tests.consul_agent --control-port N``)."""

from __future__ import annotations

from aiohttp import web

from .acl import ACLAPI
from .faults import FaultSwitches


class ControlAPI(FaultSwitches, ACLAPI):
    """The control API's server and handlers."""

    async def start_control(self, port: int = 0) -> int:
        """Serve the out-of-band control API (never affected by faults); returns its port."""
        app = web.Application()
        app.router.add_get("/state", self._control_state)
        app.router.add_put("/fault/{mode}", self._control_fault)
        app.router.add_put("/tokens", self._control_token)
        app.router.add_get("/health/{name}", self._control_health)
        self._control = web.AppRunner(app)
        await self._control.setup()
        site = web.TCPSite(self._control, self.host, port)
        await site.start()
        return int(self._control.addresses[0][1])

    async def _control_state(self, request: web.Request) -> web.Response:
        return web.json_response(
            {
                "fault": self.fault,
                "index": self._index,
                "port": self.port,
                "services": self.services_view(),
                "checks": self.checks_view(),
            }
        )

    async def _control_fault(self, request: web.Request) -> web.Response:
        try:
            await self.set_fault(request.match_info["mode"])
        except ValueError as exc:
            return web.Response(status=400, text=str(exc))
        return web.json_response({"fault": self.fault, "index": self._index})

    async def _control_token(self, request: web.Request) -> web.Response:
        body = await request.json()
        try:
            accessor = self.add_token(
                body.get("SecretID"), body.get("Policy"), description=body.get("Description", "")
            )
        except ValueError as exc:
            return web.Response(status=400, text=str(exc))
        return web.json_response({"AccessorID": accessor})

    async def _control_health(self, request: web.Request) -> web.Response:
        passing = "passing" in request.query
        return web.json_response(self.health_view(request.match_info["name"], passing))
